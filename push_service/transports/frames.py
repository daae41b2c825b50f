"""RFC 6455 framing for the server side, without I/O: bytes in, messages out; messages in, bytes out.

The reader takes whatever the socket delivered (any split: half a header, three frames and a
bit) and returns complete messages. It enforces what a server must: client frames are masked,
no extension bits but RSV1 on a message's first frame when permessage-deflate was negotiated (its
payload is then inflated, within the size limit), control frames short and unfragmented, a size limit
and a frame count (MAX_FRAGMENTS) across fragments.
"""

from __future__ import annotations

import binascii
import hashlib
import struct
import zlib

from push_service.errors import ClientError

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
CONTINUATION = 0x0

# Close codes (RFC 6455 7.4.1) the reader reports.
PROTOCOL_ERROR = 1002
INVALID_DATA = 1007
TOO_BIG = 1009

# Frames one message may come in: empty fragments cost no bytes, so the size limit alone does not
# bound the work a message makes (RFC 6455 sets no limit).
MAX_FRAGMENTS = 1024
MAX_CLOSE_REASON = 123  # a control frame's payload is at most 125 bytes, 2 of them the code

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_HEADER_2 = struct.Struct("!BB")
_HEADER_4 = struct.Struct("!BBH")
_HEADER_10 = struct.Struct("!BBQ")
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_DEFLATE_TAIL = b"\x00\x00\xff\xff"  # what a sync flush ends with; RFC 7692 7.2.2 has the reader add it back


class FrameError(ClientError):
    """The peer broke the protocol; close with `code`. `messages`: the complete messages that came before
    the offending frame in the same read, which are still to be handled."""

    def __init__(self, code: int, reason: str, kind: str | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.kind = kind or ("frame_too_big" if code == TOO_BIG else "websocket_error")  # metrics label
        self.messages: list[tuple[int, bytes]] = []


def accept_key(client_key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    return accept_key_bytes(client_key.encode()).decode()


def accept_key_bytes(client_key: bytes) -> bytes:
    """accept_key in bytes, as the 101 answer is written (binascii: base64's wrappers cost more on a connect)."""
    return binascii.b2a_base64(hashlib.sha1(client_key + _GUID).digest(), newline=False)


def frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, final frame, as a server sends it."""
    size = len(payload)
    if size < 126:
        return _HEADER_2.pack(0x80 | opcode, size) + payload
    if size < 65536:
        return _HEADER_4.pack(0x80 | opcode, 126, size) + payload
    return _HEADER_10.pack(0x80 | opcode, 127, size) + payload


def frame_text(payload: bytes) -> bytes:
    # As frame(TEXT, payload), without the call: once per broadcast and wire.
    size = len(payload)
    if size < 126:
        return _HEADER_2.pack(0x81, size) + payload
    if size < 65536:
        return _HEADER_4.pack(0x81, 126, size) + payload
    return frame(TEXT, payload)


def frame_close(code: int, reason: str = "") -> bytes:
    """A Close frame; the reason is cut to fit a control frame (125 bytes), between two characters."""
    encoded = reason.encode()
    if len(encoded) > MAX_CLOSE_REASON:
        encoded = encoded[:MAX_CLOSE_REASON].decode(errors="ignore").encode()
    return frame(CLOSE, _U16.pack(code) + encoded)


def _unmask(mask: bytes | bytearray, payload: bytes | bytearray) -> bytes:
    # XOR as one big integer: C speed in CPython for the sizes a client sends (a join, a heartbeat).
    size = len(payload)
    if not size:
        return b""
    key = (mask * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(size, "little")


def _valid_close_code(code: int) -> bool:
    """What a peer may send (RFC 6455 7.4, IANA registry): 1004-1006 and 1015 are never sent in a frame."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class FrameReader:
    """Client frames -> complete messages as (opcode, payload) with opcode TEXT, BINARY, CLOSE, PING
    or PONG; fragments are joined. A CLOSE payload is returned as given (use `close_code`).

    A read that holds whole frames (the usual case) is parsed where it lies; only a frame split across
    reads is kept, in a bytearray appended to in place, so a big frame arriving in small reads costs
    time linear in its size."""

    __slots__ = ("_buffer", "_needed", "_fragments", "_fragment_opcode", "_fragment_size", "_fragment_compressed",
                 "max_size", "inflates")

    def __init__(self, max_size: int, inflates: bool = False) -> None:
        # Empty bytes until a frame is split across reads: most sockets never need the bytearray.
        self._buffer: bytes | bytearray = b""
        self._needed = 0  # buffered bytes the next frame needs before it can be complete
        self._fragments: list[bytes] | None = None
        self._fragment_opcode = 0
        self._fragment_size = 0
        self._fragment_compressed = False
        self.max_size = max_size
        self.inflates = inflates  # permessage-deflate was negotiated: RSV1 marks a compressed message

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The messages `data` completes; FrameError (with the messages before the bad frame) if the
        peer broke the protocol, after which the reader must not be fed again."""
        buffer: bytes | bytearray
        if self._buffer:
            self._buffer += data
            if len(self._buffer) < self._needed:
                return []
            buffer = self._buffer
        else:
            buffer = data
        messages: list[tuple[int, bytes]] = []
        try:
            offset, needed = self._parse(buffer, messages)
        except FrameError as exc:
            exc.messages = messages
            raise
        if offset == len(buffer):
            if buffer is self._buffer:
                self._buffer = b""
        elif buffer is self._buffer:
            # Cheap: CPython moves the start of a bytearray instead of its bytes (a non-empty _buffer is one).
            del buffer[:offset]  # type: ignore[union-attr]
        else:
            self._buffer = bytearray(memoryview(data)[offset:])
        self._needed = needed
        return messages

    def _parse(self, buffer: bytes | bytearray, messages: list[tuple[int, bytes]]) -> tuple[int, int]:
        """Append the messages the whole frames in `buffer` complete; return where the first incomplete
        frame starts, and how many bytes from there it needs (0: its header is not all there)."""
        offset, end = 0, len(buffer)
        while end - offset >= 2:
            first, second = buffer[offset], buffer[offset + 1]
            compressed = first & 0x40
            if first & 0x30 or (compressed and not self.inflates):
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
            if compressed and (opcode >= 0x8 or opcode == CONTINUATION):
                raise FrameError(PROTOCOL_ERROR, "RSV1 is set only on a data message's first frame")
            if opcode >= 0x8:
                if not final or size > 125:
                    raise FrameError(PROTOCOL_ERROR, "control frames must be final and at most 125 bytes")
            elif size + self._fragment_size > self.max_size:
                raise FrameError(TOO_BIG, "message too big")
            if end < start + size:
                return offset, start + size - offset
            payload = _unmask(buffer[start - 4:start], buffer[start:start + size])
            offset = start + size
            if opcode >= 0x8:
                if opcode not in (CLOSE, PING, PONG):
                    raise FrameError(PROTOCOL_ERROR, f"unknown opcode {opcode}")
                messages.append((opcode, payload))
            elif opcode == CONTINUATION:
                fragments = self._fragments
                if fragments is None:
                    raise FrameError(PROTOCOL_ERROR, "continuation frame without a message")
                if len(fragments) >= MAX_FRAGMENTS:
                    raise FrameError(TOO_BIG, "message in too many fragments", "too_many_fragments")
                fragments.append(payload)
                self._fragment_size += size
                if final:
                    payload = b"".join(fragments)
                    if self._fragment_compressed:
                        payload = inflate(payload, self.max_size)
                    messages.append((self._fragment_opcode, payload))
                    self._fragments, self._fragment_size = None, 0
            elif opcode in (TEXT, BINARY):
                if self._fragments is not None:
                    raise FrameError(PROTOCOL_ERROR, "new message before the fragmented one ended")
                if final:
                    messages.append((opcode, inflate(payload, self.max_size) if compressed else payload))
                else:
                    self._fragments, self._fragment_opcode, self._fragment_size = [payload], opcode, size
                    self._fragment_compressed = bool(compressed)
            else:
                raise FrameError(PROTOCOL_ERROR, f"unknown opcode {opcode}")
        return offset, 0


def inflate(data: bytes, max_size: int) -> bytes:
    """A compressed client message's payload (RFC 7692 7.2.2, no context kept between messages); FrameError
    1009 past `max_size` (a decompression bomb is stopped there, not inflated whole), 1002 when it is not
    deflate data."""
    inflater = zlib.decompressobj(-15)
    try:
        message = inflater.decompress(data + _DEFLATE_TAIL, max_size + 1)
    except zlib.error:
        raise FrameError(PROTOCOL_ERROR, "compressed message is not valid deflate data") from None
    if len(message) > max_size or inflater.unconsumed_tail:
        raise FrameError(TOO_BIG, "message too big")
    return message


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
