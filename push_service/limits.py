"""Bounds on what clients may hold on the listening socket: how long a request may take to arrive, and how
many connections may be open. The front door's connections and aiohttp's (`AiohttpConnection`) share them.

- A request (head and body) not whole within PUSH_HANDSHAKE_TIMEOUT of its first byte (of the connect,
  for a connection's first request) is answered 408 and closed; cut without an answer when a handler is
  still at work on an earlier request of the connection (the 408 would be read as that one's answer).
- Over PUSH_MAX_CONNECTIONS open connections, a new one is answered 503 and closed, rather than the process
  running out of files (where accept() fails and every client, /healthz included, waits).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from typing import Protocol, cast

import httptools
import orjson

from push_service.config import Settings
from push_service.http1 import BadRequest, json_answer, new_request_id
from push_service.metrics import Metrics

log = logging.getLogger("push_service.api")

# A partial request is cut on a deadline tick, one every timeout/DEADLINE_TICKS, so between 1 and
# 1 + 1/DEADLINE_TICKS timeouts after it began. One timer for all of them instead of one per connection:
# a connect is the hot path of a reconnect storm.
DEADLINE_TICKS = 4
# uvloop (libuv) takes one connection off a listening descriptor per pass of the loop. The door watches its
# socket through this many descriptors (app.Door), so a pass in a burst of connects takes up to this many, and
# reads and answers them together (docs/performance.md, "Connects in batches").
ACCEPTS_PER_PASS = 16
# Files the process keeps for itself when PUSH_MAX_CONNECTIONS is derived from its limit of open files:
# the listening socket's descriptors, broker connections, logs, the event loop's own; and refused
# connections, each open for the moment its 503 takes, or until the end of the pass that accepted it.
FILES_HEADROOM = 64 + 2 * ACCEPTS_PER_PASS
# Refused connections waiting to read their 503 before they close (within the headroom); beyond this many
# a refused connection is closed at once.
MAX_LINGERING = 32


# The kernel grows a process's descriptor table by doubling as descriptors are opened, and while other threads
# share the table (libuv's and asyncio's worker threads do) each growth waits for an RCU grace period: the
# loop stood still 11-26 ms at 1,024, 2,048, 4,096 and 8,192 open files (docs/performance.md, "Connects in
# batches"). `reserve_descriptors` grows it once, at startup, up to this many descriptors (8 bytes each).
MAX_RESERVED_DESCRIPTORS = 1 << 16


def reserve_descriptors(count: int) -> int:
    """Grow the descriptor table to hold `count` descriptors (capped by the open-files limit and
    MAX_RESERVED_DESCRIPTORS) before clients come; returns the size asked for, 0 where it cannot be done."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    count = min(count, MAX_RESERVED_DESCRIPTORS, soft if soft != resource.RLIM_INFINITY else count)
    try:
        import fcntl
        probe = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except (ImportError, OSError):  # not POSIX
        return 0
    try:
        os.close(fcntl.fcntl(probe, fcntl.F_DUPFD_CLOEXEC, count - 1))  # the lowest free one from there: never a used one
    except OSError as exc:
        log.warning("descriptor table not reserved", extra={"event": "reserve_descriptors", "error": str(exc)})
        return 0
    finally:
        os.close(probe)
    return count


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

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.metrics = metrics
        self.timeout = settings.handshake_timeout
        self.max_connections = settings.max_connections or default_max_connections()
        # Open connections whose end a protocol of ours sees: front door, publish and aiohttp's. A WebSocket
        # the front door upgraded is counted by the sessions' gauge from then on.
        self.open = 0
        self.lingering = 0  # refused connections reading their 503
        self._websockets = metrics.connections.labels("websocket")
        # Connections in the middle of a request, by the tick interval it began in (oldest first); the
        # last one is filling.
        self._partial: list[dict[Deadline, None]] = [{}]
        self._ticker: asyncio.TimerHandle | None = None

    def full(self) -> bool:
        return self.open + self._websockets.value >= self.max_connections

    def refuse_connection(self, transport: asyncio.Transport) -> bool:
        """Answer a connection over the limit 503. True: it is left open until the client's first bytes
        are read (closing with them unread would reset it, and the client might never see the 503)."""
        self.metrics.connects_refused.labels("too_many_connections").inc()
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
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().call_later(self.timeout / DEADLINE_TICKS, self._tick)
        return current

    def _tick(self) -> None:
        partial = self._partial
        partial.append({})
        if len(partial) > DEADLINE_TICKS + 1:  # the oldest set came at least DEADLINE_TICKS intervals ago
            for connection in list(partial.pop(0)):  # a copy: a connection leaves the set as it is lost
                connection.timed_out()
        if any(partial):
            self._ticker = asyncio.get_running_loop().call_later(self.timeout / DEADLINE_TICKS, self._tick)
        else:
            self._partial, self._ticker = [{}], None

    def timed_out(self, transport: asyncio.Transport, what: str, answer: bool = True) -> None:
        """A request not whole in time: 408, or a cut when the client reads no answers either (or `answer`
        is False)."""
        self.metrics.client_errors.labels("request_timeout").inc()
        if not answer or transport.get_write_buffer_size():
            transport.abort()
        else:
            refuse(transport, 408, f"{what} not received within {self.timeout:g}s (PUSH_HANDSHAKE_TIMEOUT)")

    def bad_request(self, transport: asyncio.Transport, error: Exception) -> None:
        """Answer a request head that cannot be read (a BadRequest, or anything raised reading it) and close."""
        self.metrics.client_errors.labels("bad_http_request").inc()
        if not isinstance(error, BadRequest):
            # Ours to fix, but the client's bytes that found it: a warning, and the client gets a 400.
            log.warning("request head not read", exc_info=error, extra={"event": "http_bad_request"})
            error = BadRequest(400, "bad request")
        elif log.isEnabledFor(logging.INFO):  # as aiohttp's refusals (logs.MalformedRequestFilter): no quote
            log.info("malformed request refused", extra={"event": "http_malformed", "status": error.status,
                                                         "error": error.message})
        refuse(transport, error.status, error.message)

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None


class AiohttpConnection(asyncio.Protocol):
    """aiohttp's protocol (from web.Server, its public factory), wrapped: every byte passes through here first,
    to an httptools parser of our own beside aiohttp's, which says when a request begins and when it is whole.
    The guard's deadline runs from a request's first byte to its last (head and body), whatever aiohttp's
    handler is doing; a request our parser refuses is aiohttp's to answer. Behind an upgrade head, the bytes
    that follow are kept for `taken_over` (websocket_aiohttp.handle)."""

    __slots__ = ("handled", "handling", "deadline_passed", "_begun", "_guard", "_http", "_parser", "_transport",
                 "_waiting", "_tail", "_upgraded")

    def __init__(self, guard: Guard, http: asyncio.Protocol) -> None:
        # Requests given to aiohttp's handlers so far, and which of them (1, 2...) one is at work on, or 0: set
        # by api.errors_and_metrics. aiohttp handles a connection's requests one at a time, in order.
        self.handled = self.handling = 0
        self.deadline_passed = False  # the connection was cut for a request not whole in time
        self._begun = 0  # requests begun (as handled, counted from 1)
        self._guard = guard
        self._http = http
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiting: dict[Deadline, None] | None = None
        # After an upgrade head: what followed it (None before one, and once past MAX_UPGRADE_TAIL).
        self._tail: bytes | None = None
        self._upgraded = False

    # --- httptools callbacks

    def on_message_begin(self) -> None:
        self._begun += 1
        if self._waiting is None:
            self._waiting = self._guard.awaiting(self)

    def on_message_complete(self) -> None:
        self._stop_clock()

    # --- asyncio.Protocol, forwarded

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        AIOHTTP_CONNECTIONS[transport] = self
        self._http.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        tail = self._tail
        if tail:
            self._tail = tail + data if len(tail) <= MAX_UPGRADE_TAIL else None
        elif tail is not None:
            self._tail = data
        if self._parser is not None:
            self._parse(data)
        self._http.data_received(data)

    def _parse(self, data: bytes) -> None:
        while self._parser is not None:
            try:
                self._parser.feed_data(data)
                return
            except httptools.HttpParserUpgrade as upgrade:
                # What follows is either taken over (websocket_aiohttp.handle) or, the upgrade declined, read by
                # aiohttp as further requests: a new parser reads it as requests too.
                data = data[upgrade.args[0]:]
                self._parser, self._tail, self._upgraded = httptools.HttpRequestParser(self), data, True
            except httptools.HttpParserError:
                # aiohttp's parser judges the same bytes and answers (a 400 closes the connection). What it
                # lets through keeps the clock running: a connection we cannot read ends at the deadline.
                self._parser = None

    def eof_received(self) -> bool | None:
        return self._http.eof_received()

    def pause_writing(self) -> None:
        self._http.pause_writing()

    def resume_writing(self) -> None:
        self._http.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        self._http.connection_lost(exc)

    # --- ours

    def timed_out(self) -> None:
        self._waiting = None
        transport = self._transport
        if transport is not None and not transport.is_closing():
            self.deadline_passed = True
            # A 408 now would be read as the answer to an earlier request a handler is still at work on.
            earlier_at_work = 0 < self.handling < self._begun
            self._guard.timed_out(transport, "request", answer=not earlier_at_work)

    def _stop_clock(self) -> None:
        if self._waiting is not None:
            self._waiting.pop(self, None)
            self._waiting = None

    def _forget(self) -> None:
        """No longer counted: the connection is lost, or a protocol of ours took it over."""
        if self._transport is not None:
            AIOHTTP_CONNECTIONS.pop(self._transport, None)
            self._transport = None
            self._stop_clock()
            self._guard.open -= 1

    def upgrade_tail(self) -> bytes | None:
        tail, self._tail = self._tail, None
        self._forget()
        return tail if tail is not None or not self._upgraded else None


# aiohttp's connections by transport: for websocket_aiohttp.handle to take one over, and for api.errors_and_metrics
# to say when a handler is at work on one.
AIOHTTP_CONNECTIONS: dict[asyncio.BaseTransport, AiohttpConnection] = {}
# Bytes kept behind an upgrade head until its handler runs (aiohttp pauses reading at as many); past this
# much, they are let go, and a takeover refused.
MAX_UPGRADE_TAIL = 65536


def taken_over(transport: asyncio.BaseTransport) -> bytes | None:
    """websocket_aiohttp.handle takes the connection from aiohttp: what the client sent behind its upgrade head (None
    if that was more than MAX_UPGRADE_TAIL). The connection is no longer counted here (the sessions' gauge
    counts it)."""
    connection = AIOHTTP_CONNECTIONS.get(transport)
    return connection.upgrade_tail() if connection is not None else b""
