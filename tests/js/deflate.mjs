// The `ws` library with its default permessage-deflate offer (or none), driven by tests/test_deflate.py.
//
//   node deflate.mjs <websocket url with vsn and token> <topic> [--plain]
//
// Joins <topic> with a ~2 KB join payload (which `ws` compresses: it is over ws's 1 KB threshold) and
// prints one JSON object per line:
//   {"event":"open","extensions":"<the Sec-WebSocket-Extensions answer, '' if none>"}
//   {"event":"frame","data":<each text frame, parsed>}     {"event":"close","code":...}
// It runs until it is killed, or until its stdin is closed.

import WebSocket from "ws";
import { exitWithStdin } from "./report.mjs";

const [url, topic, flag] = process.argv.slice(2);
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const ws = new WebSocket(url, { perMessageDeflate: flag !== "--plain" });
ws.on("upgrade", (response) => emit({ event: "open", extensions: response.headers["sec-websocket-extensions"] || "" }));
ws.on("open", () => ws.send(JSON.stringify(["1", "1", topic, "phx_join", { pad: "p".repeat(2000) }])));
ws.on("message", (data) => emit({ event: "frame", data: JSON.parse(data.toString()) }));
ws.on("close", (code) => emit({ event: "close", code }));
ws.on("error", (error) => emit({ event: "error", message: error.message }));
exitWithStdin();
