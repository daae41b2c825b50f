"""What the tests ask a running server over HTTP, written once: publish through the API, read its metrics."""

from __future__ import annotations

from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from conftest import PUBLISH_KEY, ServerProcess, until

TIMEOUT = 10.0
PUBLISHER = {"Authorization": f"Bearer {PUBLISH_KEY}"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def bounded(seconds: float = TIMEOUT) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=seconds)


async def post_json(http: aiohttp.ClientSession, server: ServerProcess, path: str, body: Any, *,
                    status: int = 200, headers: dict[str, str] | None = PUBLISHER) -> Any:
    """POST `body` to `path` with the publish key; the answer must have `status`; returns its JSON body."""
    async with http.post(f"{server.http_url}{path}", json=body, headers=headers, timeout=bounded()) as response:
        assert response.status == status, (response.status, await response.text())
        return await response.json()


async def publish(http: aiohttp.ClientSession, server: ServerProcess, topic: str, payload: Any,
                  event: str = "new_msg", *, status: int = 200) -> Any:
    """POST /api/broadcast; the answer must have `status`; returns its JSON body."""
    return await post_json(http, server, "/api/broadcast", {"topic": topic, "event": event, "payload": payload},
                           status=status)


async def publish_numbered(http: aiohttp.ClientSession, server: ServerProcess, topic: str, first: int, count: int,
                           filler: str = "") -> None:
    """One POST /api/batch of `count` new_msg broadcasts with payloads {"seq": first..., "f": filler}."""
    await post_json(http, server, "/api/batch", {"messages": [
        {"topic": topic, "event": "new_msg", "payload": {"seq": first + i, "f": filler}} for i in range(count)]})


async def publish_status(http: aiohttp.ClientSession, server: ServerProcess, topic: str, payload: Any,
                         event: str = "new_msg") -> int:
    """POST /api/broadcast where more than one answer is right (a shard failing over: 200 or 503); its status."""
    async with http.post(f"{server.http_url}/api/broadcast", json={"topic": topic, "event": event, "payload": payload},
                         headers=PUBLISHER, timeout=bounded()) as response:
        await response.read()
        return response.status


async def metrics(http: aiohttp.ClientSession, server: ServerProcess) -> Samples:
    """Every sample of GET /metrics, by (name, labels)."""
    async with http.get(f"{server.http_url}/metrics", timeout=bounded()) as response:
        assert response.status == 200, response.status
        text = await response.text()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


async def metric(http: aiohttp.ClientSession, server: ServerProcess, name: str, *, exposed: bool = False,
                 **labels: str) -> float:
    """One sample's value; 0 when absent (a labelled counter appears at its first count) unless `exposed`
    says the server must expose it (a gauge that is always there)."""
    key = (name, frozenset(labels.items()))
    samples = await metrics(http, server)
    if exposed:
        assert key in samples, f"metric {name}{labels} not exposed by {server.http_url}"
    return samples.get(key, 0.0)


async def wait_for_metric(http: aiohttp.ClientSession, server: ServerProcess, name: str, expected: float,
                          timeout: float = TIMEOUT, **labels: str) -> None:
    """The server updates some gauges after the event that moves them (a close is seen later): wait, bounded."""
    seen: list[float] = []

    async def reached() -> bool:
        seen.append(await metric(http, server, name, **labels))
        return seen[-1] == expected

    try:
        await until(reached, timeout, f"{name}{labels} == {expected}")
    except AssertionError:
        last = seen[-1] if seen else None
        raise AssertionError(f"{name}{labels} is {last}, expected {expected} within {timeout}s") from None


async def connections_closed(server: ServerProcess, timeout: float = TIMEOUT) -> None:
    """Wait until the server holds no client connection: after a test on a shared server, so that the next
    one's `delivered` counts see only its own subscribers (a client's close reaches the server later)."""
    async with aiohttp.ClientSession() as http:
        for transport in ("websocket", "longpoll"):
            await wait_for_metric(http, server, "push_connections", 0, timeout, transport=transport)
