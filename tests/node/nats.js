// Plain Node.js services on NATS (nats.js), the way the common articles
// write them: a JSON envelope { id, type, timestamp, payload, metadata:
// { correlationId } } as the body, headers Content-Type, correlationId and
// eventType, and on JetStream the event id as Nats-Msg-Id. Used by the Rust
// interop tests; no Tidings code here.
//
//   node nats.js publish <servers> <subject> <count> <jetstream|core> [envelope|cloudevents]
//   node nats.js consume <servers> <subject> <count> <jetstream|core> [stream durable]
// With `cloudevents` the publisher sends structured CloudEvents 1.0 instead
// (`application/cloudevents+json`, what many non-Node services send), and
// prints each event in the envelope's shape so the test checks both alike.
// Consumers print "ready", then one JSON line per message, then a summary
// line, and exit after <count> messages (or fail after 60 s).
const { connect, headers, AckPolicy, StringCodec } = require('nats');
const crypto = require('crypto');

const sc = StringCodec();

function envelope(i) {
  const type = i % 2 ? 'user.registered' : 'user.deleted';
  return {
    id: crypto.randomUUID(),
    type,
    timestamp: new Date().toISOString(),
    payload: { userId: `u-${i}`, name: `Zoë Ñandú ${i} ✓` },
    metadata: { correlationId: `corr-${i}` },
  };
}

// The same event as a structured CloudEvent.
function cloudEvent(e) {
  return {
    specversion: '1.0',
    id: e.id,
    source: '/node-svc',
    type: e.type,
    time: e.timestamp,
    datacontenttype: 'application/json',
    correlationid: e.metadata.correlationId,
    data: e.payload,
  };
}

async function publish(servers, subject, count, mode, format) {
  const nc = await connect({ servers });
  const js = nc.jetstream();
  for (let i = 0; i < count; i++) {
    const e = envelope(i);
    const h = headers();
    let body;
    if (format === 'cloudevents') {
      h.set('Content-Type', 'application/cloudevents+json');
      body = sc.encode(JSON.stringify(cloudEvent(e)));
    } else {
      h.set('Content-Type', 'application/json');
      h.set('correlationId', e.metadata.correlationId);
      h.set('eventType', e.type);
      body = sc.encode(JSON.stringify(e));
    }
    if (mode === 'jetstream') {
      await js.publish(subject, body, { msgID: e.id, headers: h });
    } else {
      nc.publish(subject, body, { headers: h });
    }
    console.log(JSON.stringify(e));
  }
  await nc.flush();
  await nc.close();
}

async function consume(servers, subject, count, mode, stream, durable) {
  const nc = await connect({ servers });
  const timer = setTimeout(() => { console.error('consume: timed out'); process.exit(2); }, 60000);
  const print = (m) => {
    let event = JSON.parse(sc.decode(m.data));
    if (event.specversion) {
      // A structured CloudEvent, printed in the envelope's shape.
      event = {
        id: event.id,
        type: event.type,
        timestamp: event.time,
        payload: event.data,
        metadata: { correlationId: event.correlationid },
      };
    }
    console.log(JSON.stringify({
      event,
      msgId: m.headers ? m.headers.get('Nats-Msg-Id') : undefined,
      correlationHeader: m.headers ? m.headers.get('correlationId') : undefined,
      contentType: m.headers ? m.headers.get('Content-Type') : undefined,
    }));
  };
  let seen = 0;
  if (mode === 'jetstream') {
    const jsm = await nc.jetstreamManager();
    try {
      await jsm.streams.add({ name: stream, subjects: [subject] });
    } catch (e) {
      if (!String(e).includes('already in use')) throw e;
    }
    await jsm.consumers.add(stream, { durable_name: durable, ack_policy: AckPolicy.Explicit, filter_subject: subject });
    const consumer = await nc.jetstream().consumers.get(stream, durable);
    const messages = await consumer.consume();
    console.log('ready');
    for await (const m of messages) {
      print(m);
      m.ack();
      seen += 1;
      if (seen >= count) break;
    }
    await nc.flush();
    // m.ack() does not wait for the server, which may count the last acks a
    // moment later: ask again (bounded, 5 s) before reporting what is pending.
    let info = await jsm.consumers.info(stream, durable);
    for (let i = 0; i < 50 && info.num_pending + info.num_ack_pending > 0; i++) {
      await new Promise((resolve) => setTimeout(resolve, 100));
      info = await jsm.consumers.info(stream, durable);
    }
    console.log(JSON.stringify({ pending: info.num_pending + info.num_ack_pending }));
  } else {
    const sub = nc.subscribe(subject);
    await nc.flush();
    console.log('ready');
    for await (const m of sub) {
      print(m);
      seen += 1;
      if (seen >= count) break;
    }
    console.log(JSON.stringify({ pending: 0 }));
  }
  clearTimeout(timer);
  await nc.close();
}

const [cmd, servers, subject, count, mode, stream, durable] = process.argv.slice(2);
const run = cmd === 'publish'
  ? publish(servers, subject, Number(count), mode, stream)
  : consume(servers, subject, Number(count), mode, stream, durable);
run.catch((e) => { console.error(e); process.exit(1); });
