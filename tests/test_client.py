"""push_service.client against a running server: what a backend calls, the errors it gets, and retries
on 503 only (against a server whose broker is down, and a stub that answers 503 and then 200)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web

from conftest import ADMIN_KEY, PUBLISH_KEY, ROOT, communicate, until
from brokers import free_port
from push_service.client import (AsyncPushClient, InvalidRequest, Forbidden, PushClient, Unauthorized, Unavailable,
                                 backoff)
from push_service.errors import ConfigError, PushServiceError
from test_cluster import connect
from test_examples import readme_block

TIMEOUT = 5.0


def sync_client(server, **keys: str) -> PushClient:
    return PushClient(server.http_url, timeout=TIMEOUT, **keys)


async def test_sync_client_publishes_and_reads_what_a_socket_sees(server):
    push = sync_client(server, publish_key=PUBLISH_KEY)
    topic, other = f"room:topic:{uuid.uuid4().hex}", f"room:lobby:{uuid.uuid4().hex}"
    async with aiohttp.ClientSession() as http, connect(http, server, "ada") as ada:
        await ada.join(topic)
        await ada.join(other)
        answer = await asyncio.to_thread(push.publish, topic, "new_msg", {"seq": 1})
        assert answer == {"status": 200, "published": 1, "delivered": 1}
        await ada.wait_for(lambda f: f[2:4] == [topic, "new_msg"] and f[4] == {"seq": 1})
        answer = await asyncio.to_thread(push.publish_batch, [(topic, "new_msg", {"seq": 2}),
                                                               {"topic": other, "event": "e", "payload": {}}])
        assert answer["published"] == 2
        assert (await asyncio.to_thread(push.broadcast, [topic, other], "hello", {"n": 3}))["published"] == 2
        await ada.wait_for(lambda f: f[2:4] == [other, "hello"])
        presence = await asyncio.to_thread(push.presence, topic)
        assert list(presence["presences"]) == ["ada"]


async def test_sync_client_reads_history(start_server):
    server = await start_server(PUSH_HISTORY_SIZE="10")
    push = sync_client(server, publish_key=PUBLISH_KEY)
    topic = f"room:lobby:{uuid.uuid4().hex}"
    for seq in range(3):
        await asyncio.to_thread(push.publish, topic, "new_msg", {"seq": seq})
    history = await asyncio.to_thread(push.history, topic, None, 2)
    assert [message["payload"] for message in history["messages"]] == [{"seq": 1}, {"seq": 2}]
    since = history["messages"][0]["position"]
    later = await asyncio.to_thread(push.history, topic, since)
    assert [message["payload"] for message in later["messages"]] == [{"seq": 2}]


async def test_sync_client_admin_calls_and_typed_refusals(server):
    push = sync_client(server, publish_key=PUBLISH_KEY, admin_key=ADMIN_KEY)
    async with aiohttp.ClientSession() as http, connect(http, server, "ada") as ada:
        await ada.join("room:lobby:1")
        [row] = (await asyncio.to_thread(push.connections, "ada"))["connections"]
        assert row["topics"] == ["room:lobby:1"]
        assert [node["connections"]["total"] for node in (await asyncio.to_thread(push.nodes))["nodes"]] == [1]
        assert (await asyncio.to_thread(push.topics, "room:"))["topics"][0]["topic"] == "room:lobby:1"
        assert list((await asyncio.to_thread(push.unsubscribe, "ada", "room:lobby:1"))["unsubscribed"].values()) == [1]
        closed = await asyncio.to_thread(push.disconnect, "ada", False, "banned")
        assert list(closed["closed"].values()) == [1]
    with pytest.raises(InvalidRequest) as refused:
        push.publish("nope", "e", {})
    assert refused.value.status == 400 and "unknown topic family" in refused.value.message
    assert isinstance(refused.value, PushServiceError)
    with pytest.raises(Forbidden):
        sync_client(server, admin_key=PUBLISH_KEY).nodes()
    with pytest.raises(Unauthorized):
        sync_client(server, publish_key="wrong").publish("room:lobby:1", "e", {})
    with pytest.raises(ConfigError):
        sync_client(server, publish_key=PUBLISH_KEY).disconnect("ada")
    # An admin key alone publishes too.
    assert sync_client(server, admin_key=ADMIN_KEY).publish("room:lobby:1", "e", {})["published"] == 1


async def test_async_client_does_the_same(server):
    async with AsyncPushClient(server.http_url, publish_key=PUBLISH_KEY, admin_key=ADMIN_KEY) as push, \
            aiohttp.ClientSession() as http, connect(http, server, "ada") as ada:
        await ada.join("room:lobby:9")
        assert (await push.publish("room:lobby:9", "new_msg", {"a": 1}))["delivered"] == 1
        assert (await push.broadcast(["room:lobby:9", "user:ada"], "e", {}))["published"] == 2
        assert (await push.publish_batch([("room:lobby:9", "e", {"n": 1})]))["published"] == 1
        assert len((await push.connections("ada"))["connections"]) == 1
        assert len((await push.nodes())["nodes"]) == 1
        assert (await push.topics(limit=1))["topics"][0]["topic"] == "room:lobby:9"
        assert list((await push.disconnect("ada", reconnect=True))["closed"].values()) == [1]
        with pytest.raises(InvalidRequest):
            await push.history("room:lobby:9")  # history is off on this server
        with pytest.raises(InvalidRequest):
            await push.unsubscribe("ada", "nope")


async def test_a_503_is_retried_a_bounded_number_of_times_then_raised(start_server):
    server = await start_server(PUSH_BROKER=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    push = PushClient(server.http_url, publish_key=PUBLISH_KEY, attempts=3, timeout=TIMEOUT)
    with pytest.raises(Unavailable) as failed:
        await asyncio.to_thread(push.publish, "room:lobby:1", "e", {})
    assert failed.value.status == 503

    def refusals() -> list[int]:
        return [line["status"] for line in server.log_lines if line.get("event") == "http_refused"]

    # The server logs a refusal as it answers it: the third line may reach us just after the third answer.
    await until(lambda: len(refusals()) >= 3, TIMEOUT, "the server to log three refusals")
    assert refusals() == [503, 503, 503]


@asynccontextmanager
async def stub(statuses: list[int], retry_after: str | None) -> AsyncIterator[tuple[str, list[float]]]:
    """A server answering the given statuses in turn (then 200); yields its URL and when each request came."""
    seen: list[float] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(time.monotonic())
        status = statuses[len(seen) - 1] if len(seen) <= len(statuses) else 200
        headers = {"Retry-After": retry_after} if retry_after is not None and status == 503 else {}
        body = {"status": 200, "published": 1, "delivered": 0} if status == 200 else {"error": f"status {status}"}
        return web.json_response(body, status=status, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


@pytest.mark.slow
async def test_retry_after_is_honoured_and_4xx_is_never_retried():
    async with stub([503, 503], "1") as (url, seen):
        async with AsyncPushClient(url, publish_key="k", attempts=4) as push:
            assert (await push.publish("room:lobby:1", "e", {}))["published"] == 1
        assert len(seen) == 3 and all(later - earlier >= 0.95 for earlier, later in zip(seen, seen[1:], strict=False))
    async with stub([400], None) as (url, seen):
        async with AsyncPushClient(url, publish_key="k", attempts=4) as push:
            with pytest.raises(InvalidRequest):
                await push.publish("room:lobby:1", "e", {})
        assert len(seen) == 1


def test_backoff_is_jittered_and_bounded():
    waits = [backoff(attempt, None) for attempt in range(1, 10) for _ in range(20)]
    assert all(0 <= wait <= 5.0 for wait in waits) and len(set(waits)) > 100
    assert backoff(1, "2") == 2.0 and backoff(1, "3600") == 30.0


async def test_the_readme_snippet_runs(server):
    script = readme_block("From Python, `push_service.client`", "python")
    env = {**os.environ, "PUSH_URL": server.http_url, "PUSH_SERVICE_KEY": PUBLISH_KEY, "PUSH_ADMIN_KEY": ADMIN_KEY,
           "PYTHONPATH": str(ROOT)}
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", script, env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await communicate(process, 20)
    assert process.returncode == 0, stderr.decode()
    assert "'connections': {'total': 0" in stdout.decode()
