"""Missed-message recovery: positions, the memory history, and recovery end to end.

1. Positions (`<epoch>~<seq>`) and MemoryHistory as units, with an injected clock; a Session whose
   history read answers before the newest broadcast is heard live (no second copy).
2. A real server (memory broker) over raw WebSockets: positions in broadcast refs, join replies with
   `position` / `recovered`, the replay, refused `since`, metrics, `GET /api/history`.
3. A join with `since` while a publisher keeps publishing: no gap, no duplicate (memory, Redis, NATS).
4. Redis (recovery from another node) and NATS (stream sequences as positions).
5. The official phoenix.js client (tests/js/recover.mjs) with the documented since-pattern.

Every server here turns history on explicitly (conftest's server_env() turns it off by default).
Redis and NATS are the shared servers at 127.0.0.1:6379 / :4222 (fresh uuid topics in every test);
one that cannot be reached fails the test when CI=true and skips it otherwise.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest

from conftest import PUBLISH_KEY, ServerProcess, make_token, shared_server, until
from brokers import require_nats, require_redis
from http_helpers import bounded, metric, metrics, publish
from phx_client import PhoenixSocket, open_socket
from nodejs import JS_DIR, NodeScript, node_binary, run_script
from push_service.auth import Identity
from push_service.broker.memory import MemoryBroker
from push_service.config import Settings
from push_service.history.memory import ENTRY_OVERHEAD, MemoryHistory
from push_service.messages import Broadcast, Position, Recovery, new_epoch
from push_service.node import Node

from fakes import RecordingConnection

TIMEOUT = 5.0  # for any one thing that should happen promptly
RECOVER_JS = JS_DIR / "recover.mjs"
POSITION = re.compile(r"[A-Za-z0-9_-]{1,32}~[0-9]{1,19}")
BAD_SINCE = "bad since: a position is <epoch>~<seq>, as received in a broadcast's ref"

Frame = Any
Event = dict[str, Any]


# ===================================================================== shared helpers (also used by test_chaos.py)




def lobby() -> str:
    return f"room:lobby:{uuid.uuid4().hex}"


def pos(text: str) -> Position:
    return Position.parse(text)


async def history(http: aiohttp.ClientSession, server: ServerProcess, topic: str,
                  key: str | None = PUBLISH_KEY, **query: Any) -> tuple[int, Any]:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    async with http.get(f"{server.http_url}/api/history/{topic}", params={k: str(v) for k, v in query.items()},
                        headers=headers, timeout=bounded()) as response:
        return response.status, await response.json()


async def latest_position(http: aiohttp.ClientSession, server: ServerProcess, topic: str) -> str:
    status, body = await history(http, server, topic, limit=1)
    assert status == 200, body
    return body["position"]


class Phx(PhoenixSocket):
    """A Phoenix client that knows history: joins with positions, replies in order, broadcasts by position."""

    async def join(self, topic: str, payload: dict[str, Any] | None = None, timeout: float = 10.0) -> Frame:
        """Send a join; returns its reply (a join waits for the broker's subscription and the history read)."""
        ref = self.ref()
        await self.send(ref, ref, topic, "phx_join", {} if payload is None else payload)
        reply = await self.next(timeout)
        if self.v1:
            assert (reply["topic"], reply["event"], reply["ref"]) == (topic, "phx_reply", ref), reply
        else:
            assert reply[:4] == [ref, ref, topic, "phx_reply"], reply
        return reply

    async def join_ok(self, topic: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        """Join; the ok reply's response."""
        reply = await self.join(topic, payload)
        body = reply["payload"] if self.v1 else reply[4]
        assert body["status"] == "ok", reply
        return body["response"]

    async def heartbeat_is_next(self) -> None:
        """Nothing else is queued: the reply to a heartbeat sent now is the very next frame."""
        ref = self.ref()
        await self.send(None, ref, "phoenix", "heartbeat", {})
        reply = await self.next()
        if self.v1:
            assert reply == {"topic": "phoenix", "event": "phx_reply", "payload": {"status": "ok", "response": {}},
                             "ref": ref}, reply
        else:
            assert reply == [None, ref, "phoenix", "phx_reply", {"status": "ok", "response": {}}], reply

    async def broadcasts(self, count: int, timeout: float = TIMEOUT) -> list[Frame]:
        """The next `count` frames, which must all be broadcasts (v2: [null, position, topic, event, payload])."""
        frames = [await self.next(timeout) for _ in range(count)]
        for frame in frames:
            assert frame[0] is None and frame[3] != "phx_reply", frames
        return frames

    async def messages_until(self, topic: str, position: str, timeout: float = 10.0) -> list[str]:
        """Read broadcasts until the one at `position`; returns every broadcast position read on `topic`."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            frame = await self.next(max(0.01, deadline - time.monotonic()))
            if frame[2] == topic and frame[3] == "new_msg":
                seen.append(frame[1])
                if frame[1] == position:
                    return seen


def connect(http: aiohttp.ClientSession, server: ServerProcess, vsn: str = "2.0.0",
            sub: str = "u1") -> AbstractAsyncContextManager[Phx]:
    return open_socket(Phx, http, server, vsn, sub)


def history_server(start_server: Callable[..., Awaitable[ServerProcess]], size: str = "100",
                   **env: str) -> Awaitable[ServerProcess]:
    return start_server(PUSH_HISTORY_SIZE=size, **env)


# For the tests that each look only at their own topic (and count from what they find): started once.
history_of_3 = shared_server(PUSH_HISTORY_SIZE="3")
history_of_10 = shared_server(PUSH_HISTORY_SIZE="10")
history_of_100 = shared_server(PUSH_HISTORY_SIZE="100")
history_off = shared_server(PUSH_HISTORY_SIZE="0", PUSH_LONGPOLL_WINDOW="1")


# ===================================================================== 1. positions


@pytest.mark.parametrize("text, epoch, seq", [
    ("abc~1", "abc", 1),
    ("x~0", "x", 0),
    ("Az09_-~42", "Az09_-", 42),
    ("e" * 32 + "~1", "e" * 32, 1),                    # the longest epoch
    ("e~" + "9" * 19, "e", 9_999_999_999_999_999_999),  # the longest sequence
    ("123~4", "123", 4),                                 # a digits-only epoch is still an epoch
])
def test_position_parses_and_formats_back(text, epoch, seq):
    position = Position.parse(text)
    assert (position.epoch, position.seq) == (epoch, seq)
    assert str(position) == text
    assert Position.parse(str(position)) == position


@pytest.mark.parametrize("text", [
    pytest.param("abc", id="no-tilde"),
    pytest.param("12345", id="digits-only"),
    pytest.param("", id="empty"),
    pytest.param("~5", id="no-epoch"),
    pytest.param("abc~", id="no-seq"),
    pytest.param("abc~-1", id="negative"),
    pytest.param("abc~+1", id="plus-sign"),
    pytest.param("abc~1.5", id="fraction"),
    pytest.param("abc~1e3", id="exponent"),
    pytest.param("e" * 33 + "~1", id="epoch-too-long"),
    pytest.param("e~" + "1" * 20, id="seq-too-long"),
    pytest.param("ab c~1", id="space-in-epoch"),
    pytest.param("ab.c~1", id="dot-in-epoch"),
    pytest.param("abc~1~2", id="two-tildes"),
    pytest.param(" abc~1", id="leading-space"),
    pytest.param("abc~1\n", id="trailing-newline"),
    pytest.param("\u00e9t\u00e9~1", id="non-ascii-epoch"),
    pytest.param("abc~\u0663", id="non-ascii-digit"),  # ARABIC-INDIC DIGIT THREE
    pytest.param(5, id="integer"),
    pytest.param(None, id="null"),
    pytest.param(["abc~1"], id="list"),
])
def test_position_refuses_what_is_not_one(text):
    with pytest.raises(ValueError, match="<epoch>~<seq>"):
        Position.parse(text)


def test_a_position_never_equals_a_phoenix_js_ref():
    """phoenix.js refs are decimal counters (String(++ref)); a broadcast's ref must never be mistaken for one."""
    positions = [Position("0", 0), Position("1", 1), Position("9" * 32, 10**19 - 1)]
    positions += [Position(new_epoch(), n) for n in range(500)]  # epochs are random url-safe tokens
    for position in positions:
        assert not str(position).isdecimal() and "~" in str(position)
    for ref in ("0", "1", "42", "123456789012345678901234567890"):
        with pytest.raises(ValueError):
            Position.parse(ref)


# ===================================================================== 1. the memory history


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def message(topic: str, n: int, event: str = "new_msg") -> Broadcast:
    return Broadcast.of(topic, event, {"n": n})


def cost(broadcast: Broadcast) -> int:
    return len(broadcast.payload_json) + len(broadcast.topic) + len(broadcast.event) + ENTRY_OVERHEAD


def fill(store: MemoryHistory, topic: str, count: int, start: int = 0) -> list[Broadcast]:
    broadcasts = [message(topic, n) for n in range(start, start + count)]
    for broadcast in broadcasts:
        store.append(broadcast)
    return broadcasts


def ns(recovery: Recovery) -> list[int]:
    return [orjson.loads(b.payload_json)["n"] for b in recovery.messages]


def test_memory_positions_count_from_one_per_topic():
    store = MemoryHistory(100, 300, 1 << 20, clock=Clock())
    a = fill(store, "room:a", 3)
    b = fill(store, "room:b", 2)
    a += fill(store, "room:a", 1, start=3)
    assert [m.position.seq for m in a] == [1, 2, 3, 4]
    assert [m.position.seq for m in b] == [1, 2]
    assert len({m.position.epoch for m in a}) == 1 and len({m.position.epoch for m in b}) == 1
    # Topics first published while no history was lost share the epoch (as NATS positions share the
    # stream's): a position only ever counts within its own topic.
    # A topic nobody published to stands at 0 of its epoch, and that epoch is the one its first broadcast gets.
    empty = store.recover("room:c", None)
    assert (empty.position.seq, empty.recovered, empty.messages) == (0, True, [])
    assert fill(store, "room:c", 1)[0].position == Position(empty.position.epoch, 1)


def test_memory_keeps_at_most_size_broadcasts_per_topic():
    store = MemoryHistory(3, 300, 1 << 20, clock=Clock())
    sent = fill(store, "room:a", 5)
    kept = store.recover("room:a", None)
    assert (kept.position, kept.recovered, ns(kept)) == (sent[-1].position, True, [2, 3, 4])
    assert store.bytes == sum(cost(b) for b in sent[2:])
    # Since 1: 2 was dropped, so what is kept is not all that was missed.
    epoch = sent[0].position.epoch
    gap = store.recover("room:a", Position(epoch, 1))
    assert (gap.recovered, gap.messages) == (False, [])
    assert ns(store.recover("room:a", Position(epoch, 2))) == [2, 3, 4]


def test_memory_broadcasts_expire_after_the_ttl():
    clock = Clock()
    store = MemoryHistory(100, 10, 1 << 20, clock=clock)
    first = fill(store, "room:a", 1)[0]
    clock.now += 5
    second = fill(store, "room:a", 1, start=1)[0]
    epoch = first.position.epoch
    clock.now += 5  # the first is exactly 10 s old: still kept
    assert ns(store.recover("room:a", Position(epoch, 0))) == [0, 1]
    clock.now += 0.5  # now it is older than the TTL
    assert ns(store.recover("room:a", None)) == [1]
    assert store.bytes == cost(second)
    gap = store.recover("room:a", Position(epoch, 0))
    assert (gap.recovered, gap.messages) == (False, [])
    assert ns(store.recover("room:a", Position(epoch, 1))) == [1]
    clock.now += 60  # everything expired: a client that saw the last one still recovers (nothing was missed)
    caught_up = store.recover("room:a", Position(epoch, 2))
    assert (caught_up.position, caught_up.recovered, caught_up.messages) == (Position(epoch, 2), True, [])
    assert store.bytes == 0
    # The counter outlives the broadcasts: positions are never reused.
    assert fill(store, "room:a", 1, start=2)[0].position == Position(epoch, 3)


def test_memory_evicts_least_recently_published_topics_beyond_max_bytes():
    evicted = []
    one = cost(message("room:a", 0))  # every topic name and payload below has the same size
    store = MemoryHistory(100, 300, 2 * one, on_evict=lambda: evicted.append(1), clock=Clock())
    a = fill(store, "room:a", 1)[0]
    fill(store, "room:b", 1)
    assert (store.topic_count, store.bytes, evicted) == (2, 2 * one, [])
    fill(store, "room:c", 1)  # over the limit: room:a, the least recently published, goes
    assert (store.topic_count, store.bytes, len(evicted)) == (2, 2 * one, 1)
    fill(store, "room:b", 1, start=1)  # room:b is now the most recent, so room:c goes next ...
    assert len(evicted) == 2 and store.topic_count == 1
    fill(store, "room:d", 1)
    assert len(evicted) == 3 and store.topic_count == 1  # ... and then room:b, though it holds two
    assert store.recover("room:d", None).recovered and ns(store.recover("room:d", None)) == [0]
    assert store.bytes <= 2 * one
    # room:a starts over in a new epoch: its old position is not recoverable, and nothing is handed out.
    gone = store.recover("room:a", a.position)
    assert (gone.recovered, gone.messages, gone.position.seq) == (False, [], 0)
    assert gone.position.epoch != a.position.epoch
    restarted = fill(store, "room:a", 1)[0]
    assert restarted.position == Position(gone.position.epoch, 1)


def test_memory_recover():
    store = MemoryHistory(100, 300, 1 << 20, clock=Clock())
    sent = fill(store, "room:a", 5)
    epoch, current = sent[0].position.epoch, sent[-1].position

    missed = store.recover("room:a", Position(epoch, 2))
    assert (missed.position, missed.recovered, ns(missed)) == (current, True, [2, 3, 4])
    assert [m.position for m in missed.messages] == [b.position for b in sent[2:]]
    assert ns(store.recover("room:a", Position(epoch, 0))) == [0, 1, 2, 3, 4]

    nothing = store.recover("room:a", current)
    assert (nothing.position, nothing.recovered, nothing.messages) == (current, True, [])

    other_epoch = store.recover("room:a", Position(epoch + "x", 2))
    assert (other_epoch.position, other_epoch.recovered, other_epoch.messages) == (current, False, [])

    ahead = store.recover("room:a", Position(epoch, 6))
    assert (ahead.position, ahead.recovered, ahead.messages) == (current, False, [])

    # limit: the latest without since; with since, more missed than the limit is not a recovery.
    assert (store.recover("room:a", None, 2).recovered, ns(store.recover("room:a", None, 2))) == (True, [3, 4])
    limited = store.recover("room:a", Position(epoch, 1), 2)
    assert (limited.recovered, ns(limited)) == (False, [1, 2])
    exact = store.recover("room:a", Position(epoch, 3), 2)
    assert (exact.recovered, ns(exact)) == (True, [3, 4])


def test_memory_recover_with_a_limit_never_hands_out_messages_after_a_gap():
    """Paging with `since` = the last position read must not skip what is no longer kept."""
    store = MemoryHistory(3, 300, 1 << 20, clock=Clock())
    sent = fill(store, "room:a", 5)  # positions 3, 4, 5 are kept; 2 is not
    epoch = sent[0].position.epoch
    gap = store.recover("room:a", Position(epoch, 1), 2)
    assert (gap.recovered, gap.messages) == (False, [])
    first_page = store.recover("room:a", Position(epoch, 2), 2)
    assert (first_page.recovered, ns(first_page)) == (False, [2, 3])  # more missed than the limit


def test_memory_reading_a_topic_nobody_published_to_keeps_no_record():
    """A join reads history with a name the client chose: that must cost nothing once it is gone."""
    store = MemoryHistory(100, 300, 1 << 20, clock=Clock())
    quiet = [store.recover(f"room:lobby:{n}", None) for n in range(1000)]
    assert store.topic_count == 0 and store.bytes == 0
    assert {(r.position.seq, r.recovered, len(r.messages)) for r in quiet} == {(0, True, 0)}
    # Rejoining with the quiet position: nothing was missed, then what came since.
    since = quiet[0].position
    assert store.recover("room:lobby:0", since).recovered
    sent = fill(store, "room:lobby:0", 2)
    recovered = store.recover("room:lobby:0", since)
    assert (recovered.recovered, ns(recovered), recovered.position) == (True, [0, 1], sent[-1].position)
    assert store.topic_count == 1


def test_memory_keeps_at_most_max_topics_and_an_evicted_topic_is_not_recovered():
    evicted = []
    store = MemoryHistory(100, 300, 1 << 20, on_evict=lambda: evicted.append(1), clock=Clock(), max_topics=3)
    quiet = store.recover("room:quiet", None).position  # seen empty before any eviction
    first = [fill(store, f"room:{n}", 2)[-1] for n in range(3)]
    assert (store.topic_count, evicted) == (3, [])
    fill(store, "room:0", 1, start=2)  # room:0 is now the most recently published: room:1 goes next
    fill(store, "room:3", 1)
    assert (store.topic_count, len(evicted)) == (3, 1)
    gone = store.recover("room:1", first[1].position)
    assert (gone.recovered, gone.messages, gone.position.seq) == (False, [], 0)
    assert store.recover("room:0", first[0].position).recovered
    # A history was lost meanwhile: a topic seen empty before cannot vouch that it missed nothing.
    assert store.recover("room:quiet", quiet).recovered is False
    assert store.recover("room:1", None).recovered  # a fresh join is fine
    # room:1 starts again in an epoch it never had: its old positions stay unrecoverable.
    again = fill(store, "room:1", 3)
    assert again[0].position.epoch != first[1].position.epoch
    assert store.recover("room:1", first[1].position).recovered is False


def test_memory_reclaims_topics_whose_history_expired():
    clock = Clock()
    store = MemoryHistory(100, 10, 1 << 20, clock=clock)
    old = [fill(store, f"room:{n}", 1)[0] for n in range(100)]
    clock.now += 11
    fill(store, "room:new", 1)
    assert store.topic_count == 1 and store.bytes == cost(message("room:new", 0))
    assert store.recover("room:5", old[5].position).recovered is False


# ===================================================================== 1. a live copy after the replay


class _HeldBroker(MemoryBroker):
    """The memory broker, except that history reads answer when the test says (as Redis and NATS do)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.reads: list[asyncio.Future[Recovery]] = []

    def recover(self, topic: str, since: Position | None, limit: int | None = None) -> Awaitable[Recovery]:
        self.reads.append(asyncio.get_running_loop().create_future())
        return self.reads[-1]


async def test_a_live_copy_of_a_replayed_broadcast_is_not_sent_again():
    """With Redis or NATS, the history read can answer before this node hears the newest broadcast live
    (pub/sub and the read travel separately): the replay already sent it, so its live copy is dropped."""
    settings = Settings(history_size=100)
    broker = _HeldBroker(settings)
    node = Node(settings, broker)
    await node.start()
    try:
        conn = RecordingConnection()
        session = node.open_session(Identity("u1", time.time() + 60), conn, "websocket")
        topic = "room:lobby:1"
        session.receive(orjson.dumps(["1", "1", topic, "phx_join", {"since": "e~3"}]).decode())
        assert conn.frames == [] and len(broker.reads) == 1  # the reply waits for the history read

        def live(seq: int) -> Broadcast:
            return Broadcast(topic, "new_msg", orjson.dumps({"n": seq}), None, Position("e", seq))

        broker.reads[0].set_result(Recovery(Position("e", 5), True, [live(4), live(5)]))
        await until(lambda: len(conn.frames) == 3, TIMEOUT, "the reply and the replay")
        assert conn.frames == [["1", "1", topic, "phx_reply", {"status": "ok", "response": {
            "position": "e~5", "recovered": True}}], [None, "e~4", topic, "new_msg", {"n": 4}],
            [None, "e~5", topic, "new_msg", {"n": 5}]]
        node.hub.dispatch(Broadcast(topic, "presence_diff", b"{}"))  # the service's own: no position
        node.hub.dispatch(live(5))  # heard live only now
        node.hub.dispatch(live(6))
        node.hub.dispatch(live(7))
        await until(lambda: len(conn.frames) == 6, TIMEOUT, "the live broadcasts")  # sent at the loop's next turn
        assert [frame[1:4] for frame in conn.frames[3:]] == [
            [None, topic, "presence_diff"], ["e~6", topic, "new_msg"], ["e~7", topic, "new_msg"]]
    finally:
        await node.stop()


# ===================================================================== 2. a real server, memory broker


@pytest.mark.asyncio(loop_scope="module")
async def test_broadcast_ref_is_the_position_and_the_payload_is_unchanged(history_of_100):
    server = history_of_100
    topic = lobby()
    payloads = [{"n": 0}, {"text": "h\u00e9llo \u2603", "nested": {"list": [1, 2.5, None, True]}}, {}]
    async with aiohttp.ClientSession() as http, connect(http, server) as client:
        response = await client.join_ok(topic)
        assert set(response) == {"position"}, response  # no `recovered` without `since`
        joined_at = pos(response["position"])
        assert joined_at.seq == 0 and POSITION.fullmatch(response["position"])
        for payload in payloads:
            await publish(http, server, topic, payload)
        frames = await client.broadcasts(3)
        assert frames == [[None, f"{joined_at.epoch}~{n}", topic, "new_msg", payload]
                          for n, payload in enumerate(payloads, 1)]
        # Another event on the topic takes the next position: positions count broadcasts, not events.
        await publish(http, server, topic, {"typing": True}, event="user:typing")
        assert await client.next() == [None, f"{joined_at.epoch}~4", topic, "user:typing", {"typing": True}]
        # A second client joining now is told where the topic stands.
        async with connect(http, server, sub="u2") as late:
            assert await late.join_ok(topic) == {"position": f"{joined_at.epoch}~4"}


@pytest.mark.asyncio(loop_scope="module")
async def test_join_with_since_replays_exactly_what_was_missed_then_goes_live(history_of_100):
    server = history_of_100
    topic = lobby()
    async with aiohttp.ClientSession() as http:
        async with connect(http, server) as first:
            await first.join_ok(topic)
            for n in range(2):
                await publish(http, server, topic, {"n": n})
            seen = await first.broadcasts(2)
        last_seen = seen[-1][1]
        for n in range(2, 5):  # published while the client was away
            await publish(http, server, topic, {"n": n})
        epoch = pos(last_seen).epoch
        async with connect(http, server) as again:
            reply = await again.join(topic, {"since": last_seen})
            assert reply[4] == {"status": "ok", "response": {"position": f"{epoch}~5", "recovered": True}}
            replay = await again.broadcasts(3)
            assert replay == [[None, f"{epoch}~{n + 1}", topic, "new_msg", {"n": n}] for n in range(2, 5)]
            await again.heartbeat_is_next()  # nothing more was replayed
            await publish(http, server, topic, {"n": 5})
            assert await again.next() == [None, f"{epoch}~6", topic, "new_msg", {"n": 5}]


@pytest.mark.asyncio(loop_scope="module")
async def test_join_with_the_current_position_recovers_nothing(history_of_100):
    server = history_of_100
    topic = lobby()
    async with aiohttp.ClientSession() as http, connect(http, server) as client:
        for n in range(3):
            await publish(http, server, topic, {"n": n})
        current = await latest_position(http, server, topic)
        assert await client.join_ok(topic, {"since": current}) == {"position": current, "recovered": True}
        await client.heartbeat_is_next()
        # since: null is the same as no since
        async with connect(http, server, sub="u2") as other:
            assert await other.join_ok(topic, {"since": None}) == {"position": current}


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("case", ["other-epoch", "ahead", "evicted-by-size"])
async def test_join_with_an_unrecoverable_since_says_so_and_replays_nothing(case, history_of_3):
    server = history_of_3
    topic = lobby()
    async with aiohttp.ClientSession() as http, connect(http, server) as client:
        for n in range(5):
            await publish(http, server, topic, {"n": n})
        current = pos(await latest_position(http, server, topic))
        since = {"other-epoch": Position("another" if current.epoch != "another" else "other", 4),
                 "ahead": Position(current.epoch, 6),
                 "evicted-by-size": Position(current.epoch, 1)}[case]  # 2 is no longer kept (size 3)
        response = await client.join_ok(topic, {"since": str(since)})
        assert response == {"position": str(current), "recovered": False}
        await client.heartbeat_is_next()  # nothing replayed
        await publish(http, server, topic, {"n": 5})  # and live from the current position on
        assert await client.next() == [None, f"{current.epoch}~6", topic, "new_msg", {"n": 5}]


async def test_since_that_expired_is_not_recovered(start_server):
    server = await history_server(start_server, PUSH_HISTORY_TTL="0.3")
    topic = lobby()
    async with aiohttp.ClientSession() as http, connect(http, server) as client:
        await publish(http, server, topic, {"n": 0})
        first = await latest_position(http, server, topic)
        await publish(http, server, topic, {"n": 1})

        async def expired() -> bool:
            status, body = await history(http, server, topic)
            return status == 200 and body["messages"] == []

        await until(expired, TIMEOUT, "history expired")  # the TTL is the thing under test: it must pass
        assert await client.join_ok(topic, {"since": first}) == {
            "position": f"{pos(first).epoch}~2", "recovered": False}
        await client.heartbeat_is_next()


@pytest.mark.parametrize("since", ["abc", "12345", "e~-1", "e~", "e" * 33 + "~1", 5, True, {"epoch": "e", "seq": 1},
                                   ["e~1"], ""])
@pytest.mark.asyncio(loop_scope="module")
async def test_malformed_since_is_refused(since, history_of_100):
    server = history_of_100
    topic = lobby()
    async with aiohttp.ClientSession() as http, connect(http, server) as client:
        refused = await metric(http, server, "push_joins_refused_total", reason="bad_since")
        reply = await client.join(topic, {"since": since})
        assert reply[4] == {"status": "error", "response": {"reason": BAD_SINCE}}, reply
        assert await metric(http, server, "push_joins_refused_total", reason="bad_since") == refused + 1
        await publish(http, server, topic, {"n": 0})  # not joined: nothing arrives
        await client.heartbeat_is_next()
        assert await client.join_ok(topic) == {"position": f"{pos(await latest_position(http, server, topic)).epoch}~1"}


@pytest.mark.asyncio(loop_scope="module")
async def test_heartbeat_and_join_replies_keep_the_clients_own_refs(history_of_100):
    """Positions are never decimal, so they cannot collide with phoenix.js refs: its replies still match."""
    server = history_of_100
    topic = lobby()
    async with aiohttp.ClientSession() as http, connect(http, server) as client:
        await client.send("1", "1", topic, "phx_join", {})
        assert (await client.next())[:4] == ["1", "1", topic, "phx_reply"]
        for n in range(3):
            await publish(http, server, topic, {"n": n})
        refs = [frame[1] for frame in await client.broadcasts(3)]
        assert all(POSITION.fullmatch(ref) and not ref.isdecimal() for ref in refs), refs
        for ref in ("2", "3"):  # heartbeats with decimal refs, as phoenix.js sends them
            await client.send(None, ref, "phoenix", "heartbeat", {})
            assert await client.next() == [None, ref, "phoenix", "phx_reply", {"status": "ok", "response": {}}]
        await client.send("1", "4", topic, "phx_leave", {})
        assert await client.next() == ["1", "4", topic, "phx_reply", {"status": "ok", "response": {}}]


@pytest.mark.asyncio(loop_scope="module")
async def test_v1_frames_carry_the_position_in_ref(history_of_100):
    server = history_of_100
    topic = lobby()
    async with aiohttp.ClientSession() as http:
        async with connect(http, server, vsn="1.0.0") as client:
            response = await client.join_ok(topic)
            epoch = pos(response["position"]).epoch
            await publish(http, server, topic, {"n": 0})
            assert await client.next() == {"topic": topic, "event": "new_msg", "payload": {"n": 0},
                                           "ref": f"{epoch}~1"}
        await publish(http, server, topic, {"n": 1})
        async with connect(http, server, vsn="1.0.0") as again:
            assert await again.join_ok(topic, {"since": f"{epoch}~1"}) == {"position": f"{epoch}~2",
                                                                          "recovered": True}
            assert await again.next() == {"topic": topic, "event": "new_msg", "payload": {"n": 1}, "ref": f"{epoch}~2"}
            await again.heartbeat_is_next()


@pytest.mark.asyncio(loop_scope="module")
async def test_history_off_means_null_refs_and_no_recovery(history_off):
    server = history_off
    topic = lobby()
    async with aiohttp.ClientSession() as http, connect(http, server) as client:
        assert await client.join_ok(topic) == {}  # exactly Phoenix's reply
        await publish(http, server, topic, {"n": 0})
        assert await client.next() == [None, None, topic, "new_msg", {"n": 0}]
        async with connect(http, server, sub="u2") as other:
            assert await other.join_ok(topic, {"since": "abc~1"}) == {"recovered": False}
            await other.heartbeat_is_next()


async def _join_reply(http: aiohttp.ClientSession, server: ServerProcess, transport: str, vsn: str, topic: str,
                      payload: dict[str, Any]) -> Frame:
    """The reply to one join, over a fresh WebSocket or long-poll session, as (status, response)."""
    if vsn == "1.0.0":
        join = orjson.dumps({"topic": topic, "event": "phx_join", "payload": payload, "ref": "1", "join_ref": "1"})
    else:
        join = orjson.dumps(["1", "1", topic, "phx_join", payload])
    if transport == "websocket":
        async with http.ws_connect(f"{server.ws_url}?vsn={vsn}&token={make_token()}") as ws:
            await ws.send_str(join.decode())
            reply = orjson.loads(await ws.receive_str(timeout=TIMEOUT))
    else:
        url, params = f"{server.http_url}/socket/longpoll", [("token", make_token()), ("vsn", vsn)]
        async with http.get(url, params=params, timeout=bounded()) as response:
            params.append(("token", orjson.loads(await response.read())["token"]))
        async with http.post(url, params=params, data=join, timeout=bounded()) as response:
            assert orjson.loads(await response.read()) == {"status": 200}
        async with http.get(url, params=params, timeout=bounded()) as response:
            reply = orjson.loads(orjson.loads(await response.read())["messages"][0])
    body = reply["payload"] if vsn == "1.0.0" else reply[4]
    return body["status"], body["response"]


@pytest.mark.parametrize("transport", ["websocket", "longpoll"])
@pytest.mark.parametrize("vsn", ["1.0.0", "2.0.0"])
@pytest.mark.asyncio(loop_scope="module")
async def test_with_history_off_a_join_with_since_is_told_recovered_false(history_off, transport, vsn):
    """History off: `since` present, whatever it holds (the pattern `() => ({since: lastPos})` sends null,
    as refs are null then). The reply must say recovered: false, never leave it out (the client would not
    refetch) nor refuse the join (phoenix.js would rejoin in a loop)."""
    async with aiohttp.ClientSession(timeout=bounded()) as http:
        for since in (None, "abc~1", "17", 5):
            assert await _join_reply(http, history_off, transport, vsn, lobby(), {"since": since}) == (
                "ok", {"recovered": False}), since
        # No since: Phoenix's reply.
        assert await _join_reply(http, history_off, transport, vsn, lobby(), {}) == ("ok", {})


async def test_history_max_topics_evicts_the_least_recently_published_and_its_clients_refetch(start_server):
    server = await history_server(start_server, PUSH_HISTORY_MAX_TOPICS="2")
    first, second, third = lobby(), lobby(), lobby()
    async with aiohttp.ClientSession() as http:
        await publish(http, server, first, {"n": 0})
        seen = await latest_position(http, server, first)
        await publish(http, server, first, {"n": 1})
        await publish(http, server, second, {"n": 0})
        await publish(http, server, third, {"n": 0})  # over the cap: `first` goes
        assert await metric(http, server, "push_history_evictions_total") == 1
        async with connect(http, server) as client:
            response = await client.join_ok(first, {"since": seen})
            assert response["recovered"] is False and pos(response["position"]).seq == 0
            await client.heartbeat_is_next()  # nothing replayed: a refetch, never a silent gap


async def test_recovery_metrics(start_server):
    server = await history_server(start_server)
    topic = lobby()
    async with aiohttp.ClientSession() as http:
        for n in range(4):
            await publish(http, server, topic, {"n": n})
        epoch = pos(await latest_position(http, server, topic)).epoch
        async with connect(http, server) as client:
            await client.join_ok(topic)  # without since: not a recovery
            await client.join_ok(lobby(), {"since": "other~3"})           # not recovered
            await client.join_ok(topic + "x", {"since": "other~0"})       # not recovered (another epoch)
        async with connect(http, server) as client:
            assert (await client.join_ok(topic, {"since": f"{epoch}~1"}))["recovered"] is True  # 3 replayed
            await client.broadcasts(3)
        async with connect(http, server) as client:
            assert (await client.join_ok(topic, {"since": f"{epoch}~4"}))["recovered"] is True  # 0 replayed
            await client.heartbeat_is_next()
        found = await metrics(http, server)
        assert found[("push_recoveries_total", frozenset({("result", "recovered")}))] == 2
        assert found[("push_recoveries_total", frozenset({("result", "not_recovered")}))] == 2
        assert found[("push_replayed_messages_total", frozenset())] == 3
        assert found[("push_history_evictions_total", frozenset())] == 0


async def test_history_evictions_are_counted(start_server):
    # Each stored broadcast costs ~300 bytes: 1 KB holds about three, so topics evict one another.
    server = await history_server(start_server, PUSH_HISTORY_MAX_BYTES="1000")
    topics = [lobby() for _ in range(4)]
    async with aiohttp.ClientSession() as http:
        first = None
        for topic in topics:
            await publish(http, server, topic, {"n": 0})
            first = first or await latest_position(http, server, topics[0])
        assert await metric(http, server, "push_history_evictions_total") >= 1
        async with connect(http, server) as client:  # the first topic was evicted: a new epoch
            response = await client.join_ok(topics[0], {"since": first})
            assert response["recovered"] is False and pos(response["position"]).epoch != pos(first).epoch


# --- GET /api/history


async def test_history_api(start_server):
    server = await history_server(start_server, size="10")
    topic = lobby()
    async with aiohttp.ClientSession() as http:
        assert await history(http, server, topic) == (200, {
            "topic": topic, "position": (await history(http, server, topic))[1]["position"], "recovered": True,
            "messages": []})
        for n in range(5):
            await publish(http, server, topic, {"n": n}, event="new_msg" if n % 2 == 0 else "edited")
        status, body = await history(http, server, topic)
        epoch = pos(body["position"]).epoch
        every = [{"position": f"{epoch}~{n + 1}", "event": "new_msg" if n % 2 == 0 else "edited",
                  "payload": {"n": n}} for n in range(5)]
        assert (status, body) == (200, {"topic": topic, "position": f"{epoch}~5", "recovered": True,
                                        "messages": every})
        assert (await history(http, server, topic, limit=2))[1]["messages"] == every[3:]        # the latest
        assert (await history(http, server, topic, since=f"{epoch}~2"))[1] == {
            "topic": topic, "position": f"{epoch}~5", "recovered": True, "messages": every[2:]}
        assert (await history(http, server, topic, since=f"{epoch}~5"))[1]["messages"] == []
        # More missed than the limit: not a recovery, and the first `limit` of them.
        status, limited = await history(http, server, topic, since=f"{epoch}~1", limit=2)
        assert (status, limited["recovered"], limited["messages"]) == (200, False, every[1:3])
        status, other = await history(http, server, topic, since="otherepoch~2")
        assert (status, other["recovered"], other["messages"]) == (200, False, [])
        # Paging: since the last position of the first page gives the next.
        status, page = await history(http, server, topic, since=limited["messages"][-1]["position"], limit=2)
        assert (status, page["recovered"], page["messages"]) == (200, True, every[3:])
        for limit in (1, 10):
            assert (await history(http, server, topic, limit=limit))[0] == 200


@pytest.mark.parametrize("broker", ["memory", "redis", "nats"])
async def test_history_api_pages_never_skip_a_gap(broker, start_server):
    """`since` + `limit` pages through what was missed; when the oldest of it is no longer kept,
    the answer is recovered: false with no messages, not the kept ones after the gap."""
    url = {"memory": lambda: "memory", "redis": require_redis, "nats": require_nats}[broker]()
    # The first two published are no longer kept. (The shared JetStream stream keeps 100 per topic.)
    size, count = (100, 102) if broker == "nats" else (4, 6)
    server = await history_server(start_server, str(size), PUSH_BROKER=url)
    topic = lobby()
    async with aiohttp.ClientSession() as http:
        positions = []
        for n in range(count):
            await publish(http, server, topic, {"n": n})
            if n < 3:
                positions.append(await latest_position(http, server, topic))
        dropped, kept = positions[0], positions[2]
        status, body = await history(http, server, topic, since=dropped, limit=2)
        assert (status, body["recovered"], body["messages"]) == (200, False, []), body
        status, body = await history(http, server, topic, since=kept, limit=2)
        assert (status, body["recovered"]) == (200, False)  # more than 2 were missed: the first 2
        assert [m["payload"] for m in body["messages"]] == [{"n": 3}, {"n": 4}]


@pytest.mark.parametrize("query, error", [
    ({"limit": 0}, "limit must be a whole number from 1 to 10"),
    ({"limit": 11}, "limit must be a whole number from 1 to 10"),
    ({"limit": -1}, "limit must be a whole number from 1 to 10"),
    ({"limit": "1.5"}, "limit must be a whole number from 1 to 10"),
    ({"limit": "ten"}, "limit must be a whole number from 1 to 10"),
    ({"limit": ""}, "limit must be a whole number from 1 to 10"),
    ({"since": "abc"}, "since: a position looks like <epoch>~<seq>"),
    ({"since": "e~-1"}, "since: a position looks like <epoch>~<seq>"),
    ({"since": ""}, "since: a position looks like <epoch>~<seq>"),
])
@pytest.mark.asyncio(loop_scope="module")
async def test_history_api_refuses_bad_queries(query, error, history_of_10):
    async with aiohttp.ClientSession() as http:
        status, body = await history(http, history_of_10, lobby(), **query)
        assert status == 400 and body["error"].startswith(error), body


@pytest.mark.asyncio(loop_scope="module")
async def test_history_api_refusals(history_of_100, history_off):
    server, off = history_of_100, history_off
    topic = lobby()
    async with aiohttp.ClientSession() as http:
        assert await history(http, server, topic, key=None) == (
            401, {"error": "missing publish key (Authorization: Bearer <key>)"})
        assert await history(http, server, topic, key="wrong") == (401, {"error": "invalid publish key"})
        status, body = await history(http, server, "nofamily:1")
        assert status == 400 and body["error"].startswith("unknown topic family"), body
        status, body = await history(http, server, "room:lobby:" + "x" * 300)  # over 255 bytes: no such topic
        assert status == 400 and body["error"].startswith("unknown topic family"), body
        assert await history(http, off, topic) == (400, {"error": "history is off (PUSH_HISTORY_SIZE=0)"})


# ===================================================================== 3. joining with since while publishes go on

RACE_CLIENTS = 4   # recovering clients, each on its own sockets
RACE_CYCLES = 8    # disconnect / rejoin-with-since rounds per client
RACE_PACE = 0.002  # seconds between two publishes (a few hundred a second, with the request itself)


async def start_race_nodes(start_server: Callable[..., Awaitable[ServerProcess]], broker: str) -> list[ServerProcess]:
    if broker == "memory":
        return [await history_server(start_server, size="1000")]
    if broker == "redis":
        url = require_redis()
        return list(await asyncio.gather(*(history_server(start_server, size="1000", PUSH_BROKER=url)
                                           for _ in range(2))))
    url = require_nats()
    # The JetStream stream is shared by every node (and test) on this NATS: keep its settings the default ones.
    return list(await asyncio.gather(*(history_server(start_server, PUSH_BROKER=url) for _ in range(2))))


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["memory", "redis", "nats"])
async def test_rejoining_with_since_during_publishes_has_no_gap_and_no_duplicate(broker, start_server):
    """Clients drop their socket at random points of a continuous stream of publishes and rejoin with the
    last position they read, on another node when there are several; what each one reads, across every
    replay and live part, is every position after its first join, once, in order. A socket that stays
    joined on every node keeps the topic subscribed there (so rejoins recover while live broadcasts
    arrive); the first one's reading, itself checked complete, is what every client must have read."""
    nodes = await start_race_nodes(start_server, broker)
    cycles = RACE_CYCLES if broker != "nats" else 4
    topic = lobby()
    rng = random.Random()
    published = 0
    stop = asyncio.Event()

    async with aiohttp.ClientSession() as http, AsyncExitStack() as stack:
        anchors = [await stack.enter_async_context(connect(http, node, sub=f"anchor{n}"))
                   for n, node in enumerate(nodes)]
        for anchor in anchors:
            await anchor.join_ok(topic)

        async def publisher() -> None:
            nonlocal published
            while not stop.is_set():  # until every client is done (bounded by the wait_for below)
                await publish(http, rng.choice(nodes), topic, {"n": published})
                published += 1
                await asyncio.sleep(RACE_PACE)

        async def client(index: int) -> tuple[str, list[str], int]:
            seen: list[str] = []
            async with connect(http, nodes[index % len(nodes)], sub=f"c{index}") as first:
                start = (await first.join_ok(topic))["position"]
                seen += [frame[1] for frame in await first.broadcasts(rng.randint(0, 3))]
            recovered = 0
            for cycle in range(cycles):
                wanted = published + rng.randint(0, 3)
                await until(lambda: published >= wanted, TIMEOUT, "publishes while away")
                async with connect(http, nodes[(index + cycle + 1) % len(nodes)], sub=f"c{index}") as again:
                    response = await again.join_ok(topic, {"since": seen[-1] if seen else start})
                    assert response["recovered"] is True, response
                    recovered += 1
                    seen += [frame[1] for frame in await again.broadcasts(rng.randint(1, 4))]
                # ... and the socket closes while more broadcasts are on their way.
            return start, seen, recovered

        publishing = asyncio.create_task(publisher())
        # Clients join once the topic has a broadcast: a NATS position of `~0` (joined before anything was
        # kept) cannot be proven complete later (test_nats_rejoin_of_a_topic_that_was_empty_is_answered).
        await until(lambda: published >= 1, TIMEOUT, "the first publish")
        try:
            results = await asyncio.wait_for(asyncio.gather(*(client(n) for n in range(RACE_CLIENTS))), 60)
        finally:
            stop.set()
            await publishing
        final = await latest_position(http, nodes[0], topic)

        # The anchors read everything live: every n, once, in order (consecutive positions but on NATS).
        every = await anchors[0].messages_until(topic, final)
        frames = [frame for frame in anchors[0].frames if frame[3] == "new_msg"]
        assert [frame[4] for frame in frames] == [{"n": n} for n in range(published)]
        seqs = [pos(position).seq for position in every]
        if broker != "nats":
            assert seqs == list(range(1, published + 1))
        assert seqs == sorted(set(seqs))
        for anchor in anchors[1:]:
            assert await anchor.messages_until(topic, final) == every

        for n, (start, seen, recovered) in enumerate(results):
            # Catch up one last time, from yet another node.
            async with connect(http, nodes[n % len(nodes)], sub=f"c{n}") as last:
                since = seen[-1] if seen else start
                response = await last.join_ok(topic, {"since": since})
                assert response == {"position": final, "recovered": True}, response
                if since != final:
                    seen += await last.messages_until(topic, final)
                await last.heartbeat_is_next()
            expected = [position for position in every if pos(position).seq > pos(start).seq]
            assert seen == expected, (f"client {n}: duplicated {sorted(p for p in set(seen) if seen.count(p) > 1)}, "
                                      f"missing {sorted(set(expected) - set(seen))}, read {seen}")
            assert recovered == cycles


# ===================================================================== 4. Redis: recovery from another node


async def two_nodes(start_server: Callable[..., Awaitable[ServerProcess]], url: str, size: str = "100",
                    **env: str) -> list[ServerProcess]:
    return list(await asyncio.gather(*(history_server(start_server, size, PUSH_BROKER=url, **env) for _ in range(2))))


@pytest.mark.slow
async def test_redis_positions_are_shared_by_every_node(start_server):
    a, b = await two_nodes(start_server, require_redis())
    topic = lobby()
    async with aiohttp.ClientSession() as http, connect(http, a) as on_a, connect(http, b) as on_b:
        start_a, start_b = (await on_a.join_ok(topic))["position"], (await on_b.join_ok(topic))["position"]
        assert start_a == start_b and pos(start_a).seq == 0  # the epoch is the topic's, in Redis
        for n in range(6):
            await publish(http, (a, b)[n % 2], topic, {"n": n})
        expected = [[None, f"{pos(start_a).epoch}~{n + 1}", topic, "new_msg", {"n": n}] for n in range(6)]
        assert await on_a.broadcasts(6) == expected
        assert await on_b.broadcasts(6) == expected
        assert (await history(http, a, topic))[1] == (await history(http, b, topic))[1]


async def test_redis_client_recovers_on_another_node(start_server):
    a, b = await two_nodes(start_server, require_redis())
    topic = lobby()
    async with aiohttp.ClientSession() as http:
        async with connect(http, a) as client:
            await client.join_ok(topic)
            for n in range(2):
                await publish(http, a, topic, {"n": n})
            last_seen = (await client.broadcasts(2))[-1][1]
        for n in range(2, 5):  # published on both nodes while the client was away
            await publish(http, (a, b)[n % 2], topic, {"n": n})
        epoch = pos(last_seen).epoch
        async with connect(http, b) as again:
            assert await again.join_ok(topic, {"since": last_seen}) == {"position": f"{epoch}~5", "recovered": True}
            assert await again.broadcasts(3) == [[None, f"{epoch}~{n + 1}", topic, "new_msg", {"n": n}]
                                                 for n in range(2, 5)]
            await again.heartbeat_is_next()
            await publish(http, a, topic, {"n": 5})  # live through Redis from the other node
            assert await again.next() == [None, f"{epoch}~6", topic, "new_msg", {"n": 5}]
        assert await metric(http, b, "push_recoveries_total", result="recovered") == 1
        assert await metric(http, b, "push_replayed_messages_total") == 3


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("case", ["other-epoch", "ahead", "trimmed", "expired"])
async def test_redis_unrecoverable_since(case, module_servers):
    a, b = await module_servers(2, PUSH_BROKER=require_redis(), PUSH_HISTORY_SIZE="3",
                                PUSH_HISTORY_TTL="0.5" if case == "expired" else "300")
    topic = lobby()
    async with aiohttp.ClientSession() as http:
        for n in range(5):
            await publish(http, a, topic, {"n": n})
        current = pos(await latest_position(http, a, topic))
        since = {"other-epoch": Position(current.epoch + "x", 3), "ahead": Position(current.epoch, 9),
                 "trimmed": Position(current.epoch, 1), "expired": Position(current.epoch, 4)}[case]
        if case == "expired":
            async def expired() -> bool:
                return (await history(http, b, topic))[1]["messages"] == []

            await until(expired, TIMEOUT, "history expired")
        async with connect(http, b) as client:
            assert await client.join_ok(topic, {"since": str(since)}) == {"position": str(current), "recovered": False}
            await client.heartbeat_is_next()
        status, body = await history(http, b, topic, since=str(since))
        assert (status, body["recovered"], body["messages"]) == (200, False, [])


# ===================================================================== 4. NATS: stream sequences as positions


@pytest.mark.slow
async def test_nats_positions_are_stream_sequences(start_server):
    a, b = await two_nodes(start_server, require_nats())
    topic, other = lobby(), lobby()
    async with aiohttp.ClientSession() as http, connect(http, a) as client:
        await client.join_ok(topic)
        for n in range(3):
            await publish(http, (a, b)[n % 2], topic, {"n": n})
            await publish(http, b, other, {"n": n})  # the other topic's take stream sequences in between
        frames = await client.broadcasts(3)
        assert [frame[4] for frame in frames] == [{"n": n} for n in range(3)]
        positions = [pos(frame[1]) for frame in frames]
        assert len({p.epoch for p in positions}) == 1
        seqs = [p.seq for p in positions]
        assert all(later - earlier >= 2 for earlier, later in zip(seqs, seqs[1:])), seqs  # increasing, not consecutive
        other_positions = [m["position"] for m in (await history(http, a, other))[1]["messages"]]
        assert {pos(p).epoch for p in other_positions} == {positions[0].epoch}  # one epoch: the stream's
        assert not {pos(p).seq for p in other_positions} & set(seqs)


async def test_nats_client_recovers_on_another_node(start_server):
    a, b = await two_nodes(start_server, require_nats())
    topic, other = lobby(), lobby()
    async with aiohttp.ClientSession() as http:
        async with connect(http, a) as client:
            await client.join_ok(topic)
            await publish(http, a, topic, {"n": 0})
            last_seen = (await client.broadcasts(1))[-1][1]
        for n in range(1, 4):
            await publish(http, (a, b)[n % 2], topic, {"n": n})
            await publish(http, a, other, {"n": n})
        current = await latest_position(http, b, topic)
        async with connect(http, b) as again:
            assert await again.join_ok(topic, {"since": last_seen}) == {"position": current, "recovered": True}
            replay = await again.broadcasts(3)
            assert [frame[4] for frame in replay] == [{"n": n} for n in range(1, 4)]
            assert replay[-1][1] == current
            assert [pos(frame[1]).seq for frame in replay] == sorted(pos(frame[1]).seq for frame in replay)
            await again.heartbeat_is_next()
            await publish(http, a, topic, {"n": 4})
            live = await again.next()
            assert live[4] == {"n": 4} and pos(live[1]).seq > pos(current).seq


@pytest.mark.slow
async def test_nats_rejoin_of_a_topic_that_was_empty_is_answered(start_server):
    """A client that joined while nothing was kept holds `<epoch>~0`. NATS positions are stream-wide, so
    whether everything published since is still kept cannot always be told: the answer may be an honest
    recovered: false, but it is an answer (with the position), never a history read failure."""
    a, b = await two_nodes(start_server, require_nats())
    topic = lobby()
    async with aiohttp.ClientSession() as http:
        async with connect(http, a) as client:
            start = (await client.join_ok(topic))["position"]
            assert pos(start).seq == 0
        for n in range(2):
            await publish(http, a, topic, {"n": n})
        current = await latest_position(http, a, topic)
        async with connect(http, b) as again:
            response = await again.join_ok(topic, {"since": start})
            assert response in ({"position": current, "recovered": True}, {"position": current, "recovered": False})
            if response["recovered"]:
                assert [frame[4] for frame in await again.broadcasts(2)] == [{"n": 0}, {"n": 1}]
            await again.heartbeat_is_next()
        status, body = await history(http, b, topic, since=start)
        assert status == 200 and body["position"] == current, body
        assert body["recovered"] == response["recovered"]


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("case", ["other-epoch", "ahead", "dropped"])
async def test_nats_unrecoverable_since(case, module_servers):
    a, b = await module_servers(2, PUSH_BROKER=require_nats(), PUSH_HISTORY_SIZE="100")
    topic = lobby()
    async with aiohttp.ClientSession() as http:
        await publish(http, a, topic, {"n": 0})
        first = await latest_position(http, a, topic)
        for n in range(1, 102 if case == "dropped" else 2):  # the stream keeps 100 per topic (PUSH_HISTORY_SIZE)
            await publish(http, a, topic, {"n": n})
        current = pos(await latest_position(http, a, topic))
        since = {"other-epoch": f"{current.epoch}x~{current.seq}", "ahead": f"{current.epoch}~{current.seq + 1000}",
                 "dropped": first}[case]
        async with connect(http, b) as client:
            assert await client.join_ok(topic, {"since": since}) == {"position": str(current), "recovered": False}
            await client.heartbeat_is_next()


# ===================================================================== 5. phoenix.js: the documented pattern


class RecoverClient(NodeScript):
    """tests/js/recover.mjs under Node: every line it printed so far is in `events`."""

    async def command(self, command: str) -> None:
        await self.send_line(command.encode())
        await self.wait_event("done", command=command)

    async def message(self, n: int, timeout: float = TIMEOUT) -> Event:
        return await self.wait_event("message", timeout, payload={"n": n})

    def messages(self) -> list[tuple[int, str]]:
        return [(e["payload"]["n"], e["ref"]) for e in self.events if e["event"] == "message"]

    def joins(self) -> list[Event]:
        return [e for e in self.events if e["event"] == "join"]


@pytest.fixture
def recover_client() -> Callable[..., Any]:
    """Factory: `async with recover_client([server, ...], topic) as client:` (phoenix 1.8 by default)."""
    node_binary()

    @asynccontextmanager
    async def start(servers: list[ServerProcess], topic: str, version: str = "18",
                    retry_ms: int = 100) -> AsyncIterator[RecoverClient]:
        args = [version, "--token", make_token("js"), "--topic", topic, "--retry-ms", str(retry_ms)]
        for server in servers:
            args += ["--url", f"ws://127.0.0.1:{server.port}/socket"]
        async with run_script(RECOVER_JS, *args, kind=RecoverClient) as client:
            yield client

    return start


def assert_exactly_once_in_order(client: RecoverClient, count: int) -> None:
    got = client.messages()
    assert [n for n, _ in got] == list(range(count)), got
    refs = [pos(ref) for _, ref in got]
    assert len(set(refs)) == len(refs)


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("version", ["16", "17", "18"])
async def test_phoenix_js_rejoins_with_since_and_gets_what_it_missed(version, history_of_100, recover_client):
    server = history_of_100
    topic = lobby()
    async with aiohttp.ClientSession() as http, recover_client([server], topic, version) as client:
        first = await client.wait_event("join", status="ok")
        assert first["since"] is None and set(first["response"]) == {"position"}
        epoch = pos(first["response"]["position"]).epoch
        for n in range(2):
            await publish(http, server, topic, {"n": n})
        assert (await client.message(1))["ref"] == f"{epoch}~2"

        await client.command("disconnect")
        for n in range(2, 5):  # while the client is away
            await publish(http, server, topic, {"n": n})
        await client.command("connect")
        rejoin = await client.wait_event("join", status="ok")
        # phoenix.js evaluated the params function again: the rejoin asked for what came after ~2.
        assert rejoin["since"] == f"{epoch}~2"
        assert rejoin["response"] == {"position": f"{epoch}~5", "recovered": True}
        await client.message(4)
        await publish(http, server, topic, {"n": 5})  # live again
        assert (await client.message(5))["ref"] == f"{epoch}~6"
        assert_exactly_once_in_order(client, 6)
        assert client.messages() == [(n, f"{epoch}~{n + 1}") for n in range(6)]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["cut", "close"])
async def test_phoenix_js_reconnects_after_a_dropped_connection_and_recovers(how, start_server, recover_client):
    server = await history_server(start_server)
    topic = lobby()
    async with aiohttp.ClientSession() as http, recover_client([server], topic, retry_ms=400) as client:
        await client.wait_event("join", status="ok")
        await publish(http, server, topic, {"n": 0})
        await client.message(0)
        await client.command(how)  # phoenix.js reconnects by itself after 400 ms
        await client.wait_event("close")
        for n in range(1, 4):
            await publish(http, server, topic, {"n": n})
        rejoin = await client.wait_event("join", status="ok")
        assert rejoin["response"]["recovered"] is True
        assert pos(rejoin["response"]["position"]).seq > pos(rejoin["since"]).seq  # something was replayed
        await client.message(3)
        await publish(http, server, topic, {"n": 4})
        await client.message(4)
        assert_exactly_once_in_order(client, 5)
        assert await metric(http, server, "push_replayed_messages_total") >= 1


@pytest.mark.slow
async def test_phoenix_js_after_a_memory_broker_restart_is_told_history_was_lost(start_server, recover_client):
    servers = [await history_server(start_server, PUSH_DRAIN_SECONDS="0.2")]
    topic = lobby()
    async with aiohttp.ClientSession() as http, recover_client(servers, topic) as client:
        joined = await client.wait_event("join", status="ok")
        old_epoch = pos(joined["response"]["position"]).epoch
        await publish(http, servers[0], topic, {"n": 0})
        await client.message(0)

        await servers[0].stop()
        assert (await client.wait_event("close"))["code"] == 1012
        restarted = await history_server(start_server, port=servers[0].port)
        rejoin = await client.wait_event("join", status="ok", timeout=10.0)
        assert rejoin["since"] == f"{old_epoch}~1"
        new = pos(rejoin["response"]["position"])
        assert rejoin["response"] == {"position": str(new), "recovered": False} and new.epoch != old_epoch
        await publish(http, restarted, topic, {"n": 1})
        assert (await client.message(1))["ref"] == f"{new.epoch}~1"
        # The client took the new position: a later rejoin recovers within the new epoch.
        await client.command("disconnect")
        await publish(http, restarted, topic, {"n": 2})
        await client.command("connect")
        again = await client.wait_event("join", status="ok")
        assert (again["since"], again["response"]) == (f"{new.epoch}~1", {"position": f"{new.epoch}~2",
                                                                           "recovered": True})
        await client.message(2)
        assert_exactly_once_in_order(client, 3)


@pytest.mark.slow
async def test_phoenix_js_recovers_on_another_redis_node(start_server, recover_client):
    a, b = await two_nodes(start_server, require_redis(), PUSH_DRAIN_SECONDS="0.2")
    topic = lobby()
    async with aiohttp.ClientSession() as http, recover_client([a, b], topic) as client:  # A first, then B
        assert f":{a.port}/" in (await client.wait_event("open"))["url"]
        await client.wait_event("join", status="ok")
        await publish(http, a, topic, {"n": 0})
        await client.message(0)
        await client.command("disconnect")
        await a.stop()  # node A is gone; what is published meanwhile goes through B
        for n in range(1, 4):
            await publish(http, b, topic, {"n": n})
        await client.command("connect")
        assert f":{b.port}/" in (await client.wait_event("open"))["url"]
        rejoin = await client.wait_event("join", status="ok")
        epoch = pos(rejoin["since"]).epoch
        assert rejoin["response"] == {"position": f"{epoch}~4", "recovered": True}
        await client.message(3)
        await publish(http, b, topic, {"n": 4})
        await client.message(4)
        assert client.messages() == [(n, f"{epoch}~{n + 1}") for n in range(5)]


@pytest.mark.slow
async def test_redis_joins_of_quiet_topics_leave_nothing_behind_past_the_history_ttl(start_server):
    """A join records its topic's epoch in Redis (so a later first publish keeps the position the joiner
    was given), but for a topic nobody publishes to that record lives PUSH_HISTORY_TTL, not a day: a
    client joining many made-up names leaves nothing behind for long."""
    import redis.asyncio as aioredis

    url = require_redis()
    server = await history_server(start_server, PUSH_BROKER=url, PUSH_HISTORY_TTL="2",
                                  PUSH_MAX_TOPICS_PER_CONNECTION="300")
    quiet = [lobby() for _ in range(200)]
    published = lobby()
    client = aioredis.from_url(url)
    try:
        async with aiohttp.ClientSession() as http, connect(http, server) as phx:
            for topic in quiet:
                await phx.join_ok(topic)
            joined_at = (await phx.join_ok(published))["position"]
            await publish(http, server, published, {"n": 1})
            assert (await phx.broadcasts(1))[0][1] == f"{pos(joined_at).epoch}~1"  # the joiner's epoch is kept
        ttls = [await client.pttl(f"push:{{{topic}}}:meta") for topic in quiet]
        assert all(0 < ttl <= 2000 for ttl in ttls), f"quiet topics' records outlive PUSH_HISTORY_TTL: {ttls[:5]}"
        assert await client.ttl(f"push:{{{published}}}:meta") > 3600  # a published topic keeps its numbering

        async def quiet_left() -> bool:
            return not any([await client.exists(f"push:{{{topic}}}:meta") for topic in quiet])

        await until(quiet_left, 10, "quiet topics' records gone")
    finally:
        await client.aclose()
