"""The HTTP API: publish endpoints guarded by the publish key, health and metrics.

Every answer is JSON with an honest status code: 200 on success, never 200 with an error inside.
"""

from __future__ import annotations

import functools
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from push_service.broker import BrokerUnavailable
from push_service.history.position import Position
from push_service.hub import Broadcast
from push_service.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from push_service.node import NODE, Node, NodeDraining
from push_service.presence.base import state_payload
from push_service.topics import COMMUNITY, LOBBY, THREAD, USER, parse_topic, topic_for

log = logging.getLogger("push_service.api")

NEW_MSG = "new_msg"
# Client-side Phoenix control events: a broadcast of one of these would break clients' channels.
RESERVED_EVENT_PREFIX = "phx_"
STARTED = web.RequestKey("started", float)  # time.time() when the request arrived
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # a caller's X-Request-Id is kept when it looks like one
MAX_EVENT_BYTES = 255


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def _new_request_id() -> str:
    # A correlation id, not a secret: the random module's generator (reseeded in a forked child)
    # spares the getrandom() system call secrets.token_hex makes on every request.
    return f"{random.getrandbits(64):016x}"


@functools.lru_cache(maxsize=4096)
def _is_topic(name: str) -> bool:
    """parse_topic(name) is not None, remembered: a backend publishes to the same topics over and over,
    and parsing builds a Topic each time (about 1 µs, a quarter of a batch's cost per message)."""
    return parse_topic(name) is not None


# --- request reading


async def _read_body(request: web.Request, limit: int) -> bytes:
    length = request.content_length
    if length is not None and length > limit:
        raise ApiError(413, f"body is larger than {limit} bytes (PUSH_MAX_PUBLISH_BYTES)")
    content = request.content
    chunks: list[bytes] = []
    size = 0
    while chunk := await content.read(65536):
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"body is larger than {limit} bytes (PUSH_MAX_PUBLISH_BYTES)")
        chunks.append(chunk)
        if content.at_eof():  # the usual small body comes whole: no read (and copy) just to hear the end
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _check_bearer_key(request: web.Request, header: str) -> None:
    node: Node = request.app[NODE]
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not node.publish_keys.check(key.strip()):
        raise ApiError(401, "invalid publish key")


def require_bearer_key(request: web.Request) -> None:
    """For GET endpoints: the publish key must come as `Authorization: Bearer <key>`."""
    header = request.headers.get("Authorization")
    if header is None:
        raise ApiError(401, "missing publish key (Authorization: Bearer <key>)")
    _check_bearer_key(request, header)


async def read_authorized_object(request: web.Request) -> dict[str, Any]:
    """The JSON object body of a publish request, once the publish key is checked."""
    node: Node = request.app[NODE]
    header = request.headers.get("Authorization")
    if header is not None:
        _check_bearer_key(request, header)
    mimetype = request.content_type
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise ApiError(415, "expected Content-Type: application/json")
    raw = await _read_body(request, node.settings.max_publish_bytes)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    # The existing backend sends the key as the body's `token`; it is never broadcast.
    token = body.pop("token", None)
    if header is None and not node.publish_keys.check(token if isinstance(token, str) else None):
        raise ApiError(401, "missing or invalid publish key (Authorization: Bearer <key>, or the body's token)")
    return body


def _id_field(body: dict[str, Any], field: str, hint: str = "") -> str:
    value = body.get(field)
    if value is None:
        raise ApiError(400, f"missing field {field!r}{hint}")
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise ApiError(400, f"field {field!r} must be a non-empty string or an integer")
    return str(value)


def _broadcast_from(item: Any, index: int | None, started: float) -> Broadcast:
    """One {topic, event, payload} object: the body of /api/broadcast (index None) or messages[index]
    of /api/batch."""
    if not isinstance(item, dict):
        raise ApiError(400, f"{_where(index)} must be an object with topic, event and payload")
    topic, event, payload = item.get("topic"), item.get("event"), item.get("payload", {})
    if not isinstance(topic, str) or not topic:
        raise ApiError(400, f"{_where(index)}: field 'topic' must be a non-empty string")
    if not _is_topic(topic):
        raise ApiError(400, f"{_where(index)}: unknown topic family {topic!r} (room:lobby:<id>, room:topic:<id>, "
                            "room:<id>, user:<id>)")
    if not isinstance(event, str) or not event or len(event.encode()) > MAX_EVENT_BYTES:
        raise ApiError(400, f"{_where(index)}: field 'event' must be a non-empty string of at most 255 bytes")
    if event.startswith(RESERVED_EVENT_PREFIX):
        raise ApiError(400, f"{_where(index)}: events starting with 'phx_' are reserved for the protocol")
    if not isinstance(payload, dict):
        raise ApiError(400, f"{_where(index)}: field 'payload' must be an object")
    return Broadcast.of(topic, event, payload, started)


def _where(index: int | None) -> str:
    # Only formatted for an error: a valid batch item costs no string.
    return "body" if index is None else f"messages[{index}]"


async def _publish(request: web.Request, broadcasts: list[Broadcast], endpoint: str) -> web.Response:
    node: Node = request.app[NODE]
    try:
        delivered = await node.publish(broadcasts, endpoint)
    except NodeDraining:
        raise ApiError(503, "node is draining; retry on another replica") from None
    except BrokerUnavailable:
        raise ApiError(503, "broker unavailable") from None
    # "status" mirrors the old service's body so backends that read it keep working.
    return json_response({"status": 200, "published": len(broadcasts), "delivered": delivered})


# --- handlers

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def family_endpoint(family: str, field: str, endpoint: str, hint: str = "") -> Handler:
    """A Linen-style endpoint: `new_msg` with the body (minus token) on the family's topic."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await read_authorized_object(request)
        topic = topic_for(family, _id_field(body, field, hint))
        if not _is_topic(topic):
            raise ApiError(400, f"field {field!r} is too long: a topic is at most 255 bytes")
        return await _publish(request, [Broadcast.of(topic, NEW_MSG, body, request[STARTED])], endpoint)

    return handler


async def broadcast(request: web.Request) -> web.StreamResponse:
    body = await read_authorized_object(request)
    return await _publish(request, [_broadcast_from(body, None, request[STARTED])], "broadcast")


async def batch(request: web.Request) -> web.StreamResponse:
    body = await read_authorized_object(request)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "field 'messages' must be a non-empty list of {topic, event, payload}")
    started = request[STARTED]
    # Validate all before publishing any: a batch is taken whole or not at all.
    broadcasts = [_broadcast_from(item, index, started) for index, item in enumerate(messages)]
    return await _publish(request, broadcasts, "batch")


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


async def presence_state(request: web.Request) -> web.StreamResponse:
    topic = _presence_topic(request)
    node: Node = request.app[NODE]
    return json_response({"topic": topic, "presences": state_payload(node.presence.list(topic))})


async def presence_count(request: web.Request) -> web.StreamResponse:
    topic = _presence_topic(request)
    node: Node = request.app[NODE]
    metas = node.presence.list(topic)
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
    message_family, message_field = (
        (THREAD, "thread_id") if node.settings.api_message_topic == "thread" else (LOBBY, "channel_id"))
    message_hint = f" (PUSH_API_MESSAGE_TOPIC={node.settings.api_message_topic} routes /api/message by it)"
    app.router.add_post("/api/message", family_endpoint(message_family, message_field, "message", message_hint))
    app.router.add_post("/api/channel", family_endpoint(LOBBY, "channel_id", "channel"))
    app.router.add_post("/api/thread", family_endpoint(THREAD, "thread_id", "thread"))
    app.router.add_post("/api/community", family_endpoint(COMMUNITY, "community_id", "community"))
    app.router.add_post("/api/user", family_endpoint(USER, "user_id", "user"))
    app.router.add_post("/api/broadcast", broadcast)
    app.router.add_post("/api/batch", batch)
    app.router.add_get("/api/presence/{topic}", presence_state)
    app.router.add_get("/api/presence/{topic}/count", presence_count)
    app.router.add_get("/api/history/{topic}", history)
    app.router.add_get("/api/health", health)
    app.router.add_get("/healthz", health)
    app.router.add_get("/readyz", ready)
    app.router.add_get("/metrics", metrics)


@web.middleware
async def errors_and_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    """JSON errors for every failure, a request id on every answer, and one request counter
    labelled by route, not by raw path."""
    request[STARTED] = time.time()  # wall clock: carried to other nodes with the broadcast
    given = request.headers.get("X-Request-Id")
    request_id = given if given is not None and REQUEST_ID.fullmatch(given) else _new_request_id()
    route = request.match_info.route.resource
    label = route.canonical if route is not None else "unmatched"
    try:
        response = await handler(request)
    except ApiError as exc:
        response = json_response({"error": exc.message}, exc.status)
        level = logging.WARNING if exc.status >= 500 else logging.INFO
        if log.isEnabledFor(level):  # the extra dict is not built for a record that would be dropped
            log.log(level, "request refused", extra={"event": "http_refused", "request_id": request_id,
                                                     "route": label, "method": request.method,
                                                     "status": exc.status, "error": exc.message})
    except web.HTTPException as exc:  # 404, 405 from the router
        response = json_response({"error": exc.reason.lower()}, exc.status)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
    except Exception:
        log.exception("unhandled error", extra={"event": "http_error", "request_id": request_id, "route": label})
        response = json_response({"error": "internal server error"}, 500)
    if not response.prepared:  # an upgraded WebSocket has sent its headers already
        response.headers["X-Request-Id"] = request_id
    node: Node = request.app[NODE]
    node.metrics.http_request_count(label, request.method, response.status).inc()
    return response
