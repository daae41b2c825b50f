"""The single-node tracker: a dict, with every change reported at once."""

from __future__ import annotations

from push_service.presence.base import (Diff, DiffCallback, Entry, Meta, Metas, Tracker, grouped, pop_entry,
                                        tracked_meta, updated_meta)


class MemoryTracker(Tracker):
    def __init__(self, node_id: str, on_diff: DiffCallback) -> None:
        super().__init__(node_id, on_diff)
        # topic -> conn_id -> (key, meta); dicts keep insertion order, so lists are stable.
        self._topics: dict[str, dict[str, Entry]] = {}
        self._size = 0

    def track(self, topic: str, conn_id: str, key: str, meta: Meta) -> Meta:
        self.untrack(topic, conn_id)
        meta = tracked_meta(meta)
        self._topics.setdefault(topic, {})[conn_id] = (key, meta)
        self._size += 1
        diff = Diff()
        diff.add_join(key, meta)
        self._on_diff(topic, diff)
        return meta

    def update(self, topic: str, conn_id: str, changes: Meta) -> Meta | None:
        entries = self._topics.get(topic)
        entry = entries.get(conn_id) if entries else None
        if entries is None or entry is None:
            return None
        key, old = entry
        new = updated_meta(old, changes)
        entries[conn_id] = (key, new)
        diff = Diff()
        diff.add_join(key, new)
        diff.add_leave(key, old)
        self._on_diff(topic, diff)
        return new

    def untrack(self, topic: str, conn_id: str) -> None:
        entry = pop_entry(self._topics, topic, conn_id)
        if entry is None:
            return
        key, meta = entry
        self._size -= 1
        diff = Diff()
        diff.add_leave(key, meta)
        self._on_diff(topic, diff)

    def list(self, topic: str) -> Metas:
        return grouped(self._topics.get(topic, {}).values())

    @property
    def size(self) -> int:
        return self._size

    @property
    def topic_count(self) -> int:
        return len(self._topics)
