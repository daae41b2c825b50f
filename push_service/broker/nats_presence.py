"""NATS presence: JetStream key-value buckets, one for presence entries and one for node heartbeats."""

from __future__ import annotations

import base64
import contextlib
import logging
from collections.abc import Callable

from nats.aio.client import Client  # installed: only broker/nats.py, which checks, imports this module
from nats.errors import Error as NatsError
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from push_service.presence.replicated import PresenceStore

log = logging.getLogger("push_service.broker")

PRESENCE_BUCKET = "push_presence"
NODES_BUCKET = "push_nodes"


class NatsPresenceStore(PresenceStore):
    """JetStream key-value: bucket push_presence (key `<base64url topic>.<conn id>` -> [key, meta]) and
    bucket push_nodes (node heartbeats, expired by the bucket's TTL)."""

    def __init__(self, client: Callable[[], Client], node_timeout: float, command_timeout: float) -> None:
        self._client = client
        self._command_timeout = command_timeout
        self._ttl = max(1.0, node_timeout * 2 / 3)
        self._presence: KeyValue | None = None
        self._nodes: KeyValue | None = None

    async def _buckets(self) -> tuple[KeyValue, KeyValue]:
        if self._presence is None or self._nodes is None:
            js = self._client().jetstream(timeout=self._command_timeout)
            self._presence = await self._bucket(js, PRESENCE_BUCKET, ttl=0)
            self._nodes = await self._bucket(js, NODES_BUCKET, ttl=self._ttl)
        return self._presence, self._nodes

    @staticmethod
    async def _bucket(js: JetStreamContext, name: str, ttl: float) -> KeyValue:
        try:
            bucket = await js.key_value(name)
        except BucketNotFoundError:
            return await js.create_key_value(bucket=name, history=1, ttl=ttl or None)
        if ttl:
            # The bucket keeps the TTL of whoever created it: a node started since with another
            # PUSH_NODE_TIMEOUT would see live nodes' heartbeats expire early (or dead ones late).
            try:
                config = (await js.stream_info(f"KV_{name}")).config
                if config.max_age is None or abs(config.max_age - ttl) > 0.001:
                    # As create_key_value: the duplicates window may not exceed max_age.
                    await js.update_stream(config.evolve(max_age=ttl, duplicate_window=min(ttl, 120.0)))
                    log.info("node heartbeat ttl changed", extra={"event": "presence_ttl_changed", "bucket": name,
                                                                  "old": config.max_age, "new": ttl})
            except NatsError as exc:  # e.g. not allowed to update streams: keep the bucket as it is
                log.warning("cannot set the node heartbeat ttl", extra={
                    "event": "presence_ttl_unchanged", "bucket": name, "error": f"{type(exc).__name__}: {exc}"})
        return bucket

    @staticmethod
    def _prefix(topic: str) -> str:
        return base64.urlsafe_b64encode(topic.encode()).decode().rstrip("=") + "."

    async def put(self, topic: str, conn_id: str, value: bytes) -> None:
        presence, _ = await self._buckets()
        await presence.put(self._prefix(topic) + conn_id, value)

    async def delete(self, topic: str, conn_id: str) -> None:
        presence, _ = await self._buckets()
        await presence.purge(self._prefix(topic) + conn_id)

    async def load(self, topic: str) -> dict[str, bytes]:
        presence, _ = await self._buckets()
        prefix = self._prefix(topic)
        watcher = await presence.watch(prefix + ">", ignore_deletes=True)
        entries: dict[str, bytes] = {}
        try:
            while True:
                entry = await watcher.updates(timeout=self._command_timeout)
                if entry is None:  # the end of the current values
                    break
                if entry.value:
                    entries[entry.key[len(prefix):]] = entry.value
        finally:
            await watcher.stop()
        return entries

    async def heartbeat(self, node_id: str) -> None:
        _, nodes = await self._buckets()
        await nodes.put(node_id, b"1")

    async def alive(self, node_ids: set[str]) -> set[str]:
        _, nodes = await self._buckets()
        alive = set()
        for node_id in node_ids:
            with contextlib.suppress(KeyNotFoundError):
                entry = await nodes.get(node_id)
                if entry.value:
                    alive.add(node_id)
        return alive

    async def forget_node(self, node_id: str) -> None:
        _, nodes = await self._buckets()
        await nodes.purge(node_id)
