"""One node, no network: a publish is a local dispatch, in order, before the request returns."""

from __future__ import annotations

from collections.abc import Sequence

from push_service.broker.base import Broker, BrokerUnavailable, Deliver
from push_service.hub import Broadcast


class MemoryBroker(Broker):
    name = "memory"

    def __init__(self) -> None:
        self._deliver: Deliver | None = None

    async def start(self, deliver: Deliver) -> None:
        self._deliver = deliver

    async def publish(self, broadcasts: Sequence[Broadcast]) -> int:
        deliver = self._deliver
        if deliver is None:
            raise BrokerUnavailable("broker not started")
        return sum(deliver(broadcast) for broadcast in broadcasts)

    @property
    def ready(self) -> bool:
        return self._deliver is not None

    async def close(self) -> None:
        self._deliver = None
