// push-service console: no dependencies, no build step. Signs in with the admin key, polls
// /api/admin/nodes every two seconds for the nodes view and its charts, and hands the same `api` to the
// topics and users views. The key is sent only as `Authorization: Bearer`, never in a URL.
"use strict";

import { Chart } from "./charts.js";
import { ago, duration, explain, milliseconds, number, perSecond, unreachable } from "./format.js";
import { setupTopics } from "./topics.js";
import { setupUsers } from "./users.js";

const KEY_STORAGE = "push-console-key";
const NODES_EVERY_MS = 2000;

const $ = (id) => document.getElementById(id);
let key = null;
let timer = null;
let charts = null;
let previous = new Map(); // node id -> {at, totals}: the last poll, for 2 s rates
const views = {};

export class Unauthorized extends Error {}

// An answer of the server as {ok, status, body}; a refused key signs out, everything else is for the caller.
async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: `Bearer ${key}` }, options.headers || {});
  let response;
  try {
    response = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new Error(unreachable);
  }
  if (response.status === 401) {
    refused();
    throw new Unauthorized(explain(401));
  }
  if (options.stream) return response;
  const body = await response.json().catch(() => null);
  return { ok: response.ok, status: response.status, body, error: response.ok ? null : explain(response.status, body) };
}

function setState(text, state) {
  const pill = $("state");
  pill.textContent = text;
  pill.dataset.state = state;
}

function problem(text) {
  $("problem").hidden = !text;
  $("problem").textContent = text || "";
}

// --- signing in

async function signIn(candidate) {
  key = candidate;
  $("login-error").textContent = "";
  let answer;
  try {
    answer = await api("/api/admin/nodes");
  } catch (error) {
    key = null;
    $("login-error").textContent = error instanceof Unauthorized ? "Key refused." : error.message;
    return;
  }
  if (!answer.ok) {
    key = null;
    $("login-error").textContent = answer.error;
    return;
  }
  sessionStorage.setItem(KEY_STORAGE, candidate);
  $("key").value = "";
  $("login").hidden = true;
  $("dashboard").hidden = false;
  $("tabs").hidden = false;
  $("forget").hidden = false;
  charts = makeCharts();
  renderNodes(answer.body);
  timer = setInterval(refreshNodes, NODES_EVERY_MS);
  Object.values(views).forEach((view) => view.start && view.start());
}

function signOut() {
  clearInterval(timer);
  timer = null;
  Object.values(views).forEach((view) => view.stop && view.stop());
  sessionStorage.removeItem(KEY_STORAGE);
  key = null;
  previous = new Map();
  $("charts").replaceChildren();
  $("dashboard").hidden = true;
  $("tabs").hidden = true;
  $("forget").hidden = true;
  $("login").hidden = false;
  problem("");
  setState("not signed in", "idle");
}

function refused() {
  if (key === null) return;
  const wasSignedIn = !$("dashboard").hidden;
  signOut();
  if (wasSignedIn) $("login-error").textContent = "Key refused.";
}

function show(name) {
  for (const button of $("tabs").querySelectorAll("button")) {
    if (button.dataset.view === name) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== `view-${name}`;
  if (views[name] && views[name].shown) views[name].shown();
}

// --- nodes and charts

function makeCharts() {
  $("charts").replaceChildren();
  const make = (id, title, format, total = "sum") => {
    const chart = new Chart($("charts"), { title, format, total });
    chart.figure.id = `chart-${id}`;
    return chart;
  };
  return {
    connections: make("connections", "Connections", number),
    joins: make("joins", "Joins", perSecond),
    messages: make("messages", "Messages", perSecond),
    deliveries: make("deliveries", "Deliveries", perSecond),
    p99: make("p99", "p99 publish → socket", milliseconds, "max"),
    drops: make("drops", "Slow-consumer drops", perSecond),
  };
}

async function refreshNodes() {
  try {
    const answer = await api("/api/admin/nodes");
    if (!answer.ok) {
      setState("trouble", "bad");
      return problem(answer.error);
    }
    problem("");
    renderNodes(answer.body);
  } catch (error) {
    if (error instanceof Unauthorized) return;
    setState("server unreachable", "bad");
    problem(error.message);
  }
}

function renderNodes(data) {
  const nodes = data.nodes;
  const sum = (pick) => nodes.reduce((total, node) => total + pick(node), 0);
  const down = nodes.filter((node) => !node.broker.up || node.draining);
  if (data.unanswered.length) setState(`${data.unanswered.length} node(s) not answering`, "bad");
  else if (down.length) setState(`${down.length} node(s) degraded`, "bad");
  else setState("live", "ok");

  $("sum-nodes").textContent = number(nodes.length);
  $("sum-version").textContent = [...new Set(nodes.map((node) => node.version))].join(", ");
  $("stat-connections").textContent = number(sum((node) => node.connections.total));
  $("stat-transports").textContent = `${number(sum((node) => node.connections.websocket))} websocket · `
    + `${number(sum((node) => node.connections.longpoll))} long-poll`;
  $("sum-topics").textContent = number(sum((node) => node.topics));
  $("sum-subscriptions").textContent = `${number(sum((node) => node.subscriptions))} subscriptions`;
  $("sum-messages").textContent = perSecond(sum((node) => node.messages_per_second));
  $("sum-messages-total").textContent = `${number(sum((node) => node.totals.messages))} total · last minute's rate`;
  $("sum-deliveries").textContent = perSecond(sum((node) => node.deliveries_per_second));
  $("sum-deliveries-total").textContent = `${number(sum((node) => node.totals.deliveries))} total`;

  const rows = nodes.map((node) => {
    const tr = document.createElement("tr");
    tr.dataset.node = node.id;
    const broker = `${node.broker.kind} ${node.broker.up ? "up" : "down"}${node.draining ? " · draining" : ""}`;
    const transports = `${number(node.connections.websocket)} ws · ${number(node.connections.longpoll)} lp`;
    tr.append(cell(node.id, "mono"), cell(node.version), cell(duration(node.uptime_seconds), "num uptime"),
      cell(`${number(node.connections.total)} (${transports})`, "num connections"), cell(number(node.topics), "num"),
      cell(number(node.subscriptions), "num"), cell(broker, node.broker.up && !node.draining ? "ok" : "bad"),
      cell(perSecond(node.messages_per_second), "num"), cell(perSecond(node.deliveries_per_second), "num"),
      cell(ago(node.last_heartbeat), "num"));
    return tr;
  });
  for (const missing of data.unanswered) {
    const tr = document.createElement("tr");
    tr.className = "missing";
    tr.append(cell(missing.id, "mono"), cell("did not answer within a second", "bad"));
    tr.lastChild.colSpan = 8;
    tr.append(cell(ago(missing.last_heartbeat), "num"));
    rows.push(tr);
  }
  $("nodes").querySelector("tbody").replaceChildren(...rows);
  $("nodes-note").textContent = `as seen by every node; polled every ${NODES_EVERY_MS / 1000} s`;
  chartNodes(nodes);
}

// Rates over the last poll (about 2 s) from each node's running totals; a restarted node starts over.
function chartNodes(nodes) {
  const now = Date.now();
  const values = { connections: {}, joins: {}, messages: {}, deliveries: {}, p99: {}, drops: {} };
  const seen = new Map();
  for (const node of nodes) {
    const before = previous.get(node.id);
    const rate = (name) => {
      if (!before || node.totals[name] < before.totals[name]) return null;
      return (node.totals[name] - before.totals[name]) / Math.max(0.001, (now - before.at) / 1000);
    };
    values.connections[node.id] = node.connections.total;
    values.joins[node.id] = rate("joins");
    values.messages[node.id] = rate("messages");
    values.deliveries[node.id] = rate("deliveries");
    values.drops[node.id] = rate("slow_consumer_drops");
    values.p99[node.id] = node.publish_to_socket_p99_ms;
    seen.set(node.id, { at: now, totals: node.totals });
  }
  previous = seen;
  for (const [name, chart] of Object.entries(charts)) chart.add(now, values[name]);
}

export function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

// A modal yes/no question: resolves true when the operator confirms.
export function confirmAction(text, action) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = action;
  return new Promise((resolve) => {
    const done = (answer) => {
      $("confirm-ok").onclick = $("confirm-cancel").onclick = dialog.oncancel = null;
      dialog.close();
      resolve(answer);
    };
    $("confirm-ok").onclick = () => done(true);
    $("confirm-cancel").onclick = () => done(false);
    dialog.oncancel = () => done(false);
    dialog.showModal();
  });
}

// --- wiring

document.addEventListener("DOMContentLoaded", () => {
  const shared = { api, $, cell, confirmAction, Unauthorized };
  views.topics = setupTopics(shared);
  views.users = setupUsers(shared);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const candidate = $("key").value.trim();
    if (candidate) signIn(candidate);
  });
  $("forget").addEventListener("click", signOut);
  for (const button of $("tabs").querySelectorAll("button")) {
    button.addEventListener("click", () => show(button.dataset.view));
  }
  const saved = sessionStorage.getItem(KEY_STORAGE);
  if (saved) signIn(saved);
});
