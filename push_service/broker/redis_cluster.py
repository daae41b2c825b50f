"""Redis Cluster broker (`redis+cluster://host:port,host:port,...`): sharded pub/sub, one shard per topic.

Every key and the channel of a topic carry the hash tag `{<topic>}` (redis_shared.CLUSTER), so one master
numbers, stores and publishes a topic's messages (the publish script ends in SPUBLISH) and its subscribers
SSUBSCRIBE there. Each master gets a publish connection and a sharded-subscribe connection of our own
(redis_connection.py, as the single-Redis broker's); the slot map comes from CLUSTER SLOTS through any node
that answers. A `-MOVED` answer, a `sunsubscribe` the server sends after a slot moved away, a lost
connection, or the periodic check: the map is read again, new masters are connected, and each topic is
subscribed again where its slot now lives. While a topic's master is unreachable, publishes to it fail with
BrokerUnavailable (503); the other shards keep serving. History reads and presence use redis-py's
RedisCluster, which follows redirections itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster

from push_service.broker import envelope
from push_service.broker.base import START_WAIT, Broker, Confirmed, Deliver, Signal, not_started, resolved
from push_service.errors import BrokerUnavailable
from push_service.broker.redis_connection import COMMAND_TIMEOUT
from push_service.broker.redis_connection import PROTOCOL_ERRORS, ConnectionLost, Endpoint, RedisConnection
from push_service.broker.redis_shard import Shard, seen
from push_service.broker.redis_shared import (CLUSTER, HistoryOptions, RedisPresenceStore, heard, publish_command,
                                               publish_script, read_recovery)
from push_service.broker.redis_slots import SLOTS, Address, key_slot, parse_cluster_url, parse_slots, redirection
from push_service.broker.resp import ReplyError
from push_service.config import Settings, redact_url
from push_service.messages import Broadcast, Position, Recovery
from push_service.presence.replicated import PresenceStore

log = logging.getLogger("push_service.broker")

MAP_CHECK = 5.0       # read the slot map this often when all is well (a reshard that moved no topic of ours)
DEGRADED_CHECK = 0.5  # and this often while a shard is down, to find the replica that replaces it
MAP_GAP = 0.05        # and at most this often in any case
REDIRECTED = ("MOVED", "ASK")


class RedisClusterBroker(Broker):
    name = "redis-cluster"

    def __init__(self, url: str, node_id: str, on_state: Callable[[bool], None] | None = None,
                 settings: Settings | None = None) -> None:
        settings = settings or Settings()
        self._history = HistoryOptions(settings)
        self._script = publish_script(sharded=True)
        self.node_id = node_id
        self._url = url
        self._cluster = parse_cluster_url(url)
        self._on_state = on_state or (lambda up: None)
        self._client = RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in self._cluster.seeds],
                                    username=self._cluster.username, password=self._cluster.password,
                                    socket_timeout=COMMAND_TIMEOUT, socket_connect_timeout=COMMAND_TIMEOUT)
        self._owners: list[Address | None] = [None] * SLOTS
        self._covered = False                  # every slot has a master
        self._shards: dict[Address, Shard] = {}
        self._topics: set[str] = set()         # what this node wants to hear
        self._where: dict[str, Shard] = {}     # the shard a wanted topic was last subscribed on
        self._refresh_wanted = asyncio.Event()
        self._next_refresh: asyncio.Future[None] | None = None
        self._ready = False
        self._closed = False
        self._connected = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._retired: set[asyncio.Task[None]] = set()  # shards no longer masters, being stopped
        self._deliver: Deliver = not_started
        self._confirmed: Confirmed = not_started
        self._signal: Signal = not_started

    # --- interface

    async def start(self, deliver: Deliver, confirmed: Confirmed, signal: Signal) -> None:
        self._deliver, self._confirmed, self._signal = deliver, confirmed, signal
        self._runner = asyncio.create_task(self._run(), name="redis-cluster-broker")
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await asyncio.wait_for(self._connected.wait(), START_WAIT)

    def _shard_of(self, topic: str) -> Shard | None:
        address = self._owners[key_slot(CLUSTER.channel(topic))]
        return None if address is None else self._shards.get(address)

    def publish(self, broadcasts: Sequence[Broadcast]) -> asyncio.Future[None]:
        routed = []
        for broadcast in broadcasts:  # all or nothing: no part of a batch goes out when a shard is down
            shard = self._shard_of(broadcast.topic)
            if shard is None or shard.publisher is None:
                raise BrokerUnavailable("redis cluster: the topic's shard is unavailable")
            routed.append((shard, shard.publisher, broadcast.topic,
                           publish_command(broadcast, CLUSTER, self._script, self._history, "SPUBLISH")))
        pending = []
        for shard, publisher, topic, command in routed:
            reply = publisher.call([command])
            reply.add_done_callback(seen)
            pending.append((shard, topic, command, reply))
        return asyncio.ensure_future(self._answered(pending))

    async def _answered(self, pending: list[tuple[Shard, str, tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        # Per topic, the order is the order of one connection; a redirected command is sent once more, where
        # the cluster says its slot is now (its script never ran where it was refused).
        for shard, topic, command, reply in pending:
            try:
                await reply
            except ReplyError as error:
                if error.code in REDIRECTED:
                    await self._redirected(error, topic, command)
                    continue
                if error.code == "NOSCRIPT" and shard.publisher is not None:
                    shard.load_script(shard.publisher)  # for what comes next
                raise BrokerUnavailable(f"redis refused the publish: {error.code}") from None
            except ConnectionLost:
                raise BrokerUnavailable("redis publish failed: connection lost") from None

    async def _redirected(self, error: ReplyError, topic: str, command: tuple[Any, ...]) -> None:
        prefix: list[tuple[Any, ...]] = []
        if error.code == "MOVED":
            await self._map_refreshed()
            shard = self._shard_of(topic)
        else:  # ASK: this command only goes to the node importing the slot, announced by ASKING
            try:
                shard = self._shards.get(redirection(str(error))[1])
            except ValueError:
                shard = None
            prefix = [("ASKING",)]
        if shard is None or shard.publisher is None:
            raise BrokerUnavailable("redis cluster: the topic's slot is moving")
        try:
            await shard.publisher.call([*prefix, command])
        except (ReplyError, ConnectionLost) as failure:
            raise BrokerUnavailable(f"redis cluster refused the publish: {failure}") from None

    def recover(self, topic: str, since: Position | None,
                limit: int | None = None) -> asyncio.Future[Recovery | None]:
        if not self._history.size:
            return resolved(None)
        shard = self._shard_of(topic)
        if shard is None or not shard.up:
            raise BrokerUnavailable("redis cluster: the topic's shard is unavailable")
        return asyncio.ensure_future(read_recovery(self._client, topic, since, limit, self._history))

    async def send_signal(self, topic: str, data: bytes) -> None:
        shard = self._shard_of(topic)
        if shard is None or shard.publisher is None:
            raise BrokerUnavailable("redis cluster: the topic's shard is unavailable")
        try:
            await shard.publisher.call([("SPUBLISH", CLUSTER.channel(topic),
                                         envelope.pack_signal(topic, self.node_id, data))])
        except (ReplyError, ConnectionLost) as failure:
            raise BrokerUnavailable(f"redis cluster signal failed: {failure}") from None

    def subscribe(self, topic: str) -> bool:
        self._topics.add(topic)
        shard = self._shard_of(topic)
        if shard is None or shard.subscriber is None:
            return True  # subscribed once its shard is back
        self._place(topic)
        return False

    def unsubscribe(self, topic: str) -> None:
        self._topics.discard(topic)
        shard = self._where.pop(topic, None)
        if shard is not None and topic in shard.topics:
            shard.topics.discard(topic)
            shard.unconfirmed.discard(topic)
            if shard.subscriber is not None:
                shard.subscriber.send("SUNSUBSCRIBE", CLUSTER.channel(topic))

    def _place(self, topic: str) -> None:
        """Subscribe `topic` on the shard that owns its slot now (and leave the one it was on)."""
        target = self._shard_of(topic)
        current = self._where.get(topic)
        if current is target and target is not None and topic in target.topics:
            return
        channel = CLUSTER.channel(topic)
        if current is not None and current is not target and topic in current.topics:
            current.topics.discard(topic)
            current.unconfirmed.discard(topic)
            if current.subscriber is not None:
                current.subscriber.send("SUNSUBSCRIBE", channel)
        if target is None or target.subscriber is None:
            self._where.pop(topic, None)
            return
        self._where[topic] = target
        target.topics.add(topic)
        target.unconfirmed.add(topic)
        target.subscriber.send("SSUBSCRIBE", channel)  # one per topic: channels of one SSUBSCRIBE share a slot

    def presence_store(self, node_timeout: float) -> PresenceStore | None:
        return RedisPresenceStore(self._client, node_timeout, CLUSTER)

    def protocol_errors(self) -> Mapping[str, int]:
        return PROTOCOL_ERRORS

    @property
    def ready(self) -> bool:
        return self._ready

    async def close(self) -> None:
        self._closed = True
        self._set_ready(False)
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
        await asyncio.gather(*(shard.stop() for shard in self._shards.values()), *self._retired, return_exceptions=True)
        await self._client.aclose()

    # --- the slot map

    def _set_ready(self, ready: bool) -> None:
        if ready != self._ready:
            self._ready = ready
            self._on_state(ready)
        if ready:
            self._connected.set()

    def _check_ready(self) -> None:
        shards = self._shards.values()
        self._set_ready(not self._closed and self._covered and bool(shards) and all(shard.up for shard in shards))

    async def _map_refreshed(self) -> None:
        """Until the slot map has been read again (bounded: a cluster that answers nothing is a 503)."""
        if self._next_refresh is None:
            self._next_refresh = asyncio.get_running_loop().create_future()
        waiting = self._next_refresh
        self._refresh_wanted.set()
        try:
            await asyncio.wait_for(asyncio.shield(waiting), 2 * COMMAND_TIMEOUT)
        except (asyncio.TimeoutError, TimeoutError):
            raise BrokerUnavailable("redis cluster: no slot map") from None

    async def _run(self) -> None:
        failing = False
        while not self._closed:
            waiting, self._next_refresh = self._next_refresh, None
            try:
                await self._refresh()
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # no node answered: keep serving what we have, try again soon
                if not failing:
                    log.warning("redis cluster: no slot map", extra={
                        "event": "broker_down", "broker": redact_url(self._url), "error": f"{type(exc).__name__}: {exc}"})
                failing = True
            finally:
                if waiting is not None and not waiting.done():
                    waiting.set_result(None)
            self._check_ready()
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(self._refresh_wanted.wait(), MAP_CHECK if self._ready else DEGRADED_CHECK)
            # Redirections can come in bursts (a slot in migration answers ASK to every SSUBSCRIBE): one read of
            # the map serves them all.
            await asyncio.sleep(MAP_GAP)
            self._refresh_wanted.clear()

    def _want_refresh(self) -> None:
        self._refresh_wanted.set()

    async def _refresh(self) -> None:
        known = [address for address, shard in self._shards.items() if shard.up]
        candidates = list(dict.fromkeys([*known, *self._cluster.seeds, *self._shards]))
        for address in candidates:
            try:
                connection = await RedisConnection.open(self._endpoint(address), COMMAND_TIMEOUT)
            except (OSError, asyncio.TimeoutError, TimeoutError):
                continue
            try:
                owners = parse_slots(await asyncio.wait_for(connection.call([("CLUSTER", "SLOTS")]), COMMAND_TIMEOUT),
                                     address)
            except (ReplyError, ConnectionLost, asyncio.TimeoutError, TimeoutError, ValueError) as exc:
                log.warning("redis cluster node gave no slot map", extra={
                    "event": "broker_error", "broker": f"{address[0]}:{address[1]}", "error": f"{exc}"[:200]})
                continue
            finally:
                connection.close()
            self._apply(owners)
            return
        raise ConnectionError(f"none of {len(candidates)} cluster nodes answered CLUSTER SLOTS")

    def _apply(self, owners: list[Address | None]) -> None:
        self._owners = owners
        self._covered = all(owner is not None for owner in owners)
        masters = {owner for owner in owners if owner is not None}
        script = self._script if self._history.size else None
        for address in masters - self._shards.keys():
            self._shards[address] = Shard(self._endpoint(address), self.node_id, script, self._heard, self._shard_changed)
        for address in self._shards.keys() - masters:  # a replica now, or gone: its topics move
            shard = self._shards.pop(address)
            self._retired.add(asyncio.create_task(shard.stop()))
            self._retired = {task for task in self._retired if not task.done()}
        for topic in list(self._topics):
            self._place(topic)

    def _endpoint(self, address: Address) -> Endpoint:
        return Endpoint(address[0], address[1], 0, self._cluster.username, self._cluster.password, None)

    # --- what the shards' connections bring

    def _shard_changed(self, shard: Shard) -> None:
        if shard.up:
            for topic in list(self._topics):
                self._place(topic)
        else:
            self._want_refresh()  # a failover may have moved its slots
        self._check_ready()

    def _heard(self, shard: Shard, reply: Any) -> None:
        """What a shard's subscriber connection brings: messages, (un)subscriptions, pongs, redirections."""
        if isinstance(reply, ReplyError) and reply.code in REDIRECTED:
            # An SSUBSCRIBE for a slot this master no longer owns: subscribe it where the new map says.
            slot, _ = redirection(str(reply))  # ValueError: a bad push (redis_connection counts it)
            for refused in [topic for topic in shard.unconfirmed if key_slot(CLUSTER.channel(topic)) == slot]:
                shard.topics.discard(refused)
                shard.unconfirmed.discard(refused)
            self._want_refresh()
            return
        if not isinstance(reply, list) or not reply:
            log.warning("redis pub/sub error", extra={"event": "broker_error", "error": repr(reply)[:200]})
            if shard.subscriber is not None:
                shard.subscriber.close()  # start over rather than miss a topic
            return
        kind = reply[0]
        if kind == b"smessage":
            heard(reply[2], self.node_id, self._deliver, self._signal)
        elif kind == b"ssubscribe":
            topic = CLUSTER.topic_of(reply[1])
            if topic is not None and topic in shard.unconfirmed:
                shard.unconfirmed.discard(topic)
                self._confirmed(topic)  # before the next message: the join reply precedes its first broadcast
        elif kind == b"sunsubscribe":
            topic = CLUSTER.topic_of(reply[1])
            if topic is not None and topic in shard.topics:
                # Not asked for: the server dropped it, its slot moved. Subscribe it where it lives now.
                shard.topics.discard(topic)
                shard.unconfirmed.discard(topic)
                self._want_refresh()
        elif kind == b"pong":
            shard.last_pong = time.monotonic()
