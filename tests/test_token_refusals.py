"""A refused client token says which claim failed: in the WebSocket upgrade's 403 body and in the log."""

from __future__ import annotations

import time

import aiohttp
import jwt
import pytest

from conftest import JWT_SECRET, ServerProcess, make_token, shared_server
from ws_client import UPGRADE_HEADERS

def signed(**claims: object) -> str:
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


# Each test reads only its own refusal's log line: one server serves them all.
pytestmark = pytest.mark.asyncio(loop_scope="module")
server = shared_server()

NOW = int(time.time())
CASES = [
    (signed(sub="u1"), "missing_claim: exp"),
    (signed(exp=NOW + 3600), "missing_claim: sub"),
    (signed(sub=42, exp=NOW + 3600), "invalid: sub must be a string"),
    (signed(sub="", exp=NOW + 3600), "bad_claims: sub must be a non-empty string"),
    (signed(sub="u1", exp="soon"), "malformed: exp must be an integer"),
    (signed(sub="u1", exp=NOW + 3600, nbf=NOW + 3600), "not_yet_valid: nbf is in the future"),
    (signed(sub="u1", exp=NOW + 3600, aud="elsewhere"), "bad_audience: aud is given, none is configured"),
    (signed(sub="u1", exp=NOW + 3600, topics="room:*"), "bad_claims: topics must be a list of non-empty strings"),
    (signed(sub="u1", exp=NOW + 3600, info=[1]), "bad_claims: info must be an object"),
    (make_token(ttl=-60), "expired"),
]


async def upgrade(server: ServerProcess, token: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.get(
            f"{server.http_url}/socket/websocket", params={"vsn": "2.0.0", "token": token}, headers=UPGRADE_HEADERS,
            timeout=aiohttp.ClientTimeout(total=5)) as response:
        return response.status, await response.json()


@pytest.mark.parametrize(("token", "explanation"), CASES, ids=[case[1] for case in CASES])
async def test_a_refused_token_names_the_failing_claim(server, token, explanation):
    logged_before = len(server.log_lines)
    assert await upgrade(server, token) == (403, {"error": f"token refused: {explanation}"})
    logged = await server.wait_for_log(lambda line: line.get("event") == "connect_refused", timeout=5,
                                       since=logged_before)
    assert logged["error"] == f"token refused: {explanation}", logged
    assert token not in str(server.log_lines)  # the token itself is never logged


@pytest.mark.parametrize(("token", "explanation"), CASES[:3], ids=[case[1] for case in CASES[:3]])
async def test_a_refused_longpoll_token_names_the_failing_claim_in_the_log(server, token, explanation):
    logged_before = len(server.log_lines)
    async with aiohttp.ClientSession() as http, http.get(
            f"{server.http_url}/socket/longpoll", params={"vsn": "2.0.0", "token": token},
            timeout=aiohttp.ClientTimeout(total=5)) as response:
        assert await response.json() == {"status": 403}  # phoenix.js's long-poll protocol has no room for more
    logged = await server.wait_for_log(lambda line: line.get("event") == "connect_refused", timeout=5,
                                       since=logged_before)
    assert logged["error"] == f"token refused: {explanation}", logged
    assert logged["transport"] == "longpoll"
