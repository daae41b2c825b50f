// The topics view: cluster-wide topics (/api/admin/topics) searched by prefix and sorted; for one topic its
// presence (keys and metas), its recent history, and a watch of what is broadcast on it (pause, clear).
"use strict";

import { clock, number } from "./format.js";

const TOPICS_EVERY_MS = 2000;
const TOPICS_LIMIT = 100;
const MAX_FRAMES = 200;
const HISTORY_SHOWN = 20;

export function setupTopics({ api, $, cell, Unauthorized }) {
  let timer = null;
  let rows = [];
  let watch = null; // {controller, topic, paused, held}
  let detail = null; // the topic whose presence and history are shown

  async function refresh() {
    const prefix = $("topic-prefix").value.trim();
    try {
      const answer = await api(`/api/admin/topics?limit=${TOPICS_LIMIT}&prefix=${encodeURIComponent(prefix)}`);
      if (!answer.ok) return showEmpty(answer.error);
      rows = answer.body.topics;
      render(answer.body.next_cursor !== null);
    } catch (error) {
      if (!(error instanceof Unauthorized)) showEmpty(error.message);
    }
  }

  function showEmpty(text) {
    $("topics").querySelector("tbody").replaceChildren();
    $("topics-empty").hidden = false;
    $("topics-empty").textContent = text;
  }

  function render(more) {
    const by = $("topic-sort").value;
    const present = (row) => (row.presence ? row.presence.users : -1);
    const sorted = [...rows].sort((a, b) => (by === "topic" ? a.topic.localeCompare(b.topic)
      : by === "presence" ? present(b) - present(a) || a.topic.localeCompare(b.topic)
        : b.subscribers - a.subscribers || a.topic.localeCompare(b.topic)));
    const trs = sorted.map((row) => {
      const tr = document.createElement("tr");
      tr.dataset.topic = row.topic;
      const presence = row.presence ? `${number(row.presence.users)} / ${number(row.presence.connections)}` : "–";
      tr.append(cell(row.topic, "topic"), cell(number(row.subscribers), "num subscribers"),
        cell(presence, "num presence"));
      const actions = document.createElement("td");
      actions.className = "actions";
      actions.append(button("Open", () => open(row.topic)), button("Watch", () => {
        $("watch-topic").value = row.topic;
        open(row.topic);
        startWatch(row.topic);
      }));
      tr.append(actions);
      return tr;
    });
    $("topics").querySelector("tbody").replaceChildren(...trs);
    $("topics-empty").hidden = trs.length > 0 && !more;
    $("topics-empty").textContent = more ? `Showing the first ${TOPICS_LIMIT} by name: narrow the prefix to see the rest.`
      : "No topic has subscribers.";
  }

  function button(text, action) {
    const element = document.createElement("button");
    element.type = "button";
    element.className = "secondary";
    element.textContent = text;
    element.addEventListener("click", action);
    return element;
  }

  // --- one topic: presence and history

  async function open(topic) {
    detail = topic;
    $("detail-topic").textContent = topic;
    if (!$("pub-topic").value) $("pub-topic").value = topic;
    const path = encodeURIComponent(topic);
    const [presence, history] = await Promise.all([
      api(`/api/presence/${path}`).catch((error) => ({ ok: false, error: error.message })),
      api(`/api/history/${path}`).catch((error) => ({ ok: false, error: error.message })),
    ]);
    if (detail !== topic) return;
    const entries = presence.ok ? Object.entries(presence.body.presences) : [];
    $("presence-note").textContent = !presence.ok ? presence.error
      : entries.length ? `${number(entries.length)} user(s) present` : "Nobody is present.";
    $("presence").replaceChildren(...entries.map(([presenceKey, { metas }]) => entry(presenceKey, metas)));
    const messages = history.ok ? history.body.messages.slice(-HISTORY_SHOWN).reverse() : [];
    $("history-note").textContent = !history.ok ? history.error
      : messages.length ? `the latest ${messages.length}, newest first` : "Nothing published recently.";
    $("history").replaceChildren(...messages.map((message) =>
      entry(`${message.event} · ${message.position}`, message.payload)));
  }

  function entry(title, value) {
    const item = document.createElement("li");
    const head = document.createElement("div");
    head.className = "entry-title mono";
    head.textContent = title;
    const body = document.createElement("pre");
    body.textContent = JSON.stringify(value, null, 2);
    item.append(head, body);
    return item;
  }

  // --- watching

  function addFrame(text, note = false, at = Date.now() / 1000) {
    const list = $("frames");
    const item = document.createElement("li");
    if (note) item.className = "note";
    const time = document.createElement("span");
    time.className = "time";
    time.textContent = clock(at);
    const body = document.createElement(note ? "span" : "pre");
    body.className = "frame";
    body.textContent = text;
    item.append(time, body);
    list.prepend(item);
    while (list.children.length > MAX_FRAMES) list.lastElementChild.remove();
  }

  function stopWatch() {
    if (watch) watch.controller.abort();
    watch = null;
    $("watch-stop").disabled = true;
    $("watch-pause").disabled = true;
    $("watch-pause").textContent = "Pause";
    delete $("watch-pause").dataset.held;
    $("watch-state").textContent = "";
  }

  function togglePause() {
    if (!watch) return;
    watch.paused = !watch.paused;
    $("watch-pause").textContent = watch.paused ? "Resume" : "Pause";
    if (!watch.paused) {
      const held = watch.held.splice(0);
      delete $("watch-pause").dataset.held;
      held.forEach((line) => show(watch, line));
    }
    $("watch-state").textContent = watch.paused ? `paused: ${watch.topic} (frames are held)` : `watching ${watch.topic}`;
  }

  async function startWatch(topic) {
    stopWatch();
    if (!topic) return;
    const current = { controller: new AbortController(), topic, paused: false, held: [] };
    watch = current;
    $("watch-stop").disabled = false;
    $("watch-pause").disabled = false;
    $("watch-state").textContent = `connecting to ${topic}…`;
    try {
      const response = await api(`/api/console/watch?topic=${encodeURIComponent(topic)}`,
        { signal: current.controller.signal, stream: true });
      if (!response.ok) {
        const answer = await response.json().catch(() => ({}));
        throw new Error(answer.error || `HTTP ${response.status}`);
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let newline;
        while ((newline = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, newline);
          buffer = buffer.slice(newline + 1);
          if (line && watch === current) {
            const parsed = JSON.parse(line);
            if (current.paused && parsed.frame) {
              current.held.push(parsed);
              if (current.held.length > MAX_FRAMES) current.held.shift();
              $("watch-pause").dataset.held = current.held.length;
            } else show(current, parsed);
          }
        }
      }
      if (watch === current) $("watch-state").textContent = `${topic}: the server ended the watch`;
    } catch (error) {
      if (error instanceof Unauthorized) return;
      if (watch === current && error.name !== "AbortError") $("watch-state").textContent = `${topic}: ${error.message}`;
    }
  }

  function show(current, line) {
    if (line.subscribed) {
      $("watch-state").textContent = `watching ${current.topic}`;
      addFrame(`subscribed to ${current.topic}`, true);
    } else if (line.frame) {
      addFrame(JSON.stringify(line.frame, null, 2), false, line.at);
    } else if (line.dropped) {
      addFrame(`${line.dropped} frame(s) dropped: the console fell behind`, true);
    }
  }

  // --- publishing

  async function publish(event) {
    event.preventDefault();
    const result = $("pub-result");
    let payload;
    try {
      payload = JSON.parse($("pub-payload").value || "{}");
    } catch {
      result.textContent = "The payload is not valid JSON.";
      result.className = "result bad";
      return;
    }
    const body = { topic: $("pub-topic").value.trim(), event: $("pub-event").value.trim(), payload };
    try {
      const answer = await api("/api/broadcast", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      result.textContent = answer.ok
        ? `Published; delivered to ${answer.body.delivered} subscriber(s) on the node that took it.` : answer.error;
      result.className = answer.ok ? "result ok" : "result bad";
      if (answer.ok && detail === body.topic) open(detail);
    } catch (error) {
      if (error instanceof Unauthorized) return;
      result.textContent = error.message;
      result.className = "result bad";
    }
  }

  $("topic-search").addEventListener("submit", (event) => { event.preventDefault(); refresh(); });
  $("topic-prefix").addEventListener("input", refresh);
  $("topic-sort").addEventListener("change", () => render(false));
  $("publish-form").addEventListener("submit", publish);
  $("watch-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const topic = $("watch-topic").value.trim();
    if (topic) open(topic);
    startWatch(topic);
  });
  $("watch-pause").addEventListener("click", togglePause);
  $("watch-clear").addEventListener("click", () => $("frames").replaceChildren());
  $("watch-stop").addEventListener("click", stopWatch);

  return {
    start() {
      refresh();
      timer = setInterval(refresh, TOPICS_EVERY_MS);
    },
    stop() {
      clearInterval(timer);
      timer = null;
      stopWatch();
      detail = null;
    },
  };
}
