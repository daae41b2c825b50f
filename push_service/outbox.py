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
from typing import Protocol

log = logging.getLogger("push_service.websocket")


class Flushable(Protocol):
    def flush(self) -> None:
        """Write what waits; nothing if it was written or dropped meanwhile."""


class Outbox:
    """The connections with answers waiting for the end of the pass: one per node, so one per loop."""

    __slots__ = ("_waiting",)

    def __init__(self) -> None:
        self._waiting: list[Flushable] = []

    def add(self, connection: Flushable) -> None:
        """Flush `connection` at the end of this pass (the loop runs what is scheduled now after its reads)."""
        if not self._waiting:
            asyncio.get_running_loop().call_soon(self._flush)
        self._waiting.append(connection)

    def _flush(self) -> None:
        waiting, self._waiting = self._waiting, []
        for connection in waiting:
            try:
                connection.flush()
            except Exception:  # one connection's failure must not leave the others' answers unsent
                log.exception("flush failed", extra={"event": "socket_error"})
