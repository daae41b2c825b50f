"""What a session writes to: the transport's `Connection`, and the `Disconnect`s a connection is closed
with (their close codes decide whether phoenix.js reconnects)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from push_service.messages import Wire


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Why the server ends a connection. Codes other than 1000 make phoenix.js reconnect."""

    code: int
    reason: str


TOKEN_EXPIRED = Disconnect(1001, "token expired")
HEARTBEAT_TIMEOUT = Disconnect(1001, "heartbeat timeout")
SHUTDOWN = Disconnect(1001, "server shutting down")
INVALID_MESSAGE = Disconnect(1007, "invalid message")
SLOW_CONSUMER = Disconnect(1013, "slow consumer")
# As Phoenix >= 1.7 drains: a close code, never phx_close (which would make phoenix.js drop the channel).
DRAIN = Disconnect(1012, "service restart")
# The admin API's disconnect: phoenix.js 1.6 and 1.7 do not reconnect after a 1000 close they did not
# initiate, and reconnect after any other code (1.8 reconnects after either: README "Server API").
ADMIN_CLOSE = Disconnect(1000, "disconnected by an admin")
ADMIN_RECONNECT = Disconnect(4000, "disconnected by an admin, may reconnect")


class Sink(Protocol):
    def write(self, data: bytes) -> None: ...


# Session.fd: deliveries go through the connection's sink (NO_SOCKET), or may be written to the socket
# itself, whose descriptor the connection has not looked up yet (SOCKET_UNKNOWN: socket_fd() does, at the
# first delivery, so that a connect does not pay for it).
NO_SOCKET = -1
SOCKET_UNKNOWN = -2


class Connection(Protocol):
    wire: Wire
    transport_name: str  # metrics label: "websocket" or "longpoll"

    @property
    def sink(self) -> Sink:
        """What a broadcast's bytes are written to: the connection itself (`write` as `send`), or, while
        `send` would only hand them to it, the transport, so that a delivery makes no call of ours
        (docs/performance.md, "Small rooms")."""

    @property
    def remote(self) -> str:
        """The client's address, as the admin API shows it ("" when unknown); asked for only then."""

    def send(self, data: bytes) -> None:
        """Queue framed bytes. Past PUSH_SEND_BUFFER_BYTES unsent, call the session's overflowed()."""

    def socket_fd(self) -> int:
        """The descriptor of the socket deliveries may write themselves, or NO_SOCKET."""

    def close(self, disconnect: Disconnect) -> None:
        """Close from the server side; the transport then calls Session.closed()."""


class _Dropped:
    """The sink of a connection that has ended: what is written to it goes nowhere. A connection names it
    rather than itself, which would be a reference cycle (see Ended)."""

    __slots__ = ()

    def write(self, data: bytes) -> None:
        pass


DROPPED = _Dropped()


class Ended:
    """What a session holds in place of its connection once the transport is gone. The connection
    refers to the session too: dropping the session's side of that cycle lets reference counting
    free both at once, where a full collection (rare, with the thresholds app.tune_gc sets) would."""

    __slots__ = ("wire", "transport_name")
    remote = ""
    sink = DROPPED

    def __init__(self, conn: Connection) -> None:
        self.wire = conn.wire
        self.transport_name = conn.transport_name

    def send(self, data: bytes) -> None:
        pass

    def socket_fd(self) -> int:
        return NO_SOCKET

    def close(self, disconnect: Disconnect) -> None:
        pass
