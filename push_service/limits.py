"""Bounds on what clients may hold on the listening socket: how long a request may take to arrive, and how
many connections may be open. The front door's connections and aiohttp's (`AiohttpConnection`) share them.

- A request (head and body) not whole within PUSH_HANDSHAKE_TIMEOUT of its first byte (of the connect,
  for a connection's first request) is answered 408 and closed.
- Over PUSH_MAX_CONNECTIONS open connections, a new one is answered 503 and closed, rather than the process
  running out of files (where accept() fails and every client, /healthz included, waits).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any, Protocol, cast

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from push_service.http1 import BadRequest, json_answer, new_request_id
from push_service.node import Node

log = logging.getLogger("push_service.api")

# A partial request is cut by a sweep every timeout/HEAD_SWEEPS, so between 1 and 1 + 1/HEAD_SWEEPS
# timeouts after it began. One timer for all of them instead of one per connection: a connect is the hot
# path of a reconnect storm.
HEAD_SWEEPS = 4
# Files the process keeps for itself when PUSH_MAX_CONNECTIONS is derived from its limit of open files:
# the listening socket, broker connections, logs, the event loop's own; and refused connections, each
# open for the moment its 503 takes.
FILES_HEADROOM = 64
# Refused connections waiting to read their 503 before they close (within the headroom); beyond this many
# a refused connection is closed at once.
MAX_LINGERING = FILES_HEADROOM // 2


def default_max_connections() -> int:
    """The open-files limit, less a tenth of it (at least FILES_HEADROOM) for the process's other files."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1_000_000
    return max(1, soft - max(FILES_HEADROOM, soft // 10))


class Deadline(Protocol):
    def timed_out(self) -> None: ...


def refuse(transport: asyncio.Transport, status: int, message: str) -> None:
    """Answer `status` with a JSON error and close: what follows on the connection is not read."""
    transport.write(json_answer(status, orjson.dumps({"error": message}), new_request_id(), close=True))
    transport.close()


class Guard:
    """The request deadlines and the count of open connections, for one listening socket."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.timeout = node.settings.handshake_timeout
        self.max_connections = node.settings.max_connections or default_max_connections()
        # Open connections whose end a protocol of ours sees: front door, publish and aiohttp's. A WebSocket
        # the front door upgraded is counted by the sessions' gauge from then on.
        self.open = 0
        self.lingering = 0  # refused connections reading their 503
        self._websockets = node.metrics.connections.labels("websocket")
        # Connections in the middle of a request, by the sweep interval it began in (oldest first); the
        # last one is filling.
        self._partial: list[dict[Deadline, None]] = [{}]
        self._sweeper: asyncio.TimerHandle | None = None

    def full(self) -> bool:
        return self.open + self._websockets.value >= self.max_connections

    def refuse_connection(self, transport: asyncio.Transport) -> bool:
        """Answer a connection over the limit 503. True: it is left open until the client's first bytes
        are read (closing with them unread would reset it, and the client might never see the 503)."""
        self.node.metrics.connects_refused.labels("too_many_connections").inc()
        body = orjson.dumps({"error": f"too many open connections ({self.max_connections}, "
                                      "PUSH_MAX_CONNECTIONS); retry later or on another replica"})
        transport.write(json_answer(503, body, new_request_id(), close=True))
        if self.lingering >= MAX_LINGERING:
            transport.abort()
            return False
        self.lingering += 1
        transport.write_eof()
        return True

    def awaiting(self, connection: Deadline) -> dict[Deadline, None]:
        """Cut `connection` unless it leaves the returned set (its request came whole, or it closed) in time."""
        current = self._partial[-1]
        current[connection] = None
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self.timeout / HEAD_SWEEPS, self._sweep)
        return current

    def _sweep(self) -> None:
        partial = self._partial
        partial.append({})
        if len(partial) > HEAD_SWEEPS + 1:  # the oldest set came at least HEAD_SWEEPS intervals ago
            for connection in list(partial.pop(0)):  # a copy: a connection leaves the set as it is lost
                connection.timed_out()
        if any(partial):
            self._sweeper = asyncio.get_running_loop().call_later(self.timeout / HEAD_SWEEPS, self._sweep)
        else:
            self._partial, self._sweeper = [{}], None

    def timed_out(self, transport: asyncio.Transport, what: str) -> None:
        """A request not whole in time: 408, or a cut when the client reads no answers either."""
        self.node.metrics.client_errors.labels("request_timeout").inc()
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            refuse(transport, 408, f"{what} not received within {self.timeout:g}s (PUSH_HANDSHAKE_TIMEOUT)")

    def bad_request(self, transport: asyncio.Transport, error: Exception) -> None:
        """Answer a request head that cannot be read (a BadRequest, or anything raised reading it) and close."""
        self.node.metrics.client_errors.labels("bad_http_request").inc()
        if not isinstance(error, BadRequest):
            # Ours to fix, but the client's bytes that found it: a warning, and the client gets a 400.
            log.warning("request head not read", exc_info=error, extra={"event": "http_bad_request"})
            error = BadRequest(400, "bad request")
        elif log.isEnabledFor(logging.INFO):  # as aiohttp's refusals (logs.MalformedRequestFilter): no quote
            log.info("malformed request refused", extra={"event": "http_malformed", "status": error.status,
                                                         "error": error.message})
        refuse(transport, error.status, error.message)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


class AiohttpConnection(RequestHandler):
    """aiohttp's protocol, with the guard's deadline on a partial request head and its count of open
    connections. A request waiting for its body is the handler's (api.read_body has the same deadline)."""

    __slots__ = ("_guard", "_waiting")

    def __init__(self, guard: Guard, server: web.Server, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self._guard = guard
        self._waiting: dict[Deadline, None] | None = None

    def data_received(self, data: bytes) -> None:
        requests = self._request_count
        super().data_received(data)
        if self._request_count != requests:  # a request head came whole
            if self._waiting is not None:
                self._waiting.pop(self, None)
                self._waiting = None
        elif not self._request_in_progress and self._waiting is None:
            self._waiting = self._guard.awaiting(self)  # part of a head, and no handler at work

    def timed_out(self) -> None:
        self._waiting = None
        if self._request_in_progress or self._messages:  # its head is judged once the handler is done
            self._waiting = self._guard.awaiting(self)
            return
        if self.transport is not None:
            self._guard.timed_out(cast(asyncio.Transport, self.transport), "request head")
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._waiting is not None:
            self._waiting.pop(self, None)
            self._waiting = None
        self._guard.open -= 1
        super().connection_lost(exc)
