"""The JWT algorithms we accept, and which ones a configuration means: a leaf, so that settings
validation (config) and token verification (auth) share them without importing each other."""

from __future__ import annotations

from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
ASYMMETRIC_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA",
)


class JwtSettings(Protocol):
    """The part of config.Settings that decides the algorithms."""

    @property
    def jwt_algorithms(self) -> tuple[str, ...]: ...

    @property
    def jwt_secret(self) -> str | None: ...


def _default_asymmetric_algorithm(key: Any) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}.get(key.curve.name, "ES256")
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return "EdDSA"
    raise ValueError(f"unsupported public key type {type(key).__name__}")


def accepted_algorithms(settings: JwtSettings, public_key: Any = None) -> tuple[str, ...]:
    if settings.jwt_algorithms:
        return settings.jwt_algorithms
    algorithms: list[str] = []
    if settings.jwt_secret:
        algorithms.append("HS256")
    if public_key is not None:
        algorithms.append(_default_asymmetric_algorithm(public_key))
    return tuple(algorithms)
