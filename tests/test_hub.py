"""The hub's rotations: a topic with more subscribers than a slice is written a slice per event-loop turn,
and what is dispatched meanwhile joins the rotation where it stands. Unit tests on a Hub with small
slices and recording subscribers."""

from __future__ import annotations

import asyncio
import random

from push_service.hub import Hub
from push_service.messages import Broadcast, Run

TIMEOUT = 5.0


class Recorder:
    """A subscriber that records each write: the turn it happened in and the broadcasts it carried."""

    turn = 0  # advanced by the test, once per event-loop turn it lets pass

    def __init__(self, name: str) -> None:
        self.name = name
        self.writes: list[tuple[int, list[str]]] = []

    def deliver(self, broadcast: Broadcast | Run) -> None:
        self.writes.append((Recorder.turn, [part.event for part in broadcast.parts]))

    @property
    def received(self) -> list[str]:
        return [event for _, events in self.writes for event in events]

    def __repr__(self) -> str:
        return self.name


def message(event: str) -> Broadcast:
    return Broadcast("room:big", event, b"{}")


async def next_turn() -> None:
    await asyncio.sleep(0)
    Recorder.turn += 1


async def settle(hub: Hub) -> None:
    """Let the loop run until the hub has nothing left to write."""
    async with asyncio.timeout(TIMEOUT):
        while hub._pending or hub._rotations:
            await next_turn()


def subscribed(hub: Hub, count: int) -> list[Recorder]:
    recorders = [Recorder(f"s{index}") for index in range(count)]
    for recorder in recorders:
        hub.subscribe("room:big", recorder)
    return recorders


async def test_a_big_topic_is_written_a_slice_per_turn_and_the_loop_runs_between():
    counts: list[tuple[str, int]] = []
    hub = Hub(on_dispatched=lambda broadcast, count: counts.append((broadcast.event, count)), slice_size=10)
    recorders = subscribed(hub, 25)
    others_ran = []
    hub.dispatch(message("m1"))
    asyncio.get_running_loop().call_soon(lambda: others_ran.append(sum(len(r.writes) for r in recorders)))
    await settle(hub)
    assert [recorder.received for recorder in recorders] == [["m1"]] * 25
    assert others_ran and 0 < others_ran[0] < 25  # something else ran while the rotation was half done
    assert len({recorder.writes[0][0] for recorder in recorders}) == 3  # 25 subscribers, slices of 10
    assert counts == [("m1", 25)]


async def test_a_broadcast_dispatched_mid_rotation_joins_it_where_it_stands():
    counts: list[tuple[str, int]] = []
    hub = Hub(on_dispatched=lambda broadcast, count: counts.append((broadcast.event, count)), slice_size=10)
    recorders = subscribed(hub, 25)
    hub.dispatch(message("m1"))
    await next_turn()  # the flush: subscribers 0-9 have m1
    assert [len(recorder.writes) for recorder in recorders] == [1] * 10 + [0] * 15
    hub.dispatch(message("m2"))
    await settle(hub)
    # Those the rotation had not reached get both in one write; the others get m2 on the next pass.
    assert all(recorder.received == ["m1", "m2"] for recorder in recorders)
    writes = [[events for _, events in recorder.writes] for recorder in recorders]
    assert writes[:10] == [[["m1"], ["m2"]]] * 10
    assert writes[-5:] == [[["m1", "m2"]]] * 5
    assert counts == [("m1", 25), ("m2", 25)]


async def test_who_leaves_mid_rotation_gets_nothing_more_and_who_joins_gets_what_follows():
    hub = Hub(slice_size=10)
    recorders = subscribed(hub, 25)
    hub.dispatch(message("m1"))
    await next_turn()
    reached, unreached, rejoiner = recorders[3], recorders[15], recorders[7]
    hub.unsubscribe("room:big", reached)
    hub.unsubscribe("room:big", unreached)
    hub.unsubscribe("room:big", rejoiner)
    hub.subscribe("room:big", rejoiner)  # left and came back: one place in the rotation, not two
    joiner = Recorder("joiner")
    hub.subscribe("room:big", joiner)
    hub.dispatch(message("m2"))
    await settle(hub)
    assert reached.received == ["m1"]
    assert unreached.received == []
    assert rejoiner.received == ["m1", "m2"]
    assert joiner.received == ["m2"]  # m1 came before it joined
    assert all(recorder.received == ["m1", "m2"] for recorder in recorders
               if recorder not in (reached, unreached))


async def test_under_a_steady_stream_with_churn_every_subscriber_gets_each_message_once_in_order():
    rng = random.Random(7)
    hub = Hub(slice_size=7)
    present = subscribed(hub, 60)
    gone: list[Recorder] = []
    left_at: dict[Recorder, int] = {}
    joined_after: dict[Recorder, int] = {}  # joiner -> messages dispatched before it joined
    sent = 0
    for _ in range(300):
        for _ in range(rng.choice((0, 1, 1, 2))):
            sent += 1
            hub.dispatch(message(f"{sent:04d}"))
        if rng.random() < 0.3 and len(present) > 10:
            leaver = present.pop(rng.randrange(len(present)))
            hub.unsubscribe("room:big", leaver)
            left_at[leaver] = Recorder.turn
            gone.append(leaver)
        if rng.random() < 0.3:
            joiner = Recorder(f"j{Recorder.turn}")
            hub.subscribe("room:big", joiner)
            joined_after[joiner] = sent
            present.append(joiner)
        await next_turn()
    await settle(hub)
    everything = [f"{index:04d}" for index in range(1, sent + 1)]
    for recorder in present:
        received = recorder.received
        assert received == sorted(set(received)), recorder  # no duplicate, no reordering
        # Everything dispatched after it joined reached it (what came just before may have too).
        expected = everything[joined_after.get(recorder, 0):]
        assert received[len(received) - len(expected):] == expected, recorder
    for recorder in gone:
        assert recorder.received == sorted(set(recorder.received)), recorder
        assert all(turn < left_at[recorder] for turn, _ in recorder.writes), recorder
    assert not hub._rotations


async def test_finish_writes_everything_dispatched_so_far_at_once():
    """Before the node closes sockets on purpose (drain, shutdown), what it accepted reaches them."""
    counts: list[tuple[str, int]] = []
    hub = Hub(on_dispatched=lambda broadcast, count: counts.append((broadcast.event, count)), slice_size=10)
    recorders = subscribed(hub, 25)
    hub.dispatch(message("m1"))
    await next_turn()  # a slice written, the rotation under way
    hub.dispatch(message("m2"))  # dispatched, not even flushed yet
    hub.finish()
    assert all(recorder.received == ["m1", "m2"] for recorder in recorders)
    assert not hub._rotations and not hub._pending
    assert counts == [("m1", 25), ("m2", 25)]
    await settle(hub)  # the slice already scheduled finds nothing left
    assert all(recorder.received == ["m1", "m2"] for recorder in recorders)
