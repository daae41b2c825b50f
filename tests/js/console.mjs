// The cluster-wide console in a real headless Chromium (playwright-core), driven by tests/test_console_browser.py.
//
//   node console.mjs --bases http://127.0.0.1:4001,http://127.0.0.1:4002,http://127.0.0.1:4003 --key KEY
//                    --token JWT --user SUB --shots DIR [--fallback-page URL] [--chromium /usr/bin/chromium]
//
// The page is opened on the first node; the phoenix.js client (user --user, --token) connects to the second;
// the test's publishes go to the third. Steps, each printed as one JSON line {"step": name, ...} once it passed:
//   login        a wrong key is refused, the right one opens the console and stays in sessionStorage
//   nodes        the nodes view shows one row per node (three)
//   connections  the phoenix.js client connects to another node: the cluster's connection count goes up by one
//   chart        publishes to a third node move the messages and deliveries charts
//   topics       the topics view lists the client's topics with subscribers and presence; the presence list
//                shows the user; the prefix search narrows the list
//   watch        the page watches a topic and publishes to it: the client and the watch get the frame;
//                paused, a frame is held until resumed; clear empties the list
//   users        the users view finds the client's connection on the second node; unsubscribing it from a
//                topic closes that channel only; "disconnect (no reconnect)" after the confirmation closes
//                the phoenix.js client
//   screenshots  nodes (1280 px, full page), topics, users, and nodes at 420 px, saved under --shots
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
    bases: { type: "string" },
    key: { type: "string" },
    token: { type: "string" },
    user: { type: "string" },
    shots: { type: "string" },
    "fallback-page": { type: "string" },
    chromium: { type: "string", default: "/usr/bin/chromium" },
  },
});
for (const name of ["bases", "key", "token", "user", "shots"]) {
  if (!opts[name]) {
    console.error(`missing --${name}`);
    process.exit(2);
  }
}
const [PAGE_NODE, CLIENT_NODE, PUBLISH_NODE] = opts.bases.split(",");

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
const waitCount = (page, selector, count, what) => page.waitForFunction(
  ([selector, count]) => document.querySelectorAll(selector).length === count, [selector, count],
  { timeout: TIMEOUT }).catch(() => { throw new Error(`timed out waiting for ${what}`); });

async function publish(base, topic, message) {
  const response = await fetch(`${base}/api/broadcast`, {
    method: "POST",
    headers: { Authorization: `Bearer ${opts.key}`, "Content-Type": "application/json" },
    body: JSON.stringify({ topic, event: "new_msg", payload: { message } }),
  });
  if (!response.ok) throw new Error(`publish failed: ${response.status} ${await response.text()}`);
}

// A phoenix.js 1.8 client in Node, over WebSocket, recording what it receives and how its socket closes.
function nodeClient() {
  const received = [];
  const joined = new Set();
  const left = new Set();
  const closes = [];
  const socket = new Socket(`${CLIENT_NODE.replace("http", "ws")}/socket`, {
    transport: WebSocket, params: { token: opts.token }, reconnectAfterMs: () => 200, rejoinAfterMs: () => 200,
  });
  for (const topic of [TOPIC, PRESENCE_TOPIC]) {
    const channel = socket.channel(topic, {});
    channel.on("new_msg", (payload) => received.push({ topic, payload }));
    channel.join().receive("ok", () => joined.add(topic));
    channel.onClose(() => left.add(topic));
  }
  socket.onClose((event) => closes.push(event.code));
  socket.connect();
  return { socket, received, joined, left, closes };
}

const userDataDir = mkdtempSync(join(tmpdir(), "push-console-chromium-"));
const shot = (name) => join(opts.shots, `${name}.png`);
let context;
let client;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: opts.chromium,
    headless: true,
    args: CHROMIUM_ARGS,
    viewport: { width: 1280, height: 800 },
    deviceScaleFactor: 1,
  });
  const page = context.pages()[0] || await context.newPage();
  const pageErrors = [];
  page.on("pageerror", (error) => pageErrors.push(String(error)));
  const tab = (name) => page.click(`#tabs button[data-view="${name}"]`);

  // --- login
  await page.goto(`${PAGE_NODE}/console`);
  await page.fill("#key", "not-the-key");
  await page.click("#connect");
  await waitText(page, "#login-error", /Key refused/, "the wrong key to be refused");
  if (await page.isVisible("#dashboard")) throw new Error("the dashboard opened with a wrong key");
  await page.fill("#key", opts.key);
  await page.click("#connect");
  await page.waitForSelector("#dashboard", { state: "visible", timeout: TIMEOUT });
  const stored = await page.evaluate(() => sessionStorage.getItem("push-console-key"));
  if (stored !== opts.key) throw new Error("the key is not in sessionStorage");
  if (page.url().includes(opts.key)) throw new Error("the key is in the URL");
  emit({ step: "login" });

  // --- one row per node
  await waitCount(page, "#nodes tbody tr[data-node]", 3, "three rows in the nodes view");
  const nodeIds = await page.$$eval("#nodes tbody tr[data-node]", (rows) => rows.map((row) => row.dataset.node));
  const uptimes = await page.$$eval("#nodes tbody td.uptime", (cells) => cells.map((td) => td.textContent));
  await waitText(page, "#stat-connections", /^\d+$/, "the connection count");
  const before = Number(await text(page, "#stat-connections"));
  emit({ step: "nodes", nodes: nodeIds, uptimes });

  // --- a client connects to another node: the cluster's figure follows
  client = nodeClient();
  await waitFor(() => client.joined.size === 2, "the phoenix.js client to join");
  await waitText(page, "#stat-connections", new RegExp(`^${before + 1}$`), "the connection count to go up");
  emit({ step: "connections", before, after: before + 1 });

  // --- publishes to a third node move the charts
  const peak = (id) => page.$eval(`#chart-${id}`, (figure) => Number(figure.dataset.peak));
  const peaksBefore = { messages: await peak("messages"), deliveries: await peak("deliveries") };
  for (let round = 0; round < 3; round++) {
    for (let i = 0; i < 10; i++) await publish(PUBLISH_NODE, TOPIC, `chart ${round}.${i}`);
    await page.waitForTimeout(700); // spread over several polls, so the lines have a shape in the screenshot
  }
  await waitFor(() => client.received.length >= 30, "the client to receive the 30 publishes");
  await page.waitForFunction(() => ["messages", "deliveries"].every(
    (id) => Number(document.getElementById(`chart-${id}`).dataset.peak) > 0), null, { timeout: TIMEOUT })
    .catch(() => { throw new Error("timed out waiting for the charts to move"); });
  const lines = await page.$$eval("#chart-messages polyline", (all) => all.map((line) => line.dataset.series));
  emit({ step: "chart", before: peaksBefore, after: { messages: await peak("messages"), deliveries: await peak("deliveries") },
    lines });
  await page.screenshot({ path: shot("nodes"), fullPage: true });

  // --- topics
  await tab("topics");
  await waitText(page, `tr[data-topic="${TOPIC}"] td.subscribers`, /^1$/, `${TOPIC} in the topics table`);
  await waitText(page, `tr[data-topic="${PRESENCE_TOPIC}"] td.presence`, /^1 \/ 1$/, "presence counts");
  await page.click(`tr[data-topic="${PRESENCE_TOPIC}"] button:text("Open")`);
  await waitText(page, "#presence-note", /1 user\(s\) present/, "the presence list");
  const presence = await text(page, "#presence");
  if (!presence.includes(opts.user)) throw new Error(`the presence list lacks ${opts.user}: ${presence}`);
  await page.fill("#topic-prefix", "room:topic:");
  await waitCount(page, "#topics tbody tr", 1, "the prefix search to narrow the list");
  await page.fill("#topic-prefix", "");
  await waitCount(page, "#topics tbody tr", 2, "both topics again");
  emit({ step: "topics", presence });

  // --- watch, publish from the page, pause and clear
  await page.click(`tr[data-topic="${TOPIC}"] button:text("Watch")`);
  await waitText(page, "#frames li.note", new RegExp(`subscribed to ${TOPIC}`), "the watch to start");
  const received = client.received.length;
  await page.fill("#pub-topic", TOPIC);
  await page.fill("#pub-event", "new_msg");
  await page.fill("#pub-payload", '{"message": "hello from the console"}');
  await page.click("#pub-send");
  await waitText(page, "#pub-result", /Published; delivered to \d+/, "the publish result");
  const message = await waitFor(() => client.received.slice(received).find((m) => m.topic === TOPIC), "the client to receive");
  if (message.payload.message !== "hello from the console") throw new Error(`unexpected payload ${JSON.stringify(message)}`);
  await waitText(page, "#frames li:not(.note) .frame", /"message": "hello from the console"/, "the pretty frame in the watch");
  await page.click("#watch-pause");
  await publish(PUBLISH_NODE, TOPIC, "while paused");
  await waitFor(() => client.received.some((m) => m.payload.message === "while paused"), "the client to receive");
  await page.waitForSelector('#watch-pause[data-held="1"]', { timeout: TIMEOUT }); // the watch got it, and holds it
  if ((await text(page, "#frames li:not(.note) .frame")).includes("while paused")) throw new Error("a paused watch showed a frame");
  await page.click("#watch-pause");
  await waitText(page, "#frames li:not(.note) .frame", /while paused/, "the held frame after resume");
  await page.screenshot({ path: shot("topics"), fullPage: true });
  await page.click("#watch-clear");
  await waitCount(page, "#frames li", 0, "clear to empty the watch");
  emit({ step: "watch", received: message.payload });

  // --- users: find the client's connection on the second node and disconnect it
  await tab("users");
  await page.fill("#user-sub", opts.user);
  await page.press("#user-sub", "Enter");
  await waitCount(page, "#connections tbody tr", 1, "the user's connection");
  const connectionNode = await page.$eval("#connections tbody tr", (row) => row.dataset.node);
  await page.screenshot({ path: shot("users"), fullPage: true });
  await page.click(`#connections button[data-topic="${TOPIC}"]`);
  await page.waitForSelector("#confirm[open]", { timeout: TIMEOUT });
  await page.click("#confirm-ok");
  await waitFor(() => client.left.has(TOPIC), `the phoenix.js client to be unsubscribed from ${TOPIC}`);
  await waitText(page, "#user-result", /Unsubscribed/, "the unsubscribe result");
  await waitCount(page, "#connections .chip", 1, "the connection's topics without the one left");
  const unsubscribed = { left: [...client.left], socketOpen: client.closes.length === 0 };
  await page.click("#disconnect-close");
  await page.waitForSelector("#confirm[open]", { timeout: TIMEOUT });
  const question = await text(page, "#confirm-text");
  const clicked = Date.now();
  await page.click("#confirm-ok");
  await waitFor(() => client.closes.length > 0, "the phoenix.js client to be disconnected");
  const closedAfterMs = Date.now() - clicked;
  await waitText(page, "#user-result", /Disconnected/, "the disconnect result");
  emit({ step: "users", node: connectionNode, unsubscribed, question, closes: client.closes, closedAfterMs,
    result: await text(page, "#user-result") });

  // --- screenshots at 420 px
  await tab("nodes");
  await page.setViewportSize({ width: 420, height: 900 });
  await page.screenshot({ path: shot("nodes-420"), fullPage: true });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  await page.setViewportSize({ width: 1280, height: 800 });
  emit({ step: "screenshots", dir: opts.shots, overflow });

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
    await publish(PUBLISH_NODE, TOPIC, "over long-poll");
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
