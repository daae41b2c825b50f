"""Publishes to rooms of 10 in one process, without sockets: the Python a publish costs in rooms-10k.

Each publish goes in through the front door as the bytes of a keep-alive POST /api/broadcast, is
checked and published, and reaches its room's 10 WebSocket sessions, whose transports only count
writes. One event-loop turn per publish. What it leaves out is the kernel's part and the writes themselves
(with no socket here, a session writes through its transport, not with os.write), so it isolates our own
per-publish and per-delivery overhead (docs/performance.md, "Small rooms").

    python benchmarks/rooms_inprocess.py [--publishes N] [--rooms R]

CPU µs per publish is noisy on a shared machine; instruction counts are not. For those, run it under
callgrind twice and take the difference per publish:

    valgrind --tool=callgrind python benchmarks/rooms_inprocess.py --rooms 100 --publishes 2
    valgrind --tool=callgrind python benchmarks/rooms_inprocess.py --rooms 100 --publishes 2002
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import sys
import time
from typing import Any

import jwt
import orjson

KEY = "bench-publish-key-0123456789abcdef"
SECRET = "bench-jwt-secret-0123456789abcdef0123456789"
PER_ROOM = 10


class CountingTransport(asyncio.Transport):
    """As much of a transport as the front door and a WebSocket use here (get_extra_info is asyncio's, from
    `extra`); writes are counted, not kept, and nothing is held or closed."""

    def __init__(self) -> None:
        super().__init__(extra={"peername": ("127.0.0.1", 1)})
        self.protocol: Any = None
        self.writes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes += 1

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False


def client_text_frame(payload: bytes) -> bytes:
    """A masked text frame, as a client sends it (payloads under 64 KiB)."""
    mask = b"\x01\x02\x03\x04"
    size = len(payload)
    head = struct.pack("!BB", 0x81, 0x80 | size) if size < 126 else struct.pack("!BBH", 0x81, 0x80 | 126, size)
    return head + mask + bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))


def connect(listener: Any) -> CountingTransport:
    transport = CountingTransport()
    door = listener.protocol_factory()()
    transport.protocol = door
    door.connection_made(transport)
    return transport


async def run(publishes: int, rooms: int) -> None:
    os.environ.update(PUSH_SERVICE_KEY=KEY, PUSH_JWT_SECRET=SECRET, PUSH_HISTORY_SIZE="0", PUSH_LOG_LEVEL="warning")
    from push_service import frontdoor
    from push_service.config import Settings
    from push_service.node import Node

    node = Node(Settings.load())
    await node.start()
    listener = frontdoor.Listener(node, asyncio.Protocol)  # no request here is handed to aiohttp
    token = jwt.encode({"sub": "bench", "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")
    upgrade = (f"GET /socket/websocket?vsn=2.0.0&token={token} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    sockets = []
    for room in range(rooms):
        for _ in range(PER_ROOM):
            transport = connect(listener)
            transport.protocol.data_received(upgrade)
            transport.protocol.data_received(client_text_frame(orjson.dumps(["1", "1", f"room:lobby:r{room}",
                                                                             "phx_join", {}])))
            sockets.append(transport)
    await asyncio.sleep(0)
    before = sum(transport.writes for transport in sockets)

    requests = []
    for number in range(publishes):
        body = orjson.dumps({"topic": f"room:lobby:r{number % rooms}", "event": "m",
                             "payload": {"seq": number, "p": 1, "t": time.time_ns(), "pad": "x" * 124}})
        requests.append(b"POST /api/broadcast HTTP/1.1\r\nHost: 127.0.0.1:4000\r\nContent-Type: application/json\r\n"
                        b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (KEY.encode(), len(body), body))
    publisher = connect(listener)
    started = time.process_time()
    for request in requests:
        publisher.protocol.data_received(request)
        await asyncio.sleep(0)  # the loop turn that flushes the hub
    spent = time.process_time() - started
    delivered = sum(transport.writes for transport in sockets) - before
    assert publisher.writes == publishes and delivered == publishes * PER_ROOM, (publisher.writes, delivered)
    print(f"{publishes} publishes to rooms of {PER_ROOM} ({rooms} rooms): {spent / publishes * 1e6:.2f} CPU µs "
          f"per publish, {spent / delivered * 1e6:.3f} per delivery", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--publishes", type=int, default=30000)
    parser.add_argument("--rooms", type=int, default=1000)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(args.publishes, args.rooms))
    else:
        uvloop.run(run(args.publishes, args.rooms))


if __name__ == "__main__":
    main()
