// The live console in a real headless Chromium (playwright-core), driven by tests/test_console_browser.py.
//
//   node console.mjs --base http://127.0.0.1:4000 --key KEY --token JWT --screenshot out.png
//                    [--fallback-page URL] [--chromium /usr/bin/chromium]
//
// Steps, each printed as one JSON line {"step": name, ...} once it passed:
//   login        a wrong key is refused, the right one opens the dashboard and stays in sessionStorage
//   connections  a phoenix.js client (Node, WebSocket) connects: the page's connection count goes up by one
//   topics       the topics table shows its topics, with subscribers and presence
//   watch        the page watches room:lobby:42
//   publish      the page publishes; the phoenix.js client receives it, the page's watch shows it
//   screenshot   the dashboard, saved to --screenshot
//   fallback     (with --fallback-page) phoenix.js 1.8 in the browser, its WebSocket refused, falls back
//                to LongPoll, joins and receives a publish; the console counts the long-poll connection
// On failure it prints {"error": ...} and exits 1.

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";
import WebSocket from "ws";
import { Socket } from "phoenix18";
import { CHROMIUM_ARGS } from "./browser.mjs";

const { values: opts } = parseArgs({
  options: {
    base: { type: "string" },
    key: { type: "string" },
    token: { type: "string" },
    screenshot: { type: "string" },
    "fallback-page": { type: "string" },
    chromium: { type: "string", default: "/usr/bin/chromium" },
  },
});
for (const name of ["base", "key", "token", "screenshot"]) {
  if (!opts[name]) {
    console.error(`missing --${name}`);
    process.exit(2);
  }
}

const TOPIC = "room:lobby:42";
const PRESENCE_TOPIC = "room:topic:7";
const TIMEOUT = 10_000;
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

function waitFor(check, what, timeout = TIMEOUT) {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const tick = () => {
      const value = check();
      if (value) return resolve(value);
      if (Date.now() - started > timeout) return reject(new Error(`timed out waiting for ${what}`));
      setTimeout(tick, 50);
    };
    tick();
  });
}

const text = (page, selector) => page.locator(selector).first().textContent({ timeout: TIMEOUT });
const waitText = (page, selector, test, what) => page.waitForFunction(
  ([selector, source]) => {
    const element = document.querySelector(selector);
    return element !== null && new RegExp(source).test(element.textContent);
  }, [selector, test.source], { timeout: TIMEOUT }).catch(() => { throw new Error(`timed out waiting for ${what}`); });

// A phoenix.js 1.8 client in Node, over WebSocket, recording what it receives.
function nodeClient() {
  const received = [];
  const joined = new Set();
  const socket = new Socket(`${opts.base.replace("http", "ws")}/socket`, {
    transport: WebSocket, params: { token: opts.token }, reconnectAfterMs: () => 200, rejoinAfterMs: () => 200,
  });
  for (const topic of [TOPIC, PRESENCE_TOPIC]) {
    const channel = socket.channel(topic, {});
    channel.on("new_msg", (payload) => received.push({ topic, payload }));
    channel.join().receive("ok", () => joined.add(topic));
  }
  socket.connect();
  return { socket, received, joined };
}

const userDataDir = mkdtempSync(join(tmpdir(), "push-console-chromium-"));
let context;
let client;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: opts.chromium,
    headless: true,
    args: CHROMIUM_ARGS,
    viewport: { width: 1280, height: 760 },
    deviceScaleFactor: 1,
  });
  const page = context.pages()[0] || await context.newPage();
  const pageErrors = [];
  page.on("pageerror", (error) => pageErrors.push(String(error)));

  // --- login
  await page.goto(`${opts.base}/console`);
  await page.fill("#key", "not-the-key");
  await page.click("#connect");
  await waitText(page, "#login-error", /Key refused/, "the wrong key to be refused");
  if (await page.isVisible("#dashboard")) throw new Error("the dashboard opened with a wrong key");
  await page.fill("#key", opts.key);
  await page.click("#connect");
  await page.waitForSelector("#dashboard", { state: "visible", timeout: TIMEOUT });
  await waitText(page, "#stat-connections", /^\d+$/, "the connection count");
  const before = Number(await text(page, "#stat-connections"));
  const stored = await page.evaluate(() => sessionStorage.getItem("push-console-key"));
  if (stored !== opts.key) throw new Error("the key is not in sessionStorage");
  emit({ step: "login", connections: before });

  // --- a client connects: the figure follows
  client = nodeClient();
  await waitFor(() => client.joined.size === 2, "the phoenix.js client to join");
  await waitText(page, "#stat-connections", new RegExp(`^${before + 1}$`), "the connection count to go up");
  emit({ step: "connections", before, after: before + 1 });

  // --- topics
  await waitText(page, `tr[data-topic="${TOPIC}"] td.subscribers`, /^1$/, `${TOPIC} in the topics table`);
  await waitText(page, `tr[data-topic="${PRESENCE_TOPIC}"] td.presence`, /^1 \/ 1$/, "presence counts");
  emit({ step: "topics" });

  // --- watch
  await page.click(`tr[data-topic="${TOPIC}"] button`);
  await waitText(page, "#frames li.note", new RegExp(`subscribed to ${TOPIC}`), "the watch to start");
  emit({ step: "watch" });

  // --- publish from the page
  await page.fill("#pub-topic", TOPIC);
  await page.fill("#pub-event", "new_msg");
  await page.fill("#pub-payload", '{"message": "hello from the console"}');
  await page.click("#pub-send");
  await waitText(page, "#pub-result", /Published; delivered to \d+/, "the publish result");
  const message = await waitFor(() => client.received.find((m) => m.topic === TOPIC), "the client to receive");
  if (message.payload.message !== "hello from the console") throw new Error(`unexpected payload ${JSON.stringify(message)}`);
  await waitText(page, "#frames li:not(.note) .frame", /hello from the console/, "the frame in the watch");
  await waitText(page, "#stat-messages", /^[1-9]\d* total$/, "the message count");
  emit({ step: "publish", received: message.payload, result: await text(page, "#pub-result") });

  // --- screenshot, once the rates show the publish
  await waitText(page, "#stat-messages-rate", /^(?!0\.0$)\d/, "a message rate").catch(() => {});
  await page.screenshot({ path: opts.screenshot });
  emit({ step: "screenshot", path: opts.screenshot });

  // --- phoenix.js long-poll fallback inside the browser
  if (opts["fallback-page"]) {
    const lp = await context.newPage();
    lp.on("pageerror", (error) => pageErrors.push(`fallback page: ${error}`));
    await lp.goto(opts["fallback-page"]);
    const events = () => lp.evaluate(() => window.__events || []);
    await lp.waitForFunction(() => (window.__events || []).some((e) => e.event === "join" && e.status === "ok"),
      null, { timeout: TIMEOUT });
    const seen = await events();
    const open = seen.find((e) => e.event === "open");
    if (!open || open.transport !== "LongPoll") throw new Error(`not on LongPoll: ${JSON.stringify(seen)}`);
    const fellBack = seen.some((e) => e.event === "log" && e.msg.includes("falling back to LongPoll"));
    if (!fellBack) throw new Error(`no fallback logged: ${JSON.stringify(seen)}`);
    const response = await fetch(`${opts.base}/api/broadcast`, {
      method: "POST",
      headers: { Authorization: `Bearer ${opts.key}`, "Content-Type": "application/json" },
      body: JSON.stringify({ topic: TOPIC, event: "new_msg", payload: { message: "over long-poll" } }),
    });
    if (!response.ok) throw new Error(`publish failed: ${response.status}`);
    await lp.waitForFunction(() => window.__events.some((e) => e.event === "message" && e.payload.message === "over long-poll"),
      null, { timeout: TIMEOUT });
    const memorized = await lp.evaluate(() => sessionStorage.getItem("phx:fallback:LongPoll"));
    await waitText(page, "#stat-transports", /1 long-poll/, "the console to count the long-poll connection");
    emit({ step: "fallback", memorized, transports: await text(page, "#stat-transports") });
  }
  if (pageErrors.length) throw new Error(`errors in the page: ${pageErrors.join("; ")}`);
  emit({ step: "done" });
} catch (error) {
  emit({ error: String((error && error.stack) || error) });
  process.exitCode = 1;
} finally {
  if (client) client.socket.disconnect();
  if (context) await context.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
}
process.exit();
