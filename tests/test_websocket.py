"""The Phoenix WebSocket transport, against the real server process, frame by frame.

Every receive is bounded; where the absence of a frame matters, a heartbeat is sent and its
reply must be the very next frame (the server answers frames in order on one socket).
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from aiohttp import WSMsgType

from conftest import JWT_SECRET, PUBLISH_KEY, ServerProcess, make_token, shared_server
from http_helpers import connections_closed, metric, publish, publish_numbered, wait_for_metric
from ws_client import CLOSE, CONT, PING, PONG, TEXT, Client, close_payload, heartbeat, heartbeat_reply, raw_frame

OK = {"status": "ok", "response": {}}
RECEIVE_TIMEOUT = 5


# --- helpers


def ws_url(server, token: str | None = None, vsn: str | None = "2.0.0") -> str:
    params = []
    if vsn is not None:
        params.append(f"vsn={vsn}")
    if token is not None:
        params.append(f"token={token}")
    return server.ws_url + ("?" + "&".join(params) if params else "")


@asynccontextmanager
async def connect(http: aiohttp.ClientSession, server, token: str | None = None, vsn: str | None = "2.0.0",
                  **kwargs: Any) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    token = make_token() if token is None else token
    async with http.ws_connect(ws_url(server, token, vsn), **kwargs) as ws:
        yield ws


async def refused_status(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> int:
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        async with http.ws_connect(url, **kwargs):
            pass
    return caught.value.status


PRESENCE_EVENTS = ("presence_state", "presence_diff")


async def receive(ws) -> Any:
    """The next frame, passing over presence frames (tests/test_presence.py covers those)."""
    while True:
        frame = await ws.receive_json(timeout=RECEIVE_TIMEOUT)
        event = frame.get("event") if isinstance(frame, dict) else frame[3]
        if event not in PRESENCE_EVENTS:
            return frame


async def join(ws, topic: str, ref: str = "1", payload: dict | None = None) -> list:
    await ws.send_json([ref, ref, topic, "phx_join", payload or {}])
    return await receive(ws)


async def joined(ws, topic: str, ref: str = "1") -> None:
    assert await join(ws, topic, ref) == [ref, ref, topic, "phx_reply", OK]


_heartbeat_refs = iter(range(10_000, 10**9))


async def assert_nothing_pending(ws, v1: bool = False, next_frame: Callable[[Any], Awaitable[Any]] = receive) -> None:
    """The next frame is the reply to a heartbeat sent now: nothing else was queued before it. `next_frame`:
    how to read it (by default presence frames are passed over)."""
    ref = str(next(_heartbeat_refs))
    if v1:
        await ws.send_json({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": ref})
        assert await next_frame(ws) == {"topic": "phoenix", "event": "phx_reply", "payload": OK, "ref": ref}
    else:
        await ws.send_json([None, ref, "phoenix", "heartbeat", {}])
        assert await next_frame(ws) == [None, ref, "phoenix", "phx_reply", OK]


async def expect_close(ws, code: int) -> aiohttp.WSMessage:
    msg = await ws.receive(timeout=RECEIVE_TIMEOUT)
    assert msg.type is WSMsgType.CLOSE, msg
    assert msg.data == code, msg
    return msg


# One server for the tests that take `reused_server`: each looks only at its own sockets and topics, reads
# counters as the change it made, and waits for its sockets to be gone; the others need a fresh server.
default_server = shared_server()


@pytest_asyncio.fixture(loop_scope="module")
async def reused_server(default_server: ServerProcess) -> AsyncIterator[ServerProcess]:
    yield default_server
    await connections_closed(default_server)


# --- upgrade refusals


async def test_refused_upgrades_are_403_and_counted(server):
    expired = make_token(ttl=-60)
    wrong_signature = make_token(secret="not-the-server-secret-0123456789abcdef")
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    body = base64.urlsafe_b64encode(orjson.dumps({"sub": "u1", "exp": int(time.time()) + 3600})).rstrip(b"=")
    alg_none = f"{header}.{body.decode()}."
    cases = [
        (ws_url(server, None), "missing"),
        (ws_url(server, ""), "missing"),
        (ws_url(server, "not-a-jwt"), "malformed"),
        (ws_url(server, expired), "expired"),
        (ws_url(server, wrong_signature), "bad_signature"),
        (ws_url(server, alg_none), "bad_algorithm"),
        (ws_url(server, make_token(), vsn="3.0.0"), "vsn"),
        (ws_url(server, make_token(), vsn="2.1.0"), "vsn"),
        (ws_url(server, make_token(), vsn=""), "vsn"),
    ]
    async with aiohttp.ClientSession() as http:
        for url, _ in cases:
            assert await refused_status(http, url) == 403, url
        expected: dict[str, int] = {}
        for _, reason in cases:
            expected[reason] = expected.get(reason, 0) + 1
        for reason, count in expected.items():
            assert await metric(http, server, "push_connects_refused_total", reason=reason) == count, reason
        # A refused upgrade never opened a connection.
        assert await metric(http, server, "push_connections", transport="websocket") == 0


async def test_refusal_body_and_plain_get(server):
    async with aiohttp.ClientSession() as http:
        async with http.get(ws_url(server, "garbage")) as response:
            assert response.status == 403
            assert (await response.json())["error"] == "token refused: malformed"
        # A valid token without the upgrade headers is a 400, not a hang.
        async with http.get(ws_url(server, make_token())) as response:
            assert response.status == 400
        assert await metric(http, server, "push_connects_refused_total", reason="not_websocket") == 1


async def test_origin_policy(start_server):
    server = await start_server(PUSH_ALLOWED_ORIGINS="https://app.example.com,//*.example.org")
    allowed = ["https://app.example.com", "https://app.example.com:443", "http://example.org",
               "https://a.b.example.org:8443", None]
    refused = ["https://evil.com", "http://app.example.com", "https://app.example.com:444",
               "https://example.org.evil.com", "null", "https://notexample.org"]
    async with aiohttp.ClientSession() as http:
        for origin in allowed:
            kwargs = {"origin": origin} if origin else {}
            async with connect(http, server, **kwargs) as ws:
                await assert_nothing_pending(ws)
        for origin in refused:
            assert await refused_status(http, ws_url(server, make_token()), origin=origin) == 403, origin
        assert await metric(http, server, "push_connects_refused_total", reason="origin") == len(refused)


@pytest.mark.asyncio(loop_scope="module")
async def test_no_vsn_means_v1(reused_server):
    async with aiohttp.ClientSession() as http:
        async with connect(http, reused_server, vsn=None) as ws:
            await ws.send_json({"topic": "room:lobby:1", "event": "phx_join", "payload": {}, "ref": "1",
                                "join_ref": "1"})
            assert await receive(ws) == {"topic": "room:lobby:1", "event": "phx_reply", "payload": OK, "ref": "1"}


# --- the token in Sec-WebSocket-Protocol (phoenix.js >= 1.8 authToken)


def auth_protocol(token: str) -> str:
    return "base64url.bearer.phx." + base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


async def test_token_in_subprotocol(server):
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(ws_url(server, None), protocols=["phoenix", auth_protocol(make_token())]) as ws:
            assert ws.protocol == "phoenix"
            await joined(ws, "room:lobby:1")
        # The header's token wins over a query token.
        async with http.ws_connect(ws_url(server, "garbage"),
                                   protocols=["phoenix", auth_protocol(make_token("u2"))]) as ws:
            assert ws.protocol == "phoenix"
            await joined(ws, "user:u2")
        for token in (make_token(ttl=-60), "not-a-jwt"):
            status = await refused_status(http, ws_url(server, None),
                                          protocols=["phoenix", auth_protocol(token)])
            assert status == 403
        # Not decodable as base64url: refused too.
        assert await refused_status(http, ws_url(server, make_token()),
                                    protocols=["phoenix", "base64url.bearer.phx.a"]) == 403
        assert await metric(http, server, "push_connects_refused_total", reason="malformed") == 2


# --- control events


@pytest.mark.asyncio(loop_scope="module")
async def test_heartbeat_reply(reused_server):
    async with aiohttp.ClientSession() as http, connect(http, reused_server) as ws:
        await ws.send_json([None, "4", "phoenix", "heartbeat", {}])
        assert await receive(ws) == [None, "4", "phoenix", "phx_reply", {"status": "ok", "response": {}}]
        await ws.send_json([None, 5, "phoenix", "heartbeat", {}])  # integer refs are echoed as integers
        assert await receive(ws) == [None, 5, "phoenix", "phx_reply", OK]


@pytest.mark.asyncio(loop_scope="module")
async def test_join_ok_exact_frame(reused_server):
    async with aiohttp.ClientSession() as http, connect(http, reused_server) as ws:
        await ws.send_json(["1", "1", "room:lobby:42", "phx_join", {}])
        assert await ws.receive_str(timeout=RECEIVE_TIMEOUT) in (
            '["1","1","room:lobby:42","phx_reply",{"status":"ok","response":{}}]',
            '["1","1","room:lobby:42","phx_reply",{"response":{},"status":"ok"}]')


@pytest.mark.asyncio(loop_scope="module")
async def test_join_with_null_join_ref_uses_the_ref(reused_server):
    async with aiohttp.ClientSession() as http, connect(http, reused_server) as ws:
        await ws.send_json([None, "3", "room:lobby:1", "phx_join", {}])
        assert await receive(ws) == ["3", "3", "room:lobby:1", "phx_reply", OK]
        await ws.send_json(["3", "4", "room:lobby:1", "phx_leave", {}])
        assert await receive(ws) == ["3", "4", "room:lobby:1", "phx_reply", OK]
        assert await receive(ws) == ["3", "3", "room:lobby:1", "phx_close", {}]


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("topic", ["nope:1", "room:lobby:", "user:", "room:", "phoenix", "room:" + "x" * 251])
async def test_unmatched_topic_join(reused_server, topic):
    async with aiohttp.ClientSession() as http, connect(http, reused_server) as ws:
        refused = await metric(http, reused_server, "push_joins_refused_total", reason="unmatched_topic")
        await ws.send_json(["5", "5", topic, "phx_join", {}])
        assert await receive(ws) == [None, "5", topic, "phx_reply",
                                     {"status": "error", "response": {"reason": "unmatched topic"}}]
        assert await metric(http, reused_server, "push_joins_refused_total", reason="unmatched_topic") == refused + 1


@pytest.mark.asyncio(loop_scope="module")
async def test_push_to_unjoined_topic(reused_server):
    async with aiohttp.ClientSession() as http, connect(http, reused_server) as ws:
        for frame in (["1", "7", "room:lobby:9", "new_msg", {}], [None, "8", "room:lobby:9", "user:typing", {}],
                      ["1", "9", "nope:1", "anything", {}]):
            await ws.send_json(frame)
            assert await receive(ws) == [None, frame[1], frame[2], "phx_reply",
                                         {"status": "error", "response": {"reason": "unmatched topic"}}]
        await assert_nothing_pending(ws)  # never a phx_error


@pytest.mark.asyncio(loop_scope="module")
async def test_leave_of_unjoined_topic(reused_server):
    async with aiohttp.ClientSession() as http, connect(http, reused_server) as ws:
        await ws.send_json(["1", "8", "room:lobby:9", "phx_leave", {}])
        assert await receive(ws) == ["1", "8", "room:lobby:9", "phx_reply", OK]
        await assert_nothing_pending(ws)  # no phx_close for a channel that never was


@pytest.mark.asyncio(loop_scope="module")
async def test_leave_of_joined_topic(reused_server):
    topic = "room:lobby:42"
    async with aiohttp.ClientSession() as http, connect(http, reused_server) as ws:
        await joined(ws, topic, "1")
        assert (await publish(http, reused_server, topic, {"n": 1}))["delivered"] == 1
        assert await receive(ws) == [None, None, topic, "new_msg", {"n": 1}]
        await ws.send_json(["1", "2", topic, "phx_leave", {}])
        assert await receive(ws) == ["1", "2", topic, "phx_reply", OK]
        assert await receive(ws) == ["1", "1", topic, "phx_close", {}]
        assert (await publish(http, reused_server, topic, {"n": 2}))["delivered"] == 0
        await assert_nothing_pending(ws)
        # A rejoin works and gets broadcasts again.
        await joined(ws, topic, "3")
        assert (await publish(http, reused_server, topic, {"n": 3}))["delivered"] == 1
        assert await receive(ws) == [None, None, topic, "new_msg", {"n": 3}]


@pytest.mark.asyncio(loop_scope="module")
async def test_duplicate_join(reused_server):
    topic = "room:lobby:42"
    async with aiohttp.ClientSession() as http, connect(http, reused_server) as ws:
        await joined(ws, topic, "1")
        await ws.send_json(["2", "2", topic, "phx_join", {}])
        assert await receive(ws) == ["2", "2", topic, "phx_reply", OK]
        assert await receive(ws) == ["1", "1", topic, "phx_close", {}]  # the OLD join_ref
        assert (await publish(http, reused_server, topic, {"once": True}))["delivered"] == 1
        assert await receive(ws) == [None, None, topic, "new_msg", {"once": True}]
        await assert_nothing_pending(ws)  # not twice
        # The new join_ref is the live one: leaving with it works.
        await ws.send_json(["2", "3", topic, "phx_leave", {}])
        assert await receive(ws) == ["2", "3", topic, "phx_reply", OK]
        assert await receive(ws) == ["2", "2", topic, "phx_close", {}]


@pytest.mark.asyncio(loop_scope="module")
async def test_stale_join_ref_frames_are_ignored(reused_server):
    topic = "room:lobby:42"
    async with aiohttp.ClientSession() as http, connect(http, reused_server) as ws:
        await joined(ws, topic, "1")
        await ws.send_json(["2", "2", topic, "phx_join", {}])
        assert await receive(ws) == ["2", "2", topic, "phx_reply", OK]
        assert await receive(ws) == ["1", "1", topic, "phx_close", {}]
        await ws.send_json(["1", "3", topic, "new_msg", {}])      # stale: ignored, no error reply
        await ws.send_json(["1", "4", topic, "phx_leave", {}])    # stale: ignored, still joined
        await assert_nothing_pending(ws)
        assert (await publish(http, reused_server, topic, {"still": "joined"}))["delivered"] == 1
        assert await receive(ws) == [None, None, topic, "new_msg", {"still": "joined"}]
        # A null join_ref is accepted (the protocol does not require it).
        await ws.send_json([None, "5", topic, "phx_leave", {}])
        assert await receive(ws) == ["2", "5", topic, "phx_reply", OK]
        assert await receive(ws) == ["2", "2", topic, "phx_close", {}]


@pytest.mark.parametrize("event, payload", [("new_msg", {"body": "x"}), ("new_msg", {"token": PUBLISH_KEY}),
                                            ("user:typing", {"typing": True}), ("phx_reply", {})])
@pytest.mark.asyncio(loop_scope="module")
async def test_client_events_are_refused_and_never_broadcast(reused_server, event, payload):
    server, topic = reused_server, "room:lobby:42"
    async with aiohttp.ClientSession() as http, connect(http, server) as sender, \
            connect(http, server, make_token("u2")) as other:
        errors = await metric(http, server, "push_client_errors_total", reason="unhandled_event")
        delivered = await metric(http, server, "push_frames_delivered_total")
        await joined(sender, topic)
        await joined(other, topic)
        await sender.send_json(["1", "2", topic, event, payload])
        assert await receive(sender) == ["1", "2", topic, "phx_reply",
                                         {"status": "error", "response": {"reason": "unhandled event"}}]
        await assert_nothing_pending(other)
        await assert_nothing_pending(sender)
        assert await metric(http, server, "push_client_errors_total", reason="unhandled_event") == errors + 1
        assert await metric(http, server, "push_frames_delivered_total") == delivered


async def test_user_topic_only_for_its_user(server):
    async with aiohttp.ClientSession() as http, connect(http, server, make_token("u1")) as ws:
        await joined(ws, "user:u1", "1")
        assert await join(ws, "user:u2", "2") == ["2", "2", "user:u2", "phx_reply",
                                                  {"status": "error", "response": {"reason": "unauthorized"}}]
        assert await join(ws, "user:u10", "3") == ["3", "3", "user:u10", "phx_reply",
                                                   {"status": "error", "response": {"reason": "unauthorized"}}]
        assert (await publish(http, server, "user:u1", {"to": "u1"}))["delivered"] == 1
        assert await receive(ws) == [None, None, "user:u1", "new_msg", {"to": "u1"}]
        assert (await publish(http, server, "user:u2", {"to": "u2"}))["delivered"] == 0
        await assert_nothing_pending(ws)
        assert await metric(http, server, "push_joins_refused_total", reason="unauthorized") == 2


@pytest.mark.asyncio(loop_scope="module")
async def test_topics_claim_limits_joins(reused_server):
    token = make_token("u1", topics=["room:lobby:1", "room:topic:*", "user:u1"])
    unauthorized = {"status": "error", "response": {"reason": "unauthorized"}}
    async with aiohttp.ClientSession() as http, connect(http, reused_server, token) as ws:
        await joined(ws, "room:lobby:1", "1")
        await joined(ws, "room:topic:9", "2")
        await joined(ws, "user:u1", "3")
        for ref, topic in (("4", "room:lobby:2"), ("5", "room:lobby:10"), ("6", "room:7")):
            assert await join(ws, topic, ref) == [ref, ref, topic, "phx_reply", unauthorized]


async def test_require_topics_claim(start_server):
    server = await start_server(PUSH_REQUIRE_TOPICS_CLAIM="true")
    unauthorized = {"status": "error", "response": {"reason": "unauthorized"}}
    async with aiohttp.ClientSession() as http:
        async with connect(http, server, make_token("u1")) as ws:
            for ref, topic in (("1", "room:lobby:1"), ("2", "room:topic:1"), ("3", "room:1")):
                assert await join(ws, topic, ref) == [ref, ref, topic, "phx_reply", unauthorized]
            await joined(ws, "user:u1", "4")  # the own user topic needs no claim
        async with connect(http, server, make_token("u1", topics=["room:lobby:*"])) as ws:
            await joined(ws, "room:lobby:1", "1")
            assert await join(ws, "room:1", "2") == ["2", "2", "room:1", "phx_reply", unauthorized]


async def test_max_topics_per_connection(start_server):
    server = await start_server(PUSH_MAX_TOPICS_PER_CONNECTION="3")
    too_many = {"status": "error", "response": {"reason": "too many channels joined"}}
    async with aiohttp.ClientSession() as http, connect(http, server) as ws:
        for index in range(1, 4):
            await joined(ws, f"room:lobby:{index}", str(index))
        assert await join(ws, "room:lobby:4", "4") == ["4", "4", "room:lobby:4", "phx_reply", too_many]
        assert (await publish(http, server, "room:lobby:4", {}))["delivered"] == 0
        # Rejoining a topic already joined replaces it, so it is not one too many.
        assert await join(ws, "room:lobby:3", "5") == ["5", "5", "room:lobby:3", "phx_reply", OK]
        assert await receive(ws) == ["3", "3", "room:lobby:3", "phx_close", {}]
        # Leaving frees a slot.
        await ws.send_json(["1", "6", "room:lobby:1", "phx_leave", {}])
        assert await receive(ws) == ["1", "6", "room:lobby:1", "phx_reply", OK]
        assert await receive(ws) == ["1", "1", "room:lobby:1", "phx_close", {}]
        await joined(ws, "room:lobby:4", "7")
        assert await metric(http, server, "push_joins_refused_total", reason="too_many_channels") == 1


# --- V1


@pytest.mark.asyncio(loop_scope="module")
async def test_v1_frames(reused_server):
    topic = "room:lobby:42"
    async with aiohttp.ClientSession() as http, connect(http, reused_server, vsn="1.0.0") as ws:
        await ws.send_json({"topic": topic, "event": "phx_join", "payload": {}, "ref": "1", "join_ref": "1"})
        reply = await receive(ws)
        assert reply == {"topic": topic, "event": "phx_reply", "payload": OK, "ref": "1"}
        assert "join_ref" not in reply
        await publish(http, reused_server, topic, {"body": "hi"})
        assert await receive(ws) == {"topic": topic, "event": "new_msg", "payload": {"body": "hi"}, "ref": None}
        await ws.send_json({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": "2"})
        assert await receive(ws) == {"topic": "phoenix", "event": "phx_reply", "payload": OK, "ref": "2"}
        await ws.send_json({"topic": "nope:1", "event": "phx_join", "payload": {}, "ref": "3"})
        assert await receive(ws) == {"topic": "nope:1", "event": "phx_reply", "ref": "3",
                                     "payload": {"status": "error", "response": {"reason": "unmatched topic"}}}
        await ws.send_json({"topic": topic, "event": "phx_leave", "payload": {}, "ref": "4", "join_ref": "1"})
        assert await receive(ws) == {"topic": topic, "event": "phx_reply", "payload": OK, "ref": "4"}
        assert await receive(ws) == {"topic": topic, "event": "phx_close", "payload": {}, "ref": "1"}
        await assert_nothing_pending(ws, v1=True)


async def test_v1_binary_frame_is_invalid(server):
    async with aiohttp.ClientSession() as http, connect(http, server, vsn="1.0.0") as ws:
        await ws.send_bytes(b'{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"1"}')
        await expect_close(ws, 1007)
        assert await metric(http, server, "push_client_errors_total", reason="binary_unsupported") == 1


async def test_v2_binary_push(server):
    topic = b"room:lobby:1"

    def binary(join_ref: bytes, ref: bytes, event: bytes, data: bytes) -> bytes:
        return (struct.pack("5B", 0, len(join_ref), len(ref), len(topic), len(event))
                + join_ref + ref + topic + event + data)

    async with aiohttp.ClientSession() as http, connect(http, server) as ws:
        await ws.send_bytes(binary(b"1", b"1", b"phx_join", b"\x00\x01"))
        assert await receive(ws) == ["1", "1", "room:lobby:1", "phx_reply", OK]
        await ws.send_bytes(binary(b"1", b"2", b"upload", b"\xff" * 10))
        assert await receive(ws) == ["1", "2", "room:lobby:1", "phx_reply",
                                     {"status": "error", "response": {"reason": "unhandled event"}}]
        await ws.send_bytes(b"\x01\x00")  # a reply kind from a client: invalid
        await expect_close(ws, 1007)
        assert await metric(http, server, "push_client_errors_total", reason="bad_binary") == 1


# --- protocol errors close the socket; the server keeps serving others


async def test_invalid_json_closes_with_1007(server):
    topic = "room:lobby:42"
    async with aiohttp.ClientSession() as http, connect(http, server) as bystander:
        await joined(bystander, topic)
        async with connect(http, server) as ws:
            await joined(ws, topic)
            await ws.send_str("this is not json")
            msg = await expect_close(ws, 1007)
            assert msg.extra == "invalid message"
        for bad in ('{"topic":"t:1"}', '["1","1",5,"e",{}]', '[true,"1","t:1","e",{}]'):
            async with connect(http, server) as ws:
                await ws.send_str(bad)
                await expect_close(ws, 1007)
        assert await metric(http, server, "push_client_errors_total", reason="invalid_json") == 1
        assert await metric(http, server, "push_client_errors_total", reason="bad_shape") == 1
        assert await metric(http, server, "push_client_errors_total", reason="bad_topic") == 1
        assert await metric(http, server, "push_client_errors_total", reason="bad_join_ref") == 1
        assert await metric(http, server, "push_disconnects_total", reason="invalid message") == 4
        assert (await publish(http, server, topic, {"still": "serving"}))["delivered"] == 1
        assert await receive(bystander) == [None, None, topic, "new_msg", {"still": "serving"}]
        await wait_for_metric(http, server, "push_connections", 1, transport="websocket")


async def test_oversized_frame_closes_with_1009(start_server):
    server = await start_server(PUSH_MAX_FRAME_BYTES="1KiB")
    topic = "room:lobby:42"
    async with aiohttp.ClientSession() as http, connect(http, server) as bystander:
        await joined(bystander, topic)
        async with connect(http, server) as ws:
            await joined(ws, topic)
            # Just under the limit is fine.
            await ws.send_json([None, "2", "phoenix", "heartbeat", {"pad": "x" * 900}])
            assert await receive(ws) == [None, "2", "phoenix", "phx_reply", OK]
            await ws.send_json([None, "3", "phoenix", "heartbeat", {"pad": "x" * 2000}])
            await expect_close(ws, 1009)
        # Counted once aiohttp has finished its closing handshake: asynchronously.
        await wait_for_metric(http, server, "push_client_errors_total", 1, reason="frame_too_big")
        assert await metric(http, server, "push_client_errors_total", reason="websocket_error") == 0
        assert (await publish(http, server, topic, {"still": "serving"}))["delivered"] == 1
        assert await receive(bystander) == [None, None, topic, "new_msg", {"still": "serving"}]
        await wait_for_metric(http, server, "push_connections", 1, transport="websocket")


# --- the WebSocket layer itself (RFC 6455), below Phoenix


async def test_upgrade_on_a_kept_alive_connection_and_frames_behind_the_head(server):
    """The upgrade may be a connection's second request (aiohttp's client reuses pooled connections), and
    a client may send its first frames in the same write as the request: both work, frames in order."""
    join = raw_frame(TEXT, orjson.dumps(["1", "1", "room:lobby:7", "phx_join", {}]))
    heartbeat = raw_frame(TEXT, orjson.dumps([None, "2", "phoenix", "heartbeat", {}]))
    for before in (b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"):
        raw = await Client.connect(server.port, make_token(), before=before, behind=join + heartbeat)
        try:
            assert await raw.next_json() == ["1", "1", "room:lobby:7", "phx_reply", OK]
            assert await raw.next_json() == [None, "2", "phoenix", "phx_reply", OK]
            async with aiohttp.ClientSession() as http:
                assert (await publish(http, server, "room:lobby:7", {"n": 1}))["delivered"] == 1
            assert await raw.next_json() == [None, None, "room:lobby:7", "new_msg", {"n": 1}]
        finally:
            raw.close()
    async with aiohttp.ClientSession() as http:
        await wait_for_metric(http, server, "push_connections", 0, transport="websocket")
        assert await metric(http, server, "push_http_requests_total", route="/socket/websocket", method="GET",
                            status="101") == 2


@pytest.mark.asyncio(loop_scope="module")
async def test_ping_fragments_and_close_handshake(reused_server):
    raw = await Client.connect(reused_server.port, make_token())
    try:
        await raw.send_raw(raw_frame(PING, b"are you there"))
        assert opcode_and_data(await raw.next_frame()) == (PONG, b"are you there")
        # A text message in three fragments, with a ping between two of them.
        text = orjson.dumps([None, "3", "phoenix", "heartbeat", {}])
        await raw.send_raw(raw_frame(TEXT, text[:5], fin=False))
        await raw.send_raw(raw_frame(CONT, text[5:9], fin=False))
        await raw.send_raw(raw_frame(PING, b""))
        await raw.send_raw(raw_frame(CONT, text[9:]))
        assert opcode_and_data(await raw.next_frame()) == (PONG, b"")
        assert await raw.next_json() == [None, "3", "phoenix", "phx_reply", OK]
        # The client closes: the server answers with the same code, then the connection ends.
        await raw.send_close(4001, "bye")
        assert opcode_and_data(await raw.next_frame()) == (CLOSE, close_payload(4001))
        with pytest.raises(EOFError):
            await raw.next_frame()
    finally:
        raw.close()


def opcode_and_data(frame: Any) -> tuple[int, bytes]:
    return frame.opcode.value, frame.data


@pytest.mark.parametrize("frame, code", [
    (raw_frame(TEXT, b"{}", masked=False), 1002),
    (raw_frame(TEXT, b"[]", rsv=4), 1002),  # RSV1
    (raw_frame(CONT, b"tail"), 1002),  # a continuation with nothing to continue
    (raw_frame(0x3, b"x"), 1002),  # a reserved opcode
    (raw_frame(PING, b"x" * 126), 1002),  # a control frame over 125 bytes
    (raw_frame(CLOSE, b"\x03"), 1002),  # a close frame with a one-byte body
    (raw_frame(CLOSE, close_payload(999)), 1002),  # an invalid close code
    (raw_frame(TEXT, b'["1","1","room:\xff","phx_join",{}]'), 1007),  # a text frame that is not UTF-8
], ids=["unmasked", "rsv1", "stray-continuation", "reserved-opcode", "long-ping", "short-close", "bad-close-code",
        "not-utf8"])
@pytest.mark.asyncio(loop_scope="module")
async def test_protocol_violations_close_and_are_counted(reused_server, frame, code):
    server = reused_server
    async with aiohttp.ClientSession() as http:
        errors = await metric(http, server, "push_client_errors_total", reason="websocket_error")
        raw = await Client.connect(server.port, make_token())
        try:
            await raw.send_raw(frame)
            assert (await raw.closed_with())[0] == code
        finally:
            raw.close()
        await wait_for_metric(http, server, "push_client_errors_total", errors + 1, reason="websocket_error")
        await wait_for_metric(http, server, "push_connections", 0, transport="websocket")


@pytest.mark.asyncio(loop_scope="module")
async def test_malformed_upgrades_go_to_the_http_layer(reused_server):
    """A request head the front door does not take whole (bad key, no upgrade) is answered by aiohttp:
    400, never an upgrade, never a hang. (Another WebSocket version: 426, tests/test_ws_hostile.py.)"""
    token = make_token()
    for head in (
        f"GET /socket/websocket?vsn=2.0.0&token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n",
        f"GET /socket/websocket?vsn=2.0.0&token={token} HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", reused_server.port)
        try:
            writer.write(head.encode())
            status_line = await asyncio.wait_for(reader.readline(), RECEIVE_TIMEOUT)
            assert status_line.startswith(b"HTTP/1.1 400 "), (head, status_line)
        finally:
            writer.close()


async def test_a_connection_that_does_not_finish_its_request_head_is_cut(start_server):
    server = await start_server(PUSH_HANDSHAKE_TIMEOUT="0.5")
    token = make_token()
    silent = await asyncio.open_connection("127.0.0.1", server.port)
    partial = await asyncio.open_connection("127.0.0.1", server.port)
    huge = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        partial[1].write(f"GET /socket/websocket?vsn=2.0.0&token={token} HTTP/1.1\r\nHost: x\r\n".encode())
        # A head longer than the front door reads is aiohttp's to refuse.
        huge[1].write(f"GET /socket/websocket?token={token} HTTP/1.1\r\nX-Pad: {'x' * 20000}\r\n\r\n".encode())
        status_line = await asyncio.wait_for(huge[0].readline(), RECEIVE_TIMEOUT)
        assert status_line.split(b" ")[1] in (b"400", b"431"), status_line
        async with aiohttp.ClientSession() as http, connect(http, server) as ws:
            await joined(ws, "room:lobby:1")  # others are served meanwhile
            started = time.monotonic()
            for reader, _ in (silent, partial):
                assert await asyncio.wait_for(reader.read(), RECEIVE_TIMEOUT) == b""  # closed, no answer
            assert time.monotonic() - started < 3
            await ws.send_json([None, "2", "phoenix", "heartbeat", {}])
            assert await receive(ws) == [None, "2", "phoenix", "phx_reply", OK]
    finally:
        for _, writer in (silent, partial, huge):
            writer.close()


# --- server-side timeouts


@pytest.mark.slow
async def test_heartbeat_timeout(start_server):
    server = await start_server(PUSH_HEARTBEAT_TIMEOUT="1")
    async with aiohttp.ClientSession() as http, connect(http, server) as silent, connect(http, server) as chatty:
        await joined(chatty, "room:lobby:1")
        started = time.monotonic()

        async def keep_alive() -> None:
            while True:
                await assert_nothing_pending(chatty)
                await asyncio.sleep(0.2)  # the client's heartbeat interval: the pace is the case

        alive = asyncio.create_task(keep_alive())
        try:
            msg = await expect_close(silent, 1001)
            assert msg.extra == "heartbeat timeout"
            assert time.monotonic() - started >= 0.5
            # The socket that keeps sending heartbeats outlives the silent one's timeout by far.
            done, _ = await asyncio.wait({alive}, timeout=2.5 - (time.monotonic() - started))
            assert not done, alive
        finally:
            alive.cancel()
            await asyncio.gather(alive, return_exceptions=True)
        assert not chatty.closed
        assert (await publish(http, server, "room:lobby:1", {}))["delivered"] == 1
        assert await metric(http, server, "push_disconnects_total", reason="heartbeat timeout") == 1


@pytest.mark.slow
async def test_token_expiry_closes_the_socket(server):
    exp = int(time.time()) + 2
    token = make_token(ttl=exp - int(time.time()))
    async with aiohttp.ClientSession() as http, connect(http, server, token) as ws:
        await joined(ws, "room:lobby:1")
        await assert_nothing_pending(ws)
        msg = await expect_close(ws, 1001)
        assert msg.extra == "token expired"
        assert time.time() >= exp - 0.05
        assert await metric(http, server, "push_disconnects_total", reason="token expired") == 1
        await wait_for_metric(http, server, "push_connections", 0, transport="websocket")


# --- slow consumers


@pytest.mark.slow
async def test_slow_consumer_is_disconnected_and_the_others_get_everything(start_server):
    server = await start_server(PUSH_SEND_BUFFER_BYTES="64KiB")
    topic = "room:lobby:slow"
    round_size, max_rounds = 4, 1000  # 4 x ~8 KiB a round: the healthy reader never lags 64 KiB behind
    filler = "x" * 8000
    async with aiohttp.ClientSession() as http, connect(http, server) as healthy:
        await joined(healthy, topic)
        slow = await Client.connect(server.port, make_token("slow"), rcvbuf=4096)
        try:
            await slow.send_text(orjson.dumps(["1", "1", topic, "phx_join", {}]))
            assert await slow.next_json() == ["1", "1", topic, "phx_reply", OK]
            # From here on the slow socket is never read until the server gives up on it.
            received: list[int] = []
            seq = 0
            for _ in range(max_rounds):
                await publish_numbered(http, server, topic, seq, round_size, filler)
                seq += round_size
                while len(received) < seq:
                    frame = await receive(healthy)
                    assert frame[:4] == [None, None, topic, "new_msg"]
                    received.append(frame[4]["seq"])
                if await metric(http, server, "push_slow_consumer_disconnects_total") == 1:
                    break
            else:
                raise AssertionError(f"the slow consumer was not disconnected after {seq} messages")
            assert received == list(range(seq))
            assert await metric(http, server, "push_disconnects_total", reason="slow consumer") == 1
            # The healthy subscriber goes on; the slow one gets nothing more.
            delivered = (await publish(http, server, topic, {"seq": seq, "f": "last"}))["delivered"]
            assert delivered == 1
            assert (await receive(healthy))[4] == {"seq": seq, "f": "last"}
            await assert_nothing_pending(healthy)

            # What the slow socket finally reads: its queued broadcasts in order, then a close frame (1013).
            slow_seqs: list[int] = []
            while True:
                opcode, payload = opcode_and_data(await slow.next_frame())
                if opcode == CLOSE:
                    assert payload == close_payload(1013, b"slow consumer")
                    break
                assert opcode == TEXT
                slow_seqs.append(orjson.loads(payload)[4]["seq"])
            # Nothing was dropped from the middle, and nothing published after the disconnect got there.
            assert slow_seqs == list(range(len(slow_seqs)))
            assert len(slow_seqs) <= seq
        finally:
            slow.close()
        await wait_for_metric(http, server, "push_connections", 1, transport="websocket")


@pytest.mark.slow
async def test_a_reader_that_stalls_past_the_kernels_buffers_gets_every_frame_whole_and_in_order(start_server):
    """Deliveries are written to the socket itself while nothing waits before them, and queued in the
    transport once the kernel's buffers are full. A reader that stalls past both (a small receive window,
    more bytes than the kernel's largest send buffer) gets every frame whole and in order, with a heartbeat
    asked mid-stall answered behind what came before it; once it has caught up, a publish reaches it at once."""
    server = await start_server(PUSH_SEND_BUFFER_BYTES="64MiB")
    topic = "room:lobby:stall"
    filler = "x" * 8000
    with open("/proc/sys/net/ipv4/tcp_wmem") as wmem:
        kernel_max = int(wmem.read().split()[2])
    per_request = 50  # about 400 KB a publish request
    requests = (kernel_max + 4 * 1024 * 1024) // (per_request * len(filler)) + 1
    async with aiohttp.ClientSession() as http:
        stalled = await Client.connect(server.port, make_token("stalled"), rcvbuf=4096)
        try:
            await stalled.send_text(orjson.dumps(["1", "1", topic, "phx_join", {}]))
            assert await stalled.next_json() == ["1", "1", topic, "phx_reply", OK]
            published, asked_after = 0, None
            for number in range(requests):
                await publish_numbered(http, server, topic, published, per_request, filler)
                published += per_request
                if number == requests // 2:
                    await stalled.send_text(heartbeat("mid"))
                    asked_after = published
            seqs: list[int] = []
            answered_at = None
            while len(seqs) < published:
                message = await stalled.next_json()
                if message == heartbeat_reply("mid"):
                    answered_at = len(seqs)
                    continue
                assert message[:4] == [None, None, topic, "new_msg"] and message[4]["f"] == filler, message[:4]
                seqs.append(message[4]["seq"])
            assert seqs == list(range(published))
            assert answered_at is not None and asked_after is not None and answered_at >= asked_after
            await stalled.heartbeat_round_trip("caught-up")
            assert (await publish(http, server, topic, {"seq": published}))["delivered"] == 1
            assert (await stalled.next_json())[4] == {"seq": published}
            assert await metric(http, server, "push_slow_consumer_disconnects_total") == 0
        finally:
            stalled.close()


# --- no leaks


async def test_connections_are_released(server):
    count = 50
    async with aiohttp.ClientSession() as http:
        sockets = []
        raws = []
        for index in range(count):
            if index % 5 == 4:  # some hand-made clients that will vanish without a close frame
                raw = await Client.connect(server.port, make_token(f"u{index}"))
                await raw.send_text(orjson.dumps([str(index), str(index), f"room:lobby:{index % 7}", "phx_join", {}]))
                assert (await raw.next_json())[4] == OK
                raws.append(raw)
            else:
                ws = await http.ws_connect(ws_url(server, make_token(f"u{index}")))
                await joined(ws, f"room:lobby:{index % 7}", str(index))
                await joined(ws, f"user:u{index}", "x")
                sockets.append((index, ws))
        assert await metric(http, server, "push_connections", transport="websocket") == count
        for index, ws in sockets:
            if index % 2:
                await ws.send_json([str(index), "leave", f"room:lobby:{index % 7}", "phx_leave", {}])
                assert (await receive(ws))[4] == OK
            await ws.close()
        for raw in raws:
            raw.close()
        await wait_for_metric(http, server, "push_connections", 0, transport="websocket")
        # Every topic was released: a publish reaches nobody.
        for topic in [f"room:lobby:{index}" for index in range(7)] + ["user:u0"]:
            assert (await publish(http, server, topic, {}))["delivered"] == 0


# --- one broadcast, two protocol versions


async def test_publish_reaches_v1_and_v2_sockets(server):
    topic = "room:lobby:42"
    async with aiohttp.ClientSession() as http, connect(http, server, vsn="1.0.0") as v1, \
            connect(http, server, vsn="2.0.0") as v2:
        await v1.send_json({"topic": topic, "event": "phx_join", "payload": {}, "ref": "1"})
        assert await receive(v1) == {"topic": topic, "event": "phx_reply", "payload": OK, "ref": "1"}
        await joined(v2, topic)
        payload = {"channel_id": "42", "message": "hi", "nested": {"list": [1, "two", None]}}
        response = await http.post(f"{server.http_url}/api/message", json={**payload, "token": PUBLISH_KEY})
        assert response.status == 200
        assert (await response.json())["delivered"] == 2
        assert await receive(v1) == {"topic": topic, "event": "new_msg", "payload": payload, "ref": None}
        assert await receive(v2) == [None, None, topic, "new_msg", payload]
        assert await metric(http, server, "push_frames_delivered_total") == 2


@pytest.mark.asyncio(loop_scope="module")
async def test_jwt_secret_fixture_is_the_servers(reused_server):
    # Guards the suite itself: a token signed with the test secret is accepted by the fixture's server.
    assert JWT_SECRET
    async with aiohttp.ClientSession() as http, connect(http, reused_server) as ws:
        await assert_nothing_pending(ws)
