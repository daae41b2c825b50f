"""Token refresh on a live socket: the `access_token` client event (as Supabase Realtime, a Phoenix-protocol
server, accepts it), so a client with short-lived tokens is not closed and reconnected at every expiry.

What is decided here: whether a pushed token replaces the connection's one (verified exactly as at connect,
same `sub`, at most one verification a second per connection). What follows (the new expiry, leaving topics
the new token no longer allows) is the session's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from push_service.auth import Identity
from push_service.errors import AuthError, ClientError
from push_service.metrics import Metrics

ACCESS_TOKEN = "access_token"
# A refresh is a signature check (CPU): one a second per connection is plenty for tokens that live minutes.
REFRESH_INTERVAL = 1.0
TOO_MANY_REFRESHES = "too_many_refreshes"
SUB_MISMATCH = "sub_mismatch"
BAD_PAYLOAD = "bad_payload"


class RefreshRefused(ClientError):
    """The refresh is refused; `reason` is the error reply's reason and the metric's result."""

    def __init__(self, reason: str, explanation: str | None = None) -> None:
        super().__init__(explanation or reason)
        self.reason = reason
        self.explanation = explanation or reason


class TokenRefresh:
    """One connection's refresh state: when it last had a token verified, and the last token it was given
    (pushing that one again, as clients do on each of their channels, costs no verification)."""

    __slots__ = ("_checked_at", "_token")

    def __init__(self) -> None:
        self._checked_at = float("-inf")
        self._token: str | None = None

    def identity(self, current: Identity, payload: Any, now: float, verify: Callable[[str], Identity],
                 metrics: Metrics) -> Identity:
        """The identity of the pushed token, to replace `current`; RefreshRefused when it may not."""
        try:
            identity = self._check(current, payload, now, verify)
        except RefreshRefused as refused:
            metrics.token_refreshes.labels(refused.reason).inc()
            raise
        metrics.token_refreshes.labels("ok").inc()
        return identity

    def _check(self, current: Identity, payload: Any, now: float, verify: Callable[[str], Identity]) -> Identity:
        token = payload.get(ACCESS_TOKEN) if isinstance(payload, dict) else None
        if not isinstance(token, str) or not token:
            raise RefreshRefused(BAD_PAYLOAD, f"{BAD_PAYLOAD}: expected {{\"{ACCESS_TOKEN}\": \"<JWT>\"}}")
        if token == self._token:
            return current  # already this connection's token; its expiry is watched as any
        if now - self._checked_at < REFRESH_INTERVAL:
            raise RefreshRefused(TOO_MANY_REFRESHES)
        self._checked_at = now
        try:
            identity = verify(token)
        except AuthError as refused:
            raise RefreshRefused(refused.reason, refused.explanation) from None
        if identity.sub != current.sub:
            # A connection is one user's: presence, the admin API and `user:` topics are keyed by its sub.
            raise RefreshRefused(SUB_MISMATCH, f"{SUB_MISMATCH}: the token is for another sub")
        self._token = token
        return identity
