"""Deliveries write a WebSocket's socket themselves (Session.fd), not through the transport. That is safe only
because the event loop's transport closes the socket after the protocol's connection_lost has returned, and
connection_lost turns those writes off: a socket closed earlier could have its number reused by the next
accepted connection, which would then get another user's frames. These tests hold both loops we run on
(uvloop and asyncio's own) to that order, however the connection ends, so an upgrade that changes it fails
here and not in production."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Callable

import pytest
import uvloop

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
