"""Batch presence diffs per topic so a crowd joining at once costs a few frames, not N^2."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from push_service.presence.base import Diff

# A diff waits for a busy topic at most this many intervals (1 s at the default 50 ms): a topic that
# is never done being written still gets its presence news.
MAX_WAITS = 20

class DiffBatcher:
    """Collects diffs per topic and flushes each topic's merged diff after `interval` seconds, or
    later while `busy(topic)`: while the hub is still writing the topic's previous broadcast to a
    crowd, more joins and leaves merge into the next diff instead of making diffs of their own.

    A merged diff is exact for every receiver: each phx_ref joins at most once and leaves at most
    once, and clients apply joins before leaves, so a receiver whose presence_state was taken in
    the middle of the window still ends up with the right set.
    """

    def __init__(self, interval: float, flush: Callable[[str, Diff], None],
                 busy: Callable[[str], bool] = lambda topic: False) -> None:
        self._interval = interval
        self._flush = flush
        self._busy = busy
        self._pending: dict[str, Diff] = {}
        self._waits: dict[str, int] = {}  # topic -> intervals its diff has waited for it
        self._timer: asyncio.TimerHandle | None = None

    def add(self, topic: str, diff: Diff) -> None:
        pending = self._pending.get(topic)
        if pending is None:
            self._pending[topic] = diff
        else:
            pending.merge(diff)
        if self._timer is None:
            if self._interval <= 0:
                self.flush()
                return
            self._timer = asyncio.get_running_loop().call_later(self._interval, self.flush)

    def flush(self, wait_for_busy: bool = True) -> None:
        self._timer = None
        pending, self._pending = self._pending, {}
        for topic, diff in pending.items():
            if not diff:
                continue
            waits = self._waits.get(topic, 0)
            if wait_for_busy and self._interval > 0 and waits < MAX_WAITS and self._busy(topic):
                self._pending[topic] = diff
                self._waits[topic] = waits + 1
            else:
                self._waits.pop(topic, None)
                self._flush(topic, diff)
        if self._pending and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval, self.flush)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush(wait_for_busy=False)
