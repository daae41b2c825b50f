"""Bursts over long-poll: several broadcasts of one topic grouped into one hub Run between two polls.

A poll answer is `{"messages": [<frame string>, ...]}`: every frame of a Run must be its own element,
else the answer is not JSON and phoenix.js drops it (and every message in it) and reconnects.
First the stock phoenix.js clients; then a property test against a WebSocket client of the same topics.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest
import websockets
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from conftest import PUBLISH_KEY, ServerProcess, make_token, server_env, until
from nodejs import NodeScript, node_binary, run_script
from test_longpoll import LONGPOLL_CLIENT, RETRY_MS, VERSIONS, WINDOW

pytestmark = pytest.mark.slow  # property runs of phoenix.js long-poll clients

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


# --- property: a WebSocket client and a long-poll client of the same topics see the same frames

PROPERTY_TOPICS = ["room:lobby:p0", "room:lobby:p1", "room:lobby:p2"]
PROPERTY_WINDOW = 1.0
EXAMPLE_TIMEOUT = 10.0

# One publish: a single broadcast (topic, text) or a batch of them; a step is publishes sent at once.
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40) | st.sampled_from(
    ['"', "\\", "</script>", "\u2028", "x" * 3000])
_message = st.tuples(st.integers(0, len(PROPERTY_TOPICS) - 1), _text)
_publish = st.lists(_message, min_size=1, max_size=6)
_bursts = st.lists(st.lists(_publish, min_size=1, max_size=8), min_size=1, max_size=4)


class PropertyClients:
    """One WebSocket client (the `websockets` library) and one long-poll client (raw HTTP, as phoenix.js
    polls) of PROPERTY_TOPICS on one server; each keeps the broadcast frames it gets, as text."""

    def __init__(self, server: ServerProcess, http: aiohttp.ClientSession, vsn: str) -> None:
        self.server, self.http, self.vsn = server, http, vsn
        self.ws_frames: list[str] = []
        self.lp_frames: list[str] = []
        self.bad_answers: list[bytes] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._ws: Any = None
        self._lp_token: str | None = None
        self._jwt = make_token()

    def _join_frame(self, ref: int, topic: str) -> bytes:
        if self.vsn == "1.0.0":
            return orjson.dumps({"topic": topic, "event": "phx_join", "payload": {}, "ref": str(ref),
                                 "join_ref": str(ref)})
        return orjson.dumps([str(ref), str(ref), topic, "phx_join", {}])

    def _is_broadcast(self, text: str) -> bool:
        frame = orjson.loads(text)
        event = frame["event"] if self.vsn == "1.0.0" else frame[3]
        return not event.startswith("phx_")

    async def start(self) -> None:
        self._ws = await websockets.connect(f"{self.server.ws_url}?vsn={self.vsn}&token={self._jwt}")
        for ref, topic in enumerate(PROPERTY_TOPICS, 1):
            await self._ws.send(self._join_frame(ref, topic).decode())
        for _ in PROPERTY_TOPICS:
            assert not self._is_broadcast(await asyncio.wait_for(self._ws.recv(), TIMEOUT))
        self._tasks.append(asyncio.create_task(self._read_ws()))
        answer = await self._lp_request("GET")
        assert answer["status"] == 410
        self._lp_token = answer["token"]
        body = b"\n".join(self._join_frame(ref, topic) for ref, topic in enumerate(PROPERTY_TOPICS, 1))
        assert await self._lp_request("POST", data=body, headers={"Content-Type": "application/x-ndjson"}) == {
            "status": 200}
        replies = 0
        while replies < len(PROPERTY_TOPICS):
            answer = await self._lp_request("GET")
            replies += len(answer.get("messages", []))
        self._tasks.append(asyncio.create_task(self._poll()))

    async def _lp_request(self, method: str, **kwargs: Any) -> dict[str, Any]:
        params = [("token", self._jwt), ("vsn", self.vsn)]
        if self._lp_token is not None:
            params.append(("token", self._lp_token))
        async with self.http.request(method, f"{self.server.http_url}/socket/longpoll", params=params,
                                     **kwargs) as response:
            raw = await response.read()
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            self.bad_answers.append(raw[:300])
            return {"status": "unparsable"}

    async def _read_ws(self) -> None:
        async for text in self._ws:
            if self._is_broadcast(text):
                self.ws_frames.append(text)

    async def _poll(self) -> None:
        while True:
            answer = await self._lp_request("GET")
            if answer["status"] not in (200, 204):
                return  # the session is gone (or unparsable): the comparison will tell
            self.lp_frames.extend(text for text in answer["messages"] if self._is_broadcast(text))

    async def take(self, count: int) -> tuple[list[str], list[str]]:
        """Both clients' frames once each has `count` (or the time is up), and start afresh."""
        await until(lambda: len(self.ws_frames) >= count and len(self.lp_frames) >= count or self.bad_answers,
                    EXAMPLE_TIMEOUT, f"{count} frames on both transports")
        ws, self.ws_frames = self.ws_frames, []
        lp, self.lp_frames = self.lp_frames, []
        return ws, lp

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ws is not None:
            await self._ws.close()


async def publish_step(http: aiohttp.ClientSession, server: ServerProcess, step: list[list[tuple[int, str]]],
                       counter: list[int]) -> None:
    """The step's publishes all at once: one message as /api/broadcast, several as one /api/batch."""
    async def one(publish: list[tuple[int, str]]) -> None:
        messages = []
        for topic, text in publish:
            counter[0] += 1
            messages.append({"topic": PROPERTY_TOPICS[topic], "event": "new_msg",
                             "payload": {"k": counter[0], "text": text}})
        path, body = ("/api/broadcast", messages[0]) if len(messages) == 1 else ("/api/batch", {"messages": messages})
        async with http.post(f"{server.http_url}{path}", json=body,
                             headers={"Authorization": f"Bearer {PUBLISH_KEY}"}) as response:
            assert response.status == 200, await response.text()

    await asyncio.gather(*(one(publish) for publish in step))


@pytest.mark.parametrize("vsn", ["1.0.0", "2.0.0"])
def test_websocket_and_longpoll_clients_receive_identical_sequences(vsn: str) -> None:
    """For random bursts (sizes, batches, concurrent publishes, topics), both transports' clients get the
    same frames in the same order, and every poll answer is JSON. Synchronous: hypothesis drives the
    examples on a loop of the test's own, against one server for all of them."""
    loop = asyncio.new_event_loop()
    server = ServerProcess(server_env(PUSH_LONGPOLL_WINDOW=str(PROPERTY_WINDOW)), [])
    http = clients = None
    try:
        loop.run_until_complete(server.start())
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, loop=loop), loop=loop,
                                     timeout=aiohttp.ClientTimeout(total=TIMEOUT))
        clients = PropertyClients(server, http, vsn)
        loop.run_until_complete(clients.start())
        counter = [0]

        @hyp_settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck),
                      database=None)
        @given(bursts=_bursts)
        def check(bursts: list[list[list[tuple[int, str]]]]) -> None:
            async def example() -> None:
                first = counter[0]
                for step in bursts:
                    await publish_step(http, server, step, counter)
                ws, lp = await clients.take(counter[0] - first)
                assert clients.bad_answers == [], clients.bad_answers[:2]
                assert len(ws) == counter[0] - first
                assert lp == ws

            loop.run_until_complete(example())

        check()
    finally:
        if clients is not None:
            loop.run_until_complete(clients.close())
        if http is not None:
            loop.run_until_complete(http.close())
        loop.run_until_complete(server.stop())
        loop.close()
