// A plain Node.js service on RabbitMQ, the way the common articles write
// one: a durable topic exchange, routing key = event type, a JSON envelope
// { id, type, timestamp, payload, metadata: { correlationId } }, properties
// messageId / contentType / timestamp (milliseconds) and a correlationId
// header. Used by the Rust interop tests; no Tidings code here.
//
//   node rabbitmq.js publish <url> <exchange> <count>
//   node rabbitmq.js consume <url> <exchange> <queue> <pattern> <count>
// `consume` prints "ready" once its queue is bound, then one JSON line per
// message, and exits after <count> messages (or fails after 60 s).
const amqp = require('amqplib');
const crypto = require('crypto');

async function publish(url, exchange, count) {
  const conn = await amqp.connect(url);
  const ch = await conn.createConfirmChannel();
  await ch.assertExchange(exchange, 'topic', { durable: true });
  for (let i = 0; i < count; i++) {
    const type = i % 2 ? 'user.registered' : 'user.deleted';
    const event = {
      id: crypto.randomUUID(),
      type,
      timestamp: new Date().toISOString(),
      payload: { userId: `u-${i}`, name: `Zoë Ñandú ${i} ✓` },
      metadata: { correlationId: `corr-${i}` },
    };
    ch.publish(exchange, type, Buffer.from(JSON.stringify(event)), {
      persistent: true,
      messageId: event.id,
      contentType: 'application/json',
      timestamp: Date.now(),
      headers: { correlationId: event.metadata.correlationId },
    });
    console.log(JSON.stringify(event));
  }
  await ch.waitForConfirms();
  await conn.close();
}

async function consume(url, exchange, queue, pattern, count) {
  const conn = await amqp.connect(url);
  const ch = await conn.createChannel();
  await ch.assertExchange(exchange, 'topic', { durable: true });
  await ch.assertExchange(`${exchange}.dlx`, 'topic', { durable: true });
  // The articles' queue: durable, with their own dead-letter exchange.
  await ch.assertQueue(queue, { durable: true, arguments: { 'x-dead-letter-exchange': `${exchange}.dlx` } });
  await ch.bindQueue(queue, exchange, pattern);
  await ch.prefetch(10);
  let seen = 0;
  const timer = setTimeout(() => { console.error(`timed out after ${seen} of ${count}`); process.exit(2); }, 60000);
  console.log('ready');
  await ch.consume(queue, (msg) => {
    const event = JSON.parse(msg.content.toString('utf8'));
    console.log(JSON.stringify({
      event,
      messageId: msg.properties.messageId,
      correlationHeader: (msg.properties.headers || {}).correlationId,
      routingKey: msg.fields.routingKey,
    }));
    ch.ack(msg);
    seen += 1;
    if (seen >= count) {
      clearTimeout(timer);
      setTimeout(async () => {
        const q = await ch.checkQueue(queue);
        console.log(JSON.stringify({ remaining: q.messageCount }));
        await conn.close();
      }, 200);
    }
  });
}

const [cmd, ...args] = process.argv.slice(2);
const run = cmd === 'publish'
  ? publish(args[0], args[1], Number(args[2]))
  : consume(args[0], args[1], args[2], args[3], Number(args[4]));
run.catch((e) => { console.error(e); process.exit(1); });
