"""Cross-node delivery behind one small interface; `memory` is the single-node default."""

from __future__ import annotations

from collections.abc import Callable

from push_service.broker.base import Broker, BrokerUnavailable
from push_service.broker.memory import MemoryBroker


def create_broker(url: str, node_id: str, on_state: Callable[[bool], None]) -> Broker:
    """The broker PUSH_BROKER names; the redis and nats clients are optional extras."""
    if url == "memory":
        return MemoryBroker()
    if url.startswith(("redis://", "rediss://", "redis+sentinel://")):
        from push_service.broker.redis import RedisBroker
        return RedisBroker(url, node_id, on_state)
    if url.startswith(("nats://", "tls://")):
        from push_service.broker.nats import NatsBroker
        return NatsBroker(url, node_id, on_state)
    raise ValueError(f"unknown broker {url!r}")


__all__ = ["Broker", "BrokerUnavailable", "MemoryBroker", "create_broker"]
