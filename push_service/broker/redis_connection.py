"""The Redis broker's two hot connections, on RESP2 (resp.py, hiredis) straight over an asyncio transport.

Not redis-py here: its pipeline and pub/sub tasks doubled the CPU of a publish (docs/performance.md).
Here the commands asked for during a loop turn are written together at its end, each reply
resolves its future in the callback that reads it, and a pub/sub message reaches the hub in the
read that brings it.
A connection that gets what it cannot trust (not RESP2, a reply past resp.py's bounds, an answer to
no command) is given up with a warning, and the broker reconnects; a push that `on_push` fails on is
dropped with a warning, and the rest of the read goes on. Both are counted in PROTOCOL_ERRORS.
redis-py still serves everything else (history reads, presence), and reads the URL for us (`parse_url`), so
`redis://` and `rediss://` mean what they mean to redis-py; the TLS context is built here from the URL's
`ssl_*` options with redis-py's documented defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio.connection import parse_url

from push_service.broker import resp
from push_service.errors import BrokerError

log = logging.getLogger("push_service.broker")

PING_INTERVAL = 1.0    # connection health check
PING_TIMEOUT = 3.0     # no pong for this long: the connection is dead, reconnect
COMMAND_TIMEOUT = 2.0  # connecting, or publishes answered by nothing for this long: reconnect (they fail, 503)

# What Redis sent that a connection could not use, by reason, in this process: not_resp2,
# reply_too_large, unasked_reply (the connection given up), bad_push (that push dropped).
PROTOCOL_ERRORS: Counter[str] = Counter()


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    tls: ssl.SSLContext | None


def endpoint(url: str) -> Endpoint:
    """Where and how to connect, read from a redis:// or rediss:// URL by redis-py's own rules."""
    options: dict[str, Any] = dict(parse_url(url))
    context = tls_context(options) if url[:9].lower() == "rediss://" else None
    return Endpoint(options.get("host", "localhost"), int(options.get("port", 6379)), int(options.get("db", 0)),
                    options.get("username"), options.get("password"), context)


CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def tls_context(options: dict[str, Any]) -> ssl.SSLContext:
    """The context redis-py's SSLConnection makes of a rediss:// URL's `ssl_*` options (its defaults: the
    server's certificate required and its host name checked, against the system's CAs unless ssl_ca_certs,
    ssl_ca_path or ssl_ca_data name others)."""
    cert_reqs = options.get("ssl_cert_reqs", "required")
    if isinstance(cert_reqs, str):
        if cert_reqs.lower() not in CERT_REQS:
            raise ValueError(f"ssl_cert_reqs={cert_reqs!r}: expected none, optional or required")
        cert_reqs = CERT_REQS[cert_reqs.lower()]
    context = ssl.create_default_context()
    # No host name to check when no certificate is: ssl refuses check_hostname without CERT_REQUIRED/OPTIONAL.
    context.check_hostname = bool(options.get("ssl_check_hostname", True)) and cert_reqs != ssl.CERT_NONE
    context.verify_mode = cert_reqs
    for flag in options.get("ssl_include_verify_flags") or ():
        context.verify_flags |= flag
    for flag in options.get("ssl_exclude_verify_flags") or ():
        context.verify_flags &= ~flag
    certfile, keyfile = options.get("ssl_certfile"), options.get("ssl_keyfile")
    if certfile:
        context.load_cert_chain(certfile=certfile, keyfile=keyfile, password=options.get("ssl_password"))
    elif keyfile:
        raise ValueError("ssl_keyfile needs ssl_certfile")
    cafile, capath, cadata = options.get("ssl_ca_certs"), options.get("ssl_ca_path"), options.get("ssl_ca_data")
    if cafile or capath or cadata:
        context.load_verify_locations(cafile=cafile, capath=capath, cadata=cadata)
    if options.get("ssl_min_version") is not None:
        context.minimum_version = ssl.TLSVersion(options["ssl_min_version"])
    if options.get("ssl_ciphers"):
        context.set_ciphers(options["ssl_ciphers"])
    return context


class ConnectionLost(BrokerError, ConnectionError):
    """The connection to Redis closed or was given up before the reply came."""


class _Waiter:
    """A future answered by the next `remaining` replies: with the last of them, or with the first error."""

    __slots__ = ("future", "remaining", "error")

    def __init__(self, future: asyncio.Future[Any], remaining: int) -> None:
        self.future = future
        self.remaining = remaining
        self.error: resp.ReplyError | None = None


class RedisConnection(asyncio.Protocol):
    """One connection, used one of two ways. A command connection: `call` sends commands at the end
    of the loop turn and answers them in order. A pub/sub connection (`on_push` given): `send` writes
    SUBSCRIBE and the like at once, and every reply after the handshake is a push that goes to
    `on_push` in the read that brings it. `lost` is done when the connection is gone, for whatever
    reason."""

    def __init__(self, on_push: Callable[[Any], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._on_push = on_push
        self._pushing = False  # the handshake is over: replies are pushes
        self._parser = resp.Parser()
        self._waiters: deque[_Waiter] = deque()
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes] = []  # commands asked for in this loop turn, written at its end
        self.lost: asyncio.Future[None] = loop.create_future()
        # When the oldest unanswered command was written, or the last reply came after it (loop time).
        self.waiting_since = 0.0

    @classmethod
    async def open(cls, where: Endpoint, timeout: float, on_push: Callable[[Any], None] | None = None,
                   name: str | None = None) -> RedisConnection:
        """Connected, authenticated and on its database (and named, if Redis lets it); ConnectionError or
        TimeoutError if not."""
        connection = cls(on_push)
        loop = asyncio.get_running_loop()
        hostname = where.host if where.tls is not None and where.tls.check_hostname else None
        async with asyncio.timeout(timeout):
            await loop.create_connection(lambda: connection, where.host, where.port, ssl=where.tls,
                                         server_hostname=hostname)
            try:
                if where.password is not None:
                    credentials = (where.password,) if where.username is None else (where.username, where.password)
                    await connection.call([("AUTH", *credentials)])
                if where.db and on_push is None:  # pub/sub channels are the same on every database
                    await connection.call([("SELECT", where.db)])
                if name:  # for CLIENT LIST; a Redis that refuses the command (ACL) is served all the same
                    with contextlib.suppress(resp.ReplyError):
                        await connection.call([("CLIENT", "SETNAME", name)])
            except resp.ReplyError as error:
                connection.close()
                raise ConnectionError(f"redis refused the connection: {error}") from None
            except BaseException:
                connection.close()
                raise
        connection._pushing = on_push is not None
        return connection

    def call(self, commands: list[tuple[Any, ...]]) -> asyncio.Future[Any]:
        """Send `commands` (at the end of this loop turn, with the others asked for in it); the future
        gets the last one's reply, or raises the first error reply (ReplyError) or ConnectionLost.
        Redis runs them in this order, after every earlier call."""
        future = self._loop.create_future()
        if self._transport is None or self.lost.done():
            future.set_exception(ConnectionLost("redis connection lost"))
            return future
        if not self._waiters:
            self.waiting_since = self._loop.time()
        self._waiters.append(_Waiter(future, len(commands)))
        if not self._out:
            self._loop.call_soon(self._write_out)
        self._out.extend([resp.pack(command) for command in commands])
        return future

    def _write_out(self) -> None:
        out, self._out = self._out, []
        if self._transport is not None and not self.lost.done():
            self._transport.write(b"".join(out))

    def send(self, *command: Any) -> None:
        """Write a command whose answer comes as a push (SUBSCRIBE, PING on a pub/sub connection), now."""
        if self._transport is not None and not self.lost.done():
            self._transport.write(resp.pack(command))

    def stalled(self, now: float, timeout: float) -> bool:
        """Whether commands have waited `timeout` seconds with no reply at all."""
        return bool(self._waiters) and now - self.waiting_since > timeout

    def close(self, why: str = "redis connection closed") -> None:
        """Give the connection up: what waits fails with ConnectionLost(why)."""
        self._lose(ConnectionLost(why))
        if self._transport is not None:
            self._transport.abort()  # nothing of ours is worth flushing to a connection we give up

    # --- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except resp.ReplyTooLarge as error:
            self._give_up("reply_too_large", f"redis sent {error}")
            return
        except resp.RespProtocolError as error:
            self._give_up("not_resp2", f"redis sent something that is not RESP2: {error}")
            return
        if self._pushing:
            on_push = self._on_push
            assert on_push is not None
            for reply in replies:
                try:
                    on_push(reply)
                except Exception as error:  # a push of a shape nobody sends: one lost message, not the connection
                    PROTOCOL_ERRORS["bad_push"] += 1
                    log.warning("redis push dropped", exc_info=True, extra={
                        "event": "broker_bad_push", "error": f"{type(error).__name__}: {error}"})
            return
        waiters = self._waiters
        for reply in replies:
            if not waiters:
                # We no longer know which answer is whose.
                self._give_up("unasked_reply", "redis answered a command never sent")
                return
            waiter = waiters[0]
            if isinstance(reply, resp.ReplyError) and waiter.error is None:
                waiter.error = reply
            waiter.remaining -= 1
            if waiter.remaining == 0:
                waiters.popleft()
                if not waiter.future.done():
                    if waiter.error is not None:
                        waiter.future.set_exception(waiter.error)
                    else:
                        waiter.future.set_result(reply)
        self.waiting_since = self._loop.time()

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(ConnectionLost(f"redis connection lost: {exc}" if exc else "redis closed the connection"))

    def _give_up(self, reason: str, why: str) -> None:
        PROTOCOL_ERRORS[reason] += 1
        log.warning("redis connection given up", extra={"event": "broker_protocol_error", "reason": reason,
                                                         "error": why})
        self.close(why)

    def _lose(self, error: ConnectionLost) -> None:
        self._parser = resp.Parser()  # a reply in progress may hold up to resp.MAX_REPLY_BYTES: let it go
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if not waiter.future.done():
                waiter.future.set_exception(error)
        if not self.lost.done():
            self.lost.set_result(None)


async def hold(subscriber: RedisConnection, publisher: RedisConnection, last_pong: Callable[[], float]) -> None:
    """Keep a pub/sub connection and a publish connection until one is lost or stalls, sending the pub/sub
    one a PING every PING_INTERVAL (the caller notes each pong's time.monotonic(), `last_pong` reads it);
    always ends by raising ConnectionError, saying why."""
    watch = asyncio.create_task(_watch(subscriber, publisher, last_pong))
    try:
        await asyncio.wait([subscriber.lost, publisher.lost, watch], return_when=asyncio.FIRST_COMPLETED)
        if watch.done():
            watch.result()  # re-raise why it gave up
    finally:
        watch.cancel()
    raise ConnectionError("redis connection lost")


async def _watch(subscriber: RedisConnection, publisher: RedisConnection, last_pong: Callable[[], float]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(PING_INTERVAL)
        if time.monotonic() - last_pong() > PING_TIMEOUT:
            raise ConnectionError(f"no answer from redis for {PING_TIMEOUT}s")
        if publisher.stalled(loop.time(), COMMAND_TIMEOUT):
            raise ConnectionError(f"redis answered no publish for {COMMAND_TIMEOUT}s")
        subscriber.send("PING")
