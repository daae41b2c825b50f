"""Presence under a crowd: N clients join one presence topic as fast as they can.

Starts its own server process on a free loopback port (benchmarks/common.py), opens N
minimal raw WebSocket clients that each join `room:topic:crowd` under their own user id and only
count frames (headers are parsed, payloads skipped, so the load generator stays cheap), and waits
until every client has seen the full room: the server's `push_presences` gauge reaches N and the
frame flow has stopped. A few clients (--verify) decode everything and merge it as phoenix.js
Presence does, and must end up with all N users. Prints the presence frames received
(presence_state + presence_diff) against what one diff per join would cost, the elapsed time and
the server's CPU seconds (read from /proc). Loopback only, bounded in time, stops by itself.

    ulimit -n 20000; python benchmarks/presence_crowd.py --clients 5000
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import struct
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SECRET, cpu_seconds, masked_text_frame, start_server  # noqa: E402

TOPIC = "room:topic:crowd"
CONNECTS_IN_FLIGHT = 100  # the server's listen backlog is finite: more in flight only adds SYN retries


class Stats:
    def __init__(self) -> None:
        self.frames = 0
        self.bytes = 0
        self.closes = 0
        self.last_frame = time.perf_counter()


class Counter(asyncio.Protocol):
    """Counts complete server frames; payload bytes are skipped, never buffered."""

    def __init__(self, stats: Stats, joined: asyncio.Future[None]) -> None:
        self.stats = stats
        self.joined = joined
        self.handshake = b""
        self.handshake_done = False
        self.head = b""     # a frame header split across reads
        self.skip = 0       # payload bytes of the current frame still to come
        self.opcode = 0
        self.frames = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.stats.bytes += len(data)
        if not self.handshake_done:
            data = self._handshake(data)
            if not data:
                return
        pos, size = 0, len(data)
        while pos < size:
            if self.skip:
                take = min(self.skip, size - pos)
                self.payload(data, pos, take)
                self.skip -= take
                pos += take
                if not self.skip:
                    self._frame_done()
                continue
            head = self.head + data[pos:pos + 10]
            if len(head) < 2:
                self.head, pos = head, size
                break
            length, header = head[1] & 0x7F, 2
            if length == 126:
                header = 4
            elif length == 127:
                header = 10
            if len(head) < header:
                self.head, pos = head, size
                break
            pos += header - len(self.head)
            self.head = b""
            if header == 4:
                length = struct.unpack_from("!H", head, 2)[0]
            elif header == 10:
                length = struct.unpack_from("!Q", head, 2)[0]
            self.opcode = head[0] & 0x0F
            self.start_frame(length)
            if length:
                self.skip = length
            else:
                self._frame_done()

    def _handshake(self, data: bytes) -> bytes:
        buffer = self.handshake + data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            self.handshake = buffer
            return b""
        if not buffer.startswith(b"HTTP/1.1 101"):
            if not self.joined.done():
                self.joined.set_exception(RuntimeError(buffer[:200].decode(errors="replace")))
            return b""
        self.handshake_done = True
        self.handshake = b""
        return buffer[end + 4:]

    def _frame_done(self) -> None:
        stats = self.stats
        stats.last_frame = time.perf_counter()
        if self.opcode == 0x8:
            stats.closes += 1
            self.frame_done()
            return
        self.frames += 1
        stats.frames += 1
        if self.frames == 1 and not self.joined.done():
            self.joined.set_result(None)  # the first frame is the join reply
        self.frame_done()

    # Hooks for the verifying clients.
    def start_frame(self, length: int) -> None:
        pass

    def payload(self, data: bytes, pos: int, take: int) -> None:
        pass

    def frame_done(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.joined.done():
            self.joined.set_exception(ConnectionError("closed before the join reply"))


class Verifier(Counter):
    """Decodes every frame and keeps the room as phoenix.js Presence would (syncState, syncDiff)."""

    def __init__(self, stats: Stats, joined: asyncio.Future[None]) -> None:
        super().__init__(stats, joined)
        self.body = bytearray()
        self.state: dict[str, Any] | None = None
        self.pending: list[dict[str, Any]] = []  # diffs before presence_state, buffered as phoenix.js does
        self.events: dict[str, int] = {}

    def start_frame(self, length: int) -> None:
        self.body = bytearray()

    def payload(self, data: bytes, pos: int, take: int) -> None:
        self.body += data[pos:pos + take]

    def frame_done(self) -> None:
        if self.opcode != 0x1:
            return
        _, _, _, event, payload = orjson.loads(self.body)
        self.events[event] = self.events.get(event, 0) + 1
        if event == "presence_state":
            self.state = payload
            for diff in self.pending:
                sync_diff(self.state, diff)
            self.pending = []
        elif event == "presence_diff":
            if self.state is None:
                self.pending.append(payload)
            else:
                sync_diff(self.state, payload)


def sync_diff(state: dict[str, Any], diff: dict[str, Any]) -> None:
    """phoenix.js Presence.syncDiff: joins first (merged by phx_ref), then leaves."""
    for key, presence in diff["joins"].items():
        current = state.get(key)
        state[key] = {"metas": list(presence["metas"])}
        if current is not None:
            refs = {meta["phx_ref"] for meta in presence["metas"]}
            state[key]["metas"][0:0] = [meta for meta in current["metas"] if meta["phx_ref"] not in refs]
    for key, presence in diff["leaves"].items():
        current = state.get(key)
        if current is None:
            continue
        refs = {meta["phx_ref"] for meta in presence["metas"]}
        current["metas"] = [meta for meta in current["metas"] if meta["phx_ref"] not in refs]
        if not current["metas"]:
            del state[key]


async def connect(port: int, token: str, protocol: type[Counter], stats: Stats) -> tuple[Counter, asyncio.Future]:
    loop = asyncio.get_running_loop()
    joined: asyncio.Future[None] = loop.create_future()
    _, client = await loop.create_connection(lambda: protocol(stats, joined), "127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    client.transport.write((f"GET /socket/websocket?vsn=2.0.0&token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                            "Sec-WebSocket-Version: 13\r\n\r\n").encode()
                           + masked_text_frame(orjson.dumps(["1", "1", TOPIC, "phx_join", {}])))
    return client, joined


async def gauge(http: aiohttp.ClientSession, port: int, name: str) -> float:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def run(clients: int, verify: int, time_limit: float, quiet: float, env: dict[str, str]) -> dict[str, Any]:
    server, port = await start_server(env)
    deadline = time.perf_counter() + time_limit
    sockets: list[Counter] = []
    try:
        tokens = [jwt.encode({"sub": f"user{n}", "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")
                  for n in range(clients)]
        verifiers = set(random.Random(1).sample(range(clients), min(verify, clients)))
        verifiers |= {0, clients - 1} if verify else set()  # the first joiner and the last one
        stats = Stats()
        limit = asyncio.Semaphore(CONNECTS_IN_FLIGHT)
        joins: list[asyncio.Future] = []

        async def one(n: int) -> None:
            async with limit:
                client, joined = await connect(port, tokens[n], Verifier if n in verifiers else Counter, stats)
            sockets.append(client)
            joins.append(joined)

        async with aiohttp.ClientSession() as http:
            cpu_before = cpu_seconds(server.pid)
            started = time.perf_counter()
            await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(clients))), time_limit)
            connected = time.perf_counter() - started
            await asyncio.wait_for(asyncio.gather(*joins), max(1.0, deadline - time.perf_counter()))
            replied = time.perf_counter() - started
            # Every client is tracked, then the frame flow stops: the last batched diff has reached everyone.
            while (present := await gauge(http, port, "push_presences")) != clients:
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"push_presences is {present}, expected {clients}")
                await asyncio.sleep(0.1)
            while time.perf_counter() - stats.last_frame < quiet:
                if time.perf_counter() > deadline:
                    raise TimeoutError("the frame flow did not stop within the time limit")
                await asyncio.sleep(0.05)
            settled = stats.last_frame - started
            cpu = cpu_seconds(server.pid) - cpu_before
            slow = await gauge(http, port, "push_slow_consumer_disconnects_total")
            diffs_broadcast = await gauge(http, port, "push_presence_diffs_total")

        presence_frames = stats.frames - clients  # everything but one join reply per client
        complete = [len(v.state or {}) == clients for v in sockets if isinstance(v, Verifier)]
        missing_state = sum(1 for s in sockets if s.frames < 2)
        unbatched = clients * (clients + 1) // 2 + clients  # one diff per join to everyone present, + states
        return {
            "clients": clients,
            "presence_frames": presence_frames,
            "presence_frames_per_client": round(presence_frames / clients, 1),
            "presence_diff_broadcasts": int(diffs_broadcast),
            "megabytes_received": round(stats.bytes / 1e6, 1),  # mostly presence_state: O(N) per joiner
            "unbatched_frames": unbatched,
            "n_squared": clients * clients,
            "batching_saves": f"{unbatched / max(presence_frames, 1):.0f}x",
            "connect_seconds": round(connected, 2),
            "all_join_replies_seconds": round(replied, 2),
            "settled_seconds": round(settled, 2),
            "server_cpu_seconds": round(cpu, 2),
            "verified_clients_with_full_room": f"{sum(complete)}/{len(complete)}",
            "clients_without_presence_state": missing_state,
            "slow_consumer_disconnects": int(slow),
            "close_frames": stats.closes,
        }
    finally:
        for client in sockets:
            if client.transport is not None:
                client.transport.abort()
        server.terminate()
        try:
            await asyncio.wait_for(server.wait(), 15)
        except (TimeoutError, asyncio.TimeoutError):
            server.kill()
            await server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--verify", type=int, default=20,
                        help="clients that decode every frame and check they end with the full room")
    parser.add_argument("--time-limit", type=float, default=300.0, help="give up after this many seconds")
    parser.add_argument("--quiet", type=float, default=1.0,
                        help="the frame flow has stopped when no frame came for this many seconds")
    parser.add_argument("--diff-interval", default=None, help="PUSH_PRESENCE_DIFF_INTERVAL (server default 50ms)")
    parser.add_argument("--send-buffer", default=None, help="PUSH_SEND_BUFFER_BYTES (server default 1MiB)")
    args = parser.parse_args()
    env = {"PUSH_HEARTBEAT_TIMEOUT": str(int(args.time_limit) + 60)}  # the clients send no heartbeats
    if args.diff_interval is not None:
        env["PUSH_PRESENCE_DIFF_INTERVAL"] = args.diff_interval
    if args.send_buffer is not None:
        env["PUSH_SEND_BUFFER_BYTES"] = args.send_buffer
    result = asyncio.run(run(args.clients, args.verify, args.time_limit, args.quiet, env))
    print(orjson.dumps(result).decode())
    for key, value in result.items():
        print(f"{key:>32}: {value}")
    verified, sampled = result["verified_clients_with_full_room"].split("/")
    if verified != sampled or result["clients_without_presence_state"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
