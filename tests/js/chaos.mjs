// Many phoenix.js clients in one process for tests/test_chaos.py, each its own Socket, each joined to one
// topic with the documented recovery pattern:
//
//   socket.channel(topic, () => (lastPos ? {since: lastPos} : {}))
//   channel.on("new_msg", (payload, ref) => lastPos = ref)
//   join ok: if (!lastPos || recovered === false) lastPos = position
//
//   node chaos.mjs '<config JSON>'
//   config: {version: "18", ports: [4001, 4002, 4003], host: "127.0.0.1", token, topics: [...], clients: 200,
//            retryMs: [min, max], seed}
//
// Client i joins topics[i % topics.length]. Every new connection goes to one of `ports` at random, as
// through a load balancer, so a client that reconnects may land on another node (or the same one).
//
// Commands, one JSON object per line on stdin:
//   {"cmd": "cut", "count": k}       drop k random connected clients' WebSockets (terminate or close, at
//                                    random); phoenix.js reconnects and rejoins with since
//   {"cmd": "await", "final": {topic: position}, "timeout": s}
//                                    wait until every client is joined and its lastPos is its topic's final
//   {"cmd": "dump"}                  print every client's log
// Prints one JSON object per line:
//   {"event": "ready", "ms": ...}                            every client's first join got its ok
//   {"event": "cut", "count": k}
//   {"event": "caught_up", "behind": [{client, topic, lastPos, state}...]}   (empty: all caught up)
//   {"event": "log", "client": i, "topic": ..., "log": [...]}  then {"event": "dumped"}
// A client's log, in the order it observed things:
//   ["j", position, recovered (true|false|null), since sent (or null)]   a join's ok reply
//   ["x", status, response, since sent]                                  a join refused or timed out
//   ["m", ref, n]                                                         a new_msg broadcast {n}
//   ["o", port]  ["c", close code]                                        a connection opened / closed
// It exits when its stdin closes.

import { createInterface } from "node:readline";
import WebSocket from "ws";

const config = JSON.parse(process.argv[2]);
const { Socket } = await import(`phoenix${config.version || "18"}`);
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

// A small seeded generator (mulberry32), so a run's choices can be replayed from its seed.
let seed = config.seed >>> 0;
const random = () => {
  seed = (seed + 0x6d2b79f5) >>> 0;
  let t = seed;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
};
const pick = (list) => list[Math.floor(random() * list.length)];

class Balanced extends WebSocket {
  constructor(url, protocols) {
    const target = new URL(url);
    target.host = `${config.host || "127.0.0.1"}:${pick(config.ports)}`;
    super(target.toString(), protocols);
  }
}

const [retryMin, retryMax] = config.retryMs || [50, 300];
const retry = () => retryMin + Math.floor(random() * (retryMax - retryMin));
const started = Date.now();
let pendingFirstJoins = config.clients;

const clients = [];
for (let i = 0; i < config.clients; i++) {
  const topic = config.topics[i % config.topics.length];
  const socket = new Socket(`ws://${config.host || "127.0.0.1"}:${config.ports[0]}/socket`, {
    transport: Balanced,
    params: { token: config.token },
    reconnectAfterMs: retry,
    rejoinAfterMs: retry,
    // A connection's heartbeat is not what is under test; keep phoenix.js from adding its own closes.
    heartbeatIntervalMs: 30000,
  });
  const client = { index: i, topic, socket, lastPos: null, log: [], joinedOnce: false, channel: null };
  socket.onOpen(() => client.log.push(["o", socket.conn && new URL(socket.conn.url).port]));
  socket.onClose((event) => client.log.push(["c", event && event.code]));
  let sentSince = null;
  const channel = socket.channel(topic, () => {
    sentSince = client.lastPos;
    return client.lastPos ? { since: client.lastPos } : {};
  });
  client.channel = channel;
  channel.on("new_msg", (payload, ref) => {
    client.lastPos = ref;
    client.log.push(["m", ref, payload.n]);
  });
  channel.join(20000)
    .receive("ok", (response) => {
      if (!client.lastPos || response.recovered === false) client.lastPos = response.position;
      client.log.push(["j", response.position, response.recovered ?? null, sentSince]);
      if (!client.joinedOnce) {
        client.joinedOnce = true;
        if (--pendingFirstJoins === 0) emit({ event: "ready", ms: Date.now() - started });
      }
    })
    .receive("error", (response) => client.log.push(["x", "error", response, sentSince]))
    .receive("timeout", () => client.log.push(["x", "timeout", null, sentSince]));
  socket.connect();
  clients.push(client);
}

function cut(count) {
  const connected = clients.filter((c) => c.socket.isConnected() && c.socket.conn);
  let done = 0;
  for (let k = 0; k < count && connected.length; k++) {
    const [client] = connected.splice(Math.floor(random() * connected.length), 1);
    // terminate: the TCP connection just drops (1006); close: a client close frame. Either way phoenix.js
    // sees a close it did not ask for, reconnects and rejoins.
    if (random() < 0.5) client.socket.conn.terminate();
    else client.socket.conn.close();
    done++;
  }
  emit({ event: "cut", count: done });
}

function behind(final) {
  return clients
    .filter((c) => c.lastPos !== final[c.topic] || c.channel.state !== "joined")
    .map((c) => ({ client: c.index, topic: c.topic, lastPos: c.lastPos, state: c.channel.state }));
}

function awaitFinal(final, timeout) {
  const deadline = Date.now() + timeout * 1000;
  const check = () => {
    const late = behind(final);
    if (!late.length || Date.now() >= deadline) emit({ event: "caught_up", behind: late });
    else setTimeout(check, 50);
  };
  check();
}

createInterface({ input: process.stdin }).on("line", (line) => {
  const command = JSON.parse(line);
  if (command.cmd === "cut") cut(command.count);
  else if (command.cmd === "await") awaitFinal(command.final, command.timeout);
  else if (command.cmd === "dump") {
    for (const c of clients) emit({ event: "log", client: c.index, topic: c.topic, log: c.log });
    emit({ event: "dumped" });
  } else {
    console.error(`unknown command ${line}`);
    process.exit(2);
  }
});
process.stdin.on("end", () => process.exit(0));
