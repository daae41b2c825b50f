"""Cross-node delivery behind one small interface; `memory` is the single-node default."""

from push_service.broker.base import Broker, BrokerUnavailable
from push_service.broker.memory import MemoryBroker

__all__ = ["Broker", "BrokerUnavailable", "MemoryBroker"]
