"""The Phoenix long-poll transport: `/socket/longpoll`, for clients whose WebSocket cannot get through.

Wire facts, as Phoenix (lib/phoenix/transports/long_poll.ex) and phoenix.js (longpoll.js) have them:

* Every answer is HTTP 200 with the logical status in a JSON body:
  `{"status": 410, "token": T, "messages": []}` opens a session, `{"status": 200, "token": T,
  "messages": [<frame strings>]}` carries frames, `{"status": 204, ...}` ends an empty window,
  `{"status": 403}` refuses, `{"status": 410}` answers a request for a session that is gone.
* A GET without a session token connects (same JWT, auth backend, `vsn` and origin rules as the WebSocket;
  an unavailable auth backend is `{"status": 500}`); a GET with one waits up to the window
  (PUSH_LONGPOLL_WINDOW) for frames. A POST carries one text frame, or `application/x-ndjson` lines
  (`[`/`{`: a text frame; anything else: a base64 binary frame).
* The session token comes in `x-phoenix-longpoll-token` or as the query's `token`. phoenix.js appends
  `token=<session>` after the user's params, so with a user param also named `token` the query holds
  two: the last one wins, as in Plug.
* A session that sees no GET for 1.5 windows is closed (phoenix.js polls: it sends no heartbeats).
* A user (JWT sub) and a remote address may hold at most PUSH_LONGPOLL_MAX_SESSIONS_PER_SUB and
  PUSH_LONGPOLL_MAX_SESSIONS_PER_ADDRESS sessions: past that a new one is refused with HTTP 429 and
  `{"status": 500}`, which phoenix.js retries with backoff.

A session lives in the process that opened it. Its token, `lp.<node id>.<key>.<signature>`
(longpoll_tokens.py), names that node and is bound to the session's user; another node relays a request
for it through the broker (longpoll_relay.py), so no load balancer stickiness is needed. A token of a
node that is gone (or of this one before a restart) is answered 410 ("session gone") and phoenix.js
connects afresh.

A session's frames wait in its LongPollConnection (longpoll_connection.py) until the next GET.
"""

from __future__ import annotations

import asyncio
import gzip
import hmac
import logging
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from push_service.api import ClientGone, RequestTimeout, read_body
from push_service.auth import Identity
from push_service.auth_callback import AuthBackend, AuthBackendUnavailable
from push_service.errors import AuthError
from push_service.protocol import Serializer, negotiate
from push_service.transports.admission import Admission
from push_service.transports.longpoll_body import NDJSON, TOO_BIG, Refused, body_limit, frames_of
from push_service.transports.longpoll_connection import WIRES, LongPollConnection, accepts_gzip
from push_service.transports.longpoll_tokens import (AUTH_TOKEN_HEADER, SESSION_HEADER, SessionRef, SessionTokens,
                                                     parse, tokens_of, user_digest)

log = logging.getLogger("push_service.longpoll")

PATH = "/socket/longpoll"
GZIP_LEVEL = 6  # as the WebSocket's deflate (transports/deflate.py)
# A session with no GET for this many windows is closed (Phoenix: trunc(window_ms * 1.5)).
INACTIVE_WINDOWS = 1.5
ALLOW_METHODS = "get, post, options"
ALLOW_HEADERS = ("accept", "content-type", AUTH_TOKEN_HEADER, SESSION_HEADER)
JSON_UTF8 = "application/json; charset=utf-8"

_STATUS_200 = b'{"status":200}'
_STATUS_403 = b'{"status":403}'
STATUS_410 = b'{"status":410}'
_STATUS_413 = b'{"status":413}'
# phoenix.js handles 200, 204, 410, 403 and 500 (anything else throws in its poll loop): a draining
# node answers 500, which makes the client retry with backoff, most likely on another replica.
STATUS_500 = b'{"status":500}'


def _with_messages(status: int, token: str, frames: list[bytes]) -> bytes:
    return b"".join((b'{"status":', str(status).encode(), b',"token":', orjson.dumps(token),
                     b',"messages":[', b",".join(frames), b"]}"))


# Serves a request for a session another node holds: (request, what its token names, the user's token).
Relay = Callable[[web.Request, SessionRef, str | None], Awaitable[web.StreamResponse]]


class LongPollTransport:
    """The sessions of this node's long-poll clients, the request handler and one inactivity timer."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.window = admission.settings.longpoll_window
        self.node_id = admission.id
        self.tokens = SessionTokens(admission.settings, admission.id)
        # Requests for sessions of other nodes go through it (longpoll_relay.py); None: answered 410.
        self.relay: Relay | None = None
        self._conns: dict[str, LongPollConnection] = {}
        # Live sessions per JWT sub and per remote address (no entry at 0), for the caps.
        self._per_sub: dict[str, int] = {}
        self._per_address: dict[str, int] = {}
        self._reaper: asyncio.Task[None] | None = None

    # --- session tokens

    def find(self, ref: SessionRef, digest: bytes | None, poll: bool,
             sub_of: Callable[[], str | None]) -> LongPollConnection | None:
        """This node's live session `ref` names, if its signature holds for the session's user and the
        request proves that user: the user token the session was opened with (`digest`), or else one
        whose `sub_of()` is the session's. A poll must prove it; a POST only when it carries a user token."""
        conn = self._conns.get(ref.key)
        if conn is None or conn.gone or not self.tokens.valid(ref, conn.sub):
            return None
        if digest is None:
            if not poll:
                return conn
        elif conn.user_digest is not None and hmac.compare_digest(digest, conn.user_digest):
            return conn
        elif sub_of() == conn.sub:
            return conn
        self.admission.metrics.client_errors.labels("longpoll_wrong_user").inc()
        return None

    def sub_of(self, user_token: str | None) -> str | None:
        try:
            return self.admission.verify(user_token).sub
        except AuthError:
            return None

    # --- life cycle

    async def start(self, _app: web.Application) -> None:
        self._reaper = asyncio.create_task(self._reap(), name="push-longpoll-reaper")

    async def stop(self, _app: web.Application) -> None:
        if self._reaper is not None:
            self._reaper.cancel()

    async def _reap(self) -> None:
        """One timer for every long-poll session: a waiting GET is the client's sign of life (it
        sends no heartbeats over long-poll); no GET for 1.5 windows ends the session."""
        settings = self.admission.settings
        tick = min(1.0, self.window / 4, settings.heartbeat_timeout / 4)
        while True:
            await asyncio.sleep(tick)
            now = self.admission.now()
            idle_before = now - self.window * INACTIVE_WINDOWS
            for conn in list(self._conns.values()):
                if conn.polling:
                    if conn.session is not None:
                        conn.session.last_seen = now
                elif conn.last_poll < idle_before:
                    log.debug("long-poll session inactive", extra={"event": "longpoll_inactive"})
                    self.end(conn)

    def end(self, conn: LongPollConnection) -> None:
        """The session is over, whoever ended it: release it; requests for it now get 410."""
        if conn.gone:
            return
        conn.gone = True
        self._conns.pop(conn.key, None)
        _count_down(self._per_sub, conn.sub)
        _count_down(self._per_address, conn.address)
        conn._wake()
        if conn.session is not None:
            conn.session.closed()

    @property
    def session_count(self) -> int:
        return len(self._conns)

    # --- HTTP

    def answer(self, request: web.Request, body: bytes, status: int = 200) -> web.Response:
        settings = self.admission.settings
        # A poll's answer is one session's, so it is compressed per answer, and only when worth it.
        gzipped = (settings.compression and len(body) >= settings.compression_min_bytes
                   and accepts_gzip(request.headers.get("Accept-Encoding")))
        response = web.Response(status=status, body=gzip.compress(body, GZIP_LEVEL, mtime=0) if gzipped else body)
        response.headers["Content-Type"] = JSON_UTF8
        response.headers["Cache-Control"] = "no-store"
        if gzipped:
            response.headers["Content-Encoding"] = "gzip"
        self._cors(request, response)
        if settings.compression:  # whether an answer is gzipped depends on the request's Accept-Encoding
            vary = response.headers.get("Vary")
            response.headers["Vary"] = "Accept-Encoding" if vary is None else f"{vary}, Accept-Encoding"
        return response

    def _cors(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is not None and self.admission.settings.allowed_origins and self.admission.allows_origin(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        else:
            # Phoenix answers * always: the Origin is checked on every request, and no cookie is used.
            response.headers["Access-Control-Allow-Origin"] = "*"

    def _refuse(self, request: web.Request, reason: str, body: bytes = _STATUS_403,
                status: int = 200, error: str | None = None) -> web.Response:
        self.admission.metrics.connects_refused.labels(reason).inc()
        fields = {"event": "connect_refused", "reason": reason, "transport": LongPollConnection.transport_name}
        if error is not None:
            fields["error"] = error  # the answer has no room for it: the operator reads it here
        log.info("connection refused", extra=fields)
        return self.answer(request, body, status)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._dispatch(request)
        except (asyncio.CancelledError, web.HTTPException, ClientGone, RequestTimeout):
            raise  # the client left, or was cut at the deadline: the API's middleware counts it
        except Exception:
            # phoenix.js understands {"status": 500} (it reconnects); a bare error would stall it.
            log.exception("long-poll request failed", extra={"event": "http_error", "path": request.path})
            return self.answer(request, STATUS_500, 500)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        method = request.method
        if method not in ("GET", "POST", "OPTIONS"):
            response = web.Response(status=400, body=orjson.dumps({"error": "long-poll takes GET, POST or OPTIONS"}),
                                    content_type="application/json")
            self._cors(request, response)
            return response
        if not self.admission.allows_origin(request.headers.get("Origin")):
            return self._refuse(request, "origin")
        if method == "OPTIONS":
            return self._preflight(request)
        token, user_token = tokens_of(request)
        ref = parse(token)
        if ref is False:
            if method == "POST":
                return self.answer(request, STATUS_410)
            answer = self._connect(request, token)  # awaitable only when the auth backend is asked
            return answer if isinstance(answer, web.Response) else await answer
        if ref is True:
            return self.answer(request, STATUS_410)
        assert isinstance(ref, SessionRef)
        if ref.node != self.node_id:
            if self.relay is None:
                return self.answer(request, STATUS_410)
            return await self.relay(request, ref, user_token)
        conn = self.find(ref, user_digest(user_token), method == "GET", lambda: self.sub_of(user_token))
        if conn is None:
            return self.answer(request, STATUS_410)
        if method == "POST":
            return await self._publish(request, conn)
        return await self._poll(request, conn)

    def _preflight(self, request: web.Request) -> web.Response:
        requested = [item.strip().lower() for item in
                     request.headers.get("Access-Control-Request-Headers", "").split(",") if item.strip()]
        allowed = list(ALLOW_HEADERS) + [item for item in requested if item not in ALLOW_HEADERS]
        response = web.Response(status=200)
        self._cors(request, response)
        response.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
        response.headers["Access-Control-Allow-Headers"] = ", ".join(allowed)
        response.headers["Access-Control-Max-Age"] = "3600"
        return response

    def _connect(self, request: web.Request, query_token: str | None) -> web.Response | Awaitable[web.Response]:
        admission = self.admission
        if admission.draining:
            return self._refuse(request, "draining", STATUS_500, 503)
        serializer = negotiate(request.query.get("vsn"))
        if serializer is None:
            return self._refuse(request, "vsn")
        client_token = request.headers.get(AUTH_TOKEN_HEADER) or query_token
        try:
            identity = admission.verify(client_token)
        except AuthError as exc:
            backend = admission.auth_backend
            if backend is None or not backend.asks_for(client_token):
                return self._refuse(request, exc.reason, error=f"token refused: {exc.explanation}")
            return self._connect_by_backend(request, backend, client_token, serializer)
        return self._open(request, identity, serializer, client_token)

    async def _connect_by_backend(self, request: web.Request, backend: AuthBackend, client_token: str | None,
                                  serializer: Serializer) -> web.Response:
        try:
            identity = await backend.connect(client_token, LongPollConnection.transport_name, request.remote or "",
                                             request.headers.get)
        except AuthError as refused:  # unavailable: a 500, which phoenix.js retries with backoff
            down = isinstance(refused, AuthBackendUnavailable)
            return self._refuse(request, refused.reason, STATUS_500 if down else _STATUS_403,
                                error="auth backend unavailable" if down else f"token refused: {refused.explanation}")
        if self.admission.draining:  # began while the backend answered
            return self._refuse(request, "draining", STATUS_500, 503)
        return self._open(request, identity, serializer, client_token)

    def _open(self, request: web.Request, identity: Identity, serializer: Serializer,
              client_token: str | None) -> web.Response:
        admission, sub, address = self.admission, identity.sub, request.remote or ""
        settings = admission.settings
        if self._per_sub.get(sub, 0) >= settings.longpoll_max_sessions_per_sub:
            return self._refuse(request, "longpoll_sessions_per_sub", STATUS_500, 429)
        if self._per_address.get(address, 0) >= settings.longpoll_max_sessions_per_address:
            return self._refuse(request, "longpoll_sessions_per_address", STATUS_500, 429)
        key, token = self.tokens.new(sub)
        conn = LongPollConnection(self.end, settings.send_buffer_bytes, key, token, WIRES[serializer], admission.now(),
                                  sub, address)
        conn.user_digest = user_digest(client_token)
        conn.session = admission.open_session(identity, conn, LongPollConnection.transport_name)
        self._conns[key] = conn
        self._per_sub[sub] = self._per_sub.get(sub, 0) + 1
        self._per_address[address] = self._per_address.get(address, 0) + 1
        return self.answer(request, _with_messages(410, token, []))

    async def _poll(self, request: web.Request, conn: LongPollConnection) -> web.Response:
        return self.answer(request, await self.poll(conn, lambda: _client_gone(request)))

    async def poll(self, conn: LongPollConnection, abandoned: Callable[[], bool], limit: int | None = None) -> bytes:
        """A GET's answer: what the session has within the window. Once `abandoned()` (the client went
        away, or the relaying node gave up), the frames are not taken: they stay for the next poll."""
        session = conn.session
        if session is None:  # its session ended while the connection was being made
            return STATUS_410
        conn.polling += 1
        conn.last_poll = session.last_seen = self.admission.now()
        try:
            await conn.wait(self.window)
        finally:
            conn.polling -= 1
            conn.last_poll = self.admission.now()
            if not conn.gone:
                session.last_seen = conn.last_poll
        if abandoned():
            return STATUS_410
        frames = conn.take(limit)
        if frames:
            return _with_messages(200, conn.token, frames)
        if conn.gone:
            return STATUS_410
        return _with_messages(204, conn.token, [])

    def body_limit(self, batch: bool) -> int:
        return body_limit(self.admission.settings.max_frame_bytes, batch)

    async def _publish(self, request: web.Request, conn: LongPollConnection) -> web.Response:
        if conn.session is None:
            return self.answer(request, STATUS_410)
        batch = request.content_type == NDJSON
        body = await read_body(request, self.body_limit(batch))
        return self.answer(request, self.publish(conn, batch, body))

    def publish(self, conn: LongPollConnection, batch: bool, body: bytes | None) -> bytes:
        """A POST's answer, once its frames are passed to the session; `body` None: it was over the limit."""
        session = conn.session
        if session is None:
            return STATUS_410
        frames: list[str | bytes] = []
        refused: Refused | None = ("body_too_big" if batch else "frame_too_big", TOO_BIG)
        if body is not None:
            frames, refused = frames_of(body, batch, self.admission.settings.max_frame_bytes)
        for frame in frames:  # those before a refused one are the client's, as they would be one POST each
            if conn.gone:
                break
            session.receive(frame)
        if refused is not None and not conn.gone:
            reason, disconnect = refused
            self.admission.metrics.client_errors.labels(reason).inc()
            session.disconnect(disconnect)
            if disconnect is TOO_BIG:
                return _STATUS_413
        return STATUS_410 if conn.gone else _STATUS_200


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _count_down(counts: dict[str, int], key: str) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]


def setup(app: web.Application, admission: Admission) -> LongPollTransport:
    """Serve `/socket/longpoll` on `app`."""
    transport = LongPollTransport(admission)
    app.router.add_route("*", PATH, transport.handle)
    app.on_startup.append(transport.start)
    app.on_cleanup.append(transport.stop)
    return transport
