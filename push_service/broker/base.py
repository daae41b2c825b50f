"""The broker interface: publish to every node, hear what every node publishes.

A node tells the broker which topics it has local subscribers for (`subscribe` on the first,
`unsubscribe` after the last), so a node only hears the topics it needs. Presence changes of
replicated trackers travel over the same per-topic channel, as `Signal`s.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from push_service.messages import Broadcast, Position, Recovery
from push_service.presence.replicated import PresenceStore

def not_started(*args: object) -> None:
    """What a broker's callbacks are until `start` gives it the real ones."""
    raise RuntimeError("the broker was not started")


# Called on this node for each broadcast the broker delivers (the hub sends it out this loop iteration).
Deliver = Callable[[Broadcast], None]
# Called when a subscription that `subscribe` could not make effective at once is in place.
Confirmed = Callable[[str], None]
# Called with (topic, data) for presence signals from other nodes.
Signal = Callable[[str, bytes], None]


# How long `start` waits for the first connection attempt: a broker that refuses answers at once, and one
# that does not answer must not keep the node from listening (readyz answers 503 until it connects).
START_WAIT = 2.0
# Logged once per outage, with the broker's kind: the node keeps serving sockets meanwhile.
DOWN_MESSAGE = "%s unreachable: retrying until it answers (readyz and publishes answer 503 meanwhile)"


T = TypeVar("T")


def resolved(value: T) -> asyncio.Future[T]:
    """A future already done with `value`: a broker's answer when it needs no I/O, which a caller that
    cannot wait (the front door, a join) uses at once, seeing `done()`."""
    future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


class Broker(ABC):
    name: str
    # The id of this node, to tell our own signals from other nodes'.
    node_id: str = ""

    @abstractmethod
    async def start(self, deliver: Deliver, confirmed: Confirmed, signal: Signal) -> None:
        """Connect, and from now on pass every broadcast (from any node) to `deliver`."""

    @abstractmethod
    def publish(self, broadcasts: Sequence[Broadcast]) -> asyncio.Future[None]:
        """Publish in order to every node (this one included): a future, done once the broker has taken it
        (already, with the memory broker). Raises BrokerUnavailable, or the future holds it."""

    @abstractmethod
    def subscribe(self, topic: str) -> bool:
        """Start hearing `topic`. True if in effect now; False if `confirmed(topic)` will follow."""

    @abstractmethod
    def unsubscribe(self, topic: str) -> None:
        """Stop hearing `topic` (may schedule I/O; must not block)."""

    async def send_signal(self, topic: str, data: bytes) -> None:  # noqa: B027 - single-node: nobody to tell
        """Send a presence signal to the other nodes hearing `topic`."""

    def recover(self, topic: str, since: Position | None,
                limit: int | None = None) -> asyncio.Future[Recovery | None]:
        """The topic's current position and what came after `since`, None when history is off: a future,
        done at once when no I/O is needed (`resolved`). Raises BrokerUnavailable, or the future holds it."""
        return resolved(None)

    def presence_store(self, node_timeout: float) -> PresenceStore | None:
        """Where cluster-wide presence lives; None: presence is this node's alone."""
        return None

    def protocol_errors(self) -> Mapping[str, int]:
        """What this broker's connections refused of what the broker sent, by reason (metrics)."""
        return {}

    @property
    @abstractmethod
    def ready(self) -> bool:
        """Whether publishes can be accepted now."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect; no delivery after this returns."""
