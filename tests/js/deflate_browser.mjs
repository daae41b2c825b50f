// phoenix.js (1.8) in headless Chromium, for tests/test_deflate.py: the browser's own WebSocket offers
// permessage-deflate. Serves a page and phoenix.mjs from a throwaway local HTTP server, and prints one
// JSON line per step:
//   {"step":"joined","extensions":"<the 101's Sec-WebSocket-Extensions>"} once the channel joined,
//   {"step":"message","payload":...} for the first new_msg (the test publishes it after "joined"),
//   {"step":"failed","error":...} on any failure (exit code 1).
//   node deflate_browser.mjs --socket ws://HOST:PORT/socket --token T --topic NAME [--chromium PATH]
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";
import { CHROMIUM_ARGS } from "./browser.mjs";

const { values: opts } = parseArgs({
  options: {
    socket: { type: "string" }, token: { type: "string" }, topic: { type: "string" },
    chromium: { type: "string", default: "/usr/bin/chromium" },
  },
});
const TIMEOUT = 20000;
const step = (name, data = {}) => console.log(JSON.stringify({ step: name, ...data }));
const phoenix = readFileSync(new URL("./node_modules/phoenix18/priv/static/phoenix.mjs", import.meta.url));
const page = `<!doctype html><script type="module">
import { Socket } from "/phoenix.mjs";
window.received = [];
const socket = new Socket(${JSON.stringify(opts.socket)}, { params: { token: ${JSON.stringify(opts.token)} } });
socket.connect();
const channel = socket.channel(${JSON.stringify(opts.topic)}, {});
channel.on("new_msg", (payload) => window.received.push(payload));
channel.join().receive("ok", () => { window.joined = true; });
</script>`;
const pages = createServer((request, response) => {
  const module = request.url === "/phoenix.mjs";
  response.writeHead(200, { "Content-Type": module ? "text/javascript" : "text/html" });
  response.end(module ? phoenix : page);
});
await new Promise((resolve) => pages.listen(0, "127.0.0.1", resolve));

const userDataDir = mkdtempSync(join(tmpdir(), "push-deflate-chromium-"));
let context;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: opts.chromium, headless: true, args: CHROMIUM_ARGS,
  });
  const tab = context.pages()[0] || await context.newPage();
  const cdp = await context.newCDPSession(tab);
  await cdp.send("Network.enable");
  let extensions = null;
  cdp.on("Network.webSocketHandshakeResponseReceived", ({ response }) => {
    const headers = Object.fromEntries(Object.entries(response.headers).map(([k, v]) => [k.toLowerCase(), v]));
    extensions = headers["sec-websocket-extensions"] ?? "";
  });
  await tab.goto(`http://127.0.0.1:${pages.address().port}/`);
  await tab.waitForFunction(() => window.joined === true, null, { timeout: TIMEOUT });
  step("joined", { extensions });
  await tab.waitForFunction(() => window.received.length > 0, null, { timeout: TIMEOUT });
  step("message", { payload: await tab.evaluate(() => window.received[0]) });
} catch (error) {
  step("failed", { error: String(error) });
  process.exitCode = 1;
} finally {
  await context?.close();
  pages.close();
  rmSync(userDataDir, { recursive: true, force: true });
}
