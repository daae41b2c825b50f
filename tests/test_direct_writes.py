"""Deliveries write a WebSocket's socket themselves (Session.fd), not through the transport. That is safe only
because the event loop's transport closes the socket after the protocol's connection_lost has returned, and
connection_lost turns those writes off: a socket closed earlier could have its number reused by the next
accepted connection, which would then get another user's frames. The first test holds both loops we run on
(uvloop and asyncio's own) to that order, however the connection ends, so an upgrade that changes it fails
here and not in production. The others follow Session.fd over a real socket: straight while nothing waits,
behind the transport once it holds bytes, straight again after a read finds it empty, never under TLS."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Callable
from unittest.mock import ANY

import orjson
import pytest
import uvloop

from fakes import NowhereTransport
from ws_client import TEXT, heartbeat, raw_frame

from push_service.auth import Identity
from push_service.config import Settings
from push_service.connection import NO_SOCKET, SOCKET_UNKNOWN
from push_service.messages import Broadcast
from push_service.node import Node
from push_service.protocol import V2
from push_service.transports.websocket import WIRES, WebSocketProtocol

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"uvloop": uvloop.new_event_loop,
                                                             "asyncio": asyncio.new_event_loop}


class Recorder(asyncio.Protocol):
    """Notes its socket's identity at connection_made and checks it again in connection_lost."""

    def __init__(self, ending: str, made: asyncio.Future[None], lost: asyncio.Future[bool]) -> None:
        self.ending, self.made, self.lost = ending, made, lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.fd = transport.get_extra_info("socket").fileno()
        self.inode = os.fstat(self.fd).st_ino
        if self.ending == "server closes":
            transport.close()
        elif self.ending == "server aborts":
            transport.abort()  # type: ignore[attr-defined]
        self.made.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            still_open = os.fstat(self.fd).st_ino == self.inode
        except OSError:  # EBADF: closed already
            still_open = False
        self.lost.set_result(still_open)


async def _end_one_connection(ending: str) -> bool:
    loop = asyncio.get_running_loop()
    made: asyncio.Future[None] = loop.create_future()
    lost: asyncio.Future[bool] = loop.create_future()
    server = await loop.create_server(lambda: Recorder(ending, made, lost), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        await asyncio.wait_for(made, 5)
        if ending == "peer resets":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
        elif ending == "peer closes":
            client.shutdown(socket.SHUT_WR)
        return await asyncio.wait_for(lost, 5)
    finally:
        client.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
@pytest.mark.parametrize("ending", ["peer resets", "peer closes", "server closes", "server aborts"])
def test_the_loop_closes_a_socket_only_after_connection_lost_returned(loop_name: str, ending: str) -> None:
    loop = LOOPS[loop_name]()
    try:
        assert loop.run_until_complete(_end_one_connection(ending)), \
            f"{loop_name}: the socket was closed before connection_lost ({ending})"
    finally:
        loop.close()


class SocketTransport(NowhereTransport):
    """A transport over one end of a socketpair, as uvloop's behaves: a write goes to the socket at once while
    nothing is held, and what the kernel does not take is held (and counted) until `drain`."""

    def __init__(self, sock: socket.socket, tls: bool = False) -> None:
        self.sock, self.tls = sock, tls
        self.held = bytearray()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        if not self.held:
            try:
                data = data[self.sock.send(data):]
            except BlockingIOError:
                pass
        self.held += data

    def drain(self) -> None:
        while self.held:
            try:
                del self.held[:self.sock.send(self.held)]
            except BlockingIOError:
                return

    def get_write_buffer_size(self) -> int:
        return len(self.held)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"socket": self.sock, "sslcontext": object() if self.tls else None}.get(name, default)


class Peer:
    """The client's end: reads unmasked server frames (blocking, bounded by the socket's timeout)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, b""

    def frames(self, count: int) -> list[bytes]:
        payloads = []
        while len(payloads) < count:
            frame = self._frame()
            if frame is None:
                self.buffer += self.sock.recv(1 << 20)
            else:
                payloads.append(frame)
        return payloads

    def _frame(self) -> bytes | None:
        buffer = self.buffer
        if len(buffer) < 2:
            return None
        size, at = buffer[1] & 0x7F, 2
        if size == 126:
            size, at = (struct.unpack("!H", buffer[2:4])[0], 4) if len(buffer) >= 4 else (-1, 0)
        elif size == 127:
            size, at = (struct.unpack("!Q", buffer[2:10])[0], 10) if len(buffer) >= 10 else (-1, 0)
        if size < 0 or len(buffer) < at + size:
            return None
        self.buffer = buffer[at + size:]
        return buffer[at:at + size]


async def _joined_socket(node: Node, transport: SocketTransport, topic: str) -> WebSocketProtocol:
    protocol = WebSocketProtocol(node, transport, WIRES[V2], Identity("u1", 2e9))  # type: ignore[arg-type]
    protocol.data_received(raw_frame(TEXT, orjson.dumps(["1", "1", topic, "phx_join", {}])))
    assert protocol.session.fd == NO_SOCKET  # the reply waits for the end of the loop's pass (outbox.py)
    await asyncio.sleep(0)
    return protocol


async def _published(node: Node, topic: str, seq: int, filler: str = "") -> None:
    node.publish([Broadcast(topic, "new_msg", orjson.dumps({"seq": seq, "f": filler}))])
    await asyncio.sleep(0)  # the loop turn that flushes the hub


async def test_deliveries_go_straight_to_the_socket_and_queue_behind_what_the_transport_holds() -> None:
    server_end, client_end = socket.socketpair()
    server_end.setblocking(False)
    client_end.settimeout(5)
    peer = Peer(client_end)
    server_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    node = Node(Settings())
    await node.start()
    try:
        transport = SocketTransport(server_end)
        protocol = await _joined_socket(node, transport, "room:lobby:1")
        session = protocol.session
        assert session.fd == SOCKET_UNKNOWN  # settled after the join's reply; the socket not looked up yet
        # The first broadcast after a join is checked against the join's history position (Session._floors)
        # and sent through the connection; the ones after it go straight.
        await _published(node, "room:lobby:1", 0)
        writes = transport.writes
        await _published(node, "room:lobby:1", 1)
        assert session.fd == server_end.fileno() and transport.writes == writes
        await _published(node, "room:lobby:1", 2, "x" * 1_000_000)  # more than the kernel takes
        assert transport.held and session.fd == NO_SOCKET and transport.writes == writes + 1  # the rest
        await _published(node, "room:lobby:1", 3)  # behind what the transport holds
        assert transport.writes == writes + 2 and session.fd == NO_SOCKET
        while transport.held:  # the peer reads while the transport drains
            transport.drain()
            peer.buffer += client_end.recv(1 << 20)
        frames = peer.frames(5)
        assert orjson.loads(frames[0])[3:5] == ["phx_reply", {"status": "ok", "response": {"position": ANY}}]
        assert [orjson.loads(frame)[4]["seq"] for frame in frames[1:]] == [0, 1, 2, 3]
        protocol.data_received(raw_frame(TEXT, heartbeat("2")))  # a read finds the transport empty: straight again
        await asyncio.sleep(0)  # the end of the pass writes the reply
        assert orjson.loads(peer.frames(1)[0])[1] == "2"
        writes = transport.writes
        await _published(node, "room:lobby:1", 4)
        assert session.fd == server_end.fileno() and transport.writes == writes
        assert orjson.loads(peer.frames(1)[0])[4]["seq"] == 4
        protocol.connection_lost(None)
        assert session.fd == NO_SOCKET
    finally:
        await node.stop()
        server_end.close()
        client_end.close()


async def test_under_tls_deliveries_go_through_the_transport() -> None:
    server_end, peer = socket.socketpair()
    node = Node(Settings())
    await node.start()
    try:
        transport = SocketTransport(server_end, tls=True)
        protocol = await _joined_socket(node, transport, "room:lobby:1")
        for seq in range(3):
            await _published(node, "room:lobby:1", seq)
        assert protocol.session.fd == NO_SOCKET and transport.writes == 4  # the join's reply, then each one
    finally:
        await node.stop()
        server_end.close()
        peer.close()
