"""Parsers for setting values: each takes the raw string (env var or CLI flag) and returns the typed
value or raises ValueError with what is allowed; and `redact_url`, to show a broker URL safely."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

import jwt

from push_service.algorithms import ASYMMETRIC_ALGORITHMS, HMAC_ALGORITHMS
from push_service.topics import FAMILIES


def text(raw: str) -> str:
    return raw


def optional_text(raw: str) -> str | None:
    return raw or None


def whole_number(raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError("expected a whole number") from None


def port(raw: str) -> int:
    value = whole_number(raw)
    if not 0 <= value <= 65535:
        raise ValueError("expected a port number from 0 to 65535")
    return value


def non_negative_int(raw: str) -> int:
    value = whole_number(raw)
    if value < 0:
        raise ValueError("expected a whole number of at least 0")
    return value


def positive_int(raw: str) -> int:
    value = whole_number(raw)
    if value < 1:
        raise ValueError("expected a whole number of at least 1")
    return value


def boolean(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def comma_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(raw: str) -> float:
    """'60', '60s', '500ms', '1m', '1h' -> seconds."""
    match = _DURATION.match(raw)
    if not match:
        raise ValueError("expected a duration such as 60, 45s, 500ms, 5m or 1h")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def non_negative_duration(raw: str) -> float:
    return parse_duration(raw)


def positive_duration(raw: str) -> float:
    value = parse_duration(raw)
    if value <= 0:
        raise ValueError("expected a duration above zero")
    return value


_SIZE = re.compile(r"^\s*(\d+)\s*(b|kb|kib|k|mb|mib|m|gb|gib|g)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024,
               "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
               "g": 1024**3, "gb": 1000**3, "gib": 1024**3}


def size(raw: str) -> int:
    match = _SIZE.match(raw)
    if not match:
        raise ValueError("expected a size in bytes such as 65536, 64KiB or 1MiB")
    value = int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower() or None]
    if value < 1:
        raise ValueError("expected a size of at least 1 byte")
    return value


def choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return value
    return parse


def presence_families(raw: str) -> tuple[str, ...]:
    families = tuple(item.lower() for item in comma_list(raw))
    if families == ("none",):
        return ()
    unknown = [item for item in families if item not in FAMILIES]
    if unknown or not families:
        raise ValueError(f"expected a comma-separated list out of {', '.join(FAMILIES)}, or none")
    return families


BROKER_SCHEMES = ("redis://", "rediss://", "redis+cluster://", "nats://", "tls://")


BROKER_CLIENTS = {"redis": ("redis", "redis"), "rediss": ("redis", "redis"), "redis+cluster": ("redis", "redis"),
                  "nats": ("nats", "nats"),
                  "tls": ("nats", "nats")}  # scheme -> (module to import, extra that installs it)


def optional_http_url(raw: str) -> str | None:
    """An http(s) URL with a host, or None when empty (the setting is off)."""
    value = raw.strip()
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL with a host")
    return value


_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def header_names(raw: str) -> tuple[str, ...]:
    """Comma-separated HTTP header names, lower-cased."""
    names = comma_list(raw)
    for name in names:
        if not _HEADER_NAME.match(name):
            raise ValueError(f"{name!r} is not an HTTP header name")
    return tuple(dict.fromkeys(name.lower() for name in names))


def broker_url(raw: str) -> str:
    value = raw.strip()
    if value != "memory" and not value.startswith(BROKER_SCHEMES):
        raise ValueError("expected memory, redis://host:6379/0, rediss://..., redis+cluster://host:6379,host:6379,... "
                         "or nats://host:4222")
    if value != "memory":
        module, extra = BROKER_CLIENTS[value.split(":", 1)[0]]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"this broker needs its client: pip install 'push-service[{extra}]'")
    if value.startswith(CLUSTER_SCHEME):
        parse_cluster_url(value)
    return value


CLUSTER_SCHEME = "redis+cluster://"


@dataclass(frozen=True)
class ClusterURL:
    seeds: tuple[tuple[str, int], ...]  # (host, port)
    username: str | None
    password: str | None


def parse_cluster_url(url: str) -> ClusterURL:
    """`redis+cluster://[user:password@]host:port,host:port,...`: any one reachable seed is enough."""
    if not url.lower().startswith(CLUSTER_SCHEME):
        raise ValueError(f"expected {CLUSTER_SCHEME}host:port,host:port,...")
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username, password = (unquote(user) or None, unquote(secret)) if colon else (None, unquote(user))
    seeds = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected host:port for every seed of {CLUSTER_SCHEME}, got {item.strip()!r}")
        seeds.append((host.strip("[]"), int(port)))
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError("a Redis Cluster has database 0 only")
    return ClusterURL(tuple(seeds), username, password)


def jwt_algorithms(raw: str) -> tuple[str, ...]:
    known = {name.lower(): name for name in HMAC_ALGORITHMS + ASYMMETRIC_ALGORITHMS}
    names = []
    for item in comma_list(raw):
        if item.lower() not in known:
            raise ValueError(
                f"unknown algorithm {item!r}; allowed: {', '.join(HMAC_ALGORITHMS + ASYMMETRIC_ALGORITHMS)}"
                " ('none' is never accepted)"
            )
        names.append(known[item.lower()])
    return tuple(names)


def hmac_secret(raw: str) -> str | None:
    """An HMAC secret; a PEM or SSH key is refused here, since PyJWT would refuse it on every token."""
    if not raw:
        return None
    try:
        jwt.get_algorithm_by_name("HS256").prepare_key(raw)
    except jwt.InvalidKeyError:
        raise ValueError("is a PEM or SSH key, not an HMAC secret; a public key for RS*/PS*/ES*/EdDSA "
                         "tokens goes in PUSH_JWT_PUBLIC_KEY") from None
    return raw


def public_key(raw: str) -> str | None:
    """PEM text, or a path to a PEM file (handy for mounted Kubernetes secrets). Errors never repeat the
    value: it may be key material pasted without its PEM armour."""
    if not raw:
        return None
    if "-----BEGIN" in raw:
        return raw.replace("\\n", "\n")
    try:
        with open(raw, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ValueError(f"expected PEM text (-----BEGIN PUBLIC KEY-----...) or the path of a readable PEM file "
                         f"({reason})") from None


_SECRET_QUERY = re.compile(r"((?:^|&)(?:password|token)=)[^&]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """A broker URL fit for logs: any password replaced, a user part without a password too (for NATS,
    nats://<token>@host is token authentication), and a password or token in the query string
    (redis-py reads redis://host/0?password=...)."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        userinfo, _, hosts = parts.netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        parts = parts._replace(netloc=f"{user}:<redacted>@{hosts}" if colon else f"<redacted>@{hosts}")
    if parts.query:
        parts = parts._replace(query=_SECRET_QUERY.sub(r"\1<redacted>", parts.query))
    return urlunsplit(parts)
