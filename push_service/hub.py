"""Local fan-out: topic -> the subscribers on this node, with encode-once broadcasts.

A broadcast is serialized at most once per wire format (protocol version x transport
framing), however many subscribers it reaches; each delivery is one write of those bytes. A topic
with more than SLICE subscribers is written SLICE of them per event-loop turn (`_Rotation`).
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from collections.abc import Callable, Sequence

from push_service.messages import Broadcast, Run, Subscriber


# A topic with more local subscribers than this is written SLICE subscribers per event-loop turn (a
# rotation), so that a broadcast to a huge topic holds the loop for milliseconds, not for the whole
# pass, and the next message does not wait for the pass to end: it joins the rotation where it stands.
SLICE = 100


class _Outstanding:
    """A broadcast in a rotation: it came in at `position` during pass `lap` and is retired when the
    rotation comes back to that position, so that every subscriber gets it once."""

    __slots__ = ("broadcast", "position", "lap", "delivered_before", "to_joiners", "since")

    def __init__(self, broadcast: Broadcast, position: int, lap: int, delivered_before: int,
                 to_joiners: int, since: float) -> None:
        self.broadcast = broadcast
        self.position = position
        self.lap = lap
        self.delivered_before = delivered_before  # the rotation's deliveries when it came
        self.to_joiners = to_joiners  # how many joiners got it when it came
        self.since = since  # the loop's time when it came


class _Rotation:
    """A circular pass over the subscribers a topic had when it began (`members`). The one under the
    cursor gets every outstanding broadcast, in dispatch order, in one write; one that leaves
    becomes None. Who subscribes meanwhile is a joiner: it gets what is dispatched after it came,
    at once, and none of what was outstanding before, until the next pass takes it in (the Hub
    keeps both in step)."""

    __slots__ = ("members", "joiners", "cursor", "lap", "outstanding", "delivery", "delivered", "dead")

    def __init__(self, members: list[Subscriber | None]) -> None:
        self.members = members
        self.joiners: dict[Subscriber, None] = {}
        self.cursor = 0
        self.lap = 0
        self.outstanding: deque[_Outstanding] = deque()
        self.delivery: Broadcast | Run | None = None  # what the current outstanding set is written as
        self.delivered = 0  # deliveries to members so far
        self.dead = 0  # Nones in members

    def add(self, parts: list[Broadcast], now: float) -> None:
        joiners = self.joiners
        for part in parts:
            self.outstanding.append(_Outstanding(part, self.cursor, self.lap, self.delivered, len(joiners), now))
        self.delivery = None
        if joiners:
            delivery = parts[0] if len(parts) == 1 else Run(parts)
            for joiner in joiners:
                joiner.deliver(delivery)


class Hub:
    """Topic -> local subscribers. A dispatched broadcast is delivered at the end of the event loop's
    current iteration, together with whatever else was dispatched meanwhile (concurrent publishes,
    a batch, a burst read from the broker): consecutive broadcasts on the same topic go out as one
    Run. Order is kept per topic: each subscriber gets a topic's broadcasts in dispatch order. A
    topic with more than `slice_size` subscribers is written by a `_Rotation`, a slice per turn."""

    def __init__(self, on_dispatched: Callable[[Broadcast, int], None] | None = None,
                 slice_size: int = SLICE) -> None:
        # topic -> subscriber -> its place in the topic's rotation's members (-1: a joiner, or no rotation;
        # a stale place once the rotation is over)
        self._topics: dict[str, dict[Subscriber, int]] = {}
        self._pending: list[Broadcast] = []
        self._rotations: dict[str, _Rotation] = {}
        self._advance_scheduled = False  # a call to _advance is scheduled
        self._on_dispatched = on_dispatched
        self._slice = slice_size
        # Hub.lag, worked out once per change of the rotations (a flush, a slice), however many publishes ask.
        self._changes = 0
        self._lag: tuple[int, float] = (-1, 0.0)

    def subscribe(self, topic: str, subscriber: Subscriber) -> bool:
        """Add a subscriber; True when it is the topic's first on this node."""
        subscribers = self._topics.get(topic)
        if subscribers is not None and subscriber in subscribers:
            return False
        rotation = self._rotations.get(topic)
        if rotation is not None:
            rotation.joiners[subscriber] = None
        if subscribers is None:
            self._topics[topic] = {subscriber: -1}
            return True
        subscribers[subscriber] = -1
        return False

    def unsubscribe(self, topic: str, subscriber: Subscriber) -> bool:
        """Remove a subscriber; True when the topic has no subscriber left on this node."""
        subscribers = self._topics.get(topic)
        if subscribers is None or subscriber not in subscribers:
            return False
        position = subscribers.pop(subscriber)
        rotation = self._rotations.get(topic)
        if rotation is not None:
            if position >= 0:
                rotation.members[position] = None
                rotation.dead += 1
            else:
                rotation.joiners.pop(subscriber, None)
        if subscribers:
            return False
        del self._topics[topic]
        return True

    def dispatch(self, broadcast: Broadcast) -> None:
        """Deliver to every local subscriber of the topic (those subscribed when the loop gets to it).
        A topic with none right now is skipped at once: one joining meanwhile has not had its reply."""
        if broadcast.topic not in self._topics:
            return
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append(broadcast)

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        self._changes += 1
        on_dispatched = self._on_dispatched
        start, end = 0, len(pending)
        while start < end:
            first = pending[start]
            topic = first.topic
            stop = start + 1
            while stop < end and pending[stop].topic == topic:
                stop += 1
            rotation = self._rotations.get(topic)
            subscribers = self._topics.get(topic)
            if rotation is not None:
                rotation.add(pending[start:stop], asyncio.get_running_loop().time())
            elif subscribers and len(subscribers) > self._slice:
                members = list(subscribers)
                for position, member in enumerate(members):
                    subscribers[member] = position
                rotation = self._rotations[topic] = _Rotation(members)  # type: ignore[arg-type]
                rotation.add(pending[start:stop], asyncio.get_running_loop().time())
            elif subscribers:
                delivery = first if stop - start == 1 else Run(pending[start:stop])
                for subscriber in subscribers:
                    subscriber.deliver(delivery)
                if on_dispatched is not None:
                    for index in range(start, stop):
                        on_dispatched(pending[index], len(subscribers))
            start = stop
        if self._rotations and not self._advance_scheduled:
            self._advance()

    def _advance(self) -> None:
        """One slice of every rotation; again next turn while any has outstanding broadcasts."""
        self._advance_scheduled = False
        self._changes += 1
        for topic, rotation in list(self._rotations.items()):
            if not self._write_slice(topic, rotation, self._slice):
                del self._rotations[topic]
        if self._rotations:
            self._advance_scheduled = True
            asyncio.get_running_loop().call_soon(self._advance)

    def _write_slice(self, topic: str, rotation: _Rotation, budget: int) -> bool:
        """Deliver to up to `budget` subscribers; False once nothing is outstanding (the rotation is over)."""
        members, outstanding = rotation.members, rotation.outstanding
        while outstanding:
            cursor, lap = rotation.cursor, rotation.lap
            while outstanding and outstanding[0].lap < lap and outstanding[0].position <= cursor:
                self._retire(rotation, outstanding.popleft())
            if not outstanding or budget <= 0:
                break
            delivery = rotation.delivery
            if delivery is None:
                parts = [entry.broadcast for entry in outstanding]
                delivery = rotation.delivery = parts[0] if len(parts) == 1 else Run(parts)
            head = outstanding[0]
            stop = min(len(members), cursor + budget, head.position if head.lap < lap else len(members))
            delivered = 0
            for index in range(cursor, stop):
                member = members[index]
                if member is not None:
                    member.deliver(delivery)
                    delivered += 1
            rotation.delivered += delivered
            budget -= stop - cursor
            rotation.cursor = stop
            if stop == len(members):
                self._wrap(topic, rotation)
                members = rotation.members
        return bool(outstanding)

    def _wrap(self, topic: str, rotation: _Rotation) -> None:
        """Back to the first subscriber for another pass. The Nones are dropped, and the positions of
        what is outstanding (all of it from the pass that ends) follow. The joiners become members
        at the end: the pass gets there only after all of that is retired, so they never get twice
        what they got as joiners."""
        rotation.cursor = 0
        rotation.lap += 1
        if not rotation.dead and not rotation.joiners:
            return
        subscribers = self._topics.get(topic, {})
        members = rotation.members
        if rotation.dead:
            entries, index = list(rotation.outstanding), 0
            members = []
            for position, member in enumerate(rotation.members):
                while index < len(entries) and entries[index].position <= position:
                    entries[index].position = len(members)
                    index += 1
                if member is not None:
                    subscribers[member] = len(members)
                    members.append(member)
            for entry in entries[index:]:
                entry.position = len(members)
            rotation.members, rotation.dead = members, 0
        for joiner in rotation.joiners:
            subscribers[joiner] = len(members)
            members.append(joiner)
        rotation.joiners = {}

    def _retire(self, rotation: _Rotation, entry: _Outstanding) -> None:
        rotation.delivery = None
        if self._on_dispatched is not None:
            self._on_dispatched(entry.broadcast, rotation.delivered - entry.delivered_before + entry.to_joiners)

    def finish(self) -> None:
        """Write everything dispatched so far, now, however big the topics: before the node closes
        sockets on purpose (drain, shutdown), so that what it accepted reaches them first."""
        if self._pending:
            self.flush()
        for topic, rotation in list(self._rotations.items()):
            self._write_slice(topic, rotation, sys.maxsize)
        self._rotations.clear()

    def lag(self) -> float:
        """Seconds from its dispatch until the oldest broadcast still outstanding will have reached its
        last subscriber, as its rotation goes now: the time it has waited, plus the writes left before it is
        retired at the pace its rotation has kept since it came (other rotations and publishes included)."""
        if not self._rotations:
            return 0.0
        changes, worst = self._lag
        if changes == self._changes:
            return worst
        now = asyncio.get_running_loop().time()
        worst = 0.0
        for rotation in self._rotations.values():
            if not rotation.outstanding:
                continue
            head = rotation.outstanding[0]
            waited = now - head.since
            left = head.position - rotation.cursor
            if head.lap == rotation.lap:  # it came during this pass: the rest of it, then the next up to it
                left += len(rotation.members)
            done = rotation.delivered - head.delivered_before
            # Nothing written yet: the pace is unknown, so count at least the time waited once more.
            expected = waited + (left * waited / done if done else waited)
            worst = max(worst, expected)
        self._lag = (self._changes, worst)
        return worst

    def rotating(self, topic: str) -> bool:
        """Whether a rotation is still writing `topic`: what is dispatched now waits for its pass."""
        return topic in self._rotations

    def subscriber_count(self, topic: str) -> int:
        return len(self._topics.get(topic, ()))

    def audience(self, broadcasts: Sequence[Broadcast]) -> int:
        """How many local deliveries these broadcasts make: the sum of their topics' subscriber counts."""
        topics = self._topics
        if len(broadcasts) == 1:  # most publishes: no list to build and sum
            return len(topics.get(broadcasts[0].topic, ()))
        return sum([len(topics.get(broadcast.topic, ())) for broadcast in broadcasts])

    def subscriber_counts(self) -> dict[str, int]:
        """Topic -> local subscribers, for every topic with any."""
        return {topic: len(subscribers) for topic, subscribers in self._topics.items()}

    @property
    def topic_count(self) -> int:
        return len(self._topics)
