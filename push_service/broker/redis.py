"""Redis broker: one pub/sub channel per topic, subscribed only while this node has subscribers.

Publishing and hearing go over two connections of our own (redis_connection.py): a publish is
written to Redis at the end of the loop turn that took it (a batch as consecutive commands, so it
keeps its order) and a message heard reaches the hub in the read that brings it. If Redis goes away, local
sockets stay up, publishes fail with BrokerUnavailable (HTTP 503), and the broker reconnects with
capped backoff and resubscribes every topic. History reads and presence (redis_shared.py) use
redis-py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence

from push_service.broker import envelope
from push_service.broker.backoff import Backoff
from push_service.broker.base import DOWN_MESSAGE, START_WAIT, Broker, Confirmed, Deliver, Signal, not_started, resolved
from push_service.config import Settings, redact_url
from push_service.errors import BrokerUnavailable
from push_service.messages import Broadcast, Position, Recovery
from push_service.presence.replicated import PresenceStore

try:
    import redis.asyncio as aioredis
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("PUSH_BROKER=redis://... needs the redis extra: pip install 'push-service[redis]'") from exc

from push_service.broker.redis_connection import (COMMAND_TIMEOUT, PROTOCOL_ERRORS, ConnectionLost, RedisConnection,
                                                   endpoint, hold)
from push_service.broker.redis_shared import (STANDALONE, HistoryOptions, RedisPresenceStore, heard, publish_command,
                                               publish_script, read_recovery)
from push_service.broker.resp import ReplyError

log = logging.getLogger("push_service.broker")

SUBSCRIBE_CHUNK = 1000


PUBLISH_SCRIPT = publish_script(sharded=False)
CHANNEL_PREFIX = STANDALONE.channel_prefix


class RedisBroker(Broker):
    name = "redis"

    def __init__(self, url: str, node_id: str, on_state: Callable[[bool], None] | None = None,
                 settings: Settings | None = None) -> None:
        settings = settings or Settings()
        self._history = HistoryOptions(settings)
        self.node_id = node_id
        self._url = url
        self._on_state = on_state or (lambda up: None)
        self._endpoint = endpoint(url)
        # redis-py, for history reads and presence
        self._client = aioredis.from_url(url, socket_timeout=COMMAND_TIMEOUT, socket_connect_timeout=COMMAND_TIMEOUT,
                                         health_check_interval=0)
        self._publisher: RedisConnection | None = None  # while connected
        self._pubsub: RedisConnection | None = None
        self._topics: set[str] = set()       # what this node wants to hear
        self._unconfirmed: set[str] = set()  # subscribed, waiting for Redis's acknowledgement
        self._commands: list[tuple[str, str]] = []  # (un)subscribes written at the end of this loop turn
        self._last_pong = 0.0
        self._ready = False
        self._closed = False
        self._attempted = asyncio.Event()  # the first connection attempt succeeded or failed
        self._runner: asyncio.Task[None] | None = None
        # Set by start(), before the first connection hears anything.
        self._deliver: Deliver = not_started
        self._confirmed: Confirmed = not_started
        self._signal: Signal = not_started

    # --- interface

    async def start(self, deliver: Deliver, confirmed: Confirmed, signal: Signal) -> None:
        self._deliver, self._confirmed, self._signal = deliver, confirmed, signal
        self._runner = asyncio.create_task(self._run(), name="redis-broker")
        # Start ready when Redis is there; when it is not, serve anyway and keep trying (readyz 503).
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await asyncio.wait_for(self._attempted.wait(), START_WAIT)

    def publish(self, broadcasts: Sequence[Broadcast]) -> asyncio.Future[None]:
        publisher = self._publisher
        if not self._ready or publisher is None:
            raise BrokerUnavailable("redis unavailable")
        # Consecutive commands on one connection, written at the end of this loop turn: a batch keeps
        # its order, and each script call is atomic on its own.
        history = self._history
        commands = [publish_command(broadcast, STANDALONE, PUBLISH_SCRIPT, history) for broadcast in broadcasts]
        return self._accepted(publisher, publisher.call(commands))

    def _accepted(self, publisher: RedisConnection, reply: asyncio.Future[object]) -> asyncio.Future[None]:
        """Done when Redis has answered; BrokerUnavailable when it refused or the connection went. A
        callback rather than a task: a task per publish costs more than the rest of it."""
        accepted: asyncio.Future[None] = reply.get_loop().create_future()
        reply.add_done_callback(functools.partial(self._answered, publisher, accepted))
        return accepted

    def _answered(self, publisher: RedisConnection, accepted: asyncio.Future[None],
                  reply: asyncio.Future[object]) -> None:
        error = ConnectionLost() if reply.cancelled() else reply.exception()
        if accepted.cancelled():
            return
        if error is None:
            accepted.set_result(None)
            return
        if isinstance(error, ReplyError):
            if error.code == "NOSCRIPT":  # the script cache was flushed: load it again for what comes next
                self._load_script(publisher)
            error = BrokerUnavailable(f"redis refused the publish: {error.code}")
        elif isinstance(error, ConnectionLost):
            error = BrokerUnavailable("redis publish failed: connection lost")
        accepted.set_exception(error)

    @staticmethod
    def _load_script(publisher: RedisConnection) -> asyncio.Future[object]:
        loaded = publisher.call([("SCRIPT", "LOAD", PUBLISH_SCRIPT.text)])
        loaded.add_done_callback(lambda future: future.cancelled() or future.exception())  # seen, whatever it is
        return loaded

    def recover(self, topic: str, since: Position | None,
                limit: int | None = None) -> asyncio.Future[Recovery | None]:
        if not self._history.size:
            return resolved(None)
        if not self._ready:
            raise BrokerUnavailable("redis unavailable")
        return asyncio.ensure_future(read_recovery(self._client, topic, since, limit, self._history))

    async def send_signal(self, topic: str, data: bytes) -> None:
        publisher = self._publisher
        if publisher is None:
            raise BrokerUnavailable("redis unavailable")
        await self._accepted(publisher, publisher.call(
            [("PUBLISH", CHANNEL_PREFIX + topic, envelope.pack_signal(topic, self.node_id, data))]))

    def subscribe(self, topic: str) -> bool:
        self._topics.add(topic)
        if not self._ready:
            return True  # subscribed with every other topic once Redis is back
        self._unconfirmed.add(topic)
        self._queue_command("subscribe", topic)
        return False

    def unsubscribe(self, topic: str) -> None:
        self._topics.discard(topic)
        self._unconfirmed.discard(topic)
        if self._ready:
            self._queue_command("unsubscribe", topic)

    def _queue_command(self, command: str, topic: str) -> None:
        if not self._commands:
            asyncio.get_running_loop().call_soon(self._write_commands)
        self._commands.append((command, topic))

    def _write_commands(self) -> None:
        commands, self._commands = self._commands, []
        pubsub = self._pubsub
        if pubsub is None:
            return  # every topic is subscribed again on reconnecting
        # Consecutive commands of one kind go as one SUBSCRIBE/UNSUBSCRIBE; the order is kept.
        for command, group in itertools.groupby(commands, key=lambda item: item[0]):
            channels = [CHANNEL_PREFIX + topic for _, topic in group]
            for start in range(0, len(channels), SUBSCRIBE_CHUNK):
                pubsub.send(command.upper(), *channels[start:start + SUBSCRIBE_CHUNK])

    def presence_store(self, node_timeout: float) -> PresenceStore | None:
        return RedisPresenceStore(self._client, node_timeout, STANDALONE)

    def protocol_errors(self) -> Mapping[str, int]:
        return PROTOCOL_ERRORS  # counted per process: a process runs one node

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
        await self._client.aclose()

    # --- the connections

    def _set_ready(self, ready: bool) -> None:
        if ready != self._ready:
            self._ready = ready
            self._on_state(ready)

    async def _run(self) -> None:
        backoff = Backoff()
        while not self._closed:
            try:
                await self._serve()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection refused, reset, timed out...
                if self._ready:
                    backoff.reset()  # it was up: this is a new outage, retry quickly first
                if backoff.fresh:
                    log.warning(DOWN_MESSAGE, "redis", extra={
                        "event": "broker_down", "broker": redact_url(self._url), "error": f"{type(exc).__name__}: {exc}"})
            finally:
                self._set_ready(False)
                self._attempted.set()
            if self._closed:
                return
            await asyncio.sleep(backoff.next())

    async def _serve(self) -> None:
        """Connect, subscribe to everything wanted, serve until a connection is lost or stalls."""
        name = f"push-{self.node_id}"
        pubsub = publisher = None
        try:
            pubsub = await RedisConnection.open(self._endpoint, COMMAND_TIMEOUT, self._heard, name=f"{name}-sub")
            publisher = await RedisConnection.open(self._endpoint, COMMAND_TIMEOUT, name=f"{name}-pub")
            if self._history.size:
                await asyncio.wait_for(self._load_script(publisher), COMMAND_TIMEOUT)
            # Idle pooled connections of redis-py may still point at a Redis that went away (restarted):
            # without this, the first history read after a reconnect would fail on one of them.
            await self._client.connection_pool.disconnect(inuse_connections=False)
            # From here on nothing awaits until ready, so no join falls between the topics taken here and
            # the subscriptions that follow.
            # Our node channel first: it makes the connection a pub/sub one and answers pings.
            pubsub.send("SUBSCRIBE", f"push:n:{self.node_id}")
            self._commands.clear()  # superseded by the full resubscription below
            topics = list(self._topics)
            self._unconfirmed = set(topics)
            for start in range(0, len(topics), SUBSCRIBE_CHUNK):
                pubsub.send("SUBSCRIBE", *(CHANNEL_PREFIX + topic for topic in topics[start:start + SUBSCRIBE_CHUNK]))
            self._last_pong = time.monotonic()
            self._pubsub, self._publisher = pubsub, publisher
            log.info("redis connected", extra={"event": "broker_up", "broker": redact_url(self._url),
                                               "topics": len(topics)})
            self._set_ready(True)
            self._attempted.set()
            await hold(pubsub, publisher, lambda: self._last_pong)
        finally:
            self._pubsub = self._publisher = None
            for connection in (pubsub, publisher):
                if connection is not None:
                    connection.close()

    def _heard(self, reply: object) -> None:
        """What the pub/sub connection brings: messages, subscription confirmations, pongs."""
        if not isinstance(reply, list) or not reply:
            log.warning("redis pub/sub error", extra={"event": "broker_error", "error": repr(reply[:200] if isinstance(reply, (bytes, str)) else reply)[:200]})
            if self._pubsub is not None:
                self._pubsub.close()  # e.g. a refused SUBSCRIBE: start over rather than miss a topic
            return
        kind = reply[0]
        if kind == b"message":
            heard(reply[2], self.node_id, self._deliver, self._signal)
        elif kind == b"subscribe":
            topic = reply[1].decode()[len(CHANNEL_PREFIX):]
            if reply[1].startswith(CHANNEL_PREFIX.encode()) and topic in self._unconfirmed:
                self._unconfirmed.discard(topic)
                # Synchronously, before the next message: the join reply precedes its first broadcast.
                self._confirmed(topic)
        elif kind == b"pong":
            self._last_pong = time.monotonic()
