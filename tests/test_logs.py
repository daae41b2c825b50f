"""What the server writes, against the real server process: no secret ever, and a useful log.

A server runs with distinctive secrets (two publish keys, a JWT secret, a Redis password in PUSH_BROKER)
and is put through what happens in production: good and refused connects (one "token" being the JWT
secret itself), joins, publishes with good and wrong keys in the header and in the body, a 413,
malformed HTTP carrying a real token or key, hostile X-Request-Ids, a slow consumer, and a drain.
Then ALL of its stdout and stderr is searched for every secret and every client token used: none may
appear. The same run checks the log itself: JSON objects (time, level, logger, message, event) by
default, human text lines with PUSH_LOG_FORMAT=text, and the notable events in both.
Needs the local Redis at 127.0.0.1:6379 (its default user has no password, so it accepts any password
given with the username: redis://default:<password>@...).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType

from conftest import ServerProcess, make_token, server_env
from test_websocket import auth_protocol
from ws_client import Client

RUN = secrets.token_hex(4)  # topics and secrets of this run: nothing else can have printed them
SERVICE_KEYS = (f"pk-old-{RUN}-{secrets.token_hex(12)}", f"pk-new-{RUN}-{secrets.token_hex(12)}")
JWT_SECRET = f"jwt-secret-{RUN}-{secrets.token_hex(16)}"
REDIS_PASSWORD = f"redis-pw-{RUN}-{secrets.token_hex(8)}"
WRONG_KEY = f"wrong-key-{RUN}-{secrets.token_hex(8)}"  # a caller's mistake may be another environment's key
REDIS = "127.0.0.1:6379"
TIMEOUT = 5.0
TOPIC = f"room:lobby:logs-{RUN}"
SLOW_TOPIC = f"room:lobby:slow-{RUN}"
SANE_ID = f"req-{RUN}.retry_2"
HOSTILE_IDS = [
    "two words",
    "x" * 65,  # one more than the 64 allowed
    "a\tb",
    'abc","level":"error',  # an attempt at forging a JSON field
    "../../etc/passwd?%0Ainjected",
]
GENERATED_ID = re.compile(r"[0-9a-f]{16}")
JSON_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) +\S")
LEVELS = {"debug", "info", "warning", "error", "critical"}


def token(sub: str, **claims: Any) -> str:
    return make_token(sub, secret=JWT_SECRET, **claims)


def secret_env(**overrides: str) -> dict[str, str]:
    return server_env(**{"PUSH_SERVICE_KEY": ",".join(SERVICE_KEYS), "PUSH_JWT_SECRET": JWT_SECRET,
                         "PUSH_BROKER": f"redis://default:{REDIS_PASSWORD}@{REDIS}/0",
                         "PUSH_MAX_PUBLISH_BYTES": "64KiB", "PUSH_SEND_BUFFER_BYTES": "64KiB",
                         "PUSH_DRAIN_SECONDS": "0.5", **overrides})


class CapturingServer(ServerProcess):
    """A ServerProcess that also keeps every raw stderr line, and understands text logs."""

    def __init__(self, env: dict[str, str], args: list[str]) -> None:
        super().__init__(env, args)
        self.stderr_lines: list[str] = []

    async def _read_logs(self, listening: asyncio.Future[int]) -> None:
        assert self.process is not None and self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace")
            self.stderr_lines.append(line)
            try:
                entry = orjson.loads(raw)
            except orjson.JSONDecodeError:
                entry = None
            if not isinstance(entry, dict):
                entry = {"raw": line}
            self.log_lines.append(entry)
            port = entry.get("port") if entry.get("event") == "listening" else None
            if port is None and (text := re.search(r"\[event=listening .*?\bport=(\d+)", line)):
                port = int(text.group(1))
            if port is not None and not listening.done():
                listening.set_result(port)
        if not listening.done():
            listening.set_exception(RuntimeError(f"server exited before listening: {self.stderr_lines}"))

    def output(self) -> str:
        """Everything it wrote: stdout (read once it has stopped) and stderr."""
        return self.stdout.decode(errors="replace") + "".join(self.stderr_lines)

    def text_lines(self, *fragments: str) -> list[str]:
        return [line for line in self.stderr_lines if all(fragment in line for fragment in fragments)]


@pytest.fixture
async def capturing_server() -> AsyncIterator[Callable[..., Any]]:
    """Factory: `await capturing_server(**env)` -> a started CapturingServer (env from secret_env)."""
    servers: list[CapturingServer] = []

    async def start(**env: str) -> CapturingServer:
        server = CapturingServer(secret_env(**env), [])
        servers.append(server)
        await server.start()
        return server

    yield start
    for server in servers:
        await server.stop()


# --- exercising the server


@dataclass
class Exercised:
    """What a run used (to search the output for) and saw (to find in the log)."""

    secrets: list[str] = field(default_factory=lambda: [*SERVICE_KEYS, JWT_SECRET, REDIS_PASSWORD, WRONG_KEY])
    refused: dict[str, str] = field(default_factory=dict)  # reason -> token
    replaced_ids: dict[str, str] = field(default_factory=dict)  # hostile X-Request-Id -> the id answered
    generated_id: str = ""

    def client_token(self, value: str) -> str:
        self.secrets.append(value)
        if value.count(".") == 2:
            self.secrets.append(value.rsplit(".", 1)[1])  # the signature alone is as unique
        return value


async def ws_status(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> int:
    try:
        ws = await http.ws_connect(url, **kwargs)
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status
    await ws.close()
    return 101


async def join(ws: aiohttp.ClientWebSocketResponse, topic: str) -> None:
    await ws.send_json(["1", "1", topic, "phx_join", {}])
    assert await ws.receive_json(timeout=TIMEOUT) == ["1", "1", topic, "phx_reply", {"status": "ok", "response": {}}]


async def post(http: aiohttp.ClientSession, server: ServerProcess, path: str, body: Any, *,
               key: str | None = None, request_id: str | None = None) -> tuple[int, Any, str]:
    headers = {}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with http.post(f"{server.http_url}{path}", data=data, headers={"Content-Type": "application/json",
                                                                         **headers}) as response:
        return response.status, await response.json(), response.headers["X-Request-Id"]


async def raw_http(server: ServerProcess, request: bytes) -> bytes:
    """Bytes no HTTP client would send; the server's whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), TIMEOUT)  # the server closes after a 400
    finally:
        writer.close()


async def exercise(server: CapturingServer) -> Exercised:
    done = Exercised()
    ws_url = f"{server.ws_url}?vsn=2.0.0"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as http:
        # Connects: a token in the query, one in Sec-WebSocket-Protocol (phoenix.js 1.8 authToken).
        ws = await http.ws_connect(f"{ws_url}&token={done.client_token(token('alice'))}")
        await join(ws, TOPIC)
        protocol = auth_protocol(done.client_token(token("bob")))
        done.secrets.append(protocol.removeprefix("base64url.bearer.phx."))
        ws2 = await http.ws_connect(ws_url, protocols=("phoenix", protocol))
        await join(ws2, TOPIC)
        # Refused connects: each one's reason is logged, never the token.
        done.refused = {
            "bad_signature": done.client_token(make_token("mallory", secret=f"not-the-secret-{secrets.token_hex(16)}")),
            "expired": done.client_token(token("alice", ttl=-60)),
            "malformed": JWT_SECRET,  # the secret itself pasted as a token
        }
        for reason, bad in done.refused.items():
            assert await ws_status(http, f"{ws_url}&token={bad}") == 403, reason
        assert await ws_status(http, f"{ws_url}&token={JWT_SECRET}.{JWT_SECRET}.{JWT_SECRET}") == 403
        assert await ws_status(http, ws_url, protocols=("phoenix", auth_protocol(JWT_SECRET))) == 403
        assert await ws_status(http, ws_url) == 403  # no token: "missing"

        # Publishes with each key, in the header and in the body; both sockets get them, minus the key.
        status, answer, _ = await post(http, server, "/api/message", {"channel_id": f"logs-{RUN}", "n": 1},
                                       key=SERVICE_KEYS[0])
        assert (status, answer["delivered"]) == (200, 2), answer
        status, answer, _ = await post(http, server, "/api/broadcast", {
            "topic": TOPIC, "event": "new_msg", "payload": {"n": 2}, "token": SERVICE_KEYS[1]})
        assert status == 200, answer
        for socket_ in (ws, ws2):
            first = await socket_.receive_json(timeout=TIMEOUT)
            assert first == [None, None, TOPIC, "new_msg", {"channel_id": f"logs-{RUN}", "n": 1}]
            assert (await socket_.receive_json(timeout=TIMEOUT))[4] == {"n": 2}

        # Refused publishes: the sane request id is kept and logged; the keys never are.
        status, _, answered = await post(http, server, "/api/message", {"channel_id": "1"}, key=WRONG_KEY,
                                         request_id=SANE_ID)
        assert (status, answered) == (401, SANE_ID)
        assert (await post(http, server, "/api/message", {"channel_id": "1", "token": WRONG_KEY}))[0] == 401
        assert (await post(http, server, "/api/message", {"channel_id": "1"}, key=JWT_SECRET))[0] == 401
        assert (await post(http, server, "/api/message", {"channel_id": "1", "token": JWT_SECRET}))[0] == 401
        assert (await post(http, server, "/api/message", {"channel_id": "1"}))[0] == 401
        too_big = orjson.dumps({"channel_id": "1", "token": SERVICE_KEYS[1], "f": "x" * 70_000})
        assert (await post(http, server, "/api/message", too_big, key=SERVICE_KEYS[0]))[0] == 413

        # Request ids: a hostile one is replaced by a generated one; none given, one is generated.
        for hostile in HOSTILE_IDS:
            status, _, answered = await post(http, server, "/api/message", {"channel_id": "1"}, key=WRONG_KEY,
                                             request_id=hostile)
            assert status == 401 and GENERATED_ID.fullmatch(answered) and answered != hostile, answered
            done.replaced_ids[hostile] = answered
        async with http.get(f"{server.http_url}/healthz") as response:
            done.generated_id = response.headers["X-Request-Id"]
            assert GENERATED_ID.fullmatch(done.generated_id), done.generated_id
        async with http.get(f"{server.http_url}/healthz", headers={"X-Request-Id": SANE_ID}) as response:
            assert response.headers["X-Request-Id"] == SANE_ID
        # A newline cannot even get into a header: the parser refuses the request.
        refused = await raw_http(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id: evil\r\n"
                                         b" injected\r\nX-Request-Id: evil\ninjected: 1\r\n\r\n")
        assert refused.startswith(b"HTTP/1.") and b" 400 " in refused.split(b"\r\n")[0], refused[:100]
        # Malformed HTTP that carries a real client token, or a real key: aiohttp's parser error quotes the
        # offending line; that quote must not reach the log.
        quoted_token = done.client_token(token("carol"))
        for request in (
            f"GET /socket/websocket?vsn=2.0.0&token={quoted_token}\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
            f"POST /api/message HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SERVICE_KEYS[0]}\x7f\r\n\r\n",
            f"POST /api/message HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz;{SERVICE_KEYS[1]}\r\n",
        ):
            answer = await raw_http(server, request.encode("latin-1"))
            assert b" 400 " in answer.split(b"\r\n")[0], answer[:100]

        await slow_consumer(http, server, done)

        # The drain closes what is still open with 1012.
        assert await server.stop() == 0
        for socket_ in (ws, ws2):
            closing = await socket_.receive(timeout=TIMEOUT)
            assert (closing.type, closing.data, closing.extra) == (WSMsgType.CLOSE, 1012, "service restart")
    return done


async def slow_consumer(http: aiohttp.ClientSession, server: CapturingServer, done: Exercised) -> None:
    """A socket that stops reading while broadcasts keep coming: dropped once 64 KiB wait for it."""
    slow = await Client.connect(server.port, done.client_token(token("slow")), rcvbuf=4096)
    try:
        await slow.send_text(orjson.dumps(["1", "1", SLOW_TOPIC, "phx_join", {}]))
        assert await slow.next_json() == ["1", "1", SLOW_TOPIC, "phx_reply", {"status": "ok", "response": {}}]
        filler = "x" * 15_000
        for round_ in range(300):  # at most ~13 MB in all, on loopback; usually a few dozen rounds
            messages = [{"topic": SLOW_TOPIC, "event": "new_msg", "payload": {"seq": round_ * 3 + i, "f": filler}}
                        for i in range(3)]
            status, answer, _ = await post(http, server, "/api/batch", {"messages": messages}, key=SERVICE_KEYS[0])
            assert status == 200, answer
            if server.text_lines("slow consumer"):
                break
        else:
            raise AssertionError("the slow consumer was never dropped")
    finally:
        slow.close()


# --- checks


def assert_no_secret(server: CapturingServer, done: Exercised) -> None:
    output = server.output()
    assert len(server.stderr_lines) > 20  # there is a log to search
    leaked = [secret for secret in done.secrets if secret in output]
    assert not leaked, f"secrets in the output: {leaked}"
    for hostile in HOSTILE_IDS:
        assert hostile not in output
    assert "injected" not in output
    # Configured keys: no dev-mode banner, nothing at all on stdout.
    assert server.stdout == b""


def json_events(server: CapturingServer, name: str, **fields: Any) -> list[dict[str, Any]]:
    return [entry for entry in server.log_lines
            if entry.get("event") == name and all(entry.get(key) == value for key, value in fields.items())]


async def test_json_log_has_the_events_and_no_secret(capturing_server):
    server = await capturing_server()
    done = await exercise(server)
    assert_no_secret(server, done)

    # Every line is one JSON object with the standard fields.
    not_json = [entry["raw"] for entry in server.log_lines if "raw" in entry]
    assert not not_json, not_json[:5]
    for entry in server.log_lines:
        assert {"time", "level", "logger", "message", "event"} <= set(entry), entry
        assert JSON_TIME.fullmatch(entry["time"]) and entry["level"] in LEVELS, entry
        assert entry["logger"].startswith(("push_service", "aiohttp")), entry
    assert not [entry for entry in server.log_lines if entry["level"] in ("error", "critical")]

    # listening: where, and the configuration with every secret shown only as set.
    (listening,) = json_events(server, "listening")
    assert (listening["host"], listening["port"]) == ("127.0.0.1", server.port)
    config = listening["config"]
    assert config["service_keys"] == "<2 set>" and config["jwt_secret"] == "<set>"
    assert config["broker"] == f"redis://default:<redacted>@{REDIS}/0"
    assert config["dev_mode"] is False and config["max_publish_bytes"] == 64 * 1024
    assert json_events(server, "broker_up", broker=f"redis://default:<redacted>@{REDIS}/0")

    # connect_refused: the reason, never the token.
    for reason in (*done.refused, "missing"):
        assert json_events(server, "connect_refused", reason=reason, status=403), reason

    # http_refused: request id, route, status, the error; warnings only for 5xx.
    sane = json_events(server, "http_refused", request_id=SANE_ID)
    assert len(sane) == 1 and sane[0]["status"] == 401 and sane[0]["route"] == "/api/message"
    assert sane[0]["method"] == "POST" and sane[0]["level"] == "info" and sane[0]["error"] == "invalid publish key"
    for answered in done.replaced_ids.values():
        assert len(json_events(server, "http_refused", request_id=answered, status=401)) == 1
    too_big = json_events(server, "http_refused", status=413)
    assert len(too_big) == 1 and GENERATED_ID.fullmatch(too_big[0]["request_id"])
    assert all(GENERATED_ID.fullmatch(e["request_id"]) or e["request_id"] == SANE_ID
               for e in json_events(server, "http_refused"))
    # Malformed HTTP: one info line each, without the parser's quote of the request.
    malformed = json_events(server, "http_malformed", status=400)
    assert len(malformed) >= 3 and all(e["level"] == "info" and "exception" not in e for e in malformed)

    # The slow consumer: a warning with the reason and who it was.
    (slow,) = json_events(server, "disconnect", reason="slow consumer")
    assert slow["level"] == "warning" and slow["code"] == 1013 and slow["sub"] == "slow" and slow["topics"] == 1

    # The drain, once, with the two sockets still open then.
    (start,) = json_events(server, "drain_start")
    assert start["connections"] == 2 and start["seconds"] == 0.5
    assert json_events(server, "drain_done", connections=2)
    assert json_events(server, "stopping") and json_events(server, "stopped")
    names = [entry["event"] for entry in server.log_lines]
    assert names.index("listening") < names.index("drain_start") < names.index("drain_done") < names.index("stopped")


async def test_text_log_is_for_humans_with_the_same_events(capturing_server):
    server = await capturing_server(PUSH_LOG_FORMAT="text")
    done = await exercise(server)
    assert_no_secret(server, done)

    # Human lines: "<date> <time>,<ms> LEVEL message [key=value ...]", none of them JSON, no traceback.
    for line in server.stderr_lines:
        assert TEXT_LINE.match(line), line
        assert not line.lstrip().startswith("{")
    assert all("raw" in entry for entry in server.log_lines)
    assert not server.text_lines(" ERROR ") and not server.text_lines("Traceback")

    (listening,) = server.text_lines(" INFO ", " listening [event=listening ")
    assert f"port={server.port}" in listening
    assert "'service_keys': '<2 set>'" in listening and "'jwt_secret': '<set>'" in listening
    assert f"'broker': 'redis://default:<redacted>@{REDIS}/0'" in listening
    assert server.text_lines("event=broker_up", f"broker=redis://default:<redacted>@{REDIS}/0")
    for reason in (*done.refused, "missing"):
        assert server.text_lines(" INFO ", "event=connect_refused", f"reason={reason} status=403"), reason
    (sane,) = server.text_lines(" INFO ", "request refused [event=http_refused", f"request_id={SANE_ID} ")
    assert "status=401" in sane and "route=/api/message" in sane
    for answered in done.replaced_ids.values():
        assert len(server.text_lines("event=http_refused", f"request_id={answered} ", "status=401")) == 1
    assert server.text_lines("event=http_refused", "status=413")
    assert len(server.text_lines(" INFO ", "event=http_malformed", "status=400")) >= 3
    (slow,) = server.text_lines("event=disconnect", "reason=slow consumer")
    assert " WARNING slow consumer dropped [" in slow and "code=1013" in slow and "sub=slow" in slow
    assert server.text_lines(" INFO ", "event=drain_start", "connections=2")
    assert server.text_lines(" INFO ", "event=drain_done", "connections=2")
    assert server.text_lines("event=stopped")


# --- a broker that is down: its URL's secret stays out of the log too


def dead_port() -> int:
    """A loopback port where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


BROKER_URLS = {  # PUSH_BROKER with a secret -> as the log must show it
    "redis://:{secret}@127.0.0.1:{port}/0": "redis://:<redacted>@127.0.0.1:{port}/0",
    "redis://127.0.0.1:{port}/0?password={secret}": "redis://127.0.0.1:{port}/0?password=<redacted>",
    "nats://{secret}@127.0.0.1:{port}": "nats://<redacted>@127.0.0.1:{port}",  # NATS token authentication
}


@pytest.mark.slow
async def test_broker_secret_is_redacted_while_the_broker_is_down(capturing_server):
    """Three servers at once (each waits 5 s for its broker before serving without it), at debug level."""
    secret = f"broker-secret-{RUN}-{secrets.token_hex(8)}"
    cases = [(url.format(secret=secret, port=port), shown.format(port=port))
             for (url, shown), port in zip(BROKER_URLS.items(), (dead_port() for _ in BROKER_URLS))]
    servers = await asyncio.gather(*(capturing_server(PUSH_BROKER=url, PUSH_LOG_LEVEL="debug") for url, _ in cases))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as http:
        for server in servers:
            async with http.get(f"{server.http_url}/readyz") as response:
                assert response.status == 503
                assert await response.json() == {"status": "unavailable", "error": "broker unavailable"}
    assert await asyncio.gather(*(server.stop() for server in servers)) == [0] * len(servers)
    missing_warning = []
    for server, (url, shown) in zip(servers, cases):
        assert secret not in server.output(), url
        assert not [entry for entry in server.log_lines if "raw" in entry], url
        (listening,) = json_events(server, "listening")
        assert listening["config"]["broker"] == shown
        down = json_events(server, "broker_down")
        assert all(entry["broker"] == shown for entry in down), down
        if not down:
            missing_warning.append(url.split(":")[0])
    assert not missing_warning


async def test_serve_says_which_loop_and_parsers_it_runs_on(server):
    """The default install is the fast one (uvloop, llhttp, hiredis), and the start log says so: a
    process that fell back to a slower part is seen in its first lines."""
    line = await server.wait_for_log(lambda line: line.get("event") == "runtime", timeout=5)
    assert line["loop"].startswith("uvloop "), line
    assert line["http_parser"].startswith("llhttp (httptools "), line
    assert line["redis_parser"].startswith("hiredis "), line
