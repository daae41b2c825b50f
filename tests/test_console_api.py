"""The console's JSON endpoints (/api/stats, /api/topics, /api/console/watch) and its static page,
against a real server process; answers are checked against openapi.yaml as in test_http_api.py."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import orjson
import pytest

from conftest import ADMIN_KEY, PUBLISH_KEY, make_token, per_test_server, server_starter, until
from test_http_api import Api, api, client  # noqa: F401  (fixtures)

# test_http_api's fixtures run on the module's event loop; here each test has a server of its own.
pytestmark = pytest.mark.asyncio(loop_scope="module")
start_server = server_starter("module")
server = per_test_server("module")

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
TIMEOUT = 5.0


@pytest.mark.parametrize("path", ["/api/stats", "/api/topics"])
async def test_the_endpoints_need_the_admin_key(api: Api, path: str) -> None:
    assert (await api.get(path)).status == 401
    assert (await api.get(path, headers={"Authorization": "Bearer wrong"})).status == 401
    refused = await api.get(path, headers={"Authorization": f"Bearer {PUBLISH_KEY}"})
    assert refused.status == 403 and "admin key" in refused.json()["error"]
    assert (await api.get(path, headers=AUTH)).status == 200


async def test_stats_counts_connections_by_transport_and_traffic(api: Api) -> None:
    before = (await api.get("/api/stats", headers=AUTH)).json()
    assert before["connections"] == {"total": 0, "websocket": 0, "longpoll": 0}
    assert before["broker"] == {"kind": "memory", "up": True, "reconnects": 0}
    assert before["ready"] is True and before["draining"] is False
    async with api.subscriber("room:lobby:1", "room:lobby:2"), aiohttp.ClientSession() as http:
        async with http.get(f"{api.server.http_url}/socket/longpoll",
                            params={"token": make_token(), "vsn": "2.0.0"}) as response:
            assert (await response.json())["status"] == 410
        await api.publish("/api/broadcast", {"topic": "room:lobby:1", "event": "e"})
        stats = (await api.get("/api/stats", headers=AUTH)).json()
    assert stats["connections"] == {"total": 2, "websocket": 1, "longpoll": 1}
    assert stats["topics"] == 2
    counters = stats["counters"]
    assert counters["joins"] - before["counters"]["joins"] == 2
    assert counters["messages_published"] - before["counters"]["messages_published"] == 1
    assert counters["frames_delivered"] - before["counters"]["frames_delivered"] == 1
    assert stats["time"] >= before["time"] and stats["node"] == before["node"]


async def test_topics_lists_local_subscribers_and_presence(api: Api) -> None:
    async with api.subscriber("room:lobby:1", "room:topic:7", sub="ada"), api.subscriber("room:lobby:1", sub="bob"):
        data = (await api.get("/api/topics", headers=AUTH)).json()
        assert data == {"total": 2, "truncated": False, "topics": [
            {"topic": "room:lobby:1", "subscribers": 2, "presence": None},  # lobby topics are not tracked
            {"topic": "room:topic:7", "subscribers": 1, "presence": {"users": 1, "connections": 1}},
        ]}
        data = (await api.get("/api/topics", headers=AUTH, params={"limit": "1"})).json()
        assert data["truncated"] is True and [row["topic"] for row in data["topics"]] == ["room:lobby:1"]
        for bad in ("0", "1001", "x"):
            reply = await api.get("/api/topics", headers=AUTH, params={"limit": bad}, spec_accepts=False)
            assert reply.status == 400
    assert (await api.get("/api/topics", headers=AUTH)).json() == {"total": 0, "truncated": False, "topics": []}


async def test_the_console_page_is_self_contained(api: Api) -> None:
    page = await api.get("/console")
    assert page.status == 200 and page.content_type.startswith("text/html")
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert page.headers["X-Frame-Options"] == "DENY"
    html = page.body.decode()
    assert '<script src="/console/app.js"' in html and 'href="/console/style.css"' in html
    script = await api.get("/console/app.js")
    style = await api.get("/console/style.css")
    assert script.status == 200 and script.content_type.startswith("text/javascript")
    assert style.status == 200 and style.content_type.startswith("text/css")
    texts = [html, script.body.decode(), style.body.decode()]
    # app.js imports the others as modules from this origin: each is served, and nothing else is imported.
    imported = re.findall(r'from "\./([a-z]+\.js)"', texts[1])
    assert imported and len(imported) == len(re.findall(r"\bimport\b", texts[1]))
    for name in imported:
        module = await api.get(f"/console/{name}")
        assert module.status == 200 and module.content_type.startswith("text/javascript"), name
        texts.append(module.body.decode())
    for text in texts:
        # Nothing from elsewhere: no absolute URL (but the SVG namespace, a name, not a fetch), no CDN,
        # no inline handler or innerHTML.
        text = text.replace('"http://www.w3.org/2000/svg"', "")
        assert not re.search(r"https?://|//cdn|innerHTML|on(click|load)=", text)
    # The key only ever travels in the Authorization header.
    assert "Authorization: `Bearer ${key}`" in script.body.decode()


async def test_watch_streams_a_topic_without_being_a_connection(api: Api) -> None:
    server = api.server
    reply = await api.get("/api/console/watch", params={"topic": "room:lobby:5"})
    assert reply.status == 401
    reply = await api.get("/api/console/watch", headers=AUTH, params={"topic": "nope"}, spec_accepts=False)
    assert reply.status == 400
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.http_url}/api/console/watch", params={"topic": "room:lobby:5"},
                            headers=AUTH) as stream:
            assert stream.status == 200
            assert stream.headers["Content-Type"] == "application/x-ndjson"

            async def line() -> dict[str, Any]:
                while True:
                    raw = await asyncio.wait_for(stream.content.readline(), TIMEOUT)
                    data = orjson.loads(raw)
                    if "keepalive" not in data:
                        return data

            assert await line() == {"subscribed": True}
            async with api.subscriber("room:lobby:5") as sub:
                result = await api.publish("/api/broadcast", {"topic": "room:lobby:5", "event": "hello",
                                                              "payload": {"n": 1}})
                assert result["delivered"] == 2  # the client, and the watch
                entry = await line()
                frame = entry["frame"]
                assert frame[0] is None and frame[2:] == ["room:lobby:5", "hello", {"n": 1}]
                assert isinstance(entry["at"], float)
                assert await sub.next() == frame
                stats = (await api.get("/api/stats", headers=AUTH)).json()
                assert stats["connections"]["total"] == 1  # the watch is not a connection
                topics = (await api.get("/api/topics", headers=AUTH)).json()
                # Like `delivered`, the topics table counts the watch among the topic's local subscribers.
                assert topics["topics"] == [{"topic": "room:lobby:5", "subscribers": 2, "presence": None}]
    # Once the watcher is gone, so is the node's subscription.
    async def no_topics() -> bool:
        return (await api.get("/api/stats", headers=AUTH)).json()["topics"] == 0

    await until(no_topics, 5, "the watch's topic released")
