"""The presence tracker interface.

Calls are synchronous against this node's view of presence (as Phoenix.Tracker keeps a local
replica), so a session can answer a join with `presence_state` at once; a replicated tracker
propagates changes to other nodes in the background and reports theirs through `on_diff`.
Entries are keyed by node and connection so a dead node's entries can be expired as a whole.
"""

from __future__ import annotations

import base64
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from push_service.errors import BrokerError

Meta = dict[str, Any]
Metas = dict[str, list[Meta]]  # presence key -> its metas (one per tracked connection)
Entry = tuple[str, Meta]  # a tracked connection's (presence key, meta)


def new_phx_ref() -> str:
    """A 16-character unique ref, shaped like Phoenix's (time in ns, then randomness)."""
    return base64.urlsafe_b64encode(time.time_ns().to_bytes(8, "big") + os.urandom(4)).decode()


def tracked_meta(meta: Meta) -> Meta:
    """A meta as tracked: with a fresh `phx_ref`."""
    return {**meta, "phx_ref": new_phx_ref()}


def updated_meta(old: Meta, changes: Meta) -> Meta:
    """`changes` merged into a tracked meta, with a fresh `phx_ref` and the old one as `phx_ref_prev` (as Phoenix)."""
    return {**old, **changes, "phx_ref": new_phx_ref(), "phx_ref_prev": old["phx_ref"]}


def grouped(entries: Iterable[Entry]) -> Metas:
    """Entries grouped by presence key, in their order."""
    metas: Metas = {}
    for key, meta in entries:
        metas.setdefault(key, []).append(meta)
    return metas


def pop_entry(topics: dict[str, dict[str, Entry]], topic: str, conn_id: str) -> Entry | None:
    """Take a connection's entry out of topic -> conn_id -> entry, and the topic with its last entry."""
    entries = topics.get(topic)
    if not entries or conn_id not in entries:
        return None
    entry = entries.pop(conn_id)
    if not entries:
        del topics[topic]
    return entry


@dataclass(slots=True)
class Diff:
    """Joins and leaves on one topic; clients apply joins first, then leaves."""

    joins: Metas = field(default_factory=dict)
    leaves: Metas = field(default_factory=dict)

    def add_join(self, key: str, meta: Meta) -> None:
        self.joins.setdefault(key, []).append(meta)

    def add_leave(self, key: str, meta: Meta) -> None:
        self.leaves.setdefault(key, []).append(meta)

    def merge(self, other: Diff) -> None:
        for key, metas in other.joins.items():
            self.joins.setdefault(key, []).extend(metas)
        for key, metas in other.leaves.items():
            self.leaves.setdefault(key, []).extend(metas)

    def __bool__(self) -> bool:
        return bool(self.joins or self.leaves)

    def payload(self) -> dict[str, Any]:
        """The `presence_diff` payload: {"joins": {key: {"metas": [...]}}, "leaves": {...}}."""
        return {"joins": {key: {"metas": metas} for key, metas in self.joins.items()},
                "leaves": {key: {"metas": metas} for key, metas in self.leaves.items()}}


def state_payload(metas: Metas) -> dict[str, Any]:
    """The `presence_state` payload: {key: {"metas": [...]}}."""
    return {key: {"metas": list(entries)} for key, entries in metas.items()}


DiffCallback = Callable[[str, Diff], None]


class PresenceUnavailable(BrokerError):
    """The cluster's presence could not be read (the broker is away or too slow)."""


class Tracker(ABC):
    """Tracks (topic, connection) -> (key, meta) and reports every change as a Diff."""

    def __init__(self, node_id: str, on_diff: DiffCallback) -> None:
        self.node_id = node_id
        self._on_diff = on_diff

    async def start(self) -> None:  # noqa: B027 - a no-op for the in-memory tracker
        """Connect and begin replicating (and expiring entries of nodes that stopped refreshing)."""

    async def close(self) -> None:  # noqa: B027
        """Withdraw this node's entries and disconnect."""

    # Replication hooks: a single-node tracker has nothing to load, resync or hear.

    def needs_load(self, topic: str) -> bool:
        """Whether this node must read the topic's cluster-wide presence before serving it."""
        return False

    async def load(self, topic: str) -> None:  # noqa: B027
        """Read the topic's presence from the other nodes."""

    async def resync(self, topic: str) -> None:  # noqa: B027
        """After a broker outage, reconcile the topic's presence and report the differences."""

    def drop_replica(self, topic: str) -> None:  # noqa: B027
        """No local subscriber is left on the topic: stop following it."""

    def signal(self, topic: str, data: bytes) -> None:  # noqa: B027
        """A presence change from another node."""

    @abstractmethod
    def track(self, topic: str, conn_id: str, key: str, meta: Meta) -> Meta:
        """Add a connection under `key`; returns its meta with a fresh `phx_ref`."""

    @abstractmethod
    def update(self, topic: str, conn_id: str, changes: Meta) -> Meta | None:
        """Merge `changes` into the connection's meta (new `phx_ref`, `phx_ref_prev` = old); None if untracked."""

    @abstractmethod
    def untrack(self, topic: str, conn_id: str) -> None:
        """Remove a connection's entry, if any."""

    @abstractmethod
    def list(self, topic: str) -> Metas:
        """Everyone present on a topic, as this node's view has it."""

    async def cluster_list(self, topic: str) -> Metas:
        """Everyone present on a topic across the cluster, also where this node follows no replica of
        it; PresenceUnavailable if that cannot be read."""
        return self.list(topic)

    @property
    @abstractmethod
    def size(self) -> int:
        """Tracked entries (connections x topics) on this node's view."""

    @property
    @abstractmethod
    def topic_count(self) -> int:
        """Topics with at least one connection of this node tracked."""
