"""What the asyncio benchmarks (presence_crowd.py, topics.py) share: a server process of our own on
a free loopback port, client tokens, a masked client frame, and the server's CPU time from /proc.
(The fan-out, latency, memory and connect-rate scenarios are run.py's, with the C load generator.)"""

from __future__ import annotations

import asyncio
import os
import struct
import sys
import time
from pathlib import Path

import jwt
import orjson

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-publish-key-0123456789abcdef"
SECRET = "bench-jwt-secret-0123456789abcdef0123456789"


def masked_text_frame(payload: bytes) -> bytes:
    """A client frame must be masked; the zero mask keeps it cheap and is still valid."""
    assert len(payload) < 126
    return struct.pack("!BB", 0x81, 0x80 | len(payload)) + b"\0\0\0\0" + payload


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def token(sub: str = "bench") -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


async def start_server(env_overrides: dict[str, str] | None = None) -> tuple[asyncio.subprocess.Process, int]:
    """`python -m push_service serve` on a free port; returns the process and its port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSH_")}
    env.update(PUSH_SERVICE_KEY=KEY, PUSH_JWT_SECRET=SECRET, PUSH_LOG_FORMAT="json", PUSH_LOG_LEVEL="warning",
               **(env_overrides or {}))
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "push_service", "serve", "--port", "0", "--log-level", "info",
        env=env, cwd=ROOT, stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL)
    assert server.stderr is not None
    while True:
        line = await asyncio.wait_for(server.stderr.readline(), 15)
        if not line:
            raise RuntimeError("server exited before listening")
        entry = orjson.loads(line)
        if entry.get("event") == "listening":
            # Keep draining its log so the server never blocks on a full pipe.
            asyncio.get_running_loop().create_task(_drain(server.stderr))
            return server, entry["port"]


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


async def stop_server(server: asyncio.subprocess.Process) -> None:
    if server.returncode is None:
        server.terminate()
        await asyncio.wait_for(server.wait(), 15)
