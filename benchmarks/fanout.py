"""Quick fan-out measurement: N raw WebSocket subscribers on one topic, M messages published over HTTP.

Starts its own server process on a free loopback port, connects N minimal clients (they only
count frames; no JSON work on the client side, so the load generator stays cheap), publishes M
messages in batches, and prints deliveries/s and server CPU microseconds per delivery, read
from /proc. Loopback only, bounded in time, stops by itself.

    python benchmarks/fanout.py --clients 1000 --messages 200
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import struct
import sys
import time
from pathlib import Path

import aiohttp
import jwt
import orjson

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-publish-key-0123456789abcdef"
SECRET = "bench-jwt-secret-0123456789abcdef0123456789"
TOPIC = "room:lobby:bench"
TIME_LIMIT = 120.0


def masked_text_frame(payload: bytes) -> bytes:
    """A client frame must be masked; the zero mask keeps it cheap and is still valid."""
    assert len(payload) < 126
    return struct.pack("!BB", 0x81, 0x80 | len(payload)) + b"\0\0\0\0" + payload


class Subscriber(asyncio.Protocol):
    """Counts server frames by parsing WebSocket headers only."""

    def __init__(self, joined: asyncio.Future[None]) -> None:
        self.buffer = b""
        self.handshake_done = False
        self.frames = 0
        self.joined = joined
        self.target = 0
        self.done: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        if not self.handshake_done:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            if not buffer.startswith(b"HTTP/1.1 101"):
                self.joined.set_exception(RuntimeError(buffer[:200].decode(errors="replace")))
                return
            self.handshake_done = True
            buffer = buffer[end + 4:]
        offset = 0
        size = len(buffer)
        while size - offset >= 2:
            length = buffer[offset + 1] & 0x7F
            header = 2
            if length == 126:
                if size - offset < 4:
                    break
                length = struct.unpack_from("!H", buffer, offset + 2)[0]
                header = 4
            elif length == 127:
                if size - offset < 10:
                    break
                length = struct.unpack_from("!Q", buffer, offset + 2)[0]
                header = 10
            if size - offset < header + length:
                break
            offset += header + length
            self.frames += 1
            if self.frames == 1 and not self.joined.done():
                self.joined.set_result(None)  # the first frame is the join reply
        self.buffer = buffer[offset:]
        if self.done is not None and self.frames >= self.target and not self.done.done():
            self.done.set_result(None)


async def connect(port: int, token: str) -> Subscriber:
    loop = asyncio.get_running_loop()
    joined: asyncio.Future[None] = loop.create_future()
    transport, protocol = await loop.create_connection(lambda: Subscriber(joined), "127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    transport.write((f"GET /socket/websocket?vsn=2.0.0&token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    transport.write(masked_text_frame(orjson.dumps(["1", "1", TOPIC, "phx_join", {}])))
    await asyncio.wait_for(joined, 30)
    return protocol


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def token(sub: str = "bench") -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


async def start_server(env_overrides: dict[str, str] | None = None) -> tuple[asyncio.subprocess.Process, int]:
    """`python -m push_service serve` on a free port; returns the process and its port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSH_")}
    env.update(PUSH_SERVICE_KEY=KEY, PUSH_JWT_SECRET=SECRET, PUSH_LOG_FORMAT="json", **(env_overrides or {}))
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "push_service", "serve", "--port", "0",
        env=env, cwd=ROOT, stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL)
    assert server.stderr is not None
    while True:
        line = await asyncio.wait_for(server.stderr.readline(), 15)
        if not line:
            raise RuntimeError("server exited before listening")
        entry = orjson.loads(line)
        if entry.get("event") == "listening":
            # Keep draining its log so the server never blocks on a full pipe.
            asyncio.get_running_loop().create_task(_drain(server.stderr))
            return server, entry["port"]


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


async def stop_server(server: asyncio.subprocess.Process) -> None:
    if server.returncode is None:
        server.terminate()
        await asyncio.wait_for(server.wait(), 15)


async def run(clients: int, messages: int, batch: int) -> dict[str, float]:
    server, port = await start_server()
    try:
        subscribers = []
        started = time.perf_counter()
        for chunk in range(0, clients, 100):
            subscribers += await asyncio.gather(*(connect(port, token()) for _ in range(min(100, clients - chunk))))
        connect_seconds = time.perf_counter() - started
        loop = asyncio.get_running_loop()
        for subscriber in subscribers:
            subscriber.target = 1 + messages
            subscriber.done = loop.create_future()
        payload = {"channel_id": "bench", "message": "x" * 150}
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
            cpu_before = cpu_seconds(server.pid)
            started = time.perf_counter()
            for first in range(0, messages, batch):
                items = [{"topic": TOPIC, "event": "new_msg", "payload": {**payload, "n": n}}
                         for n in range(first, min(first + batch, messages))]
                async with http.post(f"http://127.0.0.1:{port}/api/batch", json={"messages": items}) as response:
                    assert response.status == 200, await response.text()
            await asyncio.wait_for(asyncio.gather(*(s.done for s in subscribers)), TIME_LIMIT)
            elapsed = time.perf_counter() - started
            cpu = cpu_seconds(server.pid) - cpu_before
        deliveries = clients * messages
        return {"clients": clients, "messages": messages, "deliveries": deliveries,
                "seconds": round(elapsed, 3), "deliveries_per_second": round(deliveries / elapsed),
                "server_cpu_us_per_delivery": round(cpu * 1e6 / deliveries, 2),
                "connect_seconds": round(connect_seconds, 2)}
    finally:
        await stop_server(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--batch", type=int, default=10, help="messages per /api/batch request")
    args = parser.parse_args()
    result = asyncio.run(run(args.clients, args.messages, args.batch))
    print(orjson.dumps(result).decode())
    for key, value in result.items():
        print(f"{key:>28}: {value}")


if __name__ == "__main__":
    main()
