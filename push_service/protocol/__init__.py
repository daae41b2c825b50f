"""Phoenix Channels wire protocol: pure encode/decode, no I/O.

`Message` is one frame in either direction; `V1` and `V2` are the two serializers
Phoenix negotiates by the `vsn` query parameter.
"""

from push_service.protocol.message import (
    CLOSE,
    ERROR,
    HEARTBEAT,
    JOIN,
    LEAVE,
    PHOENIX_TOPIC,
    REPLY,
    Message,
)
from push_service.errors import ProtocolError
from push_service.protocol.serializers import V1, V2, Serializer, negotiate

__all__ = [
    "CLOSE", "ERROR", "HEARTBEAT", "JOIN", "LEAVE", "PHOENIX_TOPIC", "REPLY",
    "Message", "ProtocolError", "Serializer", "V1", "V2", "negotiate",
]
