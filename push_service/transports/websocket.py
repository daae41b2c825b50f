"""The Phoenix WebSocket transport: `GET /socket/websocket?vsn=2.0.0&token=<JWT>`.

A socket costs what its connection state costs and nothing more: no aiohttp request, no handler
task, no timer (until it closes). The front door (frontdoor.py) hands over a connection whose first
request is an upgrade; it is checked (drain, origin, vsn, token: refused with HTTP 403/503 exactly
as Phoenix refuses a failed `connect/3`; a Sec-WebSocket-Version other than 13: 426), answered 101,
and the connection's protocol becomes a `WebSocketProtocol`. What a read answers (the 101 too) waits
for the end of the loop's pass and goes out in one write (push_service/outbox.py). Outgoing frames are
framed once per broadcast (and compressed once, when the client negotiated permessage-deflate:
transports/deflate.py) and written to the socket itself while nothing waits (`Session.fd`), else to
the transport: the same bytes for every subscriber. A slow reader is noticed by the transport's own flow
control (`pause_writing`). Upgrades that aiohttp parsed are served by websocket_aiohttp.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

import orjson

from push_service.access_log import remote_address
from push_service.auth import Identity
from push_service.http1 import Request, has_token, json_answer, parse_query, request_id
from push_service.limits import MAX_UPGRADE_TAIL, Guard
from push_service.messages import Wire
from push_service.protocol import V1, V2, Serializer
from push_service.connection import DROPPED, NO_SOCKET, SOCKET_UNKNOWN, Disconnect, Sink
from push_service.transports.admission import Admission
from push_service.transports.deflate import deflate_wire, negotiate
from push_service.transports.handshake import (PATH, SUBPROTOCOL, VERSION, AskBackend, Refusal, admit, ask_backend,
                                               version_refusal)
from push_service.transports.frames import (
    BINARY, CLOSE, PING, PONG, TEXT, FrameError, FrameReader, accept_key_bytes, close_code, frame, frame_close,
    frame_text,
)

log = logging.getLogger("push_service.websocket")

# Wait this long for a server-closed socket to flush, then drop the TCP connection.
CLOSE_TIMEOUT = 5.0
# After the server's Close, wait this long for the peer's before closing the TCP connection. Closing
# at once would answer data the peer sent meanwhile with a reset, which can destroy our Close with it.
PEER_CLOSE_TIMEOUT = 2.0

# One Wire per protocol version, shared by every socket, so a broadcast is framed once per version.
WIRES = {V1: Wire(V1, frame_text), V2: Wire(V2, frame_text)}


# --- the connection after the upgrade


class WebSocketProtocol(asyncio.Protocol):
    """One upgraded socket: frames in to its Session, framed bytes out. It is also the Session's
    Connection, so a socket is this object, its transport and its session."""

    # What a delivery reads first, to share the object's first cache line (docs/performance.md, "Small rooms").
    __slots__ = ("sink", "_closing", "_out", "_transport", "wire", "session", "_metrics", "_reader",
                 "_awaiting_close", "_close_timer", "_lost", "_fd", "_outbox")
    transport_name = "websocket"

    def __init__(self, admission: Admission, transport: asyncio.Transport, wire: Wire, identity: Identity,
                 lost: asyncio.Future[None] | None = None, inflates: bool = False) -> None:
        self.wire = wire
        self._lost = lost
        self._metrics = admission.metrics
        self._transport = transport
        # Connection.sink: the transport while send would write to it at once; this object while what a read
        # answers waits (it goes out in one write); DROPPED once closing (never itself then: a cycle).
        self.sink: asyncio.Transport | WebSocketProtocol | Sink = transport
        self._reader = FrameReader(admission.settings.max_frame_bytes, inflates)
        self._closing = False  # a Close was sent: nothing more goes out
        self._awaiting_close = False  # the server sent its Close first and reads on for the peer's
        self._close_timer: asyncio.TimerHandle | None = None
        # What a read answers waits here and goes out in one write at the end of the loop's pass (outbox.py):
        # a join's reply and presence_state, the 101 and the reply to a join sent behind it.
        self._out: list[bytes] | None = None
        self._outbox = admission.outbox
        # Past this much unsent data the transport calls pause_writing: a slow consumer.
        transport.set_write_buffer_limits(high=admission.settings.send_buffer_bytes)
        self.session = admission.open_session(identity, self, self.transport_name)
        # The socket, which deliveries may write themselves (Session.fd; _settle says when, socket_fd looks it up).
        self._fd = SOCKET_UNKNOWN

    # --- Connection, for the session

    @property
    def remote(self) -> str:
        return remote_address(self._transport) or ""

    def send(self, data: bytes) -> None:
        if not self._closing:
            if self._out is None:
                self._transport.write(data)
                self._settle()
            else:
                self._out.append(data)

    def socket_fd(self) -> int:
        """Looked up at the first delivery, not at the connect. Safe to hold: asyncio's and uvloop's transports
        close the socket only after connection_lost, which stops those writes (tests/test_direct_writes.py).
        Never under TLS, whose transport's socket carries ciphertext, nor where a socket is no file descriptor."""
        if self._fd == SOCKET_UNKNOWN:
            transport = self._transport
            sock = transport.get_extra_info("socket")
            plain = sock is not None and transport.get_extra_info("sslcontext") is None and os.name == "posix"
            self._fd = sock.fileno() if plain else NO_SOCKET
        return self._fd

    def _settle(self) -> None:
        """Session.fd, from where the sink points, after each change of it: deliveries write the socket straight
        only while nothing can wait to go out before them (no read being answered, no Close sent, the
        transport neither closing nor holding bytes); otherwise they go through `sink`, behind what waits."""
        transport = self._transport
        self.session.fd = (self._fd if self.sink is transport and not transport.get_write_buffer_size()
                           and not transport.is_closing() else NO_SOCKET)

    write = send  # as the sink

    def close(self, disconnect: Disconnect) -> None:
        self._close_first(frame_close(disconnect.code, disconnect.reason))

    # --- asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        if not self._closing:
            self.handle_read(data)
        elif self._awaiting_close:
            self._read_to_close(data)
        # else: the connection failed and is read only to be drained until the peer ends it

    def handle_read(self, data: bytes, first: bytes = b"") -> None:
        """Handle `data` read from the peer. What it answers waits for the end of the loop's pass, behind
        `first` (the 101 at the upgrade) and what earlier reads of the pass answered."""
        out = self._out
        waiting = out is not None  # in the outbox already
        if out is None:
            out = self._out = [first] if first else []
            self.sink = self
            self._settle()
        try:
            if data:
                self._receive(data)
        finally:
            if self._out is out and not waiting:  # else _send_close has written it, or the outbox holds it
                if out:
                    self._outbox.add(self)
                else:
                    self.flush()

    def flush(self) -> None:
        """Write what the reads answered (outbox.Flushable); nothing once a Close or the end came first."""
        out = self._out
        if out is not None:
            self._out, self.sink = None, self._transport
            if out:
                self._transport.write(out[0] if len(out) == 1 else b"".join(out))
            self._settle()

    def _receive(self, data: bytes) -> None:
        error: FrameError | None = None
        try:
            messages = self._reader.feed(data)
        except FrameError as exc:
            messages, error = exc.messages, exc
        try:
            for opcode, payload in messages:
                if self._closing:
                    break
                if opcode == TEXT:
                    try:
                        text = payload.decode()
                    except UnicodeDecodeError:
                        raise FrameError(1007, "text frame is not UTF-8") from None
                    self.session.receive(text)
                elif opcode == BINARY:
                    self.session.receive(payload)
                elif opcode == PING:
                    self.send(frame(PONG, payload))
                elif opcode == CLOSE:
                    code = close_code(payload)
                    self._answer_close(frame_close(1000 if code == 1005 else code))
        except FrameError as exc:
            error = exc
        except Exception:  # a bug of ours must not take the process down with it: this socket only
            log.exception("socket failed", extra={"event": "socket_error", "connection": self.session.id})
            self._close_first(frame_close(1011, "internal error"))
        if error is not None:
            if not self._closing:
                self._fail(error)
            elif self._awaiting_close:  # our Close went out, but the peer's can no longer be parsed
                self._awaiting_close = False
                self._half_close()

    def pause_writing(self) -> None:
        self.session.overflowed()

    def resume_writing(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing, self.sink, self._out = True, DROPPED, None
        self._settle()  # before the transport closes the socket, and its number can be reused
        if self._close_timer is not None:
            self._close_timer.cancel()
        self.session.closed()
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    # --- closing (RFC 6455 5.5.1, 7.1.1: the server closes the TCP connection once Closes crossed)

    def _answer_close(self, close_frame: bytes) -> None:
        """The peer sent its Close: answer it and end the connection."""
        if self._send_close(close_frame):
            self._end()

    def _close_first(self, close_frame: bytes) -> None:
        """The server closes: send its Close, then read on, dropping all but the peer's Close, which
        ends the connection; without it, the connection ends after PEER_CLOSE_TIMEOUT."""
        if self._send_close(close_frame):
            self._awaiting_close = True
            self._close_timer = asyncio.get_running_loop().call_later(PEER_CLOSE_TIMEOUT, self._end)

    def _fail(self, error: FrameError) -> None:
        """The peer broke the protocol: its frames can no longer be parsed, so the Close goes out with
        our end of the connection (a half close), and what the peer sends is read and dropped until
        it ends its own end, or PEER_CLOSE_TIMEOUT has passed."""
        self._metrics.client_errors.labels(error.kind).inc()
        if self._send_close(frame_close(error.code, error.reason)):
            self._half_close()
            self._close_timer = asyncio.get_running_loop().call_later(PEER_CLOSE_TIMEOUT, self._end)

    def _half_close(self) -> None:
        if self._transport.can_write_eof():
            self._transport.write_eof()

    def _send_close(self, close_frame: bytes) -> bool:
        """Write the Close behind what the current read answered; False if a Close was sent already."""
        if self._closing:
            return False
        self._closing, self.sink = True, DROPPED
        self._settle()
        out, self._out = self._out, None
        self._transport.write(b"".join(out) + close_frame if out else close_frame)
        return True

    def _read_to_close(self, data: bytes) -> None:
        try:
            closed = any(opcode == CLOSE for opcode, _ in self._reader.feed(data))
        except FrameError:
            closed = True
        if closed:
            self._end()

    def _end(self) -> None:
        # A graceful close flushes what is queued; a peer that does not read is cut off later.
        self._awaiting_close = False
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        transport = self._transport
        transport.close()
        asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, transport.abort)

    def eof_received(self) -> bool | None:
        self._awaiting_close = False
        self.flush()  # now: the transport closes itself when this returns
        self.session.fd = NO_SOCKET  # the transport is about to close itself (is_closing keeps it so from then on)
        return None


# --- the upgrade, as the front door hands it over


def accept(admission: Admission, transport: asyncio.Transport, request: Request, rest: bytes) -> tuple[int, int]:
    """Answer an upgrade the front door took: 101 and a WebSocketProtocol, or the refusal and a close.
    Returns the answer's status and body size (for the access log)."""
    headers, query = request.headers, parse_query(request.query)
    if headers.get("sec-websocket-version") != VERSION:  # `takes` has seen it ask for an upgrade
        admission.metrics.http_requests.labels(PATH, "GET", 426).inc()
        body = orjson.dumps({"error": version_refusal(admission).message})
        transport.write(_upgrade_required(body, request_id(headers.get("x-request-id"))))
        transport.close()
        return 426, len(body)
    try:
        identity, serializer = admit(admission, headers.get("origin"), query.get("vsn"),
                                     headers.get("sec-websocket-protocol"), query.get("token"))
    except Refusal as refusal:
        return _refuse(admission, transport, request, refusal)
    admission.metrics.http_requests.labels(PATH, "GET", 101).inc()
    open_socket(admission, transport, headers.get, identity, serializer, rest)
    return 101, 0


def _refuse(admission: Admission, transport: asyncio.Transport, request: Request, refusal: Refusal) -> tuple[int, int]:
    admission.metrics.http_requests.labels(PATH, "GET", refusal.status).inc()
    body = orjson.dumps({"error": refusal.message})
    transport.write(json_answer(refusal.status, body, request_id(request.headers.get("x-request-id")), close=True))
    transport.close()
    return refusal.status, len(body)


class AwaitingBackend(asyncio.Protocol):
    """An upgrade the front door took whose token the auth backend judges (`accept` raised AskBackend): the
    connection waits here, still counted as open by `guard`, until the answer (bounded by PUSH_AUTH_TIMEOUT).
    What the client sends meanwhile is kept for the socket, up to MAX_UPGRADE_TAIL; its leaving cancels the
    wait (not the call, which other clients with the same token may share)."""

    def __init__(self, admission: Admission, guard: Guard, transport: asyncio.Transport, request: Request,
                 ask: AskBackend, rest: bytes, done: Callable[[int, int], None] | None) -> None:
        self._admission, self._guard, self._transport = admission, guard, transport
        self._rest = rest
        transport.set_protocol(self)
        self._task = asyncio.get_running_loop().create_task(self._finish(request, ask, done))

    async def _finish(self, request: Request, ask: AskBackend, done: Callable[[int, int], None] | None) -> None:
        admission, transport = self._admission, self._transport
        try:
            identity = await ask_backend(admission, ask.token, WebSocketProtocol.transport_name,
                                         remote_address(transport) or "", request.headers.get)
            if admission.draining:  # began while the backend answered: the drain did not see this socket
                raise Refusal(503, "draining", "this node is shutting down; reconnect")
        except Refusal as refusal:
            answer = _refuse(admission, transport, request, refusal)
        except Exception:
            log.exception("upgrade failed", extra={"event": "socket_error"})
            transport.abort()
            return
        else:
            admission.metrics.http_requests.labels(PATH, "GET", 101).inc()
            self._guard.open -= 1  # a WebSocket now: counted by the sessions' gauge
            open_socket(admission, transport, request.headers.get, identity, ask.serializer, self._rest)
            answer = (101, 0)
        if done is not None:
            done(*answer)

    def data_received(self, data: bytes) -> None:
        self._rest += data
        if len(self._rest) > MAX_UPGRADE_TAIL:
            self._transport.abort()

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._task.cancel()
        self._guard.open -= 1


def _upgrade_required(body: bytes, answer_id: str) -> bytes:
    """The front door's 426 (http1.json_answer knows neither that status nor extra headers)."""
    return (f"HTTP/1.1 426 Upgrade Required\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nX-Request-Id: {answer_id}\r\nSec-WebSocket-Version: {VERSION}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade, close\r\n\r\n").encode() + body


def open_socket(admission: Admission, transport: asyncio.Transport, header: Callable[[str], str | None], identity: Identity,
                serializer: Serializer, rest: bytes, lost: asyncio.Future[None] | None = None) -> None:
    """Answer 101 and make the connection a WebSocketProtocol; `rest` is what followed the request head.
    A permessage-deflate offer, when compression is on, makes its frames go out on a compressed wire."""
    settings = admission.settings
    offer = None
    if settings.compression:
        offered = header("sec-websocket-extensions")
        offer = negotiate(offered) if offered else None
    if offer is None:
        wire, extensions = WIRES[serializer], b""
    else:
        wire = deflate_wire(serializer, offer.window_bits, settings.compression_min_bytes)
        extensions = b"Sec-WebSocket-Extensions: " + offer.header.encode() + b"\r\n"
    response = b"".join((
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
        b"Sec-WebSocket-Accept: ", accept_key_bytes((header("sec-websocket-key") or "").encode()), b"\r\n",
        b"Sec-WebSocket-Protocol: phoenix\r\n" if has_token(header("sec-websocket-protocol"), SUBPROTOCOL) else b"",
        extensions, b"\r\n"))
    protocol = WebSocketProtocol(admission, transport, wire, identity, lost, offer is not None)
    transport.set_protocol(protocol)
    protocol.handle_read(rest, response)  # the 101, then the frames sent right behind the request
