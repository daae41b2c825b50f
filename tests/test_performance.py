"""The design that makes fan-out cheap, checked by counting, never by timing.

benchmarks/ measures speed; these tests keep the reasons for it from eroding, in seconds and
without flakiness: a broadcast is encoded once per wire whatever the audience, a burst costs one
write per subscriber, the per-delivery path does no JSON and calls only a handful of functions,
and an open socket owns no task and no timer.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import orjson

from conftest import JWT_SECRET, make_token, until
from ws_client import Client
from push_service import app as application
from push_service.auth import Identity
from push_service.config import Settings
from push_service.hub import SLICE
from push_service.messages import Broadcast, Wire
from push_service.node import Node
from push_service.protocol import V1, V2
from push_service.transports.frames import frame_text

SUBSCRIBERS = 1000
TOPIC = "room:lobby:perf"
TIMEOUT = 10.0


class CountingWire(Wire):
    """A wire that counts how many frames it builds."""

    __slots__ = ("built",)

    def __init__(self, serializer: Any) -> None:
        super().__init__(serializer, self._frame)
        self.built = 0

    def _frame(self, payload: bytes) -> bytes:
        self.built += 1
        return frame_text(payload)


class Conn:
    """A session's connection that records the bytes objects written to it; `send` is a C method, so the
    call profile below counts only our own code."""

    transport_name = "websocket"
    remote = "127.0.0.1"

    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.writes: list[bytes] = []
        self.send = self.write = self.writes.append
        self.sink = self

    def close(self, disconnect: Any) -> None:
        pass


async def joined_node(wires: list[Wire]) -> tuple[Node, list[Conn]]:
    node = Node(Settings(history_size=0, presence_topics=()))
    await node.start()
    conns = []
    for index in range(SUBSCRIBERS):
        conn = Conn(wires[index % len(wires)])
        session = node.open_session(Identity(f"u{index}", time.time() + 60), conn, "websocket")
        join: Any = ["1", "1", TOPIC, "phx_join", {}]
        if conn.wire.serializer is V1:
            join = {"join_ref": "1", "ref": "1", "topic": TOPIC, "event": "phx_join", "payload": {}}
        session.receive(orjson.dumps(join).decode())
        conns.append(conn)
    for conn in conns:
        assert len(conn.writes) == 1  # the join reply
        conn.writes.clear()
    return node, conns


async def dispatched(node: Node, conns: list[Conn], broadcasts: list[Broadcast]) -> None:
    for broadcast in broadcasts:
        node.hub.dispatch(broadcast)
    await until(lambda: all(conn.writes for conn in conns), TIMEOUT, "every subscriber written to")


async def test_a_broadcast_is_framed_once_per_wire_and_every_subscriber_gets_the_same_bytes():
    v1, v2 = CountingWire(V1), CountingWire(V2)
    node, conns = await joined_node([v1, v2])
    try:
        v1.built = v2.built = 0
        await dispatched(node, conns, [Broadcast.of(TOPIC, "new_msg", {"text": "hello"})])
        assert (v1.built, v2.built) == (1, 1)  # not 500 each
        for wire in (v1, v2):
            written = {id(conn.writes[0]) for conn in conns if conn.wire is wire}
            assert len(written) == 1  # one bytes object, shared
    finally:
        await node.stop()


async def test_a_burst_on_one_topic_is_one_write_per_subscriber():
    wire = CountingWire(V2)
    node, conns = await joined_node([wire])
    try:
        wire.built = 0
        # As a batch publish, or ten concurrent publishes, arrive: in one turn of the event loop.
        await dispatched(node, conns, [Broadcast.of(TOPIC, "new_msg", {"seq": seq}) for seq in range(10)])
        assert wire.built == 10
        assert all(len(conn.writes) == 1 for conn in conns)  # ten frames, one write: not ten
        assert len({id(conn.writes[0]) for conn in conns}) == 1
        data = conns[0].writes[0]
        assert data.count(b'"new_msg"') == 10 and data.index(b'{"seq":0}') < data.index(b'{"seq":9}')
    finally:
        await node.stop()


async def test_the_per_delivery_path_does_no_json_and_few_calls():
    wire = CountingWire(V2)
    node, conns = await joined_node([wire])
    try:
        await dispatched(node, conns, [Broadcast.of(TOPIC, "new_msg", {"text": "warm"})])
        broadcast = Broadcast.of(TOPIC, "new_msg", {"text": "counted"})
        broadcast.encoded(wire)  # encoding is per broadcast: counted by the tests above, not here
        calls: dict[str, int] = {}

        def profile(frame: Any, event: str, arg: Any) -> None:
            if event == "call":
                name = frame.f_code.co_name
            elif event == "c_call":
                name = f"{getattr(arg, '__module__', None)}.{arg.__qualname__}"
            else:
                return
            calls[name] = calls.get(name, 0) + 1

        node.hub.dispatch(broadcast)
        sys.setprofile(profile)
        try:
            node.hub.flush()
            while node.hub._rotations:  # a topic this big is written a slice per turn: the other slices
                node.hub._advance()
        finally:
            sys.setprofile(None)
        assert all(len(conn.writes) == 2 for conn in conns)
        assert not [name for name in calls if "orjson" in name or "json" in name.lower()], calls
        total = sum(calls.values())
        # deliver + encoded (a cache hit) + the connection's send: three calls a subscriber, plus a
        # few per slice (the rotation, and scheduling the next slice).
        slices = -(-SUBSCRIBERS // SLICE)
        assert total <= 3 * SUBSCRIBERS + 50 + 15 * slices, sorted(calls.items(), key=lambda item: -item[1])[:8]
    finally:
        await node.stop()


# --- a real listening socket, in this process, to see the event loop's own bookkeeping


async def open_socket(port: int, token: str, topic: str) -> Client:
    """A WebSocket joined to `topic`."""
    client = await Client.connect(port, token, timeout=TIMEOUT)
    await client.send_text(orjson.dumps(["1", "1", topic, "phx_join", {}]))
    while (frame := await client.next_json(TIMEOUT))[3] != "phx_reply":  # type: ignore[index]
        pass  # a presence frame, if the topic tracks presence
    assert frame == ["1", "1", topic, "phx_reply", {"status": "ok", "response": {}}], frame
    return client


def pending_timers(loop: asyncio.AbstractEventLoop) -> int:
    return sum(1 for handle in loop._scheduled if not handle.cancelled())  # type: ignore[attr-defined]


async def test_an_open_socket_owns_no_task_and_no_timer():
    settings = Settings(port=0, jwt_secret=JWT_SECRET, service_keys=("k" * 32,), history_size=0)
    runner, port = await application.start(settings)
    loop = asyncio.get_running_loop()
    sockets: list[Client] = []
    try:
        sockets.append(await open_socket(port, make_token(), TOPIC))  # warm: the node's own tasks exist now
        tasks, timers = len(asyncio.all_tasks()), pending_timers(loop)
        for index in range(200):
            sockets.append(await open_socket(port, make_token(f"u{index}"), f"room:lobby:{index % 7}"))
        assert len(asyncio.all_tasks()) - tasks <= 2
        assert pending_timers(loop) - timers <= 2
    finally:
        for sock in sockets:
            sock.close()
        await runner.cleanup()
