"""RFC 6455 framing for the server side, without I/O: bytes in, messages out; messages in, bytes out.

The reader takes whatever the socket delivered (any split: half a header, three frames and a
bit) and returns complete messages. It enforces what a server must: client frames are masked,
no extension bits, control frames short and unfragmented, a size limit across fragments.
"""

from __future__ import annotations

import base64
import hashlib
import struct

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
CONTINUATION = 0x0

# Close codes (RFC 6455 7.4.1) the reader reports.
PROTOCOL_ERROR = 1002
INVALID_DATA = 1007
TOO_BIG = 1009

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_HEADER_2 = struct.Struct("!BB")
_HEADER_4 = struct.Struct("!BBH")
_HEADER_10 = struct.Struct("!BBQ")
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")


class FrameError(Exception):
    """The peer broke the protocol; close with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def accept_key(client_key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(client_key.encode() + _GUID).digest()).decode()


def frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, final frame, as a server sends it."""
    size = len(payload)
    if size < 126:
        return _HEADER_2.pack(0x80 | opcode, size) + payload
    if size < 65536:
        return _HEADER_4.pack(0x80 | opcode, 126, size) + payload
    return _HEADER_10.pack(0x80 | opcode, 127, size) + payload


def frame_text(payload: bytes) -> bytes:
    return frame(TEXT, payload)


def frame_close(code: int, reason: str = "") -> bytes:
    return frame(CLOSE, _U16.pack(code) + reason.encode()[:120])


def _unmask(mask: bytes, payload: bytes) -> bytes:
    # XOR as one big integer: C speed in CPython for the sizes a client sends (a join, a heartbeat).
    size = len(payload)
    if not size:
        return payload
    key = (mask * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(size, "little")


def _valid_close_code(code: int) -> bool:
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011) or 3000 <= code <= 4999


class FrameReader:
    """Client frames -> complete messages as (opcode, payload) with opcode TEXT, BINARY, CLOSE, PING
    or PONG; fragments are joined. A CLOSE payload is returned as given (use `close_code`)."""

    __slots__ = ("_buffer", "_fragments", "_fragment_opcode", "_fragment_size", "max_size")

    def __init__(self, max_size: int) -> None:
        self._buffer = b""
        self._fragments: list[bytes] | None = None
        self._fragment_opcode = 0
        self._fragment_size = 0
        self.max_size = max_size

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buffer = self._buffer + data if self._buffer else data
        messages: list[tuple[int, bytes]] = []
        offset, end = 0, len(buffer)
        while end - offset >= 2:
            first, second = buffer[offset], buffer[offset + 1]
            if first & 0x70:
                raise FrameError(PROTOCOL_ERROR, "reserved bits set without an extension")
            if not second & 0x80:
                raise FrameError(PROTOCOL_ERROR, "client frames must be masked")
            size = second & 0x7F
            start = offset + 6
            if size == 126:
                if end - offset < 4:
                    break
                size = _U16.unpack_from(buffer, offset + 2)[0]
                start = offset + 8
            elif size == 127:
                if end - offset < 10:
                    break
                size = _U64.unpack_from(buffer, offset + 2)[0]
                start = offset + 14
            opcode, final = first & 0x0F, first & 0x80
            if opcode >= 0x8:
                if not final or size > 125:
                    raise FrameError(PROTOCOL_ERROR, "control frames must be final and at most 125 bytes")
            elif size + self._fragment_size > self.max_size:
                raise FrameError(TOO_BIG, "message too big")
            if end < start + size:
                break
            payload = _unmask(buffer[start - 4:start], buffer[start:start + size])
            offset = start + size
            if opcode >= 0x8:
                if opcode not in (CLOSE, PING, PONG):
                    raise FrameError(PROTOCOL_ERROR, f"unknown opcode {opcode}")
                messages.append((opcode, payload))
            elif opcode == CONTINUATION:
                if self._fragments is None:
                    raise FrameError(PROTOCOL_ERROR, "continuation frame without a message")
                self._fragments.append(payload)
                self._fragment_size += size
                if final:
                    messages.append((self._fragment_opcode, b"".join(self._fragments)))
                    self._fragments, self._fragment_size = None, 0
            elif opcode in (TEXT, BINARY):
                if self._fragments is not None:
                    raise FrameError(PROTOCOL_ERROR, "new message before the fragmented one ended")
                if final:
                    messages.append((opcode, payload))
                else:
                    self._fragments, self._fragment_opcode, self._fragment_size = [payload], opcode, size
            else:
                raise FrameError(PROTOCOL_ERROR, f"unknown opcode {opcode}")
        self._buffer = buffer[offset:] if offset < end else b""
        return messages


def close_code(payload: bytes) -> int:
    """The code of a received CLOSE payload (1005 when it carries none); FrameError if invalid."""
    if not payload:
        return 1005
    if len(payload) == 1:
        raise FrameError(PROTOCOL_ERROR, "close frame with a one-byte payload")
    code = _U16.unpack_from(payload)[0]
    if not _valid_close_code(code):
        raise FrameError(PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        payload[2:].decode()
    except UnicodeDecodeError:
        raise FrameError(INVALID_DATA, "close reason is not UTF-8") from None
    return code
