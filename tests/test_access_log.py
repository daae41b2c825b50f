"""PUSH_ACCESS_LOG=on: one JSON line per HTTP request, whichever front end answered it, and no secret in any."""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import orjson
import pytest

from brokers import free_port
from conftest import PUBLISH_KEY, ROOT, communicate, make_token, server_env, until

TIMEOUT = aiohttp.ClientTimeout(total=10)
FIELDS = {"time", "method", "path", "status", "duration_ms", "remote", "bytes"}


def access_lines(server) -> list[dict]:
    return [line for line in server.log_lines if line.get("event") == "http_access"]


async def make_requests(server, token: str) -> None:
    """A publish answered by the front door (and one refused), a WebSocket upgrade (and one refused), a
    long-poll, and reads answered by aiohttp: tokens in queries, the publish key in headers."""
    bearer = {"Authorization": f"Bearer {PUBLISH_KEY}"}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        async with http.post(f"{server.http_url}/api/message", json={"channel_id": "1", "message": "hi"},
                             headers=bearer) as response:
            assert response.status == 200
        async with http.post(f"{server.http_url}/api/message", json={"channel_id": "1"},
                             headers={"Authorization": "Bearer not-the-key-0123456789"}) as response:
            assert response.status == 401
        # Each on a connection of its own: a connection's first request is what the front door serves.
        async with aiohttp.ClientSession(timeout=TIMEOUT) as fresh, \
                fresh.ws_connect(f"{server.ws_url}?vsn=2.0.0&token={token}") as ws:
            await ws.close()
        async with aiohttp.ClientSession(timeout=TIMEOUT) as fresh:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await fresh.ws_connect(f"{server.ws_url}?vsn=2.0.0&token={token}x")
        assert refused.value.status == 403
        async with http.get(f"{server.http_url}/socket/longpoll?vsn=2.0.0&token={token}") as response:
            assert response.status == 200
        async with http.get(f"{server.http_url}/readyz?token={token}", headers=bearer) as response:
            assert response.status == 200
        async with http.get(f"{server.http_url}/api/presence/room:topic:1", headers=bearer) as response:
            assert response.status == 200


async def test_every_request_gets_one_line_without_secrets(start_server):
    server = await start_server(PUSH_ACCESS_LOG="on")
    token = make_token("ada")
    await make_requests(server, token)
    expected = [("POST", "/api/message", 200), ("POST", "/api/message", 401), ("GET", "/socket/websocket", 101),
                ("GET", "/socket/websocket", 403), ("GET", "/socket/longpoll", 200), ("GET", "/readyz", 200),
                ("GET", "/api/presence/room:topic:1", 200)]
    await until(lambda: len(access_lines(server)) >= len(expected), 10, "an access line per request")
    await server.stop()
    lines = access_lines(server)
    assert [(line["method"], line["path"], line["status"]) for line in lines] == expected
    for line in lines:
        assert FIELDS <= set(line), line
        assert line["remote"] == "127.0.0.1", (line["path"], line["status"])
        assert isinstance(line["duration_ms"], float) and 0 <= line["duration_ms"] < 10_000
        assert isinstance(line["bytes"], int) and line["bytes"] >= 0
    assert lines[0]["bytes"] > 0 and lines[-1]["bytes"] > 0  # the publish's answer, the presence read's
    everything = repr(server.log_lines)
    for secret in (token, PUBLISH_KEY, "not-the-key-0123456789"):
        assert secret not in everything


async def test_off_by_default(start_server):
    server = await start_server()
    await make_requests(server, make_token("ada"))
    await server.stop()  # its log is whole once it has exited
    assert any(line.get("event") == "stopped" for line in server.log_lines)
    assert access_lines(server) == []


async def test_written_whatever_the_log_level():
    # PUSH_LOG_LEVEL=warning hides the "listening" line: the port is chosen here, and polled.
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "push_service", "serve", "--port", str(port),
        env=server_env(PUSH_ACCESS_LOG="on", PUSH_LOG_LEVEL="warning"), cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async def healthy() -> bool:
            try:
                async with aiohttp.ClientSession(timeout=TIMEOUT) as http, \
                        http.get(f"http://127.0.0.1:{port}/healthz") as response:
                    return response.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await until(healthy, 15, "the server answering /healthz", interval=0.1)
    finally:
        process.terminate()
        _, stderr = await communicate(process, 10)
    lines = [orjson.loads(line) for line in stderr.splitlines() if line.startswith(b"{")]
    assert [line["path"] for line in lines if line.get("event") == "http_access"][-1:] == ["/healthz"]
    assert all(line["level"] != "info" for line in lines if line.get("event") != "http_access")
