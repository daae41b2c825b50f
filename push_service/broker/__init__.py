"""Cross-node delivery behind one small interface; `memory` is the single-node default."""

from __future__ import annotations

from collections.abc import Callable

from push_service.broker.base import Broker
from push_service.broker.memory import MemoryBroker
from push_service.config import Settings
from push_service.errors import BrokerUnavailable


def create_broker(settings: Settings, node_id: str, on_state: Callable[[bool], None],
                  on_evict: Callable[[], None]) -> Broker:
    """The broker PUSH_BROKER names; the redis and nats clients are optional extras."""
    url = settings.broker
    if url == "memory":
        return MemoryBroker(settings, on_evict)
    if url.startswith("redis+cluster://"):
        from push_service.broker.redis_cluster import RedisClusterBroker
        return RedisClusterBroker(url, node_id, on_state, settings)
    if url.startswith(("redis://", "rediss://")):
        from push_service.broker.redis import RedisBroker
        return RedisBroker(url, node_id, on_state, settings)
    if url.startswith(("nats://", "tls://")):
        from push_service.broker.nats import NatsBroker
        return NatsBroker(url, node_id, on_state, settings)
    raise ValueError(f"unknown broker {url!r}")


__all__ = ["Broker", "BrokerUnavailable", "MemoryBroker", "create_broker"]
