"""Who may connect and who may publish: client JWTs and HTTP publish keys.

The service holds no permission logic of its own: the backend signs a JWT whose `sub`
is the user and whose optional `topics` claim lists what that user may join.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from push_service.config import ASYMMETRIC_ALGORITHMS, HMAC_ALGORITHMS, Settings


class AuthError(Exception):
    """A token was refused; `reason` is a short label used in metrics and logs."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Identity:
    """What a verified client token says about its bearer."""

    sub: str
    exp: float
    topics: tuple[str, ...] | None = None
    info: dict[str, Any] = field(default_factory=dict)


class PublishKeys:
    """The HTTP API's shared secrets; several may be valid at once during rotation."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = tuple(key.encode() for key in keys)

    def check(self, candidate: str | None) -> bool:
        if not candidate:
            return False
        given = candidate.encode()
        # Compare against every key, without stopping early, so timing says nothing.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(given, key)
        return matched


def _default_asymmetric_algorithm(key: Any) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}.get(key.curve.name, "ES256")
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return "EdDSA"
    raise ValueError(f"unsupported public key type {type(key).__name__}")


def accepted_algorithms(settings: Settings, public_key: Any = None) -> tuple[str, ...]:
    if settings.jwt_algorithms:
        return settings.jwt_algorithms
    algorithms: list[str] = []
    if settings.jwt_secret:
        algorithms.append("HS256")
    if public_key is not None:
        algorithms.append(_default_asymmetric_algorithm(public_key))
    return tuple(algorithms)


_PYJWT_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidAudienceError, "bad_audience"),
    (jwt.InvalidIssuerError, "bad_issuer"),
    (jwt.MissingRequiredClaimError, "missing_claim"),
    (jwt.InvalidSignatureError, "bad_signature"),
    (jwt.DecodeError, "malformed"),
    (jwt.InvalidTokenError, "invalid"),
)


class TokenVerifier:
    """Verifies client JWTs with pinned algorithms; `none` is never accepted."""

    def __init__(self, settings: Settings) -> None:
        self._public_key = load_pem_public_key(settings.jwt_public_key.encode()) if settings.jwt_public_key else None
        self._secret = settings.jwt_secret
        self.algorithms = accepted_algorithms(settings, self._public_key)
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._leeway = settings.jwt_leeway

    def _key_for(self, algorithm: str) -> Any:
        if algorithm in HMAC_ALGORITHMS:
            return self._secret
        if algorithm in ASYMMETRIC_ALGORITHMS:
            return self._public_key
        return None

    def verify(self, token: str | None) -> Identity:
        if not token:
            raise AuthError("missing", "no token given")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthError("malformed", "token is not a JWT") from None
        algorithm = header.get("alg")
        # Pinning: only the configured algorithms, and each only with its own kind of key,
        # so an HS256 token signed with the public key (key confusion) cannot pass.
        if algorithm not in self.algorithms or self._key_for(algorithm) is None:
            raise AuthError("bad_algorithm", f"algorithm {algorithm!r} is not accepted")
        try:
            claims = jwt.decode(
                token,
                self._key_for(algorithm),
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "sub"]},
            )
        except jwt.InvalidTokenError as exc:
            for kind, reason in _PYJWT_REASONS:
                if isinstance(exc, kind):
                    raise AuthError(reason, str(exc)) from None
            raise AuthError("invalid", str(exc)) from None  # pragma: no cover - the last row catches all
        return _identity_from(claims)


def _identity_from(claims: dict[str, Any]) -> Identity:
    sub = claims["sub"]
    if not isinstance(sub, str) or not sub:
        raise AuthError("bad_claims", "'sub' must be a non-empty string")
    topics = claims.get("topics")
    if topics is not None:
        if not isinstance(topics, list) or not all(isinstance(item, str) and item for item in topics):
            raise AuthError("bad_claims", "'topics' must be a list of non-empty strings")
        topics = tuple(topics)
    info = claims.get("info", {})
    if not isinstance(info, dict):
        raise AuthError("bad_claims", "'info' must be an object")
    return Identity(sub=sub, exp=float(claims["exp"]), topics=topics, info=info)


def mint_token(settings: Settings, sub: str, *, ttl: float, topics: list[str] | None = None,
               info: dict[str, Any] | None = None, private_key: str | None = None,
               algorithm: str | None = None) -> str:
    """A client token signed with the configured secret (or the given PEM private key)."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + int(ttl)}
    if topics:
        claims["topics"] = topics
    if info:
        claims["info"] = info
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if private_key:
        key: Any = private_key
        algorithm = algorithm or next((a for a in settings.jwt_algorithms if a in ASYMMETRIC_ALGORITHMS), "RS256")
    elif settings.jwt_secret:
        key = settings.jwt_secret
        algorithm = algorithm or next((a for a in settings.jwt_algorithms if a in HMAC_ALGORITHMS), "HS256")
    else:
        raise ValueError("no signing key: set PUSH_JWT_SECRET or pass a private key")
    return jwt.encode(claims, key, algorithm=algorithm)
