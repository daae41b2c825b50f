// The users view: a user's connections on every node (/api/admin/connections), and, after a confirmation,
// disconnecting them (with or without reconnect) or unsubscribing them from one topic.
"use strict";

import { clock, number } from "./format.js";

export function setupUsers({ api, $, cell, confirmAction, Unauthorized }) {
  let user = null;

  async function find(sub) {
    user = sub;
    $("user-result").textContent = "";
    let answer;
    try {
      answer = await api(`/api/admin/connections?user=${encodeURIComponent(sub)}`);
    } catch (error) {
      if (!(error instanceof Unauthorized)) note(error.message, true);
      return;
    }
    if (user !== sub) return;
    if (!answer.ok) return note(answer.error, true);
    const { connections, unanswered, truncated } = answer.body;
    const nodes = new Set(connections.map((row) => row.node));
    let text = connections.length
      ? `${number(connections.length)} connection(s) of ${sub} on ${nodes.size} node(s)` : `${sub} has no connection.`;
    if (truncated) text += " (only the first 1000 per node)";
    if (unanswered.length) text += ` · not answering: ${unanswered.join(", ")}`;
    note(text, unanswered.length > 0);
    $("user-actions").hidden = connections.length === 0;
    $("connections").querySelector("tbody").replaceChildren(...connections.map(row));
  }

  function note(text, bad = false) {
    $("user-note").textContent = text;
    $("user-note").className = bad ? "small bad" : "muted small";
    if (bad) $("connections").querySelector("tbody").replaceChildren();
  }

  function row(connection) {
    const tr = document.createElement("tr");
    tr.dataset.connection = connection.id;
    tr.dataset.node = connection.node;
    const topics = document.createElement("td");
    topics.className = "topics";
    for (const topic of connection.topics) {
      const chip = document.createElement("span");
      chip.className = "chip mono";
      chip.textContent = topic;
      const leave = document.createElement("button");
      leave.type = "button";
      leave.className = "link";
      leave.title = `Unsubscribe ${user} from ${topic}`;
      leave.textContent = "×";
      leave.dataset.topic = topic;
      leave.addEventListener("click", () => unsubscribe(topic));
      chip.append(leave);
      topics.append(chip);
    }
    if (!connection.topics.length) topics.textContent = "–";
    tr.append(cell(connection.node, "mono"), cell(connection.transport), cell(connection.vsn),
      cell(connection.remote, "mono"), cell(clock(connection.connected_at)), topics);
    return tr;
  }

  async function act(question, action, path, body, describe) {
    if (!(await confirmAction(question, action))) return;
    const result = $("user-result");
    try {
      const answer = await api(path, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      result.textContent = answer.ok ? describe(answer.body) : answer.error;
      result.className = answer.ok ? "result ok" : "result bad";
    } catch (error) {
      if (error instanceof Unauthorized) return;
      result.textContent = error.message;
      result.className = "result bad";
    }
    if (user) setTimeout(() => find(user), 300); // the closes reach the other nodes within a second
  }

  const perNode = (counts) => Object.entries(counts).map(([node, count]) => `${node}: ${count}`).join(", ") || "none";

  function disconnect(reconnect) {
    const target = user;
    const how = reconnect ? "Their clients may reconnect at once." : "phoenix.js clients will not reconnect.";
    act(`Disconnect every connection of ${target}, on every node? ${how}`, "Disconnect", "/api/admin/disconnect",
      { user: target, reconnect, reason: "from the console" },
      (answer) => `Disconnected ${target}: ${perNode(answer.closed)} connection(s) closed per node.`
        + (answer.unanswered.length ? ` Not answering: ${answer.unanswered.join(", ")}.` : ""));
  }

  function unsubscribe(topic) {
    const target = user;
    act(`Unsubscribe ${target} from ${topic} on every node? Their sockets stay open.`, "Unsubscribe",
      "/api/admin/unsubscribe", { user: target, topic },
      (answer) => `Unsubscribed ${target} from ${topic}: ${perNode(answer.unsubscribed)} per node.`);
  }

  $("user-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const sub = $("user-sub").value.trim();
    if (sub) find(sub);
  });
  $("disconnect-reconnect").addEventListener("click", () => disconnect(true));
  $("disconnect-close").addEventListener("click", () => disconnect(false));

  return {
    stop() {
      user = null;
      $("user-actions").hidden = true;
      $("connections").querySelector("tbody").replaceChildren();
      $("user-note").textContent = "";
      $("user-result").textContent = "";
    },
  };
}
