// Drives examples/chat.html in headless Chromium for tests/test_examples.py. Prints one JSON line per
// step: "presence" once the page lists --user, then "message" once the text --expect (published by
// the test through a backend example after "presence") is on the page, then "typing" once typing
// in the page shows --user as typing; the test then cuts the page's socket and publishes --missed:
// "disconnected" once the page says so, "recovered" once --missed is on the page after it rejoined,
// then "done".
//   node chat.mjs --page URL --user ID --expect TEXT --missed TEXT [--chromium /usr/bin/chromium]
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";
import { CHROMIUM_ARGS } from "./browser.mjs";

const { values: opts } = parseArgs({
  options: {
    page: { type: "string" }, user: { type: "string" }, expect: { type: "string" }, missed: { type: "string" },
    chromium: { type: "string", default: "/usr/bin/chromium" },
  },
});
const TIMEOUT = 20000;
const step = (name, data = {}) => console.log(JSON.stringify({ step: name, ...data }));

const userDataDir = mkdtempSync(join(tmpdir(), "push-chat-chromium-"));
let context;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: opts.chromium,
    headless: true,
    args: CHROMIUM_ARGS,
  });
  const page = context.pages()[0] || await context.newPage();
  const pageErrors = [];
  page.on("pageerror", (error) => pageErrors.push(String(error)));
  await page.goto(opts.page);

  const me = `#presence li[data-user="${opts.user}"]`;
  await page.waitForSelector(me, { timeout: TIMEOUT });
  step("presence", {
    names: await page.$$eval("#presence li", (items) => items.map((item) => item.textContent)),
    status: await page.textContent("#status"),
  });

  await page.waitForFunction((text) => [...document.querySelectorAll("#messages li")]
    .some((item) => item.textContent.includes(text)), opts.expect, { timeout: TIMEOUT });
  step("message", { messages: await page.$$eval("#messages li", (items) => items.map((item) => item.textContent)) });

  await page.type("#text", "hi");
  await page.waitForSelector(`${me}.typing`, { timeout: TIMEOUT });
  step("typing");

  await page.waitForFunction(() => document.getElementById("status").textContent.startsWith("reconnecting"),
    null, { timeout: TIMEOUT });
  step("disconnected");
  await page.waitForFunction((text) => [...document.querySelectorAll("#messages li")]
    .some((item) => item.textContent.includes(text)), opts.missed, { timeout: TIMEOUT });
  step("recovered", {
    messages: await page.$$eval("#messages li", (items) => items.map((item) => item.textContent)),
    status: await page.textContent("#status"),
  });

  if (pageErrors.length) throw new Error(`page errors: ${pageErrors.join("; ")}`);
  step("done");
} catch (error) {
  step("failed", { error: String(error) });
  process.exitCode = 1;
} finally {
  await context?.close();
  rmSync(userDataDir, { recursive: true, force: true });
}
