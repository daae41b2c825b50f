"""The admin API (/api/admin/*) against real server processes: its key, its refusals, and its effect on
clients on every node of a cluster over the test Redis and NATS (run with -s to see the measured times)."""

from __future__ import annotations

import signal
import time
import uuid
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType

from conftest import ADMIN_KEY, PUBLISH_KEY, ServerProcess, make_token, until
from nodejs import JS_DIR, run_script
from test_cluster import NODE_TIMEOUT, broker_url, connect, start_nodes  # noqa: F401  (fixture)
from test_redis_cluster import redis_cluster  # noqa: F401  (fixture)

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
TIMEOUT = 5.0
CLIENT = JS_DIR / "client.mjs"
LONGPOLL = JS_DIR / "longpoll.mjs"
ENDPOINTS = [("POST", "/api/admin/disconnect", {"user": "nobody", "reconnect": False}),
             ("POST", "/api/admin/unsubscribe", {"user": "nobody", "topic": "room:lobby:1"}),
             ("GET", "/api/admin/connections?user=nobody", None),
             ("GET", "/api/admin/nodes", None),
             ("GET", "/api/admin/topics", None)]


async def call(server: ServerProcess, method: str, path: str, body: Any = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.request(
            method, server.http_url + path, json=body, headers=ADMIN if headers is None else headers,
            timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


async def admin(server: ServerProcess, method: str, path: str, body: Any = None) -> Any:
    status, answer = await call(server, method, path, body)
    assert status == 200, answer
    return answer


async def node_id(server: ServerProcess) -> str:
    return (await admin(server, "GET", "/api/stats"))["node"]


async def see_each_other(nodes: list[ServerProcess]) -> None:
    """Until every node's /nodes lists them all: their heartbeats went round the broker."""
    async def all_listed() -> bool:
        for server in nodes:
            if len((await admin(server, "GET", "/api/admin/nodes"))["nodes"]) != len(nodes):
                return False
        return True

    await until(all_listed, NODE_TIMEOUT + 5, "every node listing every node")


async def closed_code(ws: aiohttp.ClientWebSocketResponse, timeout: float) -> int | None:
    """The close code the server sends, skipping what comes before it."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        msg = await ws.receive(timeout=left)
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
            return ws.close_code
    raise AssertionError(f"socket not closed within {timeout}s")


# ===================================================================== the key


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
async def test_only_an_admin_key_opens_the_admin_api(start_server, method, path, body):
    server = await start_server(PUSH_ADMIN_KEY=f"{ADMIN_KEY},rotated-admin-key-0123456789")
    status, answer = await call(server, method, path, body, headers={})
    assert (status, answer) == (401, {"error": "missing admin key (Authorization: Bearer <PUSH_ADMIN_KEY>)"})
    assert (await call(server, method, path, body, headers={"Authorization": "Bearer wrong"}))[0] == 401
    status, answer = await call(server, method, path, body, headers={"Authorization": f"Bearer {PUBLISH_KEY}"})
    assert status == 403 and "publish key cannot use the admin API" in answer["error"]
    assert (await call(server, method, path, body))[0] == 200
    assert (await call(server, method, path, body,
                       headers={"Authorization": "Bearer rotated-admin-key-0123456789"}))[0] == 200
    assert not [line for line in server.log_lines if ADMIN_KEY in str(line)], "the admin key was logged"


async def test_the_admin_key_publishes_too(server):
    status, answer = await call(server, "POST", "/api/broadcast", {"topic": "room:lobby:1", "event": "e"})
    assert (status, answer) == (200, {"status": 200, "published": 1, "delivered": 0})


async def test_production_without_an_admin_key_turns_the_admin_api_off(start_server):
    server = await start_server(PUSH_ENV="production", PUSH_ADMIN_KEY="")
    for method, path, body in ENDPOINTS:
        status, answer = await call(server, method, path, body)
        assert (status, answer) == (403, {"error": "the admin API is off: set PUSH_ADMIN_KEY to turn it on"}), path
    # Publishing is unaffected.
    assert (await call(server, "POST", "/api/broadcast", {"topic": "room:lobby:1", "event": "e"},
                       headers={"Authorization": f"Bearer {PUBLISH_KEY}"}))[0] == 200


# ===================================================================== refusals


@pytest.mark.parametrize(("method", "path", "body", "error"), [
    ("POST", "/api/admin/disconnect", {"reconnect": False}, "user must be the JWT sub"),
    ("POST", "/api/admin/disconnect", {"user": "", "reconnect": False}, "user must be the JWT sub"),
    ("POST", "/api/admin/disconnect", {"user": 7, "reconnect": False}, "user must be the JWT sub"),
    ("POST", "/api/admin/disconnect", {"user": "ada"}, "reconnect must be true"),
    ("POST", "/api/admin/disconnect", {"user": "ada", "reconnect": "no"}, "reconnect must be true"),
    ("POST", "/api/admin/disconnect", {"user": "ada", "reconnect": True, "reason": 5}, "reason must be a string"),
    ("POST", "/api/admin/disconnect", ["ada"], "body must be a JSON object"),
    ("POST", "/api/admin/unsubscribe", {"user": "ada"}, "topic must name a topic"),
    ("POST", "/api/admin/unsubscribe", {"user": "ada", "topic": "nope:1"}, "topic must name a topic"),
    ("GET", "/api/admin/connections", None, "user must be the JWT sub"),
    ("GET", "/api/admin/topics?limit=0", None, "limit must be a whole number from 1 to 1000"),
    ("GET", "/api/admin/topics?limit=x", None, "limit must be a whole number from 1 to 1000"),
])
async def test_bad_input_gets_a_clear_400(server, method, path, body, error):
    status, answer = await call(server, method, path, body)
    assert status == 400 and answer["error"].startswith(error), answer


async def test_a_body_that_is_not_json_is_refused(server):
    async with aiohttp.ClientSession() as http:
        async with http.post(server.http_url + "/api/admin/disconnect", data=b"{nope",
                             headers={**ADMIN, "Content-Type": "application/json"}) as response:
            assert (response.status, await response.json()) == (400, {"error": "body is not valid JSON"})
        async with http.post(server.http_url + "/api/admin/disconnect", data=b"user=ada", headers=ADMIN) as response:
            assert response.status == 415


# ===================================================================== one node


async def test_disconnect_closes_websocket_and_longpoll_connections_of_that_user_only(server):
    async with aiohttp.ClientSession() as http, connect(http, server, "ada") as ada, \
            connect(http, server, "ada") as again, connect(http, server, "bob") as bob:
        await ada.join("room:lobby:1")
        async with http.get(f"{server.http_url}/socket/longpoll",
                            params={"token": make_token("ada"), "vsn": "2.0.0"}) as response:
            poll_token = (await response.json())["token"]
        answer = await admin(server, "POST", "/api/admin/disconnect", {"user": "ada", "reconnect": False})
        assert answer == {"closed": {await node_id(server): 3}, "unanswered": []}
        assert await closed_code(ada.ws, TIMEOUT) == 1000
        assert await closed_code(again.ws, TIMEOUT) == 1000
        async with http.get(f"{server.http_url}/socket/longpoll",
                            params={"token": poll_token, "vsn": "2.0.0"}) as response:
            assert (await response.json())["status"] == 410
        await bob.heartbeat()  # someone else's socket stays
    async with aiohttp.ClientSession() as http, connect(http, server, "ada") as ada:
        await admin(server, "POST", "/api/admin/disconnect", {"user": "ada", "reconnect": True, "reason": "test"})
        assert await closed_code(ada.ws, TIMEOUT) == 4000
    def reasons() -> list[str]:
        return [line["reason"] for line in server.log_lines if line.get("event") == "admin_disconnect"]

    await until(lambda: len(reasons()) >= 2, TIMEOUT, "both disconnects logged")
    assert reasons() == ["", "test"]


@pytest.mark.slow
@pytest.mark.parametrize(("version", "reconnect", "reopens"), [
    ("16", False, False), ("17", False, False), ("16", True, True), ("17", True, True), ("18", True, True),
    # phoenix.js 1.8 reconnects after every close it did not make itself, whatever its code (README).
    ("18", False, True)])
async def test_phoenix_js_reconnects_after_a_disconnect_as_asked(server, version, reconnect, reopens):
    topic = f"room:lobby:{uuid.uuid4().hex}"
    async with run_script(CLIENT, version, f"ws://127.0.0.1:{server.port}/socket", "--token", make_token("ada"),
                          "--topic", topic, "--retry-ms", "100") as client:
        await client.wait_event("join", topic=topic, status="ok", timeout=10.0)
        await admin(server, "POST", "/api/admin/disconnect", {"user": "ada", "reconnect": reconnect})
        closed = await client.wait_event("close")
        assert closed["code"] == (4000 if reconnect else 1000)
        later = await client.collect(1.5)  # 15 of its retry intervals
        assert bool([e for e in later if e["event"] == "open"]) is reopens, later


@pytest.mark.parametrize("version", ["16", "17", "18"])
async def test_phoenix_js_over_longpoll_opens_a_new_session_after_any_disconnect(server, version):
    """The ended session answers 410; every phoenix.js then starts a new one (README "Server API")."""
    topic = f"room:lobby:{uuid.uuid4().hex}"
    async with run_script(LONGPOLL, version, f"http://127.0.0.1:{server.port}/socket", "--token",
                          make_token("ada"), "--topic", topic, "--retry-ms", "100") as client:
        await client.wait_event("join", topic=topic, status="ok", timeout=10.0)
        [before] = (await admin(server, "GET", "/api/admin/connections?user=ada"))["connections"]
        answer = await admin(server, "POST", "/api/admin/disconnect", {"user": "ada", "reconnect": False})
        assert list(answer["closed"].values()) == [1]
        await client.wait_event("join", topic=topic, status="ok", timeout=10.0)  # rejoined on a new session

        async def new_session() -> bool:
            rows = (await admin(server, "GET", "/api/admin/connections?user=ada"))["connections"]
            return [row["transport"] for row in rows] == ["longpoll"] and rows[0]["id"] != before["id"]

        await until(new_session, TIMEOUT, "a new long-poll session")


async def test_unsubscribe_sends_phx_close_and_a_presence_leave_and_keeps_the_socket(server):
    topic = f"room:topic:{uuid.uuid4().hex}"
    async with aiohttp.ClientSession() as http, connect(http, server, "ada") as ada, \
            connect(http, server, "bob") as bob:
        await ada.join(topic)
        await ada.join("room:lobby:1")
        await bob.join(topic)
        answer = await admin(server, "POST", "/api/admin/unsubscribe", {"user": "ada", "topic": topic})
        assert answer == {"unsubscribed": {await node_id(server): 1}, "unanswered": []}
        close = await ada.wait_for(lambda f: f[3] == "phx_close")
        assert close[2] == topic and close[0] == close[1] == "1"  # as after its own leave: phoenix.js does not rejoin
        await bob.wait_for(lambda f: f[3] == "presence_diff" and "ada" in f[4]["leaves"])
        await ada.heartbeat()  # the socket stays, and so does its other topic
        connections = await admin(server, "GET", "/api/admin/connections?user=ada")
        assert [row["topics"] for row in connections["connections"]] == [["room:lobby:1"]]


async def test_connections_show_transport_version_address_and_topics(server):
    async with aiohttp.ClientSession() as http, connect(http, server, "ada") as ada:
        await ada.join("room:lobby:7")
        before = time.time()
        async with http.get(f"{server.http_url}/socket/longpoll",
                            params={"token": make_token("ada"), "vsn": "1.0.0"}) as response:
            assert (await response.json())["status"] == 410
        answer = await admin(server, "GET", "/api/admin/connections?user=ada")
        me = await node_id(server)
        assert answer["user"] == "ada" and answer["truncated"] is False and answer["unanswered"] == []
        rows = answer["connections"]
        assert [(row["node"], row["transport"], row["vsn"], row["remote"], row["topics"]) for row in rows] == [
            (me, "websocket", "2.0.0", "127.0.0.1", ["room:lobby:7"]),
            (me, "longpoll", "1.0.0", "127.0.0.1", [])]
        # The API gives milliseconds; rounding is monotone, so compare at the same resolution.
        assert rows[0]["connected_at"] <= round(before, 3) <= rows[1]["connected_at"] <= round(time.time(), 3)
        assert all(row["id"].startswith(me + ".") for row in rows)
    assert (await admin(server, "GET", "/api/admin/connections?user=nobody"))["connections"] == []


async def test_topics_are_paginated_by_name_with_a_prefix(server):
    async with aiohttp.ClientSession() as http, connect(http, server, "ada") as ada, \
            connect(http, server, "bob") as bob:
        for topic in ("room:lobby:a", "room:lobby:b", "room:lobby:c", "user:ada"):
            await ada.join(topic)
        await bob.join("room:lobby:b")
        first = await admin(server, "GET", "/api/admin/topics?prefix=room:lobby:&limit=2")
        assert first["topics"] == [{"topic": "room:lobby:a", "subscribers": 1, "presence": None},
                                   {"topic": "room:lobby:b", "subscribers": 2, "presence": None}]
        assert first["next_cursor"] == "room:lobby:b"
        second = await admin(server, "GET", "/api/admin/topics?prefix=room:lobby:&limit=2&cursor=room:lobby:b")
        assert second == {"topics": [{"topic": "room:lobby:c", "subscribers": 1, "presence": None}],
                          "next_cursor": None, "unanswered": []}


async def test_nodes_describes_this_node(server):
    async with aiohttp.ClientSession() as http, connect(http, server, "ada") as ada:
        await ada.join("room:lobby:1")
        answer = await admin(server, "GET", "/api/admin/nodes")
    [row] = answer["nodes"]
    assert row["id"] == await node_id(server) and answer["unanswered"] == []
    assert row["connections"] == {"total": 1, "websocket": 1, "longpoll": 0}
    assert (row["topics"], row["subscriptions"], row["broker"]) == (1, 1, {"kind": "memory", "up": True})
    assert row["started_at"] <= time.time() and row["uptime_seconds"] >= 0 and row["version"]


async def test_nodes_show_joins_publish_latency_and_drops_for_the_console_charts(server):
    quiet = (await admin(server, "GET", "/api/admin/nodes"))["nodes"][0]
    assert quiet["publish_to_socket_p99_ms"] is None and quiet["totals"]["messages"] == 0
    async with aiohttp.ClientSession() as http, connect(http, server, "ada") as ada:
        await ada.join("room:lobby:1")
        await admin(server, "POST", "/api/broadcast", {"topic": "room:lobby:1", "event": "e", "payload": {}})
        rows: list[dict[str, Any]] = []

        async def delivered() -> bool:
            rows[:] = (await admin(server, "GET", "/api/admin/nodes"))["nodes"]
            return rows[0]["totals"]["deliveries"] == 1

        await until(delivered, TIMEOUT, "the broadcast delivered to ada")
        [row] = rows
    assert row["totals"] == {"joins": 1, "messages": 1, "deliveries": 1, "slow_consumer_drops": 0}
    assert row["joins_per_second"] > 0 and row["messages_per_second"] > 0
    assert 0 < row["publish_to_socket_p99_ms"] <= 1000 and row["slow_consumer_drops_per_second"] == 0


# ===================================================================== across nodes


async def test_disconnect_on_one_node_closes_a_socket_on_another_within_a_second(broker_url, start_server):
    a, b = await start_nodes(start_server, 2, broker_url)
    await see_each_other([a, b])
    async with aiohttp.ClientSession() as http, connect(http, b, "ada") as ada:
        await ada.join("room:lobby:1")
        started = time.monotonic()
        answer = await admin(a, "POST", "/api/admin/disconnect", {"user": "ada", "reconnect": False})
        code = await closed_code(ada.ws, TIMEOUT)
        took = time.monotonic() - started
    print(f"\n{broker_url.split(':')[0]}: disconnect on node A -> socket on node B closed in {took * 1000:.1f} ms")
    assert code == 1000 and took < 1.0
    assert answer == {"closed": {await node_id(a): 0, await node_id(b): 1}, "unanswered": []}


async def test_reads_and_unsubscribe_reach_every_node(broker_url, start_server):
    topic = f"room:topic:{uuid.uuid4().hex}"
    a, b = await start_nodes(start_server, 2, broker_url)
    await see_each_other([a, b])
    id_a, id_b = await node_id(a), await node_id(b)
    async with aiohttp.ClientSession() as http, connect(http, a, "ada") as on_a, connect(http, b, "ada") as on_b:
        await on_a.join(topic)
        await on_b.join(topic)
        for server in (a, b):  # any node answers for all
            rows = (await admin(server, "GET", "/api/admin/connections?user=ada"))["connections"]
            assert sorted((row["node"], row["topics"][0]) for row in rows) == sorted([(id_a, topic), (id_b, topic)])
            topics = await admin(server, "GET", f"/api/admin/topics?prefix={topic}")
            assert topics["topics"] == [{"topic": topic, "subscribers": 2,
                                         "presence": {"users": 1, "connections": 2}}]
        nodes = (await admin(b, "GET", "/api/admin/nodes"))["nodes"]
        assert sorted(row["id"] for row in nodes) == sorted([id_a, id_b])
        assert all(row["connections"]["websocket"] == 1 and row["broker"]["up"] for row in nodes)
        answer = await admin(a, "POST", "/api/admin/unsubscribe", {"user": "ada", "topic": topic})
        assert answer == {"unsubscribed": {id_a: 1, id_b: 1}, "unanswered": []}
        for socket in (on_a, on_b):
            await socket.wait_for(lambda f: f[3] == "phx_close" and f[2] == topic)
            await socket.heartbeat()


@pytest.mark.slow
async def test_disconnect_crosses_nodes_over_a_redis_cluster_too(redis_cluster, start_server):  # noqa: F811
    a, b = await start_nodes(start_server, 2, redis_cluster.url)
    await see_each_other([a, b])
    async with aiohttp.ClientSession() as http, connect(http, b, "ada") as ada:
        await ada.join("room:lobby:1")
        started = time.monotonic()
        answer = await admin(a, "POST", "/api/admin/disconnect", {"user": "ada", "reconnect": True})
        assert await closed_code(ada.ws, TIMEOUT) == 4000
        took = time.monotonic() - started
    print(f"\nredis cluster: disconnect on node A -> socket on node B closed in {took * 1000:.1f} ms")
    assert took < 1.0 and answer["closed"] == {await node_id(a): 0, await node_id(b): 1}


@pytest.mark.slow
async def test_a_killed_node_drops_out_of_nodes_within_the_node_timeout(broker_url, start_server):
    a, b = await start_nodes(start_server, 2, broker_url)
    await see_each_other([a, b])
    id_a = await node_id(a)
    killed = time.monotonic()
    await b.stop(signal.SIGKILL)

    async def only_a() -> bool:
        answer = await admin(a, "GET", "/api/admin/nodes")
        return [row["id"] for row in answer["nodes"]] == [id_a] and answer["unanswered"] == []

    await until(only_a, NODE_TIMEOUT + 2, "the killed node leaving /nodes")
    took = time.monotonic() - killed
    print(f"\n{broker_url.split(':')[0]}: killed node left /nodes after {took:.2f} s (PUSH_NODE_TIMEOUT={NODE_TIMEOUT})")
    # Meanwhile a disconnect still answers promptly, listing the node that did not answer.
    started = time.monotonic()
    assert (await admin(a, "POST", "/api/admin/disconnect", {"user": "x", "reconnect": True}))["closed"] == {id_a: 0}
    assert time.monotonic() - started < 1.5
