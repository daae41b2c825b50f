"""The broker contract: `publish` and `recover` answer with an awaitable, whatever the broker, and the
memory broker's is already done, so a single node answers a publish or a join in the same loop turn."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from push_service.auth import Identity
from push_service.broker.memory import MemoryBroker
from push_service.broker.nats import NatsBroker
from push_service.broker.redis import RedisBroker
from push_service.broker.redis_cluster import RedisClusterBroker
from push_service.config import Settings
from push_service.messages import Broadcast, Recovery
from push_service.node import Node

from fakes import RecordingConnection

TOPIC = "room:lobby:1"


def _ignore(*args: Any) -> None:
    pass


async def test_the_memory_broker_answers_with_awaitables_already_done():
    delivered: list[Broadcast] = []
    for history_size in (0, 100):
        broker = MemoryBroker(Settings(history_size=history_size))
        await broker.start(delivered.append, _ignore, _ignore)
        broadcast = Broadcast.of(TOPIC, "new_msg", {"n": history_size})
        published = broker.publish([broadcast])
        assert published.done() and delivered[-1] is broadcast  # delivered before the publish returns
        assert await published is None
        recovering = broker.recover(TOPIC, None)
        assert recovering.done()
        recovery = await recovering
        if history_size:
            assert isinstance(recovery, Recovery) and recovery.messages == [broadcast]
        else:
            assert recovery is None  # history is off
        await broker.close()


@pytest.mark.parametrize(("broker_class", "url"), [(RedisBroker, "redis://127.0.0.1:1/0"),
                                                    (RedisClusterBroker, "redis+cluster://127.0.0.1:1"),
                                                    (NatsBroker, "nats://127.0.0.1:1")])
async def test_with_history_off_every_broker_recovers_to_an_awaitable_of_none(broker_class, url):
    # Never started (nothing listens on port 1): with history off, no I/O is needed to say so.
    broker = broker_class(url, "node", None, Settings(history_size=0))
    assert await asyncio.wait_for(broker.recover(TOPIC, None), 1.0) is None


async def test_one_node_answers_a_publish_and_a_join_with_history_at_once_without_a_task():
    node = Node(Settings(history_size=100))
    await node.start()
    try:
        tasks = asyncio.all_tasks()
        conn = RecordingConnection()
        session = node.open_session(Identity("u1", time.time() + 60), conn, "websocket")
        session.receive(orjson.dumps(["1", "1", TOPIC, "phx_join", {"since": None}]).decode())
        assert [frame[3] for frame in conn.frames] == ["phx_reply"]  # the history read answered at once
        delivered, accepted = node.publish([Broadcast.of(TOPIC, "new_msg", {"n": 1})])
        assert delivered == 1 and accepted.done() and await accepted is None
        assert asyncio.all_tasks() == tasks
    finally:
        await node.stop()
