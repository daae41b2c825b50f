"""The control channel against what a broker may bring: senders it cannot count on (made up, huge, endless)."""

from __future__ import annotations

import time

import orjson

from push_service.broker.memory import MemoryBroker
from push_service.control import MAX_PEERS, REQUESTS, Control


def heartbeat(sender: object) -> bytes:
    return orjson.dumps({"kind": "heartbeat", "from": sender, "at": 1.0})


async def test_made_up_senders_cannot_grow_what_a_node_remembers():
    control = Control("me", MemoryBroker(), node_timeout=3.0)
    for n in range(MAX_PEERS * 3):
        control.heard(REQUESTS, heartbeat(f"n{n}"))
    control.heard(REQUESTS, heartbeat("x" * 10_000))
    control.heard(REQUESTS, heartbeat(["not", "a", "name"]))
    control.heard(REQUESTS, b"\xff not json")
    peers = control.live_peers()
    assert len(peers) == MAX_PEERS and "x" * 10_000 not in peers
    assert set(peers) == {f"n{n}" for n in range(MAX_PEERS)}


async def test_nodes_not_heard_within_the_timeout_are_forgotten_and_make_room(monkeypatch):
    control = Control("me", MemoryBroker(), node_timeout=3.0)
    for n in range(MAX_PEERS):
        control.heard(REQUESTS, heartbeat(f"n{n}"))
    later = time.monotonic() + 10
    monkeypatch.setattr("push_service.control.time.monotonic", lambda: later)
    assert control.live_peers() == {}
    control.heard(REQUESTS, heartbeat("real"))
    assert control.live_peers() == {"real": 1.0}
