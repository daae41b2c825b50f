"""The control channel: one node asks every live node, over the broker already there, and gathers the answers.

Every node hears `push:control` (requests and heartbeats) and `push:control:<its id>` (answers to its
requests), as presence signals on topics no client can join. A request carries an id; each node runs the
handler of its kind and answers on the asker's channel. The asker answers for itself directly and waits at
most `wait` seconds for the live nodes it knows of (those heard within PUSH_NODE_TIMEOUT). With the memory
broker there is nobody else: the same code answers for the one node.

A node can also ask one other node (`call`): the request goes to that node's own channel, its `callees`
handler (a coroutine: a relayed long-poll GET waits there for frames) answers on the asker's channel, and
the asker stops waiting as soon as the node stops heartbeating, not only at its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from push_service.broker.base import Broker
from push_service.errors import BrokerUnavailable

log = logging.getLogger("push_service.control")

CONTROL_PREFIX = "push:control"  # no topic family a client may join starts so
REQUESTS = CONTROL_PREFIX
MAX_ANSWER_BYTES = 1 << 20  # a handler's answer past this is replaced by an error, not sent
MAX_PENDING = 1000  # requests of this node waiting for answers at once
MAX_PEERS = 1000  # other nodes remembered at once: what the broker brings cannot grow this without bound
MAX_NODE_ID = 64  # characters of a sender's node id (ours are 12)
HEARTBEAT_MIN = 0.2  # seconds: the heartbeat comes a third of PUSH_NODE_TIMEOUT apart, at most 5 s and at least this

Handler = Callable[[dict[str, Any]], dict[str, Any]]
Callee = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
# Why a `call` has no answer: the node was not live or stopped heartbeating, the deadline passed, the
# broker did not take the request.
DEAD, TIMEOUT, UNSENT = "dead", "timeout", "unsent"


def answers_topic(node_id: str) -> str:
    return f"{CONTROL_PREFIX}:{node_id}"


class Gathered:
    """What the nodes answered to one request: node id -> answer, and the live nodes that did not answer."""

    __slots__ = ("answers", "unanswered", "_expected", "_done")

    def __init__(self, expected: set[str]) -> None:
        self.answers: dict[str, dict[str, Any]] = {}
        self.unanswered: list[str] = []
        self._expected = expected
        self._done = asyncio.Event()
        if not expected:
            self._done.set()

    def add(self, node_id: str, answer: dict[str, Any]) -> None:
        self.answers[node_id] = answer
        self._expected.discard(node_id)
        if not self._expected:
            self._done.set()

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await asyncio.wait_for(self._done.wait(), timeout)
        self.unanswered = sorted(self._expected - self.answers.keys())


class Control:
    def __init__(self, node_id: str, broker: Broker, node_timeout: float) -> None:
        self.node_id = node_id
        self._broker = broker
        self._node_timeout = node_timeout
        self._interval = max(HEARTBEAT_MIN, min(5.0, node_timeout / 3))
        self.handlers: dict[str, Handler] = {}
        # What one node asks of this one alone (`call`), by kind; whoever registers one bounds its work.
        self.callees: dict[str, Callee] = {}
        self._calls: dict[str, asyncio.Future[dict[str, Any]]] = {}  # this node's calls waiting for an answer
        # Run every heartbeat, on this node (the admin API samples its rates there).
        self.ticks: list[Callable[[], None]] = []
        self._peers: dict[str, float] = {}  # other node id -> time.monotonic() it was last heard
        self._heartbeats: dict[str, float] = {}  # other node id -> its wall-clock time in its last heartbeat
        self._pending: dict[str, Gathered] = {}
        self._tasks: set[asyncio.Task[bool]] = set()
        self._beat: asyncio.Task[None] | None = None

    async def start(self) -> None:
        for topic in (REQUESTS, answers_topic(self.node_id)):
            self._broker.subscribe(topic)  # once confirmed or not: a heartbeat soon makes up for the gap
        self._beat = asyncio.create_task(self._heartbeat(), name="push-control-heartbeat")

    async def close(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
        for task in list(self._tasks):
            task.cancel()

    # --- who is there

    def live_peers(self) -> dict[str, float]:
        """Other nodes heard within PUSH_NODE_TIMEOUT: id -> the wall-clock time of their last heartbeat."""
        cutoff = time.monotonic() - self._node_timeout
        for node_id in [node_id for node_id, heard in self._peers.items() if heard < cutoff]:
            del self._peers[node_id]
            self._heartbeats.pop(node_id, None)
        return {node_id: self._heartbeats.get(node_id, 0.0) for node_id in self._peers}

    def is_live(self, node_id: str) -> bool:
        """Whether another node was heard within PUSH_NODE_TIMEOUT (one lookup: asked per relayed request)."""
        heard = self._peers.get(node_id)
        return heard is not None and heard >= time.monotonic() - self._node_timeout

    def _heard_from(self, node_id: str) -> None:
        if node_id == self.node_id or len(node_id) > MAX_NODE_ID:
            return
        if node_id not in self._peers and len(self._peers) >= MAX_PEERS:
            return  # a flood of made-up senders; real nodes come back once the dead ones are pruned
        self._peers[node_id] = time.monotonic()

    async def _heartbeat(self) -> None:
        while True:
            self.live_peers()  # prunes the nodes not heard within PUSH_NODE_TIMEOUT, asked or not
            for tick in self.ticks:
                try:
                    tick()
                except Exception:
                    log.warning("control tick failed", exc_info=True, extra={"event": "control_tick_failed"})
            await self._send(REQUESTS, {"kind": "heartbeat", "from": self.node_id, "at": time.time()})
            await asyncio.sleep(self._interval)

    # --- asking

    async def ask(self, kind: str, args: dict[str, Any], wait: float) -> Gathered:
        """Every live node's answer to `kind` (this node's included), waiting at most `wait` seconds."""
        gathered = Gathered(set(self.live_peers()))
        gathered.add(self.node_id, self._run(kind, args))
        if len(self._pending) >= MAX_PENDING:
            await gathered.wait(0)
            return gathered
        request_id = secrets.token_hex(8)
        self._pending[request_id] = gathered
        try:
            if await self._send(REQUESTS, {"kind": kind, "id": request_id, "from": self.node_id, "args": args}):
                await gathered.wait(wait)
            else:
                await gathered.wait(0)  # the broker is down: nobody else can be asked
        finally:
            self._pending.pop(request_id, None)
        return gathered

    async def call(self, node_id: str, kind: str, args: dict[str, Any], timeout: float) -> dict[str, Any] | str:
        """One other node's answer to `kind`, or why there is none (DEAD, TIMEOUT, UNSENT). The node's
        liveness is looked at every heartbeat interval while waiting: a node that died answers DEAD
        within PUSH_NODE_TIMEOUT, not at the deadline."""
        if not self.is_live(node_id):
            return DEAD
        loop = asyncio.get_running_loop()
        request_id = secrets.token_hex(8)
        answer: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._calls[request_id] = answer
        try:
            if not await self._send(answers_topic(node_id), {"kind": kind, "id": request_id, "from": self.node_id,
                                                             "args": args}):
                return UNSENT
            deadline = loop.time() + timeout
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    return TIMEOUT
                done, _ = await asyncio.wait((answer,), timeout=min(left, self._interval))
                if done:
                    return answer.result()
                if not self.is_live(node_id):
                    return DEAD
        finally:
            self._calls.pop(request_id, None)

    def _run(self, kind: str, args: dict[str, Any]) -> dict[str, Any]:
        handler = self.handlers.get(kind)
        if handler is None:
            return {"error": f"unknown request {kind!r}"}
        try:
            return handler(args)
        except Exception:
            log.exception("control request failed", extra={"event": "control_failed", "kind": kind})
            return {"error": "internal error"}

    async def _send(self, topic: str, message: dict[str, Any]) -> bool:
        try:
            await self._broker.send_signal(topic, orjson.dumps(message))
        except (BrokerUnavailable, ConnectionError, OSError, asyncio.TimeoutError, TimeoutError):
            return False
        except Exception:  # a broker client's own error type: the same outcome, nobody heard it
            log.warning("control send failed", exc_info=True, extra={"event": "control_send_failed"})
            return False
        return True

    # --- hearing (Node.on_control)

    def heard(self, topic: str, data: bytes) -> None:
        try:
            message = orjson.loads(data)
            sender = message["from"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("bad control message", extra={"event": "bad_control_message"})
            return
        if not isinstance(sender, str):
            return
        self._heard_from(sender)
        if topic == REQUESTS:
            kind = message.get("kind")
            if kind == "heartbeat":
                at = message.get("at")
                if sender in self._peers:
                    self._heartbeats[sender] = at if isinstance(at, (int, float)) else 0.0
            elif isinstance(kind, str) and isinstance(message.get("id"), str) and isinstance(message.get("args"), dict):
                self._answer(sender, message["id"], kind, message["args"])
        elif topic == answers_topic(self.node_id):
            request_id, answer = message.get("id"), message.get("answer")
            if not isinstance(request_id, str):
                return
            if isinstance(message.get("kind"), str) and isinstance(message.get("args"), dict):
                self._answer_call(sender, request_id, message["kind"], message["args"])
                return
            if not isinstance(answer, dict):
                return
            gathered = self._pending.get(request_id)
            if gathered is not None:
                gathered.add(sender, answer)
            call = self._calls.get(request_id)
            if call is not None and not call.done():
                call.set_result(answer)

    def _answer(self, asker: str, request_id: str, kind: str, args: dict[str, Any]) -> None:
        self._keep(asyncio.create_task(self._send_answer(asker, request_id, self._run(kind, args))))

    def _answer_call(self, asker: str, request_id: str, kind: str, args: dict[str, Any]) -> None:
        callee = self.callees.get(kind)
        if callee is None:
            self._answer(asker, request_id, kind, args)  # an unknown kind: the error answer, as for ask
            return

        async def run() -> bool:
            try:
                answer = await callee(args)
            except Exception:
                log.exception("control call failed", extra={"event": "control_failed", "kind": kind})
                answer = {"error": "internal error"}
            return await self._send_answer(asker, request_id, answer)

        self._keep(asyncio.create_task(run()))

    async def _send_answer(self, asker: str, request_id: str, answer: dict[str, Any]) -> bool:
        data = {"id": request_id, "from": self.node_id, "answer": answer}
        if len(orjson.dumps(data)) > MAX_ANSWER_BYTES:
            data["answer"] = {"error": "answer too large"}
        return await self._send(answers_topic(asker), data)

    def _keep(self, task: asyncio.Task[bool]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
