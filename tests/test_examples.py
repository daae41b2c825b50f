"""The examples in examples/ and the README's backend snippets run against a real server, as a user
would run them.

backend.mjs (Node, no dependency) and backend.py (PyJWT + urllib), and the README's Node and Python
snippets, each mint a client token that a WebSocket client we did not write (the `websockets` library)
connects and joins with, and publish a message that client receives. chat.html runs in headless
Chromium (tests/js/chat.mjs, playwright-core), served as the README says (`python3 -m http.server` over
a directory holding it and the phoenix.js 1.8 bundle): it must list its user in presence, show a message
the backend example publishes, show its user typing, and, after its socket is cut and a message is
published meanwhile, rejoin with `since` and show that message.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest

from conftest import ADMIN_KEY, JWT_SECRET, PUBLISH_KEY, ROOT, communicate, until
from test_console_browser import CHROMIUM, JS_DIR, require_tools
from ws_client import Client

EXAMPLES = ROOT / "examples"
RUN_TIMEOUT = 30.0
BROWSER_TIMEOUT = 60.0
THREAD = "7"


def backend_command(language: str) -> list[str]:
    if language == "node":
        node = shutil.which("node")
        if node is None:
            pytest.fail("node is not installed: the Node example needs Node 18+")
        return [node, str(EXAMPLES / "backend.mjs")]
    return [sys.executable, str(EXAMPLES / "backend.py")]


async def run_backend(language: str, base_url: str, *args: str) -> str:
    """Runs a backend example as its docstring says; returns its stdout (the process must exit 0)."""
    env = {**os.environ, "PUSH_URL": base_url, "PUSH_SERVICE_KEY": PUBLISH_KEY, "PUSH_JWT_SECRET": JWT_SECRET}
    process = await asyncio.create_subprocess_exec(
        *backend_command(language), *args, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await communicate(process, RUN_TIMEOUT)
    assert process.returncode == 0, f"{language} backend {args}: exit {process.returncode}: {stderr.decode()}"
    return stdout.decode().strip()


async def join(client: Client, topic: str) -> dict:
    await client.send_text(orjson.dumps(["1", "1", topic, "phx_join", {}]))
    while True:
        frame = await client.next_json()
        if frame[:4] == ["1", "1", topic, "phx_reply"]:
            return frame[4]


@pytest.mark.slow
@pytest.mark.parametrize("language", ["node", "python"])
async def test_backend_example_token_joins_and_publish_arrives(language, start_server):
    server = await start_server()
    token = await run_backend(language, server.http_url, "token", "ada", "Ada")
    client = await Client.connect(server.port, token)
    try:
        assert (await join(client, f"room:topic:{THREAD}"))["status"] == "ok"
        # The token's topics claim (room:topic:*) is honoured: another family is refused.
        assert (await join(client, "room:lobby:1"))["response"] == {"reason": "unauthorized"}

        answer = orjson.loads(await run_backend(language, server.http_url, "publish", THREAD, f"hello from {language}"))
        assert answer == {"status": 200, "published": 1, "delivered": 1}
        while (frame := await client.next_json())[3] != "new_msg":
            pass  # presence frames of our own join come first
        assert frame[2] == f"room:topic:{THREAD}"
        assert frame[4] == {"thread_id": THREAD, "author": "backend", "text": f"hello from {language}"}
    finally:
        client.close()


async def test_backend_example_without_keys_says_what_to_set() -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PUSH_")}
    for language in ("node", "python"):
        process = await asyncio.create_subprocess_exec(
            *backend_command(language), "token", "ada", env=env, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, stderr = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
        assert process.returncode == 2 and b"PUSH_SERVICE_KEY" in stderr, (language, stderr)


async def static_server(directory: Path) -> tuple[asyncio.subprocess.Process, int]:
    """`python3 -m http.server`, as the README serves the chat page; returns it and its port."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1", "0", cwd=directory,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), RUN_TIMEOUT)
    match = re.search(rb" port (\d+)", line)
    assert match, line
    return process, int(match[1])


class Cuttable:
    """A TCP forwarder between the page and the server that can cut every connection and, while cut,
    close new ones at once (as a network drop the client retries through)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.cut = False
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Cuttable:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except ConnectionError:
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut_all(self) -> None:
        self.cut = True
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def stop(self) -> None:
        self.cut_all()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def no_connections(server) -> bool:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.http_url}/api/stats", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as answer:
            return (await answer.json())["connections"]["total"] == 0


@pytest.mark.slow
async def test_chat_page_in_chromium(start_server, tmp_path):
    node = require_tools()
    server = await start_server(PUSH_HISTORY_SIZE="100")
    shutil.copy(EXAMPLES / "chat.html", tmp_path / "chat.html")
    shutil.copy(JS_DIR / "node_modules" / "phoenix18" / "priv" / "static" / "phoenix.mjs", tmp_path / "phoenix.mjs")
    token = await run_backend("python", server.http_url, "token", "ada", "Ada Lovelace")
    text, missed = "hello from the Node backend", "sent while the page was away"
    pages, port = await static_server(tmp_path)
    network = await Cuttable(server.port).start()
    try:
        page = f"http://127.0.0.1:{port}/chat.html?token={token}&thread={THREAD}&endpoint=ws://127.0.0.1:{network.port}/socket"
        process = await asyncio.create_subprocess_exec(
            node, str(JS_DIR / "chat.mjs"), "--page", page, "--user", "ada", "--expect", text, "--missed", missed,
            "--chromium", str(CHROMIUM), cwd=JS_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        steps: dict[str, dict] = {}
        assert process.stderr is not None
        stderr_read = asyncio.create_task(process.stderr.read())  # drained all along: a full pipe would stall it
        try:
            async def read_steps() -> None:
                assert process.stdout is not None
                async for raw in process.stdout:
                    line = orjson.loads(raw)
                    steps[line["step"]] = line
                    if line["step"] == "presence":
                        published = await run_backend("node", server.http_url, "publish", THREAD, text)
                        assert orjson.loads(published)["delivered"] == 1
                    elif line["step"] == "typing":
                        # The page's socket drops; what is published meanwhile reaches nobody live.
                        network.cut_all()
                        await until(lambda: no_connections(server), 10, "the page's socket to be gone")
                        published = await run_backend("python", server.http_url, "publish", THREAD, missed)
                        assert orjson.loads(published)["delivered"] == 0
                    elif line["step"] == "disconnected":
                        network.cut = False
                await process.wait()

            await asyncio.wait_for(read_steps(), BROWSER_TIMEOUT)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        stderr = await asyncio.wait_for(stderr_read, RUN_TIMEOUT)
    finally:
        await network.stop()
        pages.kill()
        await pages.wait()
    assert process.returncode == 0 and "done" in steps, f"{steps}\n{stderr.decode()[-3000:]}"
    assert steps["presence"]["names"] == ["Ada Lovelace"]
    assert steps["presence"]["status"] == "joined"
    assert steps["message"]["messages"] == [f"backend: {text}"]
    # It rejoined with `since` and was given what it missed, once, with nothing to refetch.
    assert steps["recovered"]["messages"] == [f"backend: {text}", f"backend: {missed}"]
    assert steps["recovered"]["status"] == "joined"


def readme_block(after: str, language: str) -> str:
    """The first ```language block after the line starting with `after` in README.md."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("\n" + after)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(readme, start)
    assert match, f"no {language} block after {after!r}"
    return match[1]


@pytest.mark.slow
@pytest.mark.parametrize("language", ["node", "python"])
async def test_readme_backend_snippet_runs(language, start_server, tmp_path):
    server = await start_server()
    if language == "node":
        script = tmp_path / "snippet.mjs"
        script.write_text(readme_block("Node (18+", "js") + 'console.log(clientToken("ada", "Ada"));\n')
        command = [backend_command("node")[0], str(script)]
    else:
        script = tmp_path / "snippet.py"
        script.write_text(readme_block("Python (PyJWT", "python") + 'print(client_token("ada", "Ada"))\n')
        command = [sys.executable, str(script)]
    env = {**os.environ, "PUSH_URL": server.http_url, "PUSH_SERVICE_KEY": PUBLISH_KEY, "PUSH_JWT_SECRET": JWT_SECRET}
    # The snippet publishes before any client listens (delivered 0); its token then joins, and a second
    # run of the snippet's publish reaches that client.
    process = await asyncio.create_subprocess_exec(*command, env=env, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
    assert process.returncode == 0, stderr.decode()
    token = stdout.decode().split()[-1]
    client = await Client.connect(server.port, token)
    try:
        assert (await join(client, f"room:topic:{THREAD}"))["status"] == "ok"
        process = await asyncio.create_subprocess_exec(*command, env=env, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
        assert process.returncode == 0, stderr.decode()
        while (frame := await client.next_json())[3] != "new_msg":
            pass
        assert frame[2:] == [f"room:topic:{THREAD}", "new_msg", {"thread_id": THREAD, "author": "ada", "text": "hello"}]
    finally:
        client.close()
