"""One node, no network: a publish is a local dispatch, in order, before the request returns."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from push_service.broker.base import Broker, Confirmed, Deliver, Signal, resolved
from push_service.config import Settings
from push_service.errors import BrokerUnavailable
from push_service.history.memory import MemoryHistory
from push_service.messages import Broadcast, Position, Recovery


class MemoryBroker(Broker):
    name = "memory"

    def __init__(self, settings: Settings | None = None, on_evict: Callable[[], None] | None = None) -> None:
        settings = settings or Settings()
        self._deliver: Deliver | None = None
        self._accepted: asyncio.Future[None]  # set by start()
        self._history = (MemoryHistory(settings.history_size, settings.history_ttl, settings.history_max_bytes,
                                       on_evict, max_topics=settings.history_max_topics)
                         if settings.history_size else None)

    async def start(self, deliver: Deliver, confirmed: Confirmed, signal: Signal) -> None:
        self._deliver = deliver
        self._accepted = resolved(None)  # every publish is accepted at once: one done future answers them all

    def publish(self, broadcasts: Sequence[Broadcast]) -> asyncio.Future[None]:
        deliver = self._deliver
        if deliver is None:
            raise BrokerUnavailable("broker not started")
        history = self._history
        if history is None:
            for broadcast in broadcasts:
                deliver(broadcast)
            return self._accepted
        for broadcast in broadcasts:
            history.append(broadcast)
            deliver(broadcast)
        return self._accepted

    def recover(self, topic: str, since: Position | None,
                limit: int | None = None) -> asyncio.Future[Recovery | None]:
        return resolved(None if self._history is None else self._history.recover(topic, since, limit))

    def subscribe(self, topic: str) -> bool:
        return True

    def unsubscribe(self, topic: str) -> None:
        pass

    @property
    def ready(self) -> bool:
        return self._deliver is not None

    async def close(self) -> None:
        self._deliver = None
