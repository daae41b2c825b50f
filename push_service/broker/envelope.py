r"""How broadcasts and presence signals travel between nodes (the same bytes on Redis and NATS).

    b"B" + JSON [topic, event, published_at, position] + b"\n" + payload JSON   a broadcast
    b"S" + JSON [topic, origin node]                   + b"\n" + signal data    a presence signal

The payload goes as the bytes the publishing node encoded, so no node re-encodes it. JSON never
contains a raw newline, so the first b"\n" ends the header.
"""

from __future__ import annotations

import orjson

from push_service.errors import BrokerError
from push_service.messages import Broadcast, Position

BROADCAST = b"B"
SIGNAL = b"S"


class EnvelopeError(BrokerError, ValueError):
    """Bytes on a push channel that are not one of our envelopes (another program publishing there)."""


def pack_broadcast(broadcast: Broadcast) -> bytes:
    position = None if broadcast.position is None else str(broadcast.position)
    header = orjson.dumps([broadcast.topic, broadcast.event, broadcast.published_at, position])
    return b"".join((BROADCAST, header, b"\n", broadcast.payload_json))


def split_broadcast(broadcast: Broadcast) -> tuple[bytes, bytes]:
    """The envelope in two halves, for a broker that fills in the position itself (the Redis script):
    head + position + tail is what pack_broadcast gives for the broadcast at that position."""
    header = orjson.dumps([broadcast.topic, broadcast.event, broadcast.published_at])
    return BROADCAST + header[:-1] + b',"', b'"]\n' + broadcast.payload_json


def pack_signal(topic: str, node_id: str, data: bytes) -> bytes:
    return b"".join((SIGNAL, orjson.dumps([topic, node_id]), b"\n", data))


def unpack(message: bytes) -> Broadcast | tuple[str, str, bytes]:
    """A Broadcast, or (topic, origin node, data) for a signal."""
    kind = message[:1]
    end = message.find(b"\n")
    if end < 0 or kind not in (BROADCAST, SIGNAL):
        raise EnvelopeError("not a push-service envelope")
    body = message[end + 1:]
    try:
        header = orjson.loads(message[1:end])
        if kind == BROADCAST:
            topic, event, published_at, position = header
            return Broadcast(topic, event, body, published_at, None if position is None else Position.parse(position))
        topic, node_id = header
        return topic, node_id, body
    except (orjson.JSONDecodeError, ValueError, TypeError):
        raise EnvelopeError("bad envelope header") from None
