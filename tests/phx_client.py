"""A Phoenix Channels client over aiohttp's WebSocket, for the suites that speak the protocol to a running
server (cluster, history): frames as sent and received, every one read kept in `frames`."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiohttp
import orjson
from aiohttp import WSMsgType

from conftest import ServerProcess, make_token

TIMEOUT = 5.0  # for any one frame that should come promptly
Frame = Any  # a v2 array or a v1 object

S = TypeVar("S", bound="PhoenixSocket")


class PhoenixSocket:
    """vsn 2.0.0 arrays or 1.0.0 objects, as the connection asked."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, vsn: str = "2.0.0") -> None:
        self.ws = ws
        self.v1 = vsn == "1.0.0"
        self.frames: list[Frame] = []
        self._refs = itertools.count(1)

    def ref(self) -> str:
        return str(next(self._refs))

    async def send(self, join_ref: Any, ref: Any, topic: str, event: str, payload: Any) -> None:
        if self.v1:
            await self.ws.send_json({"topic": topic, "event": event, "payload": payload, "ref": ref})
        else:
            await self.ws.send_json([join_ref, ref, topic, event, payload])

    async def next(self, timeout: float = TIMEOUT) -> Frame:
        msg = await self.ws.receive(timeout=timeout)
        if msg.type is not WSMsgType.TEXT:
            raise AssertionError(f"socket closed or failed: {msg!r}; frames so far: {self.frames}")
        frame = orjson.loads(msg.data)
        self.frames.append(frame)
        return frame

    async def wait_for(self, predicate: Callable[[Frame], bool], timeout: float = TIMEOUT) -> Frame:
        """The first frame from now on that `predicate` takes; the ones before it are passed over."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                frame = await self.next(left)
            except (TimeoutError, asyncio.TimeoutError):
                break
            if predicate(frame):
                return frame
        raise AssertionError(f"no matching frame within {timeout}s; frames so far: {self.frames}")

    def messages(self, topic: str) -> list[Any]:
        """The payloads of the v2 new_msg broadcasts read so far on `topic`."""
        return [f[4] for f in self.frames if f[2] == topic and f[3] == "new_msg"]


@asynccontextmanager
async def open_socket(kind: type[S], http: aiohttp.ClientSession, server: ServerProcess, vsn: str = "2.0.0",
                      sub: str = "u1") -> AsyncIterator[S]:
    url = f"{server.ws_url}?vsn={vsn}&token={make_token(sub)}"
    async with http.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=2.0), autoping=True) as ws:
        yield kind(ws, vsn)
