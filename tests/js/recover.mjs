// The documented recovery pattern with the official phoenix client, driven by tests/test_history.py.
//
//   node recover.mjs <16|17|18> --url ws://127.0.0.1:4000/socket [--url ...] --token T --topic NAME [options]
//
// One Socket, one channel joined with params `() => (lastPos ? {since: lastPos} : {})`:
//   channel.on("new_msg", (payload, ref) => lastPos = ref)
//   channel.join().receive("ok", ({position, recovered}) => { if (!lastPos || recovered === false) lastPos = position })
// phoenix.js evaluates a params function on every (re)join, so each rejoin asks for what came after lastPos.
// With several --url, each new connection goes to the next one (as through a load balancer).
//
// Options: --retry-ms N (reconnectAfterMs / rejoinAfterMs), --vsn 1.0.0|2.0.0
// Commands, one per line on stdin:
//   cut         drop the connection as a network failure would (ws terminate): phoenix.js reconnects
//   close       close the connection from the client side (ws close): phoenix.js reconnects
//   disconnect  socket.disconnect(): no reconnect until `connect` (done once the connection is let go)
//   connect     socket.connect()
// Prints one JSON object per line:
//   {"event":"open","url":...}  {"event":"close","code":...}  {"event":"error","message":...}
//   {"event":"join","status":"ok"|"error"|"timeout","response":...,"since":<the since sent>}
//   {"event":"message","payload":...,"ref":...}   {"event":"done","command":...}
// It exits when its stdin closes.

import { parseArgs } from "node:util";
import { createInterface } from "node:readline";
import WebSocket from "ws";

const { positionals, values: opts } = parseArgs({
  allowPositionals: true,
  options: {
    url: { type: "string", multiple: true, default: [] },
    token: { type: "string" },
    topic: { type: "string" },
    "retry-ms": { type: "string", default: "100" },
    vsn: { type: "string" },
  },
});
const [version] = positionals;
if (!["16", "17", "18"].includes(version) || !opts.url.length || !opts.topic) {
  console.error("usage: node recover.mjs <16|17|18> --url URL [--url URL...] --token T --topic NAME");
  process.exit(2);
}
const { Socket } = await import(`phoenix${version}`);
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

// The endpoint's host and port are replaced on every new connection, in turn.
let next = 0;
const urls = opts.url.map((url) => new URL(url));
class Balanced extends WebSocket {
  constructor(url, protocols) {
    const target = new URL(url);
    const pick = urls[next++ % urls.length];
    target.host = pick.host;
    super(target.toString(), protocols);
  }
}

const retry = Number(opts["retry-ms"]);
const options = {
  transport: Balanced,
  params: { token: opts.token },
  reconnectAfterMs: () => retry,
  rejoinAfterMs: () => retry,
};
if (opts.vsn) options.vsn = opts.vsn;
const socket = new Socket(opts.url[0], options);
socket.onOpen(() => emit({ event: "open", url: socket.conn && socket.conn.url }));
socket.onError((error) => emit({ event: "error", message: (error && error.message) || String(error) }));
socket.onClose((event) => emit({ event: "close", code: event.code }));

let lastPos = null;
let sentSince = null;
const channel = socket.channel(opts.topic, () => {
  sentSince = lastPos;
  return lastPos ? { since: lastPos } : {};
});
channel.on("new_msg", (payload, ref) => {
  lastPos = ref;
  emit({ event: "message", payload, ref });
});
channel.join()
  .receive("ok", (response) => {
    if (!lastPos || response.recovered === false) lastPos = response.position;
    emit({ event: "join", status: "ok", response, since: sentSince });
  })
  .receive("error", (response) => emit({ event: "join", status: "error", response, since: sentSince }))
  .receive("timeout", () => emit({ event: "join", status: "timeout", since: sentSince }));
socket.connect();

// Each command calls done() once it has taken effect.
const commands = {
  cut: (done) => { socket.conn && socket.conn.terminate(); done(); },
  close: (done) => { socket.conn && socket.conn.close(); done(); },
  // Done once the socket let go of its connection (phoenix 1.6 ignores connect() until then).
  disconnect: (done) => socket.disconnect(done),
  connect: (done) => { socket.connect(); done(); },
};
createInterface({ input: process.stdin }).on("line", (line) => {
  const command = line.trim();
  if (!commands[command]) {
    console.error(`unknown command ${command}`);
    process.exit(2);
  }
  commands[command](() => emit({ event: "done", command }));
});
process.stdin.on("end", () => process.exit(0));
