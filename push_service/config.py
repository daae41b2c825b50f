"""One typed settings object, read from PUSH_* environment variables and CLI flags.

Every setting is declared once in OPTIONS; the env var name, the CLI flag, the parser,
the default and the help text all come from that one declaration.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from push_service import values
from push_service.algorithms import ASYMMETRIC_ALGORITHMS, HMAC_ALGORITHMS, accepted_algorithms
from push_service.errors import ConfigError
from push_service.values import (  # noqa: F401 - parse_duration and redact_url are part of this module's API
    parse_duration,
    redact_url,
)

LOG_LEVELS = ("debug", "info", "warning", "error")


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
    Option("host", "PUSH_HOST", values.text, "address to listen on (default 127.0.0.1; the Docker image uses 0.0.0.0)"),
    Option("port", "PUSH_PORT", values.port, "port to listen on (default 4000; 0 picks a free port)"),
    Option("env", "PUSH_ENV", values.choice("development", "production"),
           "development (default: missing keys are generated for this run) or production (missing keys are an error)"),
    Option("service_keys", "PUSH_SERVICE_KEY", values.comma_list,
           "publish key(s) for the HTTP API, comma-separated to allow rotation", secret=True),
    Option("admin_keys", "PUSH_ADMIN_KEY", values.comma_list,
           "admin key(s) for /api/admin/* and the console, comma-separated to allow rotation (production without "
           "one: the admin API is off)", secret=True),
    Option("jwt_secret", "PUSH_JWT_SECRET", values.hmac_secret, "HMAC secret for client JWTs (HS256/384/512)", secret=True),
    Option("jwt_public_key", "PUSH_JWT_PUBLIC_KEY", values.public_key,
           "PEM public key (or a path to one) for client JWTs signed with RS*/PS*/ES*/EdDSA", secret=True),
    Option("jwt_algorithms", "PUSH_JWT_ALGORITHMS", values.jwt_algorithms,
           "comma-separated JWT algorithms accepted (default: HS256 with a secret; RS256, ES256 or EdDSA "
           "to match the public key)"),
    Option("jwt_audience", "PUSH_JWT_AUDIENCE", values.optional_text, "required JWT 'aud' (unset: tokens must carry none)"),
    Option("jwt_issuer", "PUSH_JWT_ISSUER", values.optional_text, "required JWT 'iss' (unset: not checked)"),
    Option("jwt_leeway", "PUSH_JWT_LEEWAY", values.non_negative_duration,
           "clock skew allowed on exp/nbf/iat (default 0s)"),
    Option("allowed_origins", "PUSH_ALLOWED_ORIGINS", values.comma_list,
           "comma-separated WebSocket origins, as Phoenix check_origin: https://example.com, //example.com:8080, "
           "//*.example.com (unset: any origin)"),
    Option("require_topics_claim", "PUSH_REQUIRE_TOPICS_CLAIM", values.boolean,
           "true: a token without a 'topics' claim may join no room topic (default false)"),
    Option("heartbeat_timeout", "PUSH_HEARTBEAT_TIMEOUT", values.positive_duration,
           "close a socket that sends no frame for this long (default 60s)"),
    Option("handshake_timeout", "PUSH_HANDSHAKE_TIMEOUT", values.positive_duration,
           "close a connection whose request (head and body) is not whole this long after it began, or that "
           "sends no request this long after connecting (default 10s)"),
    Option("max_connections", "PUSH_MAX_CONNECTIONS", values.non_negative_int,
           "open connections beyond which a new one is answered 503 (default 0: the open-files limit less a "
           "tenth of it, at least 64, kept for the process's own files)"),
    Option("max_frame_bytes", "PUSH_MAX_FRAME_BYTES", values.size, "largest client WebSocket message (default 64KiB)"),
    Option("compression", "PUSH_COMPRESSION", values.boolean,
           "on (default): WebSocket clients that offer permessage-deflate get compressed frames, long-poll "
           "clients that accept gzip gzipped answers; off: never compress"),
    Option("compression_min_bytes", "PUSH_COMPRESSION_MIN_BYTES", values.size,
           "messages (and long-poll answers) smaller than this go uncompressed (default 256)"),
    Option("max_publish_bytes", "PUSH_MAX_PUBLISH_BYTES", values.size, "largest HTTP publish body (default 1MiB)"),
    Option("max_topics_per_connection", "PUSH_MAX_TOPICS_PER_CONNECTION", values.positive_int,
           "channels one socket may join at once (default 100)"),
    Option("longpoll_window", "PUSH_LONGPOLL_WINDOW", values.positive_duration,
           "how long a long-poll GET waits for messages before answering 204; a session with no GET for "
           "1.5 times this is closed (default 10s, as Phoenix)"),
    Option("longpoll_max_sessions_per_sub", "PUSH_LONGPOLL_MAX_SESSIONS_PER_SUB", values.positive_int,
           "long-poll sessions one user (JWT sub) may hold at once (default 50)"),
    Option("longpoll_max_sessions_per_address", "PUSH_LONGPOLL_MAX_SESSIONS_PER_ADDRESS", values.positive_int,
           "long-poll sessions one remote address may hold at once (default 1000; behind a reverse proxy every "
           "client shares its address: raise it)"),
    Option("longpoll_relay_max_pending", "PUSH_LONGPOLL_RELAY_MAX_PENDING", values.positive_int,
           "long-poll requests for sessions of other nodes a node relays at once, and serves for other nodes at "
           "once (default 10000; past that: HTTP 503 {\"status\": 500}, which phoenix.js retries)"),
    Option("send_buffer_bytes", "PUSH_SEND_BUFFER_BYTES", values.size,
           "unsent bytes a subscriber may queue before it is disconnected as a slow consumer (default 1MiB)"),
    Option("max_delivery_lag", "PUSH_MAX_DELIVERY_LAG", values.non_negative_duration,
           "answer publishes 503 with Retry-After while what was accepted would reach its last local subscriber "
           "later than this after its publish (default 1s; 0 turns the check off)"),
    Option("api_message_topic", "PUSH_API_MESSAGE_TOPIC", values.choice("lobby", "thread"),
           "where POST /api/message goes: lobby (room:lobby:<channel_id>, default) or thread "
           "(room:topic:<thread_id>)"),
    Option("broker", "PUSH_BROKER", values.broker_url,
           "memory (default, one node), redis://host:6379/0 (also rediss://) or "
           "nats://host:4222: how nodes share publishes and presence", secret=True),
    Option("node_timeout", "PUSH_NODE_TIMEOUT", values.positive_duration,
           "a node that stops refreshing its heartbeat for this long drops out of cluster presence (default 15s)"),
    Option("workers", "PUSH_WORKERS", values.positive_int,
           "processes sharing the port with SO_REUSEPORT (default 1; more than 1 needs a redis or nats broker)"),
    Option("drain_seconds", "PUSH_DRAIN_SECONDS", values.non_negative_duration,
           "on SIGTERM, spread closing the sockets (code 1012) over this long before exiting (default 10s)"),
    Option("history_size", "PUSH_HISTORY_SIZE", values.non_negative_int,
           "broadcasts kept per topic for missed-message recovery (default 100; 0 turns history off)"),
    Option("history_ttl", "PUSH_HISTORY_TTL", values.positive_duration,
           "how long a broadcast stays recoverable (default 300s)"),
    Option("history_max_bytes", "PUSH_HISTORY_MAX_BYTES", values.size,
           "memory broker: all topics' history together (default 64MiB; least recently published topics go first)"),
    Option("history_max_topics", "PUSH_HISTORY_MAX_TOPICS", values.positive_int,
           "memory broker: topics whose history is kept (default 50000; least recently published go first)"),
    Option("presence_topics", "PUSH_PRESENCE_TOPICS", values.presence_families,
           "topic families whose joins are tracked in presence, out of lobby, topic, community, user "
           "(default topic,community; none turns presence off)"),
    Option("presence_diff_interval", "PUSH_PRESENCE_DIFF_INTERVAL", values.non_negative_duration,
           "presence diffs of one topic are batched over this window (default 50ms; 0 sends each at once)"),
    Option("typing_timeout", "PUSH_TYPING_TIMEOUT", values.positive_duration,
           "a typing: true not refreshed for this long clears itself (default 5s)"),
    Option("auth_connect_url", "PUSH_AUTH_CONNECT_URL", values.optional_http_url,
           "your backend's URL that admits a client whose token is not one of our JWTs (or every client, with "
           "PUSH_AUTH_MODE=callback): POSTed {token, transport, remote_addr, headers}; unset: off"),
    Option("auth_join_url", "PUSH_AUTH_JOIN_URL", values.optional_http_url,
           "your backend's URL asked at every channel join, POSTed {sub, topic, params}; unset: off"),
    Option("auth_mode", "PUSH_AUTH_MODE", values.choice("fallback", "callback"),
           "fallback (default): ask PUSH_AUTH_CONNECT_URL only for tokens that are not valid JWTs of ours; "
           "callback: ask it for every connection"),
    Option("auth_timeout", "PUSH_AUTH_TIMEOUT", values.positive_duration,
           "how long a connect or join waits for the auth backend, its turn included (default 2s)"),
    Option("auth_cache_seconds", "PUSH_AUTH_CACHE_SECONDS", values.non_negative_duration,
           "how long the backend's admits and refusals are remembered, per token and per (sub, topic) "
           "(default 30s; 0: no cache)"),
    Option("auth_forward_headers", "PUSH_AUTH_FORWARD_HEADERS", values.header_names,
           "comma-separated client request headers sent on to PUSH_AUTH_CONNECT_URL, e.g. cookie (default none)"),
    Option("auth_max_concurrency", "PUSH_AUTH_MAX_CONCURRENCY", values.positive_int,
           "calls to the auth backend in flight at once (default 64); 4 times as many wait their turn, "
           "past that a connect or join is refused at once"),
    Option("log_level", "PUSH_LOG_LEVEL", values.choice(*LOG_LEVELS), "debug, info (default), warning or error"),
    Option("log_format", "PUSH_LOG_FORMAT", values.choice("json", "text"), "json (default, one object a line) or text"),
    Option("access_log", "PUSH_ACCESS_LOG", values.boolean,
           "on: one log line per HTTP request (method, path without its query, status, duration_ms, remote "
           "address, bytes), whatever PUSH_LOG_LEVEL says; off (default)"),
)

OPTIONS_BY_ENV = {option.env: option for option in OPTIONS}


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 4000
    env: str = "development"
    service_keys: tuple[str, ...] = ()
    admin_keys: tuple[str, ...] = ()
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwt_algorithms: tuple[str, ...] = ()
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway: float = 0.0
    allowed_origins: tuple[str, ...] = ()
    require_topics_claim: bool = False
    heartbeat_timeout: float = 60.0
    handshake_timeout: float = 10.0
    max_connections: int = 0
    max_frame_bytes: int = 64 * 1024
    compression: bool = True
    compression_min_bytes: int = 256
    max_publish_bytes: int = 1024 * 1024
    max_topics_per_connection: int = 100
    longpoll_window: float = 10.0
    longpoll_max_sessions_per_sub: int = 50
    longpoll_max_sessions_per_address: int = 1000
    longpoll_relay_max_pending: int = 10_000
    send_buffer_bytes: int = 1024 * 1024
    max_delivery_lag: float = 1.0
    api_message_topic: str = "lobby"
    broker: str = "memory"
    node_timeout: float = 15.0
    workers: int = 1
    drain_seconds: float = 10.0
    history_size: int = 100
    history_ttl: float = 300.0
    history_max_bytes: int = 64 * 1024 * 1024
    history_max_topics: int = 50_000
    presence_topics: tuple[str, ...] = ("topic", "community")
    presence_diff_interval: float = 0.05
    typing_timeout: float = 5.0
    auth_connect_url: str | None = None
    auth_join_url: str | None = None
    auth_mode: str = "fallback"
    auth_timeout: float = 2.0
    auth_cache_seconds: float = 30.0
    auth_forward_headers: tuple[str, ...] = ()
    auth_max_concurrency: int = 64
    log_level: str = "info"
    log_format: str = "json"
    access_log: bool = False
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
            self._check_public_key(self.jwt_public_key)
        for algorithm in self.jwt_algorithms:
            if algorithm in HMAC_ALGORITHMS and not self.jwt_secret:
                raise ConfigError("PUSH_JWT_ALGORITHMS", f"{algorithm} needs PUSH_JWT_SECRET")
            if algorithm in ASYMMETRIC_ALGORITHMS and not self.jwt_public_key:
                raise ConfigError("PUSH_JWT_ALGORITHMS", f"{algorithm} needs PUSH_JWT_PUBLIC_KEY")
        if self.workers > 1 and self.broker == "memory":
            raise ConfigError("PUSH_WORKERS", "more than 1 worker needs PUSH_BROKER=redis://... or nats://... "
                                              "(the memory broker cannot reach the other processes)")
        if self.auth_mode == "callback" and not self.auth_connect_url:
            raise ConfigError("PUSH_AUTH_MODE", "callback needs PUSH_AUTH_CONNECT_URL")
        if self.auth_forward_headers and not self.auth_connect_url:
            raise ConfigError("PUSH_AUTH_FORWARD_HEADERS", "needs PUSH_AUTH_CONNECT_URL (the headers go there)")
        if self.env == "production":
            if not self.service_keys:
                raise ConfigError("PUSH_SERVICE_KEY", "required when PUSH_ENV=production")
            if not (self.jwt_secret or self.jwt_public_key or self.auth_mode == "callback"):
                raise ConfigError("PUSH_JWT_SECRET",
                                  "PUSH_JWT_SECRET or PUSH_JWT_PUBLIC_KEY is required when PUSH_ENV=production "
                                  "(unless PUSH_AUTH_MODE=callback)")
        if self.jwt_secret and self.env == "production" and len(self.jwt_secret) < 32:
            raise ConfigError("PUSH_JWT_SECRET", "must be at least 32 characters when PUSH_ENV=production")

    def _check_public_key(self, pem: str) -> None:
        """Fail at load, as a ConfigError, rather than with a traceback when the server builds its verifier."""
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        import jwt

        try:
            key = load_pem_public_key(pem.encode())
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
            if option.field in ("broker", "auth_connect_url", "auth_join_url"):
                value = redact_url(value) if value else value
            elif option.secret or option.field == "jwt_public_key":
                value = f"<{len(value)} set>" if isinstance(value, tuple) and value else (
                    "<set>" if value else "<unset>")
            elif isinstance(value, tuple):
                value = list(value)
            summary[option.field] = value
        summary["dev_mode"] = self.dev_mode
        return summary
