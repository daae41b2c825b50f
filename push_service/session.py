"""One client connection's Phoenix state: joins, heartbeats, client events.

Independent of the transport: a transport hands in raw frames (`receive`) and gives the
session a `Connection` to write framed bytes to and to close. Independent of the node too: a
session asks what it needs of a `SessionHost` (node.Node is the real one; tests use a fake).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from os import write as write_fd
from typing import Any, Protocol

from push_service.auth import Identity
from push_service.config import Settings
from push_service.connection import (DRAIN, INVALID_MESSAGE, NO_SOCKET, SHUTDOWN, SLOW_CONSUMER, SOCKET_UNKNOWN,
                                     Connection, Disconnect, Ended)
from push_service.messages import BAD_SINCE, Broadcast, Position, Recovery, Run, join_since
from push_service.metrics import Metrics
from push_service.presence import PRESENCE_STATE, TYPING_EVENT
from push_service.errors import ProtocolError
from push_service.protocol import CLOSE, HEARTBEAT, JOIN, LEAVE, PHOENIX_TOPIC, Message
from push_service.join_auth import JoinAuthorizer, PendingJoins
from push_service.refresh import ACCESS_TOKEN, RefreshRefused, TokenRefresh
from push_service.topics import Topic, may_join, parse_topic

log = logging.getLogger("push_service.session")


class SessionPresence(Protocol):
    """The presence operations a session uses (presence.Presence)."""

    def tracks(self, topic: Topic) -> bool: ...
    def join(self, session: Session, topic: str) -> dict[str, Any]: ...
    def leave(self, session: Session, topic: str) -> None: ...
    def typing(self, session: Session, topic: str, payload: Any) -> tuple[str, dict[str, Any]]: ...
    def forget(self, session: Session) -> None: ...


class SessionHost(Protocol):
    """What a session asks of the node that holds it: subscriptions, history, presence, counters."""

    @property
    def settings(self) -> Settings: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def presence(self) -> SessionPresence: ...
    @property
    def history_enabled(self) -> bool: ...

    def now(self) -> float:
        """The event loop's clock."""

    @property
    def join_authorizer(self) -> JoinAuthorizer | None:
        """PUSH_AUTH_JOIN_URL's client (None: joins are decided here alone)."""

    def verify(self, token: str) -> Identity:
        """The identity a token grants, checked exactly as at connect; AuthError when it is refused."""

    def subscribe(self, topic: str, session: Session) -> bool:
        """True: in effect now; False: `session.subscribed(topic)` follows once it is."""

    def unsubscribe(self, topic: str, session: Session) -> None: ...

    def recover(self, topic: str, since: Position | None, done: Callable[[Recovery | None], None]) -> None:
        """Call `done` with the topic's position and what came after `since` (None: unreadable)."""

    def forget(self, session: Session) -> None:
        """The session is over: stop counting it."""


class Channel:
    __slots__ = ("topic", "join_ref", "tracked", "joined", "reply_ref", "since")

    def __init__(self, topic: Topic, join_ref: Any, tracked: bool, reply_ref: Any,
                 since: Position | None | object) -> None:
        self.topic = topic
        self.join_ref = join_ref
        self.tracked = tracked  # in presence
        self.joined = False  # the ok reply was sent (it waits for the subscription and any recovery)
        self.reply_ref = reply_ref  # the join push's ref, for that reply
        self.since = since  # the last position the client saw, when it asks to recover (or UNUSABLE_SINCE)


class Session:
    # What deliver reads first, to share the object's first cache line (docs/performance.md, "Small rooms").
    __slots__ = ("_held", "_floors", "_wire", "fd", "conn", "id", "host", "identity", "channels", "last_seen",
                 "_closing", "_disconnected", "connected_at", "_refresh", "_pending")

    def __init__(self, host: SessionHost, session_id: str, identity: Identity, conn: Connection) -> None:
        self.id = session_id
        self.host = host
        self.identity = identity
        self.conn = conn
        self.channels: dict[str, Channel] = {}
        self.last_seen = host.now()
        self._wire = conn.wire
        self.fd = NO_SOCKET  # the socket deliveries write straight: the connection says (connection.SOCKET_UNKNOWN)
        self._closing = False  # a slow-consumer disconnect is scheduled or done
        self._disconnected = False
        self.connected_at = 0.0  # when it connected (time.time()), for the admin API
        # topic -> broadcasts held while that topic's join recovers history (None: nothing held)
        self._held: dict[str, list[Broadcast]] | None = None
        # topic -> the position its replay went up to, until a live broadcast beyond it arrives (None: none)
        self._floors: dict[str, Position] | None = None
        self._refresh: TokenRefresh | None = None  # made at the first access_token event
        self._pending: PendingJoins | None = None  # joins waiting for PUSH_AUTH_JOIN_URL's answer

    # --- output

    def deliver(self, broadcast: Broadcast | Run) -> None:
        """Hub fan-out path: one write of bytes shared with every subscriber of the same wire."""
        if self._held is not None or self._floors is not None:
            self._deliver_recovering(broadcast)
            return
        # No call of ours: the cached frame, to the socket itself or the sink (docs/performance.md, "Small rooms").
        wire, frames = self._wire, broadcast.frames
        data = frames[wire] if wire in frames else broadcast.encoded(wire)
        fd = self.fd
        if fd == SOCKET_UNKNOWN:
            fd = self.fd = self.conn.socket_fd()
        if fd < 0:
            self.conn.sink.write(data)
            return
        try:
            sent = write_fd(fd, data)
        except OSError:  # the socket's buffer is full, or the peer is gone: the transport's write finds out
            sent = 0
        if sent != len(data):  # the rest waits in the transport, and fd is NO_SOCKET until it has gone
            self.conn.send(data[sent:] if sent else data)

    def _deliver_recovering(self, broadcast: Broadcast | Run) -> None:
        held, floors = self._held, self._floors
        if held is not None and broadcast.topic in held:
            held[broadcast.topic].extend(broadcast.parts)  # its join is recovering: sent after the replay
        elif floors is not None and broadcast.topic in floors:
            for part in broadcast.parts:
                floors = self._floors
                if floors is None or part.topic not in floors or not self._replayed(part, floors):
                    self.conn.send(part.encoded(self._wire))
        else:
            self.conn.send(broadcast.encoded(self._wire))

    def _replayed(self, broadcast: Broadcast, floors: dict[str, Position]) -> bool:
        """Whether the replay already sent this broadcast. With Redis or NATS the history read can answer
        before this node hears the newest broadcasts live; the broker delivers a topic in order, so once
        one beyond the replay arrives, every later one is beyond it too."""
        floor, position = floors[broadcast.topic], broadcast.position
        if position is None:
            return False  # the service's own (presence diffs): never in history
        if position.epoch == floor.epoch and position.seq <= floor.seq:
            return True
        del floors[broadcast.topic]
        if not floors:
            self._floors = None
        return False

    def overflowed(self) -> None:
        """The connection holds more unsent bytes than PUSH_SEND_BUFFER_BYTES: drop this slow consumer."""
        if not self._closing:
            # Never unsubscribe synchronously: the hub may be iterating this topic's subscribers.
            self._closing = True
            asyncio.get_running_loop().call_soon(self.disconnect, SLOW_CONSUMER)

    def _push(self, message: Message) -> None:
        self.conn.send(self._wire.encode(message))

    def _reply(self, join_ref: Any, message: Message, status: str, response: Any) -> None:
        wire = self._wire
        self.conn.send(wire.frame(wire.serializer.encode_reply(join_ref, message.ref, message.topic, status, response)))

    # --- input

    def receive(self, data: str | bytes) -> None:
        self.last_seen = self.host.now()
        try:
            message: Message = self._wire.serializer.decode(data)
        except ProtocolError as exc:
            self.host.metrics.client_errors.labels(exc.reason).inc()
            self.disconnect(INVALID_MESSAGE)
            return
        if message.event == HEARTBEAT and message.topic == PHOENIX_TOPIC:
            self._reply(None, message, "ok", {})
        elif message.event == JOIN:
            self._join(message)
        else:
            channel = self.channels.get(message.topic)
            if channel is None:
                self._to_unjoined(message)
            elif message.join_ref is not None and message.join_ref != channel.join_ref:
                pass  # a frame for an earlier join of this topic: the client raced a close (Phoenix ignores it)
            elif message.event == LEAVE:
                self._leave(channel, message)
            else:
                self._client_event(channel, message)

    def _join(self, message: Message) -> None:
        metrics = self.host.metrics
        join_ref = message.join_ref if message.join_ref is not None else message.ref
        replaced = self.channels.get(message.topic)
        if replaced is not None:
            self._drop_channel(replaced)
        topic = parse_topic(message.topic)
        if topic is None:
            metrics.joins_refused.labels("unmatched_topic").inc()
            self._reply(None, message, "error", {"reason": "unmatched topic"})
        elif len(self.channels) >= self.host.settings.max_topics_per_connection:
            metrics.joins_refused.labels("too_many_channels").inc()
            self._reply(join_ref, message, "error", {"reason": "too many channels joined"})
        elif not may_join(self.identity, topic, self.host.settings.require_topics_claim):
            metrics.joins_refused.labels("unauthorized").inc()
            self._reply(join_ref, message, "error", {"reason": "unauthorized"})
        elif (since := join_since(message.payload, self.host.history_enabled)) is BAD_SINCE:
            metrics.joins_refused.labels("bad_since").inc()
            self._reply(join_ref, message, "error", {"reason": "bad since: a position is <epoch>~<seq>, "
                                                               "as received in a broadcast's ref"})
        else:
            channel = Channel(topic, join_ref, self.host.presence.tracks(topic), message.ref, since)
            if self.host.join_authorizer is None:
                self.channels[topic.name] = channel
                if self.host.subscribe(topic.name, self):
                    self._subscribed(channel)
            else:  # the channel opens as above, or is refused, once PUSH_AUTH_JOIN_URL answers
                self._pending = self._pending or PendingJoins(self)
                self._pending.ask(channel, message)
        if replaced is not None:
            # As Phoenix: the old join is closed, after the new join's reply.
            self._push(Message(replaced.join_ref, replaced.join_ref, message.topic, CLOSE, {}))

    def subscribed(self, topic: str) -> None:
        """The node's subscription to `topic` is in effect: finish a join that waited for it."""
        channel = self.channels.get(topic)
        if channel is not None and not channel.joined:
            self._subscribed(channel)

    def _subscribed(self, channel: Channel) -> None:
        if not self.host.history_enabled:
            if channel.since is not None:
                self.host.metrics.recoveries.labels("not_recovered").inc()
            self._joined(channel, {"recovered": False} if channel.since is not None else {})
            return
        # Live broadcasts are held until the reply and the replay are out: no gap, no duplicate.
        if self._held is None:
            self._held = {}
        self._held[channel.topic.name] = []
        since = channel.since if isinstance(channel.since, Position) else None
        self.host.recover(channel.topic.name, since, lambda recovery: self._recovered(channel, recovery))

    def _recovered(self, channel: Channel, recovery: Recovery | None) -> None:
        name = channel.topic.name
        held = self._held.pop(name, []) if self._held is not None else []
        if not self._held:
            self._held = None
        if self.channels.get(name) is not channel or self._disconnected:
            return  # left, replaced or gone while the history was read
        response: dict[str, Any] = {}
        if recovery is not None:
            response["position"] = str(recovery.position)
        replay = recovery is not None and recovery.recovered and isinstance(channel.since, Position)
        if channel.since is not None:
            response["recovered"] = replay
            self.host.metrics.recoveries.labels("recovered" if replay else "not_recovered").inc()
        self._joined(channel, response)
        if replay:
            assert recovery is not None
            for broadcast in recovery.messages:
                self.conn.send(broadcast.encoded(self._wire))
            self.host.metrics.replayed.inc(len(recovery.messages))
        latest = recovery.position if recovery is not None else None
        beyond = False
        for broadcast in held:  # what came while reading, minus what the position already covers
            position = broadcast.position
            if latest is None or position is None or position.epoch != latest.epoch or position.seq > latest.seq:
                self.conn.send(broadcast.encoded(self._wire))
                beyond = beyond or position is not None
        if latest is not None and not beyond:
            # Live copies of what the position covers may still be on their way: drop them when they come.
            if self._floors is None:
                self._floors = {}
            self._floors[name] = latest

    def _joined(self, channel: Channel, response: dict[str, Any]) -> None:
        channel.joined = True
        name = channel.topic.name
        self.host.metrics.joins_of[channel.topic.family].inc()
        state = self.host.presence.join(self, name) if channel.tracked else None
        wire = self._wire
        reply = wire.serializer.encode_reply(channel.join_ref, channel.reply_ref, name, "ok", response)
        self.conn.send(wire.frame(reply))
        if state is not None:
            # Taken after tracking, so it includes the joiner; the batched diff of this join comes
            # later and is idempotent for phoenix.js (merged by phx_ref).
            self._push(Message(channel.join_ref, None, name, PRESENCE_STATE, state))

    def _leave(self, channel: Channel, message: Message) -> None:
        self._drop_channel(channel)
        self._reply(channel.join_ref, message, "ok", {})
        self._push(Message(channel.join_ref, channel.join_ref, message.topic, CLOSE, {}))

    def kick(self, topic: str) -> bool:
        """Leave `topic` from the server side (the admin API): the client gets phx_close, as after its own
        leave, and phoenix.js does not rejoin. False when the session is not on the topic."""
        channel = self.channels.get(topic)
        if channel is None:
            return False
        self._drop_channel(channel)
        self._push(Message(channel.join_ref, channel.join_ref, topic, CLOSE, {}))
        return True

    def _to_unjoined(self, message: Message) -> None:
        if message.event == ACCESS_TOKEN and message.topic == PHOENIX_TOPIC:
            self._refresh_token(None, message)
        elif message.event == LEAVE:
            if self._pending is not None:
                self._pending.cancel(message.topic)  # a join still waiting for the backend: it ends here
            self._reply(message.join_ref, message, "ok", {})
        else:
            self.host.metrics.client_errors.labels("unmatched_topic").inc()
            self._reply(None, message, "error", {"reason": "unmatched topic"})

    def _client_event(self, channel: Channel, message: Message) -> None:
        if message.event == TYPING_EVENT and channel.tracked:
            status, response = self.host.presence.typing(self, channel.topic.name, message.payload)
            self._reply(channel.join_ref, message, status, response)
            return
        if message.event == ACCESS_TOKEN:
            self._refresh_token(channel.join_ref, message)
            return
        # The service writes nothing and relays nothing a client sends: any other event is refused
        # calmly (Phoenix would crash the channel and make the client rejoin).
        self.host.metrics.client_errors.labels("unhandled_event").inc()
        self._reply(channel.join_ref, message, "error", {"reason": "unhandled event"})

    def _refresh_token(self, join_ref: Any, message: Message) -> None:
        """`access_token`: a new token (same sub) sets the expiry and the topics the connection may stay on.
        The reply comes before the leaves: the topic it was pushed on may be one of them."""
        refresh = self._refresh = self._refresh or TokenRefresh()
        host = self.host
        try:
            self.identity = refresh.identity(self.identity, message.payload, host.now(), host.verify, host.metrics)
        except RefreshRefused as refused:
            self._reply(join_ref, message, "error", {"reason": refused.explanation})
            return
        self._reply(join_ref, message, "ok", {})
        for channel in list(self.channels.values()):
            if not may_join(self.identity, channel.topic, host.settings.require_topics_claim):
                self.kick(channel.topic.name)

    def _drop_channel(self, channel: Channel) -> None:
        del self.channels[channel.topic.name]
        if self._held is not None:
            self._held.pop(channel.topic.name, None)
        if self._floors is not None:
            self._floors.pop(channel.topic.name, None)
            if not self._floors:
                self._floors = None
        self.host.unsubscribe(channel.topic.name, self)
        if channel.joined:
            if channel.tracked:
                self.host.presence.leave(self, channel.topic.name)
            self.host.metrics.leaves_of[channel.topic.family].inc()

    # --- end of life

    def disconnect(self, disconnect: Disconnect) -> None:
        """Server-side close: stop deliveries now, then ask the transport to close."""
        if self._disconnected:
            return
        self._disconnected = self._closing = True
        self.host.metrics.disconnects.labels(disconnect.reason).inc()
        fields = {"event": "disconnect", "reason": disconnect.reason, "code": disconnect.code,
                  "connection": self.id, "sub": self.identity.sub, "topics": len(self.channels)}
        if disconnect is SLOW_CONSUMER:
            self.host.metrics.slow_consumers.inc()
            log.warning("slow consumer dropped", extra=fields)
        elif disconnect is not DRAIN and disconnect is not SHUTDOWN:  # those are logged once per node
            log.info("connection closed by the server", extra=fields)
        self._drop_all_channels()
        self.conn.close(disconnect)

    def closed(self) -> None:
        """The transport is gone (either side closed it): release everything."""
        self._disconnected = self._closing = True
        self._drop_all_channels()
        self.host.presence.forget(self)
        self.host.forget(self)
        if not isinstance(self.conn, Ended):
            ended = Ended(self.conn)
            self.conn = ended

    def _drop_all_channels(self) -> None:
        if self._pending is not None:
            self._pending.cancel_all()
        for channel in list(self.channels.values()):
            self._drop_channel(channel)
