"""Who is on a topic, Phoenix Presence-compatible, behind a small Tracker interface."""

from push_service.presence.base import Diff, Metas, Tracker, new_phx_ref
from push_service.presence.diffs import DiffBatcher
from push_service.presence.memory import MemoryTracker
from push_service.presence.service import PRESENCE_STATE, TYPING_EVENT, Presence

__all__ = ["PRESENCE_STATE", "TYPING_EVENT", "Diff", "DiffBatcher", "MemoryTracker", "Metas", "Presence", "Tracker",
           "new_phx_ref"]
