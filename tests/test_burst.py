"""A burst to a big room while delivery is behind (PUSH_MAX_DELIVERY_LAG): publishes are refused with
503 and Retry-After, counted, and everything accepted still reaches every subscriber once, in order."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from conftest import PUBLISH_KEY, make_token, read_answer, until
from ws_client import Client

from push_service.hub import Hub
from push_service.messages import Broadcast, Run

pytestmark = pytest.mark.alone  # the server's delivery pace decides what it refuses

TOPIC = "room:lobby:burst"
SUBSCRIBERS = 1500  # 15 slices of the hub's rotation: a pass lasts several loop turns
PUBLISHERS = 4
TIMEOUT = 10.0


def publish_request(seq: int, publisher: int) -> bytes:
    body = orjson.dumps({"topic": TOPIC, "event": "m", "payload": {"p": publisher, "seq": seq}})
    return (f"POST /api/broadcast HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {PUBLISH_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def join(port: int, index: int) -> Client:
    client = await Client.connect(port, make_token(f"s{index}"))
    await client.send_text(orjson.dumps(["1", "1", TOPIC, "phx_join", {}]))
    reply = await client.next_json()
    assert reply[3] == "phx_reply" and reply[4]["status"] == "ok", reply  # type: ignore[index]
    return client


class Publisher:
    """One backend: a keep-alive connection, one publish in flight, the next sent once it is answered
    (a refused one at once too, to keep the backlog up), until it has seen both answers."""

    def __init__(self, port: int, number: int, via_aiohttp: bool) -> None:
        self.port, self.number, self.via_aiohttp = port, number, via_aiohttp
        self.accepted: list[int] = []
        self.refusals: list[tuple[dict[str, str], bytes]] = []

    async def run(self, deadline: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            if self.via_aiohttp:  # a connection whose first request is not a publish is aiohttp's
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
                assert (await read_answer(reader, TIMEOUT))[0] == 200
            seq = 0
            while (len(self.accepted) < 20 or not self.refusals) and time.monotonic() < deadline:
                seq += 1
                writer.write(publish_request(seq, self.number))
                status, headers, body = await read_answer(reader, TIMEOUT)
                if status == 200:
                    self.accepted.append(seq)
                else:
                    assert status == 503, (status, body)
                    self.refusals.append((headers, body))
        finally:
            writer.close()


async def refused_total(port: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET /metrics HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {PUBLISH_KEY}\r\n\r\n".encode())
        status, _, body = await read_answer(reader, TIMEOUT)
        assert status == 200
    finally:
        writer.close()
    for line in body.decode().splitlines():
        if line.startswith('push_publish_refused_total{reason="lag"}'):
            return float(line.split()[-1])
    raise AssertionError("push_publish_refused_total{reason=\"lag\"} is not exported")


class Counter:
    """A subscriber that only counts its writes."""

    writes = 0

    def deliver(self, broadcast: Broadcast | Run) -> None:
        Counter.writes += 1


async def test_the_hub_reports_a_lag_only_while_a_rotation_has_work_left():
    Counter.writes = 0
    hub = Hub(slice_size=10)
    for _ in range(1000):
        hub.subscribe(TOPIC, Counter())
    assert hub.lag() == 0.0
    hub.dispatch(Broadcast(TOPIC, "m", b"{}"))
    await asyncio.sleep(0)  # the flush: the first slice of 10 is written
    assert Counter.writes == 10
    time.sleep(0.02)  # the loop stalls: 990 writes left at 10 per 20 ms is 2 s more
    lag = hub.lag()
    assert lag > 2.0
    assert hub.lag() == lag  # worked out once until the rotation moves on, however many publishes ask
    async with asyncio.timeout(TIMEOUT):
        while hub.rotating(TOPIC):
            await asyncio.sleep(0)
    assert hub.lag() == 0.0


@pytest.mark.slow
async def test_a_burst_past_the_delivery_lag_is_refused_and_everything_accepted_arrives(start_server):
    # 1 ms: any publish that comes while a pass over the room is under way finds delivery behind.
    server = await start_server(PUSH_MAX_DELIVERY_LAG="1ms")
    clients: list[Client] = []
    for start in range(0, SUBSCRIBERS, 100):
        clients += await asyncio.gather(*(join(server.port, index) for index in range(start, start + 100)))
    assert await refused_total(server.port) == 0

    publishers = [Publisher(server.port, number, via_aiohttp=number == 0) for number in range(PUBLISHERS)]
    deadline = time.monotonic() + 15
    await asyncio.gather(*(publisher.run(deadline) for publisher in publishers))

    for publisher in publishers:
        assert publisher.refusals, f"publisher {publisher.number} was never refused"
        assert publisher.accepted, f"publisher {publisher.number} never got a publish accepted"
        for headers, body in publisher.refusals:
            assert int(headers["retry-after"]) >= 1, headers
            assert "PUSH_MAX_DELIVERY_LAG" in orjson.loads(body)["error"], body
    refusals = sum(len(publisher.refusals) for publisher in publishers)
    assert await refused_total(server.port) == refusals

    # Once the backlog has drained, a publish is accepted again (it is the last thing everyone gets).
    last = Publisher(server.port, PUBLISHERS, via_aiohttp=False)

    async def accepted_again() -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(publish_request(len(last.accepted) + 1, last.number))
            status, _, _ = await read_answer(reader, TIMEOUT)
        finally:
            writer.close()
        if status == 200:
            last.accepted.append(len(last.accepted) + 1)
        return status == 200

    await until(accepted_again, TIMEOUT, "a publish accepted once the backlog drained")
    publishers.append(last)
    expected = {publisher.number: publisher.accepted for publisher in publishers}

    async def received(client: Client) -> dict[int, list[int]]:
        got: dict[int, list[int]] = {number: [] for number in expected}
        while got[last.number] != last.accepted:
            message = orjson.loads((await client.next_frame(TIMEOUT)).data)
            assert message[2:4] == [TOPIC, "m"], message
            got[message[4]["p"]].append(message[4]["seq"])
        return got

    for start in range(0, SUBSCRIBERS, 100):
        batch = clients[start:start + 100]
        for got in await asyncio.gather(*(received(client) for client in batch)):
            assert got == expected  # every accepted message once, in each publisher's order, none refused
    for client in clients:
        client.close()
