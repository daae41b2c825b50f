"""Who may connect and who may publish: client JWTs and HTTP publish keys.

The service holds no permission logic of its own: the backend signs a JWT whose `sub`
is the user and whose optional `topics` claim lists what that user may join.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import json
import re
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from push_service.algorithms import ASYMMETRIC_ALGORITHMS, HMAC_ALGORITHMS, accepted_algorithms
from push_service.bounded import with_room
from push_service.config import Settings
from push_service.errors import AuthError


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


# --- client JWTs: TokenVerifier and the helpers it parses tokens with

_B64URL_VALUE = {char: value for value, char in enumerate(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")}
# base64url to standard base64 for binascii; '+' and '/' (not base64url) to '*', which it refuses.
_URL_TO_STANDARD = bytes.maketrans(b"-_+/", b"+/**")
# orjson turns integers beyond 64 bits into floats where the json module keeps them exact.
_LONG_NUMBER = re.compile(rb"[0-9]{19}")
_HEADER_CACHE_SIZE = 64
# Tokens verified already, with what they said: a reconnect storm brings the same tokens back. Bounded
# (oldest out first, an eighth at a time: bounded.py): at most this many tokens held, a few hundred bytes each.
VERIFIED_CACHE_SIZE = 10_000
# HMAC algorithms checked here, by RFC 2104 from hash states that have taken the padded key once: PyJWT's
# HMACAlgorithm builds an hmac object per token, and even hmac.digest sets the key up again per call, a
# costly part of a connect (docs/performance.md, "Connect rate").
_HMAC_DIGESTS = {"HS256": "sha256", "HS384": "sha384", "HS512": "sha512"}
# RFC 2104's inner and outer pads, as translation tables: the key XOR 0x36 (0x5C) byte by byte.
_IPAD = bytes(byte ^ 0x36 for byte in range(256))
_OPAD = bytes(byte ^ 0x5C for byte in range(256))


class _KeyedHash:
    """HMAC with one key: the inner and outer hash states after the padded key, copied for each message."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes, digest: str) -> None:
        inner, outer = hashlib.new(digest), hashlib.new(digest)
        if len(key) > inner.block_size:
            key = hashlib.new(digest, key).digest()
        key = key.ljust(inner.block_size, b"\0")
        inner.update(key.translate(_IPAD))
        outer.update(key.translate(_OPAD))
        self._inner, self._outer = inner, outer

    def digest(self, message: bytes) -> bytes:
        """hmac.digest(key, message, digest)."""
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


def _b64url_decode(segment: bytes) -> bytes | None:
    """A base64url segment as PyJWT accepts it (`PyJWS._decode_base64url_segment`), else None:
    the url-safe alphabet only, canonical (no stray bits in the last character), and '='
    padding tolerated, at most two and then only on a length that is a multiple of 4."""
    if segment.endswith(b"="):
        stripped = segment.rstrip(b"=")
        if len(segment) - len(stripped) > 2 or len(segment) % 4:
            return None
        segment = stripped
    tail = len(segment) % 4
    if tail == 1 or (tail and _B64URL_VALUE.get(segment[-1], 0) & (0x0F if tail == 2 else 0x03)):
        return None
    standard = segment.translate(_URL_TO_STANDARD)
    if tail:
        standard += b"==" if tail == 2 else b"="
    try:
        return binascii.a2b_base64(standard, strict_mode=True)  # strict: nothing outside the alphabet
    except binascii.Error:
        return None


def _json_object(data: bytes) -> dict[str, Any] | None:
    """`data` parsed as a JSON object, or None: orjson, or the json module PyJWT uses where
    orjson refuses what json accepts (NaN, 1e400, a BOM, UTF-16, lone surrogates)."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            value = json.loads(data)
        except (ValueError, RecursionError):
            return None
    return value if isinstance(value, dict) else None


def _parse_header(segment: bytes) -> tuple[Any, str | None]:
    """(alg, reason to refuse an unencoded-payload token) from a header segment; AuthError if unusable.

    Mirrors PyJWS `_load` and `_validate_headers`: `kid` must be a string and `crit` may only
    name `b64`. A `b64: false` header (RFC 7797) is never usable here: PyJWT wants a
    detached payload we never pass, or refuses it outright when `crit` lacks `b64`.
    """
    data = _b64url_decode(segment)
    header = None if data is None else _json_object(data)
    if header is None:
        raise AuthError("malformed", "Invalid header string")
    if "kid" in header and not isinstance(header["kid"], str):
        raise AuthError("malformed", "Key ID header parameter must be a string")
    if "crit" in header:
        crit = header["crit"]
        if not isinstance(crit, list) or not crit or any(ext != "b64" or ext not in header for ext in crit):
            raise AuthError("malformed", "Invalid or unsupported 'crit' header")
    unencoded = None
    if header.get("b64", True) is False:
        crit = header.get("crit") or []
        unencoded = "malformed" if isinstance(crit, list) and "b64" in crit else "invalid"
    return header.get("alg"), unencoded


class TokenVerifier:
    """Verifies client JWTs with pinned algorithms; `none` is never accepted.

    Not jwt.decode(): it prepares everything again on every token, too slow for a reconnect storm
    (docs/performance.md). The claims are checked by PyJWT's own rules and the signatures by its
    algorithm objects (HMAC by the same digest, called directly); tests/test_auth.py
    `test_parity_with_pyjwt` keeps the verdicts identical.
    """

    def __init__(self, settings: Settings) -> None:
        self._public_key = load_pem_public_key(settings.jwt_public_key.encode()) if settings.jwt_public_key else None
        self._secret = settings.jwt_secret
        self.algorithms = accepted_algorithms(settings, self._public_key)
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        leeway = settings.jwt_leeway
        self._leeway = leeway.total_seconds() if isinstance(leeway, timedelta) else leeway
        self._headers: dict[bytes, tuple[Any, str | None]] = {}
        # token -> its identity: only tokens that passed every check.
        self._verified: dict[str | bytes, Identity] = {}
        # Pinning: only the configured algorithms, and each only with its own kind of key, so an
        # HS256 token signed with the public key (key confusion) cannot pass. Keys prepared once.
        self._checkers: dict[str, tuple[Any, Any]] = {}
        for algorithm in self.algorithms:
            key = self._key_for(algorithm)
            if key is None:
                continue
            checker = jwt.get_algorithm_by_name(algorithm)
            try:
                prepared = checker.prepare_key(key)
            except (jwt.InvalidKeyError, ValueError, TypeError) as exc:
                # As before, tokens of this algorithm raise the key's error at verification.
                self._checkers[algorithm] = (checker, exc)
                continue
            weak = checker.check_key_length(prepared) if hasattr(checker, "check_key_length") else None
            if weak:  # jwt.decode warned on every token; once is enough
                warnings.warn(weak, jwt.warnings.InsecureKeyLengthWarning, stacklevel=2)
            self._checkers[algorithm] = (checker, prepared)
        self._hmac_keys = {algorithm: _KeyedHash(checker[1], _HMAC_DIGESTS[algorithm])
                           for algorithm, checker in self._checkers.items()
                           if algorithm in _HMAC_DIGESTS and isinstance(checker[1], bytes)}

    def _key_for(self, algorithm: str) -> Any:
        if algorithm in HMAC_ALGORITHMS:
            return self._secret
        if algorithm in ASYMMETRIC_ALGORITHMS:
            return self._public_key
        return None

    def verify(self, token: str | None) -> Identity:
        """The token's identity, or AuthError. A token verified before is taken from the cache, its
        expiry checked again (the other claims cannot turn invalid with time: iat and nbf only pass)."""
        verified = self._verified
        identity = verified.get(token) if token else None
        if identity is not None and token:
            if identity.exp > time.time() - self._leeway:
                return identity
            del verified[token]
            raise AuthError("expired", "Signature has expired")
        identity = self._verify(token)
        if token:  # always, once verified; for the type checker
            self._verified = verified = with_room(verified, VERIFIED_CACHE_SIZE)
            verified[token] = identity
        return identity

    def _verify(self, token: str | None) -> Identity:
        if not token:
            raise AuthError("missing", "no token given")
        if isinstance(token, bytes):
            raw = token
        else:
            try:
                raw = token.encode()  # a lone surrogate: refused here; PyJWT let UnicodeEncodeError out
            except (UnicodeError, AttributeError):
                raise AuthError("malformed", "token is not a JWT") from None
        if raw.count(b".") != 2:
            raise AuthError("malformed", "token is not a JWT: it needs exactly three segments")
        signing_input, _, signature_segment = raw.rpartition(b".")
        header_segment, _, payload_segment = signing_input.partition(b".")

        header = self._headers.get(header_segment)
        if header is None:
            header = _parse_header(header_segment)
            if len(self._headers) >= _HEADER_CACHE_SIZE:
                self._headers.clear()
            self._headers[header_segment] = header
        algorithm, unencoded = header
        # Every segment is decoded before the algorithm is judged, as PyJWT did.
        payload = b""  # an unencoded payload is refused below, before it would be read
        if unencoded is None:
            decoded = _b64url_decode(payload_segment)
            if decoded is None:
                raise AuthError("malformed", "Invalid payload padding")
            payload = decoded
        elif payload_segment:
            raise AuthError("malformed", "Payload segment must be empty when 'b64' is false")
        signature = _b64url_decode(signature_segment)
        if signature is None:
            raise AuthError("malformed", "Invalid crypto padding")

        checker = self._checkers.get(algorithm) if type(algorithm) is str else None
        if checker is None:
            raise AuthError("bad_algorithm", f"algorithm {algorithm!r} is not accepted")
        if unencoded:
            raise AuthError(unencoded, "unencoded (b64: false) payloads are not accepted")
        algorithm_object, key = checker
        if isinstance(key, Exception):
            raise type(key)(*key.args)
        hmac_key = self._hmac_keys.get(algorithm)
        if hmac_key is not None:  # what HMACAlgorithm.verify does
            valid = hmac.compare_digest(signature, hmac_key.digest(signing_input))
        else:
            valid = algorithm_object.verify(signing_input, key, signature)
        if not valid:
            raise AuthError("bad_signature", "Signature verification failed")

        claims = _json_object(payload)
        if claims is None:
            raise AuthError("malformed", "Invalid payload string: must be a json object")
        exp = self._check_claims(claims)
        if claims.get("info") and _LONG_NUMBER.search(payload):
            claims = json.loads(payload)  # keep integers beyond 64 bits in `info` exact, as before
        return _identity_from(claims, exp)

    def _check_claims(self, claims: dict[str, Any]) -> int:
        """PyJWT's `_validate_claims` with require=["exp", "sub"], in its order and with its verdicts.
        Returns exp as an integer, as compared."""
        if claims.get("exp") is None:
            raise AuthError("missing_claim", 'Token is missing the "exp" claim', "exp")
        if claims.get("sub") is None:
            raise AuthError("missing_claim", 'Token is missing the "sub" claim', "sub")
        now = time.time()
        leeway = self._leeway
        if "iat" in claims:
            try:
                iat = int(claims["iat"])
            except (ValueError, TypeError, OverflowError):
                raise AuthError("invalid", "Issued At claim (iat) must be an integer.",
                                "iat must be an integer") from None
            if iat > now + leeway:
                raise AuthError("not_yet_valid", "The token is not yet valid (iat)", "iat is in the future")
        if "nbf" in claims:
            try:
                nbf = int(claims["nbf"])
            except (ValueError, TypeError, OverflowError):
                raise AuthError("malformed", "Not Before claim (nbf) must be an integer.",
                                "nbf must be an integer") from None
            if nbf > now + leeway:
                raise AuthError("not_yet_valid", "The token is not yet valid (nbf)", "nbf is in the future")
        try:
            exp = int(claims["exp"])  # int(): PyJWT takes 1.5 and "1700000000" too
        except (ValueError, TypeError, OverflowError):
            raise AuthError("malformed", "Expiration Time claim (exp) must be an integer.",
                            "exp must be an integer") from None
        if exp <= now - leeway:
            raise AuthError("expired", "Signature has expired")
        if self._issuer is not None:
            if "iss" not in claims:
                raise AuthError("missing_claim", 'Token is missing the "iss" claim', "iss")
            issuer = claims["iss"]
            if not isinstance(issuer, str) or issuer != self._issuer:
                raise AuthError("bad_issuer", "Invalid issuer", "iss does not match PUSH_JWT_ISSUER")
        audience = claims.get("aud")  # an empty or false `aud` counts as none, as in PyJWT
        if self._audience is None:
            if audience:
                raise AuthError("bad_audience", "Invalid audience: the token has one, none is configured",
                                "aud is given, none is configured")
        else:
            if not audience:
                raise AuthError("missing_claim", 'Token is missing the "aud" claim', "aud")
            if isinstance(audience, str):
                audience = [audience]
            if not isinstance(audience, list) or not all(isinstance(item, str) for item in audience):
                raise AuthError("bad_audience", "Invalid claim format in token",
                                "aud must be a string or a list of strings")
            if self._audience not in audience:
                raise AuthError("bad_audience", "Audience doesn't match", "aud does not include PUSH_JWT_AUDIENCE")
        if not isinstance(claims["sub"], str):
            raise AuthError("invalid", "Subject must be a string", "sub must be a string")
        if "jti" in claims and not isinstance(claims["jti"], str):
            raise AuthError("invalid", "JWT ID must be a string", "jti must be a string")
        return exp


def _identity_from(claims: dict[str, Any], exp: int) -> Identity:
    sub = claims["sub"]
    if not isinstance(sub, str) or not sub:
        raise AuthError("bad_claims", "'sub' must be a non-empty string", "sub must be a non-empty string")
    topics = claims.get("topics")
    if topics is not None:
        if not isinstance(topics, list) or not all(isinstance(item, str) and item for item in topics):
            raise AuthError("bad_claims", "'topics' must be a list of non-empty strings",
                            "topics must be a list of non-empty strings")
        topics = tuple(topics)
    info = claims.get("info", {})
    if not isinstance(info, dict):
        raise AuthError("bad_claims", "'info' must be an object", "info must be an object")
    return Identity(sub, float(exp), topics, info)  # positional: keywords cost more on every connect


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
