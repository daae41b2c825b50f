"""Shared fixtures: a real server process on a free loopback port, and tokens for it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import jwt
import orjson
import pytest_asyncio

ROOT = Path(__file__).resolve().parent.parent
PUBLISH_KEY = "test-publish-key-0123456789abcdef"
ADMIN_KEY = "test-admin-key-0123456789abcdef"
JWT_SECRET = "test-jwt-secret-0123456789abcdef0123456789"
START_TIMEOUT = 15.0

pytest_plugins = ["parallel"]  # the suite on two workers: tests/parallel.py


def make_token(sub: str = "u1", *, secret: str = JWT_SECRET, algorithm: str = "HS256", ttl: float = 3600,
               **claims: Any) -> str:
    now = int(time.time())
    body: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + ttl}
    body.update(claims)
    return jwt.encode(body, secret, algorithm=algorithm)


T = TypeVar("T")


async def until(check: Callable[[], Awaitable[T] | T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll `check` (sync or async) until it returns something truthy, for state that announces no event."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout}s (last: {value!r})")
        await asyncio.sleep(interval)


def unread_bytes(port: int) -> int:
    """Bytes the kernel holds for connections to local `port` that the process listening there has not read
    yet (the receive queues in /proc/net/tcp): 0 once the server has taken in all that was sent to it."""
    unread = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                local_port, state, queues = int(fields[1].rsplit(":", 1)[1], 16), fields[3], fields[4]
                if local_port == port and state == "01":  # an established connection, the server's end
                    unread += int(queues.split(":")[1], 16)
    return unread


async def server_has_read(port: int, timeout: float = 5.0) -> None:
    """Wait until the server on `port` has read everything sent to it: what a test that sends a request in
    pieces, or wants a request waiting at the server, must know before it goes on."""
    await until(lambda: unread_bytes(port) == 0, timeout, f"the server on port {port} reading what it was sent")


async def read_answer(reader: asyncio.StreamReader, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer off a raw connection: (status, headers by lower-case name, body by Content-Length)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip()
               for name, _, value in (line.partition(":") for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), timeout)
    return int(lines[0].split(" ")[1]), headers, body


async def communicate(process: asyncio.subprocess.Process, timeout: float) -> tuple[bytes, bytes]:
    """A child's stdout and stderr once it exits; killed (and reaped) if it has not within `timeout`."""
    try:
        return await asyncio.wait_for(process.communicate(), timeout)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


class ServerProcess:
    """`python -m push_service serve` as a child process; `port` is known once it logs "listening"."""

    def __init__(self, env: dict[str, str], args: list[str]) -> None:
        self.env = env
        self.args = args
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None
        self.log_lines: list[dict[str, Any]] = []
        self.stdout = b""
        self._pump: asyncio.Task[None] | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/socket/websocket"

    async def start(self, port: int = 0) -> ServerProcess:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "push_service", "serve", "--host", "127.0.0.1", "--port", str(port), *self.args,
            env=self.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT)
        listening = asyncio.get_running_loop().create_future()
        self._pump = asyncio.create_task(self._read_logs(listening))
        try:
            self.port = await asyncio.wait_for(listening, START_TIMEOUT)
        except (TimeoutError, asyncio.TimeoutError):
            await self.stop()
            raise RuntimeError(f"server did not start within {START_TIMEOUT}s: {self.log_lines}") from None
        return self

    async def _read_logs(self, listening: asyncio.Future[int]) -> None:
        assert self.process is not None and self.process.stderr is not None
        async for raw in self.process.stderr:
            try:
                entry = orjson.loads(raw)
            except orjson.JSONDecodeError:
                entry = {"raw": raw.decode(errors="replace")}
            self.log_lines.append(entry)
            if entry.get("event") == "listening" and not listening.done():
                listening.set_result(entry["port"])
        if not listening.done():
            listening.set_exception(RuntimeError(f"server exited before listening: {self.log_lines}"))

    async def wait_for_log(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0,
                           since: int = 0) -> dict:
        """The first log line from index `since` on (a shared server's: `len(log_lines)` before the test acts)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.log_lines[since:]:
                if predicate(entry):
                    return entry
            await asyncio.sleep(0.05)
        raise AssertionError(f"no matching log line within {timeout}s: {self.log_lines[-20:]}")

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.process is None or self.process.returncode is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(sig)
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except (TimeoutError, asyncio.TimeoutError):
            self.process.kill()
            await self.process.wait()
        if self.process.stdout is not None:
            self.stdout = await self.process.stdout.read()
        if self._pump is not None:
            await asyncio.wait_for(self._pump, timeout)
        return self.process.returncode


def server_env(**overrides: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PUSH_")}
    # History off unless a test asks for it: frames are then exactly Phoenix's (ref null on broadcasts,
    # empty join responses), which is what the protocol tests pin down. tests/test_history.py turns it on.
    env.update({"PUSH_SERVICE_KEY": PUBLISH_KEY, "PUSH_ADMIN_KEY": ADMIN_KEY, "PUSH_JWT_SECRET": JWT_SECRET, "PUSH_LOG_FORMAT": "json",
                "PUSH_HISTORY_SIZE": "0", "PYTHONUNBUFFERED": "1"})
    env.update(overrides)
    return env


def server_starter(loop_scope: str = "function") -> Any:
    """The `start_server` fixture on the given event loop: a module whose tests run on the module's loop
    (see shared_server) assigns `start_server = server_starter("module")`."""
    @pytest_asyncio.fixture(loop_scope=loop_scope)
    async def start_server() -> AsyncIterator[Callable[..., Any]]:
        """Factory: `await start_server(PUSH_HEARTBEAT_TIMEOUT="2")` -> a started ServerProcess, stopped after
        the test."""
        servers: list[ServerProcess] = []

        async def start(*args: str, port: int = 0, **env: str) -> ServerProcess:
            server = ServerProcess(server_env(**env), list(args))
            servers.append(server)
            return await server.start(port)

        yield start
        for server in servers:
            await server.stop()

    return start_server


start_server = server_starter()


def per_test_server(loop_scope: str = "function") -> Any:
    """The `server` fixture on the given event loop (as server_starter)."""
    @pytest_asyncio.fixture(loop_scope=loop_scope)
    async def server(start_server: Callable[..., Any]) -> ServerProcess:
        """A server with the test keys and default settings, for one test."""
        return await start_server()

    return server


server = per_test_server()


def shared_server(**env: str) -> Any:
    """A module-scoped fixture: one server, started once, for the tests of a module that each look only at
    their own topics, clients and log lines. Tests using it run on the module's event loop (the server's
    pipes belong to it): mark them `pytest.mark.asyncio(loop_scope="module")`."""
    @pytest_asyncio.fixture(scope="module", loop_scope="module")
    async def fixture() -> AsyncIterator[ServerProcess]:
        server = await ServerProcess(server_env(**env), []).start()
        yield server
        await server.stop()

    return fixture


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def module_servers() -> AsyncIterator[Callable[..., Awaitable[list[ServerProcess]]]]:
    """Factory: `await module_servers(count, **env)` -> `count` servers with those settings, started at the
    first test that asks and kept for the module's others that ask the same (each looking only at its own
    topics); such tests are marked `pytest.mark.asyncio(loop_scope="module")`, as with shared_server."""
    started: dict[tuple[int, tuple[tuple[str, str], ...]], list[ServerProcess]] = {}

    async def get(count: int = 1, **env: str) -> list[ServerProcess]:
        key = (count, tuple(sorted(env.items())))
        if key not in started:
            started[key] = [ServerProcess(server_env(**env), []) for _ in range(count)]
            await asyncio.gather(*(server.start() for server in started[key]))
        return started[key]

    yield get
    for servers in started.values():
        for server in servers:
            await server.stop()
