"""RFC 7692 permessage-deflate, without I/O: the offer's negotiation, the server's compressed frames and
the client's decompressed messages.

The server always answers `server_no_context_takeover`: each message is compressed on its own, so a
broadcast's compressed frame is the same for every subscriber of a wire and is built once, like its plain
frame. It also asks `client_no_context_takeover` (RFC 7692 7.1.1.1 lets a server ask it of any offer), so a
client message is inflated on its own too (frames.inflate) and a socket keeps no zlib state between
messages.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

from push_service.messages import Wire, WireSerializer
from push_service.transports.frames import TEXT, frame

EXTENSION = "permessage-deflate"
# zlib refuses a raw deflate window of 8 bits (256 bytes): an offer that limits ours to it is declined.
MIN_WINDOW_BITS, MAX_WINDOW_BITS = 9, 15
_TAIL = b"\x00\x00\xff\xff"  # what a sync flush ends with; RFC 7692 7.2.1 leaves it off the wire
_LEVEL = 6  # zlib's default: the bytes saved past it cost more CPU than they save (docs/performance.md)
_MEM_LEVEL = 8


class Offer:
    """What the server answers to one permessage-deflate offer it accepts."""

    __slots__ = ("window_bits", "header")

    def __init__(self, window_bits: int, limited: bool) -> None:
        self.window_bits = window_bits  # our compressor's window (server_max_window_bits)
        # An offer's server_max_window_bits is accepted by repeating it (RFC 7692 7.1.2.1).
        limit = f"; server_max_window_bits={window_bits}" if limited else ""
        self.header = f"{EXTENSION}; server_no_context_takeover; client_no_context_takeover{limit}"


def negotiate(header: str | None) -> Offer | None:
    """The first acceptable permessage-deflate offer in a Sec-WebSocket-Extensions header, or None
    (no offer, or none we can honour: the extension is then simply not used, RFC 7692 5)."""
    if not header:
        return None
    for offer in header.split(","):
        name, *params = (part.strip() for part in offer.split(";"))
        if name.lower() == EXTENSION:
            accepted = _accept(params)
            if accepted is not None:
                return accepted
    return None


def _accept(params: list[str]) -> Offer | None:
    """The answer to one offer's parameters, or None when they are invalid or unacceptable (RFC 7692 7.1)."""
    seen: set[str] = set()
    window_bits, limited = MAX_WINDOW_BITS, False
    for param in params:
        name, has_value, value = param.partition("=")
        name, value = name.strip().lower(), value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if name in seen:
            return None
        seen.add(name)
        if name in ("server_no_context_takeover", "client_no_context_takeover"):
            if has_value:
                return None
        elif name == "server_max_window_bits":
            bits = _window_bits(value)
            if bits is None or bits < MIN_WINDOW_BITS:
                return None
            window_bits, limited = bits, True
        elif name == "client_max_window_bits":
            # The client may say it can limit its window; we inflate with the largest, so we ask nothing of it.
            if has_value and _window_bits(value) is None:
                return None
        else:
            return None
    return Offer(window_bits, limited)


def _window_bits(value: str) -> int | None:
    # RFC 7692 7.1.2: a decimal 8 to 15, no leading zero.
    if len(value) in (1, 2) and value.isdigit() and value[0] != "0" and 8 <= int(value) <= 15:
        return int(value)
    return None


def compressor(window_bits: int, min_bytes: int) -> Callable[[bytes], bytes]:
    """A wire's framing: a text frame, its payload compressed (RSV1 set) when it has at least
    `min_bytes` bytes and compressing makes it smaller."""

    def frame_deflated(payload: bytes) -> bytes:
        if len(payload) < min_bytes:
            return frame(TEXT, payload)
        deflater = zlib.compressobj(_LEVEL, zlib.DEFLATED, -window_bits, _MEM_LEVEL)
        data = deflater.compress(payload) + deflater.flush(zlib.Z_SYNC_FLUSH)
        if data.endswith(_TAIL):
            data = data[:-4]
        if len(data) >= len(payload):
            return frame(TEXT, payload)
        framed = bytearray(frame(TEXT, data))
        framed[0] |= 0x40  # RSV1: this message is compressed
        return bytes(framed)

    return frame_deflated


_WIRES: dict[tuple[WireSerializer, int, int], Wire] = {}


def deflate_wire(serializer: WireSerializer, window_bits: int, min_bytes: int) -> Wire:
    """The compressed wire for a protocol version and window, shared by every socket that negotiated it,
    so a broadcast is compressed once per wire (a few exist: two versions, a window or two)."""
    key = (serializer, window_bits, min_bytes)
    wire = _WIRES.get(key)
    if wire is None:
        wire = _WIRES[key] = Wire(serializer, compressor(window_bits, min_bytes))
    return wire
