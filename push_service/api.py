"""The HTTP API: publish endpoints guarded by the publish key, health and metrics.

Every answer is JSON with an honest status code: 200 on success, never 200 with an error inside.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import HttpVersion11, web

from push_service import publishing
from push_service.errors import BrokerUnavailable, ClientError
from push_service.history.position import Position
from push_service.http1 import request_id
from push_service.limits import AIOHTTP_CONNECTIONS
from push_service.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from push_service.node import NODE, Node
from push_service.presence.base import Metas, PresenceUnavailable, state_payload
from push_service.publishing import ApiError, check_bearer
from push_service.topics import parse_topic

log = logging.getLogger("push_service.api")

STARTED = web.RequestKey("started", float)  # time.time() when the request arrived
# The status a request counts as when its client left before the answer (nginx's convention).
CLIENT_CLOSED = 499


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


# --- request reading


class RequestTimeout(ClientError):
    """A request body that did not come whole within PUSH_HANDSHAKE_TIMEOUT: the listener answered 408,
    counted it and closed the connection (limits.AiohttpConnection)."""


class ClientGone(ClientError):
    """The client closed its connection before its request body was whole."""


async def read_body(request: web.Request, limit: int) -> bytes | None:
    """The whole body, or None when it is longer than `limit`. The listener's deadline bounds the wait
    (RequestTimeout once it cut the connection); a client that leaves half way raises ClientGone."""
    length = request.content_length
    if length is not None and length > limit:
        return None
    content = request.content
    connection = AIOHTTP_CONNECTIONS.get(request.transport) if request.transport is not None else None
    chunks: list[bytes] = []
    size = 0
    try:
        if content.is_eof():  # the usual small body came with its head: no read (and copy) of the end
            body = content.read_nowait()
            return body if len(body) <= limit else None
        while chunk := await content.read(65536):
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
    except ConnectionError:
        if connection is not None and connection.deadline_passed:
            raise RequestTimeout() from None
        raise ClientGone() from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def require_bearer_key(request: web.Request) -> None:
    """For GET endpoints: the publish key must come as `Authorization: Bearer <key>`."""
    header = request.headers.get("Authorization")
    if header is None:
        raise ApiError(401, "missing publish key (Authorization: Bearer <key>)")
    check_bearer(request.app[NODE].publish_keys, header)


# --- handlers

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def publish_handler(route: publishing.Route) -> Handler:
    """A publish path, as aiohttp serves it (a connection whose first request was a publish is served
    by the front door instead, by the same rules: see publishing.py)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        node: Node = request.app[NODE]
        authorization = request.headers.get("Authorization")
        publishing.check_head(node.publish_keys, authorization, request.content_type)
        raw = await read_body(request, node.settings.max_publish_bytes)
        if raw is None:
            raise publishing.too_large(node.settings.max_publish_bytes)
        body = publishing.authorized_object(node.publish_keys, authorization, raw)
        published, delivered = publishing.publish(node, route, body, request[STARTED])
        if not isinstance(delivered, int):
            delivered = await delivered
        return web.Response(body=publishing.answer(published, delivered), content_type="application/json")

    return handler


def _presence_topic(request: web.Request) -> str:
    require_bearer_key(request)
    node: Node = request.app[NODE]
    name = request.match_info["topic"]
    topic = parse_topic(name)
    if topic is None:
        raise ApiError(400, f"unknown topic family {name!r} (room:lobby:<id>, room:topic:<id>, room:<id>, user:<id>)")
    if not node.presence.tracks(topic):
        raise ApiError(400, f"presence is not tracked for {topic.family} topics (PUSH_PRESENCE_TOPICS)")
    return name


async def _cluster_presence(request: web.Request, topic: str) -> Metas:
    """The topic's presence on every node, whether or not this one serves the topic."""
    node: Node = request.app[NODE]
    try:
        return await node.presence.cluster_list(topic)
    except PresenceUnavailable:
        raise ApiError(503, "broker unavailable") from None


async def presence_state(request: web.Request) -> web.StreamResponse:
    topic = _presence_topic(request)
    metas = await _cluster_presence(request, topic)
    return json_response({"topic": topic, "presences": state_payload(metas)})


async def presence_count(request: web.Request) -> web.StreamResponse:
    topic = _presence_topic(request)
    metas = await _cluster_presence(request, topic)
    return json_response({"topic": topic, "users": len(metas),
                          "connections": sum(len(entries) for entries in metas.values())})


async def history(request: web.Request) -> web.StreamResponse:
    """What a backend (or a client's backend-side refetch) can read back: `since` a position, or the latest."""
    require_bearer_key(request)
    node: Node = request.app[NODE]
    topic = request.match_info["topic"]
    if parse_topic(topic) is None:
        raise ApiError(400, f"unknown topic family {topic!r} (room:lobby:<id>, room:topic:<id>, room:<id>, user:<id>)")
    if not node.history_enabled:
        raise ApiError(400, "history is off (PUSH_HISTORY_SIZE=0)")
    try:
        since = Position.parse(request.query["since"]) if "since" in request.query else None
    except ValueError as exc:
        raise ApiError(400, f"since: {exc}") from None
    raw_limit = request.query.get("limit", str(node.settings.history_size))
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= node.settings.history_size:
        raise ApiError(400, f"limit must be a whole number from 1 to {node.settings.history_size} (PUSH_HISTORY_SIZE)")
    try:
        recovery = await node.history(topic, since, int(raw_limit))
    except BrokerUnavailable:
        raise ApiError(503, "broker unavailable") from None
    assert recovery is not None
    messages = [{"position": str(b.position), "event": b.event, "payload": orjson.Fragment(b.payload_json)}
                for b in recovery.messages]
    return json_response({"topic": topic, "position": str(recovery.position), "recovered": recovery.recovered,
                          "messages": messages})


async def health(request: web.Request) -> web.StreamResponse:
    return json_response({"status": "ok"})


async def ready(request: web.Request) -> web.StreamResponse:
    node: Node = request.app[NODE]
    if node.ready:
        return json_response({"status": "ready"})
    error = "draining" if node.draining else "broker unavailable"
    return json_response({"status": "unavailable", "error": error}, status=503)


async def metrics(request: web.Request) -> web.StreamResponse:
    node: Node = request.app[NODE]
    return web.Response(body=node.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})


def add_routes(app: web.Application, node: Node) -> None:
    for path, route in publishing.routes(node.settings).items():
        app.router.add_post(path, publish_handler(route))
    app.router.add_get("/api/presence/{topic}", presence_state)
    app.router.add_get("/api/presence/{topic}/count", presence_count)
    app.router.add_get("/api/history/{topic}", history)
    app.router.add_get("/api/health", health)
    app.router.add_get("/healthz", health)
    app.router.add_get("/readyz", ready)
    app.router.add_get("/metrics", metrics)
    for added in app.router.routes():  # a 0 series per route from the start, as metrics.py explains
        if added.method != "HEAD" and added.resource is not None:
            node.metrics.http_requests.labels(added.resource.canonical, added.method, 200)


@web.middleware
async def errors_and_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    """JSON errors for every failure, a request id on every answer, and one request counter
    labelled by route, not by raw path."""
    request[STARTED] = time.time()  # wall clock: carried to other nodes with the broadcast
    answer_id = request_id(request.headers.get("X-Request-Id"))
    route = request.match_info.route.resource
    label = route.canonical if route is not None else "unmatched"
    connection = AIOHTTP_CONNECTIONS.get(request.transport) if request.transport is not None else None
    if connection is not None:
        connection.handled += 1
        connection.handling = connection.handled  # for the deadline of a request pipelined behind this one
    try:
        if request.version < HttpVersion11 and "Transfer-Encoding" in request.headers:
            # RFC 9112 6.1: its framing is faulty (HTTP/1.0 has no chunked bodies); llhttp lets it through.
            request.protocol.keep_alive(False)
            raise ApiError(400, "bad request: Transfer-Encoding in an HTTP/1.0 request")
        response = await handler(request)
    except ApiError as exc:
        response = json_response({"error": exc.message}, exc.status)
        if exc.retry_after is not None:
            response.headers["Retry-After"] = str(exc.retry_after)
        publishing.log_refusal(exc, answer_id, label, request.method)
    except web.HTTPException as exc:  # 404, 405 from the router
        response = json_response({"error": exc.reason.lower()}, exc.status)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
    except RequestTimeout:
        # The listener answered 408, counted it and closed the connection: this is for the request counter.
        response = json_response({"error": "request not received in time"}, 408)
    except ClientGone:
        # The client left mid-body: its doing, and nobody reads an answer.
        request.app[NODE].metrics.client_errors.labels("client_abort").inc()
        log.info("client left mid-request", extra={"event": "http_client_abort", "request_id": answer_id,
                                                    "route": label})
        response = json_response({"error": "client closed the connection"}, CLIENT_CLOSED)
    except Exception:
        log.exception("unhandled error", extra={"event": "http_error", "request_id": answer_id, "route": label})
        response = json_response({"error": "internal server error"}, 500)
    finally:
        if connection is not None:
            connection.handling = 0
    if not response.prepared:  # an upgraded WebSocket has sent its headers already
        response.headers["X-Request-Id"] = answer_id
    node: Node = request.app[NODE]
    node.metrics.http_requests.labels(label, request.method, response.status).inc()
    return response
