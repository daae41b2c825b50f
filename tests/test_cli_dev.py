"""The CLI as a new user meets it: dev mode's banner, pasted into another shell, and each command's help."""

from __future__ import annotations

import asyncio
import re
import shlex
import sys

import aiohttp
import orjson
import pytest

from conftest import ROOT
from push_service.config import OPTIONS
from test_config import cli_env, run_cli

BANNER_TIMEOUT = 15.0


async def read_exports(process: asyncio.subprocess.Process) -> dict[str, str]:
    """The variables of the banner's `export` lines, read off the server's stdout up to PUSH_URL."""
    exports: dict[str, str] = {}
    seen: list[str] = []
    while "PUSH_URL" not in exports:
        assert process.stdout is not None
        raw = await process.stdout.readline()
        if not raw:
            raise AssertionError(f"server exited before its banner's export lines: {seen}")
        seen.append(raw.decode())
        words = shlex.split(raw.decode())
        if words[:1] == ["export"]:
            exports.update(word.split("=", 1) for word in words[1:])  # type: ignore[misc]
    return exports


async def test_dev_banner_exports_make_token_and_publish_work_in_another_shell():
    # A free port of the server's choosing: only PUSH_URL can tell the other shell where it is.
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "push_service", "serve", "--port", "0", env=cli_env(), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        exports = await asyncio.wait_for(read_exports(server), BANNER_TIMEOUT)
        assert set(exports) == {"PUSH_SERVICE_KEY", "PUSH_ADMIN_KEY", "PUSH_JWT_SECRET", "PUSH_URL"}
        assert exports["PUSH_ADMIN_KEY"] != exports["PUSH_SERVICE_KEY"]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", exports["PUSH_URL"])
        assert not exports["PUSH_URL"].endswith(":4000")
        shell = cli_env(**exports)  # another shell: nothing but what was pasted

        code, stdout, stderr = await run_cli("token", "--sub", "ada", "--topics", "room:lobby:*", env=shell)
        assert code == 0, stderr
        token = stdout.strip()
        ws_url = exports["PUSH_URL"].replace("http", "ws", 1) + f"/socket/websocket?vsn=2.0.0&token={token}"
        async with aiohttp.ClientSession() as http, http.ws_connect(ws_url, timeout=10) as ws:
            await ws.send_json(["1", "1", "room:lobby:42", "phx_join", {}])
            reply = await ws.receive_json(timeout=5)
            assert reply[4]["status"] == "ok", reply
            code, stdout, stderr = await run_cli("publish", "--channel", "42", "--data", '{"message":"hi"}',
                                                 env=shell)
            assert code == 0, stderr
            assert orjson.loads(stdout) == {"status": 200, "published": 1, "delivered": 1}
            broadcast = await ws.receive_json(timeout=5)
            assert broadcast[2:] == ["room:lobby:42", "new_msg", {"message": "hi", "channel_id": "42"}]
            nodes_url = exports["PUSH_URL"] + "/api/admin/nodes"
            async with http.get(nodes_url, headers={"Authorization": f"Bearer {exports['PUSH_ADMIN_KEY']}"}) as answer:
                assert answer.status == 200
                assert [node["connections"]["websocket"] for node in (await answer.json())["nodes"]] == [1]
            async with http.get(nodes_url, headers={"Authorization": f"Bearer {exports['PUSH_SERVICE_KEY']}"}) as answer:
                assert answer.status == 403
    finally:
        if server.returncode is None:
            server.terminate()
        try:
            await asyncio.wait_for(server.wait(), 10)
        except (TimeoutError, asyncio.TimeoutError):
            server.kill()
            await server.wait()


def setting_flags_in(text: str) -> list[str]:
    return [option.flag for option in OPTIONS if re.search(rf"{re.escape(option.flag)}\b", text)]


@pytest.mark.parametrize(("command", "own"), [
    ("token", ["--sub", "--topics", "--ttl", "--info", "--private-key", "--algorithm"]),
    ("publish", ["--channel", "--thread", "--topic", "--event", "--data", "--url", "--key"]),
])
async def test_client_commands_help_shows_their_own_options_only(command, own):
    code, stdout, stderr = await run_cli(command, "--help", env=cli_env(COLUMNS="100"))
    assert code == 0, stderr
    for flag in own:
        assert flag in stdout
    assert setting_flags_in(stdout) == []
    assert len(stdout.splitlines()) < 40, stdout  # a screenful, not the server's every setting


async def test_serve_help_keeps_the_setting_flags():
    code, stdout, _ = await run_cli("serve", "--help", env=cli_env(COLUMNS="100"))
    assert code == 0
    assert setting_flags_in(stdout) == [option.flag for option in OPTIONS]
