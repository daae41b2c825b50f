// The official phoenix npm client refreshing its token on a live socket, driven by tests/test_token_refresh.py.
//
//   node refresh.mjs <16|17|18> <socket url> --secret S --sub ID --ttl SECONDS --every-ms N --topic NAME [--longpoll]
//
// Mints its own HS256 tokens with the secret (as a backend would hand them out), each living at least
// --ttl seconds; connects with one, joins the topic with a Presence, and every --every-ms pushes a fresh
// token as `access_token` on the channel (the params closure hands the newest to any reconnect).
// --longpoll: transport LongPoll instead of the WebSocket (the `ws` package).
//
// Prints one JSON object per line on stdout:
//   {"event":"open"}  {"event":"close","code":...,"reason":...}  {"event":"error","message":...}
//   {"event":"join","topic":...,"status":"ok"|"error"|"timeout","response":...}
//   {"event":"channel_error"|"channel_close","topic":...}
//   {"event":"refresh","status":"ok"|"error"|"timeout","response":...}
//   {"event":"message","payload":...}
//   {"event":"presence_join"|"presence_leave","key":...}   presence.onJoin / onLeave
// It exits when its stdin is closed.

import { createHmac } from "node:crypto";
import { parseArgs } from "node:util";
import WebSocket from "ws";
import { exitWithStdin, reportJoin } from "./report.mjs";
import FetchXMLHttpRequest from "./xhr.mjs";

const { positionals, values: opts } = parseArgs({
  allowPositionals: true,
  options: {
    secret: { type: "string" },
    sub: { type: "string" },
    ttl: { type: "string" },
    "every-ms": { type: "string" },
    topic: { type: "string" },
    longpoll: { type: "boolean", default: false },
  },
});
const [version, url] = positionals;
if (!["16", "17", "18"].includes(version) || !url || !opts.secret || !opts.sub || !opts.topic) {
  console.error("usage: node refresh.mjs <16|17|18> <socket url> --secret S --sub ID --ttl S --every-ms N --topic T");
  process.exit(2);
}
if (version !== "18") {  // phoenix < 1.8 long-polls with XMLHttpRequest, which Node lacks
  globalThis.XMLHttpRequest = FetchXMLHttpRequest;
  globalThis.self = globalThis;
}
const { Socket, Presence, LongPoll } = await import(`phoenix${version}`);
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

const b64 = (data) => Buffer.from(data).toString("base64url");
function mint() {
  const now = Date.now() / 1000;
  // Rounded up: the token lives at least --ttl seconds, whatever the fraction of the second it is made in.
  const claims = { sub: opts.sub, iat: Math.floor(now), exp: Math.ceil(now + Number(opts.ttl)) };
  const body = `${b64(JSON.stringify({ alg: "HS256", typ: "JWT" }))}.${b64(JSON.stringify(claims))}`;
  return `${body}.${createHmac("sha256", opts.secret).update(body).digest("base64url")}`;
}

let token = mint();
const socket = new Socket(url, { transport: opts.longpoll ? LongPoll : WebSocket, params: () => ({ token }) });
socket.onOpen(() => emit({ event: "open" }));
socket.onError((error) => emit({ event: "error", message: (error && error.message) || String(error) }));
socket.onClose((event) => emit({ event: "close", code: event.code, reason: event.reason }));

const channel = socket.channel(opts.topic, {});
channel.on("new_msg", (payload) => emit({ event: "message", payload }));
const presence = new Presence(channel);
presence.onJoin((key, current) => { if (!current) emit({ event: "presence_join", key }); });
presence.onLeave((key, current) => { if (current.metas.length === 0) emit({ event: "presence_leave", key }); });
reportJoin(channel, opts.topic, emit);
socket.connect();

setInterval(() => {
  token = mint();
  channel.push("access_token", { access_token: token })
    .receive("ok", (response) => emit({ event: "refresh", status: "ok", response }))
    .receive("error", (response) => emit({ event: "refresh", status: "error", response }))
    .receive("timeout", () => emit({ event: "refresh", status: "timeout" }));
}, Number(opts["every-ms"]));

exitWithStdin();  // never outlive the test that started us
