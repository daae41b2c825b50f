"""Long-poll without sticky sessions (issue 18 part 3): two nodes on a real broker behind a round-robin
proxy (tests/lp_proxy.py, no affinity), so a session's requests land on either node and the one that does
not hold it relays them over the broker (push_service/transports/longpoll_relay.py).

The clients are the stock phoenix.js `LongPoll` under Node (tests/js/presence.mjs --longpoll: join,
messages, presence, `user:typing`, leave); the hostile cases are raw requests as phoenix.js makes them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest

from brokers import require_nats, require_redis
from conftest import ADMIN_KEY, JWT_SECRET, ServerProcess, make_token, until
from http_helpers import bounded, metric, publish
from lp_proxy import Proxy
from nodejs import JS_DIR, node_binary, run_script
from test_presence_js import PresenceClient

pytestmark = pytest.mark.slow  # two nodes and a broker; phoenix.js clients under Node

CLIENT = JS_DIR / "presence.mjs"
WINDOW = 1.0  # PUSH_LONGPOLL_WINDOW
NODE_TIMEOUT = 1.5  # PUSH_NODE_TIMEOUT: a killed node is noticed within this
TIMEOUT = 8.0
RETRY_MS = 150
MESSAGES = 20
RELAYED = "push_longpoll_relayed_total"
LONGPOLL_PATH = "/socket/longpoll"


def broker(kind: str) -> str:
    return require_redis() if kind == "redis" else require_nats()


async def cluster(start_server: Callable[..., Any], broker_url: str, *each: dict[str, str]) -> list[ServerProcess]:
    """Nodes on one broker (two, or one per `each`: its own settings), once each has heard the others (the
    relay asks only live nodes)."""
    nodes = await asyncio.gather(*(start_server(PUSH_BROKER=broker_url, PUSH_LONGPOLL_WINDOW=str(WINDOW),
                                                PUSH_NODE_TIMEOUT=str(NODE_TIMEOUT), **env)
                                   for env in each or ({}, {})))
    count = len(nodes)

    async def all_live() -> bool:
        async with aiohttp.ClientSession() as http:
            for node in nodes:
                async with http.get(f"{node.http_url}/api/admin/nodes", timeout=bounded(),
                                    headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as response:
                    if len((await response.json())["nodes"]) != count:
                        return False
        return True

    await until(all_live, TIMEOUT, "every node sees the others")
    return list(nodes)


@pytest.fixture
def lp_client() -> Callable[..., Any]:
    """Factory: `async with lp_client("18", proxy_url, topic, sub) as client:` (presence.mjs over LongPoll)."""
    node_binary()

    @asynccontextmanager
    async def start(version: str, url: str, topic: str, sub: str) -> AsyncIterator[PresenceClient]:
        # "18-auth": phoenix.js 1.8's `authToken` (a header on polls, nothing on POSTs) instead of `params`.
        token = make_token(sub, info={"username": sub})
        how = ["--auth-token", token] if version == "18-auth" else ["--token", token]
        args = [version.removesuffix("-auth"), f"{url}/socket", "--topic", topic, *how,
                "--retry-ms", str(RETRY_MS), "--longpoll"]
        async with run_script(CLIENT, *args, kind=PresenceClient) as client:
            yield client

    return start


async def longpoll_sessions(http: aiohttp.ClientSession, node: ServerProcess) -> float:
    return await metric(http, node, "push_connections", transport="longpoll")


async def relayed(http: aiohttp.ClientSession, nodes: list[ServerProcess], direction: str, outcome: str) -> float:
    return sum([await metric(http, node, RELAYED, direction=direction, outcome=outcome) for node in nodes])


@pytest.mark.parametrize("kind,version", [("redis", "18"), ("nats", "18"), ("redis", "16"), ("redis", "18-auth")],
                         ids=["redis-phoenix-1.8", "nats-phoenix-1.8", "redis-phoenix-1.6",
                              "redis-phoenix-1.8-authToken"])
async def test_phoenix_longpoll_clients_need_no_sticky_balancer(kind, version, start_server, lp_client):
    nodes = await cluster(start_server, broker(kind))
    topic = f"room:topic:{uuid.uuid4().hex}"
    async with aiohttp.ClientSession() as http, Proxy([node.http_url for node in nodes]) as balancer, \
            lp_client(version, balancer.url, topic, "ada") as ada, \
            lp_client(version, balancer.url, topic, "bob") as bob:
        await ada.joined()
        await bob.joined()
        # Each holds one session, on one node or the other, and their requests went to both.
        await until(lambda: _sessions_total(http, nodes, 2), TIMEOUT, "two sessions in all")
        # Every message, in order, whichever node it is published through.
        for n in range(MESSAGES):
            await publish(http, nodes[n % 2], topic, {"n": n})
        for client in (ada, bob):
            got = [(await client.wait_event("message"))["payload"]["n"] for _ in range(MESSAGES)]
            assert got == list(range(MESSAGES))
        # A push goes through whichever node the balancer picks: bob sees ada typing.
        assert (await ada.command("typing", typing=True))["status"] == "ok"
        await bob.wait_sync(lambda listed: any(meta.get("typing") for meta in listed.get("ada", [])))
        assert (await ada.command("leave"))["status"] == "ok"
        await bob.wait_sync(lambda listed: "ada" not in listed)
        assert set(balancer.served) == {node.http_url for node in nodes}
        assert await relayed(http, nodes, "out", "ok") >= 4  # polls and pushes, relayed and answered
        assert await relayed(http, nodes, "in", "ok") == await relayed(http, nodes, "out", "ok")
        assert ada.seen("close") == [] and bob.seen("close") == []  # never a new session


async def _sessions_total(http: aiohttp.ClientSession, nodes: list[ServerProcess], expected: int) -> bool:
    return sum([await longpoll_sessions(http, node) for node in nodes]) == expected


async def test_killing_the_holder_answers_410_and_the_client_reopens_on_the_survivor(start_server, lp_client):
    nodes = await cluster(start_server, broker("redis"))
    topic = f"room:topic:{uuid.uuid4().hex}"
    async with aiohttp.ClientSession() as http, Proxy([node.http_url for node in nodes]) as balancer, \
            lp_client("18", balancer.url, topic, "ada") as ada:
        await ada.joined()
        holder, survivor = nodes if await longpoll_sessions(http, nodes[0]) == 1 else nodes[::-1]
        # From here every request reaches the survivor, which relays it to the holder: the poll that is
        # waiting when the holder dies is a relayed one (a poll cut with the holder's own socket would be
        # the balancer's 502, not the answer looked at here).
        balancer.upstream = survivor.http_url
        relayed_before = await metric(http, survivor, RELAYED, direction="out", outcome="ok")
        await until(lambda: _more(http, survivor, relayed_before), TIMEOUT, "a poll relayed by the survivor")
        assert holder.process is not None
        holder.process.send_signal(signal.SIGKILL)
        await holder.process.wait()
        closed = await ada.wait_event("close", timeout=NODE_TIMEOUT + WINDOW + TIMEOUT)
        assert closed["code"] == 3410  # phoenix.js: {"status": 410}, the session is gone
        assert await metric(http, survivor, RELAYED, direction="out", outcome="dead") >= 1
        await ada.joined()  # a new session, on the survivor, and the channel rejoined
        assert await longpoll_sessions(http, survivor) == 1
        await publish(http, survivor, topic, {"n": 1})
        assert (await ada.wait_event("message"))["payload"] == {"n": 1}


async def _more(http: aiohttp.ClientSession, node: ServerProcess, before: float) -> bool:
    return await metric(http, node, RELAYED, direction="out", outcome="ok") > before


# --- hostile requests, raw


class RawSession:
    """A long-poll session opened on one node, with the requests phoenix.js makes: the user's JWT in the
    query (`token`), then the session token last."""

    def __init__(self, http: aiohttp.ClientSession, node: ServerProcess, sub: str) -> None:
        self.http, self.node, self.jwt = http, node, make_token(sub)
        self.token = ""

    async def open(self) -> RawSession:
        body = await self.request(self.node, "GET", [("token", self.jwt), ("vsn", "2.0.0")])
        assert body["status"] == 410
        self.token = body["token"]
        return self

    async def request(self, node: ServerProcess, method: str, params: list[tuple[str, str]],
                      data: bytes | None = None) -> dict[str, Any]:
        async with self.http.request(method, node.http_url + LONGPOLL_PATH, params=params, data=data,
                                     timeout=bounded(WINDOW + TIMEOUT)) as response:
            return {"http": response.status, **orjson.loads(await response.read())}

    async def poll(self, node: ServerProcess, token: str | None = None, jwt: str | None = None) -> dict[str, Any]:
        params = [("token", self.jwt if jwt is None else jwt), ("vsn", "2.0.0"), ("token", token or self.token)]
        return await self.request(node, "GET", [param for param in params if param[1]])

    async def push(self, node: ServerProcess, frame: list[Any], token: str | None = None,
                   jwt: str | None = None) -> dict[str, Any]:
        params = [("token", self.jwt if jwt is None else jwt), ("vsn", "2.0.0"), ("token", token or self.token)]
        return await self.request(node, "POST", [param for param in params if param[1]], orjson.dumps(frame))


def session_token(node_id: str, key: str, sub: str, secret: str) -> str:
    """A session token as longpoll_tokens.py makes one, under the secret derived from `secret`."""
    derived = hmac.digest(secret.encode(), b"push-service long-poll session tokens v1", "sha256")
    digest = hmac.digest(derived, f"{node_id}.{key}.{sub}".encode(), "sha256")[:18]
    return f"lp.{node_id}.{key}.{base64.urlsafe_b64encode(digest).decode()}"


async def test_forged_foreign_and_moved_session_tokens_are_answered_410(start_server):
    holder, other = await cluster(start_server, broker("redis"))
    async with aiohttp.ClientSession() as http:
        ada = await RawSession(http, holder, "ada").open()
        node_id, key, signature = ada.token.removeprefix("lp.").split(".")
        # The documented derivation, with the shared secret, gives the very token: only the secret differs below.
        assert session_token(node_id, key, "ada", JWT_SECRET) == ada.token
        assert (await ada.poll(other))["status"] == 204  # relayed: the session is on the holder
        gone = {"http": 200, "status": 410}
        forged = f"lp.{node_id}.{key}.{'A' * len(signature)}"
        other_secret = session_token(node_id, key, "ada", "another-secret-0123456789abcdef0123")
        moved_to_bob = session_token(node_id, key, "bob", JWT_SECRET)  # signed for bob: it is ada's session
        unknown_node = f"lp.{'f' * len(node_id)}.{key}.{signature}"
        other_id = (await RawSession(http, other, "ada").open()).token.split(".")[1]
        swapped_node = f"lp.{other_id}.{key}.{signature}"  # the holder's session, pointed at the other node
        for token in (forged, other_secret, moved_to_bob, unknown_node, swapped_node):
            for node in (holder, other):
                assert await ada.poll(node, token) == gone, (token, node.http_url)
                assert await ada.push(node, [None, "1", "phoenix", "heartbeat", {}], token) == gone
        # Ada's session token with bob's JWT: not bob's session, on either node; without any user token
        # a poll is refused too (phoenix.js always sends one), a POST is not (1.8 sends its authToken on
        # polls only).
        bob_jwt = make_token("bob")
        for node in (holder, other):
            assert await ada.poll(node, jwt=bob_jwt) == gone
            assert await ada.push(node, [None, "1", "phoenix", "heartbeat", {}], jwt=bob_jwt) == gone
            assert await ada.poll(node, jwt="") == gone
            assert (await ada.push(node, ["1", "2", "phoenix", "heartbeat", {}], jwt=""))["status"] == 200
        # Another valid token of ada's (a refreshed one, say) is ada's.
        assert (await ada.poll(other, jwt=make_token("ada", ttl=600)))["status"] == 200  # the heartbeat replies
        assert (await ada.poll(holder))["status"] in (200, 204)
        assert await metric(http, holder, "push_client_errors_total", reason="longpoll_wrong_user") >= 4
        assert await metric(http, other, RELAYED, direction="out", outcome="dead") >= 2  # the unknown node
        # With a valid user token beside it, a bad session token is refused where it landed (the secret
        # is shared): forged, other secret, moved to bob (a poll and a POST each), bob's JWT (2).
        assert await metric(http, other, RELAYED, direction="out", outcome="refused") == 8
        assert await metric(http, holder, RELAYED, direction="in", outcome="gone") >= 1  # no user token: asked


@pytest.mark.parametrize("bounded_side", ["relaying", "holding"])
async def test_a_flood_of_relayed_polls_is_bounded_and_answered(bounded_side, start_server):
    """PUSH_LONGPOLL_RELAY_MAX_PENDING on the node that relays (out) or on the node that holds the
    session (in): past it the client is answered at once, HTTP 503 with {"status": 500} (phoenix.js
    retries with backoff), and once the flood is over the bound is whole again."""
    bound, roomy = 20, {"PUSH_LONGPOLL_RELAY_MAX_PENDING": "1000"}
    tight = {"PUSH_LONGPOLL_RELAY_MAX_PENDING": str(bound)}
    holder, other = await cluster(start_server, broker("redis"),
                                  *((roomy, tight) if bounded_side == "relaying" else (tight, roomy)))
    bounded_node, direction = (other, "out") if bounded_side == "relaying" else (holder, "in")
    async with aiohttp.ClientSession() as http:
        ada = await RawSession(http, holder, "ada").open()
        # Each poll waits out the window at the holder, relayed by the other node.
        answers = await asyncio.gather(*(ada.poll(other) for _ in range(bound * 3)))
        refused = [answer for answer in answers if answer == {"http": 503, "status": 500}]
        waited = [answer for answer in answers if answer.get("status") == 204]
        assert len(refused) >= bound and len(waited) <= bound and len(refused) + len(waited) == len(answers)
        assert await metric(http, bounded_node, RELAYED, direction=direction, outcome="overloaded") == len(refused)
        assert await metric(http, other, RELAYED, direction="out", outcome="overloaded") == len(refused)
        # Back to baseline: the bound is whole again (as many polls as it allows all wait), the session
        # is still served, through either node.
        again = await asyncio.gather(*(ada.poll(other) for _ in range(bound)))
        assert [answer["status"] for answer in again] == [204] * bound
        assert (await ada.poll(holder))["status"] == 204
        assert await longpoll_sessions(http, holder) == 1
