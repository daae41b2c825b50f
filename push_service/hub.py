"""Local fan-out: topic -> the subscribers on this node, with encode-once broadcasts.

A broadcast is serialized at most once per wire format (protocol version x transport
framing), however many subscribers it reaches; each delivery is one write of those bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from push_service.history.position import Position
from push_service.protocol import Message, Serializer


class Wire:
    """How one transport carries one protocol version: the serializer plus the transport's framing."""

    __slots__ = ("serializer", "frame")

    def __init__(self, serializer: Serializer, frame: Callable[[bytes], bytes]) -> None:
        self.serializer = serializer
        self.frame = frame

    def encode(self, message: Message) -> bytes:
        return self.frame(self.serializer.encode(message))


class Broadcast:
    """One message on its way to every local subscriber of `topic`.

    The payload travels as JSON bytes, encoded once by the node that took the publish; frames
    embed those bytes as they are, so no node parses or re-encodes a payload to deliver it.
    """

    __slots__ = ("topic", "event", "payload_json", "published_at", "position", "_encoded")

    def __init__(self, topic: str, event: str, payload_json: bytes, published_at: float | None = None,
                 position: Position | None = None) -> None:
        self.topic = topic
        self.event = event
        self.payload_json = payload_json
        # time.time() when the publish request arrived, for the publish-to-write histogram;
        # None for what the service sends of its own accord (presence diffs).
        self.published_at = published_at
        # Where it stands in the topic's history (sent as the frame's ref), when history is on.
        self.position = position
        self._encoded: dict[Wire, bytes] = {}

    @classmethod
    def of(cls, topic: str, event: str, payload: Any, published_at: float | None = None) -> Broadcast:
        return cls(topic, event, orjson.dumps(payload), published_at)

    def encoded(self, wire: Wire) -> bytes:
        try:
            return self._encoded[wire]
        except KeyError:
            ref = None if self.position is None else str(self.position)
            data = wire.frame(wire.serializer.encode_broadcast(self.topic, self.event, self.payload_json, ref))
            self._encoded[wire] = data
            return data

    @property
    def parts(self) -> tuple[Broadcast]:
        return (self,)

    @property
    def encode_count(self) -> int:
        """How many times this broadcast was serialized (once per distinct wire reached)."""
        return len(self._encoded)


class Run:
    """Consecutive broadcasts on one topic, delivered as one write: their frames, concatenated
    once per wire, so a subscriber costs one syscall however many messages came together."""

    __slots__ = ("topic", "parts", "_encoded")

    def __init__(self, parts: list[Broadcast]) -> None:
        self.topic = parts[0].topic
        self.parts = parts
        self._encoded: dict[Wire, bytes] = {}

    def encoded(self, wire: Wire) -> bytes:
        try:
            return self._encoded[wire]
        except KeyError:
            data = self._encoded[wire] = b"".join([part.encoded(wire) for part in self.parts])
            return data


class Subscriber(Protocol):
    def deliver(self, broadcast: Broadcast | Run) -> None:
        """Write the bytes of a broadcast, or of a run of them (`.parts`); must not (un)subscribe
        anything synchronously."""


class Hub:
    """Topic -> local subscribers. A dispatched broadcast is delivered at the end of the event loop's
    current iteration, together with whatever else was dispatched meanwhile (concurrent publishes,
    a batch, a burst read from the broker): consecutive broadcasts on the same topic go out as one
    Run. Order is kept: per subscriber, everything arrives in dispatch order."""

    def __init__(self, on_dispatched: Callable[[Broadcast, int], None] | None = None) -> None:
        self._topics: dict[str, dict[Subscriber, None]] = {}
        self._pending: list[Broadcast] = []
        self._on_dispatched = on_dispatched

    def subscribe(self, topic: str, subscriber: Subscriber) -> bool:
        """Add a subscriber; True when it is the topic's first on this node."""
        subscribers = self._topics.get(topic)
        if subscribers is None:
            self._topics[topic] = {subscriber: None}
            return True
        subscribers[subscriber] = None
        return False

    def unsubscribe(self, topic: str, subscriber: Subscriber) -> bool:
        """Remove a subscriber; True when the topic has no subscriber left on this node."""
        subscribers = self._topics.get(topic)
        if subscribers is None:
            return False
        subscribers.pop(subscriber, None)
        if subscribers:
            return False
        del self._topics[topic]
        return True

    def dispatch(self, broadcast: Broadcast) -> None:
        """Deliver to every local subscriber of the topic (those subscribed when the loop gets to it).
        A topic with none right now is skipped at once: one joining meanwhile has not had its reply."""
        if broadcast.topic not in self._topics:
            return
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append(broadcast)

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        on_dispatched = self._on_dispatched
        start, end = 0, len(pending)
        while start < end:
            first = pending[start]
            topic = first.topic
            stop = start + 1
            while stop < end and pending[stop].topic == topic:
                stop += 1
            subscribers = self._topics.get(topic)
            count = len(subscribers) if subscribers else 0
            if count:
                delivery = first if stop - start == 1 else Run(pending[start:stop])
                for subscriber in subscribers:  # type: ignore[union-attr]
                    subscriber.deliver(delivery)
            if count and on_dispatched is not None:
                for index in range(start, stop):
                    on_dispatched(pending[index], count)
            start = stop

    def subscriber_count(self, topic: str) -> int:
        return len(self._topics.get(topic, ()))

    def subscriber_counts(self) -> dict[str, int]:
        """Topic -> local subscribers, for every topic with any."""
        return {topic: len(subscribers) for topic, subscribers in self._topics.items()}

    @property
    def topic_count(self) -> int:
        return len(self._topics)
