"""What the reads of one pass of the event loop answer, written together at the end of the pass.

In a burst of connects, a pass of the loop reads many sockets. Writing each answer as it is made wakes the
peer once per answer, and on one host the writer pays for every wakeup: about 15% of a connect's CPU
(docs/performance.md, "Connects in batches"). Written back to back at the end of the pass, the first write
wakes the peer and the others find it awake. A socket's answers still go out in one write and in order, and
none waits longer than the pass: a quiet server's passes are one read long.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Protocol

log = logging.getLogger("push_service.websocket")


class Flushable(Protocol):
    def flush(self) -> None:
        """Write what waits; nothing if it was written or dropped meanwhile."""


class Outbox:
    """The connections with answers waiting for the end of the pass, on one loop."""

    __slots__ = ("_loop", "_waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiting: list[Flushable] = []

    def add(self, connection: Flushable) -> None:
        """Flush `connection` at the end of this pass (the loop runs what is scheduled now after its reads)."""
        if not self._waiting:
            self._loop.call_soon(self._flush)
        self._waiting.append(connection)

    def _flush(self) -> None:
        waiting, self._waiting = self._waiting, []
        for connection in waiting:
            try:
                connection.flush()
            except Exception:  # one connection's failure must not leave the others' answers unsent
                log.exception("flush failed", extra={"event": "socket_error"})


_OUTBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Outbox] = weakref.WeakKeyDictionary()


def running_outbox() -> Outbox:
    """The running loop's outbox."""
    loop = asyncio.get_running_loop()
    outbox = _OUTBOXES.get(loop)
    if outbox is None:
        outbox = _OUTBOXES[loop] = Outbox(loop)
    return outbox
