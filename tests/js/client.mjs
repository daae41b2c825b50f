// The official phoenix npm client, driven by tests/test_phoenix_js.py.
//
//   node client.mjs <16|17|18> <socket url, e.g. ws://127.0.0.1:4000/socket> [options]
//
// Options:
//   --token T          connect with params: {token: T}
//   --auth-token T     connect with the phoenix >= 1.8 `authToken` option (Sec-WebSocket-Protocol)
//   --topic NAME       join this topic (repeatable)
//   --vsn 1.0.0        protocol version; 1.0.0 brings its own JSON-object encode/decode
//   --heartbeat-ms N   heartbeatIntervalMs
//   --retry-ms N       reconnectAfterMs and rejoinAfterMs always return N
//   --log-frames       also print every raw frame the server sends
//
// Prints one JSON object per line on stdout for everything it observes:
//   {"event":"open","url":...,"protocol":...}      {"event":"error","message":...}
//   {"event":"close","code":...,"reason":...}       {"event":"heartbeat_reply"}
//   {"event":"join","topic":...,"status":"ok"|"error"|"timeout","response":...}
//   {"event":"message","topic":...,"name":"new_msg","payload":...}
//   {"event":"channel_error"|"channel_close","topic":...}   {"event":"frame","raw":"<text frame>"}
// It runs until it is killed, or until its stdin is closed.

import { parseArgs } from "node:util";
import WebSocket from "ws";
import { exitWithStdin, reportJoin } from "./report.mjs";

const { positionals, values: opts } = parseArgs({
  allowPositionals: true,
  options: {
    token: { type: "string" },
    "auth-token": { type: "string" },
    topic: { type: "string", multiple: true, default: [] },
    vsn: { type: "string" },
    "heartbeat-ms": { type: "string" },
    "retry-ms": { type: "string" },
    "log-frames": { type: "boolean", default: false },
  },
});
const [version, url] = positionals;
if (!["16", "17", "18"].includes(version) || !url) {
  console.error("usage: node client.mjs <16|17|18> <socket url> [options]");
  process.exit(2);
}
const { Socket, Serializer } = await import(`phoenix${version}`);

const emit = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

// vsn 1.0.0 frames are JSON objects {topic, event, payload, ref, join_ref}; the server's carry no join_ref.
const v1 = {
  encode: (msg, callback) => callback(JSON.stringify({
    topic: msg.topic, event: msg.event, payload: msg.payload, ref: msg.ref, join_ref: msg.join_ref,
  })),
  decode: (raw, callback) => callback(JSON.parse(raw)),
};

const options = { transport: WebSocket };
if (opts.token !== undefined) options.params = { token: opts.token };
if (opts["auth-token"] !== undefined) options.authToken = opts["auth-token"];
if (opts["heartbeat-ms"]) options.heartbeatIntervalMs = Number(opts["heartbeat-ms"]);
if (opts["retry-ms"]) {
  const retry = Number(opts["retry-ms"]);
  options.reconnectAfterMs = () => retry;
  options.rejoinAfterMs = () => retry;
}
if (opts.vsn) options.vsn = opts.vsn;
if (opts.vsn === "1.0.0") Object.assign(options, v1);
if (opts["log-frames"]) {
  const decode = options.decode || Serializer.decode.bind(Serializer);
  options.decode = (raw, callback) => {
    if (typeof raw === "string") emit({ event: "frame", raw });
    return decode(raw, callback);
  };
}

const socket = new Socket(url, options);
socket.onOpen(() => {
  const conn = socket.conn; // the ws WebSocket of this connection
  emit({ event: "open", url: conn && conn.url, protocol: conn && conn.protocol });
});
socket.onError((error) => emit({ event: "error", message: (error && error.message) || String(error) }));
socket.onClose((event) => emit({ event: "close", code: event.code, reason: event.reason, wasClean: event.wasClean }));
socket.onMessage((msg) => {
  if (msg.topic === "phoenix" && msg.event === "phx_reply") emit({ event: "heartbeat_reply" });
});

for (const topic of opts.topic) {
  const channel = socket.channel(topic, {});
  channel.on("new_msg", (payload) => emit({ event: "message", topic, name: "new_msg", payload }));
  reportJoin(channel, topic, emit);
}
socket.connect();

exitWithStdin();  // never outlive the test that started us
