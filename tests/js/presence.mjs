// The official phoenix npm client's Presence helper, driven by tests/test_presence_js.py.
//
//   node presence.mjs <16|17|18> <socket url, e.g. ws://127.0.0.1:4000/socket> --topic NAME [options]
//
// Options:
//   --token T          connect with params: {token: T}
//   --auth-token T     the phoenix >= 1.8 `authToken` option instead (over long-poll: X-Phoenix-AuthToken)
//   --topic NAME       the one topic to join, with `new Presence(channel)` wired to it
//   --heartbeat-ms N   heartbeatIntervalMs
//   --retry-ms N       reconnectAfterMs and rejoinAfterMs always return N
//   --log-frames       also print every message the server sends on the topic (before its effects)
//   --longpoll         transport LongPoll instead of the WebSocket (the `ws` package)
//
// Prints one JSON object per line on stdout:
//   {"event":"open"}  {"event":"close","code":...,"reason":...}  {"event":"error","message":...}
//   {"event":"joined","status":"ok"|"error"|"timeout","response":...}   (again on every rejoin)
//   {"event":"sync","list":[{"id":key,"metas":[...]}, ...]}            presence.onSync, with presence.list()
//   {"event":"join","key":...,"current":[metas]|null,"joined":[metas]} presence.onJoin
//   {"event":"leave","key":...,"current":[metas],"left":[metas]}       presence.onLeave (current: what remains)
//   {"event":"message","name":"new_msg","payload":...}
//   {"event":"channel_error"}  {"event":"channel_close"}
//   {"event":"frame","name":...,"join_ref":...,"ref":...,"payload":...}  with --log-frames
//   {"event":"reply","cmd":...,"status":"ok"|"error"|"timeout","response":...}  for a command's push
//   {"event":"list","list":[...]}  {"event":"disconnected"}
//
// Commands on stdin, one JSON object per line:
//   {"cmd":"typing","typing":true,"username":"ada"}  push user:typing {typing, username} (username optional)
//   {"cmd":"push","event":"...","payload":{...}}      push any event
//   {"cmd":"leave"}                                  channel.leave()
//   {"cmd":"disconnect"}                             socket.disconnect() (a clean close: no reconnect)
//   {"cmd":"list"}                                   print presence.list() now
// It exits when its stdin is closed.

import { parseArgs } from "node:util";
import { createInterface } from "node:readline";
import WebSocket from "ws";
import FetchXMLHttpRequest from "./xhr.mjs";

const { positionals, values: opts } = parseArgs({
  allowPositionals: true,
  options: {
    token: { type: "string" },
    "auth-token": { type: "string" },
    topic: { type: "string" },
    "heartbeat-ms": { type: "string" },
    "retry-ms": { type: "string" },
    "log-frames": { type: "boolean", default: false },
    longpoll: { type: "boolean", default: false },
  },
});
const [version, url] = positionals;
if (!["16", "17", "18"].includes(version) || !url || !opts.topic) {
  console.error("usage: node presence.mjs <16|17|18> <socket url> --topic NAME [options]");
  process.exit(2);
}
if (opts.longpoll && version !== "18") {  // phoenix < 1.8 long-polls with XMLHttpRequest, which Node lacks
  globalThis.XMLHttpRequest = FetchXMLHttpRequest;
  globalThis.self = globalThis;
}
const { Socket, Presence, Serializer, LongPoll } = await import(`phoenix${version}`);

const emit = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const metasOf = (presence) => (presence ? presence.metas : null);

const options = { transport: opts.longpoll ? LongPoll : WebSocket };
if (opts.token !== undefined) options.params = { token: opts.token };
if (opts["auth-token"] !== undefined) options.authToken = opts["auth-token"];
if (opts["heartbeat-ms"]) options.heartbeatIntervalMs = Number(opts["heartbeat-ms"]);
if (opts["retry-ms"]) {
  const retry = Number(opts["retry-ms"]);
  options.reconnectAfterMs = () => retry;
  options.rejoinAfterMs = () => retry;
}

const topic = opts.topic;
if (opts["log-frames"]) {
  // Wrapping decode (socket.onMessage would run after the channel's handlers) prints each frame
  // before the sync/join/leave lines it causes.
  options.decode = (raw, callback) => Serializer.decode(raw, (msg) => {
    if (msg.topic === topic) {
      emit({ event: "frame", name: msg.event, join_ref: msg.join_ref, ref: msg.ref, payload: msg.payload });
    }
    callback(msg);
  });
}
const socket = new Socket(url, options);
socket.onOpen(() => emit({ event: "open" }));
socket.onError((error) => emit({ event: "error", message: (error && error.message) || String(error) }));
socket.onClose((event) => emit({ event: "close", code: event.code, reason: event.reason }));

const channel = socket.channel(topic, {});
const presence = new Presence(channel);
const list = () => presence.list((id, { metas }) => ({ id, metas }));
presence.onSync(() => emit({ event: "sync", list: list() }));
presence.onJoin((key, current, joined) =>
  emit({ event: "join", key, current: metasOf(current), joined: metasOf(joined) }));
presence.onLeave((key, current, left) =>
  emit({ event: "leave", key, current: metasOf(current), left: metasOf(left) }));
channel.on("new_msg", (payload) => emit({ event: "message", name: "new_msg", payload }));
channel.onError(() => emit({ event: "channel_error" }));
channel.onClose(() => emit({ event: "channel_close" }));
channel.join()
  .receive("ok", (response) => emit({ event: "joined", status: "ok", response }))
  .receive("error", (response) => emit({ event: "joined", status: "error", response }))
  .receive("timeout", () => emit({ event: "joined", status: "timeout" }));
socket.connect();

function push(cmd, event, payload) {
  channel.push(event, payload)
    .receive("ok", (response) => emit({ event: "reply", cmd, status: "ok", response }))
    .receive("error", (response) => emit({ event: "reply", cmd, status: "error", response }))
    .receive("timeout", () => emit({ event: "reply", cmd, status: "timeout" }));
}

function run(command) {
  switch (command.cmd) {
    case "typing": {
      const payload = { typing: command.typing };
      if (command.username !== undefined) payload.username = command.username;
      push("typing", "user:typing", payload);
      break;
    }
    case "push":
      push("push", command.event, command.payload === undefined ? {} : command.payload);
      break;
    case "leave":
      channel.leave()
        .receive("ok", (response) => emit({ event: "reply", cmd: "leave", status: "ok", response }))
        .receive("timeout", () => emit({ event: "reply", cmd: "leave", status: "timeout" }));
      break;
    case "disconnect":
      socket.disconnect(() => emit({ event: "disconnected" }));
      break;
    case "list":
      emit({ event: "list", list: list() });
      break;
    default:
      emit({ event: "bad_command", command });
  }
}

// Never outlive the test that started us.
const lines = createInterface({ input: process.stdin });
lines.on("line", (line) => {
  if (!line.trim()) return;
  let command;
  try {
    command = JSON.parse(line);
  } catch (error) {
    emit({ event: "bad_command", line });
    return;
  }
  run(command);
});
lines.on("close", () => process.exit(0));
