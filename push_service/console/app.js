// push-service console: no dependencies, no build step. Reads /api/stats every second and
// /api/topics every two, publishes with /api/broadcast and watches a topic with
// /api/console/watch, always with the publish key as `Authorization: Bearer`.
"use strict";

(() => {
  const KEY_STORAGE = "push-console-key";
  const STATS_EVERY_MS = 1000;
  const TOPICS_EVERY_MS = 2000;
  const MAX_FRAMES = 200;

  const $ = (id) => document.getElementById(id);
  let key = null;
  let timers = [];
  let previous = null; // the last /api/stats answer, for rates
  let watch = null; // {controller, topic}

  class Unauthorized extends Error {}

  async function api(path, options = {}) {
    const headers = Object.assign({ Authorization: `Bearer ${key}` }, options.headers || {});
    const response = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
    if (response.status === 401) throw new Unauthorized("the publish key was refused");
    return response;
  }

  function setState(text, state) {
    const pill = $("state");
    pill.textContent = text;
    pill.dataset.state = state;
  }

  const number = (value) => new Intl.NumberFormat("en").format(value);
  const rate = (value) => (value < 10 ? value.toFixed(1) : number(Math.round(value)));

  // --- key

  async function connect(candidate) {
    key = candidate;
    $("login-error").textContent = "";
    try {
      const response = await api("/api/stats");
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      render(await response.json());
    } catch (error) {
      key = null;
      if (error instanceof Unauthorized) sessionStorage.removeItem(KEY_STORAGE);
      $("login-error").textContent = error instanceof Unauthorized ? "Key refused." : `Cannot reach the server (${error.message}).`;
      return;
    }
    sessionStorage.setItem(KEY_STORAGE, candidate);
    $("key").value = "";
    $("key-form").querySelector("label").textContent = "Publish key (set)";
    $("key").hidden = true;
    $("connect").hidden = true;
    $("forget").hidden = false;
    $("dashboard").hidden = false;
    start();
  }

  function forget() {
    stop();
    stopWatch();
    sessionStorage.removeItem(KEY_STORAGE);
    key = null;
    previous = null;
    $("dashboard").hidden = true;
    $("key").hidden = false;
    $("connect").hidden = false;
    $("forget").hidden = true;
    $("key-form").querySelector("label").textContent = "Publish key";
    setState("not connected", "idle");
  }

  function refused() {
    forget();
    $("login-error").textContent = "Key refused.";
  }

  function start() {
    stop();
    refreshTopics();
    timers.push(setInterval(refreshStats, STATS_EVERY_MS));
    timers.push(setInterval(refreshTopics, TOPICS_EVERY_MS));
  }

  function stop() {
    timers.forEach(clearInterval);
    timers = [];
  }

  // --- figures

  async function refreshStats() {
    try {
      const response = await api("/api/stats");
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      render(await response.json());
    } catch (error) {
      if (error instanceof Unauthorized) return refused();
      setState("server unreachable", "bad");
    }
  }

  function render(stats) {
    const c = stats.counters;
    $("node").textContent = `node ${stats.node} · up ${Math.round(stats.uptime_seconds)} s`;
    if (stats.draining) setState("draining", "bad");
    else if (!stats.broker.up) setState("broker down", "bad");
    else setState("live", "ok");

    $("stat-connections").textContent = number(stats.connections.total);
    $("stat-transports").textContent = `${number(stats.connections.websocket)} websocket · ${number(stats.connections.longpoll)} long-poll`;
    $("stat-topics").textContent = number(stats.topics);
    $("stat-presences").textContent =
      `${number(stats.presence_topics)} tracked in presence · ${number(stats.presences)} presences`;
    $("stat-joins").textContent = `${number(c.joins)} total`;
    $("stat-messages").textContent = `${number(c.messages_published)} total`;
    $("stat-deliveries").textContent = `${number(c.frames_delivered)} total`;
    $("stat-slow").textContent = number(c.slow_consumer_disconnects);
    $("stat-refused").textContent = `${number(c.connects_refused)} connects refused`;
    const broker = $("stat-broker");
    broker.textContent = stats.broker.up ? "up" : "down";
    broker.className = `value ${stats.broker.up ? "ok" : "bad"}`;
    $("stat-broker-detail").textContent = `${stats.broker.kind} · ${number(stats.broker.reconnects)} reconnects`;

    if (previous && stats.node === previous.node && stats.time > previous.time) {
      const seconds = stats.time - previous.time;
      const per = (name) => Math.max(0, (c[name] - previous.counters[name]) / seconds);
      $("stat-joins-rate").textContent = rate(per("joins"));
      $("stat-messages-rate").textContent = rate(per("messages_published"));
      $("stat-deliveries-rate").textContent = rate(per("frames_delivered"));
    }
    previous = stats;
  }

  // --- topics

  async function refreshTopics() {
    try {
      const response = await api("/api/topics");
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      renderTopics(await response.json());
    } catch (error) {
      if (error instanceof Unauthorized) refused();
    }
  }

  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }

  function renderTopics(data) {
    const body = $("topics").querySelector("tbody");
    const rows = data.topics.map((row) => {
      const tr = document.createElement("tr");
      tr.dataset.topic = row.topic;
      tr.append(cell(row.topic, "topic"), cell(number(row.subscribers), "num subscribers"));
      const presence = row.presence ? `${number(row.presence.users)} / ${number(row.presence.connections)}` : "–";
      tr.append(cell(presence, "num presence"));
      const actions = document.createElement("td");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "secondary";
      button.textContent = "Watch";
      button.addEventListener("click", () => {
        $("watch-topic").value = row.topic;
        $("pub-topic").value = $("pub-topic").value || row.topic;
        startWatch(row.topic);
      });
      actions.append(button);
      tr.append(actions);
      return tr;
    });
    body.replaceChildren(...rows);
    $("topics-empty").hidden = rows.length > 0;
    $("topics-note").textContent = data.truncated ? `(top ${rows.length} of ${number(data.total)})` : "";
  }

  // --- publish

  async function publish(event) {
    event.preventDefault();
    const result = $("pub-result");
    result.className = "result";
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
      const response = await api("/api/broadcast", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      const answer = await response.json();
      if (response.ok) {
        const watched = watch && watch.topic === body.topic ? ", this watch included" : "";
        result.textContent = `Published; delivered to ${answer.delivered} local subscriber(s)${watched}.`;
        result.className = "result ok";
      } else {
        result.textContent = `HTTP ${response.status}: ${answer.error}`;
        result.className = "result bad";
      }
    } catch (error) {
      if (error instanceof Unauthorized) return refused();
      result.textContent = `Failed: ${error.message}`;
      result.className = "result bad";
    }
  }

  // --- watch

  function addFrame(text, note = false) {
    const list = $("frames");
    const item = document.createElement("li");
    if (note) item.className = "note";
    const time = document.createElement("span");
    time.className = "time";
    time.textContent = new Date().toLocaleTimeString();
    const body = document.createElement("span");
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
    $("watch-state").textContent = "";
  }

  async function startWatch(topic) {
    stopWatch();
    if (!topic) return;
    const controller = new AbortController();
    const current = { controller, topic };
    watch = current;
    $("watch-stop").disabled = false;
    $("watch-state").textContent = `connecting to ${topic}…`;
    try {
      const response = await api(`/api/console/watch?topic=${encodeURIComponent(topic)}`, { signal: controller.signal });
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
          if (line) onWatchLine(current, JSON.parse(line));
        }
      }
      if (watch === current) $("watch-state").textContent = `${topic}: stream ended`;
    } catch (error) {
      if (error instanceof Unauthorized) return refused();
      if (watch === current && error.name !== "AbortError") $("watch-state").textContent = `${topic}: ${error.message}`;
    }
  }

  function onWatchLine(current, line) {
    if (watch !== current) return;
    if (line.subscribed) {
      $("watch-state").textContent = `watching ${current.topic}`;
      addFrame(`subscribed to ${current.topic}`, true);
    } else if (line.frame) {
      addFrame(JSON.stringify(line.frame));
    } else if (line.dropped) {
      addFrame(`${line.dropped} frame(s) dropped: the console fell behind`, true);
    }
  }

  // --- wiring

  document.addEventListener("DOMContentLoaded", () => {
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const candidate = $("key").value.trim();
      if (candidate) connect(candidate);
    });
    $("forget").addEventListener("click", forget);
    $("publish-form").addEventListener("submit", publish);
    $("watch-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const topic = $("watch-topic").value.trim();
      if (topic && !$("pub-topic").value) $("pub-topic").value = topic;
      startWatch(topic);
    });
    $("watch-stop").addEventListener("click", stopWatch);
    const saved = sessionStorage.getItem(KEY_STORAGE);
    if (saved) connect(saved);
  });
})();
