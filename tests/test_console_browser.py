"""The live console in a real headless Chromium, and phoenix.js long-poll fallback inside the browser.

`tests/js/console.mjs` (playwright-core) drives Chromium at /usr/bin/chromium against the real
server: see there for the steps. The fallback page is served by a proxy that refuses WebSocket
upgrades, from another origin (`localhost` vs `127.0.0.1`), so the long-poll requests are
cross-origin and go through CORS preflights. The screenshot lands in test-output/console.png.

Chromium: `apt-get install -y chromium` (.ci/run does it). Without it the test is skipped, except
with CI=true, where it fails.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import orjson
import pytest

from conftest import ADMIN_KEY, ROOT, communicate, make_token
from lp_proxy import Proxy

pytestmark = pytest.mark.slow  # headless Chromium

JS_DIR = Path(__file__).resolve().parent / "js"
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = ROOT / "test-output" / "console.png"
RUN_TIMEOUT = 90.0


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


async def test_console_in_chromium(start_server):
    node = require_tools()
    # The fallback page's origin is http://localhost:<proxy port>; the console's own is 127.0.0.1.
    server = await start_server(PUSH_ALLOWED_ORIGINS="//localhost", PUSH_LONGPOLL_WINDOW="2s")
    static = {"/fallback.html": JS_DIR / "fallback.html",
              "/phoenix.mjs": JS_DIR / "node_modules" / "phoenix18" / "priv" / "static" / "phoenix.mjs"}
    SCREENSHOT.parent.mkdir(exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    async with Proxy(server.http_url, websocket="refuse", static=static) as proxy:
        fallback_page = (f"http://localhost:{proxy.port}/fallback.html?endpoint=ws://127.0.0.1:{proxy.port}/socket"
                         f"&token={make_token('browser')}&topic=room:lobby:42&fallback=500")
        process = await asyncio.create_subprocess_exec(
            node, str(JS_DIR / "console.mjs"), "--base", server.http_url, "--key", ADMIN_KEY,
            "--token", make_token("node-client"), "--screenshot", str(SCREENSHOT), "--fallback-page", fallback_page,
            "--chromium", str(CHROMIUM), cwd=JS_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await communicate(process, RUN_TIMEOUT)
        forwarded = list(proxy.forwarded)
        websocket_attempts = proxy.websocket_attempts
    lines = [orjson.loads(line) for line in stdout.splitlines() if line.strip()]
    steps = {line["step"]: line for line in lines if "step" in line}
    assert process.returncode == 0 and "done" in steps, f"{lines}\n{stderr.decode()[-3000:]}"

    assert steps["connections"]["after"] == steps["connections"]["before"] + 1
    assert steps["publish"]["received"] == {"message": "hello from the console"}
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # In the browser: the WebSocket was refused, phoenix.js fell back to long-poll, remembered it,
    # and its cross-origin requests passed CORS (the POSTs were preflighted).
    assert websocket_attempts >= 1
    assert steps["fallback"]["memorized"] == "true"
    assert "1 long-poll" in steps["fallback"]["transports"]
    methods = {method for method, path, _ in forwarded if path == "/socket/longpoll"}
    assert {"GET", "POST", "OPTIONS"} <= methods, forwarded
