"""Cluster-wide presence: every node keeps a replica of the topics it serves.

Entries are stored per topic, keyed by connection id (`<node id>.<n>`), in a PresenceStore
(Redis hashes, or NATS JetStream key-value). Each change is written to the store, then signalled
over the broker on the topic's channel; other nodes apply the signal to their replica and send
their local subscribers the diff. A node refreshes a heartbeat key; when it stops (killed, cut
off), the survivors drop its entries and send the leaves within PUSH_NODE_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from push_service.presence.base import (Diff, DiffCallback, Entry, Meta, Metas, PresenceUnavailable, Tracker, grouped,
                                        pop_entry, tracked_meta, updated_meta)

log = logging.getLogger("push_service.presence")

READ_TIMEOUT = 5.0  # at least this long for a read of a topic this node follows no replica of


def node_of(conn_id: str) -> str:
    return conn_id.split(".", 1)[0]


class PresenceStore(ABC):
    """Where cluster presence lives between nodes."""

    @abstractmethod
    async def put(self, topic: str, conn_id: str, value: bytes) -> None: ...

    @abstractmethod
    async def delete(self, topic: str, conn_id: str) -> None: ...

    @abstractmethod
    async def load(self, topic: str) -> dict[str, bytes]:
        """conn_id -> value for every entry of the topic."""

    @abstractmethod
    async def heartbeat(self, node_id: str) -> None:
        """Mark this node alive for another PUSH_NODE_TIMEOUT."""

    @abstractmethod
    async def alive(self, node_ids: set[str]) -> set[str]:
        """Which of these nodes refreshed their heartbeat in time."""

    @abstractmethod
    async def forget_node(self, node_id: str) -> None:
        """This node is leaving: drop its heartbeat."""


class ReplicatedTracker(Tracker):
    def __init__(self, node_id: str, on_diff: DiffCallback, store: PresenceStore,
                 send_signal: Callable[[str, bytes], Awaitable[None]], node_timeout: float) -> None:
        super().__init__(node_id, on_diff)
        self._store = store
        self._send_signal = send_signal
        self._node_timeout = node_timeout
        self._replicas: dict[str, dict[str, Entry]] = {}  # topic -> conn_id -> entry, all nodes
        self._local: dict[str, dict[str, Entry]] = {}     # topic -> conn_id -> entry, this node's
        self._loading: dict[str, list[bytes]] = {}        # signals that arrived while loading a topic
        self._writes: asyncio.Queue[tuple[str, str, bytes | None, bytes]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._size = 0
        self._heartbeat_failing = False

    # --- lifecycle

    async def start(self) -> None:
        try:
            await self._store.heartbeat(self.node_id)
        except Exception as exc:  # the broker is not there yet: the liveness loop keeps trying
            self._heartbeat_failed(exc)
        self._tasks = [asyncio.create_task(self._write_loop(), name="presence-writer"),
                       asyncio.create_task(self._liveness_loop(), name="presence-liveness")]

    async def close(self) -> None:
        for topic, entries in list(self._local.items()):
            for conn_id in list(entries):
                self.untrack(topic, conn_id)
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await asyncio.wait_for(self._writes.join(), 2.0)
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._store.forget_node(self.node_id), 2.0)

    # --- Tracker interface (synchronous against the local replica)

    def track(self, topic: str, conn_id: str, key: str, meta: Meta) -> Meta:
        self.untrack(topic, conn_id)
        meta = tracked_meta(meta)
        self._set(topic, conn_id, (key, meta), previous=None)
        return meta

    def update(self, topic: str, conn_id: str, changes: Meta) -> Meta | None:
        entry = self._local.get(topic, {}).get(conn_id)
        if entry is None:
            return None
        key, old = entry
        new = updated_meta(old, changes)
        self._set(topic, conn_id, (key, new), previous=old)
        return new

    def untrack(self, topic: str, conn_id: str) -> None:
        entry = pop_entry(self._local, topic, conn_id)
        if entry is None:
            return
        key, meta = entry
        self._size -= 1
        replica = self._replicas.get(topic)
        if replica is not None:
            replica.pop(conn_id, None)
        diff = Diff()
        diff.add_leave(key, meta)
        self._on_diff(topic, diff)
        self._writes.put_nowait((topic, conn_id, None, orjson.dumps({"del": conn_id, "key": key, "meta": meta})))

    def list(self, topic: str) -> Metas:
        entries = self._replicas.get(topic)
        if entries is None:
            entries = self._local.get(topic, {})
        return grouped(entries.values())

    async def cluster_list(self, topic: str) -> Metas:
        if topic in self._replicas and topic not in self._loading:
            return self.list(topic)
        # No local subscriber, so no replica that signals keep current: read the store.
        try:
            entries = await asyncio.wait_for(self._read(topic), max(self._node_timeout, READ_TIMEOUT))
        except Exception as exc:
            log.warning("presence read failed", extra={"event": "presence_read_failed", "topic": topic,
                                                       "error": f"{type(exc).__name__}: {exc}"})
            raise PresenceUnavailable(f"{type(exc).__name__} reading presence of {topic}") from None
        entries.update(self._local.get(topic, {}))
        return grouped(entries.values())

    @property
    def size(self) -> int:
        return self._size

    @property
    def topic_count(self) -> int:
        return len(self._local)

    def _set(self, topic: str, conn_id: str, entry: Entry, previous: Meta | None) -> None:
        local = self._local.setdefault(topic, {})
        if conn_id not in local:
            self._size += 1
        local[conn_id] = entry
        self._replicas.setdefault(topic, {})[conn_id] = entry
        key, meta = entry
        diff = Diff()
        diff.add_join(key, meta)
        if previous is not None:
            diff.add_leave(key, previous)
        self._on_diff(topic, diff)
        value = orjson.dumps([key, meta])
        self._writes.put_nowait((topic, conn_id, value, orjson.dumps({"put": conn_id, "key": key, "meta": meta})))

    # --- replicas

    def needs_load(self, topic: str) -> bool:
        return topic not in self._replicas

    async def load(self, topic: str) -> None:
        # The topic's subscription is already in place: signals from now on are kept and replayed.
        self._loading[topic] = []
        try:
            replica = await self._read(topic)
        except BaseException:
            self._loading.pop(topic, None)
            raise
        replica.update(self._local.get(topic, {}))
        self._replicas[topic] = replica
        for data in self._loading.pop(topic, ()):
            self._apply(topic, data)

    async def resync(self, topic: str) -> None:
        # Re-write our entries (the store may have lost them), re-read everyone's, send what changed.
        for conn_id, (key, meta) in list(self._local.get(topic, {}).items()):
            self._writes.put_nowait((topic, conn_id, orjson.dumps([key, meta]),
                                     orjson.dumps({"put": conn_id, "key": key, "meta": meta})))
        if topic not in self._replicas:
            return
        fresh = await self._read(topic)
        fresh.update(self._local.get(topic, {}))
        current = self._replicas.get(topic)
        if current is None:
            return
        diff = Diff()
        for conn_id, (key, meta) in current.items():
            if fresh.get(conn_id, (None, {}))[1].get("phx_ref") != meta["phx_ref"]:
                diff.add_leave(key, meta)
        for conn_id, (key, meta) in fresh.items():
            if current.get(conn_id, (None, {}))[1].get("phx_ref") != meta["phx_ref"]:
                diff.add_join(key, meta)
        self._replicas[topic] = fresh
        if diff:
            self._on_diff(topic, diff)

    def drop_replica(self, topic: str) -> None:
        self._replicas.pop(topic, None)

    async def _read(self, topic: str) -> dict[str, Entry]:
        raw = await self._store.load(topic)
        entries: dict[str, Entry] = {}
        for conn_id, value in raw.items():
            try:
                key, meta = orjson.loads(value)
            except (orjson.JSONDecodeError, ValueError, TypeError):
                continue
            entries[conn_id] = (key, meta)
        alive = await self._store.alive({node_of(conn_id) for conn_id in entries} - {self.node_id})
        alive.add(self.node_id)
        dead = [conn_id for conn_id in entries if node_of(conn_id) not in alive]
        for conn_id in dead:
            del entries[conn_id]
            await self._store.delete(topic, conn_id)
        return {conn_id: entry for conn_id, entry in entries.items() if node_of(conn_id) != self.node_id}

    # --- other nodes' changes

    def signal(self, topic: str, data: bytes) -> None:
        loading = self._loading.get(topic)
        if loading is not None:
            loading.append(data)
        elif topic in self._replicas:
            self._apply(topic, data)

    def _apply(self, topic: str, data: bytes) -> None:
        replica = self._replicas.get(topic)
        if replica is None:
            return
        try:
            change: dict[str, Any] = orjson.loads(data)
            conn_id = change.get("put") or change["del"]
            key, meta = change["key"], change["meta"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("bad presence signal", extra={"event": "bad_presence_signal", "topic": topic})
            return
        if node_of(conn_id) == self.node_id:
            return
        current = replica.get(conn_id)
        diff = Diff()
        if "put" in change:
            if current is not None and current[1].get("phx_ref") == meta.get("phx_ref"):
                return  # already applied (seen in a load)
            replica[conn_id] = (key, meta)
            diff.add_join(key, meta)
            if current is not None:
                diff.add_leave(current[0], current[1])
        else:
            if current is None:
                return
            del replica[conn_id]
            diff.add_leave(current[0], current[1])
        self._on_diff(topic, diff)

    # --- background work

    async def _write_loop(self) -> None:
        while True:
            topic, conn_id, value, signal = await self._writes.get()
            try:
                if value is None:
                    await self._store.delete(topic, conn_id)
                else:
                    await self._store.put(topic, conn_id, value)
                await self._send_signal(topic, signal)
            except Exception as exc:  # the broker is down: resync() re-writes after reconnecting
                log.warning("presence write failed", extra={"event": "presence_write_failed", "topic": topic,
                                                            "error": type(exc).__name__})
            finally:
                self._writes.task_done()

    async def _liveness_loop(self) -> None:
        period = self._node_timeout / 4
        while True:
            await asyncio.sleep(period)
            try:
                await self._store.heartbeat(self.node_id)
                await self._expire_dead_nodes()
            except Exception as exc:
                self._heartbeat_failed(exc)
            else:
                self._heartbeat_failing = False

    def _heartbeat_failed(self, exc: Exception) -> None:
        # Once per outage, as the broker's own broker_down line: not one warning every few seconds.
        if not self._heartbeat_failing:
            self._heartbeat_failing = True
            log.warning("presence heartbeat failed", extra={"event": "presence_heartbeat_failed",
                                                            "error": type(exc).__name__})

    async def _expire_dead_nodes(self) -> None:
        others = {node_of(conn_id) for replica in self._replicas.values() for conn_id in replica} - {self.node_id}
        if not others:
            return
        dead = others - await self._store.alive(others)
        if not dead:
            return
        log.info("nodes gone", extra={"event": "nodes_gone", "nodes": sorted(dead)})
        removed: list[tuple[str, str]] = []
        for topic, replica in self._replicas.items():
            diff = Diff()
            for conn_id in [conn_id for conn_id in replica if node_of(conn_id) in dead]:
                key, meta = replica.pop(conn_id)
                diff.add_leave(key, meta)
                removed.append((topic, conn_id))
            if diff:
                self._on_diff(topic, diff)
        for topic, conn_id in removed:  # any survivor may clean up; deleting twice is harmless
            await self._store.delete(topic, conn_id)
