"""phoenix.js-like clients for run.py's `reconnect-storm` scenario, as a child process driven over stdin/stdout.

Each client connects to push-service, upgrades with its own token and joins one room (the join sent right
behind the upgrade request, as benchmarks/loadgen.c does), then holds the socket and sends a heartbeat every
30 s. When its socket closes, or a reconnect fails (refused, an HTTP error instead of 101, no answer within
--answer-timeout), it tries again after phoenix.js's `reconnectAfterMs` delay for that attempt
(10, 50, 100, 150, 200, 250, 500, 1000, 2000 ms, then 5000) plus up to half as much again at random, and
starts over from the first delay once joined.

Prints one JSON line per phase: `joined` once all --conns are joined (at most --inflight of them connecting at
a time, as loadgen's `connect`), and `rejoined` once all are joined again after the first socket was lost, or
when --storm-timeout has passed since then (with `complete: false`). Then waits for `quit` on stdin.

    python benchmarks/storm.py --port 4000 --tokens tokens.txt --conns 10000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

import orjson

# phoenix.js Socket's default reconnectAfterMs: the delay before attempt n (1-based), 5 s past the list.
BACKOFF_MS = (10, 50, 100, 150, 200, 250, 500, 1000, 2000)
BACKOFF_BEYOND_MS = 5000
JITTER = 0.5  # up to this fraction of the delay again, at random: clients do not retry in lockstep
HEARTBEAT_S = 30.0  # phoenix.js heartbeatIntervalMs
ANSWER_TIMEOUT_S = 10.0  # phoenix.js's own timeout is the connection's: a hung attempt is cut and retried


def masked_text_frame(payload: bytes) -> bytes:
    """A client text frame with a zero mask (the payload as is), up to 125 bytes."""
    assert len(payload) < 126
    return bytes((0x81, 0x80 | len(payload))) + b"\0\0\0\0" + payload


def masked_close(payload: bytes) -> bytes:
    return bytes((0x88, 0x80 | len(payload[:2]))) + b"\0\0\0\0" + payload[:2]


HEARTBEAT = masked_text_frame(b'[null,"hb","phoenix","heartbeat",{}]')


class Stats:
    def __init__(self, conns: int) -> None:
        self.conns = conns
        self.joined = 0
        self.attempts = 0  # connection attempts after the first loss
        self.failed = 0  # of those, the ones that did not end joined
        self.refused = 0  # of those, refused by the kernel (nothing listening)
        self.answers: dict[str, int] = {}  # HTTP status of failed upgrades
        self.max_tries = 0
        self.first_loss: float | None = None
        self.done = asyncio.get_running_loop().create_future()

    def changed(self) -> None:
        if self.joined == self.conns and not self.done.done():
            self.done.set_result(None)


class Client:
    """One phoenix.js socket with one channel joined; reconnects by phoenix.js's schedule."""

    def __init__(self, stats: Stats, port: int, index: int, token: str) -> None:
        self.stats = stats
        self.port = port
        self.request = (
            f"GET /socket/websocket?vsn=2.0.0&token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode() + masked_text_frame(
            f'["1","1","room:lobby:r{index % 1000}","phx_join",{{}}]'.encode())
        self.tries = 0
        self.transport: asyncio.Transport | None = None
        self.joined = False
        self.attempt_done: asyncio.Future[bool] | None = None

    async def connect_once(self) -> bool:
        """One attempt: True once joined, False if it failed."""
        loop = asyncio.get_running_loop()
        self.attempt_done = loop.create_future()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: Socket(self), "127.0.0.1", self.port),
                                   ANSWER_TIMEOUT_S)
            return await asyncio.wait_for(asyncio.shield(self.attempt_done), ANSWER_TIMEOUT_S)
        except ConnectionRefusedError:
            self.stats.refused += 1
            return False
        except (OSError, asyncio.TimeoutError):
            if self.transport is not None:
                self.transport.abort()
            return False

    async def reconnect(self) -> None:
        """After a loss: phoenix.js's schedule until joined again."""
        stats = self.stats
        while True:
            self.tries += 1
            stats.max_tries = max(stats.max_tries, self.tries)
            delay = (BACKOFF_MS[self.tries - 1] if self.tries <= len(BACKOFF_MS) else BACKOFF_BEYOND_MS) / 1000
            await asyncio.sleep(delay * (1 + JITTER * random.random()))
            stats.attempts += 1
            if await self.connect_once():
                return
            stats.failed += 1

    def on_joined(self) -> None:
        self.joined, self.tries = True, 0
        self.stats.joined += 1
        self.stats.changed()
        if self.attempt_done is not None and not self.attempt_done.done():
            self.attempt_done.set_result(True)

    def on_lost(self, status: str | None) -> None:
        self.transport = None
        if status is not None:
            self.stats.answers[status] = self.stats.answers.get(status, 0) + 1
        if self.attempt_done is not None and not self.attempt_done.done():
            self.attempt_done.set_result(False)  # the attempt failed: reconnect() goes on
        if self.joined:
            self.joined = False
            self.stats.joined -= 1
            if self.stats.first_loss is None:
                self.stats.first_loss = time.monotonic()
            asyncio.get_running_loop().create_task(self.reconnect())

    def heartbeat(self) -> None:
        if self.joined and self.transport is not None:
            self.transport.write(HEARTBEAT)


class Socket(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.buffer = b""
        self.status: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client.transport = transport  # type: ignore[assignment]
        transport.write(self.client.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.client.joined:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.buffer.startswith(b"HTTP/1.1 101 "):
                self.status = self.buffer[9:12].decode("latin-1")
                self.client.transport.close()  # type: ignore[union-attr]
                return
            rest = self.buffer[end + 4:]
            if b"phx_reply" not in rest:
                return
            if b'"ok"' not in rest:
                self.status = "join refused"
                self.client.transport.close()  # type: ignore[union-attr]
                return
            self.client.on_joined()
            self.buffer = rest  # the reply's frame and what follows it, read as frames from here on
        self.read_frames()

    def read_frames(self) -> None:
        """Heartbeat replies are dropped; a Close is answered and the socket closed, as a browser does."""
        buffer = self.buffer
        while len(buffer) >= 2:
            size, start = buffer[1] & 0x7F, 2
            if size == 126:
                size, start = int.from_bytes(buffer[2:4], "big"), 4
            elif size == 127:
                size, start = int.from_bytes(buffer[2:10], "big"), 10
            if len(buffer) < start + size:
                break
            if buffer[0] & 0x0F == 0x8:
                self.client.transport.write(masked_close(buffer[start:start + size]))  # type: ignore[union-attr]
                self.client.transport.close()  # type: ignore[union-attr]
                self.buffer = b""
                return
            buffer = buffer[start + size:]
        self.buffer = buffer

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.on_lost(self.status)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=Path, required=True, help="one JWT per line, one per client")
    parser.add_argument("--conns", type=int, default=10000)
    parser.add_argument("--inflight", type=int, default=200, help="clients connecting at once, first connect")
    parser.add_argument("--connect-timeout", type=float, default=120.0)
    parser.add_argument("--storm-timeout", type=float, default=120.0, help="after the first loss")
    args = parser.parse_args()
    tokens = args.tokens.read_text().split()
    stats = Stats(args.conns)
    clients = [Client(stats, args.port, index, tokens[index % len(tokens)]) for index in range(args.conns)]
    loop = asyncio.get_running_loop()

    started = time.monotonic()
    gate = asyncio.Semaphore(args.inflight)

    async def first_connect(client: Client) -> None:
        async with gate:
            while not await client.connect_once():
                await asyncio.sleep(0.1)

    await asyncio.wait_for(asyncio.gather(*(first_connect(client) for client in clients)), args.connect_timeout)
    seconds = time.monotonic() - started
    print(orjson.dumps({"phase": "joined", "conns": stats.joined, "seconds": round(seconds, 3),
                        "connects_per_s": round(stats.joined / seconds, 1)}).decode(), flush=True)

    def heartbeats() -> None:
        for client in clients:
            client.heartbeat()
        loop.call_later(HEARTBEAT_S, heartbeats)

    loop.call_later(HEARTBEAT_S, heartbeats)
    stats.done = loop.create_future()
    while stats.first_loss is None:  # wait for the restart
        await asyncio.sleep(0.01)
    cpu_before = time.process_time()
    try:
        await asyncio.wait_for(asyncio.shield(stats.done), args.storm_timeout)
        complete = True
    except asyncio.TimeoutError:
        complete = False
    print(orjson.dumps({
        "phase": "rejoined", "complete": complete, "conns": stats.joined,
        "seconds_since_first_loss": round(time.monotonic() - stats.first_loss, 3),
        "attempts": stats.attempts, "failed_attempts": stats.failed, "refused_by_kernel": stats.refused,
        "failed_answers": stats.answers, "max_tries": stats.max_tries,
        "client_cpu_s": round(time.process_time() - cpu_before, 3)}).decode(), flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # "quit", or EOF


if __name__ == "__main__":
    try:
        import uvloop
        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
