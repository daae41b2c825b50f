"""Cluster-level reads answer for the whole cluster on any node, not from the node's own replica:
GET /api/presence/<topic> and /count on a node where nobody joined the topic (Redis and NATS)."""

from __future__ import annotations

import uuid

import aiohttp
import pytest

from conftest import PUBLISH_KEY, ServerProcess, until
from http_helpers import bounded
from test_cluster import (  # noqa: F401 - fixtures used by name
    TIMEOUT,
    broker_process,
    connect,
    presence_broker_url,
    presences,
    ready_is,
    start_nodes,
)


async def count(http: aiohttp.ClientSession, server: ServerProcess, topic: str) -> dict:
    async with http.get(f"{server.http_url}/api/presence/{topic}/count", timeout=bounded(),
                        headers={"Authorization": f"Bearer {PUBLISH_KEY}"}) as response:
        assert response.status == 200, await response.text()
        return await response.json()


@pytest.mark.slow
async def test_presence_reads_are_cluster_wide_on_a_node_without_subscribers(presence_broker_url, start_server):
    topic = f"room:topic:{uuid.uuid4().hex}"
    serving, other = await start_nodes(start_server, 2, presence_broker_url)
    async with aiohttp.ClientSession() as http, connect(http, serving, "a") as a, connect(http, serving, "b") as b:
        for node in (serving, other):
            await ready_is(http, node, 200, TIMEOUT)
        await a.join(topic)
        await b.join(topic)
        expected = await until(lambda: _both(http, serving, topic), TIMEOUT, "both present on the serving node")

        # `other` has no subscriber of the topic, so no replica of it: it must read the cluster's state
        # (written to the broker just after the joins: waited for, not assumed).
        async def all_seen() -> bool:
            return await presences(http, other, topic) == expected

        await until(all_seen, TIMEOUT, "a and b seen by a node without subscribers")
        assert await count(http, other, topic) == {"topic": topic, "users": 2, "connections": 2}

        await b.ws.close()

        async def only_a() -> bool:
            return await presences(http, other, topic) == {"a": expected["a"]}

        await until(only_a, TIMEOUT, "b's leave seen by a node without subscribers")
        assert await count(http, other, topic) == {"topic": topic, "users": 1, "connections": 1}
        assert await presences(http, serving, topic) == {"a": expected["a"]}


async def _both(http: aiohttp.ClientSession, server: ServerProcess, topic: str) -> dict | None:
    view = await presences(http, server, topic)
    return view if set(view) == {"a", "b"} else None
