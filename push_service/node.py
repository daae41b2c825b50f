"""The node: one process's shared parts (settings, hub, broker, metrics, auth, sessions)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Sequence

from push_service.auth import Identity, PublishKeys, TokenVerifier
from push_service.broker import Broker, MemoryBroker
from push_service.config import Settings
from push_service.hub import Broadcast, Hub
from push_service.metrics import Metrics
from push_service.origin import OriginPolicy
from push_service.presence import Presence
from push_service.session import HEARTBEAT_TIMEOUT, SHUTDOWN, TOKEN_EXPIRED, Connection, Session

log = logging.getLogger("push_service")


class Node:
    def __init__(self, settings: Settings, broker: Broker | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.hub = Hub(on_dispatched=self._dispatched)
        self.broker = broker or MemoryBroker()
        self.tokens = TokenVerifier(settings)
        self.publish_keys = PublishKeys(settings.service_keys)
        self.origins = OriginPolicy(settings.allowed_origins)
        self.sessions: set[Session] = set()
        # Unique across nodes: presence entries are keyed by node and connection.
        self.id = secrets.token_hex(6)
        self._session_ids = itertools.count(1)
        self.presence = Presence(settings, self.metrics, self.id, self.hub.dispatch)
        self.now = time.monotonic  # the event loop's clock
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.broker.start(self.hub.dispatch)
        await self.presence.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="push-sweeper")

    async def stop(self) -> None:
        for session in list(self.sessions):
            session.disconnect(SHUTDOWN)
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.presence.close()
        await self.broker.close()

    @property
    def ready(self) -> bool:
        return self.broker.ready

    # --- sessions

    def open_session(self, identity: Identity, conn: Connection, transport: str) -> Session:
        session = Session(self, f"{self.id}.{next(self._session_ids)}", identity, conn)
        self.sessions.add(session)
        self.metrics.connections.labels(transport).inc()
        return session

    def forget(self, session: Session) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self.metrics.connections.labels(session.conn.transport_name).dec()

    def subscribe(self, topic: str, session: Session) -> None:
        if self.hub.subscribe(topic, session):
            self.broker.subscribe(topic)

    def unsubscribe(self, topic: str, session: Session) -> None:
        if self.hub.unsubscribe(topic, session):
            self.broker.unsubscribe(topic)

    async def _sweep(self) -> None:
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

    # --- publishing

    async def publish(self, broadcasts: Sequence[Broadcast], endpoint: str) -> int:
        delivered = await self.broker.publish(broadcasts)
        self.metrics.published.labels(endpoint).inc(len(broadcasts))
        return delivered

    def _dispatched(self, broadcast: Broadcast, count: int) -> None:
        self.metrics.frames_delivered.inc(count)
        if broadcast.published_at is not None:
            self.metrics.publish_latency.observe(time.perf_counter() - broadcast.published_at)
