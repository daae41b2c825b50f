"""Presence: the tracker, diff batching and typing budget as units, then the wire against a real server.

The unit half needs no server. Its key check is the claim in DiffBatcher's docstring: a phoenix.js
client that took its presence_state at any point of a batching window and then applies the merged
diffs (joins first, then leaves, merged by phx_ref as Presence.syncDiff does) ends up with exactly
the tracker's view. The server half checks frames byte-for-byte as JSON values, as
tests/test_websocket.py does; where the absence of a frame matters, a later event that must come
after it (a heartbeat reply, or another socket's join diff) is waited for instead of sleeping.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest

from conftest import PUBLISH_KEY, make_token
from push_service.auth import Identity
from push_service.config import Settings
from push_service.messages import Broadcast
from push_service.metrics import Metrics
from push_service.presence import Diff, DiffBatcher, MemoryTracker, Presence, new_phx_ref
from push_service.presence.diffs import MAX_WAITS
from push_service.presence.base import state_payload
from push_service.presence.service import TYPING_BURST, TYPING_RATE, TypingBudget
from http_helpers import metric, wait_for_metric
from test_websocket import OK, RECEIVE_TIMEOUT, connect
from test_websocket import assert_nothing_pending as nothing_pending

TOPIC = "room:topic:7"
PHX_REF = re.compile(r"^[A-Za-z0-9_-]{16}$")
FLUSH_TIMEOUT = 2.0


# ===================================================================== units: MemoryTracker


class Recorder:
    """An on_diff callback that keeps every (topic, diff) it is given."""

    def __init__(self) -> None:
        self.diffs: list[tuple[str, Diff]] = []

    def __call__(self, topic: str, diff: Diff) -> None:
        self.diffs.append((topic, diff))

    def take(self) -> list[tuple[str, Diff]]:
        diffs, self.diffs = self.diffs, []
        return diffs


def make_tracker() -> tuple[MemoryTracker, Recorder]:
    recorder = Recorder()
    return MemoryTracker("node-a", recorder), recorder


def test_track_returns_meta_with_fresh_ref_and_reports_a_join():
    tracker, recorder = make_tracker()
    given = {"name": "Ann"}
    meta = tracker.track(TOPIC, "c1", "u1", given)
    assert meta == {"name": "Ann", "phx_ref": meta["phx_ref"]}
    assert PHX_REF.match(meta["phx_ref"])
    assert given == {"name": "Ann"}  # the caller's dict is not modified
    [(topic, diff)] = recorder.take()
    assert topic == TOPIC
    assert diff.joins == {"u1": [meta]} and diff.leaves == {}
    assert diff.payload() == {"joins": {"u1": {"metas": [meta]}}, "leaves": {}}
    assert tracker.list(TOPIC) == {"u1": [meta]}
    assert tracker.size == 1


def test_update_joins_new_meta_and_leaves_old():
    tracker, recorder = make_tracker()
    old = tracker.track(TOPIC, "c1", "u1", {"name": "Ann", "online_at": "1"})
    recorder.take()
    new = tracker.update(TOPIC, "c1", {"typing": True, "name": "Anne"})
    assert new is not None
    assert new == {"name": "Anne", "online_at": "1", "typing": True, "phx_ref": new["phx_ref"],
                   "phx_ref_prev": old["phx_ref"]}
    assert new["phx_ref"] != old["phx_ref"] and PHX_REF.match(new["phx_ref"])
    [(topic, diff)] = recorder.take()
    assert topic == TOPIC
    assert diff.joins == {"u1": [new]}
    assert diff.leaves == {"u1": [old]}
    assert "phx_ref_prev" not in old  # the left meta is the old one, untouched
    assert tracker.list(TOPIC) == {"u1": [new]}
    assert tracker.size == 1
    # A second update chains from the first.
    newer = tracker.update(TOPIC, "c1", {"typing": False})
    assert newer is not None and newer["phx_ref_prev"] == new["phx_ref"] and newer["typing"] is False
    [(_, diff)] = recorder.take()
    assert diff.joins == {"u1": [newer]} and diff.leaves == {"u1": [new]}


def test_untrack_reports_a_leave():
    tracker, recorder = make_tracker()
    meta = tracker.track(TOPIC, "c1", "u1", {})
    recorder.take()
    tracker.untrack(TOPIC, "c1")
    [(topic, diff)] = recorder.take()
    assert topic == TOPIC and diff.joins == {} and diff.leaves == {"u1": [meta]}
    assert tracker.list(TOPIC) == {}
    assert tracker.size == 0


def test_untrack_unknown_is_a_noop_without_diff():
    tracker, recorder = make_tracker()
    tracker.untrack(TOPIC, "nobody")
    tracker.track(TOPIC, "c1", "u1", {})
    recorder.take()
    tracker.untrack(TOPIC, "nobody")
    tracker.untrack("room:topic:other", "c1")
    assert recorder.take() == []
    assert tracker.size == 1
    tracker.untrack(TOPIC, "c1")
    recorder.take()
    tracker.untrack(TOPIC, "c1")  # twice
    assert recorder.take() == []
    assert tracker.size == 0


def test_update_unknown_returns_none_without_diff():
    tracker, recorder = make_tracker()
    assert tracker.update(TOPIC, "nobody", {"typing": True}) is None
    tracker.track(TOPIC, "c1", "u1", {})
    recorder.take()
    assert tracker.update(TOPIC, "c2", {"typing": True}) is None
    assert tracker.update("room:topic:other", "c1", {"typing": True}) is None
    assert recorder.take() == []
    assert tracker.size == 1


def test_track_again_replaces_the_connections_entry():
    tracker, recorder = make_tracker()
    first = tracker.track(TOPIC, "c1", "u1", {"n": 1})
    recorder.take()
    second = tracker.track(TOPIC, "c1", "u1", {"n": 2})
    assert second["phx_ref"] != first["phx_ref"] and "phx_ref_prev" not in second
    [(_, leave), (_, join)] = recorder.take()
    assert leave.leaves == {"u1": [first]} and leave.joins == {}
    assert join.joins == {"u1": [second]} and join.leaves == {}
    assert tracker.list(TOPIC) == {"u1": [second]}
    assert tracker.size == 1


def test_several_connections_under_one_key():
    tracker, recorder = make_tracker()
    a = tracker.track(TOPIC, "c1", "u1", {"device": "phone"})
    b = tracker.track(TOPIC, "c2", "u1", {"device": "laptop"})
    c = tracker.track(TOPIC, "c3", "u2", {})
    assert tracker.list(TOPIC) == {"u1": [a, b], "u2": [c]}
    assert tracker.size == 3
    recorder.take()
    b2 = tracker.update(TOPIC, "c2", {"typing": True})
    assert b2 is not None
    # Updating one connection keeps the other's meta and the list order.
    assert tracker.list(TOPIC) == {"u1": [a, b2], "u2": [c]}
    tracker.untrack(TOPIC, "c1")
    assert tracker.list(TOPIC) == {"u1": [b2], "u2": [c]}
    [(_, update), (_, leave)] = recorder.take()
    assert update.joins == {"u1": [b2]} and update.leaves == {"u1": [b]}
    assert leave.leaves == {"u1": [a]} and leave.joins == {}
    tracker.untrack(TOPIC, "c2")
    assert tracker.list(TOPIC) == {"u2": [c]}  # a key with no connection left is gone
    assert tracker.size == 1


def test_topics_are_separate_and_size_counts_connections_times_topics():
    tracker, recorder = make_tracker()
    tracker.track("room:topic:1", "c1", "u1", {})
    tracker.track("room:topic:2", "c1", "u1", {})
    tracker.track("room:topic:2", "c2", "u2", {})
    assert tracker.size == 3
    assert list(tracker.list("room:topic:1")) == ["u1"]
    assert list(tracker.list("room:topic:2")) == ["u1", "u2"]
    assert tracker.list("room:topic:3") == {}
    assert [topic for topic, _ in recorder.take()] == ["room:topic:1", "room:topic:2", "room:topic:2"]
    tracker.untrack("room:topic:2", "c1")
    assert list(tracker.list("room:topic:1")) == ["u1"]
    assert tracker.size == 2
    tracker.update("room:topic:1", "c1", {"x": 1})
    assert tracker.size == 2  # an update is not a new entry
    tracker.untrack("room:topic:1", "c1")
    tracker.untrack("room:topic:2", "c2")
    assert tracker.size == 0
    assert tracker._topics == {}  # no empty topic left behind


def test_phx_ref_format_and_uniqueness():
    refs = [new_phx_ref() for _ in range(20_000)]
    assert all(PHX_REF.match(ref) for ref in refs)
    assert len(set(refs)) == len(refs)
    tracker, _ = make_tracker()
    tracked = {tracker.track(TOPIC, f"c{index}", "u1", {})["phx_ref"] for index in range(1000)}
    assert len(tracked) == 1000


def test_state_payload_shape():
    metas = {"u1": [{"phx_ref": "a"}], "u2": [{"phx_ref": "b"}, {"phx_ref": "c"}]}
    assert state_payload(metas) == {"u1": {"metas": [{"phx_ref": "a"}]},
                                    "u2": {"metas": [{"phx_ref": "b"}, {"phx_ref": "c"}]}}
    assert state_payload({}) == {}


# ===================================================================== units: Diff and DiffBatcher


def diff_of(joins: dict[str, list] | None = None, leaves: dict[str, list] | None = None) -> Diff:
    diff = Diff()
    for key, metas in (joins or {}).items():
        for meta in metas:
            diff.add_join(key, meta)
    for key, metas in (leaves or {}).items():
        for meta in metas:
            diff.add_leave(key, meta)
    return diff


def test_diff_merge_keeps_every_join_and_leave():
    a, b, c, d = ({"phx_ref": ref} for ref in "abcd")
    merged = diff_of({"u1": [a]})
    merged.merge(diff_of({"u1": [b], "u2": [c]}, {"u1": [a]}))
    merged.merge(diff_of({}, {"u2": [c], "u3": [d]}))
    merged.merge(Diff())
    assert merged.joins == {"u1": [a, b], "u2": [c]}
    assert merged.leaves == {"u1": [a], "u2": [c], "u3": [d]}
    assert merged.payload() == {"joins": {"u1": {"metas": [a, b]}, "u2": {"metas": [c]}},
                                "leaves": {"u1": {"metas": [a]}, "u2": {"metas": [c]}, "u3": {"metas": [d]}}}
    assert bool(merged) and not bool(Diff())


class FlushRecorder:
    """A DiffBatcher flush callback that signals each call through an asyncio.Event."""

    def __init__(self) -> None:
        self.flushed: list[tuple[str, Diff, float]] = []
        self.event = asyncio.Event()

    def __call__(self, topic: str, diff: Diff) -> None:
        self.flushed.append((topic, diff, time.monotonic()))
        self.event.set()

    async def wait(self) -> None:
        await asyncio.wait_for(self.event.wait(), FLUSH_TIMEOUT)
        self.event.clear()


async def test_batcher_flushes_merged_diff_after_the_interval():
    recorder = FlushRecorder()
    interval = 0.05
    batcher = DiffBatcher(interval, recorder)
    a, b = {"phx_ref": "a"}, {"phx_ref": "b"}
    started = time.monotonic()
    batcher.add(TOPIC, diff_of({"u1": [a]}))
    batcher.add(TOPIC, diff_of({"u2": [b]}))
    batcher.add(TOPIC, diff_of({}, {"u1": [a]}))
    assert recorder.flushed == []  # nothing before the window ends
    await recorder.wait()
    [(topic, diff, at)] = recorder.flushed
    assert topic == TOPIC
    assert diff.joins == {"u1": [a], "u2": [b]} and diff.leaves == {"u1": [a]}
    assert at - started >= interval * 0.9  # the loop's clock may round the timer a little early
    # The next add opens a new window.
    batcher.add(TOPIC, diff_of({"u3": [{"phx_ref": "c"}]}))
    await recorder.wait()
    assert len(recorder.flushed) == 2 and list(recorder.flushed[1][1].joins) == ["u3"]
    batcher.close()


async def test_batcher_keeps_topics_apart():
    recorder = FlushRecorder()
    batcher = DiffBatcher(0.02, recorder)
    batcher.add("room:topic:1", diff_of({"u1": [{"phx_ref": "a"}]}))
    batcher.add("room:topic:2", diff_of({"u2": [{"phx_ref": "b"}]}))
    batcher.add("room:topic:1", diff_of({"u3": [{"phx_ref": "c"}]}))
    await recorder.wait()
    flushed = {topic: diff for topic, diff, _ in recorder.flushed}
    assert len(recorder.flushed) == 2
    assert flushed["room:topic:1"].joins == {"u1": [{"phx_ref": "a"}], "u3": [{"phx_ref": "c"}]}
    assert flushed["room:topic:2"].joins == {"u2": [{"phx_ref": "b"}]}
    batcher.close()


async def test_batcher_interval_zero_flushes_at_once():
    recorder = FlushRecorder()
    batcher = DiffBatcher(0, recorder)
    batcher.add(TOPIC, diff_of({"u1": [{"phx_ref": "a"}]}))
    assert len(recorder.flushed) == 1  # synchronously, no timer
    batcher.add(TOPIC, diff_of({}, {"u1": [{"phx_ref": "a"}]}))
    batcher.add("room:topic:2", diff_of({"u2": [{"phx_ref": "b"}]}))
    assert [(topic, diff.payload()) for topic, diff, _ in recorder.flushed] == [
        (TOPIC, {"joins": {"u1": {"metas": [{"phx_ref": "a"}]}}, "leaves": {}}),
        (TOPIC, {"joins": {}, "leaves": {"u1": {"metas": [{"phx_ref": "a"}]}}}),
        ("room:topic:2", {"joins": {"u2": {"metas": [{"phx_ref": "b"}]}}, "leaves": {}}),
    ]


def test_batcher_interval_zero_needs_no_event_loop():
    flushed: list[str] = []
    batcher = DiffBatcher(0, lambda topic, diff: flushed.append(topic))
    batcher.add(TOPIC, diff_of({"u1": [{"phx_ref": "a"}]}))
    assert flushed == [TOPIC]


async def test_batcher_close_flushes_pending_and_cancels_the_timer():
    recorder = FlushRecorder()
    batcher = DiffBatcher(3600, recorder)
    batcher.add(TOPIC, diff_of({"u1": [{"phx_ref": "a"}]}))
    batcher.add("room:topic:2", diff_of({}, {"u2": [{"phx_ref": "b"}]}))
    assert recorder.flushed == []
    batcher.close()
    assert sorted(topic for topic, _, _ in recorder.flushed) == ["room:topic:2", TOPIC]
    assert batcher._timer is None
    batcher.close()  # nothing pending: nothing flushed again
    assert len(recorder.flushed) == 2


async def test_batcher_holds_a_topics_diff_while_the_hub_still_writes_that_topic():
    recorder = FlushRecorder()
    writing = {TOPIC}
    asked = asyncio.Event()
    questions: list[str] = []

    def busy(topic: str) -> bool:
        questions.append(topic)
        if questions.count(TOPIC) >= 3:
            asked.set()
        return topic in writing

    batcher = DiffBatcher(0.01, recorder, busy)
    a, b, c = {"phx_ref": "a"}, {"phx_ref": "b"}, {"phx_ref": "c"}
    batcher.add(TOPIC, diff_of({"u1": [a]}))
    batcher.add("room:topic:2", diff_of({"u2": [b]}))
    await recorder.wait()
    await asyncio.wait_for(asked.wait(), FLUSH_TIMEOUT)  # three windows have passed for TOPIC
    assert [topic for topic, _, _ in recorder.flushed] == ["room:topic:2"]
    batcher.add(TOPIC, diff_of({"u3": [c]}, {"u1": [a]}))  # merges into the diff that waits
    writing.clear()
    await recorder.wait()
    [(topic, diff, _)] = recorder.flushed[1:]
    assert topic == TOPIC and diff.joins == {"u1": [a], "u3": [c]} and diff.leaves == {"u1": [a]}
    writing.add(TOPIC)
    batcher.add(TOPIC, diff_of({"u4": [{"phx_ref": "d"}]}))
    batcher.close()  # at shutdown nothing waits
    assert [topic for topic, _, _ in recorder.flushed] == ["room:topic:2", TOPIC, TOPIC]
    assert batcher._timer is None


async def test_a_diff_waits_for_a_busy_topic_only_so_long():
    recorder = FlushRecorder()
    questions: list[str] = []
    batcher = DiffBatcher(0.002, recorder, lambda topic: questions.append(topic) is None)  # always busy
    batcher.add(TOPIC, diff_of({"u1": [{"phx_ref": "a"}]}))
    await recorder.wait()
    assert len(questions) == MAX_WAITS and [topic for topic, _, _ in recorder.flushed] == [TOPIC]
    batcher.close()


async def test_batcher_skips_empty_diffs():
    recorder = FlushRecorder()
    batcher = DiffBatcher(3600, recorder)
    batcher.add(TOPIC, Diff())
    batcher.close()
    assert recorder.flushed == []


# --- the docstring's claim, checked against a re-implementation of phoenix.js Presence


def js_clone(value: Any) -> Any:
    """phoenix.js clones with JSON.parse(JSON.stringify(...)); the wire does the same."""
    return orjson.loads(orjson.dumps(value))


def sync_diff(state: dict[str, Any], diff: dict[str, Any]) -> dict[str, Any]:
    """phoenix.js `Presence.syncDiff(state, {joins, leaves})` (assets/js/phoenix/presence.js), line for line."""
    diff = js_clone(diff)
    joins, leaves = diff["joins"], diff["leaves"]
    for key, new_presence in joins.items():
        current = state.get(key)
        state[key] = js_clone(new_presence)
        if current is not None:
            joined_refs = [meta["phx_ref"] for meta in state[key]["metas"]]
            cur_metas = [meta for meta in current["metas"] if meta["phx_ref"] not in joined_refs]
            state[key]["metas"][0:0] = cur_metas  # metas.unshift(...curMetas)
    for key, left_presence in leaves.items():
        current = state.get(key)
        if current is None:
            continue
        refs_to_remove = [meta["phx_ref"] for meta in left_presence["metas"]]
        current["metas"] = [meta for meta in current["metas"] if meta["phx_ref"] not in refs_to_remove]
        if not current["metas"]:
            del state[key]
    return state


def sync_state(state: dict[str, Any], new_state: dict[str, Any]) -> dict[str, Any]:
    """phoenix.js `Presence.syncState` for what matters here: a first presence_state on an empty state."""
    assert state == {}
    return js_clone(new_state)


def normalized(presences: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """{key: metas sorted by phx_ref}: phoenix.js reorders metas within a key, never across keys."""
    return {key: sorted(entry["metas"], key=lambda meta: meta["phx_ref"]) for key, entry in presences.items()}


def test_sync_diff_reimplementation_matches_phoenix_js_examples():
    # The merge rules phoenix.js documents: a join of a known ref replaces it, leaves remove by ref.
    state = {"u1": {"metas": [{"phx_ref": "1", "x": 1}]}}
    sync_diff(state, {"joins": {"u1": {"metas": [{"phx_ref": "2"}]}, "u2": {"metas": [{"phx_ref": "3"}]}},
                      "leaves": {}})
    assert state == {"u1": {"metas": [{"phx_ref": "1", "x": 1}, {"phx_ref": "2"}]}, "u2": {"metas": [{"phx_ref": "3"}]}}
    sync_diff(state, {"joins": {"u1": {"metas": [{"phx_ref": "1", "x": 2}]}},
                      "leaves": {"u1": {"metas": [{"phx_ref": "2"}]}, "u3": {"metas": [{"phx_ref": "9"}]}}})
    assert state == {"u1": {"metas": [{"phx_ref": "1", "x": 2}]}, "u2": {"metas": [{"phx_ref": "3"}]}}
    sync_diff(state, {"joins": {}, "leaves": {"u2": {"metas": [{"phx_ref": "3"}]}}})
    assert state == {"u1": {"metas": [{"phx_ref": "1", "x": 2}]}}


def run_random_history(seed: int) -> None:
    """Random track/update/untrack events, random flush points, a client snapshot at a random point."""
    rng = random.Random(seed)
    flushed: list[dict[str, Any]] = []
    batcher = DiffBatcher(3600, lambda topic, diff: flushed.append(js_clone(diff.payload())))
    tracker = MemoryTracker("node-a", batcher.add)
    conns = [f"c{index}" for index in range(rng.randint(1, 10))]
    keys = [f"u{index}" for index in range(rng.randint(1, 4))]
    key_of = {conn: rng.choice(keys) for conn in conns}
    steps = rng.randint(1, 80)
    snapshot_at = rng.randint(0, steps)  # before step `snapshot_at`; == steps: after the last event
    client: dict[str, Any] | None = None
    seen_from = 0  # index in `flushed` of the first diff the client receives
    for step in range(steps + 1):
        if step == snapshot_at:
            # A joiner subscribes, then presence_state is taken: it receives every diff flushed from now on,
            # including the flush of the window it joined in.
            client = sync_state({}, state_payload(tracker.list(TOPIC)))
            seen_from = len(flushed)
        if step == steps:
            break
        conn = rng.choice(conns)
        op = rng.random()
        if op < 0.4:
            tracker.track(TOPIC, conn, key_of[conn], {"step": step, "online_at": str(step)})
        elif op < 0.75:
            tracker.update(TOPIC, conn, {"typing": rng.random() < 0.5, "step": step})
        else:
            tracker.untrack(TOPIC, conn)
        if rng.random() < 0.15:
            batcher.close()  # flush now; the batcher stays usable
    batcher.close()
    assert client is not None
    for diff in flushed:
        # Within one merged diff each phx_ref joins at most once and leaves at most once.
        for side in ("joins", "leaves"):
            refs = [meta["phx_ref"] for entry in diff[side].values() for meta in entry["metas"]]
            assert len(refs) == len(set(refs)), (seed, side, diff)
    for diff in flushed[seen_from:]:
        sync_diff(client, diff)
    assert normalized(client) == normalized(state_payload(tracker.list(TOPIC))), seed


async def test_merged_diffs_bring_any_snapshot_to_the_trackers_view():
    for seed in range(300):
        run_random_history(seed)


async def test_unbatched_diffs_bring_any_snapshot_to_the_trackers_view():
    """The same property with every diff sent at once (interval 0): a control for the simulation."""
    for seed in range(100):
        rng = random.Random(seed)
        flushed: list[dict[str, Any]] = []
        tracker = MemoryTracker("n", DiffBatcher(0, lambda topic, diff: flushed.append(js_clone(diff.payload()))).add)
        snapshot_at = rng.randint(0, 40)
        client: dict[str, Any] = {}
        seen_from = 0
        for step in range(41):
            if step == snapshot_at:
                client, seen_from = sync_state({}, state_payload(tracker.list(TOPIC))), len(flushed)
            conn = f"c{rng.randint(0, 5)}"
            choice = rng.random()
            if choice < 0.4:
                tracker.track(TOPIC, conn, f"u{rng.randint(0, 2)}", {})
            elif choice < 0.7:
                tracker.update(TOPIC, conn, {"typing": True})
            else:
                tracker.untrack(TOPIC, conn)
        for diff in flushed[seen_from:]:
            sync_diff(client, diff)
        assert normalized(client) == normalized(state_payload(tracker.list(TOPIC))), seed


# ===================================================================== units: typing budget and service


def test_typing_budget_burst_then_refused():
    assert (TYPING_BURST, TYPING_RATE) == (5.0, 5.0)
    budget = TypingBudget(100.0)
    assert [budget.take(100.0) for _ in range(7)] == [True] * 5 + [False] * 2


def test_typing_budget_refills_at_five_a_second():
    budget = TypingBudget(0.0)
    assert all(budget.take(0.0) for _ in range(5))
    assert not budget.take(0.0)
    assert not budget.take(0.125)      # 0.625 tokens
    assert budget.take(0.25)           # 1.25 tokens: one
    assert not budget.take(0.25)       # 0.25 left
    assert budget.take(0.5)            # 0.25 + 1.25 = 1.5: one
    assert not budget.take(0.5)
    assert [budget.take(1.5) for _ in range(6)] == [True] * 5 + [False]  # 0.5 + 5 is capped at 5


def test_typing_budget_is_capped_at_the_burst():
    budget = TypingBudget(0.0)
    assert [budget.take(3600.0) for _ in range(6)] == [True] * 5 + [False]


def test_typing_budget_sustained_rate():
    budget = TypingBudget(0.0)
    accepted = sum(budget.take(step * 0.01) for step in range(1000))  # 100 tries a second for ~10 s
    assert 5 + 49 <= accepted <= 5 + 50  # the burst, then 5/s over 9.99 s


def payload_of(broadcast: Broadcast) -> Any:
    """A broadcast's payload (carried as JSON bytes encoded once)."""
    if hasattr(broadcast, "payload_json"):
        return orjson.loads(broadcast.payload_json)
    return broadcast.payload


class FakeSession:
    def __init__(self, session_id: str, sub: str, info: dict[str, Any] | None = None) -> None:
        self.id = session_id
        self.identity = Identity(sub=sub, exp=time.time() + 3600, info=info or {})


def make_presence(**settings: Any) -> tuple[Presence, list[Broadcast], Metrics]:
    sent: list[Broadcast] = []
    metrics = Metrics()

    def dispatch(broadcast: Broadcast) -> int:
        sent.append(broadcast)
        return 1

    presence = Presence(Settings(**{"presence_diff_interval": 0.0, **settings}), metrics, "node-a", dispatch)
    return presence, sent, metrics


def test_presence_join_typing_and_expiry():
    presence, sent, metrics = make_presence(typing_timeout=5.0)
    ann = FakeSession("n.1", "u1", {"name": "Ann"})
    state = presence.join(ann, TOPIC)
    [meta] = state["u1"]["metas"]
    assert set(meta) == {"name", "online_at", "phx_ref"} and meta["name"] == "Ann"
    assert abs(int(meta["online_at"]) - time.time()) < 5
    assert [(b.topic, b.event) for b in sent] == [(TOPIC, "presence_diff")]
    assert metrics.registry.get_sample_value("push_presence_diffs_total") == 1

    assert presence.typing(ann, TOPIC, {"typing": True, "username": "ann"}) == ("ok", {})
    typed = payload_of(sent[-1])["joins"]["u1"]["metas"][0]
    assert typed["typing"] is True and typed["username"] == "ann" and typed["phx_ref_prev"] == meta["phx_ref"]
    assert payload_of(sent[-1])["leaves"] == {"u1": {"metas": [meta]}}

    # Not yet lapsed: nothing; lapsed: typing goes back to false, by an update.
    presence.expire_typing(time.monotonic())
    assert len(sent) == 2
    presence.expire_typing(time.monotonic() + 5.1)
    cleared = payload_of(sent[-1])["joins"]["u1"]["metas"][0]
    assert len(sent) == 3 and cleared["typing"] is False and cleared["phx_ref_prev"] == typed["phx_ref"]
    presence.expire_typing(time.monotonic() + 60)  # once only
    assert len(sent) == 3

    # typing: false clears the pending expiry; leave clears it too.
    presence.typing(ann, TOPIC, {"typing": True})
    presence.typing(ann, TOPIC, {"typing": False})
    count = len(sent)
    presence.expire_typing(time.monotonic() + 60)
    assert len(sent) == count
    presence.typing(ann, TOPIC, {"typing": True})
    presence.leave(ann, TOPIC)
    count = len(sent)
    presence.expire_typing(time.monotonic() + 60)
    assert len(sent) == count
    assert presence.list(TOPIC) == {}
    assert presence.tracker.size == 0


def test_typing_cannot_override_the_username_the_token_vouches_for():
    presence, sent, _ = make_presence()
    ann = FakeSession("n.1", "u1", {"username": "ann"})
    presence.join(ann, TOPIC)
    assert presence.typing(ann, TOPIC, {"typing": True, "username": "admin"}) == ("ok", {})
    [meta] = payload_of(sent[-1])["joins"]["u1"]["metas"]
    assert meta["username"] == "ann" and meta["typing"] is True


@pytest.mark.parametrize("payload, reason", [
    ({}, "typing must be a boolean"),
    ({"typing": "yes"}, "typing must be a boolean"),
    ({"typing": 1}, "typing must be a boolean"),
    ({"typing": None}, "typing must be a boolean"),
    ([True], "typing must be a boolean"),
    ("typing", "typing must be a boolean"),
    ({"typing": True, "username": 5}, "username must be a string"),
    ({"typing": False, "username": ["a"]}, "username must be a string"),
])
def test_presence_typing_validation(payload, reason):
    presence, sent, metrics = make_presence()
    ann = FakeSession("n.1", "u1")
    presence.join(ann, TOPIC)
    sent.clear()
    assert presence.typing(ann, TOPIC, payload) == ("error", {"reason": reason})
    assert sent == []
    assert metrics.registry.get_sample_value("push_client_errors_total", {"reason": "bad_typing"}) == 1


def test_presence_typing_budget_is_per_connection_and_forgotten():
    presence, sent, metrics = make_presence()
    ann, bob = FakeSession("n.1", "u1"), FakeSession("n.2", "u2")
    presence.join(ann, TOPIC)
    presence.join(bob, TOPIC)
    results = [presence.typing(ann, TOPIC, {"typing": True})[0] for _ in range(10)]
    assert results == ["ok"] * 5 + ["error"] * 5
    assert presence.typing(ann, TOPIC, {"typing": True}) == ("error", {"reason": "rate limited"})
    assert metrics.registry.get_sample_value("push_typing_dropped_total") == 6
    assert presence.typing(bob, TOPIC, {"typing": True}) == ("ok", {})  # bob has a budget of his own
    presence.forget(ann)
    assert presence.typing(ann, TOPIC, {"typing": True}) == ("ok", {})  # a new connection, a new budget


# ===================================================================== the wire, against a real server


async def recv(ws) -> Any:
    return await ws.receive_json(timeout=RECEIVE_TIMEOUT)


async def assert_nothing_pending(ws, v1: bool = False) -> None:
    """The next frame, presence frames included, is the reply to a heartbeat sent now."""
    await nothing_pending(ws, v1, next_frame=recv)


async def join_presence(ws, topic: str = TOPIC, ref: str = "1") -> dict[str, Any]:
    """Join, check the reply and presence_state frames; returns the presence_state payload."""
    await ws.send_json([ref, ref, topic, "phx_join", {}])
    assert await recv(ws) == [ref, ref, topic, "phx_reply", OK]
    state = await recv(ws)
    assert state[:4] == [ref, None, topic, "presence_state"], state
    return state[4]


async def diffs_until(ws, done: Callable[[dict[str, Any]], bool], topic: str = TOPIC) -> list[dict[str, Any]]:
    """presence_diff payloads read until one satisfies `done` (every frame before must be a diff)."""
    payloads = []
    while True:
        frame = await recv(ws)
        assert frame[:4] == [None, None, topic, "presence_diff"], frame
        payloads.append(frame[4])
        if done(frame[4]):
            return payloads


def joins_key(key: str) -> Callable[[dict[str, Any]], bool]:
    return lambda payload: key in payload["joins"]


def metas_of(payloads: list[dict[str, Any]], side: str, key: str) -> list[dict[str, Any]]:
    return [meta for payload in payloads for meta in payload[side].get(key, {}).get("metas", [])]


def presence_api(http: aiohttp.ClientSession, server, path: str, key: str | None = PUBLISH_KEY):
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return http.get(f"{server.http_url}/api/presence/{path}", headers=headers)


async def test_join_presence_topic_exact_frames(server):
    async with aiohttp.ClientSession() as http, connect(http, server, make_token("u1")) as ws:
        before = int(time.time())
        await ws.send_json(["1", "1", TOPIC, "phx_join", {}])
        assert await recv(ws) == ["1", "1", TOPIC, "phx_reply", OK]
        state = await recv(ws)
        assert state[:4] == ["1", None, TOPIC, "presence_state"]
        assert list(state[4]) == ["u1"]
        [meta] = state[4]["u1"]["metas"]
        assert set(meta) == {"online_at", "phx_ref"}
        assert PHX_REF.match(meta["phx_ref"])
        assert before <= int(meta["online_at"]) <= time.time() + 1
        # Then the batched diff of the joiner's own join: idempotent for phoenix.js (same phx_ref).
        assert await recv(ws) == [None, None, TOPIC, "presence_diff",
                                  {"joins": {"u1": {"metas": [meta]}}, "leaves": {}}]
        await assert_nothing_pending(ws)


async def test_non_presence_topics_send_no_presence_frames(server):
    async with aiohttp.ClientSession() as http, connect(http, server, make_token("u1")) as ws:
        for ref, topic in (("1", "room:lobby:1"), ("2", "user:u1")):
            await ws.send_json([ref, ref, topic, "phx_join", {}])
            assert await recv(ws) == [ref, ref, topic, "phx_reply", OK]
        await assert_nothing_pending(ws)
        # The community family is tracked by default.
        state = await join_presence(ws, "room:55", "3")
        assert list(state) == ["u1"]
        await diffs_until(ws, joins_key("u1"), "room:55")
        assert await metric(http, server, "push_presences") == 1


async def test_second_joiner_causes_exactly_one_diff(server):
    async with aiohttp.ClientSession() as http, connect(http, server, make_token("u1")) as first, \
            connect(http, server, make_token("u2")) as second:
        state1 = await join_presence(first)
        [meta1] = state1["u1"]["metas"]
        await diffs_until(first, joins_key("u1"))
        state2 = await join_presence(second)
        assert state2["u1"] == {"metas": [meta1]}
        [meta2] = state2["u2"]["metas"]
        assert meta2["phx_ref"] != meta1["phx_ref"]
        # The second socket's own join diff is the same broadcast the first socket gets, written to both
        # at once: once the second has it, the first has exactly it, and nothing after it.
        expected = [None, None, TOPIC, "presence_diff", {"joins": {"u2": {"metas": [meta2]}}, "leaves": {}}]
        assert await recv(second) == expected
        await assert_nothing_pending(second)
        assert await recv(first) == expected
        await assert_nothing_pending(first)
        assert await metric(http, server, "push_presence_diffs_total") == 2
        # A leave is one diff with the leave only.
        await second.send_json(["1", "2", TOPIC, "phx_leave", {}])
        assert await recv(second) == ["1", "2", TOPIC, "phx_reply", OK]
        assert await recv(second) == ["1", "1", TOPIC, "phx_close", {}]
        assert await recv(first) == [None, None, TOPIC, "presence_diff",
                                     {"joins": {}, "leaves": {"u2": {"metas": [meta2]}}}]
        await assert_nothing_pending(second)  # left: it gets no diff of its own leave


async def test_disconnect_is_a_leave(server):
    async with aiohttp.ClientSession() as http, connect(http, server, make_token("u1")) as stays:
        await join_presence(stays)
        await diffs_until(stays, joins_key("u1"))
        async with connect(http, server, make_token("u2")) as goes:
            state = await join_presence(goes)
            [meta2] = state["u2"]["metas"]
            await diffs_until(stays, joins_key("u2"))
        assert await recv(stays) == [None, None, TOPIC, "presence_diff",
                                     {"joins": {}, "leaves": {"u2": {"metas": [meta2]}}}]
        await wait_for_metric(http, server, "push_presences", 1)


async def test_info_claim_is_merged_into_metas(server):
    info = {"name": "Ann", "avatar": "https://x/a.png", "roles": ["admin"], "phx_ref": "forged", "online_at": "0"}
    async with aiohttp.ClientSession() as http, connect(http, server, make_token("u1", info=info)) as ws:
        state = await join_presence(ws)
        [meta] = state["u1"]["metas"]
        assert set(meta) == {"name", "avatar", "roles", "online_at", "phx_ref"}
        assert (meta["name"], meta["avatar"], meta["roles"]) == ("Ann", "https://x/a.png", ["admin"])
        # The service's own fields win over the claim's.
        assert meta["phx_ref"] != "forged" and PHX_REF.match(meta["phx_ref"])
        assert meta["online_at"] != "0"
        [payload] = await diffs_until(ws, joins_key("u1"))
        assert payload["joins"]["u1"]["metas"] == [meta]


@pytest.mark.parametrize("payload, reason", [
    ({}, "typing must be a boolean"),
    ({"typing": "true"}, "typing must be a boolean"),
    ({"typing": 1}, "typing must be a boolean"),
    ({"username": "ann"}, "typing must be a boolean"),
    ([], "typing must be a boolean"),
    ({"typing": True, "username": 42}, "username must be a string"),
    ({"typing": True, "username": {"n": "ann"}}, "username must be a string"),
])
async def test_typing_validation_errors(server, payload, reason):
    async with aiohttp.ClientSession() as http, connect(http, server, make_token("u1")) as ws, \
            connect(http, server, make_token("u2")) as other:
        state = await join_presence(ws)
        [meta] = state["u1"]["metas"]
        await diffs_until(ws, joins_key("u1"))
        await join_presence(other)
        await diffs_until(other, joins_key("u2"))
        await diffs_until(ws, joins_key("u2"))
        await ws.send_json(["1", "5", TOPIC, "user:typing", payload])
        assert await recv(ws) == ["1", "5", TOPIC, "phx_reply", {"status": "error", "response": {"reason": reason}}]
        assert await metric(http, server, "push_client_errors_total", reason="bad_typing") == 1
        # Nothing changed: the next diff the other member sees is the valid update that follows.
        await ws.send_json(["1", "6", TOPIC, "user:typing", {"typing": True, "username": "ann"}])
        assert await recv(ws) == ["1", "6", TOPIC, "phx_reply", OK]
        [diff] = await diffs_until(other, joins_key("u1"))
        [typed] = diff["joins"]["u1"]["metas"]
        assert typed == {**meta, "typing": True, "username": "ann", "phx_ref": typed["phx_ref"],
                         "phx_ref_prev": meta["phx_ref"]}
        assert diff == {"joins": {"u1": {"metas": [typed]}}, "leaves": {"u1": {"metas": [meta]}}}
        assert await metric(http, server, "push_typing_dropped_total") == 0


async def test_typing_rate_limit(server):
    async with aiohttp.ClientSession() as http, connect(http, server, make_token("u1")) as typer, \
            connect(http, server, make_token("u2")) as other:
        state = await join_presence(typer)
        [meta] = state["u1"]["metas"]
        await diffs_until(typer, joins_key("u1"))
        await join_presence(other)
        await diffs_until(other, joins_key("u2"))
        await diffs_until(typer, joins_key("u2"))

        # Ten typing pushes, back to back.
        frames = [orjson.dumps(["1", str(10 + n), TOPIC, "user:typing", {"typing": True, "username": f"ann{n}"}])
                  for n in range(10)]
        for frame in frames:
            await typer.send_str(frame.decode())
        replies = []
        while len(replies) < 10:
            frame = await recv(typer)
            if frame[3] != "presence_diff":  # the typer is a member too: its own diffs may interleave
                replies.append(frame)
        limited = {"status": "error", "response": {"reason": "rate limited"}}
        assert replies == ([["1", str(10 + n), TOPIC, "phx_reply", OK] for n in range(5)]
                           + [["1", str(10 + n), TOPIC, "phx_reply", limited] for n in range(5, 10)])
        assert await metric(http, server, "push_typing_dropped_total") == 5

        # Every accepted update went into the batcher before this join: once the other member sees the
        # marker's join, it has seen every typing diff (batching may have merged them into fewer frames).
        async with connect(http, server, make_token("u3")) as marker:
            await join_presence(marker)
            payloads = await diffs_until(other, joins_key("u3"))
        joined = metas_of(payloads, "joins", "u1")
        left = metas_of(payloads, "leaves", "u1")
        assert [m["username"] for m in joined] == [f"ann{n}" for n in range(5)]
        assert all(m["typing"] is True for m in joined)
        # A chain: each update leaves the previous meta, starting from the join's.
        assert [m["phx_ref_prev"] for m in joined] == [meta["phx_ref"]] + [m["phx_ref"] for m in joined[:-1]]
        assert [m["phx_ref"] for m in left] == [m["phx_ref_prev"] for m in joined]
        async with presence_api(http, server, TOPIC) as response:
            presences = (await response.json())["presences"]
        assert presences["u1"] == {"metas": [joined[-1]]}


async def test_typing_true_lapses(start_server):
    server = await start_server(PUSH_TYPING_TIMEOUT="0.5")
    async with aiohttp.ClientSession() as http, connect(http, server, make_token("u1")) as typer:
        await join_presence(typer)
        await diffs_until(typer, joins_key("u1"))
        await typer.send_json(["1", "2", TOPIC, "user:typing", {"typing": True}])
        assert await recv(typer) == ["1", "2", TOPIC, "phx_reply", OK]
        started = time.monotonic()
        [typed] = metas_of(await diffs_until(typer, joins_key("u1")), "joins", "u1")
        assert typed["typing"] is True
        [cleared] = metas_of(await diffs_until(typer, joins_key("u1")), "joins", "u1")
        assert time.monotonic() - started >= 0.4
        assert cleared["typing"] is False and cleared["phx_ref_prev"] == typed["phx_ref"]
        await assert_nothing_pending(typer)


async def test_duplicate_join_of_presence_topic(server):
    async with aiohttp.ClientSession() as http, connect(http, server, make_token("u1")) as ws, \
            connect(http, server, make_token("u2")) as other:
        state = await join_presence(ws, ref="1")
        [old] = state["u1"]["metas"]
        await diffs_until(ws, joins_key("u1"))
        await join_presence(other)
        await diffs_until(other, joins_key("u2"))
        await diffs_until(ws, joins_key("u2"))

        await ws.send_json(["2", "2", TOPIC, "phx_join", {}])
        assert await recv(ws) == ["2", "2", TOPIC, "phx_reply", OK]
        state = await recv(ws)
        assert state[:4] == ["2", None, TOPIC, "presence_state"]
        [new] = state[4]["u1"]["metas"]
        assert sorted(state[4]) == ["u1", "u2"]
        assert new["phx_ref"] != old["phx_ref"] and "phx_ref_prev" not in new
        assert await recv(ws) == ["1", "1", TOPIC, "phx_close", {}]
        # Leave and join happen in one step, so in one batch: one diff for everyone.
        expected = [None, None, TOPIC, "presence_diff",
                    {"joins": {"u1": {"metas": [new]}}, "leaves": {"u1": {"metas": [old]}}}]
        assert await recv(other) == expected
        assert await recv(ws) == expected
        await assert_nothing_pending(other)
        await assert_nothing_pending(ws)
        assert await metric(http, server, "push_presences") == 2
        async with presence_api(http, server, f"{TOPIC}/count") as response:
            assert await response.json() == {"topic": TOPIC, "users": 2, "connections": 2}


async def test_v1_sockets_get_the_same_presence_payloads(server):
    async with aiohttp.ClientSession() as http, connect(http, server, make_token("u1"), vsn="1.0.0") as v1, \
            connect(http, server, make_token("u2")) as v2:
        await v1.send_json({"topic": TOPIC, "event": "phx_join", "payload": {}, "ref": "1", "join_ref": "1"})
        assert await recv(v1) == {"topic": TOPIC, "event": "phx_reply", "payload": OK, "ref": "1"}
        state = await recv(v1)
        assert set(state) == {"topic", "event", "payload", "ref"}  # never a join_ref in v1
        assert (state["topic"], state["event"], state["ref"]) == (TOPIC, "presence_state", None)
        [meta1] = state["payload"]["u1"]["metas"]
        assert await recv(v1) == {"topic": TOPIC, "event": "presence_diff", "ref": None,
                                  "payload": {"joins": {"u1": {"metas": [meta1]}}, "leaves": {}}}
        v2_state = await join_presence(v2)
        assert v2_state["u1"] == {"metas": [meta1]}
        [meta2] = v2_state["u2"]["metas"]
        diff = {"joins": {"u2": {"metas": [meta2]}}, "leaves": {}}
        assert await recv(v2) == [None, None, TOPIC, "presence_diff", diff]
        assert await recv(v1) == {"topic": TOPIC, "event": "presence_diff", "payload": diff, "ref": None}
        # user:typing over v1 too.
        await v1.send_json({"topic": TOPIC, "event": "user:typing", "payload": {"typing": True}, "ref": "2",
                            "join_ref": "1"})
        assert await recv(v1) == {"topic": TOPIC, "event": "phx_reply", "payload": OK, "ref": "2"}
        v1_diff = await recv(v1)
        v2_diff = await recv(v2)
        assert v1_diff["event"] == "presence_diff" and v1_diff["payload"] == v2_diff[4]
        assert v2_diff[4]["joins"]["u1"]["metas"][0]["typing"] is True
        await assert_nothing_pending(v1, v1=True)
        await assert_nothing_pending(v2)


async def test_presence_metrics(server):
    async with aiohttp.ClientSession() as http:
        assert await metric(http, server, "push_presences") == 0
        assert await metric(http, server, "push_presence_diffs_total") == 0
        async with connect(http, server, make_token("u1")) as ws:
            await join_presence(ws, TOPIC, "1")
            await diffs_until(ws, joins_key("u1"))
            assert await metric(http, server, "push_presences") == 1
            assert await metric(http, server, "push_presence_diffs_total") == 1
            await join_presence(ws, "room:topic:8", "2")
            await diffs_until(ws, joins_key("u1"), "room:topic:8")
            await ws.send_json(["3", "3", "room:lobby:1", "phx_join", {}])  # not tracked
            assert await recv(ws) == ["3", "3", "room:lobby:1", "phx_reply", OK]
            assert await metric(http, server, "push_presences") == 2
            assert await metric(http, server, "push_presence_diffs_total") == 2
            async with connect(http, server, make_token("u1")) as tab:  # a second tab of the same user
                await join_presence(tab, TOPIC)
                await diffs_until(tab, joins_key("u1"))
                await diffs_until(ws, joins_key("u1"))
                assert await metric(http, server, "push_presences") == 3
                assert await metric(http, server, "push_presence_diffs_total") == 3
            await wait_for_metric(http, server, "push_presences", 2)
            await diffs_until(ws, lambda payload: "u1" in payload["leaves"])  # the tab's leave
            await ws.send_json(["2", "4", "room:topic:8", "phx_leave", {}])
            assert await recv(ws) == ["2", "4", "room:topic:8", "phx_reply", OK]
            assert await metric(http, server, "push_presences") == 1
        await wait_for_metric(http, server, "push_presences", 0)
        async with http.get(f"{server.http_url}/metrics") as response:
            text = await response.text()
        assert "# TYPE push_presences gauge" in text
        assert "# TYPE push_presence_diffs_total counter" in text


async def test_presence_off_with_none(start_server):
    server = await start_server(PUSH_PRESENCE_TOPICS="none")
    async with aiohttp.ClientSession() as http, connect(http, server, make_token("u1")) as ws:
        await ws.send_json(["1", "1", TOPIC, "phx_join", {}])
        assert await recv(ws) == ["1", "1", TOPIC, "phx_reply", OK]
        await ws.send_json(["1", "2", TOPIC, "user:typing", {"typing": True}])
        assert await recv(ws) == ["1", "2", TOPIC, "phx_reply",
                                  {"status": "error", "response": {"reason": "unhandled event"}}]
        await assert_nothing_pending(ws)
        assert await metric(http, server, "push_presences") == 0


async def test_diff_interval_zero_sends_each_diff_at_once(start_server):
    server = await start_server(PUSH_PRESENCE_DIFF_INTERVAL="0")
    async with aiohttp.ClientSession() as http, connect(http, server, make_token("u1")) as ws:
        await ws.send_json(["1", "1", TOPIC, "phx_join", {}])
        # Unbatched, the join's diff goes out at the event loop's next turn: right behind the reply and
        # presence_state, as a batched diff would (phoenix.js merges it by phx_ref: idempotent).
        assert await recv(ws) == ["1", "1", TOPIC, "phx_reply", OK]
        state = await recv(ws)
        diff = await recv(ws)
        assert diff[:4] == [None, None, TOPIC, "presence_diff"] and state[:4] == ["1", None, TOPIC, "presence_state"]
        assert diff[4]["joins"]["u1"] == state[4]["u1"]
        for n in range(3):
            await ws.send_json(["1", str(2 + n), TOPIC, "user:typing", {"typing": n % 2 == 0}])
            assert await recv(ws) == ["1", str(2 + n), TOPIC, "phx_reply", OK]
            assert (await recv(ws))[3] == "presence_diff"  # each update its own diff, not held for a batch
        assert await metric(http, server, "push_presence_diffs_total") == 4


async def test_presence_api(server):
    async with aiohttp.ClientSession() as http:
        async with presence_api(http, server, TOPIC) as response:
            assert response.status == 200
            assert await response.json() == {"topic": TOPIC, "presences": {}}
        async with presence_api(http, server, f"{TOPIC}/count") as response:
            assert await response.json() == {"topic": TOPIC, "users": 0, "connections": 0}
        async with connect(http, server, make_token("u1", info={"name": "Ann"})) as a, \
                connect(http, server, make_token("u1")) as b, connect(http, server, make_token("u2")) as c:
            metas = {}
            for ws, name in ((a, "a"), (b, "b"), (c, "c")):
                state = await join_presence(ws)
                metas[name] = state["u2" if name == "c" else "u1"]["metas"][-1]
            async with presence_api(http, server, TOPIC) as response:
                assert response.status == 200
                assert response.content_type == "application/json"
                body = await response.json()
            assert body == {"topic": TOPIC, "presences": {"u1": {"metas": [metas["a"], metas["b"]]},
                                                          "u2": {"metas": [metas["c"]]}}}
            assert metas["a"]["name"] == "Ann"
            async with presence_api(http, server, f"{TOPIC}/count") as response:
                assert response.status == 200
                assert await response.json() == {"topic": TOPIC, "users": 2, "connections": 3}
            async with presence_api(http, server, "room:55/count") as response:  # community: tracked, empty
                assert await response.json() == {"topic": "room:55", "users": 0, "connections": 0}

        for path in (TOPIC, f"{TOPIC}/count"):
            async with presence_api(http, server, path, key=None) as response:
                assert response.status == 401
                assert "error" in await response.json()
            async with presence_api(http, server, path, key="wrong") as response:
                assert response.status == 401
            async with http.get(f"{server.http_url}/api/presence/{path}",
                                headers={"Authorization": f"Basic {PUBLISH_KEY}"}) as response:
                assert response.status == 401
        for path, fragment in (("nope:1", "unknown topic family"), ("room:topic:", "unknown topic family"),
                               ("room:lobby:1", "not tracked for lobby"), ("user:u1/count", "not tracked for user")):
            async with presence_api(http, server, path) as response:
                assert response.status == 400, path
                assert fragment in (await response.json())["error"], path
