"""A client of the HTTP API for backends: publish, read presence and history, and the admin API.

    from push_service.client import PushClient
    push = PushClient("http://push:4000", publish_key="...", admin_key="...")
    push.publish("room:lobby:42", "new_msg", {"body": "hi"})
    push.disconnect("user-7", reconnect=False)

`PushClient` uses the standard library only (urllib); `AsyncPushClient` is the same on asyncio
(aiohttp). A 503 (broker down, node draining) is retried with jittered exponential backoff, honouring
Retry-After, a bounded number of times; nothing else is retried, since a publish whose answer was lost
may have been delivered. A 4xx raises a `RequestRefused` subclass naming the status.
"""

from __future__ import annotations

import asyncio
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from push_service.errors import ConfigError, PushServiceError

ATTEMPTS = 4  # tries of a request answered 503, the first included
BACKOFF_BASE = 0.2  # seconds: the n-th retry waits up to BACKOFF_BASE * 2**n, jittered
BACKOFF_CAP = 5.0
RETRY_AFTER_CAP = 30.0  # a Retry-After longer than this is not honoured in full
TIMEOUT = 10.0  # seconds for one request


class PushClientError(PushServiceError):
    """The service answered with an error: `status` and its `error` message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class RequestRefused(PushClientError):
    """A 4xx: the request is wrong (retrying it as is would fail again)."""


class InvalidRequest(RequestRefused):
    """400: a field or parameter is missing or wrong."""


class Unauthorized(RequestRefused):
    """401: no key, or not a valid one."""


class Forbidden(RequestRefused):
    """403: a publish key where an admin key is needed, or the admin API is off."""


class NotFound(RequestRefused):
    """404: no such path (an older server?)."""


class PayloadTooLarge(RequestRefused):
    """413: the body is over the server's limit."""


class Unavailable(PushClientError):
    """503 after every retry: the broker is down or the node drains."""


class ServerError(PushClientError):
    """Another 5xx."""


REFUSALS: dict[int, type[RequestRefused]] = {400: InvalidRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound,
                                             413: PayloadTooLarge}


def error_for(status: int, body: bytes) -> PushClientError:
    try:
        message = str(orjson.loads(body).get("error", ""))
    except (orjson.JSONDecodeError, AttributeError):
        message = body[:200].decode(errors="replace")
    if 400 <= status < 500:
        return REFUSALS.get(status, RequestRefused)(status, message)
    return (Unavailable if status == 503 else ServerError)(status, message)


def backoff(attempt: int, retry_after: str | None) -> float:
    """Seconds before retry number `attempt` (1, 2, ...): Retry-After when the server gave one, else
    full jitter over an exponential bound, so that many backends retrying do not come back together."""
    if retry_after is not None and retry_after.strip().isdigit():
        return min(float(retry_after.strip()), RETRY_AFTER_CAP)
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt))


class _Calls:
    """What both clients send: paths, bodies, which key; transport-free."""

    def __init__(self, url: str, publish_key: str | None, admin_key: str | None, attempts: int,
                 timeout: float) -> None:
        self.url = url.rstrip("/")
        self.publish_key = publish_key
        self.admin_key = admin_key
        self.attempts = max(1, attempts)
        self.timeout = timeout

    def key(self, admin: bool) -> str:
        # An admin key publishes too, so a client given only that one can do everything.
        key = self.admin_key if admin else (self.publish_key or self.admin_key)
        if not key:
            raise ConfigError("admin_key" if admin else "publish_key", "needed for this call")
        return key

    def request(self, method: str, path: str, admin: bool, body: Any = None,
                query: Mapping[str, Any] | None = None) -> tuple[str, str, dict[str, str], bytes | None]:
        url = self.url + path
        params = {name: str(value) for name, value in (query or {}).items() if value is not None}
        if params:
            url += "?" + urllib.parse.urlencode(params)
        headers = {"Authorization": f"Bearer {self.key(admin)}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = "application/json"
        return method, url, headers, data


def _topic_path(prefix: str, topic: str) -> str:
    return prefix + urllib.parse.quote(topic, safe=":")


def _messages(messages: Iterable[Mapping[str, Any] | tuple[str, str, Any]]) -> list[dict[str, Any]]:
    out = []
    for message in messages:
        if isinstance(message, Mapping):
            out.append(dict(message))
        else:
            topic, event, payload = message
            out.append({"topic": topic, "event": event, "payload": payload})
    return out


# The calls, as (method, path, admin?, body, query), shared by both clients.
def _publish(topic: str, event: str, payload: Any) -> tuple[Any, ...]:
    return "POST", "/api/broadcast", False, {"topic": topic, "event": event, "payload": payload}, None


def _batch(messages: Iterable[Mapping[str, Any] | tuple[str, str, Any]]) -> tuple[Any, ...]:
    return "POST", "/api/batch", False, {"messages": _messages(messages)}, None


def _broadcast(topics: Iterable[str], event: str, payload: Any) -> tuple[Any, ...]:
    return _batch((topic, event, payload) for topic in topics)


def _presence(topic: str) -> tuple[Any, ...]:
    return "GET", _topic_path("/api/presence/", topic), False, None, None


def _history(topic: str, since: str | None, limit: int | None) -> tuple[Any, ...]:
    return "GET", _topic_path("/api/history/", topic), False, None, {"since": since, "limit": limit}


def _disconnect(user: str, reconnect: bool, reason: str | None) -> tuple[Any, ...]:
    body: dict[str, Any] = {"user": user, "reconnect": reconnect}
    if reason is not None:
        body["reason"] = reason
    return "POST", "/api/admin/disconnect", True, body, None


def _unsubscribe(user: str, topic: str) -> tuple[Any, ...]:
    return "POST", "/api/admin/unsubscribe", True, {"user": user, "topic": topic}, None


def _connections(user: str) -> tuple[Any, ...]:
    return "GET", "/api/admin/connections", True, None, {"user": user}


def _nodes() -> tuple[Any, ...]:
    return "GET", "/api/admin/nodes", True, None, None


def _topics(prefix: str | None, limit: int | None, cursor: str | None) -> tuple[Any, ...]:
    return "GET", "/api/admin/topics", True, None, {"prefix": prefix, "limit": limit, "cursor": cursor}


class PushClient:
    """Blocking, standard library only. Every method returns the decoded JSON answer."""

    def __init__(self, url: str, publish_key: str | None = None, admin_key: str | None = None, *,
                 attempts: int = ATTEMPTS, timeout: float = TIMEOUT) -> None:
        self._calls = _Calls(url, publish_key, admin_key, attempts, timeout)

    def _call(self, method: str, path: str, admin: bool, body: Any, query: Mapping[str, Any] | None) -> Any:
        method, url, headers, data = self._calls.request(method, path, admin, body, query)
        for attempt in range(1, self._calls.attempts + 1):
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self._calls.timeout) as response:  # noqa: S310
                    return orjson.loads(response.read())
            except urllib.error.HTTPError as exc:
                status, raw, retry_after = exc.code, exc.read(), exc.headers.get("Retry-After")
                exc.close()
            if status != 503 or attempt == self._calls.attempts:
                raise error_for(status, raw)
            time.sleep(backoff(attempt, retry_after))
        raise AssertionError("unreachable")

    def publish(self, topic: str, event: str, payload: Any) -> Any:
        return self._call(*_publish(topic, event, payload))

    def publish_batch(self, messages: Iterable[Mapping[str, Any] | tuple[str, str, Any]]) -> Any:
        """Several (topic, event, payload) at once, in order, as one request."""
        return self._call(*_batch(messages))

    def broadcast(self, topics: Iterable[str], event: str, payload: Any) -> Any:
        """The same event to several topics, as one request."""
        return self._call(*_broadcast(topics, event, payload))

    def presence(self, topic: str) -> Any:
        return self._call(*_presence(topic))

    def history(self, topic: str, since: str | None = None, limit: int | None = None) -> Any:
        return self._call(*_history(topic, since, limit))

    def disconnect(self, user: str, reconnect: bool = False, reason: str | None = None) -> Any:
        return self._call(*_disconnect(user, reconnect, reason))

    def unsubscribe(self, user: str, topic: str) -> Any:
        return self._call(*_unsubscribe(user, topic))

    def connections(self, user: str) -> Any:
        return self._call(*_connections(user))

    def nodes(self) -> Any:
        return self._call(*_nodes())

    def topics(self, prefix: str | None = None, limit: int | None = None, cursor: str | None = None) -> Any:
        return self._call(*_topics(prefix, limit, cursor))


class AsyncPushClient:
    """The same on asyncio (aiohttp); use `async with`, or await close() when done."""

    def __init__(self, url: str, publish_key: str | None = None, admin_key: str | None = None, *,
                 attempts: int = ATTEMPTS, timeout: float = TIMEOUT) -> None:
        self._calls = _Calls(url, publish_key, admin_key, attempts, timeout)
        self._http: Any = None

    async def __aenter__(self) -> AsyncPushClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _call(self, method: str, path: str, admin: bool, body: Any, query: Mapping[str, Any] | None) -> Any:
        import aiohttp  # here: the blocking client needs nothing but the standard library

        method, url, headers, data = self._calls.request(method, path, admin, body, query)
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._calls.timeout))
        for attempt in range(1, self._calls.attempts + 1):
            async with self._http.request(method, url, data=data, headers=headers) as response:
                raw = await response.read()
                if response.status < 300:
                    return orjson.loads(raw)
                status, retry_after = response.status, response.headers.get("Retry-After")
            if status != 503 or attempt == self._calls.attempts:
                raise error_for(status, raw)
            await asyncio.sleep(backoff(attempt, retry_after))
        raise AssertionError("unreachable")

    async def publish(self, topic: str, event: str, payload: Any) -> Any:
        return await self._call(*_publish(topic, event, payload))

    async def publish_batch(self, messages: Iterable[Mapping[str, Any] | tuple[str, str, Any]]) -> Any:
        return await self._call(*_batch(messages))

    async def broadcast(self, topics: Iterable[str], event: str, payload: Any) -> Any:
        return await self._call(*_broadcast(topics, event, payload))

    async def presence(self, topic: str) -> Any:
        return await self._call(*_presence(topic))

    async def history(self, topic: str, since: str | None = None, limit: int | None = None) -> Any:
        return await self._call(*_history(topic, since, limit))

    async def disconnect(self, user: str, reconnect: bool = False, reason: str | None = None) -> Any:
        return await self._call(*_disconnect(user, reconnect, reason))

    async def unsubscribe(self, user: str, topic: str) -> Any:
        return await self._call(*_unsubscribe(user, topic))

    async def connections(self, user: str) -> Any:
        return await self._call(*_connections(user))

    async def nodes(self) -> Any:
        return await self._call(*_nodes())

    async def topics(self, prefix: str | None = None, limit: int | None = None, cursor: str | None = None) -> Any:
        return await self._call(*_topics(prefix, limit, cursor))
