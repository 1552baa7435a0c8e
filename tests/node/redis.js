// Plain Node.js services on Redis (ioredis), the way the common articles
// write them. Used by the Rust interop tests; no Tidings code here.
//
// Streams: entries `XADD <stream> * type <type> data <JSON> timestamp <ISO> correlationId <id>`.
//   node redis.js streams-publish <url> <stream> <count>
//   node redis.js streams-consume <url> <stream> <group> <count>
// Pub/Sub: JSON bodies `{ id, type, timestamp, correlationId, data }`.
//   node redis.js pubsub-publish <url> <channel> <count>
//   node redis.js pubsub-subscribe <url> <channel> <count>
// Consumers print "ready", then one JSON line per message, then a summary
// line, and exit after <count> messages (or fail after 60 s).
const Redis = require('ioredis');
const crypto = require('crypto');

function event(i) {
  const type = i % 2 ? 'user.registered' : 'user.deleted';
  return {
    id: crypto.randomUUID(),
    type,
    timestamp: new Date().toISOString(),
    correlationId: `corr-${i}`,
    data: { userId: `u-${i}`, name: `Zoë Ñandú ${i} ✓` },
  };
}

function deadline(what) {
  return setTimeout(() => { console.error(`${what}: timed out`); process.exit(2); }, 60000);
}

async function streamsPublish(url, stream, count) {
  const redis = new Redis(url);
  for (let i = 0; i < count; i++) {
    const e = event(i);
    const entryId = await redis.xadd(stream, '*', 'type', e.type, 'data', JSON.stringify(e.data),
      'timestamp', e.timestamp, 'correlationId', e.correlationId);
    console.log(JSON.stringify({ ...e, id: entryId }));
  }
  redis.disconnect();
}

async function streamsConsume(url, stream, group, count) {
  const redis = new Redis(url);
  try {
    await redis.xgroup('CREATE', stream, group, '$', 'MKSTREAM');
  } catch (e) {
    if (!String(e).includes('BUSYGROUP')) throw e;
  }
  const timer = deadline('streams-consume');
  console.log('ready');
  let seen = 0;
  while (seen < count) {
    const reply = await redis.xreadgroup('GROUP', group, 'node-1', 'COUNT', 50, 'BLOCK', 1000, 'STREAMS', stream, '>');
    if (!reply) continue;
    for (const [, entries] of reply) {
      for (const [entryId, fields] of entries) {
        const f = {};
        for (let i = 0; i + 1 < fields.length; i += 2) f[fields[i]] = fields[i + 1];
        console.log(JSON.stringify({
          entryId, type: f.type, timestamp: f.timestamp, correlationId: f.correlationId,
          id: f.id, data: JSON.parse(f.data),
        }));
        await redis.xack(stream, group, entryId);
        seen += 1;
      }
    }
  }
  clearTimeout(timer);
  const [pending] = await redis.xpending(stream, group);
  console.log(JSON.stringify({ pending }));
  redis.disconnect();
}

async function pubsubPublish(url, channel, count) {
  const redis = new Redis(url);
  for (let i = 0; i < count; i++) {
    const e = event(i);
    await redis.publish(channel, JSON.stringify(e));
    console.log(JSON.stringify(e));
  }
  redis.disconnect();
}

async function pubsubSubscribe(url, channel, count) {
  const redis = new Redis(url);
  await redis.subscribe(channel);
  const timer = deadline('pubsub-subscribe');
  console.log('ready');
  let seen = 0;
  redis.on('message', (_, body) => {
    console.log(JSON.stringify(JSON.parse(body)));
    seen += 1;
    if (seen >= count) {
      clearTimeout(timer);
      console.log(JSON.stringify({ done: seen }));
      redis.disconnect();
    }
  });
}

const [cmd, url, name, a, b] = process.argv.slice(2);
const run = {
  'streams-publish': () => streamsPublish(url, name, Number(a)),
  'streams-consume': () => streamsConsume(url, name, a, Number(b)),
  'pubsub-publish': () => pubsubPublish(url, name, Number(a)),
  'pubsub-subscribe': () => pubsubSubscribe(url, name, Number(a)),
}[cmd];
run().catch((e) => { console.error(e); process.exit(1); });
