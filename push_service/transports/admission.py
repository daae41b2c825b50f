"""What a transport asks of the node: may this client connect, and a session for it once it may.

node.Node implements it; a transport sees nothing else of the node.
"""

from __future__ import annotations

from typing import Protocol

from push_service.auth import Identity
from push_service.auth_callback import AuthBackend
from push_service.config import Settings
from push_service.metrics import Metrics
from push_service.outbox import Outbox
from push_service.connection import Connection
from push_service.session import Session


class Admission(Protocol):
    @property
    def id(self) -> str:
        """This node's id, unique in the cluster (long-poll session tokens name it)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def outbox(self) -> Outbox:
        """Where the node's connections' answers wait for the end of the loop's pass."""

    @property
    def draining(self) -> bool:
        """Shutting down: new sockets are refused so clients reconnect to another replica."""

    def now(self) -> float:
        """The event loop's clock."""

    def allows_origin(self, origin: str | None) -> bool:
        """Whether a browser on `origin` may connect (PUSH_ALLOWED_ORIGINS)."""

    @property
    def auth_backend(self) -> AuthBackend | None:
        """PUSH_AUTH_CONNECT_URL's client, asked when `verify` refuses a token (None: not configured)."""

    def verify(self, token: str | None) -> Identity:
        """Who a client token says the client is; auth.AuthError when it is refused."""

    def open_session(self, identity: Identity, conn: Connection, transport: str) -> Session:
        """A session for an admitted client."""
