"""The Redis broker's own wire: the RESP2 codec (resp.py), its connections (redis_connection.py),
and what the broker does when Redis misbehaves: stops answering, forgets the publish script,
asks for a password, sends what Redis never would (replies that never end, pushes of a foreign
shape). Against the shared Redis (127.0.0.1:6379), throwaway redis-server processes and fake
servers on loopback; the broker runs in-process, talking to them over real sockets.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import hiredis
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from conftest import until
from brokers import BrokerProcess, free_port, proxy_to, require_binary, require_redis
from push_service.broker import envelope, redis_connection
from push_service.errors import BrokerUnavailable
from push_service.broker.redis import CHANNEL_PREFIX, RedisBroker
from push_service.broker.redis_connection import COMMAND_TIMEOUT, PING_INTERVAL
from push_service.broker.redis_connection import ConnectionLost, RedisConnection, endpoint
from push_service.broker.resp import Parser, ReplyError, RespProtocolError, command
from push_service.config import Settings
from push_service.messages import Broadcast
from push_service.node import Node as PushNode

TIMEOUT = 5.0
# A stalled Redis is given up within a health check or two past COMMAND_TIMEOUT.
GIVE_UP = COMMAND_TIMEOUT + 2 * PING_INTERVAL + 1.0

REPLIES = (b"+OK\r\n:-12\r\n$5\r\nhe\r\nl\r\n$0\r\n\r\n$-1\r\n*-1\r\n*0\r\n"
           b"*3\r\n$7\r\nmessage\r\n$4\r\nch:1\r\n*2\r\n:1\r\n$1\r\nx\r\n-NOSCRIPT No matching script\r\n")
PARSED = [b"OK", -12, b"he\r\nl", b"", None, None, [], [b"message", b"ch:1", [1, b"x"]]]
MiB = 1024 * 1024
# What one reply may hold, as resp.py documents it: its bytes, and of those what is already parsed into
# array elements (many small elements weigh about 20 times their bytes once they are Python objects).
REPLY_BOUND, PARSED_BOUND = 64 * MiB, 1 * MiB
PIECE = 256 * 1024  # the most an asyncio transport hands over in one read
NESTED_TOO_DEEP = b"*1\r\n" * 100_000 + b":1\r\n"


# --- RESP2 without I/O


def test_replies_parse_the_same_whole_or_byte_by_byte() -> None:
    whole = Parser().feed(REPLIES)
    parser, pieces = Parser(), []
    for index in range(len(REPLIES)):
        pieces += parser.feed(REPLIES[index:index + 1])
    for replies in (whole, pieces):
        assert replies[:-1] == PARSED
        error = replies[-1]
        assert isinstance(error, ReplyError) and error.code == "NOSCRIPT" and str(error).endswith("matching script")


def test_a_reply_cut_short_waits_for_the_rest() -> None:
    parser = Parser()
    assert parser.feed(b"*2\r\n$3\r\nabc\r\n$3\r\nde") == []
    assert parser.feed(b"f\r\n+OK") == [[b"abc", b"def"]]
    assert parser.feed(b"\r\n") == [b"OK"]


# b"$3\r\nabcdef\r\n": a bulk string's length that lies is found at the next reply ("f" is no type byte).
@pytest.mark.parametrize("data", [b"?what\r\n", b"$x\r\n", b":1.5\r\n", b"$3\r\nabcdef\r\n", b"*1\r\n!\r\n",
                                  pytest.param(NESTED_TOO_DEEP, id="arrays-nested-100000-deep")])
def test_what_is_not_resp2_is_refused(data: bytes) -> None:
    with pytest.raises(RespProtocolError):
        Parser().feed(data)


@pytest.mark.parametrize("head, element, bound", [
    (b"$1000000000\r\n", b"x", REPLY_BOUND),  # a bulk string announcing 1 GB
    (b"*100000000\r\n", b"*0\r\n", PARSED_BOUND),  # an array of 100 million empty arrays
], ids=["endless-bulk-string", "huge-array"])
def test_a_reply_that_never_ends_is_refused_once_past_its_bound(head: bytes, element: bytes, bound: int) -> None:
    parser, fed = Parser(), 0
    parser.feed(head)
    piece = element * (PIECE // len(element))
    with pytest.raises(RespProtocolError, match="too large"):
        while fed < bound + 4 * PIECE:
            parser.feed(piece)
            fed += len(piece)
    assert fed <= bound + PIECE  # past the bound by at most one read


def test_large_replies_within_the_bound_and_endless_streams_of_small_ones_parse() -> None:
    payload = os.urandom(32 * MiB)
    message = b"*3\r\n$7\r\nmessage\r\n$4\r\nch:1\r\n$%d\r\n%b\r\n" % (len(payload), payload)
    parser, replies = Parser(), []
    baseline = rss()
    for start in range(0, len(message), PIECE):
        replies += parser.feed(message[start:start + PIECE])
    assert len(replies) == 1 and replies[0][2] == payload
    del replies
    assert parser.feed(b"+PONG\r\n") == [b"PONG"]
    assert rss() - baseline < 8 * MiB  # the buffer that held the large reply is given back at the next read
    small = b"*3\r\n$7\r\nmessage\r\n$4\r\nch:1\r\n$50\r\n%b\r\n" % (b"y" * 50)
    stream = small * (4 * PARSED_BOUND // len(small))  # many times the bound, in replies under it
    count = 0
    for start in range(0, len(stream), PIECE):
        count += len(parser.feed(stream[start:start + PIECE]))
    assert count == len(stream) // len(small)


def test_commands_are_arrays_of_bulk_strings() -> None:
    assert command("SET", b"k\r\n", 5, 1.5) == b"*4\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$1\r\n5\r\n$3\r\n1.5\r\n"
    assert Parser().feed(command("PING", b"")) == [[b"PING", b""]]


def test_the_url_is_read_as_redis_py_reads_it() -> None:
    plain = endpoint("redis://u:secret@example.test:6380/3")
    assert (plain.host, plain.port, plain.db, plain.username, plain.password, plain.tls) == (
        "example.test", 6380, 3, "u", "secret", None)
    tls = endpoint("rediss://example.test?ssl_cert_reqs=none")
    assert tls.tls is not None and not tls.tls.check_hostname and (tls.port, tls.db) == (6379, 0)


# --- connections, against a real Redis


async def test_calls_are_answered_in_order_and_an_error_fails_only_its_own_call() -> None:
    url = require_redis()
    key = f"push-test:{uuid.uuid4().hex}"
    connection = await RedisConnection.open(endpoint(url), TIMEOUT)
    try:
        value = b"binary \r\n\x00 value"
        calls = [connection.call([("SET", key, value), ("GET", key)]),
                 connection.call([("INCR", key), ("GET", key)]),  # INCR of a non-number: an error reply
                 connection.call([("APPEND", key, b"!")])]
        first, second, third = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), TIMEOUT)
        assert first == value
        assert isinstance(second, ReplyError) and second.code == "ERR"
        assert third == len(value) + 1  # the connection stayed in step after the error
    finally:
        connection.close()
        await connection.lost
        await _delete(url, key)


async def test_pub_sub_pushes_reach_the_callback_in_order() -> None:
    url = require_redis()
    channel = f"push-test:{uuid.uuid4().hex}"
    pushes: list[Any] = []
    arrived = asyncio.Event()

    def heard(reply: Any) -> None:
        pushes.append(reply)
        if reply[0] == b"message" and reply[2] == b"last":
            arrived.set()

    listener = await RedisConnection.open(endpoint(url), TIMEOUT, heard)
    publisher = await RedisConnection.open(endpoint(url), TIMEOUT)
    try:
        listener.send("SUBSCRIBE", channel)
        await until(lambda: pushes, TIMEOUT, "the subscription confirmed")
        assert pushes == [[b"subscribe", channel.encode(), 1]]
        await publisher.call([("PUBLISH", channel, str(n)) for n in range(100)] + [("PUBLISH", channel, "last")])
        await asyncio.wait_for(arrived.wait(), TIMEOUT)
        assert [push[2] for push in pushes[1:]] == [str(n).encode() for n in range(100)] + [b"last"]
    finally:
        for connection in (listener, publisher):
            connection.close()


async def test_a_lost_connection_fails_what_waits_and_what_comes_after() -> None:
    async with silent_server() as port:
        opening = asyncio.create_task(RedisConnection.open(endpoint(f"redis://127.0.0.1:{port}/0"), 0.5, name="x"))
        with pytest.raises((TimeoutError, asyncio.TimeoutError)):
            await opening  # CLIENT SETNAME is never answered
    url = require_redis()
    connection = await RedisConnection.open(endpoint(url), TIMEOUT)
    blocked = connection.call([("BLPOP", f"push-test:{uuid.uuid4().hex}", 0)])  # waits forever
    await asyncio.sleep(0)  # written at the end of the loop turn
    assert not connection.stalled(asyncio.get_running_loop().time(), 60)
    assert connection.stalled(asyncio.get_running_loop().time() + 61, 60)
    connection.close()
    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(blocked, TIMEOUT)
    with pytest.raises(ConnectionLost):
        await connection.call([("PING",)])


@pytest.mark.parametrize("answer", [pytest.param(b"HTTP/1.1 400 Bad Request\r\n\r\n", id="http"),
                                    pytest.param(NESTED_TOO_DEEP, id="arrays-nested-100000-deep")])
async def test_a_server_that_does_not_speak_resp2_fails_what_waits_and_says_why(answer: bytes) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(answer)
        with contextlib.suppress(ConnectionError):  # reset by the client that gives up
            await reader.read()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    try:
        connection = await RedisConnection.open(endpoint(f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"),
                                                TIMEOUT)
        with pytest.raises(ConnectionLost, match="not RESP2"):
            await asyncio.wait_for(connection.call([("PING",)]), TIMEOUT)
        await asyncio.wait_for(connection.lost, TIMEOUT)
    finally:
        server.close()


async def test_a_server_that_answers_more_than_was_asked_is_given_up(caplog: pytest.LogCaptureFixture) -> None:
    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(b"+OK\r\n+OK\r\n")  # two answers to one command
        with contextlib.suppress(ConnectionError):
            await reader.read()

    server = await asyncio.start_server(chatty, "127.0.0.1", 0)
    given_up_before = redis_connection.PROTOCOL_ERRORS["unasked_reply"]
    try:
        connection = await RedisConnection.open(endpoint(f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"),
                                                TIMEOUT)
        with caplog.at_level(logging.WARNING, "push_service.broker"):
            assert await asyncio.wait_for(connection.call([("PING",)]), TIMEOUT) == b"OK"
            await asyncio.wait_for(connection.lost, TIMEOUT)
        with pytest.raises(ConnectionLost):
            await connection.call([("PING",)])
        assert redis_connection.PROTOCOL_ERRORS["unasked_reply"] == given_up_before + 1
        [line] = [record for record in caplog.records if getattr(record, "event", None) == "broker_protocol_error"]
        assert line.error == "redis answered a command never sent"  # type: ignore[attr-defined]
        # ... and a Redis node's /metrics says so.
        node = PushNode(Settings(broker="redis://127.0.0.1:1/0", service_keys=("k",), jwt_secret="s" * 32))
        exposed = {sample.labels["reason"]: sample.value
                   for family in text_string_to_metric_families(node.metrics.render().decode())
                   if family.name == "push_broker_protocol_errors" for sample in family.samples}
        assert exposed["unasked_reply"] == given_up_before + 1
        assert exposed["reply_too_large"] == redis_connection.PROTOCOL_ERRORS["reply_too_large"]
    finally:
        server.close()


# weight: the memory a byte of the reply takes while it is held (an empty array: a list object of 80 bytes)
@pytest.mark.parametrize("head, element, bound, weight", [
    (b"$1000000000\r\n", b"x", REPLY_BOUND, 1),  # a bulk string announcing 1 GB
    (b"*100000000\r\n", b"*0\r\n", PARSED_BOUND, 20),  # 100 million elements, each an empty array
    (b"*4294967295\r\n", b":1\r\n", PARSED_BOUND, 20),  # more elements than memory holds pointers for, here
], ids=["endless-bulk-string", "huge-array", "array-larger-than-memory"])
async def test_a_reply_that_never_ends_gives_the_connection_up_at_its_bound(
        head: bytes, element: bytes, bound: int, weight: int, caplog: pytest.LogCaptureFixture) -> None:
    slack = 24 * MiB  # a read, a chunk of the fake, and what the loopback's kernel buffers hold
    endless = EndlessReply(head, element, cap=bound + 2 * slack)
    server = await asyncio.start_server(endless, "127.0.0.1", 0)
    given_up_before = redis_connection.PROTOCOL_ERRORS["reply_too_large"]
    try:
        baseline, fds = rss(), len(os.listdir("/proc/self/fd"))
        connection = await RedisConnection.open(endpoint(f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"),
                                                TIMEOUT)
        connection._parser = endless.measured(connection._parser)  # type: ignore[assignment]
        with caplog.at_level(logging.WARNING, "push_service.broker"):
            with pytest.raises(ConnectionLost, match="too large"):
                await asyncio.wait_for(connection.call([("GET", "k")]), 20.0)
        assert endless.sent <= bound + slack, f"{endless.sent / MiB:.0f} MiB sent before the connection was given up"
        assert endless.peak_rss - baseline <= (bound + PIECE) * weight + 8 * MiB, (
            f"RSS grew {(endless.peak_rss - baseline) / MiB:.0f} MiB")
        await until(lambda: rss() - baseline < 16 * MiB, TIMEOUT, "the memory back (the connection still referenced)")
        await until(lambda: len(os.listdir("/proc/self/fd")) <= fds, TIMEOUT, "both ends' sockets closed")
        assert redis_connection.PROTOCOL_ERRORS["reply_too_large"] == given_up_before + 1
        [line] = [record for record in caplog.records if getattr(record, "event", None) == "broker_protocol_error"]
        assert "too large" in line.error  # type: ignore[attr-defined]
        assert connection.lost.done()
    finally:
        server.close()


# --- the broker when Redis misbehaves


@pytest.mark.slow
async def test_a_redis_that_stops_answering_fails_publishes_and_is_reconnected() -> None:
    require_redis()
    async with proxy_to(6379) as proxy:
        broker, node = await started_broker(f"redis://127.0.0.1:{proxy.port}/0")
        try:
            topic = f"room:lobby:{uuid.uuid4().hex}"
            await subscribed(broker, node, topic)
            await broker.publish([Broadcast.of(topic, "new_msg", {"n": 1})])
            await until(lambda: node.heard, TIMEOUT, "the first broadcast heard")

            proxy.frozen = True
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable):
                await asyncio.wait_for(broker.publish([Broadcast.of(topic, "new_msg", {"n": 2})]), GIVE_UP)
            assert time.monotonic() - started < GIVE_UP
            assert not broker.ready
            with pytest.raises(BrokerUnavailable):
                broker.publish([Broadcast.of(topic, "new_msg", {"n": 3})])  # refused at once meanwhile

            proxy.frozen = False
            await until(lambda: broker.ready, 10.0, "the broker ready again")
            await subscribed(broker, node, topic)
            await broker.publish([Broadcast.of(topic, "new_msg", {"n": 4})])
            await until(lambda: len(node.heard) == 2, TIMEOUT, "the broadcast after the reconnect heard")
            assert [item.payload_json for item in node.heard] == [b'{"n":1}', b'{"n":4}']
        finally:
            await broker.close()


async def test_a_push_the_broker_cannot_use_is_dropped_and_the_rest_of_the_read_delivered(
        caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeRedis()
    server = await asyncio.start_server(fake, "127.0.0.1", 0)
    dropped_before = redis_connection.PROTOCOL_ERRORS["bad_push"]
    broker, node = await started_broker(f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0")
    try:
        topic = f"room:lobby:{uuid.uuid4().hex}"
        await subscribed(broker, node, topic)
        channel = (CHANNEL_PREFIX + topic).encode()
        good = envelope.pack_broadcast(Broadcast.of(topic, "new_msg", {"n": 1}))
        with caplog.at_level(logging.WARNING, "push_service.broker"):
            fake.push([b"message", channel], [b"message", channel, 7], [b"message", channel, good])  # one write
            await until(lambda: node.heard, TIMEOUT, "the message after the two bad ones heard")
        assert [item.payload_json for item in node.heard] == [b'{"n":1}']
        assert broker.ready and fake.connections == 2  # nothing reconnected
        assert redis_connection.PROTOCOL_ERRORS["bad_push"] == dropped_before + 2
        lines = [record for record in caplog.records if getattr(record, "event", None) == "broker_bad_push"]
        assert [line.error for line in lines] == [  # type: ignore[attr-defined]
            "IndexError: list index out of range", "TypeError: 'int' object is not subscriptable"]
    finally:
        await broker.close()
        server.close()


async def test_a_flushed_publish_script_fails_one_publish_and_is_loaded_again() -> None:
    url = require_redis()
    broker, node = await started_broker(url, history_size=10)
    admin = aioredis.from_url(url)
    topic = f"room:lobby:{uuid.uuid4().hex}"
    try:
        await subscribed(broker, node, topic)
        await broker.publish([Broadcast.of(topic, "new_msg", {"n": 1})])
        await admin.script_flush()
        with pytest.raises(BrokerUnavailable, match="NOSCRIPT"):
            await broker.publish([Broadcast.of(topic, "new_msg", {"n": 2})])
        await broker.publish([Broadcast.of(topic, "new_msg", {"n": 3})])
        await until(lambda: len(node.heard) == 2, TIMEOUT, "both accepted broadcasts heard")
        assert [(item.payload_json, str(item.position).split("~")[1]) for item in node.heard] == [
            (b'{"n":1}', "1"), (b'{"n":3}', "2")]  # the refused one took no position
        assert broker.ready
    finally:
        await broker.close()
        await admin.delete(f"push:{{{topic}}}:meta", f"push:{{{topic}}}:history")
        await admin.aclose()


async def test_a_password_and_a_database_from_the_url_are_used_and_client_may_be_refused(tmp_path: Path) -> None:
    port = free_port()
    # A locked-down Redis: a password, and no CLIENT command (the broker names its connections where it may).
    server = await BrokerProcess([require_binary("redis-server"), "--bind", "127.0.0.1", "--port", str(port),
                                  "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
                                  "--requirepass", "s3cret", "--rename-command", "CLIENT", '""'],
                                 "Ready to accept connections", port).start()
    try:
        with pytest.raises(ConnectionError, match="WRONGPASS|invalid password"):
            await RedisConnection.open(endpoint(f"redis://:wrong@127.0.0.1:{port}/0"), TIMEOUT)
        broker, node = await started_broker(f"redis://:s3cret@127.0.0.1:{port}/5", history_size=10)
        topic = f"room:lobby:{uuid.uuid4().hex}"
        try:
            await subscribed(broker, node, topic)
            await broker.publish([Broadcast.of(topic, "new_msg", {"n": 1})])
            await until(lambda: node.heard, TIMEOUT, "the broadcast heard")
            admin = aioredis.from_url(f"redis://:s3cret@127.0.0.1:{port}/5")
            assert await admin.exists(f"push:{{{topic}}}:history") == 1  # the history went to database 5
            await admin.aclose()
        finally:
            await broker.close()
    finally:
        await server.kill()


# --- helpers


class Node:
    """What a node gives its broker: where broadcasts go, and which subscriptions are confirmed."""

    def __init__(self) -> None:
        self.heard: list[Broadcast] = []
        self.confirmed: dict[str, asyncio.Event] = collections.defaultdict(asyncio.Event)

    def confirm(self, topic: str) -> None:
        self.confirmed[topic].set()


async def started_broker(url: str, history_size: int = 0) -> tuple[RedisBroker, Node]:
    node = Node()
    broker = RedisBroker(url, f"test-{uuid.uuid4().hex[:8]}", settings=Settings(history_size=history_size))
    await broker.start(node.heard.append, node.confirm, lambda topic, data: None)
    assert broker.ready, "the broker connected"
    return broker, node


async def subscribed(broker: RedisBroker, node: Node, topic: str) -> None:
    node.confirmed[topic].clear()
    if not broker.subscribe(topic):
        await asyncio.wait_for(node.confirmed[topic].wait(), TIMEOUT)


async def _delete(url: str, *keys: str) -> None:
    client = aioredis.from_url(url)
    await client.delete(*keys)
    await client.aclose()


def resp_array(items: list[bytes | int]) -> bytes:
    return b"*%d\r\n" % len(items) + b"".join(
        b":%d\r\n" % item if isinstance(item, int) else b"$%d\r\n%b\r\n" % (len(item), item) for item in items)


class FakeRedis:
    """Just enough of Redis for a RedisBroker without history: CLIENT SETNAME, SUBSCRIBE and PING
    answered; `push` writes pub/sub replies of its own to the last connection that subscribed."""

    def __init__(self) -> None:
        self.connections = 0
        self._pubsub: asyncio.StreamWriter | None = None

    def push(self, *replies: list[bytes | int]) -> None:
        assert self._pubsub is not None
        self._pubsub.write(b"".join(resp_array(reply) for reply in replies))

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        commands = hiredis.Reader()  # a command is an array of bulk strings: a reply to hiredis
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                commands.feed(data)
                while (command := commands.gets()) is not False:
                    name = command[0].upper()
                    if name == b"SUBSCRIBE":
                        self._pubsub = writer
                        writer.write(b"".join(resp_array([b"subscribe", channel, 1]) for channel in command[1:]))
                    elif name == b"PING":
                        writer.write(resp_array([b"pong", b""]))
                    else:
                        writer.write(b"+OK\r\n")
        writer.close()


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MeasuredParser:
    """A connection's parser, and the process's RSS noted after each read it takes."""

    def __init__(self, parser: Parser, endless: EndlessReply) -> None:
        self.parser, self.endless = parser, endless

    def feed(self, data: bytes) -> list[Any]:
        try:
            return self.parser.feed(data)
        finally:
            self.endless.peak_rss = max(self.endless.peak_rss, rss())


class EndlessReply:
    """A fake Redis: it answers the first command with `head`, then sends `element` over and over, a MiB
    at a time, until the client goes away or `cap` bytes are out. It notes what it sent, and the peak
    RSS of this process after each read of a client whose parser it `measured`."""

    def __init__(self, head: bytes, element: bytes, cap: int) -> None:
        self.head, self.cap = head, cap
        self.chunk = element * (MiB // len(element))
        self.sent = 0
        self.peak_rss = rss()

    def measured(self, parser: Parser) -> MeasuredParser:
        return MeasuredParser(parser, self)

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(1)
            writer.write(self.head)
            while self.sent < self.cap:
                writer.write(self.chunk)
                await writer.drain()
                self.sent += len(self.chunk)
            await reader.read()
        except ConnectionError:
            pass  # the client gave up
        finally:
            writer.close()


class _Silent:
    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads everything, answers nothing
        writer.close()


@asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    server = await asyncio.start_server(_Silent(), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
