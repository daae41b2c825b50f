"""Every exception push-service raises on purpose: PushServiceError, in a few families.

- ConfigError: a setting the operator gave cannot be used; the service does not start.
- ClientError: one client's connection or request is refused or broken (a token, a frame, a request
  head or body); that client gets the answer, every other client carries on.
- BrokerError: the broker, or the cluster state kept in it, failed or sent what we cannot use.

A class keeps a built-in base beside ours where callers rely on it (ValueError, ConnectionError,
OSError). This module imports nothing of ours, so any module may raise these.
"""

from __future__ import annotations


class PushServiceError(Exception):
    """The base of every exception defined by push-service."""


class ConfigError(PushServiceError, ValueError):
    """A setting has a value we cannot use; `variable` names it for the operator."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


class ClientError(PushServiceError):
    """A client's connection or request that is refused or broken: the answer goes to that client only."""


class AuthError(ClientError):
    """A token was refused; `reason` is a short label used in metrics, `explanation` what a client and the
    log are told (the reason, and the failing claim where one did), the message PyJWT's wording."""

    def __init__(self, reason: str, detail: str, claim_problem: str | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.explanation = f"{reason}: {claim_problem}" if claim_problem else reason


class ProtocolError(ClientError, ValueError):
    """A frame that is not a Phoenix message; `reason` is a short machine-readable label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class BrokerError(PushServiceError):
    """The broker, or what the cluster keeps in it, failed or answered what we cannot use."""


class BrokerUnavailable(BrokerError):
    """The broker cannot take a publish now; the API answers 503 so the backend can retry."""
