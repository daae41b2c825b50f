"""The WebSocket wire against hostile or unlucky peers, on a real server process: floods of empty
fragments, frames trickling in a byte at a time, a server close racing the client's data, upgrades
asking for a WebSocket version we do not speak."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import aiohttp
import orjson
from websockets.frames import Close, Opcode

from conftest import make_token, read_answer, until
from http_helpers import metric, publish, wait_for_metric
from ws_client import CONT, TEXT, Client, heartbeat, heartbeat_reply, raw_frame, upgrade_head

ATTACK_ROUNDS = 10
# Frames one attacker may send before it must have been cut off: far more than the documented bound.
ATTACK_FRAMES = 400_000
ATTACK_CHUNK = 4_000  # frames per write
EMPTY_CONTINUATION = raw_frame(CONT, b"", fin=False)
BACKLOG_MESSAGES = 40


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def flood_until_cut(server) -> tuple[tuple[int, str], float]:
    """One attacker: a text message started, then empty continuation frames (at most ATTACK_FRAMES)
    until the server closes. Returns the server's (code, reason) and the seconds it took."""
    attacker = await Client.connect(server.port, make_token("attacker"))
    started = time.monotonic()
    closed = asyncio.create_task(attacker.closed_with(timeout=10))
    try:
        await attacker.send_raw(raw_frame(TEXT, b"[", fin=False))
        chunk = EMPTY_CONTINUATION * ATTACK_CHUNK
        for _ in range(ATTACK_FRAMES // ATTACK_CHUNK):
            if closed.done():
                break
            try:
                await attacker.send_raw(chunk)
            except OSError:
                break
            await asyncio.sleep(0)  # let the close be read as soon as it is there
        try:
            code_reason = await asyncio.wait_for(asyncio.shield(closed), 5)
        except TimeoutError:
            raise AssertionError("the server did not cut off a message of empty fragments") from None
        return code_reason, time.monotonic() - started
    finally:
        closed.cancel()
        attacker.close()


async def test_a_flood_of_empty_fragments_is_cut_off_and_does_not_stall_others(server):
    bystander = await Client.connect(server.port, make_token("bystander"))
    pid = server.process.pid
    baseline, baseline_fds = rss_bytes(pid), open_fds(pid)
    round_trips: list[float] = []
    attacking = True

    async def heartbeats() -> None:
        ref = 0
        while attacking:
            ref += 1
            began = time.monotonic()
            await bystander.heartbeat_round_trip(str(ref))
            round_trips.append(time.monotonic() - began)
            await asyncio.sleep(0.005)  # the bystander's pace: it measures round trips, it does not flood

    beating = asyncio.create_task(heartbeats())
    try:
        for _ in range(ATTACK_ROUNDS):
            (code, reason), seconds = await flood_until_cut(server)
            assert (code, reason) == (1009, "message in too many fragments")
            assert seconds < 2.0, seconds
        assert rss_bytes(pid) - baseline < 16 << 20
    finally:
        attacking = False
        await asyncio.wait_for(beating, 10)
    assert len(round_trips) >= 3 and max(round_trips) < 0.5, round_trips
    async with aiohttp.ClientSession() as http:
        assert await metric(http, server, "push_client_errors_total", reason="too_many_fragments") == ATTACK_ROUNDS
        # Back to baseline: only the bystander is left, and it is still served.
        await wait_for_metric(http, server, "push_connections", 1, timeout=5, transport="websocket")
    await until(lambda: open_fds(pid) <= baseline_fds, 5, "the attackers' file descriptors closed")
    await bystander.heartbeat_round_trip("last")
    bystander.close()


async def test_a_big_frame_written_one_byte_at_a_time_is_accepted(server):
    client = await Client.connect(server.port, make_token())
    try:
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        data = raw_frame(TEXT, heartbeat("big", size=16 * 1024))
        for index in range(len(data)):
            await client.send_raw(data[index:index + 1])
        assert await client.next_json() == heartbeat_reply("big")
    finally:
        client.close()


async def test_a_server_close_is_not_lost_to_data_the_client_sent_after_it(server):
    """The server closes (an invalid message) while its earlier frames still wait in its send queue for a
    client that reads slowly, and the client goes on sending: the Close must still reach the client,
    not be discarded with that queue by a TCP reset answering data the server did not read."""
    client = await Client.connect(server.port, make_token(), rcvbuf=4096)
    try:
        await client.send_text(orjson.dumps(["1", "1", "room:lobby:9", "phx_join", {}]))
        assert await client.next_json() == ["1", "1", "room:lobby:9", "phx_reply",
                                            {"status": "ok", "response": {}}]
        async with aiohttp.ClientSession() as http:
            for seq in range(BACKLOG_MESSAGES):  # more than the client's receive window takes
                answer = await publish(http, server, "room:lobby:9", {"seq": seq, "pad": "x" * 8000})
                assert answer["delivered"] == 1
            await client.send_text("this is not a Phoenix message")
            # The server has closed the socket:
            await wait_for_metric(http, server, "push_disconnects_total", 1, timeout=5, reason="invalid message")
        try:
            await client.send_raw(raw_frame(TEXT, heartbeat("after")))
        except OSError:
            pass  # reset by the server already: the Close must still be readable
        seqs = []
        while (frame := await client.next_frame()).opcode is Opcode.TEXT:
            seqs.append(orjson.loads(frame.data)[4]["seq"])
        assert seqs == list(range(BACKLOG_MESSAGES))
        assert frame.opcode is Opcode.CLOSE and Close.parse(frame.data).code == 1007
        await client.wait_eof()
    finally:
        client.close()


# --- Sec-WebSocket-Version other than 13: 426 Upgrade Required (RFC 6455 4.2.2)


async def test_an_unsupported_websocket_version_is_426(server):
    cases = [(version, first) for version in ("8", None, "12, 13") for first in (True, False)]
    for version, first in cases:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            if not first:  # on a kept-alive connection: aiohttp, not the front door, reads this one
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert (await read_answer(reader, 5))[0] == 200
            writer.write(upgrade_head(make_token(), version=version))
            status, headers, body = await read_answer(reader, 5)
            assert status == 426, (version, first, status, body)
            assert headers["sec-websocket-version"] == "13" and headers["upgrade"] == "websocket"
            assert headers["content-type"].startswith("application/json")
            assert "version" in orjson.loads(body)["error"]
        finally:
            writer.close()
    async with aiohttp.ClientSession() as http:
        assert await metric(http, server, "push_connects_refused_total", reason="websocket_version") == len(cases)
        assert await metric(http, server, "push_connections", transport="websocket") == 0


async def test_an_upgrade_whose_key_is_not_ascii_is_400(server):
    """Sec-WebSocket-Key with a byte beyond ASCII: a clear 400, on a connection's first request (front door) and on a
    kept-alive one (aiohttp), not a failure of the server's reading code that drops the connection unanswered."""
    for first in (True, False):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            if not first:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert (await read_answer(reader, 5))[0] == 200
            writer.write(upgrade_head(make_token()).replace(b"Sec-WebSocket-Key: ", b"Sec-WebSocket-Key: \xe9"))
            status, _, body = await read_answer(reader, 5)
            assert status == 400, (first, status, body)
            assert "upgrade" in orjson.loads(body)["error"]
        finally:
            writer.close()
    async with aiohttp.ClientSession() as http:
        assert await metric(http, server, "push_connections", transport="websocket") == 0
