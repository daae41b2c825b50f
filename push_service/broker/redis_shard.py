"""One master of a Redis Cluster as the cluster broker (redis_cluster.py) holds it: a publish connection and
a sharded-subscribe connection of our own (redis_connection.py), kept up with capped backoff for as long as
the master is in the slot map, and the topics subscribed on it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from push_service.broker.backoff import Backoff
from push_service.broker.redis_connection import COMMAND_TIMEOUT, Endpoint, RedisConnection, hold
from push_service.broker.redis_shared import PublishScript

log = logging.getLogger("push_service.broker")


def seen(future: asyncio.Future[Any]) -> None:
    """Retrieve a reply nobody may await (a batch gave up at an earlier failure), so asyncio does not warn."""
    if not future.cancelled():
        future.exception()


class Shard:
    """`on_push(shard, reply)` gets what the subscriber connection brings; `on_change(shard)` is called when
    both connections are up (`up`) and again when they are lost."""

    def __init__(self, where: Endpoint, node_id: str, script: PublishScript | None,
                 on_push: Callable[[Shard, Any], None], on_change: Callable[[Shard], None]) -> None:
        self.where = where
        self.label = f"{where.host}:{where.port}"
        self._node_id = node_id
        self._script = script
        self._on_push = on_push
        self._on_change = on_change
        self.publisher: RedisConnection | None = None
        self.subscriber: RedisConnection | None = None
        self.topics: set[str] = set()       # SSUBSCRIBE sent on this subscriber connection
        self.unconfirmed: set[str] = set()  # of those, not acknowledged yet
        self.last_pong = 0.0
        self._task = asyncio.create_task(self._keep(), name=f"redis-cluster-{self.label}")

    @property
    def up(self) -> bool:
        return self.publisher is not None

    def load_script(self, publisher: RedisConnection) -> asyncio.Future[Any]:
        assert self._script is not None
        loaded = publisher.call([("SCRIPT", "LOAD", self._script.text)])
        loaded.add_done_callback(seen)
        return loaded

    async def stop(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    async def _keep(self) -> None:
        backoff = Backoff()
        while True:
            try:
                await self._serve()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection refused, reset, timed out...
                if self.up or backoff.fresh:
                    log.warning("redis cluster shard unavailable", extra={
                        "event": "broker_down", "broker": self.label, "error": f"{type(exc).__name__}: {exc}"})
            finally:
                was_up = self.up
                self.publisher = self.subscriber = None
                self.topics.clear()
                self.unconfirmed.clear()
                self._on_change(self)
            if was_up:
                backoff.reset()  # it was up: this is a new outage, retry quickly first
            await asyncio.sleep(backoff.next())

    async def _serve(self) -> None:
        name = f"push-{self._node_id}"
        subscriber = publisher = None
        try:
            subscriber = await RedisConnection.open(self.where, COMMAND_TIMEOUT, lambda reply: self._on_push(self, reply),
                                                    name=f"{name}-ssub")
            publisher = await RedisConnection.open(self.where, COMMAND_TIMEOUT, name=f"{name}-pub")
            if self._script is not None:
                await asyncio.wait_for(self.load_script(publisher), COMMAND_TIMEOUT)
            # Our node channel first: it makes the connection a pub/sub one, which answers pings as pushes.
            subscriber.send("SUBSCRIBE", f"push:n:{self._node_id}")
            self.last_pong = time.monotonic()
            self.subscriber, self.publisher = subscriber, publisher
            self._on_change(self)
            log.info("redis cluster shard connected", extra={"event": "broker_up", "broker": self.label,
                                                             "topics": len(self.topics)})
            await hold(subscriber, publisher, lambda: self.last_pong)
        finally:
            for connection in (subscriber, publisher):
                if connection is not None:
                    connection.close()
