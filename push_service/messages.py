"""The messages the service carries, and where they stand: a leaf that imports nothing of ours.

A `Broadcast` is one message for every subscriber of a topic, a `Run` several on one topic written
together, a `Wire` how one transport carries one protocol version. A `Position` (written
`<epoch>~<seq>`) is where a broadcast stands in its topic's history: the epoch changes whenever the
topic's history is lost (a memory broker restart, an evicted or expired topic), the sequence counts
the topic's broadcasts from 1. The `~` keeps it from ever looking like one of phoenix.js's own refs,
which are decimal counters. A `Recovery` is what a client missed since a position.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

_FORMAT = re.compile(r"([A-Za-z0-9_-]{1,32})~([0-9]{1,19})")  # ASCII digits only, as documented


def new_epoch() -> str:
    return secrets.token_urlsafe(6)


@dataclass(frozen=True, slots=True)
class Position:
    epoch: str
    seq: int

    def __str__(self) -> str:
        return f"{self.epoch}~{self.seq}"

    @classmethod
    def parse(cls, text: object) -> Position:
        if not isinstance(text, str) or not (match := _FORMAT.fullmatch(text)):
            raise ValueError("a position looks like <epoch>~<seq>, as sent in a broadcast's ref")
        return cls(match.group(1), int(match.group(2)))


@dataclass(slots=True)
class Recovery:
    """What a client missed since a position, and whether that is all of it."""

    position: Position                # the topic's latest position now
    recovered: bool                   # True: `messages` is exactly what was missed
    messages: list[Broadcast] = field(default_factory=list)  # after `since`, in order


class WireSerializer(Protocol):
    """A protocol version's serializer (push_service.protocol's V1 and V2), as a Wire's users see it;
    messages are push_service.protocol.Message, typed Any so this module imports nothing of ours."""

    vsn: str  # the protocol version it speaks, as a client asks for it ("1.0.0", "2.0.0")

    def decode(self, data: str | bytes) -> Any: ...

    def encode(self, message: Any) -> bytes: ...

    def encode_broadcast(self, topic: str, event: str, payload_json: bytes, ref: str | None = None) -> bytes: ...

    def encode_reply(self, join_ref: Any, ref: Any, topic: str, status: str, response: Any) -> bytes: ...


class Wire:
    """How one transport carries one protocol version: the serializer plus the transport's framing,
    and what goes between two framed messages written together (`separator`)."""

    __slots__ = ("serializer", "frame", "separator")

    def __init__(self, serializer: WireSerializer, frame: Callable[[bytes], bytes], separator: bytes = b"") -> None:
        self.serializer = serializer
        self.frame = frame
        # WebSocket frames delimit themselves; long-poll frames are elements of a JSON array.
        self.separator = separator

    def encode(self, message: Any) -> bytes:
        return self.frame(self.serializer.encode(message))


class Broadcast:
    """One message on its way to every local subscriber of `topic`.

    The payload travels as JSON bytes, encoded once by the node that took the publish; frames
    embed those bytes as they are, so no node parses or re-encodes a payload to deliver it.
    """

    __slots__ = ("topic", "event", "payload_json", "published_at", "position", "frames")

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
        # Wire -> its framed bytes, once `encoded` made them: a delivery reads them here without a call.
        self.frames: dict[Wire, bytes] = {}

    @classmethod
    def of(cls, topic: str, event: str, payload: Any, published_at: float | None = None) -> Broadcast:
        return cls(topic, event, orjson.dumps(payload), published_at)

    def encoded(self, wire: Wire) -> bytes:
        # A membership test, not try/except KeyError: every broadcast misses once per wire, and a raised
        # KeyError costs more than the test; nor dict.get, a call per delivery.
        encoded = self.frames
        if wire in encoded:
            return encoded[wire]
        ref = None if self.position is None else str(self.position)
        data = encoded[wire] = wire.frame(wire.serializer.encode_broadcast(self.topic, self.event,
                                                                           self.payload_json, ref))
        return data

    @property
    def parts(self) -> tuple[Broadcast]:
        return (self,)

    @property
    def encode_count(self) -> int:
        """How many times this broadcast was serialized (once per distinct wire reached)."""
        return len(self.frames)


class Run:
    """Consecutive broadcasts on one topic, delivered as one write: their frames, joined by the
    wire's separator once per wire, so a subscriber costs one syscall however many messages came
    together."""

    __slots__ = ("topic", "parts", "frames")

    def __init__(self, parts: list[Broadcast]) -> None:
        self.topic = parts[0].topic
        self.parts = parts
        self.frames: dict[Wire, bytes] = {}  # as Broadcast.frames

    def encoded(self, wire: Wire) -> bytes:
        encoded = self.frames
        if wire in encoded:
            return encoded[wire]
        data = encoded[wire] = wire.separator.join([part.encoded(wire) for part in self.parts])
        return data


class Subscriber(Protocol):
    def deliver(self, broadcast: Broadcast | Run) -> None:
        """Write the bytes of a broadcast, or of a run of them (`.parts`); must not (un)subscribe
        anything synchronously."""


# --- a join's `since`: the last position its client saw

BAD_SINCE = object()
# A join that asks to recover with nothing to recover from: its reply says recovered: false.
UNUSABLE_SINCE = object()


def join_since(payload: Any, history: bool) -> Position | None | object:
    """The join's `since` position; None without one; UNUSABLE_SINCE when history is off, whatever it
    holds, null included (refs are null then, so `{since: lastPos}` sends null): nothing can be vouched
    for, and a refusal would make phoenix.js rejoin in a loop; BAD_SINCE when it is not a position."""
    if not isinstance(payload, dict) or "since" not in payload:
        return None
    if not history:
        return UNUSABLE_SINCE
    if payload["since"] is None:
        return None  # history on: the join reply's position is where the client starts
    try:
        return Position.parse(payload["since"])
    except ValueError:
        return BAD_SINCE
