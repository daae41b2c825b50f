"""The Phoenix WebSocket transport: `GET /socket/websocket?vsn=2.0.0&token=<JWT>`.

Authentication happens before the upgrade, so a refused client gets HTTP 403 exactly as
Phoenix answers when `connect/3` fails. After the upgrade, outgoing frames are framed by
us once and written straight to the socket's transport: the same bytes for every subscriber.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import struct

import orjson
from aiohttp import WSMsgType, web

from push_service.auth import AuthError
from push_service.hub import Wire
from push_service.node import NODE, Node
from push_service.protocol import V1, V2, negotiate
from push_service.session import Disconnect

log = logging.getLogger("push_service.websocket")

# phoenix.js >= 1.8 `authToken`: a Sec-WebSocket-Protocol entry beside "phoenix".
AUTH_TOKEN_PREFIX = "base64url.bearer.phx."
SUBPROTOCOL = "phoenix"
# Wait this long for the client's close frame, then drop the TCP connection.
CLOSE_TIMEOUT = 5.0


def frame_text(payload: bytes) -> bytes:
    """An unmasked, final WebSocket text frame (RFC 6455 5.2), as a server sends it."""
    size = len(payload)
    if size < 126:
        return struct.pack("!BB", 0x81, size) + payload
    if size < 65536:
        return struct.pack("!BBH", 0x81, 126, size) + payload
    return struct.pack("!BBQ", 0x81, 127, size) + payload


def frame_close(code: int, reason: str) -> bytes:
    body = struct.pack("!H", code) + reason.encode()[:120]
    return struct.pack("!BB", 0x88, len(body)) + body


def token_from_subprotocols(header: str | None) -> str | None:
    """The token phoenix.js >= 1.8 puts in Sec-WebSocket-Protocol, if any; AuthError if unreadable."""
    if not header:
        return None
    for entry in header.split(","):
        entry = entry.strip()
        if entry.startswith(AUTH_TOKEN_PREFIX):
            encoded = entry[len(AUTH_TOKEN_PREFIX):]
            try:
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
            except (binascii.Error, UnicodeDecodeError, ValueError):
                raise AuthError("malformed", "authToken is not base64url") from None
    return None


# One Wire per protocol version, shared by every socket, so a broadcast is framed once per version.
WIRES = {V1: Wire(V1, frame_text), V2: Wire(V2, frame_text)}


class WebSocketConnection:
    """A Session's view of one upgraded socket."""

    __slots__ = ("wire", "session", "_ws", "_transport", "_write", "_buffered")
    transport_name = "websocket"

    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.Transport, wire: Wire) -> None:
        self.wire = wire
        self._ws = ws
        self._transport = transport
        self._write = transport.write
        self._buffered = transport.get_write_buffer_size

    def send(self, data: bytes) -> int:
        if self._transport.is_closing():
            return 0
        self._write(data)
        return self._buffered()

    def close(self, disconnect: Disconnect) -> None:
        transport = self._transport
        if transport.is_closing():
            return
        # Our own close frame, then a graceful close that flushes what is queued; a peer that
        # does not read (a slow consumer) is cut off after CLOSE_TIMEOUT.
        transport.write(frame_close(disconnect.code, disconnect.reason))
        transport.close()
        asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, transport.abort)


def _refuse(node: Node, status: int, reason: str, message: str) -> web.Response:
    node.metrics.connects_refused.labels(reason).inc()
    if reason != "draining":  # every client retries during a drain: the metric counts those, not the log
        log.info("connection refused", extra={"event": "connect_refused", "reason": reason, "status": status})
    return web.Response(status=status, body=orjson.dumps({"error": message}), content_type="application/json")


async def handle(request: web.Request) -> web.StreamResponse:
    node: Node = request.app[NODE]
    if node.draining:
        return _refuse(node, 503, "draining", "this node is shutting down; reconnect")
    if not node.origins.allows(request.headers.get("Origin")):
        return _refuse(node, 403, "origin", "origin not allowed")
    serializer = negotiate(request.query.get("vsn"))
    if serializer is None:
        return _refuse(node, 403, "vsn", "unsupported vsn; use 1.0.0 or 2.0.0")
    try:
        token = token_from_subprotocols(request.headers.get("Sec-WebSocket-Protocol"))
        if token is None:
            token = request.query.get("token")
        identity = node.tokens.verify(token)
    except AuthError as exc:
        return _refuse(node, 403, exc.reason, f"token refused: {exc.reason}")

    ws = web.WebSocketResponse(
        protocols=(SUBPROTOCOL,),
        max_msg_size=node.settings.max_frame_bytes,
        autoping=True,
        compress=False,
        timeout=CLOSE_TIMEOUT,
    )
    if not ws.can_prepare(request).ok:
        return _refuse(node, 400, "not_websocket", "expected a WebSocket upgrade request")
    await ws.prepare(request)
    transport = request.transport
    if transport is None:  # the peer vanished during the handshake
        return ws
    conn = WebSocketConnection(ws, transport, WIRES[serializer])
    session = node.open_session(identity, conn, WebSocketConnection.transport_name)
    try:
        async for message in ws:
            if message.type is WSMsgType.TEXT or message.type is WSMsgType.BINARY:
                session.receive(message.data)
            elif message.type is WSMsgType.ERROR:
                # aiohttp has already closed the socket (1009 for an oversized message, 1002 otherwise).
                # The error carries the code: ws.close_code is the client's answer to our close by now.
                reason = "frame_too_big" if getattr(message.data, "code", None) == 1009 else "websocket_error"
                node.metrics.client_errors.labels(reason).inc()
                break
    finally:
        session.closed()
    return ws
