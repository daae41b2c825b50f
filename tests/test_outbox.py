"""What a WebSocket's reads answer waits for the end of the loop's pass and then goes out in one write
(push_service/outbox.py): in order, behind nothing and ahead of nothing it should not be, and never
lost to a neighbour's failure. The bytes written are parsed by the `websockets` library's client side."""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest
from websockets.frames import Close, Opcode
from websockets.protocol import Protocol, Side

from fakes import NowhereTransport
from ws_client import TEXT, heartbeat, heartbeat_reply, raw_frame

from push_service.auth import Identity
from push_service.config import Settings
from push_service.connection import Disconnect
from push_service.messages import Broadcast
from push_service.node import Node
from push_service.protocol import V2
from push_service.outbox import Outbox
from push_service.transports.websocket import WIRES, WebSocketProtocol


class RecordingTransport(NowhereTransport):
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)


def frames(data: bytes) -> list[tuple[Opcode, bytes]]:
    client = Protocol(Side.CLIENT, max_size=None)
    client.receive_data(data)
    return [(frame.opcode, frame.data) for frame in client.events_received()]


def messages(data: bytes) -> list[list[object]]:
    return [orjson.loads(payload) for opcode, payload in frames(data) if opcode is Opcode.TEXT]


def join(ref: str, topic: str) -> bytes:
    return raw_frame(TEXT, orjson.dumps([ref, ref, topic, "phx_join", {}]))


@pytest.fixture
async def node():
    node = Node(Settings())
    await node.start()
    yield node
    await node.stop()


def open_socket(node: Node, user: str = "u1") -> tuple[WebSocketProtocol, RecordingTransport]:
    transport = RecordingTransport()
    return WebSocketProtocol(node, transport, WIRES[V2], Identity(user, 2e9)), transport  # type: ignore[arg-type]


async def test_the_reads_of_a_pass_are_answered_at_its_end_one_write_each(node: Node) -> None:
    (first, first_out), (second, second_out) = open_socket(node, "u1"), open_socket(node, "u2")
    first.data_received(join("1", "room:lobby:1"))
    second.data_received(join("1", "room:lobby:2"))
    first.data_received(raw_frame(TEXT, heartbeat("2")))  # a second read of the same socket in the same pass
    assert first_out.writes == [] and second_out.writes == []
    await asyncio.sleep(0)  # the end of the pass
    assert len(first_out.writes) == 1 and len(second_out.writes) == 1
    replies = messages(first_out.writes[0])
    assert [reply[1] for reply in replies] == ["1", "2"]  # in the order the reads came
    assert replies[1] == heartbeat_reply("2")
    assert messages(second_out.writes[0])[0][2:4] == ["room:lobby:2", "phx_reply"]


async def test_a_broadcast_to_a_socket_whose_answer_waits_goes_out_behind_the_answer(node: Node) -> None:
    socket, out = open_socket(node)
    socket.data_received(join("1", "room:lobby:1"))
    node.publish([Broadcast("room:lobby:1", "new_msg", orjson.dumps({"seq": 1}))])
    for _ in range(3):
        await asyncio.sleep(0)
    sent = messages(b"".join(out.writes))
    assert [message[3] for message in sent] == ["phx_reply", "new_msg"]


async def test_eof_behind_a_read_is_answered_before_the_transport_closes(node: Node) -> None:
    socket, out = open_socket(node)
    socket.data_received(raw_frame(TEXT, heartbeat("7")))
    socket.eof_received()  # the transport closes itself once this returns
    assert messages(b"".join(out.writes)) == [heartbeat_reply("7")]
    await asyncio.sleep(0)
    assert len(out.writes) == 1  # the end of the pass has nothing more to write


async def test_a_close_in_the_pass_goes_out_behind_the_answers_in_the_same_write(node: Node) -> None:
    socket, out = open_socket(node)
    socket.data_received(raw_frame(TEXT, heartbeat("3")))
    socket.close(Disconnect(4000, "bye"))
    assert len(out.writes) == 1
    sent = frames(out.writes[0])
    assert orjson.loads(sent[0][1]) == heartbeat_reply("3")
    assert sent[1][0] is Opcode.CLOSE and Close.parse(sent[1][1]) == Close(4000, "bye")
    socket.data_received(raw_frame(TEXT, heartbeat("4")))  # nothing more goes out after a Close
    await asyncio.sleep(0)
    assert len(out.writes) == 1


async def test_a_connection_lost_before_the_end_of_the_pass_drops_only_its_own_answer(node: Node) -> None:
    (gone, gone_out), (staying, staying_out) = open_socket(node, "u1"), open_socket(node, "u2")
    gone.data_received(raw_frame(TEXT, heartbeat("1")))
    staying.data_received(raw_frame(TEXT, heartbeat("1")))
    gone.connection_lost(ConnectionResetError())
    await asyncio.sleep(0)
    assert gone_out.writes == []
    assert messages(b"".join(staying_out.writes)) == [heartbeat_reply("1")]


class Failing:
    def flush(self) -> None:
        raise RuntimeError("boom")


class Counting:
    def __init__(self) -> None:
        self.flushed = 0

    def flush(self) -> None:
        self.flushed += 1


async def test_one_connection_failing_its_flush_does_not_keep_the_others_waiting(
        caplog: pytest.LogCaptureFixture) -> None:
    outbox = Outbox()
    before, after = Counting(), Counting()
    for connection in (before, Failing(), after):
        outbox.add(connection)
    with caplog.at_level(logging.ERROR, logger="push_service.websocket"):
        await asyncio.sleep(0)
    assert (before.flushed, after.flushed) == (1, 1)
    assert [record.message for record in caplog.records] == ["flush failed"]
    outbox.add(before)  # the next pass schedules its own flush
    await asyncio.sleep(0)
    assert before.flushed == 2
