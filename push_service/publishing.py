"""The publish API's rules, without HTTP: which path publishes what, who may, what a body must hold,
and the answer. Both HTTP front ends apply them: aiohttp's handlers (api.py) and the front door's
keep-alive publish connection (frontdoor.py), so a publish is judged the same either way.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

import orjson

from push_service.auth import PublishKeys
from push_service.config import Settings
from push_service.errors import BrokerUnavailable, ClientError
from push_service.messages import Broadcast
from push_service.node import Node, NodeBehind, NodeDraining
from push_service.topics import COMMUNITY, LOBBY, THREAD, USER, is_topic, topic_for

log = logging.getLogger("push_service.api")

NEW_MSG = "new_msg"
# Client-side Phoenix control events: a broadcast of one of these would break clients' channels.
RESERVED_EVENT_PREFIX = "phx_"
MAX_EVENT_BYTES = 255


class ApiError(ClientError):
    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after  # seconds, sent as Retry-After


def log_refusal(error: ApiError, request_id: str, route: str, method: str) -> None:
    level = logging.WARNING if error.status >= 500 else logging.INFO
    if log.isEnabledFor(level):  # the extra dict is not built for a record that would be dropped
        log.log(level, "request refused", extra={"event": "http_refused", "request_id": request_id, "route": route,
                                                 "method": method, "status": error.status, "error": error.message})


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"body is larger than {limit} bytes (PUSH_MAX_PUBLISH_BYTES)")


# Topics published to lately: a backend publishes to the same ones over and over. Emptied when full,
# so that many distinct topics cost a plain check each, not a cache's bookkeeping as well.
_KNOWN_TOPICS: set[str] = set()
_KNOWN_TOPICS_MAX = 4096


def _is_topic(name: str) -> bool:
    """Whether a topic name is one we serve (topics.is_topic), remembered while the set has room."""
    if name in _KNOWN_TOPICS:
        return True
    if not is_topic(name):
        return False
    if len(_KNOWN_TOPICS) >= _KNOWN_TOPICS_MAX:
        _KNOWN_TOPICS.clear()
    _KNOWN_TOPICS.add(name)
    return True


# --- who may publish, and the body


def check_bearer(keys: PublishKeys, header: str) -> None:
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not keys.check(key.strip()):
        raise ApiError(401, "invalid publish key")


def check_head(keys: PublishKeys, authorization: str | None, mimetype: str) -> None:
    """What can be judged before the body is read: a given Authorization header, and the content type
    (`mimetype`: the Content-Type without parameters, lower case)."""
    if authorization is not None:
        check_bearer(keys, authorization)
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise ApiError(415, "expected Content-Type: application/json")


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object; anything else is a 400 saying what is wrong."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    return body


def authorized_object(keys: PublishKeys, authorization: str | None, raw: bytes) -> dict[str, Any]:
    """The JSON object body, once the key is known good: from the Authorization header (checked by
    check_head) or, as the existing backend sends it, the body's `token`, which is never broadcast."""
    body = json_object(raw)
    token = body.pop("token", "")
    if authorization is None:
        if not keys.check(token if isinstance(token, str) else None):
            raise ApiError(401, "missing or invalid publish key (Authorization: Bearer <key>, or the body's token)")
    elif not isinstance(token, str):  # null included: the header decides, but a body is held to the spec
        raise ApiError(400, "field 'token' must be a string (the publish key)")
    return body


# --- what each path publishes


class Route:
    """One publish path: its metrics label and how its body becomes broadcasts."""

    __slots__ = ("path", "endpoint", "broadcasts")

    def __init__(self, path: str, endpoint: str,
                 broadcasts: Callable[[dict[str, Any], float], list[Broadcast]]) -> None:
        self.path = path
        self.endpoint = endpoint  # the `endpoint` label of push_messages_published_total
        self.broadcasts = broadcasts  # (body, started) -> broadcasts, ApiError if the body is wrong


def _id_field(body: dict[str, Any], field: str, hint: str = "") -> str:
    value = body.get(field)
    if value is None:
        raise ApiError(400, f"missing field {field!r}{hint}")
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        if isinstance(value, float) and abs(value) >= 2.0**63:  # orjson reads an integer beyond 64 bits so
            raise ApiError(400, f"field {field!r} must be a non-empty string or an integer of at most 64 bits "
                                "(send a larger id as a string)")
        raise ApiError(400, f"field {field!r} must be a non-empty string or an integer")
    return str(value)


def _family(family: str, field: str, hint: str = "") -> Callable[[dict[str, Any], float], list[Broadcast]]:
    """A Linen-style endpoint: `new_msg` with the body (minus token) on the family's topic."""

    def broadcasts(body: dict[str, Any], started: float) -> list[Broadcast]:
        topic = topic_for(family, _id_field(body, field, hint))
        if not _is_topic(topic):
            raise ApiError(400, f"field {field!r} is too long: a topic is at most 255 bytes")
        return [Broadcast(topic, NEW_MSG, orjson.dumps(body), started)]

    return broadcasts


def _where(index: int | None) -> str:
    # Only formatted for an error: a valid batch item costs no string.
    return "body" if index is None else f"messages[{index}]"


BAD_EVENT = "field 'event' must be a non-empty string of at most 255 bytes"


@functools.lru_cache(maxsize=1024)
def _event_problem(event: str) -> str | None:
    """What is wrong with an event name, or None, remembered: a backend sends the same few events."""
    if not event or len(event.encode()) > MAX_EVENT_BYTES:
        return BAD_EVENT
    if event.startswith(RESERVED_EVENT_PREFIX):
        return "events starting with 'phx_' are reserved for the protocol"
    return None


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
    if not isinstance(event, str):
        raise ApiError(400, f"{_where(index)}: {BAD_EVENT}")
    problem = _event_problem(event)
    if problem is not None:
        raise ApiError(400, f"{_where(index)}: {problem}")
    if not isinstance(payload, dict):
        raise ApiError(400, f"{_where(index)}: field 'payload' must be an object")
    return Broadcast(topic, event, orjson.dumps(payload), started)  # as Broadcast.of, one call less per publish


def _broadcast(body: dict[str, Any], started: float) -> list[Broadcast]:
    return [_broadcast_from(body, None, started)]


def _batch(body: dict[str, Any], started: float) -> list[Broadcast]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "field 'messages' must be a non-empty list of {topic, event, payload}")
    # Validate all before publishing any: a batch is taken whole or not at all.
    return [_broadcast_from(item, index, started) for index, item in enumerate(messages)]


def routes(settings: Settings) -> dict[str, Route]:
    """Path -> Route, for every publish path."""
    family, field = (THREAD, "thread_id") if settings.api_message_topic == "thread" else (LOBBY, "channel_id")
    hint = f" (PUSH_API_MESSAGE_TOPIC={settings.api_message_topic} routes /api/message by it)"
    table = [
        Route("/api/message", "message", _family(family, field, hint)),
        Route("/api/channel", "channel", _family(LOBBY, "channel_id")),
        Route("/api/thread", "thread", _family(THREAD, "thread_id")),
        Route("/api/community", "community", _family(COMMUNITY, "community_id")),
        Route("/api/user", "user", _family(USER, "user_id")),
        Route("/api/broadcast", "broadcast", _broadcast),
        Route("/api/batch", "batch", _batch),
    ]
    return {route.path: route for route in table}


# --- publishing, and the answer


def publish(node: Node, route: Route, body: dict[str, Any], started: float) -> tuple[int, int, asyncio.Future[None]]:
    """Publish what the body asks for: (messages published, local deliveries, the broker's answer: see
    `check_accepted`, `await_accepted`). ApiError for a bad body, or 503 when this node or its broker
    cannot take it."""
    broadcasts = route.broadcasts(body, started)
    try:
        delivered, accepted = node.publish(broadcasts)
    except NodeDraining:
        raise ApiError(503, "node is draining; retry on another replica") from None
    except NodeBehind as behind:
        raise ApiError(503, f"{behind}, more than PUSH_MAX_DELIVERY_LAG: retry later",
                       behind.retry_after) from None
    except BrokerUnavailable:
        raise _broker_unavailable() from None
    return len(broadcasts), delivered, accepted


def check_accepted(node: Node, route: Route, published: int, accepted: asyncio.Future[None]) -> None:
    """The broker has answered: counted when it took the publish, else 503."""
    try:
        accepted.result()
    except BrokerUnavailable:
        raise _broker_unavailable() from None
    node.count_published(route.endpoint, published)


async def await_accepted(node: Node, route: Route, published: int, accepted: asyncio.Future[None]) -> None:
    """`check_accepted`, once the broker has answered."""
    try:
        await accepted
    except BrokerUnavailable:
        pass  # check_accepted answers it
    check_accepted(node, route, published, accepted)


def _broker_unavailable() -> ApiError:
    return ApiError(503, "broker unavailable")


def answer(published: int, delivered: int) -> bytes:
    # "status" mirrors the old service's body so backends that read it keep working. The bytes orjson would
    # write for these integers, formatted without building a dict: every publish is answered.
    return b'{"status":200,"published":%d,"delivered":%d}' % (published, delivered)
