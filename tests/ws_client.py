"""WebSocket clients for the wire tests, neither of them ours: the `websockets` library's sans-I/O
ClientProtocol driven over a real socket, plus raw frames for what that library refuses to send."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
from collections import deque
from collections.abc import Sequence

import orjson
from websockets.client import ClientProtocol
from websockets.extensions import ClientExtensionFactory
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

RECEIVE_TIMEOUT = 5.0

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

# The headers of an upgrade request for an HTTP client that will not upgrade: for answers given before it.
UPGRADE_HEADERS = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                   "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


def upgrade_head(token: str, vsn: str = "2.0.0", version: str | None = "13") -> bytes:
    """An upgrade request's head, byte for byte, for tests of the wire; `version` None leaves the
    Sec-WebSocket-Version header out."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET /socket/websocket?vsn={vsn}&token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            + (f"Sec-WebSocket-Version: {version}\r\n" if version is not None else "") + "\r\n").encode()


def raw_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, masked: bool = True) -> bytes:
    """One client frame exactly as asked, however invalid; `rsv` is the 3 reserved bits (0-7)."""
    size = len(payload)
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if masked else 0
    if size < 126:
        header = struct.pack("!BB", first, mask_bit | size)
    elif size < 65536:
        header = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, size)
    if not masked:
        return header + payload
    mask = os.urandom(4)
    key = (mask * (size // 4 + 1))[:size]
    body = (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(size, "little")
    return header + mask + body


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def heartbeat(ref: str = "1", size: int | None = None) -> bytes:
    """A vsn 2.0.0 heartbeat, padded with JSON whitespace to exactly `size` bytes when asked."""
    text = orjson.dumps([None, ref, "phoenix", "heartbeat", {}])
    if size is not None:
        assert size >= len(text), size
        text += b" " * (size - len(text))
    return text


def heartbeat_reply(ref: str = "1") -> list:
    return [None, ref, "phoenix", "phx_reply", {"status": "ok", "response": {}}]


def binary_heartbeat(ref: bytes = b"1", size: int | None = None) -> bytes:
    """A vsn 2.0.0 binary push (kind 0) of the heartbeat event, its data padded to `size` bytes in all."""
    head = struct.pack("5B", 0, 0, len(ref), 7, 9) + ref + b"phoenix" + b"heartbeat"
    return head if size is None else head + b"\0" * (size - len(head))


class Client:
    """A socket spoken to by websockets' ClientProtocol: what the server sends is parsed and checked by
    that library; what the test sends goes through it (`send_*`) or around it (`send_raw`). The socket
    is read only when the test waits for something, so unread data stays in the kernel as it would for
    a busy client."""

    def __init__(self, sock: socket.socket, protocol: ClientProtocol) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.protocol = protocol
        self.events: deque[Frame] = deque()
        self.response: Response | None = None
        self.eof = False

    @classmethod
    async def connect(cls, port: int, token: str, vsn: str = "2.0.0", timeout: float = RECEIVE_TIMEOUT,
                      rcvbuf: int | None = None, before: bytes = b"", behind: bytes = b"",
                      extensions: Sequence[ClientExtensionFactory] = ()) -> Client:
        """`rcvbuf`: a small receive buffer (set before connecting: it sets the TCP window); `before`: one
        HTTP request sent first on the same connection (its answer is read and skipped); `behind`: bytes
        sent in the same write as the upgrade request, right behind it; `extensions`: offered (none by default)."""
        protocol = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/socket/websocket?vsn={vsn}&token={token}"),
                                  max_size=None, extensions=list(extensions) or None)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        client = cls(sock, protocol)
        await asyncio.wait_for(client.loop.sock_connect(sock, ("127.0.0.1", port)), timeout)
        if before:
            await client.send_raw(before)
            await client._skip_answer(timeout)
        protocol.send_request(protocol.connect())
        await client.send_raw(b"".join(protocol.data_to_send()) + behind)
        while protocol.state is State.CONNECTING:
            await client._read(timeout)
        response = client.response
        if protocol.handshake_exc is not None or response is None or response.status_code != 101:
            raise AssertionError(f"handshake failed: {protocol.handshake_exc!r}, {response!r}")
        return client

    async def flush(self) -> None:
        data = b"".join(self.protocol.data_to_send())
        if data:
            try:
                await self.send_raw(data)
            except OSError:
                pass  # the server is gone: what it missed is the test's to notice

    async def _skip_answer(self, timeout: float) -> None:
        """One HTTP answer with a Content-Length body, read off the socket whole and dropped."""
        data = b""
        while b"\r\n\r\n" not in data:
            data += await self._receive(timeout)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        while len(body) < length:
            body += await self._receive(timeout)
        assert len(body) == length, (head, body)  # nothing else comes before the upgrade is asked for

    async def _receive(self, timeout: float) -> bytes:
        data = await asyncio.wait_for(self.loop.sock_recv(self.sock, 65536), timeout)
        if not data:
            raise EOFError("the server closed the connection")
        return data

    async def _read(self, timeout: float) -> None:
        data = await asyncio.wait_for(self.loop.sock_recv(self.sock, 65536), timeout)
        if data:
            self.protocol.receive_data(data)
        else:
            self.eof = True
            self.protocol.receive_eof()
        for event in self.protocol.events_received():
            if isinstance(event, Response):
                self.response = event
            else:
                self.events.append(event)
        await self.flush()  # what the library answers by itself: pongs, the closing Close

    async def send_raw(self, data: bytes, timeout: float = RECEIVE_TIMEOUT) -> None:
        await asyncio.wait_for(self.loop.sock_sendall(self.sock, data), timeout)

    async def send_text(self, text: bytes | str) -> None:
        self.protocol.send_text(text.encode() if isinstance(text, str) else text)
        await self.flush()

    async def send_close(self, code: int, reason: str = "") -> None:
        """A Close through the library, which then expects the server's answer rather than answering it."""
        self.protocol.send_close(code, reason)
        await self.flush()

    async def send_binary(self, data: bytes) -> None:
        self.protocol.send_binary(data)
        await self.flush()

    async def next_frame(self, timeout: float = RECEIVE_TIMEOUT) -> Frame:
        """The next frame from the server; EOFError when the connection ended first."""
        while not self.events:
            if self.eof:
                raise EOFError("the server closed the connection")
            await self._read(timeout)
        return self.events.popleft()

    async def next_json(self, timeout: float = RECEIVE_TIMEOUT) -> object:
        frame = await self.next_frame(timeout)
        assert frame.opcode is Opcode.TEXT, frame
        return orjson.loads(frame.data)

    async def heartbeat_round_trip(self, ref: str) -> None:
        await self.send_text(heartbeat(ref))
        assert await self.next_json() == heartbeat_reply(ref)

    async def closed_with(self, timeout: float = RECEIVE_TIMEOUT) -> tuple[int, str]:
        """The server's Close (code, reason), after which the server must end the TCP connection."""
        frame = await self.next_frame(timeout)
        assert frame.opcode is Opcode.CLOSE, frame
        close = Close.parse(frame.data)
        await self.wait_eof(timeout)
        return close.code, close.reason

    async def wait_eof(self, timeout: float = RECEIVE_TIMEOUT) -> None:
        while not self.eof:
            await self._read(timeout)
        assert not self.events, list(self.events)

    def close(self) -> None:
        self.sock.close()
