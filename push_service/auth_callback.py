"""Auth by backend callback, for backends that do not sign our JWTs (issue 18, part 4).

PUSH_AUTH_CONNECT_URL is asked who a client is when its token is not one of our valid JWTs (or always,
with PUSH_AUTH_MODE=callback); PUSH_AUTH_JOIN_URL whether a user may join a topic. Linen's old service
asked its backend the same way (`/api/jwt/who`, `/api/jwt/can`), so its answer shape is accepted too:
a 200 whose body is the user id alone.

Bounded, whatever the backend or the clients do: at most PUSH_AUTH_MAX_CONCURRENCY calls in flight and
QUEUE_FACTOR times as many waiting (past that: refused at once, `overload`); every call, its wait
included, ends within PUSH_AUTH_TIMEOUT; an answer is read up to MAX_ANSWER_BYTES; concurrent asks with
the same key share one call; answers (admits and refusals, never failures) are remembered for
PUSH_AUTH_CACHE_SECONDS in at most CACHE_SIZE entries keyed by a hash, so a reconnect storm of N clients
holding K distinct tokens costs the backend K calls. The publish key goes in a header, never in a URL or
a log line, and neither do tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

from push_service.auth import Identity
from push_service.bounded import with_room
from push_service.config import Settings
from push_service.errors import AuthError
from push_service.metrics import AUTH_CALLBACK_OUTCOMES as OUTCOMES
from push_service.metrics import Metrics

log = logging.getLogger("push_service.auth_callback")

KEY_HEADER = "X-Push-Service-Key"
MAX_ANSWER_BYTES = 64 * 1024
MAX_SUB = 512  # characters of a `sub` from the backend: what the admin API takes as a user
CACHE_SIZE = 10_000
QUEUE_FACTOR = 4  # calls waiting for a slot, per slot
CONNECT, JOIN = "connect", "join"
ADMIT, REFUSE, ERROR, TIMEOUT, OVERLOAD = "admit", "refuse", "error", "timeout", "overload"
# What a client's join error says (phoenix.js retries a refused join; "unauthorized" is Linen's word).
UNAUTHORIZED = "unauthorized"
UNAVAILABLE = "auth backend unavailable"

# (outcome, what it carries: the Identity of an admit at connect, else why, for the log)
Answer = tuple[str, Any]


class AuthBackendUnavailable(AuthError):
    """The auth backend gave no usable answer (an error, a timeout, or too many calls waiting): the client
    is refused as after a passing failure (503), not as unauthorized."""


class AuthAnswerInvalid(AuthError):
    """A 200 from the auth backend whose body is not an identity we can use."""

    def __init__(self, problem: str) -> None:
        super().__init__("auth_error", problem)
        self.problem = problem


def _sub(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_SUB:
        raise AuthAnswerInvalid(f"sub must be a non-empty string of at most {MAX_SUB} characters")
    return value


def parse_identity(raw: bytes, now: float) -> Identity:
    """The identity a connect answer's 200 body grants: a JSON object {sub, topics?, info?, expires_at?}
    (null counts as absent), or the user id alone (a JSON string or number, or one line of bare text, as
    Linen's /api/jwt/who answers). AuthAnswerInvalid for anything else."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        text = raw.decode("utf-8", "replace").strip()
        if not text.isprintable():
            raise AuthAnswerInvalid("the answer is neither JSON nor one line of text") from None
        value = text
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str):
        return Identity(sub=_sub(value), exp=math.inf)
    if not isinstance(value, dict):
        raise AuthAnswerInvalid("expected a JSON object {sub, topics?, info?, expires_at?} or the user id")
    sub = _sub(value.get("sub"))
    topics = value.get("topics")
    if topics is not None:
        if not isinstance(topics, list) or not all(isinstance(item, str) and item for item in topics):
            raise AuthAnswerInvalid("topics must be a list of non-empty strings")
        topics = tuple(topics)
    info = value.get("info")
    if info is not None and not isinstance(info, dict):
        raise AuthAnswerInvalid("info must be an object")
    expires_at = value.get("expires_at")
    if expires_at is None:
        exp = math.inf
    elif isinstance(expires_at, (int, float)) and not isinstance(expires_at, bool) and math.isfinite(expires_at):
        exp = float(expires_at)
        if exp <= now:
            raise AuthAnswerInvalid("expires_at has passed")
    else:
        raise AuthAnswerInvalid("expires_at must be a number (unix seconds)")
    return Identity(sub=sub, exp=exp, topics=topics, info=info or {})


class _Cache:
    """Answers by key until they lapse; at most CACHE_SIZE, the oldest out first."""

    def __init__(self) -> None:
        self.entries: dict[bytes, tuple[float, Answer]] = {}

    def get(self, key: bytes, now: float) -> Answer | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            del self.entries[key]
            return None
        return entry[1]

    def put(self, key: bytes, until: float, answer: Answer) -> None:
        self.entries.pop(key, None)
        self.entries = entries = with_room(self.entries, CACHE_SIZE)
        entries[key] = (until, answer)


def _dumps(body: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(body)
    except TypeError:  # integers beyond 64 bits in a join's params: the json module writes them
        return json.dumps(body).encode()


def _header_safe(token: str) -> bool:
    return token.isascii() and token.isprintable()


class AuthBackend:
    """The calls to PUSH_AUTH_CONNECT_URL and PUSH_AUTH_JOIN_URL; `start` and `stop` with the node."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.connect_url = settings.auth_connect_url
        self.join_url = settings.auth_join_url
        self.always = settings.auth_mode == "callback"
        self._forward = settings.auth_forward_headers
        self._key = settings.service_keys[0] if settings.service_keys else ""
        self._timeout = settings.auth_timeout
        self._cache_seconds = settings.auth_cache_seconds
        self._limit = settings.auth_max_concurrency
        self._queue_limit = settings.auth_max_concurrency * QUEUE_FACTOR
        self._slots = asyncio.Semaphore(self._limit)
        self._active = 0
        self._waiting = 0
        self._cache = _Cache()
        self._calls: dict[bytes, asyncio.Task[Answer]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._metrics = metrics
        self._outcomes = {(endpoint, outcome): metrics.auth_callbacks.labels(endpoint, outcome)
                          for endpoint in (CONNECT, JOIN) for outcome in OUTCOMES}
        self._hits = {endpoint: metrics.auth_callback_cache.labels(endpoint, "hit") for endpoint in (CONNECT, JOIN)}
        self._misses = {endpoint: metrics.auth_callback_cache.labels(endpoint, "miss") for endpoint in (CONNECT, JOIN)}
        metrics.auth_callbacks_pending.set_function(lambda: len(self._calls))

    async def start(self) -> None:
        # No cookie jar: a Set-Cookie of the backend's must not ride along on other users' calls.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._limit), cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None))

    async def stop(self) -> None:
        for task in list(self._calls.values()):
            task.cancel()
        if self._session is not None:
            await self._session.close()

    def asks_for(self, token: str | None) -> bool:
        """Whether a connect with this token (None: none given) goes to the backend: a token, or without
        one only when headers are forwarded (a backend that knows its users by cookie)."""
        return self.connect_url is not None and (bool(token) or bool(self._forward))

    # --- connect

    async def connect(self, token: str | None, transport: str, remote: str,
                      header: Callable[[str], str | None]) -> Identity:
        """The identity the backend grants; AuthError (401/403) or AuthBackendUnavailable otherwise."""
        assert self.connect_url is not None
        forwarded = {name: value for name in self._forward if (value := header(name)) is not None}
        token = token or ""
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass"))
        for name, value in forwarded.items():  # the backend's answer may depend on them
            digest.update(f"\0{name}\0{value}".encode("utf-8", "surrogatepass"))
        headers = {"Content-Type": "application/json", KEY_HEADER: self._key}
        if token and _header_safe(token):
            headers["Authorization"] = f"Bearer {token}"  # Linen's /api/jwt/who reads it there
        body = {"token": token, "transport": transport, "remote_addr": remote, "headers": forwarded}
        outcome, value = await self._ask(CONNECT, digest.digest(), self.connect_url, body, headers)
        if outcome == ADMIT:
            return value
        if outcome == REFUSE:
            raise AuthError("auth_refused", "the auth backend refused the token")
        raise AuthBackendUnavailable(f"auth_{outcome}", str(value), str(value))

    # --- join

    async def join(self, sub: str, topic: str, params: Any) -> str | None:
        """None when the backend lets `sub` join `topic`; else the join error's reason."""
        assert self.join_url is not None
        key = hashlib.sha256(f"{sub}\0{topic}".encode("utf-8", "surrogatepass")).digest()
        body = {"sub": sub, "topic": topic, "params": params}
        outcome, _ = await self._ask(JOIN, key, self.join_url, body,
                                     {"Content-Type": "application/json", KEY_HEADER: self._key})
        if outcome == ADMIT:
            return None
        return UNAUTHORIZED if outcome == REFUSE else UNAVAILABLE

    # --- one ask: the cache, a call in flight with the same key, or a call

    async def _ask(self, endpoint: str, key: bytes, url: str, body: dict[str, Any],
                   headers: dict[str, str]) -> Answer:
        cached = self._cache.get(key, time.time())
        if cached is not None:
            self._hits[endpoint].inc()
            return cached
        call = self._calls.get(key)
        if call is None:
            self._misses[endpoint].inc()
            call = asyncio.get_running_loop().create_task(self._call(endpoint, key, url, body, headers))
            self._calls[key] = call
            call.add_done_callback(lambda done: self._calls.pop(key) if self._calls.get(key) is done else None)
        else:
            self._hits[endpoint].inc()  # shares the call in flight: no call of its own
        # Shielded: a client that leaves cancels its wait, not the call the others share.
        return await asyncio.shield(call)

    async def _call(self, endpoint: str, key: bytes, url: str, body: dict[str, Any],
                    headers: dict[str, str]) -> Answer:
        if self._active >= self._limit and self._waiting >= self._queue_limit:
            self._outcomes[endpoint, OVERLOAD].inc()
            return OVERLOAD, f"more than {self._queue_limit} calls to the auth backend waiting"
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._timeout):
                self._waiting += 1
                try:
                    await self._slots.acquire()
                finally:
                    self._waiting -= 1
                self._active += 1
                try:
                    status, raw = await self._post(url, _dumps(body), headers)
                finally:
                    self._active -= 1
                    self._slots.release()
        except TimeoutError:
            answer: Answer = (TIMEOUT, f"no answer within {self._timeout:g}s")
        except (aiohttp.ClientError, OSError, AuthAnswerInvalid) as error:
            answer = (ERROR, str(error) or type(error).__name__)
        else:
            answer = self._judge(endpoint, status, raw)
        self._metrics.auth_callback_seconds.observe(time.monotonic() - started)
        outcome, value = answer
        self._outcomes[endpoint, outcome].inc()
        if outcome in (ADMIT, REFUSE):
            if self._cache_seconds > 0:
                now = time.time()
                until = now + self._cache_seconds
                if isinstance(value, Identity):
                    until = min(until, value.exp)  # never admit from memory past what the backend said
                self._cache.put(key, until, answer)
        else:
            log.warning("auth backend failed", extra={"event": "auth_callback_failed", "endpoint": endpoint,
                                                      "outcome": outcome, "error": value})
        return answer

    async def _post(self, url: str, data: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        if self._session is None:
            raise aiohttp.ClientError("the auth client is not started")
        # No redirects: the key header would follow them wherever they point.
        async with self._session.post(url, data=data, headers=headers, allow_redirects=False) as response:
            if response.status != 200:
                return response.status, b""
            if response.content_length is not None and response.content_length > MAX_ANSWER_BYTES:
                raise AuthAnswerInvalid(f"answer over {MAX_ANSWER_BYTES} bytes")
            raw = bytearray()
            async for chunk in response.content.iter_any():
                raw += chunk
                if len(raw) > MAX_ANSWER_BYTES:
                    raise AuthAnswerInvalid(f"answer over {MAX_ANSWER_BYTES} bytes")
            return 200, bytes(raw)

    def _judge(self, endpoint: str, status: int, raw: bytes) -> Answer:
        if status in (401, 403):
            return REFUSE, f"HTTP {status}"
        if status != 200:
            return ERROR, f"answered HTTP {status}"
        if endpoint == JOIN:
            return ADMIT, None
        try:
            return ADMIT, parse_identity(raw, time.time())
        except AuthAnswerInvalid as invalid:
            return ERROR, f"answer not usable: {invalid.problem}"
