"""The memory broker's history: the last PUSH_HISTORY_SIZE broadcasts of each topic for
PUSH_HISTORY_TTL, within PUSH_HISTORY_MAX_BYTES in all (least recently published topics go first)."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

from push_service.history.position import Position, Recovery, new_epoch
from push_service.hub import Broadcast

ENTRY_OVERHEAD = 200  # bytes a stored broadcast costs beyond its payload and names (objects, deque slot)


class _Topic:
    __slots__ = ("epoch", "seq", "entries", "size")

    def __init__(self) -> None:
        self.epoch = new_epoch()
        self.seq = 0
        self.entries: deque[tuple[float, Broadcast]] = deque()  # (stored at, broadcast)
        self.size = 0


class MemoryHistory:
    def __init__(self, size: int, ttl: float, max_bytes: int, on_evict: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._size = size
        self._ttl = ttl
        self._max_bytes = max_bytes
        self._on_evict = on_evict or (lambda: None)
        self._clock = clock
        self._topics: OrderedDict[str, _Topic] = OrderedDict()  # least recently published first
        self.bytes = 0

    def _topic(self, name: str) -> _Topic:
        topic = self._topics.get(name)
        if topic is None:
            topic = self._topics[name] = _Topic()
        return topic

    def append(self, broadcast: Broadcast) -> None:
        """Give the broadcast its position and keep it."""
        topic = self._topic(broadcast.topic)
        self._topics.move_to_end(broadcast.topic)
        topic.seq += 1
        broadcast.position = Position(topic.epoch, topic.seq)
        cost = len(broadcast.payload_json) + len(broadcast.topic) + len(broadcast.event) + ENTRY_OVERHEAD
        topic.entries.append((self._clock(), broadcast))
        topic.size += cost
        self.bytes += cost
        while len(topic.entries) > self._size:
            self._drop_oldest(topic)
        self._expire(topic)
        while self.bytes > self._max_bytes and len(self._topics) > 1:
            self._evict_oldest_topic()

    def recover(self, name: str, since: Position | None, limit: int | None = None) -> Recovery:
        """Everything after `since` (or all that is kept, without it), at most `limit` messages."""
        topic = self._topic(name)
        self._expire(topic)
        current = Position(topic.epoch, topic.seq)
        kept = [broadcast for _, broadcast in topic.entries]
        if since is None:
            return Recovery(current, True, kept[-limit:] if limit else kept)
        if since.epoch != topic.epoch or since.seq > topic.seq:
            return Recovery(current, False)
        missed = [broadcast for broadcast in kept if broadcast.position.seq > since.seq]  # type: ignore[union-attr]
        complete = topic.seq - since.seq == len(missed)
        if limit is not None and len(missed) > limit:
            # The first `limit` of what was missed; none when the oldest of it is no longer kept.
            return Recovery(current, False, missed[:limit] if complete else [])
        return Recovery(current, complete, missed if complete else [])

    def _expire(self, topic: _Topic) -> None:
        deadline = self._clock() - self._ttl
        while topic.entries and topic.entries[0][0] < deadline:
            self._drop_oldest(topic)

    def _drop_oldest(self, topic: _Topic) -> None:
        _, broadcast = topic.entries.popleft()
        cost = len(broadcast.payload_json) + len(broadcast.topic) + len(broadcast.event) + ENTRY_OVERHEAD
        topic.size -= cost
        self.bytes -= cost

    def _evict_oldest_topic(self) -> None:
        # The whole topic goes, counter and all: a later publish starts a new epoch, so a client
        # holding an old position is told recovered: false rather than handed a silent gap.
        _, topic = self._topics.popitem(last=False)
        self.bytes -= topic.size
        self._on_evict()

    @property
    def topic_count(self) -> int:
        return len(self._topics)
