"""Auth by backend callback (PUSH_AUTH_CONNECT_URL, PUSH_AUTH_JOIN_URL), end to end: a real server process
and a real small HTTP backend started by each test (aiohttp, on a free port), clients that are not ours
(`websockets`, aiohttp's client, the stock phoenix.js under Node)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from aiohttp import web

from conftest import PUBLISH_KEY, ServerProcess, make_token, read_answer, until
from http_helpers import bounded, connections_closed, metric, publish, wait_for_metric
from nodejs import JS_DIR, node_binary, run_script
from push_service.auth_callback import CACHE_SIZE, ADMIT, AuthAnswerInvalid, _Cache, parse_identity
from ws_client import Client, upgrade_head

OK = {"status": "ok", "response": {}}
CLIENT = JS_DIR / "client.mjs"


class Backend:
    """A small auth backend in Linen's style: POST /who (connect) and /can (join). Answers by token and by
    topic, as the test sets them; it records every request and how many were in flight at most."""

    def __init__(self) -> None:
        self.tokens: dict[str, tuple[int, Any]] = {}  # token -> (status, body); unknown tokens: 403
        self.topics: dict[str, int] = {}  # topic -> status; unknown topics: 200
        self.requests: list[dict[str, Any]] = []
        self.delay = 0.0
        self.gate: asyncio.Event | None = None  # while set to an unset Event, every request waits for it
        self.in_flight = self.max_in_flight = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, port: int = 0) -> Backend:
        app = web.Application()
        app.router.add_post("/who", self._who)
        app.router.add_post("/can", self._can)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def calls(self, path: str) -> list[dict[str, Any]]:
        return [request for request in self.requests if request["path"] == path]

    async def _record(self, request: web.Request) -> dict[str, Any]:
        entry = {"path": request.path, "query": request.query_string, "headers": dict(request.headers),
                 "body": await request.json()}
        self.requests.append(entry)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.delay:
                await asyncio.sleep(self.delay)  # the backend's slowness is the case here
        finally:
            self.in_flight -= 1
        return entry

    async def _who(self, request: web.Request) -> web.Response:
        entry = await self._record(request)
        status, body = self.tokens.get(entry["body"]["token"], (403, b""))
        if isinstance(body, (dict, list)):
            return web.json_response(body, status=status)
        return web.Response(status=status, body=body.encode() if isinstance(body, str) else body)

    async def _can(self, request: web.Request) -> web.Response:
        entry = await self._record(request)
        return web.Response(status=self.topics.get(entry["body"]["topic"], 200))


@pytest_asyncio.fixture
async def backend() -> AsyncIterator[Backend]:
    started = await Backend().start()
    yield started
    await started.stop()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def connect_env(backend: Backend, **env: str) -> dict[str, str]:
    return {"PUSH_AUTH_CONNECT_URL": backend.url("/who"), **env}


async def upgrade_status(server: ServerProcess, token: str) -> tuple[int, bytes]:
    """An upgrade as a connection's first request (the front door's path): the answer's status and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(upgrade_head(token))
        status, _, body = await read_answer(reader, 10.0)
        return status, body
    finally:
        writer.close()


async def join(client: Client, topic: str, ref: str = "1", payload: dict | None = None) -> Any:
    await client.send_text(orjson.dumps([ref, ref, topic, "phx_join", payload or {}]))
    while True:
        frame = await client.next_json()
        if isinstance(frame, list) and frame[3] not in ("presence_state", "presence_diff"):
            return frame


def log_text(server: ServerProcess) -> str:
    return "\n".join(orjson.dumps(line).decode() for line in server.log_lines)


# --- the backend's answers, read strictly (no server needed)


def test_answers_parsed_strictly():
    now = time.time()
    full = parse_identity(orjson.dumps({"sub": "ada", "topics": ["room:lobby:*"], "info": {"username": "Ada"},
                                        "expires_at": now + 60}), now)
    assert (full.sub, full.topics, full.info, full.exp) == ("ada", ("room:lobby:*",), {"username": "Ada"}, now + 60)
    assert parse_identity(b'"42"', now).sub == "42"  # Linen's /api/jwt/who: the id as a JSON string
    assert parse_identity(b"42", now).sub == "42"
    assert parse_identity(b"ada\n", now).sub == "ada"  # or as bare text
    assert parse_identity(b'{"sub": "ada", "topics": null}', now).exp == math.inf
    for bad in (b'{"sub": ""}', b'{"sub": 7}', b'{"topics": []}', b'{"sub": "a", "topics": "room:1"}',
                b'{"sub": "a", "topics": [1]}', b'{"sub": "a", "info": []}', b'{"sub": "a", "expires_at": "soon"}',
                b'{"sub": "a", "expires_at": true}', b'{"sub": "a", "expires_at": 1}', b"[]", b"null", b"true",
                b"", b"<html>\n<body>oops</body>\n</html>", orjson.dumps("x" * 513)):
        with pytest.raises(AuthAnswerInvalid):
            parse_identity(bad, now)


def test_the_cache_holds_at_most_its_bound_oldest_out_first():
    cache = _Cache()
    for number in range(CACHE_SIZE + 5):
        cache.put(number.to_bytes(4, "big"), time.time() + 60, (ADMIT, None))
    assert CACHE_SIZE * 7 // 8 < len(cache.entries) <= CACHE_SIZE  # full, it drops its oldest eighth (bounded.py)
    assert cache.get((0).to_bytes(4, "big"), time.time()) is None
    assert cache.get((CACHE_SIZE + 4).to_bytes(4, "big"), time.time()) == (ADMIT, None)
    cache.put(b"lapsed", time.time() - 1, (ADMIT, None))
    assert cache.get(b"lapsed", time.time()) is None and b"lapsed" not in cache.entries


# --- connect


async def test_an_opaque_token_is_admitted_by_the_backend_with_its_claims(start_server, backend, http):
    backend.tokens["opaque-ada"] = (200, {"sub": "ada", "topics": ["room:lobby:*"], "info": {"username": "Ada"}})
    server = await start_server(**connect_env(backend, PUSH_AUTH_FORWARD_HEADERS="x-tenant"))
    client = await Client.connect(server.port, "opaque-ada")
    try:
        assert await join(client, "room:lobby:1") == ["1", "1", "room:lobby:1", "phx_reply", OK]
        refused = await join(client, "room:topic:1", "2")  # not in the backend's `topics`
        assert refused == ["2", "2", "room:topic:1", "phx_reply", {"status": "error",
                                                                    "response": {"reason": "unauthorized"}}]
        await publish(http, server, "room:lobby:1", {"text": "hi"})
        assert (await client.next_json())[3:] == ["new_msg", {"text": "hi"}]
    finally:
        client.close()
    (call,) = backend.calls("/who")
    assert call["body"] == {"token": "opaque-ada", "transport": "websocket", "remote_addr": "127.0.0.1",
                            "headers": {}}
    assert call["headers"]["Authorization"] == "Bearer opaque-ada"  # what Linen's /api/jwt/who reads
    assert call["headers"]["X-Push-Service-Key"] == PUBLISH_KEY
    assert call["query"] == ""  # never in the URL
    assert await metric(http, server, "push_auth_callbacks_total", endpoint="connect", outcome="admit") == 1


async def test_a_token_the_backend_refuses_is_403_at_the_upgrade(start_server, backend, http):
    backend.tokens["revoked"] = (401, b"")
    server = await start_server(**connect_env(backend))
    assert (await upgrade_status(server, "revoked"))[0] == 403
    assert (await upgrade_status(server, "unknown"))[0] == 403  # the backend's 403
    assert await metric(http, server, "push_connects_refused_total", reason="auth_refused") == 2
    line = await server.wait_for_log(lambda entry: entry.get("event") == "connect_refused")
    assert line["reason"] == "auth_refused" and line["status"] == 403


async def test_linen_shape_the_user_id_as_the_whole_body(start_server, backend, http):
    backend.tokens["jwe-1"] = (200, '"42"')  # JSON string, as Next's res.json(token.id)
    backend.tokens["jwe-2"] = (200, "43")  # bare text
    server = await start_server(**connect_env(backend))
    for token, sub in (("jwe-1", "42"), ("jwe-2", "43")):
        client = await Client.connect(server.port, token)
        try:
            assert await join(client, f"user:{sub}") == ["1", "1", f"user:{sub}", "phx_reply", OK]
            assert (await join(client, "user:44", "2"))[4]["status"] == "error"  # only their own user topic
        finally:
            client.close()


@pytest.mark.slow
async def test_a_slow_backend_times_out_and_the_client_is_refused(start_server, backend, http):
    backend.delay = 1.0
    backend.tokens["slow"] = (200, {"sub": "ada"})
    server = await start_server(**connect_env(backend, PUSH_AUTH_TIMEOUT="300ms"))
    started = time.monotonic()
    status, body = await upgrade_status(server, "slow")
    assert status == 503 and time.monotonic() - started < 2.0
    assert b"slow" not in body
    failed = await server.wait_for_log(lambda entry: entry.get("event") == "auth_callback_failed")
    assert failed["outcome"] == "timeout" and "0.3s" in failed["error"]
    refused = await server.wait_for_log(lambda entry: entry.get("event") == "connect_refused")
    assert refused["reason"] == "auth_timeout"
    assert await metric(http, server, "push_auth_callbacks_total", endpoint="connect", outcome="timeout") == 1
    assert "slow" not in log_text(server).replace('"slow consumer"', "")


async def test_backend_down_refuses_new_connects_and_leaves_open_sockets_alone(start_server, backend, http):
    backend.tokens["t-ada"] = (200, {"sub": "ada"})
    server = await start_server(**connect_env(backend))
    client = await Client.connect(server.port, "t-ada")
    try:
        assert (await join(client, "room:lobby:9"))[4] == OK
        await backend.stop()
        assert (await upgrade_status(server, "t-bob"))[0] == 503
        line = await server.wait_for_log(lambda entry: entry.get("event") == "auth_callback_failed")
        assert line["outcome"] == "error" and line["error"]
        assert (await server.wait_for_log(lambda e: e.get("event") == "connect_refused"))["reason"] == "auth_error"
        await publish(http, server, "room:lobby:9", {"still": "here"})
        assert (await client.next_json())[3:] == ["new_msg", {"still": "here"}]
        # A token admitted before is remembered: its reconnect does not need the backend.
        again = await Client.connect(server.port, "t-ada")
        again.close()
    finally:
        client.close()
    assert await metric(http, server, "push_auth_callbacks_total", endpoint="connect", outcome="error") == 1


async def test_answers_are_cached_and_concurrent_asks_share_one_call(start_server, backend, http):
    for name in ("a", "b", "c"):
        backend.tokens[f"tok-{name}"] = (200, {"sub": name})
    server = await start_server(**connect_env(backend))
    backend.gate = asyncio.Event()  # held: five connects with one token arrive while the call is out

    async def connect(token: str) -> Client:
        return await Client.connect(server.port, token)

    pending = [asyncio.create_task(connect("tok-a")) for _ in range(5)]
    await until(lambda: backend.in_flight == 1, 5.0, "the first call reaching the backend")
    backend.gate.set()
    clients = await asyncio.gather(*pending)
    clients += [await connect("tok-a"), await connect("tok-b"), await connect("tok-c"), await connect("tok-b")]
    for client in clients:
        client.close()
    for _ in range(3):  # refusals are remembered too
        assert (await upgrade_status(server, "tok-nobody"))[0] == 403
    assert sorted(call["body"]["token"] for call in backend.calls("/who")) == ["tok-a", "tok-b", "tok-c",
                                                                               "tok-nobody"]
    assert await metric(http, server, "push_auth_callback_cache_total", endpoint="connect", result="miss") == 4
    assert await metric(http, server, "push_auth_callback_cache_total", endpoint="connect", result="hit") == 8
    await connections_closed(server)


async def test_no_cache_with_zero_seconds(start_server, backend, http):
    backend.tokens["tok"] = (200, {"sub": "a"})
    server = await start_server(**connect_env(backend, PUSH_AUTH_CACHE_SECONDS="0"))
    for _ in range(3):
        (await Client.connect(server.port, "tok")).close()
    assert len(backend.calls("/who")) == 3


@pytest.mark.slow
async def test_a_cached_admit_ends_at_the_answers_expires_at(start_server, backend, http):
    backend.tokens["short"] = (200, {"sub": "a", "expires_at": time.time() + 1.0})
    server = await start_server(**connect_env(backend))
    (await Client.connect(server.port, "short")).close()
    await asyncio.sleep(1.1)  # the answer's own expiry is the case
    assert (await upgrade_status(server, "short"))[0] == 503  # asked again: its expires_at has passed
    assert len(backend.calls("/who")) == 2


async def test_calls_in_flight_are_bounded_and_the_excess_refused_at_once(start_server, backend, http):
    backend.tokens.update({f"t{i}": (200, {"sub": f"u{i}"}) for i in range(30)})
    server = await start_server(**connect_env(backend, PUSH_AUTH_MAX_CONCURRENCY="2", PUSH_AUTH_TIMEOUT="5s"))
    backend.gate = asyncio.Event()
    attempts = [asyncio.create_task(upgrade_status(server, f"t{i}")) for i in range(30)]
    # 2 calls out, 8 waiting their turn (4 per slot), 20 refused at once.
    await wait_for_metric(http, server, "push_auth_callbacks_total", 20, endpoint="connect", outcome="overload")
    await until(lambda: backend.in_flight == 2, 5.0, "two calls at the backend")
    backend.gate.set()
    statuses = sorted(status for status, _ in await asyncio.gather(*attempts))
    assert statuses == [101] * 10 + [503] * 20
    assert backend.max_in_flight == 2 and len(backend.calls("/who")) == 10
    assert await metric(http, server, "push_connects_refused_total", reason="auth_overload") == 20
    assert await metric(http, server, "push_auth_callbacks_pending", exposed=True) == 0


# --- joins


async def test_join_callback_allows_and_refuses_topics(start_server, backend, http):
    backend.topics.update({"room:lobby:secret": 403, "room:lobby:broken": 500})
    server = await start_server(PUSH_AUTH_JOIN_URL=backend.url("/can"))
    client = await Client.connect(server.port, make_token("ada"))  # a JWT: no connect callback
    try:
        assert await join(client, "room:lobby:open", "1", {"hello": 1}) == ["1", "1", "room:lobby:open",
                                                                             "phx_reply", OK]
        assert (await join(client, "room:lobby:secret", "2"))[4] == {"status": "error",
                                                                     "response": {"reason": "unauthorized"}}
        assert (await join(client, "room:lobby:broken", "3"))[4] == {
            "status": "error", "response": {"reason": "auth backend unavailable"}}
        await client.send_text(orjson.dumps(["1", "4", "room:lobby:open", "phx_leave", {}]))
        assert (await client.next_json())[4] == OK
        await client.next_json()  # phx_close
        assert (await join(client, "room:lobby:open", "5"))[4] == OK  # from the cache
    finally:
        client.close()
    calls = backend.calls("/can")
    assert [call["body"]["topic"] for call in calls] == ["room:lobby:open", "room:lobby:secret", "room:lobby:broken"]
    assert calls[0]["body"] == {"sub": "ada", "topic": "room:lobby:open", "params": {"hello": 1}}
    assert calls[0]["headers"]["X-Push-Service-Key"] == PUBLISH_KEY
    assert await metric(http, server, "push_joins_refused_total", reason="auth_unavailable") == 1
    assert await metric(http, server, "push_auth_callback_cache_total", endpoint="join", result="hit") == 1


async def test_a_pending_join_keeps_order_and_ends_with_its_socket(start_server, backend, http):
    server = await start_server(PUSH_AUTH_JOIN_URL=backend.url("/can"))
    backend.gate = asyncio.Event()
    client = await Client.connect(server.port, make_token("ada"))
    await client.send_text(orjson.dumps(["1", "1", "room:lobby:1", "phx_join", {}]))
    await until(lambda: backend.in_flight == 1, 5.0, "the join's call at the backend")
    # A push on the topic before the join's answer is refused as on any unjoined topic, as Phoenix would.
    await client.send_text(orjson.dumps(["1", "2", "room:lobby:1", "user:typing", {"typing": True}]))
    assert (await client.next_json())[1:] == ["2", "room:lobby:1", "phx_reply",
                                              {"status": "error", "response": {"reason": "unmatched topic"}}]
    client.close()
    await connections_closed(server)
    backend.gate.set()  # the answer comes after the socket is gone: nothing is joined, nothing fails
    await wait_for_metric(http, server, "push_auth_callbacks_pending", 0)
    second = await Client.connect(server.port, make_token("bob"))
    try:
        assert (await join(second, "room:lobby:1"))[4] == OK  # cached by (sub, topic): bob's is a new call
    finally:
        second.close()
    assert await metric(http, server, "push_joins_total", family="lobby") == 1
    assert not [line for line in server.log_lines if line.get("level") == "error"]


# --- long-poll, fallback mode, the key


async def test_longpoll_connect_asks_the_backend(start_server, backend, http):
    backend.tokens["lp-ok"] = (200, {"sub": "ada"})
    server = await start_server(**connect_env(backend))

    async def connect(token: str) -> dict:
        async with http.get(f"{server.http_url}/socket/longpoll?vsn=2.0.0&token={token}",
                            timeout=bounded()) as response:
            assert response.status == 200
            return await response.json(content_type=None)

    opened = await connect("lp-ok")
    assert opened["status"] == 410 and opened["token"].startswith("lp.")
    assert await connect("lp-refused") == {"status": 403}
    await backend.stop()
    assert await connect("lp-new") == {"status": 500}  # unavailable: phoenix.js retries with backoff
    assert backend.calls("/who")[0]["body"]["transport"] == "longpoll"


async def test_a_jwt_in_fallback_mode_never_calls_the_backend(start_server, backend, http):
    server = await start_server(**connect_env(backend))
    # through the front door, and through aiohttp (an upgrade behind another request on the connection)
    (await Client.connect(server.port, make_token("ada"))).close()
    before = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    (await Client.connect(server.port, make_token("bob"), before=before)).close()
    backend.tokens["opaque"] = (200, {"sub": "cy"})
    (await Client.connect(server.port, "opaque", before=before)).close()
    assert [call["body"]["token"] for call in backend.calls("/who")] == ["opaque"]


async def test_callback_mode_asks_for_every_token_even_ours(start_server, backend, http):
    jwt = make_token("ada")
    backend.tokens[jwt] = (200, {"sub": "from-backend"})
    server = await start_server(**connect_env(backend, PUSH_AUTH_MODE="callback"))
    client = await Client.connect(server.port, jwt)
    try:
        assert (await join(client, "user:from-backend"))[4] == OK
    finally:
        client.close()
    assert len(backend.calls("/who")) == 1


async def test_forwarded_headers_reach_the_backend_and_key_its_answers(start_server, backend, http):
    backend.tokens["shared"] = (200, {"sub": "a"})
    server = await start_server(**connect_env(backend, PUSH_AUTH_FORWARD_HEADERS="X-Tenant"))
    for tenant in ("one", "two", "one"):
        head = upgrade_head("shared").replace(b"\r\n\r\n", f"\r\nX-Tenant: {tenant}\r\nX-Other: no\r\n\r\n".encode())
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(head)
        assert (await read_answer(reader, 10.0))[0] == 101
        writer.close()
    assert [call["body"]["headers"] for call in backend.calls("/who")] == [{"x-tenant": "one"}, {"x-tenant": "two"}]


async def test_the_publish_key_and_tokens_stay_out_of_logs_and_urls(start_server, backend, http):
    backend.tokens["secret-token-1"] = (200, {"sub": "a"})
    server = await start_server(**connect_env(backend, PUSH_AUTH_JOIN_URL=backend.url("/can") + "?v=1",
                                              PUSH_LOG_LEVEL="debug"))
    client = await Client.connect(server.port, "secret-token-1")
    try:
        await join(client, "room:lobby:1")
    finally:
        client.close()
    await upgrade_status(server, "secret-token-2")
    await backend.stop()
    await upgrade_status(server, "secret-token-3")
    await server.wait_for_log(lambda entry: entry.get("event") == "auth_callback_failed")
    text = log_text(server)
    assert PUBLISH_KEY not in text and "secret-token" not in text
    assert all(PUBLISH_KEY not in call["query"] for call in backend.requests)


@pytest.mark.slow
async def test_stock_phoenix_js_connects_with_an_opaque_token(start_server, backend, http):
    node_binary()
    backend.tokens["browser-session-1"] = (200, {"sub": "ada", "info": {"username": "Ada"}})
    server = await start_server(**connect_env(backend, PUSH_AUTH_JOIN_URL=backend.url("/can")))
    args = ["18", f"ws://127.0.0.1:{server.port}/socket", "--token", "browser-session-1", "--topic", "room:lobby:7"]
    async with run_script(CLIENT, *args) as js:
        await js.wait_event("join", topic="room:lobby:7", status="ok")
        await publish(http, server, "room:lobby:7", {"text": "hello"})
        message = await js.wait_event("message", topic="room:lobby:7")
        assert message["payload"] == {"text": "hello"}
    assert [call["path"] for call in backend.requests] == ["/who", "/can"]


async def test_production_in_callback_mode_runs_without_a_jwt_key(start_server, backend, http):
    backend.tokens["session-1"] = (200, "ada")
    server = await start_server(**connect_env(backend, PUSH_AUTH_MODE="callback", PUSH_ENV="production",
                                              PUSH_JWT_SECRET=""))
    client = await Client.connect(server.port, "session-1")
    try:
        assert (await join(client, "user:ada"))[4] == OK
    finally:
        client.close()
    assert (await upgrade_status(server, ""))[0] == 403  # no token, no headers forwarded: not asked
    assert len(backend.calls("/who")) == 1


async def test_an_upgrade_the_backend_decides_gets_its_access_log_line(start_server, backend, http):
    backend.tokens["opaque"] = (200, {"sub": "a"})
    server = await start_server(**connect_env(backend, PUSH_ACCESS_LOG="on"))
    (await Client.connect(server.port, "opaque")).close()
    assert (await upgrade_status(server, "refused"))[0] == 403

    def access(status: int) -> Any:
        return server.wait_for_log(lambda e: e.get("event") == "http_access" and e.get("status") == status)

    assert (await access(101))["path"] == "/socket/websocket"
    assert (await access(403))["remote"] == "127.0.0.1"
