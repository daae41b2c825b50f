"""Stand-ins for a transport, for tests that drive a Node or a Session without sockets."""

from __future__ import annotations

from typing import Any

import orjson

from push_service.protocol import V2
from push_service.transports.websocket import WIRES


class RecordingConnection:
    """A WebSocket connection that keeps what the session wrote, as decoded Phoenix frames (`frames`)."""

    transport_name = "websocket"
    remote = "127.0.0.1"

    def __init__(self) -> None:
        self.wire = WIRES[V2]
        self.sink = self
        self.frames: list[Any] = []

    def send(self, data: bytes) -> None:
        self.frames.append(orjson.loads(data[2:] if data[1] < 126 else data[4:]))

    write = send

    def close(self, disconnect: Any) -> None:
        pass


class CountingConnection(RecordingConnection):
    """A WebSocket connection that counts what the session wrote and keeps none of it (memory tests)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0

    def send(self, data: bytes) -> None:
        self.sent += 1

    write = send


class NowhereTransport:
    """What WebSocketProtocol asks of an asyncio transport, writing nowhere and holding nothing."""

    def write(self, data: bytes) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False
