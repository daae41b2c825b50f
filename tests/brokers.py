"""The shared Redis and NATS the cluster, recovery and chaos tests use (127.0.0.1:6379, :4222), and
throwaway broker processes for the tests that kill and restart one.

When one is missing (or its binary), a test fails with a clear message on CI (CI=true), where both
must be there, and is skipped on a developer's machine.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
import pytest

REDIS_URL = "redis://127.0.0.1:6379/0"
NATS_URL = "nats://127.0.0.1:4222"
START_TIMEOUT = 5.0  # for a throwaway broker process to be ready, or gone


def broker_missing(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: these tests need it)", pytrace=False)
    pytest.skip(message)


def _greeting(port: int, send: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as conn:
        if send:
            conn.sendall(send)
        conn.settimeout(2.0)
        return conn.recv(4096)


def require_redis() -> str:
    try:
        answer = _greeting(6379, b"PING\r\n")
    except OSError as exc:
        broker_missing(f"Redis is not reachable at {REDIS_URL}: {exc}")
    if not answer.startswith(b"+PONG"):
        broker_missing(f"the server at {REDIS_URL} does not answer PING like Redis: {answer[:80]!r}")
    return REDIS_URL


def require_nats() -> str:
    try:
        info = _greeting(4222, b"")
    except OSError as exc:
        broker_missing(f"NATS is not reachable at {NATS_URL}: {exc}")
    if not info.startswith(b"INFO "):
        broker_missing(f"the server at {NATS_URL} does not greet like NATS: {info[:80]!r}")
    if not orjson.loads(info[5:].split(b"\r\n", 1)[0]).get("jetstream"):
        broker_missing(f"NATS at {NATS_URL} runs without JetStream (start it with -js)")
    return NATS_URL


# --- throwaway brokers: processes of a test's own, which it may kill and restart


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        broker_missing(f"{name} is not installed (the outage tests start and kill their own)")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class BrokerProcess:
    """A redis-server or nats-server of our own: started, killed and restarted on one port."""

    def __init__(self, argv: list[str], ready_text: str, port: int) -> None:
        self.argv = argv
        self.ready_text = ready_text.encode()
        self.port = port
        self.process: asyncio.subprocess.Process | None = None
        self.output: list[bytes] = []
        self._pump: asyncio.Task[None] | None = None

    async def start(self) -> BrokerProcess:
        self.process = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        ready = asyncio.get_running_loop().create_future()
        self._pump = asyncio.create_task(self._read(self.process, ready))
        try:
            await asyncio.wait_for(ready, START_TIMEOUT)
        except (TimeoutError, asyncio.TimeoutError):
            await self.kill()
            raise AssertionError(f"{self.argv[0]} not ready within {START_TIMEOUT}s: {self.output[-20:]}") from None
        return self

    async def _read(self, process: asyncio.subprocess.Process, ready: asyncio.Future[None]) -> None:
        assert process.stdout is not None
        async for line in process.stdout:  # drained to the end, so the server never blocks on its log
            self.output.append(line)
            if self.ready_text in line and not ready.done():
                ready.set_result(None)
        if not ready.done():
            ready.set_exception(AssertionError(f"{self.argv[0]} exited: {self.output[-20:]}"))

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await asyncio.wait_for(self.process.wait(), START_TIMEOUT)
        if self._pump is not None:
            await asyncio.wait_for(self._pump, START_TIMEOUT)


# --- a proxy in front of a broker, to watch what a node sends it and to make the broker hang


class Proxy:
    """A TCP proxy to 127.0.0.1:`target`. `sent` is every byte the clients sent, in order; while
    `frozen`, nothing passes either way (a broker that hangs without closing)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.port = 0
        self.sent = bytearray()
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target)
        pumps = [asyncio.create_task(self._pump(reader, upstream_writer, self.sent)),
                 asyncio.create_task(self._pump(upstream_reader, writer, None))]
        self._tasks.update(pumps)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
        writer.close()
        upstream_writer.close()

    @property
    def frozen(self) -> bool:
        return not self._flowing.is_set()

    @frozen.setter
    def frozen(self, frozen: bool) -> None:
        if frozen:
            self._flowing.clear()
        else:
            self._flowing.set()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, record: bytearray | None) -> None:
        while data := await source.read(65536):
            await self._flowing.wait()
            if record is not None:
                record += data
            sink.write(data)
            await sink.drain()

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()


@asynccontextmanager
async def proxy_to(target: int) -> AsyncIterator[Proxy]:
    proxy = Proxy(target)
    server = await asyncio.start_server(proxy.serve, "127.0.0.1", 0)
    proxy.port = server.sockets[0].getsockname()[1]
    try:
        yield proxy
    finally:
        proxy.cancel()
        server.close()
