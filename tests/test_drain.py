"""Graceful drain on SIGTERM, against the real server process and a crowd of official phoenix.js clients.

`node tests/js/many.mjs` runs the crowd (500 phoenix 1.8 Sockets in one Node process, each its own
connection and reconnect timer); a publisher keeps POSTing numbered messages through the drain.
What a replica owes its clients and backends when Kubernetes stops it:
  - every publish answered 200 reached every client (nothing accepted is lost), and what was refused
    (503, "node is draining; retry on another replica") reached nobody, so a backend retry never duplicates;
  - /readyz and new WebSocket upgrades answer 503 from the start of the drain;
  - each socket is closed with 1012 "service restart" (phoenix.js reconnects; no phx_close, which would
    make it drop the channel), in batches spread over PUSH_DRAIN_SECONDS;
  - the process then exits 0.
Setup: `npm ci --prefix tests/js`.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from calendar import timegm
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from conftest import PUBLISH_KEY, ServerProcess, make_token

pytestmark = pytest.mark.slow  # hundreds of phoenix.js clients drained

JS_DIR = Path(__file__).resolve().parent / "js"
MANY = JS_DIR / "many.mjs"
CLIENTS = 500
TOPIC = "room:lobby:drain"
RETRY_MS = 250  # the crowd's reconnectAfterMs: closed clients come back during the drain and are refused
READY_TIMEOUT = 30.0  # 500 connects and joins (about 0.6 s here)
TIMEOUT = 5.0
PACE = 0.02  # the publisher's interval: about 50 publishes a second, each to 500 sockets
ACCEPTED_BEFORE_SIGTERM = 20
EXIT_BOUND = 3.0  # seconds beyond PUSH_DRAIN_SECONDS for the process to exit
# How much longer than PUSH_DRAIN_SECONDS the closing may take: each of the 30 batches is followed by a
# 0.1 s sleep, which runs late while the loop also refuses the crowd's reconnects (measured: 3.4-3.6 s for 3 s).
DRAIN_MARGIN = 1.5
DRAINING = {"error": "node is draining; retry on another replica"}

Event = dict[str, Any]


class Crowd:
    """A running many.mjs, its stdout read in the background."""

    def __init__(self, process: asyncio.subprocess.Process, count: int) -> None:
        self.process = process
        self.count = count
        self.ready: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self.all_closed = asyncio.Event()
        self.summary: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self.messages: dict[int, list[int]] = {i: [] for i in range(count)}
        self.first_close: dict[int, Event] = {}  # each client's close while it was connected
        self.connected_closes: list[Event] = []  # every close of an open connection (one per client expected)
        self.other: list[Event] = []  # join_failed, rejoined, channel_close, phx_close_frame
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            event = orjson.loads(line)
            kind = event["event"]
            if kind == "msg":
                self.messages[event["i"]].append(event["n"])
            elif kind == "close":
                if event["connected"]:
                    self.connected_closes.append(event)
                    self.first_close.setdefault(event["i"], event)
                    if len(self.first_close) == self.count:
                        self.all_closed.set()
            elif kind == "ready":
                self.ready.set_result(event)
            elif kind == "summary":
                self.summary.set_result(event)
            else:
                self.other.append(event)
        for future in (self.ready, self.summary):
            if not future.done():
                assert self.process.stderr is not None
                stderr = (await self.process.stderr.read()).decode()
                future.set_exception(AssertionError(f"many.mjs exited ({await self.process.wait()}): {stderr}"))

    async def finish(self) -> Event:
        """Close its stdin: it prints its summary and exits."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        summary = await asyncio.wait_for(self.summary, TIMEOUT)
        await asyncio.wait_for(self.process.wait(), TIMEOUT)
        await asyncio.wait_for(self.reader, TIMEOUT)
        return summary


@pytest.fixture
def crowd() -> Callable[..., Any]:
    """Factory: `async with crowd(server, 500) as clients:` runs tests/js/many.mjs against the server."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: these tests need Node 20 and `npm ci --prefix tests/js`")
    if not (JS_DIR / "node_modules").is_dir():
        pytest.fail(f"{JS_DIR / 'node_modules'} is missing: run `npm ci --prefix tests/js` first")

    @asynccontextmanager
    async def start(server: ServerProcess, count: int) -> AsyncIterator[Crowd]:
        process = await asyncio.create_subprocess_exec(
            node, str(MANY), f"ws://127.0.0.1:{server.port}/socket", "--count", str(count),
            "--token", make_token("drain"), "--topic", TOPIC, "--retry-ms", str(RETRY_MS),
            cwd=JS_DIR, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        clients = Crowd(process, count)
        try:
            yield clients
        finally:
            if process.returncode is None:
                process.kill()
            await process.wait()
            clients.reader.cancel()

    return start


@dataclass
class Answer:
    n: int
    sent: float  # wall clock, as the server's log times and the crowd's close times
    answered: float
    status: int | None  # None: no HTTP answer (the server had stopped listening)
    body: Any


class Publisher:
    """POSTs {"n": 1, 2, ...} to the crowd's topic, one at a time, every PACE seconds, until stopped
    or until the server stops listening."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.answers: list[Answer] = []
        self.accepted_enough = asyncio.Event()
        self.refused = asyncio.Event()
        self.stopping = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        url = f"{self.server.http_url}/api/broadcast"
        headers = {"Authorization": f"Bearer {PUBLISH_KEY}"}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as http:
            n = 0
            while not self.stopping.is_set():
                n += 1
                sent = time.time()
                try:
                    async with http.post(url, json={"topic": TOPIC, "event": "new_msg", "payload": {"n": n}},
                                         headers=headers) as response:
                        answer = Answer(n, sent, time.time(), response.status, await response.json())
                except (aiohttp.ClientConnectionError, asyncio.TimeoutError):
                    self.answers.append(Answer(n, sent, time.time(), None, None))
                    return  # the server is gone
                self.answers.append(answer)
                if sum(a.status == 200 for a in self.answers) >= ACCEPTED_BEFORE_SIGTERM:
                    self.accepted_enough.set()
                if answer.status == 503:
                    self.refused.set()
                # Pacing, not waiting for something: it bounds the load (50 x 500 frames a second).
                await asyncio.sleep(PACE)

    async def stop(self) -> list[Answer]:
        self.stopping.set()
        await asyncio.wait_for(self.task, TIMEOUT)
        return self.answers

    async def cancel(self) -> None:
        """On a failure: never leave it running."""
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def log_time(entry: dict[str, Any]) -> float:
    """A JSON log line's "time" (2024-01-02T03:04:05.678Z) as epoch seconds."""
    stamp, millis = entry["time"].rstrip("Z").split(".")
    return timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S")) + int(millis) / 1000


def log_event(server: ServerProcess, name: str) -> list[dict[str, Any]]:
    return [entry for entry in server.log_lines if entry.get("event") == name]


async def refused_upgrade_status(server: ServerProcess) -> int:
    async with aiohttp.ClientSession() as http:
        try:
            ws = await http.ws_connect(f"{server.ws_url}?vsn=2.0.0&token={make_token('late')}",
                                       timeout=aiohttp.ClientWSTimeout(ws_close=TIMEOUT))
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status
        await ws.close()
        return 101


def assert_every_client_got_exactly(clients: Crowd, accepted: list[int]) -> None:
    """Nothing accepted is lost, nothing refused is delivered, all in order, on every socket."""
    wrong = {i: got for i, got in clients.messages.items() if got != accepted}
    assert not wrong, (f"{len(wrong)} of {clients.count} clients did not receive exactly the {len(accepted)} "
                       f"accepted publishes {accepted[:3]}..{accepted[-3:]}; e.g. {next(iter(wrong.items()))}")


def assert_closed_by_drain(clients: Crowd, summary: Event) -> None:
    """Each client's connection ended once, with 1012 "service restart", never 1000, never phx_close."""
    assert len(clients.first_close) == clients.count
    codes = {(e["code"], e["reason"]) for e in clients.connected_closes}
    assert codes == {(1012, "service restart")}, codes
    assert len(clients.connected_closes) == clients.count  # no reconnect got through to be closed again
    assert summary["closesWhileConnected"] == {"1012": clients.count}, summary
    assert summary["channelCloses"] == 0 and summary["phxCloseFrames"] == 0, summary
    assert summary["rejoins"] == 0 and summary["joinFailures"] == 0, summary
    assert not clients.other, clients.other[:5]


async def test_sigterm_drains_500_phoenix_clients_without_losing_an_accepted_publish(start_server, crowd):
    drain_seconds = 3.0
    server = await start_server(PUSH_DRAIN_SECONDS=str(drain_seconds))
    async with crowd(server, CLIENTS) as clients, aiohttp.ClientSession() as http:
        ready = await asyncio.wait_for(clients.ready, READY_TIMEOUT)
        assert ready["clients"] == CLIENTS
        async with http.get(f"{server.http_url}/readyz") as response:
            assert response.status == 200

        publisher = Publisher(server)
        try:
            await asyncio.wait_for(publisher.accepted_enough.wait(), TIMEOUT)
            assert server.process is not None
            sigterm = time.time()
            server.process.send_signal(signal.SIGTERM)

            # During the drain: not ready, no new sockets, no publishes.
            await server.wait_for_log(lambda entry: entry.get("event") == "drain_start", TIMEOUT)
            async with http.get(f"{server.http_url}/readyz") as response:
                assert response.status == 503
                assert await response.json() == {"status": "unavailable", "error": "draining"}
            assert await refused_upgrade_status(server) == 503
            await asyncio.wait_for(publisher.refused.wait(), TIMEOUT)
            checked_during_drain = time.time()

            await asyncio.wait_for(clients.all_closed.wait(), drain_seconds + TIMEOUT)
            answers = await publisher.stop()
        finally:
            await publisher.cancel()
        returncode = await asyncio.wait_for(server.process.wait(), drain_seconds + EXIT_BOUND)
        exited = time.time()
        summary = await clients.finish()
    await server.wait_for_log(lambda entry: entry.get("event") == "stopped", TIMEOUT)

    assert returncode == 0
    assert exited - sigterm < drain_seconds + EXIT_BOUND

    # Publishes: accepted until the drain starts, refused from then on, never accepted again.
    statuses = [a.status for a in answers if a.status is not None]
    first_refusal = statuses.index(503)
    assert set(statuses[:first_refusal]) == {200} and set(statuses[first_refusal:]) == {503}, statuses
    assert first_refusal >= ACCEPTED_BEFORE_SIGTERM
    assert all(a.body == DRAINING for a in answers if a.status == 503)
    drain_start = log_event(server, "drain_start")
    assert len(drain_start) == 1
    assert drain_start[0]["connections"] == CLIENTS and drain_start[0]["seconds"] == drain_seconds
    started = log_time(drain_start[0])
    late = [a for a in answers if a.sent > started + 0.01 and a.status not in (503, None)]
    assert not late, late  # a publish sent after the drain began was never accepted
    accepted = [a.n for a in answers if a.status == 200]
    assert accepted == list(range(1, len(accepted) + 1))
    assert_every_client_got_exactly(clients, accepted)

    # Sockets: all closed by the drain, in batches spread over PUSH_DRAIN_SECONDS.
    assert_closed_by_drain(clients, summary)
    times = sorted(e["t"] / 1000 for e in clients.first_close.values())
    first, last = times[0], times[-1]
    assert first - sigterm < 1.0, f"first close {first - sigterm:.2f}s after SIGTERM"
    assert last - first > drain_seconds / 2, f"closes spread over {last - first:.2f}s only"
    assert last - sigterm < drain_seconds + DRAIN_MARGIN, f"last close {last - sigterm:.2f}s after SIGTERM"
    # Spread, not bunched: no half-second holds half of the crowd (a batch is ceil(500 / 30) = 17 sockets).
    busiest = max(sum(1 for t in times if start <= t < start + 0.5) for start in times)
    assert busiest < CLIENTS / 2, f"{busiest} closes within half a second"
    # Closed clients tried to come back at once (retry 250 ms) and were refused with 503 during the drain.
    assert summary["errors"].get("Unexpected server response: 503", 0) > 0, summary["errors"]
    assert checked_during_drain < last

    # The log tells the story.
    drain_done = log_event(server, "drain_done")
    assert len(drain_done) == 1 and drain_done[0]["connections"] == CLIENTS
    assert log_time(drain_done[0]) - started < drain_seconds + DRAIN_MARGIN
    assert log_event(server, "stopping") and log_event(server, "stopped")
    # Every client retries during a drain: those refusals are counted, not logged one line each.
    assert not [entry for entry in log_event(server, "connect_refused") if entry.get("reason") == "draining"]
    assert not [entry for entry in server.log_lines if entry.get("level") in ("error", "critical")
                or "raw" in entry][:5]


async def test_zero_drain_seconds_closes_every_socket_at_once(start_server, crowd):
    server = await start_server(PUSH_DRAIN_SECONDS="0")
    async with crowd(server, CLIENTS) as clients:
        await asyncio.wait_for(clients.ready, READY_TIMEOUT)
        assert server.process is not None
        sigterm = time.time()
        server.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(clients.all_closed.wait(), TIMEOUT)
        returncode = await asyncio.wait_for(server.process.wait(), EXIT_BOUND)
        exited = time.time()
        summary = await clients.finish()

    assert returncode == 0
    assert exited - sigterm < EXIT_BOUND
    assert_closed_by_drain(clients, summary)
    times = sorted(e["t"] / 1000 for e in clients.first_close.values())
    assert times[0] - sigterm < 1.0
    assert times[-1] - times[0] < 0.5, f"closes spread over {times[-1] - times[0]:.2f}s"
    await server.wait_for_log(lambda entry: entry.get("event") == "stopped", TIMEOUT)
    drain_start, drain_done = log_event(server, "drain_start"), log_event(server, "drain_done")
    assert len(drain_start) == 1 and drain_start[0]["seconds"] == 0 and drain_start[0]["connections"] == CLIENTS
    assert len(drain_done) == 1 and drain_done[0]["connections"] == CLIENTS
    assert log_time(drain_done[0]) - log_time(drain_start[0]) < 0.5
