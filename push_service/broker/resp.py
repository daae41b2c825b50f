"""RESP2, the Redis wire protocol, without I/O: commands to bytes, bytes to replies, on hiredis.

hiredis (the C parser redis-py itself prefers; the redis extra installs it, so there is no
pure-Python fallback) reads the replies and packs the commands. What the broker's own connections
(redis_connection.py) get: simple and bulk strings as bytes, integers, arrays as lists, nulls as
None, and errors as a `ReplyError` value (not raised: it answers one command, the connection goes
on). Bytes that are not RESP raise RespProtocolError.

hiredis also reads RESP3's types, which Redis never sends a RESP2 client; they would come through as
values (True, 1.5, a dict) that answer nothing the broker asks. It skips the two bytes after a bulk
string unchecked: a length that lies shows up as a bad type byte at the next reply.

What one reply may hold, since a broken or hostile server could announce a reply that never ends:
- MAX_REPLY_BYTES of wire bytes: twice what Redis itself queues for a pub/sub client by default
  (client-output-buffer-limit pubsub 32mb), so no message Redis delivers under its defaults is refused;
- of those, MAX_PARSED_BYTES already parsed into the elements of an unfinished array: small elements
  weigh about 20 times their bytes as Python objects, and the broker's arrays are a few elements;
- arrays nested at most 1024 deep (hiredis's own limit), and announcing no more elements than memory
  can hold pointers for (hiredis allocates the list when the length comes).
The bounds are checked after each read, so a reply may pass one by a read (asyncio's: 256 KiB) before
ReplyTooLarge is raised.
"""

from __future__ import annotations

from typing import Any

from push_service.errors import BrokerError

try:
    from hiredis import Reader, pack_command  # pack_command: hiredis 3.0 or later
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("PUSH_BROKER=redis://... needs the redis extra (hiredis 3 or later): "
                      "pip install 'push-service[redis]'") from exc

MAX_REPLY_BYTES = 64 * 1024 * 1024
MAX_PARSED_BYTES = 1024 * 1024


class ReplyError(BrokerError):
    """An error reply (`-ERR ...`, `-NOSCRIPT ...`): the answer to one command."""

    @property
    def code(self) -> str:
        return str(self).split(" ", 1)[0]


class RespProtocolError(BrokerError):
    """Bytes that are not RESP2: the connection cannot be trusted any more."""


class ReplyTooLarge(RespProtocolError):
    """A reply past what one reply may hold (see the module's docstring)."""


# One command given as a tuple, as Redis reads it: an array of bulk strings (str as UTF-8, numbers as
# their str()); TypeError for anything else.
pack = pack_command


def command(*args: bytes | str | int | float) -> bytes:
    """One command, as Redis reads it."""
    return pack(args)  # type: ignore[arg-type]  # hiredis's stub declares a one-element tuple


FEED_SLICE = 16 * 1024  # what hiredis's own client reads at a time
_INCOMPLETE = object()  # what the reader gives while no reply is complete (False could be a RESP3 reply)


class Parser:
    """Feed it the bytes as they come; it returns the replies they complete, in order."""

    __slots__ = ("_reader", "_partial")

    def __init__(self) -> None:
        self._reader = Reader(protocolError=RespProtocolError, replyError=ReplyError, notEnoughData=_INCOMPLETE)
        self._partial = 0  # bytes fed since a reply was last completed

    def feed(self, data: bytes) -> list[Any]:
        reader = self._reader
        replies: list[Any] = []
        size = len(data)
        try:
            if size <= FEED_SLICE:
                reader.feed(data)
                while (reply := reader.gets()) is not _INCOMPLETE:
                    replies.append(reply)
            else:
                self._feed_sliced(data, replies)
        except MemoryError:  # hiredis allocates an array's list as soon as its length is announced
            raise ReplyTooLarge("a reply too large: an array of more elements than memory holds") from None
        if replies:
            # What follows the last complete reply in `data` is not counted: the bounds' one read of slack.
            self._partial = 0
        else:
            self._partial += size
            if self._partial > MAX_PARSED_BYTES:
                self._check_bounds()
        return replies

    def _feed_sliced(self, data: bytes, replies: list[Any]) -> None:
        # Slice by slice: each reply taken moves what is left of hiredis's buffer to its start.
        reader, size = self._reader, len(data)
        for offset in range(0, size, FEED_SLICE):
            reader.feed(data, offset, min(FEED_SLICE, size - offset))
            while (reply := reader.gets()) is not _INCOMPLETE:
                replies.append(reply)

    def _check_bounds(self) -> None:
        if self._partial > MAX_REPLY_BYTES:
            raise ReplyTooLarge(f"a reply too large: over {MAX_REPLY_BYTES >> 20} MiB")
        # What the reader still buffers is unparsed; the rest of the reply's bytes are parsed elements.
        if self._partial - self._reader.len() > MAX_PARSED_BYTES:
            raise ReplyTooLarge(f"a reply too large: an array of over {MAX_PARSED_BYTES >> 20} MiB of elements")
