"""What the NATS broker puts on the wire when it publishes: an accepted publish is one the NATS
server has taken. The broker waits for a PONG after its messages; the PING must follow them on the
wire, or the PONG vouches for nothing (nats-py writes a PING at once but its publishes from a
buffer, later). The broker runs in-process and talks to the shared NATS (127.0.0.1:4222) through
a proxy that records every byte it sends.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from brokers import Proxy, proxy_to, require_nats
from push_service.errors import BrokerUnavailable
from push_service.broker.nats import NatsBroker, subject_for
from push_service.config import Settings
from push_service.messages import Broadcast

TIMEOUT = 5.0


@asynccontextmanager
async def broker_behind_proxy() -> AsyncIterator[tuple[NatsBroker, Proxy]]:
    """A started NatsBroker whose connection to the shared NATS goes through a Proxy."""
    require_nats()
    async with proxy_to(4222) as proxy:
        broker = NatsBroker(f"nats://127.0.0.1:{proxy.port}", f"test-{uuid.uuid4().hex[:8]}",
                            settings=Settings(history_size=0))
        await broker.start(lambda broadcast: None, lambda topic: None, lambda topic, data: None)
        try:
            assert broker.ready, "the broker connected"
            yield broker, proxy
        finally:
            proxy.frozen = False
            await broker.close()


def sent_before_last_ping(sent: bytes, subject: str) -> int:
    """How many PUBs to `subject` the client wrote before its last PING."""
    before = sent[:sent.rfind(b"PING\r\n")]
    return before.count(f"PUB {subject} ".encode())


async def test_a_publish_is_answered_only_after_a_ping_that_follows_its_messages() -> None:
    async with broker_behind_proxy() as (broker, proxy):
        topic = f"room:lobby:{uuid.uuid4().hex}"
        subject = subject_for(topic)
        await asyncio.wait_for(broker.publish([Broadcast.of(topic, "new_msg", {"n": 1})]), TIMEOUT)
        assert sent_before_last_ping(bytes(proxy.sent), subject) == 1

        # Publishes of one loop turn share one PING, written after all of their messages.
        pings = bytes(proxy.sent).count(b"PING\r\n")
        batch = [broker.publish([Broadcast.of(topic, "new_msg", {"n": n}) for n in range(k, k + 3)])
                 for k in range(2, 32, 3)]
        await asyncio.wait_for(asyncio.gather(*batch), TIMEOUT)
        sent = bytes(proxy.sent)
        assert sent_before_last_ping(sent, subject) == 31
        assert sent.count(b"PING\r\n") - pings < len(batch)  # fewer PINGs than publishes


@pytest.mark.slow
async def test_a_nats_that_stops_answering_fails_the_publish() -> None:
    async with broker_behind_proxy() as (broker, proxy):
        proxy.frozen = True
        with pytest.raises(BrokerUnavailable):
            await asyncio.wait_for(broker.publish([Broadcast.of("room:lobby:x", "new_msg", {"n": 1})]), TIMEOUT)
