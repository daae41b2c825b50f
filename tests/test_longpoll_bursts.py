"""Bursts over long-poll: several broadcasts of one topic grouped into one hub Run between two polls.

A poll answer is `{"messages": [<frame string>, ...]}`: every frame of a Run must be its own element,
else the answer is not JSON and phoenix.js drops it (and every message in it) and reconnects.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from conftest import PUBLISH_KEY, ServerProcess, make_token
from nodejs import NodeScript, node_binary, run_script
from test_longpoll import LONGPOLL_CLIENT, RETRY_MS, VERSIONS, WINDOW

CHANNEL = "42"
TOPIC = f"room:lobby:{CHANNEL}"
PUBLISHERS = 8
PER_PUBLISHER = 5  # 40 publishes in all
TIMEOUT = 15.0


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=0)  # every publisher on its own connection, all at once
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
        yield session


async def post_message(http: aiohttp.ClientSession, server: ServerProcess, body: dict[str, Any]) -> None:
    async with http.post(f"{server.http_url}/api/message", json=body,
                         headers={"Authorization": f"Bearer {PUBLISH_KEY}"}) as response:
        assert response.status == 200, await response.text()


async def concurrent_publishes(http: aiohttp.ClientSession, server: ServerProcess) -> None:
    """PUBLISHERS publishers at once, each posting PER_PUBLISHER messages as fast as it can: the first
    round is PUBLISHERS concurrent POSTs; each publisher's own are in order (it awaits each answer)."""
    async def publisher(p: int) -> None:
        for n in range(PER_PUBLISHER):
            await post_message(http, server, {"channel_id": CHANNEL, "publisher": p, "n": n})

    await asyncio.gather(*(publisher(p) for p in range(PUBLISHERS)))


async def fire_all_at_once(http: aiohttp.ClientSession, server: ServerProcess) -> None:
    """PUBLISHERS * PER_PUBLISHER POSTs, all in flight together, each its own publisher."""
    await asyncio.gather(*(post_message(http, server, {"channel_id": CHANNEL, "publisher": 100 + i, "n": 0})
                           for i in range(PUBLISHERS * PER_PUBLISHER)))


async def received(client: NodeScript, count: int) -> list[tuple[int, int]]:
    """The (publisher, n) of the next `count` new_msg the client reports, then a quiet window in which
    nothing more (no duplicate) may come."""
    got: list[tuple[int, int]] = []
    for _ in range(count):
        try:
            event = await client.wait_event("message", name="new_msg", timeout=TIMEOUT)
        except AssertionError:
            raise AssertionError(f"received {len(got)} of {count}; unparsable answers: "
                                 f"{len(client.seen('console'))}, opens: {len(client.seen('open'))}") from None
        got.append((event["payload"]["publisher"], event["payload"]["n"]))
    extra = [e for e in await client.collect(WINDOW * 1.5) if e["event"] == "message"]
    assert extra == [], f"more than {count} messages: {extra}"
    return got


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("pattern", ["publishers", "all_at_once"])
async def test_phoenix_longpoll_receives_every_concurrent_publish_once_in_order(
        version: str, pattern: str, start_server: Callable[..., Any], http: aiohttp.ClientSession) -> None:
    node_binary()
    server = await start_server(PUSH_LONGPOLL_WINDOW=str(WINDOW))
    args = [version, f"{server.http_url}/socket", "--mode", "longpoll", "--retry-ms", str(RETRY_MS),
            "--topic", TOPIC, "--token", make_token()]
    async with run_script(LONGPOLL_CLIENT, *args) as client:
        assert (await client.wait_event("join", topic=TOPIC))["status"] == "ok"
        if pattern == "publishers":
            await concurrent_publishes(http, server)
        else:
            await fire_all_at_once(http, server)
        got = await received(client, PUBLISHERS * PER_PUBLISHER)
        assert len(set(got)) == len(got) == PUBLISHERS * PER_PUBLISHER
        for p in {publisher for publisher, _ in got}:
            ns = [n for publisher, n in got if publisher == p]
            assert ns == sorted(ns), f"publisher {p} out of order: {ns}"
        # Every answer parsed, and one session all along: the client never had to reconnect.
        assert client.seen("console") == [], client.seen("console")[:3]
        assert len(client.seen("open")) == 1, client.events
