"""The long-poll transport (`/socket/longpoll`) against the real server process.

First the raw HTTP exchange, as phoenix.js performs it (every answer HTTP 200, the logical status in
the JSON body); then the official phoenix client 1.6, 1.7 and 1.8 under Node with `transport:
LongPoll`, its `longPollFallbackMs` fallback when WebSockets are blocked (1.7, 1.8), and what happens
when a session token reaches another node.
"""

from __future__ import annotations

import asyncio
import base64
import signal
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from conftest import JWT_SECRET, PUBLISH_KEY, ServerProcess, make_token, server_has_read
from http_helpers import metric, metrics, publish, wait_for_metric
from push_service.app import create_app
from push_service.config import Settings
from lp_proxy import Proxy
from nodejs import NodeScript as JsClient
from nodejs import node_binary, run_script
from push_service.node import NODE

JS_DIR = Path(__file__).resolve().parent / "js"
LONGPOLL_CLIENT = JS_DIR / "longpoll.mjs"
WINDOW = 1.0  # PUSH_LONGPOLL_WINDOW for these tests (Phoenix and the default: 10 s)
TIMEOUT = 5.0
RETRY_MS = 150
TOPIC = "room:lobby:42"
PRESENCE_TOPIC = "room:topic:7"
VERSIONS = [pytest.param("16", id="phoenix-1.6"), pytest.param("17", id="phoenix-1.7"),
            pytest.param("18", id="phoenix-1.8")]
FALLBACK_VERSIONS = [pytest.param("17", id="phoenix-1.7"), pytest.param("18", id="phoenix-1.8")]

Json = dict[str, Any]


@pytest.fixture
async def lp_server(start_server: Callable[..., Any]) -> ServerProcess:
    return await start_server(PUSH_LONGPOLL_WINDOW=str(WINDOW))


def request_sent_signal() -> aiohttp.TraceConfig:
    """Sets the event a request carries as `trace_request_ctx={"sent": event}` once it is sent whole."""
    async def headers_sent(_: aiohttp.ClientSession, context: Any, __: Any) -> None:
        if isinstance(context.trace_request_ctx, dict) and "sent" in context.trace_request_ctx:
            context.trace_request_ctx["sent"].set()

    config = aiohttp.TraceConfig()
    config.on_request_headers_sent.append(headers_sent)
    return config


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WINDOW + TIMEOUT),
                                     trace_configs=[request_sent_signal()]) as session:
        yield session


class LongPollClient:
    """The requests phoenix.js makes: GET/POST `/socket/longpoll?token=<jwt>&vsn=2.0.0&token=<session>`."""

    def __init__(self, http: aiohttp.ClientSession, server: ServerProcess, jwt: str | None = None,
                 vsn: str = "2.0.0") -> None:
        self.http = http
        self.url = f"{server.http_url}/socket/longpoll"
        self.jwt = make_token() if jwt is None else jwt
        self.vsn = vsn
        self.session: str | None = None
        self._ref = 0

    def params(self) -> list[tuple[str, str]]:
        params = [("token", self.jwt), ("vsn", self.vsn)]
        if self.session is not None:
            params.append(("token", self.session))  # after the user's params, as phoenix.js appends it
        return params

    async def request(self, method: str, params: Any = None, **kwargs: Any) -> tuple[aiohttp.ClientResponse, Json]:
        async with self.http.request(method, self.url, params=self.params() if params is None else params,
                                     **kwargs) as response:
            assert response.status == 200, await response.text()
            assert response.headers["Content-Type"] == "application/json; charset=utf-8"
            assert response.headers["Cache-Control"] == "no-store"
            return response, orjson.loads(await response.read())

    async def connect(self) -> Json:
        _, body = await self.request("GET")
        assert body["status"] == 410 and body["messages"] == [], body
        self.session = body["token"]
        return body

    async def get(self, sent: asyncio.Event | None = None) -> Json:
        _, body = await self.request("GET", trace_request_ctx=None if sent is None else {"sent": sent})
        if body["status"] in (200, 204):
            assert body["token"] == self.session
        return body

    async def waiting_get(self, port: int) -> asyncio.Task[Json]:
        """A poll, once it waits at the server: sent whole, read there, and not answered."""
        sent = asyncio.Event()
        poll = asyncio.create_task(self.get(sent))
        await asyncio.wait_for(sent.wait(), TIMEOUT)
        await server_has_read(port)
        assert not poll.done()
        return poll

    async def frames(self) -> list[Any]:
        """The frames of the next poll that brings any (the messages are serialized frame strings)."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            body = await self.get()
            assert body["status"] in (200, 204), body
            if body["status"] == 200:
                assert all(isinstance(message, str) for message in body["messages"])
                return [orjson.loads(message) for message in body["messages"]]
        raise AssertionError("no frames within the timeout")

    async def post(self, *frames: Any, ndjson: bool = False) -> Json:
        if ndjson:
            lines = [frame if isinstance(frame, bytes) else orjson.dumps(frame) for frame in frames]
            data = b"\n".join(lines)
            headers = {"Content-Type": "application/x-ndjson"}
        else:
            (frame,) = frames
            data = frame if isinstance(frame, bytes) else orjson.dumps(frame)
            headers = {"Content-Type": "application/json"}
        _, body = await self.request("POST", data=data, headers=headers)
        return body

    async def join(self, topic: str) -> list[Any]:
        self._ref += 1
        ref = str(self._ref)
        assert await self.post([ref, ref, topic, "phx_join", {}]) == {"status": 200}
        frames = await self.frames()
        assert frames[0][:4] == [ref, ref, topic, "phx_reply"] and frames[0][4]["status"] == "ok", frames
        return frames


async def longpoll_connections(http: aiohttp.ClientSession, server: ServerProcess) -> float:
    return await metric(http, server, "push_connections", transport="longpoll")


def is_broadcast(frame: list[Any], topic: str, event: str, payload: Json) -> bool:
    """A fan-out frame: no join_ref; the ref is null, or a history position when history is on."""
    return frame[0] is None and frame[2:] == [topic, event, payload]


# --- the raw exchange


async def test_first_get_opens_a_session_with_410_and_a_token(lp_server, http):
    client = LongPollClient(http, lp_server)
    response, body = await client.request("GET")
    assert set(body) == {"status", "token", "messages"}
    assert body["status"] == 410 and body["messages"] == []
    assert body["token"].startswith("lp.") and client.jwt not in body["token"]
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert await longpoll_connections(http, lp_server) == 1
    # Two sessions never share a token.
    assert (await LongPollClient(http, lp_server).connect())["token"] != body["token"]


async def test_join_poll_and_receive_a_broadcast(start_server, http):
    # A long window: the poll must be woken by the broadcast, not end with its window on a loaded machine.
    lp_server = await start_server(PUSH_LONGPOLL_WINDOW="5")
    client = LongPollClient(http, lp_server)
    await client.connect()
    assert await client.post(["1", "1", TOPIC, "phx_join", {}]) == {"status": 200}
    # The join reply comes with the next poll, as the serialized v2 frame string.
    body = await client.get()
    assert body["status"] == 200 and body["token"] == client.session
    (reply,) = [orjson.loads(message) for message in body["messages"]]
    assert reply[:4] == ["1", "1", TOPIC, "phx_reply"] and reply[4]["status"] == "ok"
    # A waiting poll answers as soon as a broadcast arrives, long before the window ends.
    poll = await client.waiting_get(lp_server.port)  # the broadcast must wake it
    started = time.monotonic()
    assert (await publish(http, lp_server, TOPIC, {"text": 'a "quoted" message'}))["delivered"] == 1
    body = await poll
    assert time.monotonic() - started < 2.5  # half its window
    assert body["status"] == 200
    (frame,) = [orjson.loads(message) for message in body["messages"]]
    assert is_broadcast(frame, TOPIC, "new_msg", {"text": 'a "quoted" message'}), frame
    # Heartbeats are answered too (phoenix.js sends none over long-poll, others may).
    assert await client.post([None, "2", "phoenix", "heartbeat", {}]) == {"status": 200}
    assert await client.frames() == [[None, "2", "phoenix", "phx_reply", {"status": "ok", "response": {}}]]


async def test_vsn_1_sessions_get_v1_frames(lp_server, http):
    client = LongPollClient(http, lp_server, vsn="1.0.0")
    await client.connect()
    join = {"topic": TOPIC, "event": "phx_join", "payload": {}, "ref": "1", "join_ref": "1"}
    assert await client.post(join) == {"status": 200}
    (reply,) = await client.frames()
    assert reply["event"] == "phx_reply" and reply["ref"] == "1" and reply["payload"]["status"] == "ok"
    await publish(http, lp_server, TOPIC, {"n": 1})
    (frame,) = await client.frames()
    assert {key: frame[key] for key in ("topic", "event", "payload")} == {
        "topic": TOPIC, "event": "new_msg", "payload": {"n": 1}}


async def test_empty_window_answers_204(lp_server, http):
    client = LongPollClient(http, lp_server)
    await client.connect()
    started = time.monotonic()
    body = await client.get()
    elapsed = time.monotonic() - started
    assert body == {"status": 204, "token": client.session, "messages": []}
    assert WINDOW - 0.1 <= elapsed < WINDOW + 1.0


async def test_frames_wait_for_the_next_poll_in_order(lp_server, http):
    client = LongPollClient(http, lp_server)
    await client.connect()
    await client.join(TOPIC)
    for n in range(5):
        await publish(http, lp_server, TOPIC, {"n": n})
    frames = await client.frames()
    assert [frame[4] for frame in frames] == [{"n": n} for n in range(5)]


async def test_unknown_or_forged_session_tokens(lp_server, http):
    client = LongPollClient(http, lp_server)
    await client.connect()
    real = client.session
    assert real is not None
    node, key, signature = real.removeprefix("lp.").split(".")
    for forged in (f"lp.{node}.{key}.{'A' * len(signature)}", f"lp.{node}.{'B' * len(key)}.{signature}",
                   f"lp.{key}.{signature}", "lp.", "lp.x.y", f"lp.{node}.{key}.{signature}.x"):
        client.session = forged
        # A POST for no session, and a GET that carries a session token naming nothing here: 410,
        # which phoenix.js answers by connecting afresh.
        assert await client.post([None, "1", "phoenix", "heartbeat", {}]) == {"status": 410}
        assert await client.get() == {"status": 410}
    # A POST without any session token is 410 too.
    _, body = await client.request("POST", params=[("vsn", "2.0.0")], data=b"[]")
    assert body == {"status": 410}
    # The real session was not disturbed.
    client.session = real
    assert (await client.get())["status"] == 204
    assert await longpoll_connections(http, lp_server) == 1


@pytest.mark.slow
async def test_the_last_token_in_the_query_wins(lp_server, http):
    """phoenix.js sends `?token=<user jwt>&vsn=2.0.0&token=<session>`: the last one wins, as in Plug."""
    client = LongPollClient(http, lp_server)
    session = (await client.connect())["token"]
    _, body = await client.request("GET", params=[("token", client.jwt), ("vsn", "2.0.0"), ("token", session)])
    assert body == {"status": 204, "token": session, "messages": []}
    # The other way round, the JWT is last: that is a new session.
    _, body = await client.request("GET", params=[("token", session), ("vsn", "2.0.0"), ("token", client.jwt)])
    assert body["status"] == 410 and body["token"] != session
    assert await longpoll_connections(http, lp_server) == 2
    # The x-phoenix-longpoll-token header wins over the query (newer phoenix.js sends it there).
    _, body = await client.request("GET", params=[("token", client.jwt), ("vsn", "2.0.0")],
                                   headers={"x-phoenix-longpoll-token": session})
    assert body == {"status": 204, "token": session, "messages": []}


async def test_ndjson_batch_of_text_and_binary_frames(lp_server, http):
    client = LongPollClient(http, lp_server)
    await client.connect()
    # A v2 binary push (kind 0): join_ref "1", ref "4", the topic, the event, then the data.
    fields = [b"1", b"4", TOPIC.encode(), b"upload"]
    binary = struct.pack("5B", 0, *(len(field) for field in fields)) + b"".join(fields) + b"\x00\x01data"
    lines = [
        orjson.dumps(["1", "1", TOPIC, "phx_join", {}]),
        orjson.dumps([None, "2", "phoenix", "heartbeat", {}]) + b"\r",  # CRLF line ends are fine
        b"",  # blank lines are skipped
        orjson.dumps(["3", "3", "user:u1", "phx_join", {}]),
        base64.b64encode(binary),
    ]
    assert await client.post(*lines, ndjson=True) == {"status": 200}
    frames = await client.frames()
    while len(frames) < 4:
        frames += await client.frames()
    assert [frame[:4] for frame in frames] == [
        ["1", "1", TOPIC, "phx_reply"], [None, "2", "phoenix", "phx_reply"],
        ["3", "3", "user:u1", "phx_reply"], ["1", "4", TOPIC, "phx_reply"]]
    assert frames[3][4] == {"status": "error", "response": {"reason": "unhandled event"}}


async def test_invalid_frames_end_the_session(lp_server, http):
    for bad, ndjson, reason in ((b"not json", False, "invalid_json"), (b"%%% not base64", True, "invalid_base64"),
                                (b"\xff\xfe[", False, "invalid_utf8")):
        client = LongPollClient(http, lp_server)
        await client.connect()
        assert await client.post(bad, ndjson=ndjson) == {"status": 410}
        assert await client.get() == {"status": 410}
        errors = await metrics(http, lp_server)
        assert errors[("push_client_errors_total", frozenset({("reason", reason)}))] >= 1
    assert await longpoll_connections(http, lp_server) == 0


async def test_frames_over_max_frame_bytes_are_refused(start_server, http):
    server = await start_server(PUSH_LONGPOLL_WINDOW=str(WINDOW), PUSH_MAX_FRAME_BYTES="1KiB")
    client = LongPollClient(http, server)
    await client.connect()
    big = orjson.dumps(["1", "1", TOPIC, "phx_join", {"pad": "x" * 2000}])
    assert await client.post(big) == {"status": 413}
    assert await client.get() == {"status": 410}
    # A batch over 4 frames' worth is refused before it is parsed.
    client = LongPollClient(http, server)
    await client.connect()
    small = orjson.dumps([None, "1", "phoenix", "heartbeat", {}])
    assert await client.post(*[small] * 1000, ndjson=True) == {"status": 413}
    counts = await metrics(http, server)
    assert counts[("push_client_errors_total", frozenset({("reason", "frame_too_big")}))] == 1
    assert counts[("push_client_errors_total", frozenset({("reason", "body_too_big")}))] == 1


async def test_preflight_and_other_methods(lp_server, http):
    async with http.options(f"{lp_server.http_url}/socket/longpoll", headers={
            "Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, x-phoenix-authtoken"}) as response:
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert response.headers["Access-Control-Allow-Methods"] == "get, post, options"
        assert response.headers["Access-Control-Max-Age"] == "3600"
        allowed = {item.strip() for item in response.headers["Access-Control-Allow-Headers"].split(",")}
        assert {"content-type", "x-phoenix-authtoken", "x-phoenix-longpoll-token"} <= allowed
    for method in ("PUT", "DELETE", "PATCH"):
        async with http.request(method, f"{lp_server.http_url}/socket/longpoll") as response:
            assert response.status == 400, method


async def test_refused_connects_answer_403_and_are_counted(lp_server, http):
    refusals = [
        (make_token(ttl=-60), "2.0.0", "expired"),
        (make_token(secret="another-secret-0123456789abcdef0123456789"), "2.0.0", "bad_signature"),
        ("not-a-jwt", "2.0.0", "malformed"),
        (make_token(), "3.0.0", "vsn"),
    ]
    for jwt, vsn, _ in refusals:
        client = LongPollClient(http, lp_server, jwt=jwt, vsn=vsn)
        _, body = await client.request("GET")
        assert body == {"status": 403}
    counts = await metrics(http, lp_server)
    for _, _, reason in refusals:
        assert counts[("push_connects_refused_total", frozenset({("reason", reason)}))] == 1, reason
    assert await longpoll_connections(http, lp_server) == 0


async def test_auth_token_header_of_phoenix_18(lp_server, http):
    """phoenix.js >= 1.8 `authToken` travels in X-Phoenix-AuthToken over long-poll, and wins."""
    client = LongPollClient(http, lp_server, jwt="ignored-when-the-header-is-there")
    _, body = await client.request("GET", params=[("vsn", "2.0.0")], headers={"X-Phoenix-AuthToken": make_token()})
    assert body["status"] == 410
    _, body = await client.request("GET", params=[("vsn", "2.0.0")],
                                   headers={"X-Phoenix-AuthToken": make_token(ttl=-60)})
    assert body == {"status": 403}


async def test_origins_as_for_websocket(start_server, http):
    server = await start_server(PUSH_LONGPOLL_WINDOW=str(WINDOW), PUSH_ALLOWED_ORIGINS="https://app.example.com")
    client = LongPollClient(http, server)
    response, body = await client.request("GET", headers={"Origin": "https://evil.example.com"})
    assert body == {"status": 403}
    response, body = await client.request("GET", headers={"Origin": "https://app.example.com"})
    assert body["status"] == 410
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "Origin" in response.headers["Vary"]
    counts = await metrics(http, server)
    assert counts[("push_connects_refused_total", frozenset({("reason", "origin")}))] == 1


@pytest.mark.slow
async def test_a_session_that_stops_polling_is_closed_and_leaves_presence(lp_server, http):
    async with http.ws_connect(f"{lp_server.ws_url}?vsn=2.0.0&token={make_token('watcher')}") as ws:
        await ws.send_json(["1", "1", PRESENCE_TOPIC, "phx_join", {}])

        async def next_diff() -> Json:
            while True:
                frame = await ws.receive_json(timeout=TIMEOUT)
                if frame[3] == "presence_diff":
                    return frame[4]

        client = LongPollClient(http, lp_server, jwt=make_token("lp-user"))
        await client.connect()
        frames = await client.join(PRESENCE_TOPIC)
        assert any(frame[3] == "presence_state" and "lp-user" in frame[4] for frame in frames)
        assert "lp-user" in (await next_diff())["joins"]
        # Polling keeps it alive for longer than 1.5 windows...
        for _ in range(2):
            assert (await client.get())["status"] in (200, 204)
        assert await longpoll_connections(http, lp_server) == 1
        # ... and no GET for 1.5 windows ends it: the leave goes out, the gauge comes down.
        stopped = time.monotonic()
        diff = await next_diff()
        assert "lp-user" in diff["leaves"], diff
        assert WINDOW * 1.5 - 0.1 <= time.monotonic() - stopped < WINDOW * 1.5 + 1.0
        assert await longpoll_connections(http, lp_server) == 0
        assert await client.get() == {"status": 410}
        assert await client.post([None, "9", "phoenix", "heartbeat", {}]) == {"status": 410}


@pytest.mark.slow
async def test_a_waiting_poll_outlives_the_heartbeat_timeout(start_server, http):
    """phoenix.js sends no heartbeats over long-poll: polling is what keeps a session alive."""
    server = await start_server(PUSH_LONGPOLL_WINDOW="1", PUSH_HEARTBEAT_TIMEOUT="0.5")  # windows of 2 timeouts
    client = LongPollClient(http, server)
    await client.connect()
    await client.join(TOPIC)
    for _ in range(2):
        assert (await client.get())["status"] == 204
    await publish(http, server, TOPIC, {"still": "here"})
    (frame,) = await client.frames()
    assert frame[4] == {"still": "here"}


@pytest.mark.slow
async def test_server_side_close_answers_the_waiting_poll(start_server, http):
    server = await start_server(PUSH_LONGPOLL_WINDOW="5")
    client = LongPollClient(http, server, jwt=make_token(ttl=2))
    await client.connect()
    await client.join(TOPIC)
    started = time.monotonic()
    # The token expires while the poll waits: the poll answers 410 at once, not at the window's end.
    assert await client.get() in ({"status": 410}, {"status": 204, "token": client.session, "messages": []})
    assert await client.get() == {"status": 410}
    assert time.monotonic() - started < 4.5
    counts = await metrics(http, server)
    assert counts[("push_disconnects_total", frozenset({("reason", "token expired")}))] == 1
    assert await longpoll_connections(http, server) == 0


async def test_slow_consumer_is_dropped(start_server, http):
    server = await start_server(PUSH_LONGPOLL_WINDOW="5", PUSH_SEND_BUFFER_BYTES="2KiB")
    client = LongPollClient(http, server)
    await client.connect()
    await client.join(TOPIC)
    for n in range(4):  # ~3 KiB queued and nobody polling
        await publish(http, server, TOPIC, {"n": n, "pad": "x" * 800})
    await wait_for_metric(http, server, "push_slow_consumer_disconnects_total", 1)
    body = await client.get()
    assert body == {"status": 410}, body
    counts = await metrics(http, server)
    assert counts[("push_slow_consumer_disconnects_total", frozenset())] == 1
    assert await longpoll_connections(http, server) == 0


async def test_drain_ends_waiting_polls_and_refuses_new_sessions(start_server, http):
    server = await start_server(PUSH_LONGPOLL_WINDOW="5", PUSH_DRAIN_SECONDS="0")
    client = LongPollClient(http, server)
    await client.connect()
    await client.join(TOPIC)
    poll = await client.waiting_get(server.port)  # when the drain begins
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(poll, TIMEOUT) == {"status": 410}
    await server.process.wait()


@pytest.mark.slow
async def test_a_session_token_is_bound_to_its_node(start_server, http):
    """Sessions live in one process: a node that shares no broker with it (or this one after a restart)
    answers 410."""
    first = await start_server(PUSH_LONGPOLL_WINDOW=str(WINDOW))
    second = await start_server(PUSH_LONGPOLL_WINDOW=str(WINDOW))
    client = LongPollClient(http, first)
    await client.connect()
    await client.join(TOPIC)
    elsewhere = LongPollClient(http, second, jwt=client.jwt)
    elsewhere.session = client.session
    assert await elsewhere.get() == {"status": 410}
    assert await elsewhere.post([None, "1", "phoenix", "heartbeat", {}]) == {"status": 410}
    assert await longpoll_connections(http, second) == 0


# --- the official phoenix client under Node


@pytest.fixture
def lp_node_client() -> Callable[..., Any]:
    """Factory: `async with lp_node_client("18", socket_url, token=...) as client:` runs tests/js/longpoll.mjs."""
    node_binary()

    @asynccontextmanager
    async def start(version: str, url: str, *, mode: str = "longpoll", topics: tuple[str, ...] = (TOPIC,),
                    token: str | None = None, auth_token: str | None = None,
                    fallback_ms: int | None = None) -> AsyncIterator[JsClient]:
        args = [version, url, "--mode", mode, "--retry-ms", str(RETRY_MS)]
        for topic in topics:
            args += ["--topic", topic]
        for flag, value in (("--token", token), ("--auth-token", auth_token), ("--fallback-ms", fallback_ms)):
            if value is not None:
                args += [flag, str(value)]
        async with run_script(LONGPOLL_CLIENT, *args) as client:
            yield client

    return start


async def assert_receives(client: JsClient, http: aiohttp.ClientSession, server: ServerProcess, n: int) -> None:
    assert (await publish(http, server, TOPIC, {"n": n}))["delivered"] == 1
    message = await client.wait_event("message", name="new_msg")
    assert message == {"event": "message", "topic": TOPIC, "name": "new_msg", "payload": {"n": n}}


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
async def test_phoenix_longpoll_joins_and_receives(version, lp_server, http, lp_node_client):
    # Linen's style: the JWT in params as `token`, so every poll carries two `token` keys.
    async with lp_node_client(version, f"{lp_server.http_url}/socket", token=make_token()) as client:
        assert (await client.wait_event("open"))["transport"] == "LongPoll"
        assert (await client.wait_event("join", topic=TOPIC))["status"] == "ok"
        await assert_receives(client, http, lp_server, 1)
        assert await longpoll_connections(http, lp_server) == 1
        # Quiet windows (204) and more messages: still one session. The quiet time is the case, not a wait.
        await asyncio.sleep(WINDOW * 2)
        await assert_receives(client, http, lp_server, 2)
        assert len([e for e in client.events if e["event"] == "open"]) == 1
        assert await longpoll_connections(http, lp_server) == 1


async def test_phoenix_18_longpoll_with_auth_token(lp_server, http, lp_node_client):
    async with lp_node_client("18", f"{lp_server.http_url}/socket", auth_token=make_token()) as client:
        assert (await client.wait_event("open"))["transport"] == "LongPoll"
        assert (await client.wait_event("join", topic=TOPIC))["status"] == "ok"
        await assert_receives(client, http, lp_server, 1)


@pytest.mark.slow
@pytest.mark.parametrize("version", FALLBACK_VERSIONS)
@pytest.mark.parametrize("websocket", ["refuse", "hang"])
async def test_phoenix_falls_back_to_longpoll_when_websockets_are_blocked(version, websocket, lp_server, http,
                                                                          lp_node_client):
    """`longPollFallbackMs`: the WebSocket goes through a proxy that refuses upgrades (phoenix.js
    falls back on the error) or swallows them (it falls back when the timer runs out)."""
    async with Proxy(lp_server.http_url, websocket=websocket) as proxy, \
            lp_node_client(version, f"ws://127.0.0.1:{proxy.port}/socket", mode="fallback", token=make_token(),
                           fallback_ms=500) as client:
        opened = await client.wait_event("open")
        assert opened["transport"] == "LongPoll"
        assert any("falling back to LongPoll" in e.get("msg", "") for e in client.events if e["event"] == "log")
        assert proxy.websocket_attempts >= 1
        assert (await client.wait_event("join", topic=TOPIC))["status"] == "ok"
        await assert_receives(client, http, lp_server, 1)
        assert ("GET", "/socket/longpoll", 200) in proxy.forwarded
        assert any(method == "POST" for method, _, _ in proxy.forwarded)


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
async def test_phoenix_reconnects_when_its_session_is_on_another_node(version, start_server, http, lp_node_client):
    """A poll reaches a node that cannot reach the session (nodes that share no broker, or a node that
    went away): it answers 410, and phoenix.js opens a new session there and rejoins. Nodes on one broker
    relay it instead: tests/test_longpoll_relay.py."""
    first = await start_server(PUSH_LONGPOLL_WINDOW=str(WINDOW))
    second = await start_server(PUSH_LONGPOLL_WINDOW=str(WINDOW))
    async with Proxy(first.http_url) as balancer, \
            lp_node_client(version, f"http://127.0.0.1:{balancer.port}/socket", token=make_token()) as client:
        assert (await client.wait_event("join", topic=TOPIC))["status"] == "ok"
        await assert_receives(client, http, first, 1)
        balancer.upstream = second.http_url
        # The poll waiting on the first node ends with its window; the next one reaches the second.
        assert (await client.wait_event("join", topic=TOPIC, timeout=WINDOW + TIMEOUT))["status"] == "ok"
        await assert_receives(client, http, second, 2)
        assert await longpoll_connections(http, second) == 1


async def test_a_draining_node_refuses_new_sessions(http):
    """In process, as the window between SIGTERM and the listener closing is too short to hit."""
    app = create_app(Settings(service_keys=(PUBLISH_KEY,), jwt_secret=JWT_SECRET, longpoll_window=WINDOW))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/socket/longpoll"
        app[NODE].draining = True
        async with http.get(url, params={"token": make_token(), "vsn": "2.0.0"}) as response:
            # HTTP 503 for load balancers; a status phoenix.js knows (500: retry with backoff) for the client.
            assert response.status == 503
            assert orjson.loads(await response.read()) == {"status": 500}
        async with http.get(url.replace("/socket/longpoll", "/metrics")) as response:
            text = await response.text()
        refused = {sample.labels["reason"]: sample.value for family in text_string_to_metric_families(text)
                   for sample in family.samples if sample.name == "push_connects_refused_total" and sample.value}
        assert refused == {"draining": 1}  # the other reasons are there from the start, at 0
    finally:
        await runner.cleanup()


# --- caps on sessions (issue 14 item 5)


@pytest.mark.slow
@pytest.mark.parametrize("cap", ["sub", "address"])
async def test_sessions_are_capped_per_user_and_per_address(cap, start_server, http, lp_node_client):
    """Past the cap a new session is refused with a status phoenix.js retries with backoff (500), and
    counted; once a session ends, there is room again."""
    if cap == "sub":
        server = await start_server(PUSH_LONGPOLL_WINDOW=str(WINDOW), PUSH_LONGPOLL_MAX_SESSIONS_PER_SUB="3")
        jwts = [make_token("same-user") for _ in range(4)]
    else:
        server = await start_server(PUSH_LONGPOLL_WINDOW=str(WINDOW), PUSH_LONGPOLL_MAX_SESSIONS_PER_ADDRESS="3")
        jwts = [make_token(f"user-{n}") for n in range(4)]
    clients = [LongPollClient(http, server, jwt=jwt) for jwt in jwts]
    for client in clients[:3]:
        await client.connect()
    async with http.get(clients[3].url, params=clients[3].params()) as response:
        assert response.status == 429
        assert orjson.loads(await response.read()) == {"status": 500}
    counts = await metrics(http, server)
    reason = "longpoll_sessions_per_sub" if cap == "sub" else "longpoll_sessions_per_address"
    assert counts[("push_connects_refused_total", frozenset({("reason", reason)}))] == 1
    assert await longpoll_connections(http, server) == 3
    # Another user's, or another address's, sessions are not affected by this one's cap: phoenix.js,
    # refused at first, connects with backoff as soon as one of the three expires (they stop polling).
    async with lp_node_client("18", f"{server.http_url}/socket", token=jwts[3]) as client:
        assert (await client.wait_event("join", topic=TOPIC, timeout=WINDOW * 1.5 + TIMEOUT))["status"] == "ok"
        assert client.seen("open") and client.seen("error")
        await assert_receives(client, http, server, 1)


# --- Phoenix 1.8.x protocol updates (issue 14 item 15)


async def test_the_session_token_in_the_header_alone_serves_polls_and_posts(lp_server, http):
    """Phoenix 1.9 moves the session token to `x-phoenix-longpoll-token`: the query keeps the JWT only."""
    client = LongPollClient(http, lp_server)
    session = (await client.connect())["token"]
    header = {"x-phoenix-longpoll-token": session}
    query = [("token", client.jwt), ("vsn", "2.0.0")]
    _, body = await client.request("POST", params=query, headers=header,
                                   data=orjson.dumps(["1", "1", TOPIC, "phx_join", {}]))
    assert body == {"status": 200}
    _, body = await client.request("GET", params=query, headers=header)
    assert body["status"] == 200 and body["token"] == session
    assert orjson.loads(body["messages"][0])[:4] == ["1", "1", TOPIC, "phx_reply"]
    assert await longpoll_connections(http, lp_server) == 1


async def test_a_null_join_ref_is_accepted_on_non_join_messages(lp_server, http):
    """Phoenix 1.8.3 dropped frames with a stale join_ref, and 1.8.12 restored nil: null means "this
    topic's current join", a different one is a stale frame (ignored)."""
    client = LongPollClient(http, lp_server, jwt=make_token("typist"))
    await client.connect()
    await client.join(PRESENCE_TOPIC)
    await client.join(TOPIC)
    assert await client.post(["0", "7", PRESENCE_TOPIC, "user:typing", {"typing": True}]) == {"status": 200}  # stale
    assert await client.post([None, "8", PRESENCE_TOPIC, "user:typing", {"typing": True}]) == {"status": 200}
    assert await client.post([None, "9", TOPIC, "phx_leave", {}]) == {"status": 200}
    frames = []
    while not any(frame[3] == "phx_close" for frame in frames):
        frames += await client.frames()
    replies = [frame for frame in frames if frame[3] in ("phx_reply", "phx_close")]
    join_ref = "2"  # the second join's (LongPollClient counts refs from 1)
    assert replies == [["1", "8", PRESENCE_TOPIC, "phx_reply", {"status": "ok", "response": {}}],
                       [join_ref, "9", TOPIC, "phx_reply", {"status": "ok", "response": {}}],
                       [join_ref, join_ref, TOPIC, "phx_close", {}]], frames


BATCH_LINES = 200  # push_service.transports.longpoll.MAX_BATCH_LINES


async def test_ndjson_batches_are_bounded_in_lines_and_bytes(start_server, http):
    """Phoenix 1.8.6: splitting a batch body costs memory per line. A batch holds at most BATCH_LINES lines
    and 4 frames' worth of bytes; past either it is refused (413) before it is split, and the session ends."""
    server = await start_server(PUSH_LONGPOLL_WINDOW=str(WINDOW), PUSH_MAX_FRAME_BYTES="4KiB")
    heartbeat = orjson.dumps([None, "1", "phoenix", "heartbeat", {}])
    client = LongPollClient(http, server)
    await client.connect()
    assert await client.post(*[heartbeat] * BATCH_LINES, ndjson=True) == {"status": 200}
    assert len(await client.frames()) == BATCH_LINES
    for body, reason in ((b"\n".join([heartbeat] * (BATCH_LINES + 1)), "batch_too_many_lines"),
                         (b"\n" * 3000, "batch_too_many_lines"),  # blank lines count: they are split too
                         (b"\n".join([orjson.dumps([None, "1", "phoenix", "heartbeat", {"pad": "x" * 3500}])] * 5),
                          "body_too_big")):  # five frames under the limit, over four frames' worth together
        client = LongPollClient(http, server)
        await client.connect()
        _, answer = await client.request("POST", data=body, headers={"Content-Type": "application/x-ndjson"})
        assert answer == {"status": 413}, reason
        assert await client.get() == {"status": 410}
        counts = await metrics(http, server)
        assert counts[("push_client_errors_total", frozenset({("reason", reason)}))] >= 1
    assert await longpoll_connections(http, server) == 1


def test_frames_of_a_body_stop_at_the_first_refused_frame():
    """The frames before a refused one are the client's (as separate POSTs would have been); the rest are not read."""
    from push_service.transports.longpoll_body import INVALID_FRAME, MAX_BATCH_LINES, TOO_BIG, frames_of

    join = b'["1","1","room:lobby:1","phx_join",{}]'
    binary = base64.b64encode(b"\x00\x01bin").decode().encode()
    assert frames_of(join + b"\r\n" + binary + b"\n\n", True, 1000) == ([join.decode(), b"\x00\x01bin"], None)
    assert frames_of(join + b"\n%%%\n" + join, True, 1000) == ([join.decode()], ("invalid_base64", INVALID_FRAME))
    assert frames_of(join + b"\n" + b"[" + b"x" * 1000, True, 1000) == ([join.decode()], ("frame_too_big", TOO_BIG))
    assert frames_of(b"\n" * (MAX_BATCH_LINES + 1), True, 1000) == ([], ("batch_too_many_lines", TOO_BIG))
    assert frames_of(b"%%% a single body is text, whatever it starts with", False, 1000)[0] == [
        "%%% a single body is text, whatever it starts with"]
    assert frames_of(b"\xff", False, 1000) == ([], ("invalid_utf8", INVALID_FRAME))
    assert frames_of(b"", False, 1000) == ([], None)
