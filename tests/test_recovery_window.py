"""The recovery window (history/window.py), the one rule every history (memory, Redis, NATS) answers a
join with `since` by: exactly what was missed, or the first `limit` of it, or nothing and recovered: false
once a gap means the client must refetch. A pure function, so every case is a unit test here; the
histories' own tests (test_history.py) run it end to end."""

from __future__ import annotations

import pytest

from push_service.history.window import recovery_window
from push_service.messages import Broadcast, Position

EPOCH = "e1"


def kept(*seqs: int) -> list[Broadcast]:
    return [Broadcast("room:1", "new_msg", b"{}", None, Position(EPOCH, seq)) for seq in seqs]


def seqs(recovery) -> list[int]:  # type: ignore[no-untyped-def]
    return [broadcast.position.seq for broadcast in recovery.messages]


def at(seq: int, epoch: str = EPOCH) -> Position:
    return Position(epoch, seq)


def test_without_since_the_latest_kept_are_sent_up_to_the_limit():
    assert seqs(recovery_window(at(5), None, kept(3, 4, 5), None)) == [3, 4, 5]
    recovery = recovery_window(at(5), None, kept(3, 4, 5), 2)
    assert recovery.recovered and seqs(recovery) == [4, 5] and recovery.position == at(5)


@pytest.mark.parametrize("since", [at(3, "other"), at(6)], ids=["another epoch", "ahead of the topic"])
def test_a_position_the_topic_never_had_is_not_recovered(since):
    recovery = recovery_window(at(5), since, kept(4, 5), None)
    assert not recovery.recovered and recovery.messages == []


def test_consecutive_positions_everything_missed_is_kept():
    recovery = recovery_window(at(5), at(2), kept(3, 4, 5), None)
    assert recovery.recovered and seqs(recovery) == [3, 4, 5]
    assert recovery_window(at(5), at(5), [], None).recovered  # nothing missed


def test_consecutive_positions_a_lost_start_means_refetch():
    recovery = recovery_window(at(5), at(1), kept(3, 4, 5), None)
    assert not recovery.recovered and recovery.messages == []


def test_consecutive_positions_more_than_the_limit_gives_the_first_of_it_unless_its_start_is_lost():
    first = recovery_window(at(9), at(2), kept(3, 4, 5), 2)  # a reader may stop after limit + 1
    assert not first.recovered and seqs(first) == [3, 4]
    lost = recovery_window(at(9), at(1), kept(3, 4, 5), 2)
    assert not lost.recovered and lost.messages == []


def test_stream_wide_positions_are_told_intact_by_the_reader():
    # NATS: a topic's positions skip other topics' sequences; the reader knows whether `since` is still kept.
    intact = recovery_window(at(40), at(10), kept(17, 23, 40), None, intact=True)
    assert intact.recovered and seqs(intact) == [17, 23, 40]
    lost = recovery_window(at(40), at(10), kept(17, 23, 40), None, intact=False)
    assert not lost.recovered and lost.messages == []
    limited = recovery_window(at(40), at(10), kept(17, 23, 40), 2, intact=True)
    assert not limited.recovered and seqs(limited) == [17, 23]
