"""The listening socket's protocol: each connection's first request decides who serves it.

- An upgrade to /socket/websocket: transports/websocket.py. The socket never enters aiohttp.
- A POST to a publish path: a `PublishConnection`, a lean keep-alive HTTP/1.1 server for publishes.
- Anything else: aiohttp, with the bytes read so far.
- A head that is not well-formed (http1.HeadReader, on llhttp): answered 400 here, and closed.

Why: on the paths that carry the load, aiohttp's per-request and per-socket machinery cost more
than the work itself (docs/performance.md). Both HTTP front ends apply the same publish rules (publishing.py).

Request deadlines and the cap on open connections are limits.py's, for these connections and aiohttp's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import orjson

from push_service import access_log, publishing
from push_service.http1 import HeadReader, Request, has_token, json_answer, new_request_id, request_id
from push_service.limits import AiohttpConnection, Deadline, Guard
from push_service.node import Node
from push_service.publishing import ApiError
from push_service.transports import handshake, websocket

log = logging.getLogger("push_service.api")

# An idle publish connection is closed after IDLE_CHECKS idle checks without a request: 75 to 90 s
# (aiohttp's keep-alive timeout, as app.py sets it, is 75 s). Counting checks spares a clock read per
# request.
IDLE_CHECK_INTERVAL = 15.0
IDLE_CHECKS = 5


class Listener:
    """The protocol factory of the listening socket; it also keeps the publish connections, for the
    idle check (one timer for all of them) and for closing them at shutdown."""

    def __init__(self, node: Node, http: Callable[[], asyncio.Protocol]) -> None:
        self.node = node
        self.http = http  # aiohttp's own protocol factory
        self.routes = publishing.routes(node.settings)
        # Each route's series of answered-200 requests, looked up once: the label lookup is per publish.
        self.answered_ok = {path: node.metrics.http_requests.labels(path, "POST", 200) for path in self.routes}
        self.access_log = node.settings.access_log
        self._publishers: dict[PublishConnection, None] = {}
        self._idle_checker: asyncio.TimerHandle | None = None
        self.guard = Guard(node.settings, node.metrics)

    def protocol_factory(self) -> Callable[[], FrontDoor]:
        """The listening socket's protocol factory: a partial, so a connect makes no call of ours for it."""
        return functools.partial(FrontDoor, self)

    def hand_over(self, transport: asyncio.Transport, data: bytes) -> None:
        """aiohttp serves the connection from here on, starting with `data`."""
        protocol = AiohttpConnection(self.guard, self.http())
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if data:
            protocol.data_received(data)

    def publisher(self, transport: asyncio.Transport, data: bytes, reader: HeadReader) -> None:
        connection = PublishConnection(self, transport, reader)
        transport.set_protocol(connection)
        self._publishers[connection] = None
        if self._idle_checker is None:
            self._idle_checker = asyncio.get_running_loop().call_later(IDLE_CHECK_INTERVAL, self._check_idle)
        connection.data_received(data)

    def forget(self, connection: PublishConnection) -> None:
        self._publishers.pop(connection, None)

    def _check_idle(self) -> None:
        for connection in list(self._publishers):
            connection.idle_checked()
        self._idle_checker = (asyncio.get_running_loop().call_later(IDLE_CHECK_INTERVAL, self._check_idle)
                         if self._publishers else None)

    def close(self) -> None:
        """At shutdown: close the publish connections (aiohttp closes its own)."""
        for connection in list(self._publishers):
            connection.close_if_idle()
        if self._idle_checker is not None:
            self._idle_checker.cancel()
            self._idle_checker = None
        self.guard.close()


class FrontDoor(asyncio.Protocol):
    """Reads a connection's first request head and hands the connection to whoever serves it."""

    __slots__ = ("_listener", "_transport", "_head", "_waiting", "_reader", "_refused")
    _transport: asyncio.Transport

    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self._head = b""
        self._reader: HeadReader | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass, but quacks alike
        guard = self._listener.guard
        full = guard.full()
        guard.open += 1
        # A connection that does not finish its first request head in time is cut.
        self._waiting = guard.awaiting(self)
        if full:
            self._refused = guard.refuse_connection(self._transport)

    def timed_out(self) -> None:
        self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self._transport.close()
            return
        head = self._head + data if self._head else data
        reader = self._reader
        if reader is None:
            reader = self._reader = HeadReader()
        try:
            end = reader.read(head)
        except Exception as error:  # a BadRequest, or a head that breaks this code: never an exception out
            self._waiting.pop(self, None)
            self._listener.guard.bad_request(self._transport, error)
            return
        if end < 0:
            self._head = head
            return
        self._waiting.pop(self, None)
        listener = self._listener
        request: Request = reader.request  # type: ignore[assignment]  # read() returned its end: it is set
        transport = self._transport
        if request.http11 and handshake.takes(request):
            try:
                if listener.access_log:  # the address first: a refusal closes the transport
                    started, remote = time.time(), access_log.remote_address(transport)
                    status, size = websocket.accept(listener.node, transport, request, head[end:])
                    access_log.write("GET", request.path, status, started, remote, size)
                else:
                    websocket.accept(listener.node, transport, request, head[end:])
            except handshake.AskBackend as ask:  # the auth backend says, later; still an open connection
                websocket.AwaitingBackend(listener.node, listener.guard, transport, request, ask, head[end:],
                                          _access_logger(request, transport) if listener.access_log else None)
                return
            if transport.get_protocol() is not self:  # a WebSocket now: counted by the sessions' gauge
                listener.guard.open -= 1
        elif request.method == "POST" and request.path in listener.routes and not request.upgrade:
            listener.publisher(transport, head, reader)
        else:
            listener.hand_over(transport, head)

    def eof_received(self) -> bool | None:
        self._waiting.pop(self, None)
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._waiting.pop(self, None)
        guard = self._listener.guard
        guard.open -= 1
        if self._refused:
            guard.lingering -= 1


def _access_logger(request: Request, transport: asyncio.Transport) -> Callable[[int, int], None]:
    """What writes an upgrade's access log line once the auth backend has answered."""
    started, remote = time.time(), access_log.remote_address(transport)
    return lambda status, size: access_log.write("GET", request.path, status, started, remote, size)


def _mimetype(content_type: str | None) -> str:
    """As aiohttp's request.content_type: without parameters, lower case, octet-stream when absent."""
    return (content_type or "application/octet-stream").partition(";")[0].strip().lower()


class PublishConnection(asyncio.Protocol):
    """A keep-alive connection whose first request was a publish. Requests are answered in order, by the
    rules aiohttp's handlers apply; the first request that is not a plain publish (another path, a
    chunked body, `Expect`, a body over PUSH_MAX_PUBLISH_BYTES) hands the connection, from that
    request on, to aiohttp."""

    __slots__ = ("_listener", "_node", "_transport", "_buffer", "_pending", "_closed", "_idle_checks", "_reader",
                 "_waiting")

    def __init__(self, listener: Listener, transport: asyncio.Transport, reader: HeadReader) -> None:
        self._listener = listener
        self._node = listener.node
        self._transport = transport
        self._buffer = b""
        self._pending: asyncio.Task[None] | None = None  # a publish waiting for the broker
        self._closed = False
        self._idle_checks = 0  # idle checks since the last request
        self._reader = reader  # the current request's head, read or being read
        self._waiting: dict[Deadline, None] | None = None  # while a request is partly here

    def data_received(self, data: bytes) -> None:
        self._buffer = self._buffer + data if self._buffer else data
        if self._pending is None:
            self._serve()

    def _serve(self) -> None:
        routes, reader = self._listener.routes, self._reader
        while not self._closed:
            buffer = self._buffer
            if not buffer:
                return  # all answered: the next request starts with the next read
            try:
                end = reader.read(buffer)
            except Exception as error:  # as in FrontDoor.data_received
                self._close_with(error)
                return
            if end < 0:
                self._await_rest()
                return
            request: Request = reader.request  # type: ignore[assignment]  # read() returned its end: it is set
            route = routes.get(request.path)
            length = self._plain_length(request) if route is not None else None
            if route is None or length is None:
                self._hand_over()
                return
            body_end = end + length
            if len(buffer) < body_end:
                self._await_rest()  # the rest of the body is on its way
                return
            self._buffer = buffer[body_end:]
            raw = buffer[end:body_end]
            reader.finish(raw)
            self._idle_checks = 0
            if self._waiting is not None:
                self._waiting.pop(self, None)
                self._waiting = None
            pending = self._handle(route, request, raw)
            if pending is not None:
                self._pending = asyncio.create_task(pending)
                return

    def _await_rest(self) -> None:
        if self._buffer and self._waiting is None:
            self._waiting = self._listener.guard.awaiting(self)

    def timed_out(self) -> None:
        self._waiting = None
        self._closed = True
        self._listener.forget(self)
        self._listener.guard.timed_out(self._transport, "request")

    def _close_with(self, error: Exception) -> None:
        self._closed = True
        self._forget()
        self._listener.guard.bad_request(self._transport, error)

    def _plain_length(self, request: Request) -> int | None:
        """The body's length when the request is a plain publish this connection serves, else None."""
        headers = request.headers
        text = headers.get("content-length")
        if (request.method != "POST" or text is None or "transfer-encoding" in headers or "expect" in headers
                or not request.http11 or request.upgrade):
            return None
        length = int(text)  # digits only, and at most 20 of them: llhttp has checked
        return length if length <= self._node.settings.max_publish_bytes else None

    def _handle(self, route: publishing.Route, request: Request, raw: bytes) -> Coroutine[Any, Any, None] | None:
        """Answer one publish; what finishes it when the broker takes it later."""
        started = time.time()  # wall clock: carried to other nodes with the broadcast
        node, headers = self._node, request.headers
        # The common cases without a call: no X-Request-Id, no Connection header, the plain JSON type.
        given_id, connection = headers.get("x-request-id"), headers.get("connection")
        answer_id = new_request_id() if given_id is None else request_id(given_id)
        close = connection is not None and has_token(connection, "close")
        content_type = headers.get("content-type")
        try:
            authorization = headers.get("authorization")
            publishing.check_head(node.publish_keys, authorization,
                                  content_type if content_type == "application/json" else _mimetype(content_type))
            body = publishing.authorized_object(node.publish_keys, authorization, raw)
            published, delivered, accepted = publishing.publish(node, route, body, started)
            if not accepted.done():
                return self._finish(route, published, delivered, accepted, answer_id, close, started)
            publishing.check_accepted(node, route, published, accepted)
        except ApiError as error:
            self._refuse(route, error, answer_id, close, started)
            return None
        except Exception:
            self._failed(route, answer_id, started)
            return None
        self._answer(route, 200, publishing.answer(published, delivered), answer_id, close, started)
        return None

    async def _finish(self, route: publishing.Route, published: int, delivered: int,
                      accepted: asyncio.Future[None], answer_id: str, close: bool, started: float) -> None:
        try:
            await publishing.await_accepted(self._node, route, published, accepted)
        except ApiError as error:
            self._refuse(route, error, answer_id, close, started)
        except Exception:
            self._failed(route, answer_id, started)
        else:
            self._answer(route, 200, publishing.answer(published, delivered), answer_id, close, started)
        self._pending = None
        if not self._closed:
            self._serve()  # requests that came meanwhile

    def _refuse(self, route: publishing.Route, error: ApiError, answer_id: str, close: bool, started: float) -> None:
        publishing.log_refusal(error, answer_id, route.path, "POST")
        self._answer(route, error.status, orjson.dumps({"error": error.message}), answer_id, close, started,
                     error.retry_after)

    def _failed(self, route: publishing.Route, answer_id: str, started: float) -> None:
        log.exception("unhandled error", extra={"event": "http_error", "request_id": answer_id, "route": route.path})
        self._answer(route, 500, b'{"error":"internal server error"}', answer_id, True, started)

    def _answer(self, route: publishing.Route, status: int, body: bytes, answer_id: str, close: bool,
                started: float, retry_after: int | None = None) -> None:
        if status == 200:
            self._listener.answered_ok[route.path].value += 1  # as Node.count_published: no call to inc()
        else:
            self._node.metrics.http_requests.labels(route.path, "POST", status).inc()
        if self._listener.access_log:
            access_log.write("POST", route.path, access_log.CLIENT_CLOSED if self._closed else status, started,
                             access_log.remote_address(self._transport), 0 if self._closed else len(body))
        if self._closed:
            return  # the client left while the broker took the publish
        self._transport.write(json_answer(status, body, answer_id, close, retry_after))
        if close:
            self._close()

    def _hand_over(self) -> None:
        self._closed = True
        self._forget()
        self._listener.hand_over(self._transport, self._buffer)

    def _forget(self) -> None:
        self._listener.forget(self)
        if self._waiting is not None:
            self._waiting.pop(self, None)
            self._waiting = None

    def idle_checked(self) -> None:
        self._idle_checks += 1
        if self._idle_checks > IDLE_CHECKS:
            self.close_if_idle()

    def close_if_idle(self) -> None:
        if self._pending is None and not self._buffer:
            self._close()

    def _close(self) -> None:
        self._closed = True
        self._forget()
        self._transport.close()

    # --- asyncio.Protocol

    def pause_writing(self) -> None:
        self._transport.pause_reading()  # a client that sends publishes but reads no answers

    def resume_writing(self) -> None:
        self._transport.resume_reading()

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._listener.guard.open -= 1
        if not self._closed:
            self._closed = True
            self._forget()
