"""The memory broker's history: the last PUSH_HISTORY_SIZE broadcasts of each topic for
PUSH_HISTORY_TTL, within PUSH_HISTORY_MAX_BYTES and PUSH_HISTORY_MAX_TOPICS in all (least recently
published topics go first).

Only a publish creates a topic's record: a join (client input) reads history and keeps nothing, so
joining any number of topic names costs no memory here. A topic without a record stands at seq 0
of the "quiet epoch", `<base><losses>`, and its first publish gives it that epoch: a client that saw
it empty recovers what came since, unless some topic's history was lost in between (an eviction, an
expiry), which moves the quiet epoch on, so a lost record's positions are never valid again.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

from push_service.history.window import recovery_window
from push_service.messages import Broadcast, Position, Recovery, new_epoch

ENTRY_OVERHEAD = 200  # bytes a stored broadcast costs beyond its payload and names (objects, deque slot)


class _Topic:
    __slots__ = ("epoch", "seq", "entries", "size")

    def __init__(self, epoch: str) -> None:
        self.epoch = epoch
        self.seq = 0
        self.entries: deque[tuple[float, Broadcast]] = deque()  # (stored at, broadcast)
        self.size = 0


class MemoryHistory:
    def __init__(self, size: int, ttl: float, max_bytes: int, on_evict: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, max_topics: int = 50_000) -> None:
        self._size = size
        self._ttl = ttl
        self._max_bytes = max_bytes
        self._max_topics = max_topics
        self._on_evict = on_evict or (lambda: None)
        self._clock = clock
        self._topics: OrderedDict[str, _Topic] = OrderedDict()  # least recently published first
        self._base = new_epoch()  # a restart loses everything: new epochs
        self._losses = 0  # topics whose record was dropped (evicted or expired)
        self._quiet_epoch = self._base + "0"
        self.bytes = 0

    def append(self, broadcast: Broadcast) -> None:
        """Give the broadcast its position and keep it."""
        name = broadcast.topic
        topic = self._topics.get(name)
        if topic is None:
            topic = self._topics[name] = _Topic(self._quiet_epoch)
        else:
            self._topics.move_to_end(name)
        topic.seq += 1
        broadcast.position = Position(topic.epoch, topic.seq)
        cost = len(broadcast.payload_json) + len(name) + len(broadcast.event) + ENTRY_OVERHEAD
        now = self._clock()
        topic.entries.append((now, broadcast))
        topic.size += cost
        self.bytes += cost
        while len(topic.entries) > self._size:
            self._drop_oldest(topic)
        self._expire(topic)
        self._drop_expired_topics(now)
        while (self.bytes > self._max_bytes or len(self._topics) > self._max_topics) and len(self._topics) > 1:
            self._drop_oldest_topic()
            self._on_evict()

    def recover(self, name: str, since: Position | None, limit: int | None = None) -> Recovery:
        """Everything after `since` (or all that is kept, without it), at most `limit` messages."""
        topic = self._topics.get(name)
        if topic is None:
            quiet = Position(self._quiet_epoch, 0)
            return Recovery(quiet, since is None or since == quiet)
        self._expire(topic)
        kept = [broadcast for _, broadcast in topic.entries]
        if since is not None:
            kept = [broadcast for broadcast in kept if broadcast.position.seq > since.seq]  # type: ignore[union-attr]
        return recovery_window(Position(topic.epoch, topic.seq), since, kept, limit)

    def _expire(self, topic: _Topic) -> None:
        deadline = self._clock() - self._ttl
        while topic.entries and topic.entries[0][0] < deadline:
            self._drop_oldest(topic)

    def _drop_oldest(self, topic: _Topic) -> None:
        _, broadcast = topic.entries.popleft()
        cost = len(broadcast.payload_json) + len(broadcast.topic) + len(broadcast.event) + ENTRY_OVERHEAD
        topic.size -= cost
        self.bytes -= cost

    def _drop_expired_topics(self, now: float) -> None:
        """Reclaim the records whose every broadcast expired, least recently published first: the first
        one still holding an unexpired broadcast ends the search, so this is cheap on every append."""
        deadline = now - self._ttl
        topics = self._topics
        while topics:
            topic = next(iter(topics.values()))
            if topic.entries and topic.entries[-1][0] >= deadline:
                return
            self._drop_oldest_topic()

    def _drop_oldest_topic(self) -> None:
        # The whole topic goes, counter and all, and the quiet epoch moves on: a later publish starts
        # it in an epoch never seen, so a client holding an old position is told recovered: false
        # rather than handed a silent gap.
        _, topic = self._topics.popitem(last=False)
        self.bytes -= topic.size
        self._losses += 1
        self._quiet_epoch = f"{self._base}{self._losses}"

    @property
    def topic_count(self) -> int:
        return len(self._topics)
