"""Several nodes on one broker (Redis or NATS), each a real `push-service serve` process on loopback.

The shared brokers are the real servers at 127.0.0.1:6379 (Redis) and 127.0.0.1:4222 (NATS with
JetStream); every test uses topics of its own (uuid), so tests never see each other's data. The
outage tests (and the NATS presence tests, see presence_broker_url) start throwaway `redis-server` /
`nats-server` processes on free ports, which they may kill and restart. A broker that cannot be
reached, or a missing redis-server / nats-server binary, fails the test when CI=true and skips it
otherwise. Every node runs with PUSH_NODE_TIMEOUT=3 so that a dead node is noticed quickly.
"""

from __future__ import annotations

import asyncio
import calendar
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import WSMsgType

from conftest import PUBLISH_KEY, ServerProcess, make_token, until
from brokers import BrokerProcess, free_port, require_binary, require_nats, require_redis
from http_helpers import bounded, metric, publish
from phx_client import PhoenixSocket, open_socket
from nodejs import JS_DIR, NodeScript, node_binary, run_script

NODE_TIMEOUT = 3.0   # PUSH_NODE_TIMEOUT of every node here
TIMEOUT = 5.0        # for any one thing that should happen promptly
RECOVERY = 15.0      # broker reconnects back off up to 5 s between attempts
CLIENT = JS_DIR / "client.mjs"
OK = {"status": "ok", "response": {}}

Frame = list[Any]
Event = dict[str, Any]


# ===================================================================== brokers: shared, throwaway




@pytest.fixture(params=["redis", "nats"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """The shared Redis or NATS (the test runs once for each)."""
    return require_redis() if request.param == "redis" else require_nats()


@pytest.fixture
def redis_url() -> str:
    return require_redis()


@pytest.fixture
async def broker_process(tmp_path: Path) -> AsyncIterator[Callable[[str], Awaitable[BrokerProcess]]]:
    """Factory: `await broker_process("redis" | "nats", port=None)` -> a started BrokerProcess, killed at the end."""
    started: list[BrokerProcess] = []

    async def start(kind: str, port: int | None = None) -> BrokerProcess:
        port = port or free_port()
        if kind == "redis":
            argv = [require_binary("redis-server"), "--bind", "127.0.0.1", "--port", str(port),
                    "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
            process = BrokerProcess(argv, "Ready to accept connections", port)
        else:
            argv = [require_binary("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-js",
                    "-sd", str(tmp_path / "nats")]
            process = BrokerProcess(argv, "Server is ready", port)
        started.append(process)
        return await process.start()

    yield start
    for process in started:
        await process.kill()


def url_of(kind: str, broker: BrokerProcess) -> str:
    return f"redis://127.0.0.1:{broker.port}/0" if kind == "redis" else f"nats://127.0.0.1:{broker.port}"


# ===================================================================== waiting, HTTP


async def start_nodes(start_server: Callable[..., Any], count: int, broker: str, **env: str) -> list[ServerProcess]:
    return list(await asyncio.gather(*(
        start_server(PUSH_BROKER=broker, PUSH_NODE_TIMEOUT=str(NODE_TIMEOUT), **env) for _ in range(count))))


def log_time(line: Event) -> float:
    """A JSON log line's time, in seconds (its "time" is UTC with milliseconds)."""
    stamp, milliseconds = line["time"].rstrip("Z").split(".")
    return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S")) + int(milliseconds) / 1000


async def readyz(http: aiohttp.ClientSession, server: ServerProcess) -> int:
    async with http.get(f"{server.http_url}/readyz", timeout=bounded()) as response:
        return response.status


async def ready_is(http: aiohttp.ClientSession, server: ServerProcess, status: int, timeout: float) -> None:
    async def check() -> bool:
        return await readyz(http, server) == status

    await until(check, timeout, f"{server.http_url}/readyz {status}")


async def presences(http: aiohttp.ClientSession, server: ServerProcess, topic: str) -> dict[str, list[str]]:
    """GET /api/presence/<topic> as {key: sorted phx_refs}."""
    async with http.get(f"{server.http_url}/api/presence/{topic}", timeout=bounded(),
                        headers={"Authorization": f"Bearer {PUBLISH_KEY}"}) as response:
        assert response.status == 200, await response.text()
        body = await response.json()
    assert body["topic"] == topic
    return {key: sorted(meta["phx_ref"] for meta in entry["metas"]) for key, entry in body["presences"].items()}


# ===================================================================== clients


class Socket(PhoenixSocket):
    """A raw Phoenix v2 WebSocket that joins as phoenix.js would, presence topics included."""

    async def join(self, topic: str) -> dict[str, Any] | None:
        """Join; returns the presence_state payload on a presence topic, else None."""
        ref = self.ref()
        await self.send(ref, ref, topic, "phx_join", {})
        # phoenix.js waits 10 s for a join reply by default; ours waits for the broker's subscription.
        reply = await self.wait_for(lambda f: f[1] == ref, timeout=10.0)
        assert reply == [ref, ref, topic, "phx_reply", OK], reply
        if topic.startswith("room:topic:"):
            state = await self.next()
            assert state[:4] == [ref, None, topic, "presence_state"], state
            return state[4]
        return None

    async def heartbeat(self) -> None:
        ref = self.ref()
        await self.send(None, ref, "phoenix", "heartbeat", {})
        reply = await self.wait_for(lambda f: f[1] == ref)
        assert reply == [None, ref, "phoenix", "phx_reply", OK], reply


def connect(http: aiohttp.ClientSession, server: ServerProcess, sub: str = "u1") -> AbstractAsyncContextManager[Socket]:
    return open_socket(Socket, http, server, sub=sub)


def is_message(seq: Any) -> Callable[[Frame], bool]:
    return lambda f: f[3] == "new_msg" and f[4].get("seq") == seq


class JsClient(NodeScript):
    """tests/js/client.mjs (the official phoenix 1.8 client) running under Node."""

    def messages(self, topic: str) -> list[Any]:
        return [e["payload"] for e in self.events if e["event"] == "message" and e["topic"] == topic]


@pytest.fixture
def js_client() -> Callable[..., Any]:
    node_binary()

    @asynccontextmanager
    async def start(server: ServerProcess, topic: str, sub: str = "u1") -> AsyncIterator[JsClient]:
        async with run_script(CLIENT, "18", f"ws://127.0.0.1:{server.port}/socket", "--token", make_token(sub),
                              "--topic", topic, "--retry-ms", "150", kind=JsClient) as client:
            yield client

    return start


# ===================================================================== 1. broadcasts across nodes


@pytest.mark.slow
async def test_broadcasts_reach_every_node_exactly_once_in_order(broker_url, start_server, js_client):
    topic = f"room:lobby:{uuid.uuid4().hex}"
    nodes = await start_nodes(start_server, 3, broker_url)
    async with aiohttp.ClientSession() as http, AsyncExitStack() as stack:
        # A phoenix.js client on every node, and a raw socket besides on node 1.
        clients = [await stack.enter_async_context(js_client(node, topic, sub=f"js{n}"))
                   for n, node in enumerate(nodes)]
        raw = await stack.enter_async_context(connect(http, nodes[0], "raw"))
        await raw.join(topic)
        for client in clients:
            joined = await client.wait_for(lambda e: e["event"] == "join", timeout=12.0)
            assert joined == {"event": "join", "topic": topic, "status": "ok", "response": {}}

        for seq in range(20):
            # `delivered` counts node 1's own subscribers only: its phoenix.js client and the raw socket.
            assert await publish(http, nodes[0], topic, {"seq": seq}) == {"status": 200, "published": 1,
                                                                           "delivered": 2}
        # Delivery keeps the publish order, so a duplicate of any of the 20 would come before this one.
        await publish(http, nodes[0], topic, {"seq": "end"})

        expected = [{"seq": seq} for seq in range(20)] + [{"seq": "end"}]
        for n, client in enumerate(clients):
            await client.wait_for(lambda e: e["event"] == "message" and e["payload"] == {"seq": "end"})
            assert client.messages(topic) == expected, f"phoenix.js client on node {n + 1}"
            assert not [e for e in client.events if e["event"] in ("close", "error", "channel_error")], client.events
        await raw.wait_for(is_message("end"))
        assert raw.messages(topic) == expected


# ===================================================================== 2. presence across nodes

LEAVES_WITHIN = NODE_TIMEOUT + 1.5  # from a node's death to its users' presence leaves on the others


async def leaves(sock: Socket, topic: str, expected: dict[str, list[str]], deadline: float) -> None:
    """presence_diff leaves on `sock` add up to `expected` ({key: phx_refs}), and to nothing else, by `deadline`."""
    left: dict[str, list[str]] = {}

    def complete(frame: Frame) -> bool:
        if frame[2] == topic and frame[3] == "presence_diff":
            for key, entry in frame[4]["leaves"].items():
                left[key] = sorted(left.get(key, []) + [meta["phx_ref"] for meta in entry["metas"]])
        assert set(left) <= set(expected), f"unexpected leaves {left}, expected {expected}"
        return left == {key: sorted(refs) for key, refs in expected.items()}

    await sock.wait_for(complete, timeout=max(0.0, deadline - time.monotonic()))


@pytest.fixture(params=["redis", "nats"])
async def presence_broker_url(request: pytest.FixtureRequest, broker_process: Any) -> str:
    """The shared Redis; for NATS a throwaway server. The NATS heartbeat bucket (push_nodes) is one for
    every cluster on a NATS account, and each node sets its TTL from its own PUSH_NODE_TIMEOUT when it
    starts: another session's nodes on the shared NATS (default 15 s) could change it mid-test."""
    if request.param == "redis":
        return require_redis()
    return url_of("nats", await broker_process("nats"))


@pytest.mark.slow
async def test_presence_is_shared_and_a_killed_nodes_users_leave(presence_broker_url, start_server):
    topic = f"room:topic:{uuid.uuid4().hex}"
    nodes = await start_nodes(start_server, 3, presence_broker_url)
    # Node 3 carries two connections of one user ("c") and one of another ("d").
    users = [("a", 0), ("b", 1), ("c", 2), ("c", 2), ("d", 2)]
    async with aiohttp.ClientSession() as http, AsyncExitStack() as stack:
        sockets = []
        for sub, index in users:
            sock = await stack.enter_async_context(connect(http, nodes[index], sub))
            await sock.join(topic)
            sockets.append(sock)

        async def converged() -> dict[str, list[str]] | None:
            views = [await presences(http, node, topic) for node in nodes]
            full = all(set(view) == {"a", "b", "c", "d"} and len(view["c"]) == 2 for view in views)
            return views[0] if full and views[0] == views[1] == views[2] else None

        view = await until(converged, TIMEOUT, "the three nodes agree on presence")
        survivors, (a_sock, b_sock) = nodes[:2], sockets[:2]

        deadline = time.monotonic() + LEAVES_WITHIN
        await nodes[2].stop(signal.SIGKILL)
        for sock in (a_sock, b_sock):
            await leaves(sock, topic, {"c": view["c"], "d": view["d"]}, deadline)
        for node in survivors:
            assert await presences(http, node, topic) == {"a": view["a"], "b": view["b"]}

        # A later joiner on a survivor loads the cluster's presence without the dead node's entries.
        late = await stack.enter_async_context(connect(http, nodes[1], "e"))
        state = await late.join(topic)
        assert state is not None and set(state) == {"a", "b", "e"}, state
        for sock in (a_sock, b_sock):
            await sock.heartbeat()  # still connected


@pytest.mark.slow
async def test_nats_node_heartbeat_ttl_follows_the_node_timeout(broker_process, start_server):
    """The push_nodes bucket (its TTL makes heartbeats lapse) is made by the first node that needs it;
    nodes started later with another PUSH_NODE_TIMEOUT must still see a dead node in time."""
    broker = await broker_process("nats")
    url = url_of("nats", broker)
    first = await start_server(PUSH_BROKER=url, PUSH_NODE_TIMEOUT="60")  # creates it with a 40 s TTL
    await first.stop()
    nodes = await start_nodes(start_server, 2, url)
    topic = f"room:topic:{uuid.uuid4().hex}"
    async with aiohttp.ClientSession() as http, connect(http, nodes[0], "a") as watcher, \
            connect(http, nodes[1], "b") as doomed:
        await watcher.join(topic)
        state = await doomed.join(topic)
        assert state is not None
        refs = [meta["phx_ref"] for meta in state["b"]["metas"]]
        await watcher.wait_for(lambda f: f[3] == "presence_diff" and "b" in f[4]["joins"])
        deadline = time.monotonic() + LEAVES_WITHIN
        await nodes[1].stop(signal.SIGKILL)
        await leaves(watcher, topic, {"b": refs}, deadline)


# ===================================================================== 3, 4. broker outage


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["redis", "nats"])
async def test_broker_outage_and_recovery(kind, broker_process, start_server):
    topic = f"room:lobby:{uuid.uuid4().hex}"
    broker = await broker_process(kind)
    nodes = await start_nodes(start_server, 2, url_of(kind, broker))
    async with aiohttp.ClientSession() as http, AsyncExitStack() as stack:
        sockets = [await stack.enter_async_context(connect(http, node, f"s{n}")) for n, node in enumerate(nodes)]
        for sock in sockets:
            await sock.join(topic)
        await publish(http, nodes[0], topic, {"seq": 0})
        for sock in sockets:
            await sock.wait_for(is_message(0))

        await broker.kill()
        for node in nodes:
            await ready_is(http, node, 503, TIMEOUT)
        for node in nodes:
            assert await publish(http, node, topic, {"seq": "lost"}, status=503) == {"error": "broker unavailable"}
            assert await metric(http, node, "push_broker_up", exposed=True) == 0
        for sock in sockets:
            await sock.heartbeat()  # the sockets stay up and answered while the broker is away

        await broker.start()  # the same port again
        for node in nodes:
            await ready_is(http, node, 200, RECOVERY)
            assert await metric(http, node, "push_broker_up", exposed=True) == 1
            assert await metric(http, node, "push_broker_reconnects_total", exposed=True) >= 1
        assert await publish(http, nodes[0], topic, {"seq": 1}) == {"status": 200, "published": 1, "delivered": 1}
        for sock in sockets:  # node 2 hears the topic again: it resubscribed
            await sock.wait_for(is_message(1))
            assert sock.messages(topic) == [{"seq": 0}, {"seq": 1}]
            await sock.heartbeat()


# ===================================================================== 5. serve --workers 2


def _children(pid: int) -> dict[int, str]:
    """pid -> command line of each child process of `pid`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found[int(entry.name)] = cmdline
    return found


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited, only its reaping is left


@pytest.mark.slow
async def test_workers_share_the_port_and_stop_together(redis_url, start_server):
    topic = f"room:topic:{uuid.uuid4().hex}"
    port = free_port()
    server = await start_server("--workers", "2", port=port, PUSH_BROKER=redis_url,
                                PUSH_NODE_TIMEOUT=str(NODE_TIMEOUT), PUSH_DRAIN_SECONDS="0.5")
    await until(lambda: sum(entry.get("event") == "listening" for entry in server.log_lines) == 2,
                15.0, "both workers listening")
    assert server.process is not None
    children = _children(server.process.pid)  # the workers (and multiprocessing's resource tracker)
    assert sum("spawn_main" in cmdline for cmdline in children.values()) == 2, children

    store = aioredis.from_url(redis_url, socket_timeout=TIMEOUT)
    try:
        async with aiohttp.ClientSession() as http, AsyncExitStack() as stack:
            sockets = [await stack.enter_async_context(connect(http, server, f"w{n}")) for n in range(16)]
            for sock in sockets:
                await sock.join(topic)

            # Presence entries are keyed `<node id>.<n>`: the 16 connections landed on two nodes.
            async def entries() -> dict[bytes, bytes] | None:
                found = await store.hgetall(f"push:p:{topic}")
                return found if len(found) == 16 else None

            nodes = {conn_id.split(b".")[0] for conn_id in await until(entries, TIMEOUT, "16 presence entries")}
            assert len(nodes) == 2, nodes

            body = await publish(http, server, topic, {"seq": 0})
            assert body["published"] == 1 and 0 < body["delivered"] < 16, body
            await publish(http, server, topic, {"seq": "end"})
            for sock in sockets:
                await sock.wait_for(is_message("end"))
                assert sock.messages(topic) == [{"seq": 0}, {"seq": "end"}]

            started = time.monotonic()
            assert await server.stop(signal.SIGTERM, timeout=10.0) == 0
            assert time.monotonic() - started < 10.0
            for sock in sockets:
                msg = await sock.ws.receive(timeout=TIMEOUT)
                while msg.type is WSMsgType.TEXT:  # presence diffs may still be queued before the close
                    msg = await sock.ws.receive(timeout=TIMEOUT)
                # The server's close frame (it has exited since, so close_code holds our failed answer):
                # 1001 going away or 1012 service restart, never 1000, so that phoenix.js reconnects.
                assert msg.type is WSMsgType.CLOSE and msg.data in (1001, 1012), msg
    finally:
        await store.aclose()
    await until(lambda: not any(_running(pid) for pid in children), TIMEOUT, f"child processes {children} gone")


# ===================================================================== 6. no broker at startup


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["redis", "nats"])
async def test_node_starts_without_its_broker_and_joins_it_later(kind, broker_process, start_server):
    port = free_port()  # nothing listens here yet
    url = f"redis://127.0.0.1:{port}/0" if kind == "redis" else f"nats://127.0.0.1:{port}"
    node = await start_server(PUSH_BROKER=url, PUSH_NODE_TIMEOUT=str(NODE_TIMEOUT))
    topic = f"room:lobby:{uuid.uuid4().hex}"
    # It listens at once, not after waiting on the broker: from its first log line to "listening".
    first, listening = node.log_lines[0], next(line for line in node.log_lines if line.get("event") == "listening")
    assert log_time(listening) - log_time(first) < 2.0, (first, listening)
    down = [line for line in node.log_lines if line.get("event") == "broker_down"]
    assert len(down) == 1 and "retrying" in down[0]["message"], node.log_lines
    async with aiohttp.ClientSession() as http:
        asked = time.monotonic()
        async with http.get(f"{node.http_url}/healthz", timeout=bounded()) as response:
            assert response.status == 200
        assert time.monotonic() - asked < 1.0
        assert await readyz(http, node) == 503
        assert await publish(http, node, topic, {"seq": 0}, status=503) == {"error": "broker unavailable"}
        assert await metric(http, node, "push_broker_up", exposed=True) == 0
        async with connect(http, node) as sock:
            await sock.heartbeat()  # it serves sockets meanwhile

        # The broker appears on that port: the node connects by itself.
        await broker_process(kind, port=port)
        await ready_is(http, node, 200, RECOVERY)
        assert await metric(http, node, "push_broker_up", exposed=True) == 1
        assert await metric(http, node, "push_broker_reconnects_total", exposed=True) == 0  # a first connection
        # Said once, however many attempts (and presence heartbeats, every 0.75 s) the outage took.
        for event in ("broker_down", "presence_heartbeat_failed"):
            assert len([line for line in node.log_lines if line.get("event") == event]) <= 1, event
        async with connect(http, node) as sock:
            await sock.join(topic)
            published = await publish(http, node, topic, {"seq": 1})
            assert published == {"status": 200, "published": 1, "delivered": 1}
            await sock.wait_for(is_message(1))
