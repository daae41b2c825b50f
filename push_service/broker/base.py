"""The broker interface: publish to every node, hear what every node publishes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from push_service.hub import Broadcast

# Called on this node for each broadcast the broker delivers; returns local subscribers reached.
Deliver = Callable[[Broadcast], int]


class BrokerUnavailable(Exception):
    """The broker cannot take a publish now; the API answers 503 so the backend can retry."""


class Broker(ABC):
    name: str

    @abstractmethod
    async def start(self, deliver: Deliver) -> None:
        """Connect, and from now on pass every broadcast (from any node) to `deliver`."""

    @abstractmethod
    async def publish(self, broadcasts: Sequence[Broadcast]) -> int:
        """Publish in order to all nodes; returns subscribers reached on this node. Raises BrokerUnavailable."""

    def subscribe(self, topic: str) -> None:  # noqa: B027 - a no-op for single-node brokers
        """This node now has a local subscriber for `topic` (may schedule I/O; must not block)."""

    def unsubscribe(self, topic: str) -> None:  # noqa: B027
        """This node's last local subscriber of `topic` left (may schedule I/O; must not block)."""

    @property
    @abstractmethod
    def ready(self) -> bool:
        """Whether publishes can be accepted now."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect; no delivery after this returns."""
