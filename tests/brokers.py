"""The shared Redis and NATS the cluster, recovery and chaos tests use (127.0.0.1:6379, :4222).

When one is missing, a test fails with a clear message on CI (CI=true), where both must be there,
and is skipped on a developer's machine.
"""

from __future__ import annotations

import os
import socket

import orjson
import pytest

REDIS_URL = "redis://127.0.0.1:6379/0"
NATS_URL = "nats://127.0.0.1:4222"


def broker_missing(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: these tests need it)", pytrace=False)
    pytest.skip(message)


def _greeting(port: int, send: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as conn:
        if send:
            conn.sendall(send)
        conn.settimeout(2.0)
        return conn.recv(4096)


def require_redis() -> str:
    try:
        answer = _greeting(6379, b"PING\r\n")
    except OSError as exc:
        broker_missing(f"Redis is not reachable at {REDIS_URL}: {exc}")
    if not answer.startswith(b"+PONG"):
        broker_missing(f"the server at {REDIS_URL} does not answer PING like Redis: {answer[:80]!r}")
    return REDIS_URL


def require_nats() -> str:
    try:
        info = _greeting(4222, b"")
    except OSError as exc:
        broker_missing(f"NATS is not reachable at {NATS_URL}: {exc}")
    if not info.startswith(b"INFO "):
        broker_missing(f"the server at {NATS_URL} does not greet like NATS: {info[:80]!r}")
    if not orjson.loads(info[5:].split(b"\r\n", 1)[0]).get("jetstream"):
        broker_missing(f"NATS at {NATS_URL} runs without JetStream (start it with -js)")
    return NATS_URL
