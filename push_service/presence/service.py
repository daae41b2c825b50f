"""Presence as the session sees it: track on join, untrack on leave, typing, batched diffs.

Which topics are tracked, what a meta holds and how `user:typing` behaves live here, so the
session only asks "is this topic tracked?" and hands over the events.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

from push_service.messages import Broadcast
from push_service.presence.base import Diff, Metas, Tracker, state_payload
from push_service.presence.diffs import DiffBatcher
from push_service.presence.memory import MemoryTracker
from push_service.presence.replicated import ReplicatedTracker
from push_service.topics import Topic, parse_topic

if TYPE_CHECKING:
    from collections.abc import Callable

    from push_service.auth import Identity
    from push_service.broker.base import Broker
    from push_service.config import Settings
    from push_service.metrics import Metrics

PRESENCE_STATE = "presence_state"
PRESENCE_DIFF = "presence_diff"
TYPING_EVENT = "user:typing"
TYPING_RATE = 5.0   # typing updates per second per connection, sustained
TYPING_BURST = 5.0  # and in a burst


# phoenix.js 1.6 and 1.7 Presence keep presences in plain objects, so a key that names an Object.prototype
# member breaks syncState/syncDiff in every client on the topic. Such a key gets a "~" in front, and so does
# one already starting with "~", so that distinct subs stay distinct keys.
PROTOTYPE_MEMBERS = frozenset((
    "__proto__", "constructor", "hasOwnProperty", "isPrototypeOf", "propertyIsEnumerable", "toLocaleString",
    "toString", "valueOf", "__defineGetter__", "__defineSetter__", "__lookupGetter__", "__lookupSetter__"))
KEY_ESCAPE = "~"


def presence_key(sub: str) -> str:
    """The presence key of a user: the JWT `sub`, escaped where it would break JS clients."""
    if sub in PROTOTYPE_MEMBERS or sub.startswith(KEY_ESCAPE):
        return KEY_ESCAPE + sub
    return sub


class Member(Protocol):
    """A connection as presence sees it (session.Session is one)."""

    @property
    def id(self) -> str: ...
    @property
    def identity(self) -> Identity: ...


class TypingBudget:
    """A token bucket: TYPING_RATE a second, up to TYPING_BURST at once."""

    __slots__ = ("tokens", "stamp")

    def __init__(self, now: float) -> None:
        self.tokens = TYPING_BURST
        self.stamp = now

    def take(self, now: float) -> bool:
        self.tokens = min(TYPING_BURST, self.tokens + (now - self.stamp) * TYPING_RATE)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class Presence:
    def __init__(self, settings: Settings, metrics: Metrics, node_id: str,
                 dispatch: Callable[[Broadcast], None], busy: Callable[[str], bool] = lambda topic: False) -> None:
        self.families = frozenset(settings.presence_topics)
        self._typing_timeout = settings.typing_timeout
        self._node_timeout = settings.node_timeout
        self._metrics = metrics
        self._dispatch = dispatch
        self._batcher = DiffBatcher(settings.presence_diff_interval, self._send_diff, busy)
        # Replaced by a replicated tracker in start() when the broker offers a presence store.
        self.tracker: Tracker = MemoryTracker(node_id, self._batcher.add)
        # (conn_id, topic) -> when its typing: true lapses
        self._typing_until: dict[tuple[str, str], float] = {}
        self._budgets: dict[str, TypingBudget] = {}
        metrics.presences.set_function(lambda: self.tracker.size)

    def tracks(self, topic: Topic) -> bool:
        return topic.family in self.families

    def join(self, session: Member, topic: str) -> dict[str, Any]:
        """Track the session on `topic`; returns the presence_state payload for the joiner."""
        identity = session.identity
        meta = {**identity.info, "online_at": str(int(time.time()))}
        self.tracker.track(topic, session.id, presence_key(identity.sub), meta)
        return state_payload(self.tracker.list(topic))

    def leave(self, session: Member, topic: str) -> None:
        self._typing_until.pop((session.id, topic), None)
        self.tracker.untrack(topic, session.id)

    def forget(self, session: Member) -> None:
        self._budgets.pop(session.id, None)

    def typing(self, session: Member, topic: str, payload: Any) -> tuple[str, dict[str, Any]]:
        """Handle `user:typing`; returns the (status, response) of the reply."""
        if not isinstance(payload, dict) or not isinstance(payload.get("typing"), bool):
            self._metrics.client_errors.labels("bad_typing").inc()
            return "error", {"reason": "typing must be a boolean"}
        username = payload.get("username")
        if username is not None and not isinstance(username, str):
            self._metrics.client_errors.labels("bad_typing").inc()
            return "error", {"reason": "username must be a string"}
        now = time.monotonic()
        budget = self._budgets.get(session.id)
        if budget is None:
            budget = self._budgets[session.id] = TypingBudget(now)
        if not budget.take(now):
            self._metrics.typing_dropped.inc()
            return "error", {"reason": "rate limited"}
        typing = payload["typing"]
        changes: dict[str, Any] = {"typing": typing}
        # The token's `info` is what the backend vouches for: a client cannot rename itself.
        if username is not None and "username" not in session.identity.info:
            changes["username"] = username
        self.tracker.update(topic, session.id, changes)
        if typing:
            self._typing_until[(session.id, topic)] = now + self._typing_timeout
        else:
            self._typing_until.pop((session.id, topic), None)
        return "ok", {}

    def expire_typing(self, now: float) -> None:
        """Clear every typing: true that was not refreshed in time (called by the node's expiry timer)."""
        lapsed = [entry for entry, until in self._typing_until.items() if until <= now]
        for conn_id, topic in lapsed:
            del self._typing_until[(conn_id, topic)]
            self.tracker.update(topic, conn_id, {"typing": False})

    def list(self, topic: str) -> Metas:
        return self.tracker.list(topic)

    async def cluster_list(self, topic: str) -> Metas:
        """Everyone present on `topic` on any node (PresenceUnavailable when the broker cannot tell)."""
        return await self.tracker.cluster_list(topic)

    def _send_diff(self, topic: str, diff: Diff) -> None:
        self._metrics.presence_diffs.inc()
        self._dispatch(Broadcast.of(topic, PRESENCE_DIFF, diff.payload()))

    # --- replication (no-ops with the in-memory tracker)

    def needs_load(self, topic: str) -> bool:
        """Whether a first local join of `topic` must wait for the cluster's presence of it."""
        parsed = parse_topic(topic)
        return parsed is not None and self.tracks(parsed) and self.tracker.needs_load(topic)

    async def load(self, topic: str) -> None:
        await self.tracker.load(topic)

    async def resync(self, topic: str) -> None:
        await self.tracker.resync(topic)

    def drop_replica(self, topic: str) -> None:
        self.tracker.drop_replica(topic)

    def signal(self, topic: str, data: bytes) -> None:
        self.tracker.signal(topic, data)

    async def start(self, broker: Broker) -> None:
        store = broker.presence_store(self._node_timeout)
        if store is not None:
            self.tracker = ReplicatedTracker(self.tracker.node_id, self._batcher.add, store,
                                             broker.send_signal, self._node_timeout)
        await self.tracker.start()

    async def close(self) -> None:
        self._batcher.close()
        await self.tracker.close()
