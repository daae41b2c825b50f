"""Presence end to end with the official `phoenix` npm client's `Presence` helper (1.6, 1.7, 1.8).

Each client is `node tests/js/presence.mjs` (see there for its options, the JSON lines it prints and the
commands it takes on stdin): it joins one topic, wires `new Presence(channel)` and reports onSync (with
`presence.list()`), onJoin and onLeave. Setup: `npm ci --prefix tests/js`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest

from conftest import PUBLISH_KEY, ServerProcess, make_token
from http_helpers import publish
from nodejs import JS_DIR, TIMEOUT, Event, NodeScript, node_binary, run_script

pytestmark = pytest.mark.slow  # phoenix.js clients under Node

CLIENT = JS_DIR / "presence.mjs"
VERSIONS = [pytest.param("16", id="phoenix-1.6"), pytest.param("17", id="phoenix-1.7"),
            pytest.param("18", id="phoenix-1.8")]
RETRY_MS = 150  # reconnectAfterMs / rejoinAfterMs
PROMPT = 2.0  # from a connection's end (as its own client sees it) to the others' onLeave

PresenceList = dict[str, list[dict[str, Any]]]  # key -> metas, as the client's presence.list() shows it

_topic_ids = itertools.count(1)


def new_topic(prefix: str = "room:topic:") -> str:
    return f"{prefix}{next(_topic_ids)}"


def as_dict(entries: list[Event]) -> PresenceList:
    """[{id, metas}] as presence.mjs prints presence.list() -> {id: metas}."""
    listed = {entry["id"]: entry["metas"] for entry in entries}
    assert len(listed) == len(entries), entries  # one entry per key
    return listed


def refs(metas: list[dict[str, Any]]) -> list[str]:
    return [meta["phx_ref"] for meta in metas]


class PresenceClient(NodeScript):
    """A running presence.mjs, with what presence tests ask of it."""

    async def wait_sync(self, predicate: Callable[[PresenceList], bool], timeout: float = TIMEOUT) -> PresenceList:
        """The presence list of the first onSync from now on whose list matches."""
        event = await self.wait_for(lambda e: e["event"] == "sync" and predicate(as_dict(e["list"])), timeout)
        return as_dict(event["list"])

    async def joined(self) -> None:
        assert await self.wait_event("joined") == {"event": "joined", "status": "ok", "response": {}}

    async def send(self, **command: Any) -> None:
        await self.send_line(orjson.dumps(command))

    async def command(self, cmd: str, **fields: Any) -> Event:
        """Send a command that pushes, and return its reply event."""
        await self.send(cmd=cmd, **fields)
        return await self.wait_event("reply", cmd=cmd)

    async def current_list(self) -> PresenceList:
        """presence.list() right now."""
        await self.send(cmd="list")
        return as_dict((await self.wait_event("list"))["list"])



@pytest.fixture
def presence_client() -> Callable[..., Any]:
    """Factory: `async with presence_client("18", server, topic, token=...) as client:`."""
    node_binary()

    @asynccontextmanager
    async def start(version: str, server: ServerProcess, topic: str, *, token: str,
                    heartbeat_ms: int | None = None, log_frames: bool = False) -> AsyncIterator[PresenceClient]:
        args = [version, f"ws://127.0.0.1:{server.port}/socket", "--topic", topic,
                "--token", token, "--retry-ms", str(RETRY_MS)]
        if heartbeat_ms is not None:
            args += ["--heartbeat-ms", str(heartbeat_ms)]
        if log_frames:
            args.append("--log-frames")
        async with run_script(CLIENT, *args, kind=PresenceClient) as client:
            yield client

    return start


def user_token(sub: str, **claims: Any) -> str:
    return make_token(sub, info={"username": sub}, **claims)


async def api_get(server: ServerProcess, path: str, *, key: str | None = PUBLISH_KEY) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.http_url}{path}", headers=headers,
                            timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as response:
            return response.status, await response.json()


async def presences(server: ServerProcess, topic: str) -> dict[str, Any]:
    status, body = await api_get(server, f"/api/presence/{topic}")
    assert status == 200, body
    assert body["topic"] == topic
    return body["presences"]


async def count(server: ServerProcess, topic: str) -> tuple[int, int]:
    status, body = await api_get(server, f"/api/presence/{topic}/count")
    assert status == 200, body
    assert body["topic"] == topic
    return body["users"], body["connections"]


def assert_meta(meta: dict[str, Any], username: str) -> None:
    """A fresh meta: the token's info merged in, online_at in unix seconds as a string, a phx_ref."""
    assert meta["username"] == username
    assert isinstance(meta["online_at"], str) and meta["online_at"].isdigit(), meta
    assert abs(int(meta["online_at"]) - time.time()) < 60, meta
    assert isinstance(meta["phx_ref"], str) and len(meta["phx_ref"]) == 16, meta
    assert set(meta) == {"username", "online_at", "phx_ref"}, meta


# --- join, list, leave


@pytest.mark.parametrize("version", VERSIONS)
async def test_join_lists_both_and_disconnect_leaves(version, server, presence_client):
    topic = new_topic()
    async with presence_client(version, server, topic, token=user_token("ada"), log_frames=True) as a:
        await a.joined()
        # The joiner's own presence_state: just itself.
        alone = await a.wait_sync(lambda listed: "ada" in listed)
        assert list(alone) == ["ada"] and len(alone["ada"]) == 1
        assert_meta(alone["ada"][0], "ada")
        async with presence_client(version, server, topic, token=user_token("bob"), log_frames=True) as b:
            await b.joined()
            # B's presence_state already holds both; A learns of B through a diff (onJoin, then onSync).
            both_for_b = await b.wait_sync(lambda listed: {"ada", "bob"} <= set(listed))
            both = await a.wait_sync(lambda listed: "bob" in listed)
            assert set(both) == {"ada", "bob"}
            assert both == both_for_b
            assert len(both["bob"]) == 1
            assert_meta(both["bob"][0], "bob")
            assert both["ada"] == alone["ada"]
            bob_ref = both["bob"][0]["phx_ref"]
            join = next(e for e in a.seen("join") if e["key"] == "bob")
            assert join["current"] is None and refs(join["joined"]) == [bob_ref]
            # On the wire: the joiner got presence_state on its join; the member already there, a diff.
            [b_state] = [f for f in b.seen("frame") if f["name"] == "presence_state"]
            assert b_state["join_ref"] is not None and b_state["payload"] == {
                key: {"metas": metas} for key, metas in both.items()}
            a_states = [f for f in a.seen("frame") if f["name"] == "presence_state"]
            assert len(a_states) == 1 and set(a_states[0]["payload"]) == {"ada"}
            assert {"joins": {"bob": {"metas": both["bob"]}}, "leaves": {}} in [
                f["payload"] for f in a.seen("frame") if f["name"] == "presence_diff"]
            # The HTTP view agrees with the clients'.
            assert await presences(server, topic) == {key: {"metas": metas} for key, metas in both.items()}
            assert await count(server, topic) == (2, 2)

            await b.send(cmd="disconnect")
            await b.wait_event("disconnected")
            # B's socket closed: A's onLeave fires for B with nothing left, and B is off the list.
            leave = await a.wait_event("leave", PROMPT, key="bob")
            assert leave["current"] == [] and refs(leave["left"]) == [bob_ref]
            after = await a.wait_sync(lambda listed: "bob" not in listed)
            assert after == {"ada": alone["ada"]}
            assert await a.current_list() == after
            assert await count(server, topic) == (1, 1)


@pytest.mark.parametrize("version", VERSIONS)
async def test_leave_untracks_but_keeps_the_socket(version, server, presence_client):
    topic = new_topic()
    async with presence_client(version, server, topic, token=user_token("ada")) as a, \
            presence_client(version, server, topic, token=user_token("bob")) as b:
        await a.joined()
        await b.joined()
        await a.wait_sync(lambda listed: set(listed) == {"ada", "bob"})
        assert (await b.command("leave"))["status"] == "ok"
        leave = await a.wait_event("leave", PROMPT, key="bob")
        assert leave["current"] == []
        assert set(await a.wait_sync(lambda listed: "bob" not in listed)) == {"ada"}
        assert await count(server, topic) == (1, 1)
        if not b.seen("channel_close"):  # phoenix.js fires onClose before the leave's own ok callback
            await b.wait_event("channel_close")
        assert not b.seen("close")  # only the channel was left


# --- several connections of one user


@pytest.mark.parametrize("version", VERSIONS)
async def test_one_user_on_two_sockets_is_one_key_with_two_metas(version, server, presence_client):
    topic = new_topic()
    async with presence_client(version, server, topic, token=user_token("watcher")) as watcher:
        await watcher.joined()
        await watcher.wait_sync(lambda listed: "watcher" in listed)
        async with presence_client(version, server, topic, token=user_token("ada")) as first:
            await first.joined()
            one = await watcher.wait_sync(lambda listed: "ada" in listed)
            [first_ref] = refs(one["ada"])
            async with presence_client(version, server, topic, token=user_token("ada")) as second:
                await second.joined()
                two = await watcher.wait_sync(lambda listed: len(listed.get("ada", [])) == 2)
                assert set(two) == {"watcher", "ada"}
                assert first_ref in refs(two["ada"])
                [second_ref] = [ref for ref in refs(two["ada"]) if ref != first_ref]
                for meta in two["ada"]:
                    assert_meta(meta, "ada")
                # The second socket's own presence_state shows the same two metas.
                mine = await second.wait_sync(lambda listed: len(listed.get("ada", [])) == 2)
                assert sorted(refs(mine["ada"])) == sorted(refs(two["ada"]))
                assert await count(server, topic) == (2, 3)

                await first.send(cmd="disconnect")
                await first.wait_event("disconnected")
                # One of two connections gone: a leave of that meta, the user still present with the other.
                leave = await watcher.wait_event("leave", PROMPT, key="ada")
                assert refs(leave["left"]) == [first_ref]
                assert refs(leave["current"]) == [second_ref]
                still = await watcher.wait_sync(lambda listed: len(listed.get("ada", [])) == 1)
                assert refs(still["ada"]) == [second_ref]
                assert await count(server, topic) == (2, 2)
                # The other socket of the same user sees its own first connection go too.
                own = await second.wait_event("leave", key="ada")
                assert refs(own["left"]) == [first_ref]

                await second.send(cmd="disconnect")
                await second.wait_event("disconnected")
                # The last connection gone: the user leaves.
                last = await watcher.wait_event("leave", PROMPT, key="ada")
                assert refs(last["left"]) == [second_ref] and last["current"] == []
                assert set(await watcher.wait_sync(lambda listed: "ada" not in listed)) == {"watcher"}
                assert await count(server, topic) == (1, 1)


# --- typing


@pytest.mark.parametrize("version", VERSIONS)
async def test_typing_updates_the_meta_and_clears_itself(version, start_server, presence_client):
    server = await start_server(PUSH_TYPING_TIMEOUT="1")
    topic = new_topic()
    bob_token = make_token("bob", info={"username": "bob", "avatar": "https://example.com/bob.png"})
    async with presence_client(version, server, topic, token=user_token("ada")) as a, \
            presence_client(version, server, topic, token=bob_token) as b:
        await a.joined()
        await b.joined()
        before = (await a.wait_sync(lambda listed: set(listed) == {"ada", "bob"}))["bob"][0]
        assert before["avatar"] == "https://example.com/bob.png" and "typing" not in before

        reply = await b.command("typing", typing=True, username="bob")
        assert reply == {"event": "reply", "cmd": "typing", "status": "ok", "response": {}}
        typed_at = time.monotonic()
        typing = (await a.wait_sync(lambda listed: any(m.get("typing") for m in listed.get("bob", []))))["bob"]
        assert len(typing) == 1  # updated in place, not a second connection
        [meta] = typing
        assert meta["typing"] is True and meta["username"] == "bob"
        # online_at and the token's info survive the update; the new ref points back at the old one.
        assert meta["online_at"] == before["online_at"] and meta["avatar"] == before["avatar"]
        assert meta["phx_ref_prev"] == before["phx_ref"] and meta["phx_ref"] != before["phx_ref"]
        # phoenix.js sees an update as a join of the new meta and a leave of the old one (both before
        # that onSync), the key staying.
        leave = a.seen("leave")[-1]
        assert leave["key"] == "bob"
        assert refs(leave["left"]) == [before["phx_ref"]] and refs(leave["current"]) == [meta["phx_ref"]]
        assert (await presences(server, topic))["bob"]["metas"] == [meta]
        assert await count(server, topic) == (2, 2)

        # PUSH_TYPING_TIMEOUT=1: it lapses with nothing more from B.
        cleared = (await a.wait_sync(lambda listed: listed["bob"][0].get("typing") is False))["bob"]
        assert time.monotonic() - typed_at > 0.7
        [lapsed] = cleared
        assert lapsed["phx_ref_prev"] == meta["phx_ref"]
        assert {k: v for k, v in lapsed.items() if k not in ("typing", "phx_ref", "phx_ref_prev")} == \
               {k: v for k, v in meta.items() if k not in ("typing", "phx_ref", "phx_ref_prev")}

        # typing: false is taken at once; a payload without a boolean is refused.
        assert (await b.command("typing", typing=True))["status"] == "ok"
        await a.wait_sync(lambda listed: listed["bob"][0].get("typing") is True)
        assert (await b.command("typing", typing=False))["status"] == "ok"
        stopped = (await a.wait_sync(lambda listed: listed["bob"][0].get("typing") is False))["bob"][0]
        assert stopped["username"] == "bob"
        bad = await b.command("push", event="user:typing", payload={"typing": "yes"})
        assert bad == {"event": "reply", "cmd": "push", "status": "error",
                       "response": {"reason": "typing must be a boolean"}}


# --- which topics are tracked


@pytest.mark.parametrize("version", VERSIONS)
async def test_community_topic_is_tracked(version, server, presence_client):
    topic = new_topic("room:")  # room:<community_id>
    async with presence_client(version, server, topic, token=user_token("ada")) as a, \
            presence_client(version, server, topic, token=user_token("bob")) as b:
        await a.joined()
        await b.joined()
        listed = await a.wait_sync(lambda listed: set(listed) == {"ada", "bob"})
        assert_meta(listed["bob"][0], "bob")
        assert await count(server, topic) == (2, 2)
        assert (await b.command("typing", typing=True, username="bob"))["status"] == "ok"
        await a.wait_sync(lambda listed: listed["bob"][0].get("typing") is True)


async def assert_untracked(version: str, server: ServerProcess, presence_client: Callable[..., Any],
                           topic: str) -> None:
    """No presence_state, no presence_diff, and user:typing is just another unhandled event."""
    async with presence_client(version, server, topic, token=user_token("ada"), log_frames=True) as a, \
            presence_client(version, server, topic, token=user_token("bob"), log_frames=True) as b:
        await a.joined()
        await b.joined()
        reply = await b.command("typing", typing=True, username="bob")
        assert reply == {"event": "reply", "cmd": "typing", "status": "error",
                         "response": {"reason": "unhandled event"}}
        # The servers used here send diffs at once (PUSH_PRESENCE_DIFF_INTERVAL=0), so any presence frame
        # for B's join or typing would reach A before a message published after B's typing reply.
        async with aiohttp.ClientSession() as http:
            await publish(http, server, topic, {"n": 1})
        await a.wait_event("message")
        await b.wait_event("message")
        for client in (a, b):
            names = {e["name"] for e in client.seen("frame")}
            assert not names & {"presence_state", "presence_diff"}, client.events
            assert not client.seen("sync") and not client.seen("join") and not client.seen("leave")
    status, body = await api_get(server, f"/api/presence/{topic}")
    assert status == 400 and "not tracked" in body["error"], body


async def assert_tracked(version: str, server: ServerProcess, presence_client: Callable[..., Any],
                         topic: str) -> None:
    async with presence_client(version, server, topic, token=user_token("ada")) as a:
        await a.joined()
        assert set(await a.wait_sync(lambda listed: "ada" in listed)) == {"ada"}
        assert (await a.command("typing", typing=True))["status"] == "ok"
        assert await count(server, topic) == (1, 1)


@pytest.mark.parametrize("version", VERSIONS)
async def test_lobby_is_not_tracked_by_default(version, start_server, presence_client):
    server = await start_server(PUSH_PRESENCE_DIFF_INTERVAL="0")
    await assert_untracked(version, server, presence_client, new_topic("room:lobby:"))


@pytest.mark.parametrize("version", VERSIONS)
async def test_presence_topics_setting(version, start_server, presence_client):
    only_lobby = await start_server(PUSH_PRESENCE_TOPICS="lobby", PUSH_PRESENCE_DIFF_INTERVAL="0")
    await assert_tracked(version, only_lobby, presence_client, new_topic("room:lobby:"))
    await assert_untracked(version, only_lobby, presence_client, new_topic())

    off = await start_server(PUSH_PRESENCE_TOPICS="none", PUSH_PRESENCE_DIFF_INTERVAL="0")
    await assert_untracked(version, off, presence_client, new_topic())
    await assert_untracked(version, off, presence_client, new_topic("room:"))


# --- server-side ends of a connection


@pytest.mark.parametrize("version", VERSIONS)
async def test_heartbeat_timeout_leaves_presence(version, start_server, presence_client):
    server = await start_server(PUSH_HEARTBEAT_TIMEOUT="1")
    topic = new_topic()
    async with presence_client(version, server, topic, token=user_token("ada"), heartbeat_ms=300) as a, \
            presence_client(version, server, topic, token=user_token("bob"), heartbeat_ms=3_600_000) as b:
        await a.joined()
        await b.joined()
        bob_ref = refs((await a.wait_sync(lambda listed: set(listed) == {"ada", "bob"}))["bob"])[0]
        close = await b.wait_event("close")
        assert (close["code"], close["reason"]) == (1001, "heartbeat timeout")
        # A sees that connection leave (phoenix.js reconnects B and rejoins: a new meta may already be there).
        leave = await a.wait_for(
            lambda e: e["event"] == "leave" and e["key"] == "bob" and bob_ref in refs(e["left"]), PROMPT)
        assert bob_ref not in refs(leave["current"])
        # ... and B, back, is tracked again under a new ref.
        back = await a.wait_sync(lambda listed: bool(listed.get("bob")) and bob_ref not in refs(listed["bob"]))
        assert len(back["bob"]) == 1
        assert not [e for e in a.events if e["event"] == "close"]  # A, heartbeating, stays


@pytest.mark.parametrize("version", VERSIONS)
async def test_token_expiry_leaves_presence(version, server, presence_client):
    topic = new_topic()
    async with presence_client(version, server, topic, token=user_token("ada")) as a, \
            presence_client(version, server, topic, token=user_token("bob", ttl=3)) as b:
        await a.joined()
        await b.joined()
        await a.wait_sync(lambda listed: set(listed) == {"ada", "bob"})
        close = await b.wait_event("close")
        assert (close["code"], close["reason"]) == (1001, "token expired")
        leave = await a.wait_event("leave", PROMPT, key="bob")
        assert leave["current"] == []
        assert set(await a.wait_sync(lambda listed: "bob" not in listed)) == {"ada"}
        assert await count(server, topic) == (1, 1)


# --- the HTTP view's refusals


async def test_presence_endpoints_refusals(server):
    topic = new_topic()
    assert (await api_get(server, f"/api/presence/{topic}"))[0] == 200
    assert await api_get(server, f"/api/presence/{topic}/count") == (
        200, {"topic": topic, "users": 0, "connections": 0})
    for path in (f"/api/presence/{topic}", f"/api/presence/{topic}/count"):
        status, body = await api_get(server, path, key=None)
        assert status == 401, body
        status, body = await api_get(server, path, key="wrong-key")
        assert status == 401, body
    for name in ("nope:1", "room:lobby:1", "user:u1"):
        for suffix in ("", "/count"):
            status, body = await api_get(server, f"/api/presence/{name}{suffix}")
            assert status == 400 and "error" in body, (name, body)
