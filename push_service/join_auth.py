"""A session's joins that wait for PUSH_AUTH_JOIN_URL's answer.

Until the answer the topic is not joined: what the client pushes on it is refused as on any unjoined
topic (phoenix.js pushes nothing on a channel before its join's ok), a leave ends the wait, and so does
the socket's end. Each wait is one task, bounded by PUSH_AUTH_TIMEOUT and by the channels a connection
may join (PUSH_MAX_TOPICS_PER_CONNECTION counts the waiting joins too).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from push_service.auth import Identity
from push_service.auth_callback import UNAUTHORIZED
from push_service.config import Settings
from push_service.connection import Connection
from push_service.metrics import Metrics
from push_service.protocol import Message

log = logging.getLogger("push_service.session")


class JoinAuthorizer(Protocol):
    async def join(self, sub: str, topic: str, params: Any) -> str | None:
        """None when `sub` may join `topic`; else the join error's reason."""


class _Host(Protocol):
    """What of session.SessionHost a waiting join uses (declared here: session.py imports this module)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def join_authorizer(self) -> JoinAuthorizer | None: ...
    def subscribe(self, topic: str, session: Any) -> bool: ...


class Joining(Protocol):
    """What of session.Session a waiting join uses; its channels are session.Channel objects."""

    id: str
    identity: Identity
    conn: Connection
    channels: dict[str, Any]
    @property
    def host(self) -> _Host: ...
    def subscribed(self, topic: str) -> None: ...


class PendingJoins:
    """topic -> the task waiting for its join's answer, for one session."""

    __slots__ = ("_session", "_tasks")

    def __init__(self, session: Joining) -> None:
        self._session = session
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def ask(self, channel: Any, message: Message) -> None:
        session, name = self._session, channel.topic.name
        self.cancel(name)  # a join sent again before the first was answered: the newest counts
        if len(session.channels) + len(self._tasks) >= session.host.settings.max_topics_per_connection:
            session.host.metrics.joins_refused.labels("too_many_channels").inc()
            self._reply(channel, message, {"reason": "too many channels joined"})
            return
        task = asyncio.get_running_loop().create_task(self._wait(channel, message))
        self._tasks[name] = task
        task.add_done_callback(lambda done: self._tasks.pop(name) if self._tasks.get(name) is done else None)

    def cancel(self, topic: str) -> None:
        task = self._tasks.pop(topic, None)
        if task is not None:
            task.cancel()

    def cancel_all(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()

    def __len__(self) -> int:
        return len(self._tasks)

    async def _wait(self, channel: Any, message: Message) -> None:
        session, name = self._session, channel.topic.name
        authorizer = session.host.join_authorizer
        assert authorizer is not None
        try:
            refusal = await authorizer.join(session.identity.sub, name, message.payload)
        except Exception:  # a bug of ours: this join fails, not the connection
            log.exception("join authorization failed", extra={"event": "join_auth_error", "connection": session.id})
            refusal = "internal error"
        if self._tasks.get(name) is not asyncio.current_task():
            return  # cancelled meanwhile (a cancel does not always reach a task that has just finished)
        del self._tasks[name]
        if refusal is not None:
            reason = "unauthorized" if refusal == UNAUTHORIZED else "auth_unavailable"
            session.host.metrics.joins_refused.labels(reason).inc()
            self._reply(channel, message, {"reason": refusal})
            return
        if name in session.channels:  # joined meanwhile by another way in: keep the one there
            return
        session.channels[name] = channel
        if session.host.subscribe(name, session):
            session.subscribed(name)

    def _reply(self, channel: Any, message: Message, response: dict[str, Any]) -> None:
        conn = self._session.conn
        conn.send(conn.wire.encode(Message.reply(channel.join_ref, message.ref, message.topic, "error", response)))
