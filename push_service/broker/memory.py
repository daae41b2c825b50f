"""One node, no network: a publish is a local dispatch, in order, before the request returns."""

from __future__ import annotations

from collections.abc import Sequence

from push_service.broker.base import Broker, BrokerUnavailable, Confirmed, Deliver, Signal
from push_service.hub import Broadcast


class MemoryBroker(Broker):
    name = "memory"

    def __init__(self) -> None:
        self._deliver: Deliver | None = None

    async def start(self, deliver: Deliver, confirmed: Confirmed, signal: Signal) -> None:
        self._deliver = deliver

    async def publish(self, broadcasts: Sequence[Broadcast]) -> None:
        deliver = self._deliver
        if deliver is None:
            raise BrokerUnavailable("broker not started")
        for broadcast in broadcasts:
            deliver(broadcast)

    def subscribe(self, topic: str) -> bool:
        return True

    def unsubscribe(self, topic: str) -> None:
        pass

    @property
    def ready(self) -> bool:
        return self._deliver is not None

    async def close(self) -> None:
        self._deliver = None
