"""The admin API (`/api/admin/*`), cluster-wide: any node answers for every live node, over control.py.

Every endpoint needs an admin key (PUSH_ADMIN_KEY), never a publish key. Each node runs the local half
of a request (`LocalAdmin`) for itself and for whoever asks over the control channel.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any, NamedTuple

from aiohttp import web
from prometheus_client.registry import Collector

from push_service import __version__
from push_service.api import json_response, read_body
from push_service.control import Control
from push_service.node import NODE, Node
from push_service.publishing import ApiError, json_object
from push_service.connection import ADMIN_CLOSE, ADMIN_RECONNECT
from push_service.topics import parse_topic

log = logging.getLogger("push_service.admin")

ANSWER_WAIT = 1.0  # seconds the asking node waits for the other nodes' answers
MAX_BODY = 16 * 1024
MAX_USER = 512  # characters of a `sub`: percent-encoded in a query, it still fits aiohttp's 8 KiB request line
MAX_TOPIC = 255  # characters of a topics prefix or cursor (a topic name is at most 255 bytes)
MAX_REASON = 200
MAX_CONNECTIONS = 1000  # of one user, per node, in /connections
MAX_TOPICS_SHOWN = 100  # per connection, in /connections
TOPICS_LIMIT = 100
TOPICS_MAX_LIMIT = 1000
RATE_WINDOW = 60.0  # seconds the messages/s and deliveries/s of /nodes average over
TOPIC_FAMILIES = "room:lobby:<id>, room:topic:<id>, room:<id>, user:<id>"
CONTROL = web.AppKey("control", Control)


class Counts(NamedTuple):
    """A node's running totals at one moment, for its rates over the last minute."""
    joins: float
    published: float
    delivered: float
    slow_drops: float
    latency: tuple[int, ...]  # publish-to-socket histogram buckets


def _total(metric: Collector) -> float:
    return sum(sample.value for family in metric.collect() for sample in family.samples
               if sample.name.endswith("_total"))


def require_admin_key(request: web.Request) -> None:
    """401 without a valid key, 403 for a publish key, 403 when no admin key is configured (admin API off)."""
    node: Node = request.app[NODE]
    if not node.settings.admin_keys:
        raise ApiError(403, "the admin API is off: set PUSH_ADMIN_KEY to turn it on")
    header = request.headers.get("Authorization")
    if header is None:
        raise ApiError(401, "missing admin key (Authorization: Bearer <PUSH_ADMIN_KEY>)")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not node.admin_keys.check(key):
        if scheme.lower() == "bearer" and node.publish_keys.check(key):
            raise ApiError(403, "a publish key cannot use the admin API: use an admin key (PUSH_ADMIN_KEY)")
        raise ApiError(401, "invalid admin key")


class LocalAdmin:
    """This node's half of each admin request (control handlers), and its rates over the last minute."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._samples: collections.deque[tuple[float, Counts]] = collections.deque()

    def register(self, control: Control) -> None:
        control.handlers.update({"disconnect": self.disconnect, "unsubscribe": self.unsubscribe,
                                 "connections": self.connections, "node": self.info, "topics": self.topics})
        control.ticks.append(self.sample)

    def _counts(self) -> Counts:
        metrics = self.node.metrics
        return Counts(_total(metrics.joins), _total(metrics.published), _total(metrics.frames_delivered),
                      _total(metrics.slow_consumers), metrics.publish_latency.counts())

    def sample(self) -> None:
        now = time.monotonic()
        self._samples.append((now, self._counts()))
        while self._samples and self._samples[0][0] < now - RATE_WINDOW:
            self._samples.popleft()

    def _rates(self) -> dict[str, Any]:
        """Per second over the last minute, the p99 of publish-to-socket (ms, a histogram bucket's upper
        bound) over the same minute, and the running totals (the console derives its 2 s rates from them)."""
        now_counts = self._counts()
        then, earlier = self._samples[0] if self._samples else (time.monotonic(), now_counts)
        elapsed = max(1.0, time.monotonic() - then)

        def per_second(now_value: float, then_value: float) -> float:
            return round(max(0.0, now_value - then_value) / elapsed, 3)

        p99 = self.node.metrics.publish_latency.quantile_since(earlier.latency, 0.99)
        return {
            "messages_per_second": per_second(now_counts.published, earlier.published),
            "deliveries_per_second": per_second(now_counts.delivered, earlier.delivered),
            "joins_per_second": per_second(now_counts.joins, earlier.joins),
            "slow_consumer_drops_per_second": per_second(now_counts.slow_drops, earlier.slow_drops),
            "publish_to_socket_p99_ms": None if p99 is None else round(p99 * 1000, 3),
            "totals": {"joins": int(now_counts.joins), "messages": int(now_counts.published),
                       "deliveries": int(now_counts.delivered), "slow_consumer_drops": int(now_counts.slow_drops)},
        }

    @staticmethod
    def _user(args: dict[str, Any]) -> str:
        user = args.get("user")
        if not isinstance(user, str):
            raise ValueError("user must be a string")
        return user

    def disconnect(self, args: dict[str, Any]) -> dict[str, Any]:
        user = self._user(args)
        sessions = self.node.sessions_of(user)
        closing = ADMIN_RECONNECT if args.get("reconnect") is True else ADMIN_CLOSE
        for session in sessions:
            session.disconnect(closing)
        if sessions:
            log.info("admin disconnect", extra={"event": "admin_disconnect", "sub": user, "connections": len(sessions),
                                                "reconnect": closing is ADMIN_RECONNECT,
                                                "reason": str(args.get("reason") or "")[:MAX_REASON]})
        return {"count": len(sessions)}

    def unsubscribe(self, args: dict[str, Any]) -> dict[str, Any]:
        user, topic = self._user(args), args.get("topic")
        if not isinstance(topic, str):
            raise ValueError("topic must be a string")
        count = sum(session.kick(topic) for session in self.node.sessions_of(user))
        if count:
            log.info("admin unsubscribe", extra={"event": "admin_unsubscribe", "sub": user, "topic": topic,
                                                 "connections": count})
        return {"count": count}

    def connections(self, args: dict[str, Any]) -> dict[str, Any]:
        sessions = sorted(self.node.sessions_of(self._user(args)), key=lambda session: session.connected_at)
        rows = [{"id": session.id, "node": self.node.id, "transport": session.conn.transport_name,
                 "vsn": session.conn.wire.serializer.vsn, "remote": session.conn.remote,
                 "connected_at": round(session.connected_at, 3),
                 "topics": sorted(session.channels)[:MAX_TOPICS_SHOWN]}
                for session in sessions[:MAX_CONNECTIONS]]
        return {"connections": rows, "truncated": len(sessions) > MAX_CONNECTIONS}

    def info(self, args: dict[str, Any]) -> dict[str, Any]:
        node = self.node
        by_transport = {"websocket": 0, "longpoll": 0}
        for session in node.sessions:
            name = session.conn.transport_name
            by_transport[name] = by_transport.get(name, 0) + 1
        counts = node.hub.subscriber_counts()
        return {
            "id": node.id, "version": __version__, "started_at": round(node.started_at, 3),
            "uptime_seconds": round(time.time() - node.started_at, 3),
            "connections": {"total": sum(by_transport.values()), **by_transport},
            "topics": len(counts), "subscriptions": sum(counts.values()),
            "broker": {"kind": node.settings.broker.split(":", 1)[0], "up": node.broker.ready},
            "ready": node.ready, "draining": node.draining,
            **self._rates(),
        }

    def topics(self, args: dict[str, Any]) -> dict[str, Any]:
        """This node's first `limit` topics after `cursor` (by name) that start with `prefix`: the first
        `limit` of the cluster are among the union of every node's, so the asker's merge is exact."""
        prefix, cursor, limit = str(args.get("prefix", "")), str(args.get("cursor", "")), int(args.get("limit", 1))
        limit = max(1, min(limit, TOPICS_MAX_LIMIT))
        counts = self.node.hub.subscriber_counts()
        names = sorted(name for name in counts if name.startswith(prefix) and name > cursor)
        rows = []
        for name in names[:limit]:
            topic = parse_topic(name)
            presence = None
            if topic is not None and self.node.presence.tracks(topic):
                metas = self.node.presence.list(name)  # a replicated tracker holds every node's entries
                presence = {"users": len(metas), "connections": sum(len(entries) for entries in metas.values())}
            rows.append([name, counts[name], presence])
        return {"topics": rows, "more": len(names) > limit}


# --- HTTP


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise ApiError(415, "expected Content-Type: application/json")
    raw = await read_body(request, MAX_BODY)
    if raw is None:
        raise ApiError(413, f"body larger than {MAX_BODY} bytes")
    return json_object(raw)


def _user_of(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_USER:
        raise ApiError(400, f"user must be the JWT sub of the user: a non-empty string of at most {MAX_USER} characters")
    return value


def _per_node(answers: dict[str, dict[str, Any]], field: str) -> dict[str, Any]:
    return {node_id: answer.get(field, answer.get("error")) for node_id, answer in sorted(answers.items())}


async def disconnect(request: web.Request) -> web.StreamResponse:
    require_admin_key(request)
    body = await _json_body(request)
    user = _user_of(body.get("user"))
    if not isinstance(body.get("reconnect"), bool):
        raise ApiError(400, "reconnect must be true (the client may reconnect) or false (phoenix.js should not)")
    reason = body.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON):
        raise ApiError(400, f"reason must be a string of at most {MAX_REASON} characters")
    gathered = await request.app[CONTROL].ask(
        "disconnect", {"user": user, "reconnect": body["reconnect"], "reason": reason}, ANSWER_WAIT)
    return json_response({"closed": _per_node(gathered.answers, "count"), "unanswered": gathered.unanswered})


async def unsubscribe(request: web.Request) -> web.StreamResponse:
    require_admin_key(request)
    body = await _json_body(request)
    user = _user_of(body.get("user"))
    topic = body.get("topic")
    if not isinstance(topic, str) or parse_topic(topic) is None:
        raise ApiError(400, f"topic must name a topic ({TOPIC_FAMILIES})")
    gathered = await request.app[CONTROL].ask("unsubscribe", {"user": user, "topic": topic}, ANSWER_WAIT)
    return json_response({"unsubscribed": _per_node(gathered.answers, "count"), "unanswered": gathered.unanswered})


async def connections(request: web.Request) -> web.StreamResponse:
    require_admin_key(request)
    user = _user_of(request.query.get("user"))
    gathered = await request.app[CONTROL].ask("connections", {"user": user}, ANSWER_WAIT)
    rows = [row for answer in gathered.answers.values() for row in answer.get("connections", ())]
    rows.sort(key=lambda row: (row.get("connected_at", 0), row.get("id", "")))
    truncated = any(answer.get("truncated") for answer in gathered.answers.values())
    return json_response({"user": user, "connections": rows, "truncated": truncated,
                          "unanswered": gathered.unanswered})


async def nodes(request: web.Request) -> web.StreamResponse:
    require_admin_key(request)
    control = request.app[CONTROL]
    heartbeats = control.live_peers()
    gathered = await control.ask("node", {}, ANSWER_WAIT)
    now = time.time()
    rows = []
    for node_id, answer in sorted(gathered.answers.items()):
        if "id" in answer:
            rows.append({**answer, "last_heartbeat": round(heartbeats.get(node_id, now), 3)})
    return json_response({"nodes": rows, "unanswered": [
        {"id": node_id, "last_heartbeat": round(heartbeats.get(node_id, 0.0), 3)} for node_id in gathered.unanswered]})


async def topics(request: web.Request) -> web.StreamResponse:
    require_admin_key(request)
    prefix = request.query.get("prefix", "")
    cursor = request.query.get("cursor", "")
    raw_limit = request.query.get("limit", str(TOPICS_LIMIT))
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= TOPICS_MAX_LIMIT:
        raise ApiError(400, f"limit must be a whole number from 1 to {TOPICS_MAX_LIMIT}")
    if len(prefix) > MAX_TOPIC or len(cursor) > MAX_TOPIC:
        raise ApiError(400, f"prefix and cursor must be at most {MAX_TOPIC} characters")
    limit = int(raw_limit)
    gathered = await request.app[CONTROL].ask("topics", {"prefix": prefix, "cursor": cursor, "limit": limit},
                                              ANSWER_WAIT)
    merged: dict[str, dict[str, Any]] = {}
    more = False
    for answer in gathered.answers.values():
        more |= bool(answer.get("more"))
        for name, subscribers, presence in answer.get("topics", ()):
            row = merged.setdefault(name, {"topic": name, "subscribers": 0, "presence": None})
            row["subscribers"] += subscribers
            if presence is not None and (row["presence"] is None
                                         or presence["connections"] > row["presence"]["connections"]):
                row["presence"] = presence  # every replica of a topic's presence holds the whole cluster's
    names = sorted(merged)
    more |= len(names) > limit
    page = [merged[name] for name in names[:limit]]
    next_cursor = page[-1]["topic"] if more and page else None
    return json_response({"topics": page, "next_cursor": next_cursor, "unanswered": gathered.unanswered})


def setup(app: web.Application, node: Node) -> None:
    control = Control(node.id, node.broker, node.settings.node_timeout)
    node.on_control = control.heard
    LocalAdmin(node).register(control)
    app[CONTROL] = control

    async def start(_: web.Application) -> None:
        await control.start()

    async def stop(_: web.Application) -> None:
        await control.close()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    app.router.add_post("/api/admin/disconnect", disconnect)
    app.router.add_post("/api/admin/unsubscribe", unsubscribe)
    app.router.add_get("/api/admin/connections", connections)
    app.router.add_get("/api/admin/nodes", nodes)
    app.router.add_get("/api/admin/topics", topics)
