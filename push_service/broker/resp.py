"""RESP2, the Redis wire protocol, without I/O: commands to bytes, bytes to replies.

Only what the broker's own connections need (redis.py): commands are arrays of bulk strings;
replies are simple strings and bulk strings (bytes), integers, arrays (lists), nulls (None) and
errors (a `ReplyError` value, not raised: it answers one command, the connection goes on).
"""

from __future__ import annotations

from typing import Any

CRLF = b"\r\n"


class ReplyError(Exception):
    """An error reply (`-ERR ...`, `-NOSCRIPT ...`): the answer to one command."""

    @property
    def code(self) -> str:
        return str(self).split(" ", 1)[0]


class ProtocolError(Exception):
    """Bytes that are not RESP2: the connection cannot be trusted any more."""


def _bulk(value: bytes | str | int | float) -> bytes:
    data = value if isinstance(value, bytes) else str(value).encode()
    return b"$%d\r\n%b\r\n" % (len(data), data)


def command(*args: bytes | str | int | float) -> bytes:
    """One command, as Redis reads it: an array of bulk strings."""
    return b"*%d\r\n%b" % (len(args), b"".join([_bulk(arg) for arg in args]))


class _Incomplete(Exception):
    pass


# Reply types, by their first byte.
_BULK, _ARRAY, _INTEGER, _SIMPLE, _ERROR = b"$*:+-"


def _reply(buffer: bytes, start: int) -> tuple[Any, int]:
    """The reply that begins at `start` and where the next one begins; _Incomplete if it is cut short."""
    end = buffer.find(CRLF, start)
    if end < 0:
        raise _Incomplete
    kind, line = buffer[start], buffer[start + 1:end]
    try:
        if kind == _BULK:
            length = int(line)
            if length < 0:
                return None, end + 2
            stop = end + 2 + length
            if len(buffer) < stop + 2:
                raise _Incomplete
            if buffer[stop:stop + 2] != CRLF:
                raise ProtocolError("bulk string without its CRLF")
            return buffer[end + 2:stop], stop + 2
        if kind == _ARRAY:
            count = int(line)
            if count < 0:
                return None, end + 2
            items, position = [], end + 2
            for _ in range(count):
                item, position = _reply(buffer, position)
                items.append(item)
            return items, position
        if kind == _INTEGER:
            return int(line), end + 2
        if kind == _SIMPLE:
            return line, end + 2
        if kind == _ERROR:
            return ReplyError(line.decode(errors="replace")), end + 2
    except ValueError:
        raise ProtocolError(f"bad length or integer {line[:20]!r}") from None
    raise ProtocolError(f"unknown reply type {bytes([kind])!r}")


class Parser:
    """Feed it the bytes as they come; it returns the replies they complete, in order."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Any]:
        buffer = self._buffer + data if self._buffer else data
        replies: list[Any] = []
        position = 0
        try:
            while position < len(buffer):
                reply, position = _reply(buffer, position)
                replies.append(reply)
        except _Incomplete:
            pass
        self._buffer = buffer[position:]
        return replies
