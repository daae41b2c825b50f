"""End to end with the official `phoenix` npm client (1.6, 1.7, 1.8) against the real server process.

Each test starts `node tests/js/client.mjs` (see there for its options and the JSON lines it prints)
and reads what the client observes. Setup: `npm ci --prefix tests/js`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio

from conftest import PUBLISH_KEY, ServerProcess, make_token, server_starter, shared_server
from http_helpers import connections_closed, post_json
from nodejs import JS_DIR, Event, node_binary, run_script
from nodejs import NodeScript as JsClient

CLIENT = JS_DIR / "client.mjs"
# The aliases in tests/js/package.json: phoenix16 is phoenix@1.6.x, and so on.
VERSIONS = [pytest.param("16", id="phoenix-1.6"), pytest.param("17", id="phoenix-1.7"),
            pytest.param("18", id="phoenix-1.8")]
RETRY_MS = 150  # reconnectAfterMs / rejoinAfterMs, so that reconnects and rejoins are quick

TOPIC = "room:lobby:42"
LINEN_BODY = {"channel_id": "42", "thread_id": "7", "message_id": "m1", "is_thread": False, "is_reply": True,
              "message": '{"body":"hi"}'}


# One server for the tests that need no settings of their own; each waits for its clients to be gone.
pytestmark = pytest.mark.asyncio(loop_scope="module")
start_server = server_starter("module")
default_server = shared_server()
heartbeat_1s_server = shared_server(PUSH_HEARTBEAT_TIMEOUT="1")


@pytest_asyncio.fixture(loop_scope="module")
async def server(default_server: ServerProcess) -> AsyncIterator[ServerProcess]:
    yield default_server
    await connections_closed(default_server)


@pytest_asyncio.fixture(loop_scope="module")
async def heartbeat_1s(heartbeat_1s_server: ServerProcess) -> AsyncIterator[ServerProcess]:
    """A server that closes a socket silent for a second."""
    yield heartbeat_1s_server
    await connections_closed(heartbeat_1s_server)


@pytest.fixture
def node_client() -> Callable[..., Any]:
    """Factory: `async with node_client("18", server, topics=[...], token=...) as client:`."""
    node_binary()

    @asynccontextmanager
    async def start(version: str, server: ServerProcess, *, topics: tuple[str, ...] = (TOPIC,),
                    token: str | None = None, auth_token: str | None = None, vsn: str | None = None,
                    heartbeat_ms: int | None = None, log_frames: bool = False) -> AsyncIterator[JsClient]:
        args = [version, f"ws://127.0.0.1:{server.port}/socket", "--retry-ms", str(RETRY_MS)]
        for topic in topics:
            args += ["--topic", topic]
        for flag, value in (("--token", token), ("--auth-token", auth_token), ("--vsn", vsn),
                            ("--heartbeat-ms", heartbeat_ms)):
            if value is not None:
                args += [flag, str(value)]
        if log_frames:
            args.append("--log-frames")
        async with run_script(CLIENT, *args) as client:
            yield client

    return start


async def publish_message(server: ServerProcess, body: dict[str, Any]) -> dict[str, Any]:
    """POST /api/message as Linen's backend does: the key in the body."""
    async with aiohttp.ClientSession() as http:
        return await post_json(http, server, "/api/message", {**body, "token": PUBLISH_KEY}, headers=None)


async def assert_receives(client: JsClient, server: ServerProcess, body: dict[str, Any] = LINEN_BODY) -> None:
    """Publish `body` on /api/message and check the client's channel.on('new_msg') gets it, minus the key."""
    assert (await publish_message(server, body))["delivered"] == 1
    message = await client.wait_event("message")
    assert message == {"event": "message", "topic": f"room:lobby:{body['channel_id']}", "name": "new_msg",
                       "payload": body}


def opened(events: list[Event]) -> list[Event]:
    return [e for e in events if e["event"] == "open"]


# --- connect, join, receive


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
async def test_join_and_receive_linen_message(version, server, node_client):
    async with node_client(version, server, token=make_token()) as client:
        open_event = await client.wait_event("open")
        assert "vsn=2.0.0" in open_event["url"] and "token=" in open_event["url"]
        assert await client.wait_event("join") == {"event": "join", "topic": TOPIC, "status": "ok", "response": {}}
        # A message for another channel is not delivered; ours arrives with the body minus `token`.
        assert (await publish_message(server, {**LINEN_BODY, "channel_id": "43"}))["delivered"] == 0
        await assert_receives(client, server)


# --- refused connections and joins


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("token, reason", [
    pytest.param(make_token(secret="another-secret-0123456789abcdef0123456789"), "bad_signature", id="bad-signature"),
    pytest.param(make_token(ttl=-60), "expired", id="expired"),
])
@pytest.mark.slow
async def test_refused_token_never_opens(version, token, reason, server, node_client):
    logged_before = len(server.log_lines)
    async with node_client(version, server, token=token) as client:
        # phoenix.js reports the refused upgrade through onError and retries; let it try twice.
        for _ in range(2):
            error = await client.wait_event("error")
            assert "403" in error["message"], error
        assert not opened(client.events)
        assert not [e for e in client.events if e["event"] == "join" and e["status"] == "ok"]
    await server.wait_for_log(lambda entry: entry.get("event") == "connect_refused" and entry.get("reason") == reason,
                              since=logged_before)


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
async def test_join_of_another_users_topic_is_refused(version, server, node_client):
    async with node_client(version, server, token=make_token("u1"), topics=("user:u2", "user:u1")) as client:
        refused = await client.wait_event("join", topic="user:u2")
        assert refused == {"event": "join", "topic": "user:u2", "status": "error",
                           "response": {"reason": "unauthorized"}}
        accepted = await client.wait_event("join", topic="user:u1")
        assert accepted["status"] == "ok"


# --- heartbeats


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
async def test_heartbeats_keep_the_socket_open(version, heartbeat_1s, node_client):
    server = heartbeat_1s
    async with node_client(version, server, token=make_token(), heartbeat_ms=300) as client:
        await client.wait_event("join", status="ok")
        # Waiting is the test here: three heartbeat timeouts pass and the socket must stay up.
        during = await client.collect(3.0)
        assert not [e for e in during if e["event"] in ("close", "error", "channel_error", "channel_close")], during
        assert sum(e["event"] == "heartbeat_reply" for e in during) >= 5, during
        await assert_receives(client, server)
        assert len(opened(client.events)) == 1


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
async def test_silent_client_is_closed_and_reconnects(version, heartbeat_1s, node_client):
    server = heartbeat_1s
    async with node_client(version, server, token=make_token(), heartbeat_ms=3_600_000) as client:
        await client.wait_event("join", status="ok")
        close = await client.wait_event("close")
        # Not 1000: a 1000 close would stop phoenix.js from reconnecting.
        assert close["code"] != 1000
        assert (close["code"], close["reason"]) == (1001, "heartbeat timeout")
        # ... and so phoenix.js reconnects and rejoins by itself.
        await client.wait_event("open")
        await client.wait_event("join", status="ok")
        await assert_receives(client, server)


# --- server restart


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
async def test_rejoins_after_server_restart(version, start_server, node_client):
    first = await start_server()
    async with node_client(version, first, token=make_token()) as client:
        await client.wait_event("join", status="ok")
        await first.stop()
        close = await client.wait_event("close")
        assert close["code"] == 1012, close  # drained ("service restart"): phoenix.js will reconnect
        second = await start_server(port=first.port)
        await client.wait_event("open", timeout=10)
        await client.wait_event("join", status="ok")
        await assert_receives(client, second)


# --- protocol versions


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("vsn", ["1.0.0", "2.0.0"])
async def test_protocol_versions(version, vsn, server, node_client):
    async with node_client(version, server, token=make_token(), vsn=vsn, log_frames=True) as client:
        assert f"vsn={vsn}" in (await client.wait_event("open"))["url"]
        await client.wait_event("join", status="ok")
        await assert_receives(client, server)
    frames = [orjson.loads(e["raw"]) for e in client.events if e["event"] == "frame"]
    if vsn == "1.0.0":
        assert frames and all(isinstance(frame, dict) for frame in frames)
        assert all(set(frame) == {"topic", "event", "payload", "ref"} for frame in frames), frames  # no join_ref
        assert {"topic": TOPIC, "event": "new_msg", "payload": LINEN_BODY, "ref": None} in frames
    else:
        assert frames and all(isinstance(frame, list) and len(frame) == 5 for frame in frames)
        assert [None, None, TOPIC, "new_msg", LINEN_BODY] in frames
        reply = next(frame for frame in frames if frame[2] == TOPIC and frame[3] == "phx_reply")
        assert reply[0] == reply[1] and reply[0] is not None  # join_ref == ref for a join


# --- phoenix 1.8 authToken


async def test_auth_token_option_of_phoenix_18(server, node_client):
    async with node_client("18", server, auth_token=make_token()) as client:
        open_event = await client.wait_event("open")
        assert "token=" not in open_event["url"]
        assert open_event["protocol"] == "phoenix"
        await client.wait_event("join", status="ok")
        await assert_receives(client, server)
