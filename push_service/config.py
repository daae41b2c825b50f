"""One typed settings object, read from PUSH_* environment variables and CLI flags.

Every setting is declared once in OPTIONS; the env var name, the CLI flag, the parser,
the default and the help text all come from that one declaration.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from push_service.topics import FAMILIES

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
ASYMMETRIC_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA",
)
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A setting has a value we cannot use; `variable` names it for the operator."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


# --- value parsers: each takes the raw string and returns the typed value or raises ValueError


def _str(raw: str) -> str:
    return raw


def _optional_str(raw: str) -> str | None:
    return raw or None


def _int(raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError("expected a whole number") from None


def _port(raw: str) -> int:
    value = _int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("expected a port number from 0 to 65535")
    return value


def _non_negative_int(raw: str) -> int:
    value = _int(raw)
    if value < 0:
        raise ValueError("expected a whole number of at least 0")
    return value


def _positive_int(raw: str) -> int:
    value = _int(raw)
    if value < 1:
        raise ValueError("expected a whole number of at least 1")
    return value


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(raw: str) -> float:
    """'60', '60s', '500ms', '1m', '1h' -> seconds."""
    match = _DURATION.match(raw)
    if not match:
        raise ValueError("expected a duration such as 60, 45s, 500ms, 5m or 1h")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _non_negative_duration(raw: str) -> float:
    return parse_duration(raw)


def _positive_duration(raw: str) -> float:
    value = parse_duration(raw)
    if value <= 0:
        raise ValueError("expected a duration above zero")
    return value


_SIZE = re.compile(r"^\s*(\d+)\s*(b|kb|kib|k|mb|mib|m|gb|gib|g)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024,
               "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
               "g": 1024**3, "gb": 1000**3, "gib": 1024**3}


def _size(raw: str) -> int:
    match = _SIZE.match(raw)
    if not match:
        raise ValueError("expected a size in bytes such as 65536, 64KiB or 1MiB")
    value = int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower() or None]
    if value < 1:
        raise ValueError("expected a size of at least 1 byte")
    return value


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return value
    return parse


def _presence_families(raw: str) -> tuple[str, ...]:
    families = tuple(item.lower() for item in _list(raw))
    if families == ("none",):
        return ()
    unknown = [item for item in families if item not in FAMILIES]
    if unknown or not families:
        raise ValueError(f"expected a comma-separated list out of {', '.join(FAMILIES)}, or none")
    return families


BROKER_SCHEMES = ("redis://", "rediss://", "nats://", "tls://")


BROKER_CLIENTS = {"redis": ("redis", "redis"), "rediss": ("redis", "redis"), "nats": ("nats", "nats"),
                  "tls": ("nats", "nats")}  # scheme -> (module to import, extra that installs it)


def _broker(raw: str) -> str:
    value = raw.strip()
    if value != "memory" and not value.startswith(BROKER_SCHEMES):
        raise ValueError("expected memory, redis://host:6379/0, rediss://... or nats://host:4222")
    if value != "memory":
        module, extra = BROKER_CLIENTS[value.split(":", 1)[0]]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"this broker needs its client: pip install 'push-service[{extra}]'")
    return value


def _algorithms(raw: str) -> tuple[str, ...]:
    known = {name.lower(): name for name in HMAC_ALGORITHMS + ASYMMETRIC_ALGORITHMS}
    names = []
    for item in _list(raw):
        if item.lower() not in known:
            raise ValueError(
                f"unknown algorithm {item!r}; allowed: {', '.join(HMAC_ALGORITHMS + ASYMMETRIC_ALGORITHMS)}"
                " ('none' is never accepted)"
            )
        names.append(known[item.lower()])
    return tuple(names)


def _public_key(raw: str) -> str | None:
    """PEM text, or a path to a PEM file (handy for mounted Kubernetes secrets)."""
    if not raw:
        return None
    if "-----BEGIN" in raw:
        return raw.replace("\\n", "\n")
    with open(raw, encoding="utf-8") as handle:
        return handle.read()


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


@dataclass(frozen=True)
class Option:
    field: str
    env: str
    parse: Callable[[str], Any]
    help: str
    secret: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.env.removeprefix("PUSH_").lower().replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("host", "PUSH_HOST", _str, "address to listen on (default 127.0.0.1; the Docker image uses 0.0.0.0)"),
    Option("port", "PUSH_PORT", _port, "port to listen on (default 4000; 0 picks a free port)"),
    Option("env", "PUSH_ENV", _choice("development", "production"),
           "development (default: missing keys are generated for this run) or production (missing keys are an error)"),
    Option("service_keys", "PUSH_SERVICE_KEY", _list,
           "publish key(s) for the HTTP API, comma-separated to allow rotation", secret=True),
    Option("jwt_secret", "PUSH_JWT_SECRET", _optional_str, "HMAC secret for client JWTs (HS256/384/512)", secret=True),
    Option("jwt_public_key", "PUSH_JWT_PUBLIC_KEY", _public_key,
           "PEM public key (or a path to one) for client JWTs signed with RS*/PS*/ES*/EdDSA"),
    Option("jwt_algorithms", "PUSH_JWT_ALGORITHMS", _algorithms,
           "comma-separated JWT algorithms accepted (default: HS256 with a secret; RS256, ES256 or EdDSA "
           "to match the public key)"),
    Option("jwt_audience", "PUSH_JWT_AUDIENCE", _optional_str, "required JWT 'aud' (unset: tokens must carry none)"),
    Option("jwt_issuer", "PUSH_JWT_ISSUER", _optional_str, "required JWT 'iss' (unset: not checked)"),
    Option("jwt_leeway", "PUSH_JWT_LEEWAY", _non_negative_duration,
           "clock skew allowed on exp/nbf/iat (default 0s)"),
    Option("allowed_origins", "PUSH_ALLOWED_ORIGINS", _list,
           "comma-separated WebSocket origins, as Phoenix check_origin: https://example.com, //example.com:8080, "
           "//*.example.com (unset: any origin)"),
    Option("require_topics_claim", "PUSH_REQUIRE_TOPICS_CLAIM", _bool,
           "true: a token without a 'topics' claim may join no room topic (default false)"),
    Option("heartbeat_timeout", "PUSH_HEARTBEAT_TIMEOUT", _positive_duration,
           "close a socket that sends no frame for this long (default 60s)"),
    Option("max_frame_bytes", "PUSH_MAX_FRAME_BYTES", _size, "largest client WebSocket message (default 64KiB)"),
    Option("max_publish_bytes", "PUSH_MAX_PUBLISH_BYTES", _size, "largest HTTP publish body (default 1MiB)"),
    Option("max_topics_per_connection", "PUSH_MAX_TOPICS_PER_CONNECTION", _positive_int,
           "channels one socket may join at once (default 100)"),
    Option("longpoll_window", "PUSH_LONGPOLL_WINDOW", _positive_duration,
           "how long a long-poll GET waits for messages before answering 204; a session with no GET for "
           "1.5 times this is closed (default 10s, as Phoenix)"),
    Option("send_buffer_bytes", "PUSH_SEND_BUFFER_BYTES", _size,
           "unsent bytes a subscriber may queue before it is disconnected as a slow consumer (default 1MiB)"),
    Option("api_message_topic", "PUSH_API_MESSAGE_TOPIC", _choice("lobby", "thread"),
           "where POST /api/message goes: lobby (room:lobby:<channel_id>, default) or thread "
           "(room:topic:<thread_id>)"),
    Option("broker", "PUSH_BROKER", _broker,
           "memory (default, one node), redis://host:6379/0 (also rediss://) or "
           "nats://host:4222: how nodes share publishes and presence", secret=True),
    Option("node_timeout", "PUSH_NODE_TIMEOUT", _positive_duration,
           "a node that stops refreshing its heartbeat for this long drops out of cluster presence (default 15s)"),
    Option("workers", "PUSH_WORKERS", _positive_int,
           "processes sharing the port with SO_REUSEPORT (default 1; more than 1 needs a redis or nats broker)"),
    Option("drain_seconds", "PUSH_DRAIN_SECONDS", _non_negative_duration,
           "on SIGTERM, spread closing the sockets (code 1012) over this long before exiting (default 10s)"),
    Option("history_size", "PUSH_HISTORY_SIZE", _non_negative_int,
           "broadcasts kept per topic for missed-message recovery (default 100; 0 turns history off)"),
    Option("history_ttl", "PUSH_HISTORY_TTL", _positive_duration,
           "how long a broadcast stays recoverable (default 300s)"),
    Option("history_max_bytes", "PUSH_HISTORY_MAX_BYTES", _size,
           "memory broker: all topics' history together (default 64MiB; least recently published topics go first)"),
    Option("presence_topics", "PUSH_PRESENCE_TOPICS", _presence_families,
           "topic families whose joins are tracked in presence, out of lobby, topic, community, user "
           "(default topic,community; none turns presence off)"),
    Option("presence_diff_interval", "PUSH_PRESENCE_DIFF_INTERVAL", _non_negative_duration,
           "presence diffs of one topic are batched over this window (default 50ms; 0 sends each at once)"),
    Option("typing_timeout", "PUSH_TYPING_TIMEOUT", _positive_duration,
           "a typing: true not refreshed for this long clears itself (default 5s)"),
    Option("log_level", "PUSH_LOG_LEVEL", _choice(*LOG_LEVELS), "debug, info (default), warning or error"),
    Option("log_format", "PUSH_LOG_FORMAT", _choice("json", "text"), "json (default, one object a line) or text"),
)

OPTIONS_BY_ENV = {option.env: option for option in OPTIONS}


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 4000
    env: str = "development"
    service_keys: tuple[str, ...] = ()
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwt_algorithms: tuple[str, ...] = ()
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway: float = 0.0
    allowed_origins: tuple[str, ...] = ()
    require_topics_claim: bool = False
    heartbeat_timeout: float = 60.0
    max_frame_bytes: int = 64 * 1024
    max_publish_bytes: int = 1024 * 1024
    max_topics_per_connection: int = 100
    longpoll_window: float = 10.0
    send_buffer_bytes: int = 1024 * 1024
    api_message_topic: str = "lobby"
    broker: str = "memory"
    node_timeout: float = 15.0
    workers: int = 1
    drain_seconds: float = 10.0
    history_size: int = 100
    history_ttl: float = 300.0
    history_max_bytes: int = 64 * 1024 * 1024
    presence_topics: tuple[str, ...] = ("topic", "community")
    presence_diff_interval: float = 0.05
    typing_timeout: float = 5.0
    log_level: str = "info"
    log_format: str = "json"
    # True when the keys were generated for this run (no configuration given).
    dev_mode: bool = False

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None,
             overrides: Mapping[str, str] | None = None) -> Settings:
        """Build settings from env vars, with CLI overrides (keyed by env var name) winning."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for option in OPTIONS:
            raw = (overrides or {}).get(option.env)
            if raw is None:
                raw = environ.get(option.env)
            if raw is None:
                continue
            try:
                values[option.field] = option.parse(raw)
            except (ValueError, OSError) as exc:
                shown = "<redacted>" if option.secret else repr(raw)
                raise ConfigError(option.env, f"{exc} (got {shown})") from None
        settings = cls(**values)
        settings._validate()
        return settings

    def _validate(self) -> None:
        from push_service.origin import OriginPolicy  # late: origin matching is not a config concern
        try:
            OriginPolicy(self.allowed_origins)
        except ValueError as exc:
            raise ConfigError("PUSH_ALLOWED_ORIGINS", str(exc)) from None
        if self.jwt_public_key:
            self._check_public_key()
        for algorithm in self.jwt_algorithms:
            if algorithm in HMAC_ALGORITHMS and not self.jwt_secret:
                raise ConfigError("PUSH_JWT_ALGORITHMS", f"{algorithm} needs PUSH_JWT_SECRET")
            if algorithm in ASYMMETRIC_ALGORITHMS and not self.jwt_public_key:
                raise ConfigError("PUSH_JWT_ALGORITHMS", f"{algorithm} needs PUSH_JWT_PUBLIC_KEY")
        if self.workers > 1 and self.broker == "memory":
            raise ConfigError("PUSH_WORKERS", "more than 1 worker needs PUSH_BROKER=redis://... or nats://... "
                                              "(the memory broker cannot reach the other processes)")
        if self.env == "production":
            if not self.service_keys:
                raise ConfigError("PUSH_SERVICE_KEY", "required when PUSH_ENV=production")
            if not (self.jwt_secret or self.jwt_public_key):
                raise ConfigError("PUSH_JWT_SECRET",
                                  "PUSH_JWT_SECRET or PUSH_JWT_PUBLIC_KEY is required when PUSH_ENV=production")
        if self.jwt_secret and self.env == "production" and len(self.jwt_secret) < 32:
            raise ConfigError("PUSH_JWT_SECRET", "must be at least 32 characters when PUSH_ENV=production")

    def _check_public_key(self) -> None:
        """Fail at load, as a ConfigError, rather than with a traceback when the server builds its verifier."""
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        import jwt

        from push_service.auth import accepted_algorithms  # late: auth imports this module
        try:
            key = load_pem_public_key(self.jwt_public_key.encode())
            accepted_algorithms(self, key)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            # Never echo the value: a private key pasted here by mistake must not reach the terminal or logs.
            raise ConfigError("PUSH_JWT_PUBLIC_KEY",
                              "is not a PEM public key of a supported type (RSA, EC, Ed25519 or Ed448)") from None
        for algorithm in self.jwt_algorithms:
            if algorithm in ASYMMETRIC_ALGORITHMS:
                try:
                    jwt.get_algorithm_by_name(algorithm).prepare_key(key)
                except (ValueError, TypeError, jwt.InvalidKeyError):
                    # Otherwise every connection would fail verifying with an unsuitable key.
                    raise ConfigError("PUSH_JWT_ALGORITHMS",
                                      f"{algorithm} does not suit the type of PUSH_JWT_PUBLIC_KEY") from None

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def redacted(self) -> dict[str, Any]:
        """A summary safe to log: secrets shown only as set/unset."""
        summary: dict[str, Any] = {}
        for option in OPTIONS:
            value = getattr(self, option.field)
            if option.field == "broker":
                value = redact_url(value)
            elif option.secret or option.field == "jwt_public_key":
                value = f"<{len(value)} set>" if isinstance(value, tuple) and value else (
                    "<set>" if value else "<unset>")
            elif isinstance(value, tuple):
                value = list(value)
            summary[option.field] = value
        summary["dev_mode"] = self.dev_mode
        return summary
