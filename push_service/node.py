"""The node: one process's shared parts (settings, hub, broker, metrics, auth, sessions)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import secrets
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from aiohttp import web

from push_service.auth import Identity, PublishKeys, TokenVerifier
from push_service.auth_callback import AuthBackend
from push_service.broker import Broker, create_broker
from push_service.config import Settings
from push_service.control import CONTROL_PREFIX
from push_service.errors import AuthError, BrokerUnavailable, PushServiceError
from push_service.hub import Hub
from push_service.messages import Broadcast, Position, Recovery
from push_service.metrics import ENDPOINTS, Metrics
from push_service.origin import OriginPolicy
from push_service.outbox import Outbox
from push_service.presence import Presence
from push_service.connection import DRAIN, HEARTBEAT_TIMEOUT, SHUTDOWN, TOKEN_EXPIRED, Connection
from push_service.session import Session

log = logging.getLogger("push_service")
DRAIN_STEP = 0.1  # seconds between two batches of drain closes


class NodeDraining(BrokerUnavailable):
    """This node is shutting down: publishes go to another replica."""


class NodeBehind(PushServiceError):
    """What this node accepted would reach its subscribers later than PUSH_MAX_DELIVERY_LAG: a publish is
    refused rather than accepted to arrive late; `retry_after` is when to try again, in whole seconds."""

    def __init__(self, lag: float) -> None:
        super().__init__(f"delivery is {lag:.2f}s behind")
        self.retry_after = max(1, math.ceil(lag))


class Node:
    def __init__(self, settings: Settings, broker: Broker | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        # Series counted on every publish, looked up once; they are added to in place (`.value +=`), one call
        # less per publish than inc().
        self._published = {endpoint: self.metrics.published.labels(endpoint) for endpoint in ENDPOINTS}
        self._frames_delivered = self.metrics.frames_delivered.labels()
        self.hub = Hub(on_dispatched=self._dispatched)
        self.outbox = Outbox()  # the connections' answers, written at the end of the loop's pass
        # Unique across nodes: presence entries are keyed by node and connection.
        self.id = secrets.token_hex(6)
        self.broker = broker or create_broker(settings, self.id, self._broker_state,
                                              self.metrics.history_evictions.inc)
        self._broker_was_up = False
        self.metrics.count_broker_protocol_errors(self.broker.protocol_errors)
        self.tokens = TokenVerifier(settings)
        # The auth backend (PUSH_AUTH_CONNECT_URL / JOIN_URL), when there is one: None costs a connect or a
        # join nothing. With PUSH_AUTH_MODE=callback no token is one of ours: every connect asks it.
        backend = AuthBackend(settings, self.metrics) if settings.auth_connect_url or settings.auth_join_url else None
        self.auth_backend = backend if settings.auth_connect_url else None
        self.join_authorizer = backend if settings.auth_join_url else None
        self._backend = backend
        # The transports' and sessions' verify (who a client token says the client is; AuthError when refused):
        # the verifier's own method, no call in between on every connect.
        self.verify: Callable[[str | None], Identity] = (
            self._backend_only if settings.auth_mode == "callback" else self.tokens.verify)
        # An admin key may do whatever a publish key may (the console publishes), not the other way round.
        self.publish_keys = PublishKeys(settings.service_keys + settings.admin_keys)
        self.admin_keys = PublishKeys(settings.admin_keys)
        self.origins = OriginPolicy(settings.allowed_origins)
        self.allows_origin = self.origins.allows  # the policy's own method: no call in between on a connect
        self.sessions: set[Session] = set()
        self.started_at = time.time()
        # Where control-channel signals go (control.Control sets it); other signals are presence's.
        self.on_control: Callable[[str, bytes], None] = lambda topic, data: None
        self._session_ids = itertools.count(1)
        self.presence = Presence(settings, self.metrics, self.id, self.hub.dispatch, self.hub.rotating)
        self.now = time.monotonic  # the event loop's clock
        self._expiry: asyncio.Task[None] | None = None
        # topic -> sessions whose join waits for the broker to confirm the topic's subscription
        self._waiting: dict[str, list[Session]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._answers: set[asyncio.Future[Recovery | None]] = set()  # history reads, until they answer
        self.draining = False
        # An attribute, not a property: a join asks twice.
        self.history_enabled = settings.history_size > 0

    async def start(self) -> None:
        if self._backend is not None:
            await self._backend.start()
        await self.broker.start(self.hub.dispatch, self._broker_confirmed, self._signal)
        self.metrics.broker_up.set(1 if self.broker.ready else 0)
        await self.presence.start(self.broker)
        self._expiry = asyncio.create_task(self._expire(), name="push-expiry")

    async def stop(self) -> None:
        self.hub.finish()
        for session in list(self.sessions):
            session.disconnect(SHUTDOWN)
        if self._expiry is not None:
            self._expiry.cancel()
        await self.presence.close()
        await self.broker.close()
        if self._backend is not None:
            await self._backend.stop()

    @property
    def ready(self) -> bool:
        return self.broker.ready and not self.draining

    async def drain(self) -> None:
        """SIGTERM: refuse new sockets and publishes (readyz 503), then close every socket with 1012,
        spread over PUSH_DRAIN_SECONDS so the reconnects do not stampede the other replicas."""
        self.draining = True
        sessions = list(self.sessions)
        log.info("draining", extra={"event": "drain_start", "connections": len(sessions),
                                    "seconds": self.settings.drain_seconds})
        steps = max(1, int(self.settings.drain_seconds / DRAIN_STEP))
        per_step = max(1, math.ceil(len(sessions) / steps))
        begun = self.now()
        for step, start in enumerate(range(0, len(sessions), per_step)):
            # Against the clock, not step by step: the loop is busy refusing reconnects meanwhile.
            await asyncio.sleep(max(0.0, begun + step * DRAIN_STEP - self.now()))
            self.hub.finish()  # what was accepted before these sockets close reaches them first
            for session in sessions[start:start + per_step]:
                session.disconnect(DRAIN)
        log.info("drained", extra={"event": "drain_done", "connections": len(sessions)})

    def _signal(self, topic: str, data: bytes) -> None:
        if topic.startswith(CONTROL_PREFIX):
            self.on_control(topic, data)
        else:
            self.presence.signal(topic, data)

    def _broker_state(self, up: bool) -> None:
        self.metrics.broker_up.set(1 if up else 0)
        if up and self._broker_was_up:
            self.metrics.broker_reconnects.inc()
        self._broker_was_up |= up

    # --- sessions (Node is the transports' Admission and the sessions' SessionHost)

    def _backend_only(self, token: str | None) -> Identity:
        if not token:
            raise AuthError("missing", "no token given")
        raise AuthError("not_accepted", "PUSH_AUTH_MODE=callback: tokens are the auth backend's to judge")

    def open_session(self, identity: Identity, conn: Connection, transport: str) -> Session:
        session = Session(self, f"{self.id}.{next(self._session_ids)}", identity, conn)
        session.connected_at = time.time()
        self.sessions.add(session)
        self.metrics.connections_of[transport].inc()
        return session

    def sessions_of(self, user: str) -> list[Session]:
        """A user's sessions here, for the admin API. A scan, not an index kept up on every connect: admin
        requests are rare, connects are not (docs/performance.md, "Connect rate")."""
        return [session for session in self.sessions if session.identity.sub == user]

    def forget(self, session: Session) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self.metrics.connections_of[session.conn.transport_name].dec()

    def subscribe(self, topic: str, session: Session) -> bool:
        """Add a local subscriber. True: in effect now. False: `session.subscribed(topic)` follows
        once the broker hears the topic (and presence knows who is there), so the join reply is
        never sent before the subscription can deliver."""
        waiting = self._waiting.get(topic)
        if waiting is not None:
            waiting.append(session)
            return False
        if self.hub.subscriber_count(topic):
            self.hub.subscribe(topic, session)
            return True
        broker_ready = self.broker.subscribe(topic)
        if broker_ready and not self.presence.needs_load(topic):
            self.hub.subscribe(topic, session)
            return True
        self._waiting[topic] = [session]
        if broker_ready:
            self._broker_confirmed(topic)
        return False

    def unsubscribe(self, topic: str, session: Session) -> None:
        waiting = self._waiting.get(topic)
        if waiting is not None and session in waiting:
            waiting.remove(session)  # _complete_subscription unsubscribes the broker if nobody is left
        elif self.hub.unsubscribe(topic, session):
            self.broker.unsubscribe(topic)
            self.presence.drop_replica(topic)

    def _broker_confirmed(self, topic: str) -> None:
        if topic.startswith(CONTROL_PREFIX):
            return  # the control channel: no hub subscribers, no presence
        if topic not in self._waiting:
            # A resubscription after a broker outage: presence may have changed meanwhile.
            self._spawn(self.presence.resync(topic))
        elif self.presence.needs_load(topic):
            self._spawn(self._load_presence_then_complete(topic))
        else:
            self._complete_subscription(topic)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background task failed", exc_info=task.exception(),
                        extra={"event": "background_task_failed"})

    async def _load_presence_then_complete(self, topic: str) -> None:
        try:
            await self.presence.load(topic)
        except Exception:  # the broker went away mid-load: the subscription still stands
            log.warning("presence load failed", extra={"event": "presence_load_failed", "topic": topic},
                        exc_info=True)
        self._complete_subscription(topic)

    def _complete_subscription(self, topic: str) -> None:
        for session in self._waiting.pop(topic, ()):
            self.hub.subscribe(topic, session)
            session.subscribed(topic)
        if not self.hub.subscriber_count(topic):
            self.broker.unsubscribe(topic)
            self.presence.drop_replica(topic)

    async def _expire(self) -> None:
        """One timer for every connection: heartbeat timeouts, token expiry, lapsed typing."""
        timeout = self.settings.heartbeat_timeout
        leeway = self.settings.jwt_leeway
        tick = min(1.0, timeout / 4, self.settings.typing_timeout / 4)
        while True:
            await asyncio.sleep(tick)
            now = self.now()
            self.presence.expire_typing(now)
            idle_before = now - timeout
            wall = time.time() - leeway
            for session in list(self.sessions):
                if session.identity.exp <= wall:
                    session.disconnect(TOKEN_EXPIRED)
                elif session.last_seen < idle_before:
                    session.disconnect(HEARTBEAT_TIMEOUT)

    # --- history

    def recover(self, topic: str, since: Position | None, done: Callable[[Recovery | None], None]) -> None:
        """Call `done` with the topic's position and what came after `since` (None: history is off or
        unreadable), at once when the broker's answer is ready (memory), else when it comes."""
        try:
            pending = self.broker.recover(topic, since)
        except BrokerUnavailable:
            done(None)
            return

        def answered(pending: asyncio.Future[Recovery | None]) -> None:
            try:
                recovery = pending.result()
            except BrokerUnavailable:
                recovery = None
            done(recovery)

        if pending.done():  # the memory broker: the join is answered in this loop turn
            answered(pending)
            return
        self._answers.add(pending)  # asyncio keeps only a weak reference to a task
        pending.add_done_callback(self._answers.discard)
        pending.add_done_callback(answered)

    async def history(self, topic: str, since: Position | None, limit: int) -> Recovery | None:
        return await self.broker.recover(topic, since, limit)

    # --- publishing

    def publish(self, broadcasts: Sequence[Broadcast]) -> tuple[int, asyncio.Future[None]]:
        """Publish to every node: (this node's subscribers of those topics, the broker's answer, done once
        it has taken the publish: already with the memory broker). Raises BrokerUnavailable, or the answer
        holds it; the caller counts what was taken (`count_published`)."""
        if self.draining:
            # Its sockets are closing: refuse (503) so the backend retries on a replica that stays.
            raise NodeDraining("node is draining")
        limit = self.settings.max_delivery_lag
        if limit:
            lag = self.hub.lag()
            if lag > limit:
                self.metrics.publishes_refused.labels("lag").inc(len(broadcasts))
                raise NodeBehind(lag)
        return self.hub.audience(broadcasts), self.broker.publish(broadcasts)

    def count_published(self, endpoint: str, count: int) -> None:
        self._published[endpoint].value += count

    def _dispatched(self, broadcast: Broadcast, count: int) -> None:
        self._frames_delivered.value += count
        if broadcast.published_at is not None:
            self.metrics.publish_latency.observe(max(0.0, time.time() - broadcast.published_at))


# Where the aiohttp application keeps its node.
NODE = web.AppKey("node", Node)
