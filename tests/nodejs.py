"""The scripts in tests/js (the official phoenix client under Node), run from pytest.

Each script prints one JSON object per line for what it observes; `NodeScript` keeps them in
`events` and waits for the ones a test expects, always within a bounded time.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest

JS_DIR = Path(__file__).resolve().parent / "js"
TIMEOUT = 5.0  # for any one thing a client should observe

Event = dict[str, Any]
S = TypeVar("S", bound="NodeScript")


def node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: these tests need Node 20 and `npm ci --prefix tests/js`")
    if not (JS_DIR / "node_modules").is_dir():
        pytest.fail(f"{JS_DIR / 'node_modules'} is missing: run `npm ci --prefix tests/js` first")
    return node


class NodeScript:
    """A running script: every line it printed so far is in `events`."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.events: list[Event] = []

    async def _read(self, timeout: float) -> Event | None:
        """The next event, or None when nothing comes within `timeout`."""
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        except (TimeoutError, asyncio.TimeoutError):
            return None
        if not line:
            assert self.process.stderr is not None
            stderr = await asyncio.wait_for(self.process.stderr.read(), TIMEOUT)
            raise AssertionError(f"node script exited ({await self.process.wait()}): {stderr.decode()}\n"
                                 f"events: {self.events}")
        event = orjson.loads(line)
        self.events.append(event)
        return event

    async def wait_for(self, predicate: Callable[[Event], bool], timeout: float = TIMEOUT) -> Event:
        """The first event from now on that matches."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            event = await self._read(left)
            if event is not None and predicate(event):
                return event
        raise AssertionError(f"no matching event within {timeout}s; events so far: {self.events}")

    async def wait_event(self, kind: str, timeout: float = TIMEOUT, **fields: Any) -> Event:
        return await self.wait_for(
            lambda e: e["event"] == kind and all(e.get(key) == value for key, value in fields.items()), timeout)

    async def collect(self, seconds: float) -> list[Event]:
        """Everything printed during the next `seconds` (for tests where nothing must happen)."""
        deadline = time.monotonic() + seconds
        seen = []
        while (left := deadline - time.monotonic()) > 0:
            event = await self._read(left)
            if event is not None:
                seen.append(event)
        return seen

    async def send_line(self, line: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + b"\n")
        await self.process.stdin.drain()

    def seen(self, kind: str) -> list[Event]:
        return [e for e in self.events if e["event"] == kind]


@asynccontextmanager
async def run_script(script: Path, *args: Any, kind: type[S] = NodeScript) -> AsyncIterator[S]:  # type: ignore[assignment]
    """Start `node script args...`; the process is killed when the block ends, whatever happened."""
    process = await asyncio.create_subprocess_exec(
        node_binary(), str(script), *map(str, args), cwd=JS_DIR, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        yield kind(process)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
