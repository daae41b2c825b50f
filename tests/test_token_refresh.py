"""Token refresh on a live socket (issue 18 part 2): the `access_token` event, against the real server process.

A raw WebSocket client (tests/ws_client.py) pushes `access_token` {"access_token": "<JWT>"} on a joined topic or
on `phoenix` and reads what the server answers; phoenix.js under Node keeps a socket with a 3 s token up for 15 s
by refreshing it every 2 s (tests/js/refresh.mjs).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest

from conftest import JWT_SECRET, ServerProcess, make_token, shared_server
from http_helpers import metric, publish
from nodejs import JS_DIR, run_script
from ws_client import TEXT, Client, raw_frame

pytestmark = pytest.mark.asyncio(loop_scope="module")
# No leeway: a token is over at its `exp`, so the tests wait only for the token lifetimes they choose.
refresh_server = shared_server(PUSH_JWT_LEEWAY="0")

LOBBY = "room:lobby:18"
THREAD = "room:topic:18"  # tracked in presence by default
Frame = list[Any]


@asynccontextmanager
async def connected(server: ServerProcess, token: str) -> AsyncIterator[Client]:
    client = await Client.connect(server.port, token)
    try:
        yield client
    finally:
        client.close()


async def frame_where(client: Client, predicate: Callable[[Frame], bool]) -> Frame:
    """The first frame that `predicate` takes; presence frames before it are passed over, anything else fails."""
    while True:
        frame = await client.next_json()
        assert isinstance(frame, list), frame
        if predicate(frame):
            return frame
        assert frame[3] in ("presence_state", "presence_diff"), frame


async def join(client: Client, topic: str, join_ref: str) -> None:
    await client.send_text(orjson.dumps([join_ref, join_ref, topic, "phx_join", {}]))
    reply = await frame_where(client, lambda f: f[1] == join_ref and f[3] == "phx_reply")
    assert reply == [join_ref, join_ref, topic, "phx_reply", {"status": "ok", "response": {}}]


async def refresh(client: Client, topic: str, join_ref: str | None, ref: str, payload: Any) -> Frame:
    """Push access_token and return its reply (a phx_reply with this ref)."""
    if isinstance(payload, str):
        payload = {"access_token": payload}
    await client.send_text(orjson.dumps([join_ref, ref, topic, "access_token", payload]))
    return await frame_where(client, lambda f: f[1] == ref and f[3] == "phx_reply")


def refused(join_ref: str | None, ref: str, topic: str, reason: str) -> Frame:
    return [join_ref, ref, topic, "phx_reply", {"status": "error", "response": {"reason": reason}}]


def accepted(join_ref: str | None, ref: str, topic: str) -> Frame:
    return [join_ref, ref, topic, "phx_reply", {"status": "ok", "response": {}}]


async def refreshes(server: ServerProcess, result: str) -> float:
    async with aiohttp.ClientSession() as http:
        return await metric(http, server, "push_token_refreshes_total", result=result)


@pytest.mark.slow
async def test_a_refreshed_socket_outlives_its_first_token(refresh_server):
    """Two sockets with a 2 s token: the one that refreshes stays up, the other is closed at expiry as before."""
    before = await refreshes(refresh_server, "ok")
    async with connected(refresh_server, make_token("u1", ttl=2)) as kept, \
            connected(refresh_server, make_token("u1", ttl=2)) as left:
        await join(kept, LOBBY, "1")
        assert await refresh(kept, LOBBY, "1", "2", make_token("u1", ttl=60)) == accepted("1", "2", LOBBY)
        assert await left.closed_with(timeout=5) == (1001, "token expired")
        await kept.heartbeat_round_trip("3")  # still open past the first token's expiry
        async with aiohttp.ClientSession() as http:
            assert (await publish(http, refresh_server, LOBBY, {"n": 1}))["delivered"] == 1
        assert await kept.next_json() == [None, None, LOBBY, "new_msg", {"n": 1}]
    assert await refreshes(refresh_server, "ok") == before + 1


# (token, the reply's reason, the metric's result): each refusal, checked at once on its own connection.
REFUSALS = [
    (make_token("u2"), "sub_mismatch: the token is for another sub", "sub_mismatch"),
    (make_token("u1", ttl=-60), "expired", "expired"),
    (make_token("u1", secret="another-secret-0123456789abcdef0123456789"), "bad_signature", "bad_signature"),
    (make_token("u1", aud="someone-else"), "bad_audience: aud is given, none is configured", "bad_audience"),
    ("not.a.jwt", "malformed", "malformed"),
    ({"token": make_token("u1")}, 'bad_payload: expected {"access_token": "<JWT>"}', "bad_payload"),
]


@pytest.mark.slow
async def test_a_refused_token_changes_nothing(refresh_server):
    """The reply names the reason; the connection keeps its token, so it is closed at that token's expiry.
    Every case waits out a 2 s token, so they run at once (each counts under its own result label)."""
    await asyncio.gather(*(_refused(refresh_server, token, reason, result) for token, reason, result in REFUSALS))


async def _refused(refresh_server: ServerProcess, token: Any, reason: str, result: str) -> None:
    before = await refreshes(refresh_server, result)
    async with connected(refresh_server, make_token("u1", ttl=2)) as client:
        await join(client, LOBBY, "1")
        assert await refresh(client, LOBBY, "1", "2", token) == refused("1", "2", LOBBY, reason)
        assert await client.closed_with(timeout=5) == (1001, "token expired")
    assert await refreshes(refresh_server, result) == before + 1


async def test_refreshes_are_limited_to_one_verification_a_second(refresh_server):
    before = await refreshes(refresh_server, "too_many_refreshes")
    first, second = make_token("u1", ttl=60), make_token("u1", ttl=61)
    async with connected(refresh_server, make_token("u1")) as client:
        await join(client, LOBBY, "1")
        await join(client, THREAD, "2")
        # Both in one write: the server reads them in the same instant.
        await client.send_raw(b"".join(raw_text(["1", ref, LOBBY, "access_token", {"access_token": token}])
                                       for ref, token in (("3", first), ("4", second))))
        assert await frame_where(client, lambda f: f[3] == "phx_reply") == accepted("1", "3", LOBBY)
        assert await frame_where(client, lambda f: f[3] == "phx_reply") == refused("1", "4", LOBBY,
                                                                                   "too_many_refreshes")
        # The same token again, as clients push it on each of their channels, is no new verification.
        assert await refresh(client, THREAD, "2", "5", first) == accepted("2", "5", THREAD)
    assert await refreshes(refresh_server, "too_many_refreshes") == before + 1


def raw_text(message: Frame) -> bytes:
    return raw_frame(TEXT, orjson.dumps(message))


async def test_a_narrowed_topics_claim_leaves_the_topics_it_drops(refresh_server):
    """The reply first, then phx_close on the dropped topic; another client sees the presence leave."""
    wide = make_token("u1", topics=["room:lobby:*", "room:topic:*"], info={"username": "ada"})
    async with connected(refresh_server, wide) as client, \
            connected(refresh_server, make_token("u2")) as observer:
        await join(observer, THREAD, "1")
        await join(client, LOBBY, "1")
        await join(client, THREAD, "2")
        await frame_where(observer, lambda f: f[3] == "presence_diff" and "u1" in f[4]["joins"])
        narrow = make_token("u1", topics=["room:lobby:*"], info={"username": "ada"})
        assert await refresh(client, LOBBY, "1", "3", narrow) == accepted("1", "3", LOBBY)
        assert await client.next_json() == ["2", "2", THREAD, "phx_close", {}]
        await frame_where(observer, lambda f: f[3] == "presence_diff" and "u1" in f[4]["leaves"])
        # The lobby stays; the thread is now refused, and its broadcasts no longer come.
        async with aiohttp.ClientSession() as http:
            assert (await publish(http, refresh_server, THREAD, {"n": 1}))["delivered"] == 1  # the observer
            assert (await publish(http, refresh_server, LOBBY, {"n": 2}))["delivered"] == 1
        assert await client.next_json() == [None, None, LOBBY, "new_msg", {"n": 2}]
        await client.send_text(orjson.dumps(["4", "4", THREAD, "phx_join", {}]))
        assert await client.next_json() == refused("4", "4", THREAD, "unauthorized")


async def test_a_narrowed_token_on_the_dropped_topic_is_answered_before_it_closes(refresh_server):
    async with connected(refresh_server, make_token("u1", topics=["room:lobby:*", "room:topic:*"])) as client:
        await join(client, THREAD, "1")
        narrow = make_token("u1", topics=["room:lobby:*"])
        assert await refresh(client, THREAD, "1", "2", narrow) == accepted("1", "2", THREAD)
        assert await client.next_json() == ["1", "1", THREAD, "phx_close", {}]


@pytest.mark.slow
async def test_refresh_on_the_phoenix_topic(refresh_server):
    async with connected(refresh_server, make_token("u1", ttl=2)) as kept, \
            connected(refresh_server, make_token("u1", ttl=2)) as left:
        assert await refresh(kept, "phoenix", None, "1", {}) == refused(
            None, "1", "phoenix", 'bad_payload: expected {"access_token": "<JWT>"}')
        assert await refresh(kept, "phoenix", None, "2", make_token("u1", ttl=60)) == accepted(None, "2", "phoenix")
        assert await left.closed_with(timeout=5) == (1001, "token expired")
        await kept.heartbeat_round_trip("3")


async def test_a_topic_not_joined_is_still_unmatched(refresh_server):
    async with connected(refresh_server, make_token("u1")) as client:
        assert await refresh(client, LOBBY, None, "1", make_token("u1")) == refused(None, "1", LOBBY, "unmatched topic")


# --- phoenix.js

REFRESH_SCRIPT = JS_DIR / "refresh.mjs"


VARIANTS = [("16", False), ("17", False), ("18", False), ("18", True)]  # phoenix.js 1.6-1.8; 1.8 over long-poll too


@pytest.mark.slow
async def test_phoenix_js_refreshing_every_2s_stays_up_for_15s(refresh_server):
    """A socket whose tokens live 3 s, refreshed every 2 s: no close, every message, no presence flicker
    (neither in its own Presence nor in what a watcher on the topic is sent). The four clients run at
    once, each on its own topic: 15 s for all of them, not for each."""
    await asyncio.gather(*(_stays_up(refresh_server, version, longpoll) for version, longpoll in VARIANTS))


async def _stays_up(refresh_server, version: str, longpoll: bool) -> None:
    topic = f"room:topic:js{version}{'lp' if longpoll else ''}"
    async with run_script(REFRESH_SCRIPT, version, f"ws://127.0.0.1:{refresh_server.port}/socket",
                          "--secret", JWT_SECRET, "--sub", "js", "--ttl", "3", "--every-ms", "2000",
                          "--topic", topic, *(["--longpoll"] if longpoll else [])) as client, \
            connected(refresh_server, make_token("watcher")) as watcher:
        await client.wait_event("join", status="ok")
        await join(watcher, topic, "1")
        started = time.monotonic()
        sent = 0
        async with aiohttp.ClientSession() as http:
            while time.monotonic() - started < 15:
                await client.wait_event("refresh", timeout=3)  # paced by the client's refreshes
                sent += 1
                assert (await publish(http, refresh_server, topic, {"n": sent}))["delivered"] == 2
                await client.wait_event("message", payload={"n": sent})
        watched: list[Frame] = []
        while not watched or watched[-1][4] != {"n": sent}:
            watched.append(await watcher.next_json())  # type: ignore[arg-type]
    leaves = [f for f in watched if f[3] == "presence_diff" and "js" in f[4]["leaves"]]
    assert not leaves, watched
    assert [f[4]["n"] for f in watched if f[3] == "new_msg"] == list(range(1, sent + 1))
    assert len(client.seen("open")) == 1 and not client.seen("close"), client.events
    assert [e["status"] for e in client.seen("refresh")] == ["ok"] * sent, client.events
    assert [e["payload"]["n"] for e in client.seen("message")] == list(range(1, sent + 1)), client.events
    assert not client.seen("presence_leave") and not client.seen("channel_error"), client.events
    assert sent >= 7, (version, longpoll)
