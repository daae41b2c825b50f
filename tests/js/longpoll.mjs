// The official phoenix npm client over long-poll, driven by tests/test_longpoll.py.
//
//   node longpoll.mjs <16|17|18> <socket url, e.g. http://127.0.0.1:4000/socket> [options]
//
// Options:
//   --mode longpoll    transport: LongPoll from the start (the default)
//   --mode fallback    transport: WebSocket (the `ws` package) with longPollFallbackMs (phoenix >= 1.7):
//                      phoenix.js itself gives up on the WebSocket and switches to LongPoll
//   --fallback-ms N    longPollFallbackMs (default 500)
//   --token T          params: {token: T}
//   --auth-token T     the phoenix >= 1.8 `authToken` option (over long-poll: X-Phoenix-AuthToken)
//   --topic NAME       join this topic (repeatable)
//   --retry-ms N       reconnectAfterMs and rejoinAfterMs always return N
//   --timeout-ms N     longpollerTimeout (default phoenix's 20000)
//
// Prints one JSON object per line on stdout:
//   {"event":"open","transport":"LongPoll"|"WebSocket"}   {"event":"close","code":...,"reason":...}
//   {"event":"error","message":...}   {"event":"log","kind":...,"msg":...}  (phoenix's logger)
//   {"event":"join","topic":...,"status":"ok"|"error"|"timeout","response":...}
//   {"event":"message","topic":...,"name":...,"payload":...}
//   {"event":"channel_error"|"channel_close","topic":...}
//   {"event":"console","msg":...}  (phoenix's console.log, e.g. "failed to parse JSON response")
// It runs until it is killed, or until its stdin is closed.

import { parseArgs } from "node:util";
import WebSocket from "ws";
import { exitWithStdin, reportJoin } from "./report.mjs";
import FetchXMLHttpRequest from "./xhr.mjs";

const { positionals, values: opts } = parseArgs({
  allowPositionals: true,
  options: {
    mode: { type: "string", default: "longpoll" },
    "fallback-ms": { type: "string", default: "500" },
    token: { type: "string" },
    "auth-token": { type: "string" },
    topic: { type: "string", multiple: true, default: [] },
    "retry-ms": { type: "string" },
    "timeout-ms": { type: "string" },
  },
});
const [version, url] = positionals;
if (!["16", "17", "18"].includes(version) || !url || !["longpoll", "fallback"].includes(opts.mode)) {
  console.error("usage: node longpoll.mjs <16|17|18> <socket url> [--mode longpoll|fallback] [options]");
  process.exit(2);
}
// phoenix 1.6 and 1.7 poll with XMLHttpRequest, which Node lacks (1.8 falls back to fetch by itself),
// and find it on `self` or `window` only: give them a `self`, as a worker has.
if (version !== "18") {
  globalThis.XMLHttpRequest = FetchXMLHttpRequest;
  globalThis.self = globalThis;
}
const { Socket, LongPoll } = await import(`phoenix${version}`);

const emit = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
// phoenix.js reports a poll answer it cannot parse with console.log: keep stdout one JSON object a line.
console.log = (...args) => emit({ event: "console", msg: args.map(String).join(" ").slice(0, 300) });

const options = {
  transport: opts.mode === "longpoll" ? LongPoll : WebSocket,
  logger: (kind, msg, data) => {
    if (kind === "transport") emit({ event: "log", kind, msg: String(msg) });
  },
};
if (opts.mode === "fallback") options.longPollFallbackMs = Number(opts["fallback-ms"]);
if (opts.token !== undefined) options.params = { token: opts.token };
if (opts["auth-token"] !== undefined) options.authToken = opts["auth-token"];
if (opts["timeout-ms"]) options.longpollerTimeout = Number(opts["timeout-ms"]);
if (opts["retry-ms"]) {
  const retry = Number(opts["retry-ms"]);
  options.reconnectAfterMs = () => retry;
  options.rejoinAfterMs = () => retry;
}

const socket = new Socket(url, options);
socket.onOpen(() => emit({ event: "open", transport: socket.transport === LongPoll ? "LongPoll" : "WebSocket" }));
socket.onError((error) => emit({ event: "error", message: (error && error.message) || String(error) }));
socket.onClose((event) => emit({ event: "close", code: event && event.code, reason: event && event.reason }));

for (const topic of opts.topic) {
  const channel = socket.channel(topic, {});
  channel.onMessage = (name, payload, ref) => {
    if (!name.startsWith("phx_") && !name.startsWith("presence_")) emit({ event: "message", topic, name, payload });
    return payload;
  };
  reportJoin(channel, topic, emit);
}
socket.connect();

exitWithStdin();  // never outlive the test that started us
