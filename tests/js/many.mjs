// Many official phoenix clients in one Node process, driven by tests/test_drain.py.
//
//   node many.mjs <socket url, e.g. ws://127.0.0.1:4000/socket> --count N --token T [options]
//
// Each client is its own phoenix Socket (transport: ws WebSocket) joining one channel, so each has
// its own connection, heartbeat and reconnect timer, exactly as N browsers would.
//
// Options:
//   --count N        clients (default 1)
//   --token T        connect with params: {token: T}
//   --topic NAME     the topic each client joins (default room:lobby:drain); "{i}" is replaced by the index
//   --version V      16, 17 or 18 (default 18: phoenix 1.8)
//   --retry-ms N     reconnectAfterMs and rejoinAfterMs always return N (default 100), so a closed
//                    client really tries to come back (and is seen being refused)
//
// Prints one JSON object per line on stdout:
//   {"event":"ready","clients":N,"ms":...}            once every client's first join was answered ok
//   {"event":"join_failed","i":..,"status":"error"|"timeout","response":..}
//   {"event":"rejoined","i":..}                         a join ok after the first one (after a reconnect)
//   {"event":"msg","i":..,"n":..}                       a new_msg on client i; n is payload.n
//   {"event":"close","i":..,"t":<ms epoch>,"code":..,"reason":..,"wasClean":..,"connected":<was open>}
//   {"event":"channel_close","i":..}                    channel.onClose: a phx_close or a leave (never expected)
//   {"event":"phx_close_frame","i":..,"raw":..}         a raw phx_close frame from the server
//   {"event":"summary",...}                             counts, once stdin closes; then it exits
// Connection errors (refused reconnects) are only counted, by message, in the summary.

import { parseArgs } from "node:util";
import WebSocket from "ws";

const { positionals, values: opts } = parseArgs({
  allowPositionals: true,
  options: {
    count: { type: "string", default: "1" },
    token: { type: "string" },
    topic: { type: "string", default: "room:lobby:drain" },
    version: { type: "string", default: "18" },
    "retry-ms": { type: "string", default: "100" },
  },
});
const [url] = positionals;
const count = Number(opts.count);
if (!url || !(count > 0) || !["16", "17", "18"].includes(opts.version)) {
  console.error("usage: node many.mjs <socket url> --count N --token T [--topic NAME] [--version 18] [--retry-ms N]");
  process.exit(2);
}
const { Socket, Serializer } = await import(`phoenix${opts.version}`);

// Output is batched: one write per event-loop turn, not one per line (500 clients x many messages).
let pending = [];
let scheduled = false;
const flush = () => {
  scheduled = false;
  if (pending.length) {
    const text = pending.join("\n") + "\n";
    pending = [];
    process.stdout.write(text);
  }
};
const emit = (obj) => {
  pending.push(JSON.stringify(obj));
  if (!scheduled) {
    scheduled = true;
    setImmediate(flush);
  }
};

const retry = Number(opts["retry-ms"]);
const started = Date.now();
const decode = Serializer.decode.bind(Serializer);
const stats = { messages: 0, closes: {}, closesWhileConnected: {}, errors: {}, channelCloses: 0, phxCloseFrames: 0,
                joinFailures: 0, rejoins: 0 };
let joined = 0;
const sockets = [];

for (let i = 0; i < count; i++) {
  let open = false;
  const socket = new Socket(url, {
    transport: WebSocket,
    params: opts.token === undefined ? {} : { token: opts.token },
    reconnectAfterMs: () => retry,
    rejoinAfterMs: () => retry,
    decode: (raw, callback) => {
      if (typeof raw === "string" && raw.includes('"phx_close"')) {
        stats.phxCloseFrames++;
        emit({ event: "phx_close_frame", i, raw });
      }
      return decode(raw, callback);
    },
  });
  socket.onOpen(() => { open = true; });
  socket.onError((error) => {
    const message = (error && error.message) || String(error);
    stats.errors[message] = (stats.errors[message] || 0) + 1;
  });
  socket.onClose((event) => {
    stats.closes[event.code] = (stats.closes[event.code] || 0) + 1;
    if (open) stats.closesWhileConnected[event.code] = (stats.closesWhileConnected[event.code] || 0) + 1;
    emit({ event: "close", i, t: Date.now(), code: event.code, reason: event.reason, wasClean: event.wasClean,
           connected: open });
    open = false;
  });
  const topic = opts.topic.replaceAll("{i}", String(i));
  const channel = socket.channel(topic, {});
  channel.on("new_msg", (payload) => {
    stats.messages++;
    emit({ event: "msg", i, n: payload.n });
  });
  channel.onClose(() => {
    stats.channelCloses++;
    emit({ event: "channel_close", i });
  });
  let first = true;
  channel.join()
    .receive("ok", () => {
      if (!first) {
        stats.rejoins++;
        emit({ event: "rejoined", i });
        return;
      }
      first = false;
      if (++joined === count) emit({ event: "ready", clients: count, ms: Date.now() - started });
    })
    .receive("error", (response) => {
      stats.joinFailures++;
      emit({ event: "join_failed", i, status: "error", response });
    })
    .receive("timeout", () => { stats.joinFailures++; emit({ event: "join_failed", i, status: "timeout" }); });
  socket.connect();
  sockets.push(socket);
}

// Never outlive the test that started us: on stdin's end, report and exit once the report is written.
process.stdin.on("end", () => {
  flush();
  const summary = { event: "summary", clients: count, joined, ...stats };
  process.stdout.write(JSON.stringify(summary) + "\n", () => process.exit(0));
});
process.stdin.resume();
