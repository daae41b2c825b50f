"""State made from client input is bounded and reclaimed (issue 14 items 3 and 5).

1. In process: joining and leaving 100,000 distinct topic names leaves no per-topic record behind
   (broker, history, hub, presence), and the process's RSS comes back after gc.collect().
2. A real server: rounds of 10,000 long-poll sessions opened and abandoned, and of 8,000 WebSockets
   open together while the server works, then closed. Once a round is gone (the session gauge says 0)
   the server's RSS stays where the warm-up rounds left it, with no collection forced by the test: the
   server raises its GC thresholds, so what reference counting does not free stays, round after round.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ServerProcess, make_token, until
from fakes import CountingConnection, NowhereTransport

from push_service.auth import Identity
from push_service.config import Settings
from push_service.node import Node
from push_service.protocol import V2
from push_service.transports.websocket import WIRES

pytestmark = pytest.mark.alone  # RSS and open files, measured round after round

MIB = 1024 * 1024
TIMEOUT = 5.0


def rss(pid: int | str = "self") -> int:
    """Resident set size in bytes, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc status")


def _structures(node: Node) -> dict[str, int]:
    history = node.broker._history  # type: ignore[attr-defined]
    return {"hub topics": len(node.hub.subscriber_counts()), "waiting": len(node._waiting),
            "history topics": history.topic_count if history is not None else 0,
            "presences": node.presence.tracker.size, "sessions": len(node.sessions)}


@pytest.mark.slow
async def test_joining_and_leaving_100k_distinct_topics_leaves_nothing_behind() -> None:
    node = Node(Settings(history_size=100))  # the memory broker, history on (the default)
    await node.start()
    try:
        conn = CountingConnection()
        session = node.open_session(Identity("u1", time.time() + 600), conn, "websocket")

        def join_and_leave(names: range, family: str) -> None:
            for n in names:
                topic = f"room:{family}:{n}"
                session.receive(orjson.dumps([str(n), str(n), topic, "phx_join", {}]).decode())
                session.receive(orjson.dumps([str(n), f"{n}l", topic, "phx_leave", {}]).decode())

        join_and_leave(range(1000), "lobby")  # warm-up: the allocator's and the metrics' first growth
        gc.collect()
        baseline, before = rss(), _structures(node)
        assert before == {"hub topics": 0, "waiting": 0, "history topics": 0, "presences": 0, "sessions": 1}
        started = time.monotonic()
        sent = conn.sent
        join_and_leave(range(1000, 90_000), "lobby")
        join_and_leave(range(90_000, 101_000), "topic")  # presence-tracked
        assert time.monotonic() - started < 60
        assert conn.sent - sent == 100_000 * 3 + 11_000  # join reply, leave reply, close; presence_state
        assert _structures(node) == before
        gc.collect()
        grown = rss() - baseline
        assert grown < 16 * MIB, f"RSS grew by {grown / MIB:.1f} MiB"
    finally:
        await node.stop()


# --- 2. a real server: sessions that end are freed by reference counting, without a full collection


SESSIONS = 10_000
CONCURRENCY = 64
LP_WINDOW = 1.0


async def _server_rss(server: ServerProcess) -> int:
    assert server.process is not None
    return rss(server.process.pid)


async def _gauge(http: aiohttp.ClientSession, server: ServerProcess, transport: str) -> float:
    async with http.get(f"{server.http_url}/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "push_connections" and sample.labels.get("transport") == transport:
                return sample.value
    return 0.0


async def _bounded(count: int, work: Callable[[int], Awaitable[None]]) -> None:
    """`work(i)` for i in range(count), CONCURRENCY at a time."""
    queue = iter(range(count))

    async def worker() -> None:
        for i in queue:
            await work(i)

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def _settle(http: aiohttp.ClientSession, server: ServerProcess, transport: str) -> None:
    await until(lambda: _gauge_is_zero(http, server, transport), 30, f"every {transport} session closed")


async def _gauge_is_zero(http: aiohttp.ClientSession, server: ServerProcess, transport: str) -> bool:
    return await _gauge(http, server, transport) == 0


WARM_UP_ROUNDS = 2  # the allocator's and the dicts' first growth
ROUNDS = 2  # measured: freed sessions leave their memory to the next round, leaked ones add theirs


async def _rounds_grow(http: aiohttp.ClientSession, server: ServerProcess, transport: str,
                       one_round: Callable[[], Awaitable[None]]) -> tuple[int, list[int]]:
    """RSS growth over ROUNDS rounds after WARM_UP_ROUNDS, each waited out until the gauge says 0. What is
    still in flight when a sample is taken only adds to it: the lower of the last two samples counts."""
    samples = []
    for _ in range(WARM_UP_ROUNDS + ROUNDS):
        started = time.monotonic()
        await one_round()
        assert time.monotonic() - started < 60
        await _settle(http, server, transport)
        samples.append(await _server_rss(server))
    return min(samples[-2:]) - samples[WARM_UP_ROUNDS - 1], samples


@pytest.mark.slow  # thousands of sessions, rounds of them
async def test_abandoned_longpoll_sessions_are_freed(start_server: Callable[..., Any]) -> None:
    server = await start_server(PUSH_LONGPOLL_WINDOW=str(LP_WINDOW),
                                PUSH_LONGPOLL_MAX_SESSIONS_PER_ADDRESS=str(2 * SESSIONS))
    url = f"{server.http_url}/socket/longpoll"
    tokens = [make_token(f"lp{i}") for i in range(SESSIONS)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async def open_join_abandon(i: int) -> None:
            params = [("token", tokens[i]), ("vsn", "2.0.0")]
            async with http.get(url, params=params) as response:
                body = orjson.loads(await response.read())
            assert body["status"] == 410, body
            join = orjson.dumps(["1", "1", f"room:lobby:{i % 50}", "phx_join", {}])
            async with http.post(url, params=params + [("token", body["token"])], data=join,
                                 headers={"Content-Type": "application/json"}) as response:
                assert orjson.loads(await response.read()) == {"status": 200}
            # Gone without polling: the join's reply waits in the session until it expires.

        grown, samples = await _rounds_grow(http, server, "longpoll",
                                            lambda: _bounded(SESSIONS, open_join_abandon))
    assert grown < 20 * MIB, f"RSS after each round: {[f'{s / MIB:.0f} MiB' for s in samples]}"


OPEN_TOGETHER = 8000  # WebSockets open at once (each side holds a descriptor for every one)
TRAFFIC = 4000  # requests the server answers while they are open


@pytest.mark.slow  # thousands of sessions, rounds of them
async def test_closed_long_lived_websocket_sessions_are_freed(start_server: Callable[..., Any]) -> None:
    """Sockets that live while the server does other work (so their objects age into the oldest GC
    generation, as a real client's do), then close."""
    server = await start_server()
    tokens = [make_token(f"ws{i}") for i in range(OPEN_TOGETHER)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30),
                                     connector=aiohttp.TCPConnector(limit=0)) as http:
        async def one_round() -> None:
            sockets: list[aiohttp.ClientWebSocketResponse] = [None] * OPEN_TOGETHER  # type: ignore[list-item]

            async def open_and_join(i: int) -> None:
                ws = sockets[i] = await http.ws_connect(f"{server.ws_url}?vsn=2.0.0&token={tokens[i]}")
                await ws.send_str(orjson.dumps(["1", "1", f"room:lobby:{i % 50}", "phx_join", {}]).decode())
                reply = orjson.loads(await ws.receive_str(timeout=TIMEOUT))
                assert reply[3] == "phx_reply" and reply[4]["status"] == "ok", reply

            async def traffic(_: int) -> None:
                async with http.get(f"{server.http_url}/healthz") as response:
                    assert response.status == 200

            try:
                await _bounded(OPEN_TOGETHER, open_and_join)
                await _bounded(TRAFFIC, traffic)
            finally:
                await asyncio.gather(*(ws.close() for ws in sockets if ws is not None))

        grown, samples = await _rounds_grow(http, server, "websocket", one_round)
    assert grown < 10 * MIB, f"RSS after each round: {[f'{s / MIB:.0f} MiB' for s in samples]}"


async def test_an_ended_connection_and_its_session_are_freed_by_reference_counting() -> None:
    """Once a socket or a long-poll session has ended, nothing of it is kept alive by a reference cycle: the
    server raises its GC thresholds (app.tune_gc), so what only a full collection would free stays for long."""
    from push_service.transports.longpoll_connection import WIRES as LONGPOLL_WIRES, LongPollConnection
    from push_service.session import Session
    from push_service.transports.websocket import WebSocketProtocol

    def alive() -> int:
        return sum(isinstance(obj, (WebSocketProtocol, LongPollConnection, Session)) for obj in gc.get_objects())

    node = Node(Settings())
    await node.start()
    gc.collect()
    gc.disable()
    try:
        before = alive()
        socket = WebSocketProtocol(node, NowhereTransport(), WIRES[V2], Identity("u1", time.time() + 600))  # type: ignore[arg-type]
        socket.data_received(b"\x81\x80\x00\x00\x00\x00")  # an empty text frame, masked: a read handled
        socket.connection_lost(None)
        longpoll = LongPollConnection(lambda conn: None, 1 << 20, "key", "token", LONGPOLL_WIRES[V2], 0.0, "u2", "")
        longpoll.session = node.open_session(Identity("u2", time.time() + 600), longpoll, "longpoll")
        longpoll.session.closed()
        assert alive() == before + 4
        del socket, longpoll
        assert alive() == before
    finally:
        gc.enable()
        await node.stop()
