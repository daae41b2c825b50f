"""State made from client input is bounded and reclaimed (issue 14 items 3 and 5).

1. In process: joining and leaving 100,000 distinct topic names leaves no per-topic record behind
   (broker, history, hub, presence), and the process's RSS comes back after gc.collect().
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import orjson

from push_service.auth import Identity
from push_service.config import Settings
from push_service.node import Node
from push_service.protocol import V2
from push_service.transports.websocket import WIRES

MIB = 1024 * 1024


def rss(pid: int | str = "self") -> int:
    """Resident set size in bytes, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc status")


class _Conn:
    """A connection that counts what it is sent (and keeps none of it)."""

    transport_name = "websocket"

    def __init__(self) -> None:
        self.wire = WIRES[V2]
        self.sent = 0

    def send(self, data: bytes) -> None:
        self.sent += 1

    def close(self, disconnect: Any) -> None:
        pass


def _structures(node: Node) -> dict[str, int]:
    history = node.broker._history  # type: ignore[attr-defined]
    return {"hub topics": len(node.hub.subscriber_counts()), "waiting": len(node._waiting),
            "history topics": history.topic_count if history is not None else 0,
            "presences": node.presence.tracker.size, "sessions": len(node.sessions)}


async def test_joining_and_leaving_100k_distinct_topics_leaves_nothing_behind() -> None:
    node = Node(Settings(history_size=100))  # the memory broker, history on (the default)
    await node.start()
    try:
        conn = _Conn()
        session = node.open_session(Identity("u1", time.time() + 600), conn, "websocket")

        def join_and_leave(names: range, family: str) -> None:
            for n in names:
                topic = f"room:{family}:{n}"
                session.receive(orjson.dumps([str(n), str(n), topic, "phx_join", {}]).decode())
                session.receive(orjson.dumps([str(n), f"{n}l", topic, "phx_leave", {}]).decode())

        join_and_leave(range(1000), "lobby")  # warm-up: the allocator's and the metrics' first growth
        gc.collect()
        baseline, before = rss(), _structures(node)
        assert before == {"hub topics": 0, "waiting": 0, "history topics": 0, "presences": 0, "sessions": 1}
        started = time.monotonic()
        sent = conn.sent
        join_and_leave(range(1000, 90_000), "lobby")
        join_and_leave(range(90_000, 101_000), "topic")  # presence-tracked
        assert time.monotonic() - started < 60
        assert conn.sent - sent == 100_000 * 3 + 11_000  # join reply, leave reply, close; presence_state
        assert _structures(node) == before
        gc.collect()
        grown = rss() - baseline
        assert grown < 16 * MIB, f"RSS grew by {grown / MIB:.1f} MiB"
    finally:
        await node.stop()
