"""The WebSocket upgrade's checks, before a socket exists: is it an upgrade we speak (RFC 6455 version 13,
a valid key), and may this client connect (drain, origin, vsn, token)? A refusal is an HTTP answer, as
Phoenix refuses a failed `connect/3`; the front door and aiohttp's handler ask the same questions here."""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable

from push_service.auth import Identity
from push_service.auth_callback import AuthBackendUnavailable
from push_service.errors import AuthError, ClientError
from push_service.http1 import Request, has_token
from push_service.protocol import Serializer, negotiate
from push_service.transports.admission import Admission

log = logging.getLogger("push_service.websocket")

PATH = "/socket/websocket"
# phoenix.js >= 1.8 `authToken`: a Sec-WebSocket-Protocol entry beside "phoenix".
AUTH_TOKEN_PREFIX = "base64url.bearer.phx."
SUBPROTOCOL = "phoenix"
VERSION = "13"  # the only Sec-WebSocket-Version there is (RFC 6455)


class Refusal(ClientError):
    """An upgrade that is answered with an HTTP error instead of 101."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason  # metrics label
        self.message = message


def token_from_subprotocols(header: str | None) -> str | None:
    """The token phoenix.js >= 1.8 puts in Sec-WebSocket-Protocol, if any; AuthError if unreadable."""
    if not header:
        return None
    for entry in header.split(","):
        entry = entry.strip()
        if entry.startswith(AUTH_TOKEN_PREFIX):
            encoded = entry[len(AUTH_TOKEN_PREFIX):]
            try:
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
            except (binascii.Error, UnicodeDecodeError, ValueError):
                raise AuthError("malformed", "authToken is not base64url") from None
    return None


class AskBackend(ClientError):
    """Not a token of ours, and PUSH_AUTH_CONNECT_URL is set: the upgrade waits for `ask_backend`."""

    def __init__(self, token: str | None, serializer: Serializer) -> None:
        super().__init__("the auth backend decides")
        self.token = token
        self.serializer = serializer


def admit(admission: Admission, origin: str | None, vsn: str | None, subprotocols: str | None,
          query_token: str | None) -> tuple[Identity, Serializer]:
    """Who connects, speaking which version; Refusal (counted and logged) when they may not; AskBackend when
    the auth backend is to say (only once our own verification refused the token: a JWT costs no more)."""
    try:
        if admission.draining:
            raise Refusal(503, "draining", "this node is shutting down; reconnect")
        if not admission.allows_origin(origin):
            raise Refusal(403, "origin", "origin not allowed")
        serializer = negotiate(vsn)
        if serializer is None:
            raise Refusal(403, "vsn", "unsupported vsn; use 1.0.0 or 2.0.0")
        token = None
        if subprotocols:  # phoenix.js < 1.8 sends none: no call then
            try:
                token = token_from_subprotocols(subprotocols)
            except AuthError as exc:
                raise Refusal(403, exc.reason, f"token refused: {exc.explanation}") from None
        token = query_token if token is None else token
        try:
            identity = admission.verify(token)
        except AuthError as exc:
            backend = admission.auth_backend
            if backend is not None and backend.asks_for(token):
                raise AskBackend(token, serializer) from None
            raise Refusal(403, exc.reason, f"token refused: {exc.explanation}") from None
    except Refusal as refusal:
        refused(admission, refusal)
        raise
    return identity, serializer


async def ask_backend(admission: Admission, token: str | None, transport: str, remote: str,
                      header: Callable[[str], str | None]) -> Identity:
    """The auth backend's identity for the client; Refusal (counted and logged) when it refuses (403) or
    cannot say (503, as a passing failure: the client retries)."""
    backend = admission.auth_backend
    assert backend is not None
    try:
        return await backend.connect(token, transport, remote, header)
    except AuthBackendUnavailable as exc:
        # The client is told no more than that (the log line of auth_callback has what failed).
        refusal = Refusal(503, exc.reason, f"auth backend unavailable ({exc.reason}); reconnect")
    except AuthError as exc:
        refusal = Refusal(403, exc.reason, f"token refused: {exc.explanation}")
    refused(admission, refusal)
    raise refusal


UPGRADE_REQUIRED_HEADERS = {"Sec-WebSocket-Version": VERSION, "Upgrade": "websocket", "Connection": "Upgrade"}


def wrong_version(header: Callable[[str], str | None]) -> bool:
    """Whether the headers ask for a WebSocket upgrade in a version other than 13, or in none."""
    return (has_token(header("upgrade"), "websocket") and has_token(header("connection"), "upgrade")
            and header("sec-websocket-version") != VERSION)


def version_refusal(admission: Admission) -> Refusal:
    """426 Upgrade Required, with the version we speak (RFC 6455 4.2.2), counted and logged."""
    refusal = Refusal(426, "websocket_version", f"unsupported WebSocket version; this server speaks {VERSION}")
    refused(admission, refusal)
    return refusal


def refused(admission: Admission, refusal: Refusal) -> None:
    admission.metrics.connects_refused.labels(refusal.reason).inc()
    if refusal.reason != "draining":  # every client retries during a drain: the metric counts those, not the log
        log.info("connection refused", extra={"event": "connect_refused", "reason": refusal.reason,
                                              "status": refusal.status, "error": refusal.message})


def is_upgrade(header: Callable[[str], str | None]) -> bool:
    """Whether the headers (looked up by lower-case name) ask for a WebSocket version 13 upgrade."""
    return (has_token(header("upgrade"), "websocket") and has_token(header("connection"), "upgrade")
            and header("sec-websocket-version") == VERSION and _valid_key(header("sec-websocket-key")))


def _valid_key(key: str | None) -> bool:
    # What base64.b64decode(key, validate=True) checks, without its wrapper: ValueError for non-ASCII too.
    try:
        return key is not None and len(binascii.a2b_base64(key, strict_mode=True)) == 16
    except ValueError:
        return False


def takes(request: Request) -> bool:
    """Whether a connection's first request is an upgrade (in any version) the front door should hand
    to `accept`."""
    header = request.headers.get
    return (request.method == "GET" and request.path == PATH and (is_upgrade(header) or wrong_version(header))
            and header("content-length", "0") == "0" and "transfer-encoding" not in request.headers)
