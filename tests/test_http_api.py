"""The HTTP API against a real server process, every answer checked against openapi.yaml.

Each test talks to `python -m push_service serve` over the network: publishes go through
aiohttp's client, and what was broadcast is read by a real Phoenix v2 WebSocket subscriber.
Every response a test gets (the WebSocket handshakes included) is validated against the
OpenAPI document with openapi-core; every request the server accepted must be valid for the
document too, and the bad requests marked `spec_accepts=False` must be refused by it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
import pytest_asyncio
import yaml
from multidict import CIMultiDict, CIMultiDictProxy
from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_schema_validator import OAS31Validator
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.datastructures import Headers, ImmutableMultiDict
from yarl import URL

from conftest import PUBLISH_KEY, ROOT, make_token, server_has_read, server_starter, shared_server
from http_helpers import wait_for_metric
from ws_client import UPGRADE_HEADERS
from push_service.metrics import Metrics

SPEC_PATH = ROOT / "openapi.yaml"
SPEC_DICT = yaml.safe_load(SPEC_PATH.read_text())
# Loading also validates the document itself against the OpenAPI 3.x meta-schema.
SPEC = OpenAPI.from_dict(SPEC_DICT)
TIMEOUT = 5
UNSET: Any = object()

# --- openapi-core adapters: the Request and Response protocols, built from what aiohttp sent and got


@dataclass
class SpecRequest:
    host_url: str
    path: str
    method: str
    body: bytes | None
    content_type: str
    parameters: RequestParameters


@dataclass
class SpecResponse:
    status_code: int
    data: bytes
    content_type: str
    headers: Headers


def spec_request(url: str, method: str, headers: Any, body: bytes | None) -> SpecRequest:
    parts = urlsplit(url)
    query = ImmutableMultiDict(list(URL(url).query.items()))
    header_list = Headers(list(headers.items()))
    return SpecRequest(
        host_url=f"{parts.scheme}://{parts.netloc}", path=parts.path, method=method.lower(), body=body,
        content_type=(headers.get("Content-Type") or "").lower(),
        parameters=RequestParameters(query=query, header=header_list, cookie=ImmutableMultiDict()))


def spec_response(status: int, headers: Any, body: bytes) -> SpecResponse:
    return SpecResponse(status_code=status, data=body, content_type=(headers.get("Content-Type") or "").lower(),
                        headers=Headers(list(headers.items())))


def _component_response(name: str) -> dict[str, Any]:
    return SPEC_DICT["components"]["responses"][name]


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    node: Any = SPEC_DICT
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def validate_against_component(name: str, response: SpecResponse) -> None:
    """For router answers outside any operation (404 for an unknown path, 405 for an unserved method)."""
    component = _component_response(name)
    for header, spec in component.get("headers", {}).items():
        if spec.get("required"):
            assert header in response.headers, f"{name}: missing header {header}"
    mimetype = response.content_type.split(";")[0].strip()
    assert mimetype in component["content"], f"{name}: unexpected Content-Type {response.content_type!r}"
    schema = _resolve(component["content"][mimetype]["schema"])
    OAS31Validator(schema).validate(orjson.loads(response.data))


def spec_operation_exists(path: str, method: str) -> bool:
    return method.lower() in SPEC_DICT["paths"].get(path, {})


def check_against_spec(request: SpecRequest, response: SpecResponse, spec_accepts: bool | None,
                       body_known: bool = True) -> None:
    if spec_operation_exists(request.path, request.method):
        SPEC.validate_response(request, response)
    elif request.path in SPEC_DICT["paths"]:
        assert response.status_code == 405, f"{request.method} {request.path} is not in the spec"
        validate_against_component("MethodNotAllowed", response)
    else:
        assert response.status_code == 404, f"{request.path} is not in the spec"
        validate_against_component("NotFound", response)
    if spec_accepts or (spec_accepts is None and response.status_code < 300 and body_known):
        # What the server accepts, the document must accept.
        SPEC.validate_request(request)
    elif spec_accepts is False:
        errors = list(SPEC.iter_request_errors(request))
        assert errors, f"openapi.yaml accepts a request the server refused: {request.body!r}"


# --- the client side: HTTP calls and WebSocket subscribers


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    request_headers: CIMultiDictProxy[str]

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")

    def json(self) -> Any:
        assert self.content_type.startswith("application/json"), self.content_type
        return orjson.loads(self.body)

    @property
    def error(self) -> str:
        data = self.json()
        assert set(data) == {"error"}, data
        return data["error"]


class Subscriber:
    """A Phoenix v2 WebSocket client joined to some topics."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ref = 0

    async def join(self, topic: str) -> None:
        self._ref += 1
        ref = f"j{self._ref}"
        await self.ws.send_json([ref, ref, topic, "phx_join", {}])
        assert await self.next() == [
            ref, ref, topic, "phx_reply", {"status": "ok", "response": {}}]

    async def next(self) -> list[Any]:
        """The next frame, passing over presence frames (room:topic:* and room:<id> track presence)."""
        while True:
            frame = await self.ws.receive_json(timeout=TIMEOUT)
            if frame[3] not in ("presence_state", "presence_diff"):
                return frame


class Api:
    """One server, reached through a shared ClientSession; every answer is checked against the spec."""

    def __init__(self, http: aiohttp.ClientSession, handshakes: list[Any], server: Any) -> None:
        self.http = http
        self.handshakes = handshakes
        self.server = server

    async def request(self, method: str, path: str, *, json: Any = UNSET, data: Any = None,
                      headers: dict[str, str] | None = None, params: dict[str, str] | None = None,
                      spec_accepts: bool | None = None) -> Reply:
        sent = CIMultiDict(headers or {})
        if json is not UNSET:
            data = orjson.dumps(json)
            sent.setdefault("Content-Type", "application/json")
        url = self.server.http_url + path
        async with self.http.request(method, url, data=data, headers=sent, params=params) as response:
            body = await response.read()
            reply = Reply(response.status, response.headers, body, response.request_info.headers)
            body_known = data is None or isinstance(data, bytes)  # not a form or a chunked stream
            request = spec_request(str(response.request_info.url), method, response.request_info.headers,
                                   data if isinstance(data, bytes) else None)
        check_against_spec(request, spec_response(reply.status, reply.headers, body), spec_accepts, body_known)
        return reply

    async def get(self, path: str, **kwargs: Any) -> Reply:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, body: Any = UNSET, *, key: str | None = None, **kwargs: Any) -> Reply:
        """POST a JSON body; `key` goes in `Authorization: Bearer` (the body's token is up to the caller)."""
        headers = dict(kwargs.pop("headers", None) or {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return await self.request("POST", path, json=body, headers=headers, **kwargs)

    async def publish(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        reply = await self.post(path, {**body, "token": PUBLISH_KEY})
        assert reply.status == 200, reply.body
        return reply.json()

    @asynccontextmanager
    async def connect(self, *, sub: str = "u1", **kwargs: Any) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
        """A WebSocket, its handshake answer (101, as seen by the trace hook) checked against the spec."""
        before = len(self.handshakes)
        async with self.http.ws_connect(f"{self.server.ws_url}?vsn=2.0.0&token={make_token(sub)}", **kwargs) as ws:
            assert len(self.handshakes) == before + 1
            params = self.handshakes[-1]
            request = spec_request(str(params.url), params.method, params.headers, None)
            response = spec_response(params.response.status, params.response.headers, b"")
            check_against_spec(request, response, spec_accepts=True)
            yield ws

    @asynccontextmanager
    async def subscriber(self, *topics: str, sub: str = "u1") -> AsyncIterator[Subscriber]:
        async with self.connect(sub=sub) as ws:
            subscriber = Subscriber(ws)
            for topic in topics:
                await subscriber.join(topic)
            yield subscriber

    async def assert_nothing_more(self, subscriber: Subscriber, topic: str) -> None:
        """Nothing was broadcast to `subscriber` on `topic`: a sentinel published now is its next frame."""
        result = await self.publish("/api/broadcast", {"topic": topic, "event": "sentinel", "payload": {}})
        assert result["delivered"] >= 1
        assert await subscriber.next() == [None, None, topic, "sentinel", {}]


# One server for the tests that take `api` (each publishes to topics only its own subscribers join, and
# waits for them to be gone); a test that counts server-wide totals starts its own. Modules that import
# `api` give it a server of their own (per_test_server) on their module's loop.
pytestmark = pytest.mark.asyncio(loop_scope="module")
server = shared_server()
start_server = server_starter("module")


@pytest_asyncio.fixture(loop_scope="module")
async def client() -> AsyncIterator[Callable[[Any], Api]]:
    """`client(server)` -> an Api for that server; all share one ClientSession."""
    handshakes: list[Any] = []

    async def on_request_end(_session: Any, _context: Any, params: aiohttp.TraceRequestEndParams) -> None:
        if params.response.status == 101:
            handshakes.append(params)

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_request_end)
    async with aiohttp.ClientSession(trace_configs=[trace]) as http:
        yield lambda server: Api(http, handshakes, server)


@pytest_asyncio.fixture(loop_scope="module")
async def api(server: Any, client: Callable[[Any], Api]) -> AsyncIterator[Api]:
    api = client(server)
    yield api
    # The next test's `delivered` counts must not see this one's subscribers (a close is seen later).
    await wait_for_metric(api.http, server, "push_connections", 0, transport="websocket")


def new_msg(topic: str, payload: dict[str, Any]) -> list[Any]:
    return [None, None, topic, "new_msg", payload]


# --- publishing: each endpoint reaches its topic with new_msg and the body minus token

FAMILY_ENDPOINTS = [
    # path, id field, topic for id "42"
    ("/api/message", "channel_id", "room:lobby:42"),
    ("/api/channel", "channel_id", "room:lobby:42"),
    ("/api/thread", "thread_id", "room:topic:42"),
    ("/api/community", "community_id", "room:42"),
    ("/api/user", "user_id", "user:42"),
]


@pytest.mark.parametrize(("path", "field", "topic"), FAMILY_ENDPOINTS)
async def test_publish_endpoint_broadcasts_new_msg_to_its_topic(api: Api, path: str, field: str, topic: str) -> None:
    body = {field: "42", "message": "hello", "extra": {"nested": [1, 2, None]}, "flag": True}
    async with api.subscriber(topic, sub="42") as sub:
        reply = await api.post(path, {**body, "token": PUBLISH_KEY})
        assert reply.status == 200
        assert reply.json() == {"status": 200, "published": 1, "delivered": 1}
        assert await sub.next() == new_msg(topic, body)


@pytest.mark.parametrize(("path", "field", "topic"), FAMILY_ENDPOINTS)
async def test_integer_id_reaches_the_same_topic_as_its_string(api: Api, path: str, field: str, topic: str) -> None:
    async with api.subscriber(topic, sub="42") as sub:
        assert (await api.publish(path, {field: 42}))["delivered"] == 1
        assert await sub.next() == new_msg(topic, {field: 42})


async def test_linen_message_body_is_broadcast_unchanged_minus_token(api: Api) -> None:
    linen = {
        "channel_id": "c0a1", "thread_id": "t9b8", "message_id": "m777", "imitation_id": "imit-1",
        "is_thread": False, "is_reply": True,
        "message": json.dumps({"id": "m777", "body": "hi @bob", "mentions": [{"id": "u2"}]}),
        "thread": json.dumps({"id": "t9b8", "slug": "hello"}), "mention_type": "signal",
        "some_future_field": [1, {"a": "b"}],
    }
    async with api.subscriber("room:lobby:c0a1", "room:topic:t9b8") as sub:
        reply = await api.post("/api/message", {**linen, "token": PUBLISH_KEY})
        assert reply.json() == {"status": 200, "published": 1, "delivered": 1}
        assert await sub.next() == new_msg("room:lobby:c0a1", linen)
        # Default PUSH_API_MESSAGE_TOPIC=lobby: nothing went to the thread's topic.
        await api.assert_nothing_more(sub, "room:topic:t9b8")


async def test_delivered_counts_the_local_subscribers_of_the_topic(api: Api) -> None:
    async with api.subscriber("room:lobby:7") as first, api.subscriber("room:lobby:7") as second, \
            api.subscriber("room:lobby:8") as other:
        result = await api.publish("/api/channel", {"channel_id": "7", "n": 1})
        assert result == {"status": 200, "published": 1, "delivered": 2}
        assert await first.next() == new_msg("room:lobby:7", {"channel_id": "7", "n": 1})
        assert await second.next() == new_msg("room:lobby:7", {"channel_id": "7", "n": 1})
        await api.assert_nothing_more(other, "room:lobby:8")


async def test_publish_to_a_topic_nobody_joined_is_accepted_with_delivered_zero(api: Api) -> None:
    for path, field, _ in FAMILY_ENDPOINTS:
        assert await api.publish(path, {field: "nobody-here"}) == {"status": 200, "published": 1, "delivered": 0}
    assert await api.publish("/api/broadcast", {"topic": "room:empty", "event": "e"}) == {
        "status": 200, "published": 1, "delivered": 0}


async def test_broadcast_sends_the_given_event_and_payload(api: Api) -> None:
    async with api.subscriber("room:acme", "user:u1") as sub:
        payload = {"who": "u2", "typing": True}
        reply = await api.post("/api/broadcast", {"topic": "room:acme", "event": "typing", "payload": payload,
                                                  "ignored": 1}, key=PUBLISH_KEY)
        assert reply.json() == {"status": 200, "published": 1, "delivered": 1}
        assert await sub.next() == [None, None, "room:acme", "typing", payload]
        # Without a payload, subscribers get an empty object.
        assert (await api.publish("/api/broadcast", {"topic": "user:u1", "event": "ping"}))["delivered"] == 1
        assert await sub.next() == [None, None, "user:u1", "ping", {}]


async def test_batch_is_applied_in_order_and_reports_published_and_delivered(api: Api) -> None:
    async with api.subscriber("room:lobby:1", "room:topic:2") as both, api.subscriber("room:lobby:1") as lobby:
        messages = [
            {"topic": "room:lobby:1", "event": "new_msg", "payload": {"n": 1}},
            {"topic": "room:topic:2", "event": "edit", "payload": {"n": 2}},
            {"topic": "room:lobby:1", "event": "new_msg", "payload": {"n": 3}},
            {"topic": "room:nobody", "event": "new_msg", "payload": {"n": 4}},
            {"topic": "room:lobby:1", "event": "delete"},
        ]
        reply = await api.post("/api/batch", {"messages": messages}, key=PUBLISH_KEY)
        assert reply.status == 200
        # 2 + 1 + 2 + 0 + 2 socket writes
        assert reply.json() == {"status": 200, "published": 5, "delivered": 7}
        assert [await both.next() for _ in range(4)] == [
            [None, None, "room:lobby:1", "new_msg", {"n": 1}],
            [None, None, "room:topic:2", "edit", {"n": 2}],
            [None, None, "room:lobby:1", "new_msg", {"n": 3}],
            [None, None, "room:lobby:1", "delete", {}],
        ]
        assert [await lobby.next() for _ in range(3)] == [
            [None, None, "room:lobby:1", "new_msg", {"n": 1}],
            [None, None, "room:lobby:1", "new_msg", {"n": 3}],
            [None, None, "room:lobby:1", "delete", {}],
        ]


# --- the publish key: Authorization: Bearer or the body's token, never broadcast


@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
async def test_key_in_authorization_header(api: Api, scheme: str) -> None:
    async with api.subscriber("room:lobby:1") as sub:
        reply = await api.post("/api/channel", {"channel_id": "1", "text": "via header"},
                               headers={"Authorization": f"{scheme} {PUBLISH_KEY}"})
        assert reply.status == 200
        assert reply.json()["delivered"] == 1
        assert await sub.next() == new_msg("room:lobby:1", {"channel_id": "1", "text": "via header"})


async def test_key_in_body_token_is_not_broadcast(api: Api) -> None:
    async with api.subscriber("room:lobby:1") as sub:
        reply = await api.post("/api/channel", {"channel_id": "1", "token": PUBLISH_KEY, "text": "via body"})
        assert reply.status == 200
        frame = await sub.next()
        assert frame == new_msg("room:lobby:1", {"channel_id": "1", "text": "via body"})
        assert PUBLISH_KEY not in json.dumps(frame)


@pytest.mark.parametrize("body_token", [PUBLISH_KEY, "some-other-value"], ids=["same-key", "other-value"])
async def test_header_and_body_token_both_given_token_is_stripped(api: Api, body_token: str) -> None:
    """The header decides; whatever the body's token holds, it is never broadcast."""
    async with api.subscriber("room:topic:5") as sub:
        reply = await api.post("/api/thread", {"thread_id": "5", "token": body_token}, key=PUBLISH_KEY)
        assert reply.status == 200
        assert await sub.next() == new_msg("room:topic:5", {"thread_id": "5"})


async def test_token_is_stripped_from_broadcast_and_batch_bodies(api: Api) -> None:
    async with api.subscriber("room:lobby:1") as sub:
        reply = await api.post("/api/broadcast", {"topic": "room:lobby:1", "event": "e", "payload": {"a": 1},
                                                  "token": PUBLISH_KEY})
        assert reply.status == 200
        assert await sub.next() == [None, None, "room:lobby:1", "e", {"a": 1}]
        reply = await api.post("/api/batch", {"messages": [{"topic": "room:lobby:1", "event": "e"}],
                                              "token": PUBLISH_KEY})
        assert reply.status == 200
        assert await sub.next() == [None, None, "room:lobby:1", "e", {}]


UNAUTHORIZED = [
    pytest.param({}, {"channel_id": "1"}, id="missing-key"),
    pytest.param({"Authorization": "Bearer wrong-key"}, {"channel_id": "1"}, id="wrong-key-in-header"),
    pytest.param({}, {"channel_id": "1", "token": "wrong-key"}, id="wrong-key-in-body"),
    pytest.param({}, {"channel_id": "1", "token": ""}, id="empty-key-in-body"),
    pytest.param({}, {"channel_id": "1", "token": 12345}, id="non-string-token"),
    pytest.param({"Authorization": f"Basic {PUBLISH_KEY}"}, {"channel_id": "1"}, id="basic-scheme"),
    pytest.param({"Authorization": PUBLISH_KEY}, {"channel_id": "1"}, id="no-scheme"),
    pytest.param({"Authorization": "Bearer "}, {"channel_id": "1"}, id="empty-bearer"),
    pytest.param({"Authorization": "Bearer wrong-key"}, {"channel_id": "1", "token": PUBLISH_KEY},
                 id="wrong-header-right-body-token"),
]


@pytest.mark.parametrize(("headers", "body"), UNAUTHORIZED)
async def test_publish_without_a_valid_key_is_401_and_publishes_nothing(
        api: Api, headers: dict[str, str], body: dict[str, Any]) -> None:
    async with api.subscriber("room:lobby:1") as sub:
        reply = await api.post("/api/channel", body, headers=headers)
        assert reply.status == 401
        assert "publish key" in reply.error
        await api.assert_nothing_more(sub, "room:lobby:1")


@pytest.mark.parametrize("path", ["/api/message", "/api/channel", "/api/thread", "/api/community", "/api/user",
                                  "/api/broadcast", "/api/batch"])
async def test_every_publish_endpoint_requires_the_key(api: Api, path: str) -> None:
    reply = await api.post(path, {"channel_id": "1", "thread_id": "1", "community_id": "1", "user_id": "1",
                                  "topic": "room:1", "event": "e", "messages": [{"topic": "room:1", "event": "e"}]})
    assert reply.status == 401


async def test_check_order_header_first_body_token_after_the_body(api: Api) -> None:
    """As openapi.yaml says: a present Authorization header is checked before anything else, the
    body's token only once the body is read."""
    reply = await api.request("POST", "/api/channel", data=b"not json", spec_accepts=False,
                              headers={"Content-Type": "text/plain", "Authorization": "Bearer wrong"})
    assert reply.status == 401
    reply = await api.request("POST", "/api/channel", data=b"not json", spec_accepts=False,
                              headers={"Content-Type": "text/plain"})
    assert reply.status == 415
    reply = await api.request("POST", "/api/channel", data=b"not json", spec_accepts=False,
                              headers={"Content-Type": "application/json"})
    assert reply.status == 400
    reply = await api.post("/api/channel", {"no_id": 1, "token": "wrong"}, spec_accepts=False)
    assert reply.status == 401


# --- 400: the body and its fields


@pytest.mark.parametrize(("raw", "message"), [
    (b"{not json", "body is not valid JSON"),
    (b"", "body is not valid JSON"),
    (b'{"channel_id": "1",', "body is not valid JSON"),
    (b'["channel_id", "1"]', "body must be a JSON object"),
    (b'"channel_id"', "body must be a JSON object"),
    (b"42", "body must be a JSON object"),
    (b"null", "body must be a JSON object"),
])
async def test_body_that_is_not_a_json_object_is_400(api: Api, raw: bytes, message: str) -> None:
    reply = await api.request("POST", "/api/channel", data=raw, spec_accepts=False,
                              headers={"Content-Type": "application/json", "Authorization": f"Bearer {PUBLISH_KEY}"})
    assert reply.status == 400
    assert reply.error == message


@pytest.mark.parametrize(("path", "field", "topic"), FAMILY_ENDPOINTS)
async def test_missing_id_field_is_400_naming_the_field(api: Api, path: str, field: str, topic: str) -> None:
    async with api.subscriber(topic, sub="42") as sub:
        reply = await api.post(path, {"message": "no id", "token": PUBLISH_KEY}, spec_accepts=False)
        assert reply.status == 400
        assert f"missing field {field!r}" in reply.error
        reply = await api.post(path, {field: None, "token": PUBLISH_KEY}, spec_accepts=False)
        assert reply.status == 400
        assert f"missing field {field!r}" in reply.error
        await api.assert_nothing_more(sub, topic)


@pytest.mark.parametrize(("path", "field"), [(path, field) for path, field, _ in FAMILY_ENDPOINTS])
async def test_id_too_long_for_a_topic_is_400(api: Api, path: str, field: str) -> None:
    """A topic longer than 255 bytes could never be joined: refuse it rather than publish to nobody."""
    reply = await api.post(path, {field: "x" * 300}, key=PUBLISH_KEY, spec_accepts=None)
    assert reply.status == 400
    assert reply.error == f"field {field!r} is too long: a topic is at most 255 bytes"


@pytest.mark.parametrize("value", [["42"], True, False, {"id": "42"}, "", 4.2, 42.0],
                         ids=["list", "true", "false", "object", "empty-string", "float", "float-integral"])
@pytest.mark.parametrize(("path", "field"), [(path, field) for path, field, _ in FAMILY_ENDPOINTS])
async def test_ill_typed_id_is_400(api: Api, path: str, field: str, value: Any) -> None:
    # JSON Schema counts 42.0 as an integer, so the document cannot refuse that one; the server does.
    reply = await api.post(path, {field: value}, key=PUBLISH_KEY,
                           spec_accepts=None if value == 42.0 else False)
    assert reply.status == 400
    assert reply.error == f"field {field!r} must be a non-empty string or an integer"


@pytest.mark.parametrize(("body", "message"), [
    ({"event": "e"}, "body: field 'topic' must be a non-empty string"),
    ({"topic": "", "event": "e"}, "body: field 'topic' must be a non-empty string"),
    ({"topic": ["room:1"], "event": "e"}, "body: field 'topic' must be a non-empty string"),
    ({"topic": "lobby:42", "event": "e"}, "body: unknown topic family 'lobby:42'"),
    ({"topic": "phoenix", "event": "e"}, "body: unknown topic family 'phoenix'"),
    ({"topic": "room:lobby:", "event": "e"}, "body: unknown topic family 'room:lobby:'"),
    ({"topic": "room:topic:", "event": "e"}, "body: unknown topic family 'room:topic:'"),
    ({"topic": "room:", "event": "e"}, "body: unknown topic family 'room:'"),
    ({"topic": "user:", "event": "e"}, "body: unknown topic family 'user:'"),
    ({"topic": "room:lobby:1"}, "body: field 'event' must be a non-empty string of at most 255 bytes"),
    ({"topic": "room:lobby:1", "event": ""}, "body: field 'event' must be a non-empty string of at most 255 bytes"),
    ({"topic": "room:lobby:1", "event": 7}, "body: field 'event' must be a non-empty string of at most 255 bytes"),
    ({"topic": "room:lobby:1", "event": "e" * 256},
     "body: field 'event' must be a non-empty string of at most 255 bytes"),
    ({"topic": "room:lobby:1", "event": "phx_reply"},
     "body: events starting with 'phx_' are reserved for the protocol"),
    ({"topic": "room:lobby:1", "event": "phx_close"},
     "body: events starting with 'phx_' are reserved for the protocol"),
    ({"topic": "room:lobby:1", "event": "e", "payload": ["a"]}, "body: field 'payload' must be an object"),
    ({"topic": "room:lobby:1", "event": "e", "payload": "text"}, "body: field 'payload' must be an object"),
    ({"topic": "room:lobby:1", "event": "e", "payload": None}, "body: field 'payload' must be an object"),
])
async def test_bad_broadcast_is_400_and_publishes_nothing(api: Api, body: dict[str, Any], message: str) -> None:
    async with api.subscriber("room:lobby:1") as sub:
        reply = await api.post("/api/broadcast", body, key=PUBLISH_KEY, spec_accepts=False)
        assert reply.status == 400
        assert reply.error.startswith(message)
        await api.assert_nothing_more(sub, "room:lobby:1")


@pytest.mark.parametrize("body", [{}, {"messages": []}, {"messages": "x"}, {"messages": {"topic": "room:1"}},
                                  {"messages": None}],
                         ids=["missing", "empty", "string", "object", "null"])
async def test_batch_without_a_list_of_messages_is_400(api: Api, body: dict[str, Any]) -> None:
    reply = await api.post("/api/batch", body, key=PUBLISH_KEY, spec_accepts=False)
    assert reply.status == 400
    assert reply.error == "field 'messages' must be a non-empty list of {topic, event, payload}"


@pytest.mark.parametrize(("bad", "message"), [
    ({"topic": "nope:1", "event": "e"}, "messages[1]: unknown topic family 'nope:1'"),
    ({"topic": "room:lobby:1", "event": "phx_join"}, "messages[1]: events starting with 'phx_' are reserved"),
    ({"topic": "room:lobby:1", "event": "e", "payload": [1]}, "messages[1]: field 'payload' must be an object"),
    ("room:lobby:1", "messages[1] must be an object with topic, event and payload"),
])
async def test_batch_with_one_bad_item_publishes_nothing(api: Api, bad: Any, message: str) -> None:
    async with api.subscriber("room:lobby:1") as sub:
        messages = [{"topic": "room:lobby:1", "event": "first"}, bad, {"topic": "room:lobby:1", "event": "third"}]
        reply = await api.post("/api/batch", {"messages": messages}, key=PUBLISH_KEY, spec_accepts=False)
        assert reply.status == 400
        assert reply.error.startswith(message)
        await api.assert_nothing_more(sub, "room:lobby:1")


# --- 413, 415: size and media type


def body_of_size(size: int, **fields: Any) -> bytes:
    """A JSON object with `fields` padded to exactly `size` bytes."""
    base = orjson.dumps({**fields, "pad": ""})
    raw = orjson.dumps({**fields, "pad": "x" * (size - len(base))})
    assert len(raw) == size
    return raw


async def test_body_over_max_publish_bytes_is_413(start_server: Any, client: Callable[[Any], Api]) -> None:
    api = client(await start_server(PUSH_MAX_PUBLISH_BYTES="1KiB"))
    async with api.subscriber("room:lobby:1") as sub:
        headers = {"Content-Type": "application/json"}
        # Exactly the limit is fine.
        at_limit = body_of_size(1024, channel_id="1", token=PUBLISH_KEY)
        reply = await api.request("POST", "/api/channel", data=at_limit, headers=headers)
        assert reply.status == 200
        frame = await sub.next()
        assert frame[3] == "new_msg" and frame[4]["channel_id"] == "1"
        # One byte more is refused by its Content-Length, with the key in the body...
        over = body_of_size(1025, channel_id="1", token=PUBLISH_KEY)
        reply = await api.request("POST", "/api/channel", data=over, headers=headers)
        assert reply.status == 413
        assert reply.error == "body is larger than 1024 bytes (PUSH_MAX_PUBLISH_BYTES)"
        # ... or in the header.
        reply = await api.request("POST", "/api/channel", data=body_of_size(4096, channel_id="1"),
                                  headers={**headers, "Authorization": f"Bearer {PUBLISH_KEY}"})
        assert reply.status == 413
        await api.assert_nothing_more(sub, "room:lobby:1")


async def test_chunked_body_over_max_publish_bytes_is_413(start_server: Any, client: Callable[[Any], Api]) -> None:
    api = client(await start_server(PUSH_MAX_PUBLISH_BYTES="1KiB"))

    def chunked(raw: bytes, size: int = 300) -> Any:
        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(raw), size):
                yield raw[start:start + size]
        return chunks()

    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {PUBLISH_KEY}"}
    async with api.subscriber("room:lobby:1") as sub:
        # Under the limit, a chunked body is read whole and published.
        reply = await api.request("POST", "/api/channel", data=chunked(body_of_size(1000, channel_id="1")),
                                  headers=headers)
        assert reply.request_headers.get("Transfer-Encoding") == "chunked"
        assert "Content-Length" not in reply.request_headers
        assert reply.status == 200
        assert (await sub.next())[4]["channel_id"] == "1"
        # Over it, refused once the limit is passed.
        reply = await api.request("POST", "/api/channel", data=chunked(body_of_size(3000, channel_id="1")),
                                  headers=headers)
        assert reply.request_headers.get("Transfer-Encoding") == "chunked"
        assert reply.status == 413
        assert reply.error == "body is larger than 1024 bytes (PUSH_MAX_PUBLISH_BYTES)"
        await api.assert_nothing_more(sub, "room:lobby:1")


async def test_body_arriving_in_pieces_is_read_whole(api: Api) -> None:
    """The body is read until its end, not just what the first read finds buffered."""
    payload = {"seq": 1, "pad": "x" * 3000}
    body = orjson.dumps({"topic": "room:lobby:1", "event": "e", "payload": payload})
    parts = urlsplit(api.server.http_url)
    async with api.subscriber("room:lobby:1") as sub:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            writer.write(f"POST /api/broadcast HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Authorization: Bearer {PUBLISH_KEY}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body[:100])
            await writer.drain()
            await server_has_read(parts.port)  # so the rest is a second piece, not part of the first read
            writer.write(body[100:])
            answer = await asyncio.wait_for(reader.read(), TIMEOUT)
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert await sub.next() == [None, None, "room:lobby:1", "e", payload]


async def test_request_id_is_kept_when_sane_else_generated_fresh(api: Api) -> None:
    reply = await api.get("/healthz", headers={"X-Request-Id": "backend.req-42_a"})
    assert reply.headers["X-Request-Id"] == "backend.req-42_a"
    generated = set()
    for given in (None, "", "has space", "x" * 65, None, None):
        reply = await api.post("/api/broadcast", {"topic": "room:1", "event": "e"}, key=PUBLISH_KEY,
                               headers={} if given is None else {"X-Request-Id": given})
        assert reply.status == 200
        request_id = reply.headers["X-Request-Id"]
        assert len(request_id) == 16 and set(request_id) <= set("0123456789abcdef"), request_id
        generated.add(request_id)
    assert len(generated) == 6  # a fresh one each time


@pytest.mark.parametrize(("data", "content_type"), [
    ({"channel_id": "1", "token": PUBLISH_KEY}, None),  # aiohttp sends a dict as a form
    (orjson.dumps({"channel_id": "1", "token": PUBLISH_KEY}), "text/plain"),
    (orjson.dumps({"channel_id": "1", "token": PUBLISH_KEY}), "application/octet-stream"),
    (b"channel_id=1", "multipart/form-data; boundary=x"),
], ids=["form-urlencoded", "text-plain", "octet-stream", "multipart"])
async def test_non_json_content_type_is_415(api: Api, data: Any, content_type: str | None) -> None:
    async with api.subscriber("room:lobby:1") as sub:
        headers = {"Content-Type": content_type} if content_type else {}
        reply = await api.request("POST", "/api/channel", data=data, headers=headers, spec_accepts=False)
        assert reply.status == 415
        assert reply.error == "expected Content-Type: application/json"
        await api.assert_nothing_more(sub, "room:lobby:1")


async def test_json_content_type_with_charset_is_accepted(api: Api) -> None:
    reply = await api.request("POST", "/api/channel", data=orjson.dumps({"channel_id": "1", "token": PUBLISH_KEY}),
                              headers={"Content-Type": "application/json; charset=utf-8"})
    assert reply.status == 200


# --- routing errors: 404 and 405 are JSON too


@pytest.mark.parametrize(("method", "path"), [("GET", "/nope"), ("POST", "/api/nope"), ("GET", "/api"),
                                              ("GET", "/socket/nope")])
async def test_unknown_path_is_404_json(api: Api, method: str, path: str) -> None:
    reply = await api.request(method, path)
    assert reply.status == 404
    assert reply.error == "not found"


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("GET", "/api/message", {"POST"}),
    ("PUT", "/api/channel", {"POST"}),
    ("DELETE", "/api/batch", {"POST"}),
    ("POST", "/api/health", {"GET", "HEAD"}),
    ("POST", "/metrics", {"GET", "HEAD"}),
])
async def test_wrong_method_is_405_json_with_allow(api: Api, method: str, path: str, allowed: set[str]) -> None:
    reply = await api.request(method, path)
    assert reply.status == 405
    assert reply.error == "method not allowed"
    assert {item.strip() for item in reply.headers["Allow"].split(",")} == allowed


# --- PUSH_API_MESSAGE_TOPIC


async def test_api_message_topic_thread_routes_by_thread_id(start_server: Any, client: Callable[[Any], Api]) -> None:
    api = client(await start_server(PUSH_API_MESSAGE_TOPIC="thread"))
    async with api.subscriber("room:topic:t1", "room:lobby:c1") as sub:
        body = {"channel_id": "c1", "thread_id": "t1", "message": "{}", "is_reply": True}
        reply = await api.post("/api/message", {**body, "token": PUBLISH_KEY})
        assert reply.json() == {"status": 200, "published": 1, "delivered": 1}
        assert await sub.next() == new_msg("room:topic:t1", body)
        await api.assert_nothing_more(sub, "room:lobby:c1")
        # Without thread_id the message cannot be routed: the error says why.
        reply = await api.post("/api/message", {"channel_id": "c1", "token": PUBLISH_KEY})
        assert reply.status == 400
        assert "'thread_id'" in reply.error and "PUSH_API_MESSAGE_TOPIC" in reply.error
        await api.assert_nothing_more(sub, "room:lobby:c1")
        # /api/channel is not affected.
        assert (await api.publish("/api/channel", {"channel_id": "c1"}))["delivered"] == 1
        assert await sub.next() == new_msg("room:lobby:c1", {"channel_id": "c1"})


async def test_api_message_default_lobby_requires_channel_id(api: Api) -> None:
    reply = await api.post("/api/message", {"thread_id": "t1", "token": PUBLISH_KEY})
    assert reply.status == 400
    assert "'channel_id'" in reply.error and "PUSH_API_MESSAGE_TOPIC=lobby" in reply.error


# --- health, readiness, metrics


@pytest.mark.parametrize("path", ["/api/health", "/healthz"])
async def test_health(api: Api, path: str) -> None:
    reply = await api.get(path)
    assert reply.status == 200
    assert reply.json() == {"status": "ok"}


async def test_readyz(api: Api) -> None:
    reply = await api.get("/readyz")
    assert reply.status == 200
    assert reply.json() == {"status": "ready"}


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_count_publishes_by_endpoint_and_requests_by_route(start_server: Any,
                                                                         client: Callable[[Any], Api]) -> None:
    api = client(await start_server())  # its own: it counts everything the server has seen
    await api.publish("/api/message", {"channel_id": "1"})
    await api.publish("/api/message", {"channel_id": "2"})
    await api.publish("/api/channel", {"channel_id": "1"})
    await api.publish("/api/user", {"user_id": "u1"})
    await api.publish("/api/broadcast", {"topic": "room:1", "event": "e"})
    await api.publish("/api/batch", {"messages": [{"topic": "room:1", "event": "e"}] * 3})
    assert (await api.post("/api/channel", {"token": PUBLISH_KEY})).status == 400  # not counted as published
    assert (await api.post("/api/thread", {"thread_id": "1"})).status == 401
    assert (await api.get("/nope")).status == 404
    assert (await api.get("/api/message")).status == 405
    assert (await api.get("/healthz")).status == 200

    reply = await api.get("/metrics")
    assert reply.status == 200
    assert reply.content_type.startswith("text/plain")
    metrics = scrape(reply.body.decode())

    def published(endpoint: str) -> float:
        return metrics.get(("push_messages_published_total", (("endpoint", endpoint),)), 0.0)

    assert {endpoint: published(endpoint) for endpoint in
            ("message", "channel", "thread", "community", "user", "broadcast", "batch")} == {
        "message": 2, "channel": 1, "thread": 0, "community": 0, "user": 1, "broadcast": 1, "batch": 3}

    def requests(route: str, method: str, status: int) -> float:
        labels = tuple(sorted({"route": route, "method": method, "status": str(status)}.items()))
        return metrics.get(("push_http_requests_total", labels), 0.0)

    assert requests("/api/message", "POST", 200) == 2
    assert requests("/api/channel", "POST", 200) == 1
    assert requests("/api/channel", "POST", 400) == 1
    assert requests("/api/thread", "POST", 401) == 1
    assert requests("/api/batch", "POST", 200) == 1
    assert requests("unmatched", "GET", 404) == 1
    assert requests("unmatched", "GET", 405) == 1
    assert requests("/healthz", "GET", 200) == 1


async def test_metrics_are_plain_numbers_exposed_as_prometheus_samples() -> None:  # async: as the module's mark asks
    metrics = Metrics()
    metrics.http_requests.labels("/api/message", "POST", 200).inc()
    metrics.http_requests.labels("/api/message", "POST", "200").inc(2)  # the same series: labels are text
    metrics.connections.labels("websocket").inc(3)
    metrics.connections.labels("websocket").dec()
    metrics.slow_consumers.inc()
    metrics.broker_up.set(1)
    metrics.presences.set_function(lambda: 7)  # read at each scrape
    metrics.publish_latency.observe(0.002)
    metrics.publish_latency.observe(0.0001)  # on a bucket's bound: counted in it (le)
    metrics.publish_latency.observe(2.0)  # above every bound: only in +Inf
    text = metrics.render().decode()
    samples = scrape(text)
    assert samples[("push_http_requests_total",
                    (("method", "POST"), ("route", "/api/message"), ("status", "200")))] == 3
    assert samples[("push_connections", (("transport", "websocket"),))] == 2
    assert samples[("push_slow_consumer_disconnects_total", ())] == 1
    assert samples[("push_broker_up", ())] == 1
    assert samples[("push_presences", ())] == 7
    assert samples[("push_frames_delivered_total", ())] == 0  # an unlabelled metric shows from the start
    buckets = {labels[0][1]: value for (name, labels), value in samples.items()
               if name == "push_publish_to_write_seconds_bucket"}
    assert (buckets["0.0001"], buckets["0.001"], buckets["0.0025"], buckets["1.0"], buckets["+Inf"]) == (1, 1, 2, 2, 3)
    assert len(buckets) == 14  # 13 bounds and +Inf, cumulative
    assert samples[("push_publish_to_write_seconds_count", ())] == 3
    assert samples[("push_publish_to_write_seconds_sum", ())] == pytest.approx(2.0021)
    assert "# TYPE push_http_requests_total counter" in text and "# TYPE push_connections gauge" in text
    with pytest.raises(ValueError):
        metrics.joins.labels("lobby", "extra")


# --- the WebSocket endpoint's HTTP answers


async def test_websocket_handshake_is_101_with_the_phoenix_subprotocol(api: Api) -> None:
    async with api.connect(protocols=("phoenix",)) as ws:  # connect() validates the 101 against the spec
        assert ws.protocol == "phoenix"
        assert api.handshakes[-1].response.status == 101
        assert api.handshakes[-1].response.headers["Sec-WebSocket-Protocol"] == "phoenix"


@pytest.mark.parametrize(("params", "message"), [
    ({"vsn": "2.0.0"}, "token refused: missing"),
    ({"vsn": "2.0.0", "token": "not-a-jwt"}, "token refused: malformed"),
    ({"vsn": "2.0.0", "token": make_token(ttl=-60)}, "token refused: expired"),
    ({"vsn": "3.0.0", "token": make_token()}, "unsupported vsn; use 1.0.0 or 2.0.0"),
])
async def test_websocket_refused_before_upgrade_is_403(api: Api, params: dict[str, str], message: str) -> None:
    reply = await api.get("/socket/websocket", params=params, headers=UPGRADE_HEADERS)
    assert reply.status == 403
    assert reply.error == message


async def test_websocket_without_upgrade_is_400(api: Api) -> None:
    reply = await api.get("/socket/websocket", params={"vsn": "2.0.0", "token": make_token()})
    assert reply.status == 400
    assert reply.error == "expected a WebSocket upgrade request"
