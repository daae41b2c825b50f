"""The live console: a static page at /console and the JSON it reads, all behind the admin key.

* `GET /console` (+ its scripts and style.css, all in STATIC): the page. It holds no secret; the operator types the admin
  key (PUSH_ADMIN_KEY, which publishes too), which the page keeps in sessionStorage and sends as
  `Authorization: Bearer` on every call.
* `GET /api/stats`: this node's counters and gauges as plain numbers (the page derives rates from
  two successive answers).
* `GET /api/topics`: topics with local subscribers, with their presence counts where tracked.
* `GET /api/console/watch?topic=T`: a stream of what is broadcast on T (NDJSON, one object a line),
  through a server-side subscription: the watcher is no client connection, joins nothing, is not
  tracked in presence and is not counted in `push_connections`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from push_service.admin import require_admin_key
from push_service.api import ApiError, json_response
from push_service.messages import Broadcast, Run, Wire
from push_service.node import Node
from push_service.protocol import V2
from push_service.topics import parse_topic

STATIC = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "charts.js": "text/javascript",
    "format.js": "text/javascript",
    "topics.js": "text/javascript",
    "users.js": "text/javascript",
    "style.css": "text/css",
}
# The page loads nothing from elsewhere and talks only to this origin.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
TOPICS_LIMIT = 100
TOPICS_MAX_LIMIT = 1000
WATCH_KEEPALIVE = 10.0  # seconds between keepalive lines when nothing else is sent
WATCH_CHECK = 1.0  # how often a watch checks that its console is still there
WATCH_QUEUE = 1000  # frames a slow watcher may lag behind; more are dropped and counted
# What a watcher sees: the v2 frame a subscribed client receives.
WATCH_WIRE = Wire(V2, lambda data: data)

COUNTERS = {
    "joins": "push_joins_total",
    "leaves": "push_leaves_total",
    "joins_refused": "push_joins_refused_total",
    "connects_refused": "push_connects_refused_total",
    "disconnects": "push_disconnects_total",
    "client_errors": "push_client_errors_total",
    "messages_published": "push_messages_published_total",
    "frames_delivered": "push_frames_delivered_total",
    "slow_consumer_disconnects": "push_slow_consumer_disconnects_total",
    "presence_diffs": "push_presence_diffs_total",
    "typing_dropped": "push_typing_dropped_total",
    "broker_reconnects": "push_broker_reconnects_total",
}


def _static(name: str) -> bytes:
    return resources.files("push_service.console").joinpath(name).read_bytes()


def _samples(node: Node) -> tuple[dict[str, float], dict[str, float]]:
    """Every sample summed by name, and push_connections by transport."""
    totals: dict[str, float] = {}
    connections: dict[str, float] = {}
    for family in node.metrics.registry.collect():
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
            if sample.name == "push_connections":
                transport = sample.labels.get("transport", "")
                connections[transport] = connections.get(transport, 0.0) + sample.value
    return totals, connections


def _int(value: float) -> int:
    return int(round(value))


def stats_of(node: Node, started: float) -> dict[str, Any]:
    totals, by_transport = _samples(node)
    connections = {"websocket": 0, "longpoll": 0}
    connections.update({name: _int(value) for name, value in by_transport.items()})
    return {
        "node": node.id,
        "time": time.time(),
        "uptime_seconds": round(time.monotonic() - started, 3),
        "ready": node.ready,
        "draining": node.draining,
        "broker": {
            "kind": node.settings.broker.split(":", 1)[0],
            "up": bool(totals.get("push_broker_up", 0.0)),
            "reconnects": _int(totals.get("push_broker_reconnects_total", 0.0)),
        },
        "connections": {"total": sum(connections.values()), **connections},
        "topics": node.hub.topic_count,
        "presence_topics": node.presence.tracker.topic_count,
        "presences": _int(totals.get("push_presences", 0.0)),
        "counters": {name: _int(totals.get(metric, 0.0)) for name, metric in COUNTERS.items()},
    }


def topics_of(node: Node, limit: int) -> dict[str, Any]:
    counts = node.hub.subscriber_counts()
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    rows = []
    for name, subscribers in ranked[:limit]:
        topic = parse_topic(name)
        presence = None
        if topic is not None and node.presence.tracks(topic):
            metas = node.presence.list(name)
            presence = {"users": len(metas), "connections": sum(len(entries) for entries in metas.values())}
        rows.append({"topic": name, "subscribers": subscribers, "presence": presence})
    return {"total": len(counts), "truncated": len(ranked) > limit, "topics": rows}


class TopicWatcher:
    """A hub subscriber that forwards the frames of one topic to a console stream."""

    __slots__ = ("frames", "dropped", "ready", "_signal")

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.dropped = 0
        self.ready = False
        self._signal = asyncio.Event()

    def deliver(self, broadcast: Broadcast | Run) -> None:
        for part in broadcast.parts:
            if len(self.frames) >= WATCH_QUEUE:
                self.dropped += 1
            else:
                self.frames.append(part.encoded(WATCH_WIRE))
        self._signal.set()

    def subscribed(self, topic: str) -> None:
        self.ready = True
        self._signal.set()

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._signal.wait(), timeout)
        except TimeoutError:
            pass
        self._signal.clear()


def _lines(watcher: TopicWatcher, announced: bool) -> Iterable[bytes]:
    now = orjson.dumps(round(time.time(), 3))
    if watcher.ready and not announced:
        yield b'{"subscribed":true}\n'
    frames, watcher.frames = watcher.frames, []
    for frame in frames:
        yield b'{"at":' + now + b',"frame":' + frame + b"}\n"
    if watcher.dropped:
        yield b'{"dropped":' + str(watcher.dropped).encode() + b"}\n"
        watcher.dropped = 0


def setup(app: web.Application, node: Node) -> None:
    started = time.monotonic()
    pages = {name: _static(name) for name in STATIC}

    def page(name: str) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            response = web.Response(body=pages[name], content_type=STATIC[name], charset="utf-8")
            response.headers["Cache-Control"] = "no-cache"
            response.headers["X-Content-Type-Options"] = "nosniff"
            response.headers["Referrer-Policy"] = "no-referrer"
            if name == "index.html":
                response.headers["Content-Security-Policy"] = CSP
                response.headers["X-Frame-Options"] = "DENY"
            return response
        return handler

    async def stats(request: web.Request) -> web.StreamResponse:
        require_admin_key(request)
        return json_response(stats_of(node, started))

    async def topics(request: web.Request) -> web.StreamResponse:
        require_admin_key(request)
        raw = request.query.get("limit", str(TOPICS_LIMIT))
        try:
            limit = int(raw)
        except ValueError:
            limit = 0
        if not 1 <= limit <= TOPICS_MAX_LIMIT:
            raise ApiError(400, f"limit must be a whole number from 1 to {TOPICS_MAX_LIMIT}")
        return json_response(topics_of(node, limit))

    async def watch(request: web.Request) -> web.StreamResponse:
        require_admin_key(request)
        name = request.query.get("topic", "")
        if parse_topic(name) is None:
            raise ApiError(400, "query parameter 'topic' must name a topic (room:lobby:<id>, room:topic:<id>, "
                                "room:<id>, user:<id>)")
        if node.draining:
            raise ApiError(503, "node is draining")
        watcher = TopicWatcher()
        response = web.StreamResponse(headers={
            "Content-Type": "application/x-ndjson", "Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        # The node calls watcher.subscribed() once the broker has the topic; it only needs deliver().
        if node.subscribe(name, watcher):  # type: ignore[arg-type]
            watcher.ready = True
        try:
            await response.prepare(request)
            announced = False
            written = -WATCH_KEEPALIVE
            while not node.draining:
                transport = request.transport
                if transport is None or transport.is_closing():
                    break  # the console went away
                chunk = b"".join(_lines(watcher, announced))
                announced = announced or watcher.ready
                now = time.monotonic()
                if not chunk and now - written >= WATCH_KEEPALIVE:
                    chunk = b'{"keepalive":true}\n'
                if chunk:
                    await response.write(chunk)
                    written = now
                await watcher.wait(WATCH_CHECK)
        except ConnectionError:
            pass  # the console went away
        finally:
            node.unsubscribe(name, watcher)  # type: ignore[arg-type]
        return response

    app.router.add_get("/console", page("index.html"))
    for name in STATIC:
        if name != "index.html":
            app.router.add_get(f"/console/{name}", page(name))
    app.router.add_get("/api/stats", stats)
    app.router.add_get("/api/topics", topics)
    app.router.add_get("/api/console/watch", watch)
