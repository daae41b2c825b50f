"""The cluster-wide console in a real headless Chromium, against three nodes over the test Redis, and
phoenix.js long-poll fallback inside the browser.

`tests/js/console.mjs` (playwright-core) drives Chromium at /usr/bin/chromium: see there for the steps.
The page is on the first node, a phoenix.js client on the second, the test's publishes go to the third.
The fallback page is served by a proxy (in front of the first node) that refuses WebSocket upgrades, from
another origin (`localhost` vs `127.0.0.1`), so the long-poll requests are cross-origin and go through
CORS preflights. Screenshots land in the test's tmp dir (docs/console.png is its nodes.png).

Chromium: `apt-get install -y chromium` (.ci/run does it). Without it the test is skipped, except
with CI=true, where it fails. Without Redis likewise (tests/brokers.py).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import aiohttp
import orjson
import pytest

from brokers import require_redis
from conftest import ADMIN_KEY, communicate, make_token
from lp_proxy import Proxy
from test_cluster import start_nodes

pytestmark = pytest.mark.slow  # headless Chromium, three servers

JS_DIR = Path(__file__).resolve().parent / "js"
CHROMIUM = Path("/usr/bin/chromium")
RUN_TIMEOUT = 120.0
USER = "console-user"
PNG = b"\x89PNG\r\n\x1a\n"


def require_tools() -> str:
    if not CHROMIUM.exists():
        message = f"Chromium is not installed at {CHROMIUM} (apt-get install -y chromium; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: this test needs Node 20 and `npm ci --prefix tests/js`")
    if not (JS_DIR / "node_modules" / "playwright-core").is_dir():
        pytest.fail("tests/js/node_modules/playwright-core is missing: run `npm ci --prefix tests/js` first")
    return node


async def node_id(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(f"{url}/api/stats", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                        timeout=aiohttp.ClientTimeout(total=5)) as response:
        return (await response.json())["node"]


async def test_console_in_chromium_over_a_three_node_cluster(start_server, tmp_path):
    node = require_tools()
    # The fallback page's origin is http://localhost:<proxy port>; the console's own is 127.0.0.1.
    servers = await start_nodes(start_server, 3, require_redis(), PUSH_ALLOWED_ORIGINS="//localhost",
                                PUSH_LONGPOLL_WINDOW="2s")
    async with aiohttp.ClientSession() as http:
        page_node, client_node, _ = [await node_id(http, server.http_url) for server in servers]
    static = {"/fallback.html": JS_DIR / "fallback.html",
              "/phoenix.mjs": JS_DIR / "node_modules" / "phoenix18" / "priv" / "static" / "phoenix.mjs"}
    async with Proxy(servers[0].http_url, websocket="refuse", static=static) as proxy:
        fallback_page = (f"http://localhost:{proxy.port}/fallback.html?endpoint=ws://127.0.0.1:{proxy.port}/socket"
                         f"&token={make_token('browser')}&topic=room:lobby:42&fallback=500")
        process = await asyncio.create_subprocess_exec(
            node, str(JS_DIR / "console.mjs"), "--bases", ",".join(server.http_url for server in servers),
            "--key", ADMIN_KEY, "--token", make_token(USER), "--user", USER, "--shots", str(tmp_path),
            "--fallback-page", fallback_page, "--chromium", str(CHROMIUM),
            cwd=JS_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await communicate(process, RUN_TIMEOUT)
        forwarded = list(proxy.forwarded)
        websocket_attempts = proxy.websocket_attempts
    lines = [orjson.loads(line) for line in stdout.splitlines() if line.strip()]
    steps = {line["step"]: line for line in lines if "step" in line}
    assert process.returncode == 0 and "done" in steps, f"{lines}\n{stderr.decode()[-3000:]}"

    # Whichever node the page is on, it shows the whole cluster.
    assert sorted(steps["nodes"]["nodes"]) == sorted({page_node, client_node, *steps["nodes"]["nodes"]})
    assert len(set(steps["nodes"]["nodes"])) == 3
    assert steps["connections"]["after"] == steps["connections"]["before"] + 1
    chart = steps["chart"]
    assert chart["before"]["messages"] == 0 and chart["after"]["messages"] > 0  # nothing was published before
    assert chart["after"]["deliveries"] > chart["before"]["deliveries"]  # (presence diffs are deliveries too)
    assert "cluster" in chart["lines"]
    assert USER in steps["topics"]["presence"]
    assert steps["watch"]["received"] == {"message": "hello from the console"}
    # The disconnect went from the page's node to the client's, and phoenix.js saw its socket close.
    users = steps["users"]
    assert users["node"] == client_node != page_node
    assert users["unsubscribed"] == {"left": ["room:lobby:42"], "socketOpen": True}
    assert USER in users["question"] and users["closes"]
    assert f"{client_node}: 1" in users["result"]
    print(f"\nconsole disconnect -> phoenix.js socket closed on another node after {users['closedAfterMs']} ms")
    assert steps["screenshots"]["overflow"] <= 0, "the page scrolls sideways at 420 px"
    for name in ("nodes", "topics", "users", "nodes-420"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG, name
    # In the browser: the WebSocket was refused, phoenix.js fell back to long-poll, remembered it,
    # and its cross-origin requests passed CORS (the POSTs were preflighted).
    assert websocket_attempts >= 1
    assert steps["fallback"]["memorized"] == "true"
    assert "1 long-poll" in steps["fallback"]["transports"]
    methods = {method for method, path, _ in forwarded if path == "/socket/longpoll"}
    assert {"GET", "POST", "OPTIONS"} <= methods, forwarded
