"""A long-poll session's connection: the frames waiting for the client's next GET.

Frames are queued as JSON string literals: the shared Wire of each protocol version serializes a
broadcast and quotes it once for every long-poll subscriber, and a poll's answer is a byte join.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson

from push_service.messages import Wire
from push_service.protocol import V1, V2
from push_service.connection import NO_SOCKET, Disconnect
from push_service.session import Session


def frame_json_string(payload: bytes) -> bytes:
    """A serialized frame as the JSON string that goes into a poll answer's `messages`."""
    return orjson.dumps(payload.decode("utf-8", "replace"))


# One Wire per protocol version, shared by every long-poll session: a broadcast is serialized
# and quoted once per version, whatever the number of long-poll subscribers.
# What one send() queues may be a Run of several frames: they are joined by "," like the queue.
WIRES = {V1: Wire(V1, frame_json_string, b","), V2: Wire(V2, frame_json_string, b",")}


class LongPollConnection:
    """A Session's view of one long-poll session: frames wait here until the client's next GET."""

    __slots__ = ("key", "token", "wire", "session", "polling", "last_poll", "gone", "sub", "address", "user_digest",
                 "_end", "_buffer_limit", "_frames", "_size", "_waiter")
    transport_name = "longpoll"

    def __init__(self, end: Callable[[LongPollConnection], None], buffer_limit: int, key: str, token: str, wire: Wire,
                 now: float, sub: str, address: str) -> None:
        self.key = key
        self.token = token
        self.wire = wire
        self.sub = sub  # whose sessions it counts among, for the caps
        self.address = address
        self.user_digest: bytes | None = None  # the hash of the user token it was opened with (longpoll_tokens.py)
        self.session: Session | None = None
        self.polling = 0  # GETs waiting right now
        self.last_poll = now  # when the last GET started or ended
        self.gone = False
        self._end = end  # the transport's: releases the session, whoever ends it
        self._buffer_limit = buffer_limit  # PUSH_SEND_BUFFER_BYTES
        self._frames: list[bytes] = []
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None

    @property
    def remote(self) -> str:
        return self.address

    @property
    def sink(self) -> LongPollConnection:
        """Connection.sink: what is sent waits here. A property, not a slot holding itself: that would be a
        reference cycle, freed only by a full collection."""
        return self

    def socket_fd(self) -> int:
        return NO_SOCKET  # a poll's answer carries the frames: nothing to write straight

    def send(self, data: bytes) -> None:
        if self.gone:
            return
        self._frames.append(data)
        self._size += len(data)
        self._wake()
        if self._size > self._buffer_limit and self.session is not None:
            self.session.overflowed()  # nobody has polled for a while and the frames pile up

    write = send  # as the sink

    def close(self, disconnect: Disconnect) -> None:
        """Server-side close (token expiry, drain, slow consumer, ...): a waiting GET answers at once."""
        self._end(self)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take(self, limit: int | None = None) -> list[bytes]:
        """The frames waiting, in order; with `limit`, only as many as fit in it (at least one): the rest
        wait for the next poll (a relayed answer must fit in one broker message)."""
        if limit is None or self._size <= limit:
            frames, self._frames, self._size = self._frames, [], 0
            return frames
        count, size = 0, 0
        for frame in self._frames:
            if count and size + len(frame) > limit:
                break
            count, size = count + 1, size + len(frame)
        frames, self._frames = self._frames[:count], self._frames[count:]
        self._size -= size
        return frames

    async def wait(self, timeout: float) -> None:
        """Until a frame is queued or the session ends, at most `timeout` seconds. A newer GET takes
        over the wake-up; an older one then waits out its window, as in Phoenix."""
        if self._frames or self.gone:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            pass
        finally:
            if self._waiter is waiter:
                self._waiter = None


def accepts_gzip(header: str | None) -> bool:
    """Whether an Accept-Encoding header accepts gzip: named with a q-value above 0, or else `*` so."""
    weights: dict[str, float] = {}
    for entry in (header or "").split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        weight = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        weights[name.lower()] = weight
    return weights.get("gzip", weights.get("*", 0.0)) > 0
