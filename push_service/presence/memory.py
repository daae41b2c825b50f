"""The single-node tracker: a dict, with every change reported at once."""

from __future__ import annotations

from push_service.presence.base import Diff, Meta, Metas, Tracker, new_phx_ref


class MemoryTracker(Tracker):
    def __init__(self, node_id: str, on_diff) -> None:  # type: ignore[no-untyped-def]
        super().__init__(node_id, on_diff)
        # topic -> conn_id -> (key, meta); dicts keep insertion order, so lists are stable.
        self._topics: dict[str, dict[str, tuple[str, Meta]]] = {}
        self._size = 0

    def track(self, topic: str, conn_id: str, key: str, meta: Meta) -> Meta:
        self.untrack(topic, conn_id)
        meta = {**meta, "phx_ref": new_phx_ref()}
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
        new = {**old, **changes, "phx_ref": new_phx_ref(), "phx_ref_prev": old["phx_ref"]}
        entries[conn_id] = (key, new)
        diff = Diff()
        diff.add_join(key, new)
        diff.add_leave(key, old)
        self._on_diff(topic, diff)
        return new

    def untrack(self, topic: str, conn_id: str) -> None:
        entries = self._topics.get(topic)
        if not entries or conn_id not in entries:
            return
        key, meta = entries.pop(conn_id)
        if not entries:
            del self._topics[topic]
        self._size -= 1
        diff = Diff()
        diff.add_leave(key, meta)
        self._on_diff(topic, diff)

    def list(self, topic: str) -> Metas:
        metas: Metas = {}
        for key, meta in self._topics.get(topic, {}).values():
            metas.setdefault(key, []).append(meta)
        return metas

    @property
    def size(self) -> int:
        return self._size

    @property
    def topic_count(self) -> int:
        return len(self._topics)
