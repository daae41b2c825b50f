"""NATS broker: one subject per topic (`push.t.<base64url topic>`), subscribed only while this node
has subscribers; presence in JetStream key-value buckets (nats_presence.py).

nats-py reconnects by itself and resubscribes; while it is disconnected, publishes fail with
BrokerUnavailable (HTTP 503) instead of sitting in the client's reconnect buffer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence

from push_service.broker import envelope
from push_service.broker.backoff import Backoff
from push_service.broker.nats_presence import NatsPresenceStore
from push_service.broker.base import DOWN_MESSAGE, START_WAIT, Broker, Confirmed, Deliver, Signal
from push_service.config import Settings, redact_url
from push_service.errors import BrokerUnavailable
from push_service.history.position import Position, Recovery
from push_service.history.window import recovery_window
from push_service.hub import Broadcast
from push_service.presence.replicated import PresenceStore

try:
    import nats
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from nats.errors import Error as NatsError
    from nats.js.api import ConsumerConfig, DeliverPolicy, DiscardPolicy, StorageType, StreamConfig
    from nats.js.client import JetStreamContext
    from nats.js.errors import NotFoundError
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("PUSH_BROKER=nats://... needs the nats extra: pip install 'push-service[nats]'") from exc

log = logging.getLogger("push_service.broker")

SUBJECT_PREFIX = "push.t."
HISTORY_PREFIX = "push.h."
HISTORY_STREAM = "PUSH_HISTORY"
COMMAND_TIMEOUT = 2  # seconds (nats-py types its timeouts as int)


def subject_for(topic: str, prefix: str = SUBJECT_PREFIX) -> str:
    """Topics may hold '.', '*', '>' or spaces, which mean something in a subject: encode them away."""
    return prefix + base64.urlsafe_b64encode(topic.encode()).decode().rstrip("=")


class NatsBroker(Broker):
    name = "nats"

    def __init__(self, url: str, node_id: str, on_state: Callable[[bool], None] | None = None,
                 settings: Settings | None = None) -> None:
        settings = settings or Settings()
        # With history on, broadcasts go through a JetStream stream: the stream's sequence is the
        # position, and every node hears each topic through an ordered consumer, in stream order.
        self._history_size = settings.history_size
        self._history_ttl = settings.history_ttl
        self._js: JetStreamContext | None = None
        self._epoch = ""
        self.node_id = node_id
        self._url = url
        self._on_state = on_state or (lambda up: None)
        self._nc: Client | None = None
        self._subscriptions: dict[str, Subscription] = {}          # core: signals, and broadcasts without history
        self._history_subscriptions: dict[str, Subscription] = {}  # JetStream: broadcasts with history
        self._to_subscribe: list[str] = []
        self._flush: asyncio.Task[None] | None = None  # the PING/PONG the publishes of this turn share
        self._wake = asyncio.Event()
        self._subscriber: asyncio.Task[None] | None = None
        self._ready = False
        self._down_logged = False  # one broker_down line per outage
        self._attempted = asyncio.Event()  # the first connection attempt succeeded or failed
        self._deliver: Deliver | None = None
        self._confirmed: Confirmed | None = None
        self._signal: Signal | None = None

    async def start(self, deliver: Deliver, confirmed: Confirmed, signal: Signal) -> None:
        self._deliver, self._confirmed, self._signal = deliver, confirmed, signal
        self._subscriber = asyncio.create_task(self._connect_then_subscribe(), name="nats-subscriber")
        # Start ready when NATS is there; when it is not, serve anyway and keep trying (readyz 503).
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await asyncio.wait_for(self._attempted.wait(), START_WAIT)

    async def _connect_then_subscribe(self) -> None:
        # nats-py retries a first connect itself; this loop covers a connect that still fails outright.
        backoff = Backoff()
        while self._nc is None:
            try:
                self._nc = await nats.connect(
                    servers=[self._url], name=f"push-service-{self.node_id}", allow_reconnect=True,
                    max_reconnect_attempts=-1, reconnect_time_wait=1, connect_timeout=COMMAND_TIMEOUT,
                    ping_interval=2, max_outstanding_pings=2,
                    disconnected_cb=self._disconnected, reconnected_cb=self._reconnected, error_cb=self._error)
            except (NatsError, OSError, asyncio.TimeoutError) as exc:
                self._first_connect_failed(exc)
                await asyncio.sleep(backoff.next())
        if self._history_size:
            await self._ensure_history_stream()
        log.info("nats connected", extra={"event": "broker_up", "broker": redact_url(self._url)})
        self._set_ready(True)
        self._attempted.set()
        await self._subscribe_loop()

    async def _ensure_history_stream(self) -> None:
        assert self._nc is not None
        self._js = self._nc.jetstream(timeout=COMMAND_TIMEOUT)
        config = StreamConfig(name=HISTORY_STREAM, subjects=[HISTORY_PREFIX + ">"], storage=StorageType.MEMORY,
                              max_msgs_per_subject=self._history_size, max_age=self._history_ttl,
                              discard=DiscardPolicy.OLD)
        try:
            info = await self._js.stream_info(HISTORY_STREAM)
            info = await self._js.update_stream(config)
        except NotFoundError:
            info = await self._js.add_stream(config)
        # A stream created anew (a NATS restart lost its memory) starts a new epoch.
        self._epoch = hashlib.sha256(str(info.created).encode()).hexdigest()[:12]

    async def publish(self, broadcasts: Sequence[Broadcast]) -> None:
        nc = self._nc
        if nc is None or not self._ready or not nc.is_connected:
            raise BrokerUnavailable("nats unavailable")
        try:
            if self._js is not None:
                for broadcast in broadcasts:  # one after the other: each ack fixes its position
                    await self._js.publish(subject_for(broadcast.topic, HISTORY_PREFIX),
                                           envelope.pack_broadcast(broadcast), timeout=COMMAND_TIMEOUT)
                return
            for broadcast in broadcasts:
                await nc.publish(subject_for(broadcast.topic), envelope.pack_broadcast(broadcast))
            # The PONG comes after the server has taken every message before it: accepted means sent.
            await asyncio.shield(self._flushed(nc))
        except (NatsError, OSError, asyncio.TimeoutError) as exc:
            raise BrokerUnavailable(f"nats publish failed: {type(exc).__name__}") from None

    def _flushed(self, nc: Client) -> asyncio.Task[None]:
        """A PING/PONG behind every publish written so far, shared by the publishes of this loop turn."""
        if self._flush is None:
            self._flush = asyncio.create_task(self._flush_once(nc))
        return self._flush

    async def _flush_once(self, nc: Client) -> None:
        self._flush = None  # what is published from here on waits for the next one
        # nats-py writes a PING at once but publishes from a buffer, in a task of its own: let that buffer
        # go out first, or the PONG would not vouch for what is still in it.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + COMMAND_TIMEOUT
        while nc.pending_data_size and nc.is_connected and loop.time() < deadline:
            await asyncio.sleep(0)
        await nc.flush(timeout=COMMAND_TIMEOUT)

    def _client(self) -> Client:
        if self._nc is None:
            raise BrokerUnavailable("nats not connected yet")
        return self._nc

    async def send_signal(self, topic: str, data: bytes) -> None:
        await self._client().publish(subject_for(topic), envelope.pack_signal(topic, self.node_id, data))

    def subscribe(self, topic: str) -> bool:
        self._to_subscribe.append(topic)
        self._wake.set()
        return not self._ready  # not connected: in effect with the rest once NATS is back

    def unsubscribe(self, topic: str) -> None:
        if topic in self._to_subscribe:
            self._to_subscribe.remove(topic)
            return
        for subscriptions in (self._subscriptions, self._history_subscriptions):
            subscription = subscriptions.pop(topic, None)
            if subscription is not None:
                task = asyncio.ensure_future(subscription.unsubscribe())
                task.add_done_callback(lambda done: done.exception() if not done.cancelled() else None)

    def presence_store(self, node_timeout: float) -> PresenceStore | None:
        return NatsPresenceStore(self._client, node_timeout, COMMAND_TIMEOUT)

    @property
    def ready(self) -> bool:
        return self._ready

    async def close(self) -> None:
        self._set_ready(False)
        if self._subscriber is not None:
            self._subscriber.cancel()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.drain(), COMMAND_TIMEOUT)
            with contextlib.suppress(Exception):
                await self._nc.close()

    # --- internals

    def _set_ready(self, ready: bool) -> None:
        if ready != self._ready:
            self._ready = ready
            self._down_logged = False
            self._on_state(ready)

    async def _subscribe_loop(self) -> None:
        assert self._nc is not None and self._confirmed is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            topics, self._to_subscribe = self._to_subscribe, []
            try:
                for topic in topics:
                    self._subscriptions[topic] = await self._nc.subscribe(
                        subject_for(topic), cb=self._on_message, pending_msgs_limit=0, pending_bytes_limit=0)
                    if self._js is not None:
                        self._history_subscriptions[topic] = await self._js.subscribe(
                            subject_for(topic, HISTORY_PREFIX), cb=self._on_history_message, ordered_consumer=True,
                            deliver_policy=DeliverPolicy.NEW, pending_msgs_limit=0, pending_bytes_limit=0)
                # One round trip for the lot: after the PONG the server has every subscription.
                await self._nc.flush(timeout=COMMAND_TIMEOUT)
            except (NatsError, OSError, asyncio.TimeoutError) as exc:
                # Disconnected: nats-py resubscribes what it has on reconnect; _reconnected confirms.
                log.warning("nats subscribe delayed", extra={"event": "broker_subscribe_delayed",
                                                             "error": type(exc).__name__})
            for topic in topics:
                if topic in self._subscriptions:
                    self._confirmed(topic)

    async def _on_message(self, message: Msg) -> None:
        self._handle(message, None)

    async def _on_history_message(self, message: Msg) -> None:
        self._handle(message, Position(self._epoch, message.metadata.sequence.stream))

    def _handle(self, message: Msg, position: Position | None) -> None:
        assert self._deliver is not None and self._signal is not None
        try:
            item = envelope.unpack(message.data)
        except envelope.EnvelopeError:
            log.warning("foreign message on a push subject", extra={"event": "bad_envelope"})
            return
        if isinstance(item, Broadcast):
            if position is not None:
                item.position = position
            self._deliver(item)
        elif item[1] != self.node_id:
            self._signal(item[0], item[2])

    def recover(self, topic: str, since: Position | None, limit: int | None = None) -> Awaitable[Recovery] | None:
        if not self._history_size:
            return None
        if self._js is None or not self._ready:
            raise BrokerUnavailable("nats unavailable")
        return self._recover(self._js, topic, since, limit)

    async def _recover(self, js: JetStreamContext, topic: str, since: Position | None,
                       limit: int | None) -> Recovery:
        subject = subject_for(topic, HISTORY_PREFIX)
        try:
            try:
                last = (await js.get_last_msg(HISTORY_STREAM, subject)).seq or 0
            except NotFoundError:
                last = 0
            current = Position(self._epoch, last)
            if last == 0 or (since is not None and (since.epoch != self._epoch or since.seq >= last)):
                return recovery_window(current, since, [], limit, intact=True)  # nothing to read
            # Positions are stream-wide, so a topic's are not consecutive: the recovery is known to be
            # complete when the message at `since` itself is still kept (the stream drops oldest first).
            # JetStream sequences start at 1 (and refuse a start of 0): `~0` is a join before anything was kept.
            start = max(since.seq, 1) if since is not None else 1
            messages: list[Broadcast] = []
            first_seq = None
            subscription = await js.subscribe(subject, ordered_consumer=True,
                                              deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                              config=ConsumerConfig(opt_start_seq=start))
            try:
                while True:
                    message = await subscription.next_msg(timeout=COMMAND_TIMEOUT)
                    seq = message.metadata.sequence.stream
                    first_seq = seq if first_seq is None else first_seq
                    if since is None or seq > since.seq:
                        item = envelope.unpack(message.data)
                        if isinstance(item, Broadcast):
                            item.position = Position(self._epoch, seq)
                            messages.append(item)
                    if seq >= last:
                        break
            finally:
                await subscription.unsubscribe()
        except (NatsError, OSError, asyncio.TimeoutError, envelope.EnvelopeError) as exc:
            raise BrokerUnavailable(f"nats history read failed: {type(exc).__name__}") from None
        return recovery_window(current, since, messages, limit, intact=since is None or first_seq == since.seq)

    async def _disconnected(self) -> None:
        if self._ready:
            log.warning(DOWN_MESSAGE, "nats", extra={"event": "broker_down", "broker": redact_url(self._url)})
        self._set_ready(False)
        self._down_logged = True

    async def _reconnected(self) -> None:
        log.info("nats reconnected", extra={"event": "broker_up", "broker": redact_url(self._url)})
        self._set_ready(True)
        assert self._confirmed is not None
        for topic in list(self._subscriptions):
            self._confirmed(topic)  # the node resyncs presence of every topic it serves

    async def _error(self, exc: Exception) -> None:
        # nats-py retries its first connect on its own (max_reconnect_attempts=-1), reporting only here.
        if not self._ready and not self._down_logged:
            self._first_connect_failed(exc)
        else:
            log.debug("nats client error", extra={"event": "broker_error", "error": f"{type(exc).__name__}: {exc}"})

    def _first_connect_failed(self, exc: Exception) -> None:
        """Said once; start() need wait no longer."""
        self._attempted.set()
        if not self._down_logged:
            self._down_logged = True
            log.warning(DOWN_MESSAGE, "nats", extra={
                "event": "broker_down", "broker": redact_url(self._url), "error": f"{type(exc).__name__}: {exc}"})
