"""Session on its own: driven through a fake SessionHost, no Node, no server, no socket.

What a client sees is the frames the session writes to its connection; what the node sees is the
calls on its host interface. Both are asserted here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

from push_service.auth import Identity
from push_service.config import Settings
from push_service.messages import Broadcast, Position, Recovery, Wire
from push_service.metrics import Metrics
from push_service.protocol import V2
from push_service.connection import INVALID_MESSAGE, Disconnect
from push_service.errors import AuthError
from push_service.session import Session
from push_service.topics import Topic

LOBBY = "room:lobby:1"
THREAD = "room:topic:7"  # a topic family tracked in presence by default


class FakePresence:
    def __init__(self, families: tuple[str, ...]) -> None:
        self.families = families
        self.present: dict[str, set[str]] = {}
        self.forgotten: list[str] = []

    def tracks(self, topic: Topic) -> bool:
        return topic.family in self.families

    def join(self, session: Session, topic: str) -> dict[str, Any]:
        self.present.setdefault(topic, set()).add(session.identity.sub)
        return {sub: {"metas": [{"phx_ref": "r"}]} for sub in sorted(self.present[topic])}

    def leave(self, session: Session, topic: str) -> None:
        self.present[topic].discard(session.identity.sub)

    def typing(self, session: Session, topic: str, payload: Any) -> tuple[str, dict[str, Any]]:
        return "ok", {}

    def forget(self, session: Session) -> None:
        self.forgotten.append(session.id)


class FakeHost:
    """A SessionHost that subscribes at once (or, with `confirm_later`, when the test says so) and
    answers recoveries when the test hands one over."""

    def __init__(self, settings: Settings | None = None, *, history: bool = False,
                 confirm_later: bool = False) -> None:
        self.settings = settings or Settings()
        self.metrics = Metrics()
        self.presence = FakePresence(self.settings.presence_topics)
        self.history_enabled = history
        self.join_authorizer = None  # PUSH_AUTH_JOIN_URL unset: joins are decided by the session alone
        self.clock = 1000.0
        self.confirm_later = confirm_later
        self.subscriptions: dict[str, list[Session]] = {}
        self.recoveries: list[tuple[str, Position | None, Callable[[Recovery | None], None]]] = []
        self.forgotten: list[Session] = []
        self.tokens: dict[str, Identity] = {}  # what verify() accepts; any other token is "bad_signature"
        self.verified: list[str] = []

    def now(self) -> float:
        return self.clock

    def verify(self, token: str) -> Identity:
        self.verified.append(token)
        if token not in self.tokens:
            raise AuthError("bad_signature", "Signature verification failed")
        return self.tokens[token]

    def subscribe(self, topic: str, session: Session) -> bool:
        self.subscriptions.setdefault(topic, []).append(session)
        return not self.confirm_later

    def unsubscribe(self, topic: str, session: Session) -> None:
        self.subscriptions[topic].remove(session)

    def recover(self, topic: str, since: Position | None, done: Callable[[Recovery | None], None]) -> None:
        self.recoveries.append((topic, since, done))

    def forget(self, session: Session) -> None:
        self.forgotten.append(session)


class FakeConnection:
    transport_name = "websocket"
    remote = "127.0.0.1"

    def __init__(self) -> None:
        self.wire = Wire(V2, lambda payload: payload)  # unframed: each write is the serialized message
        self.sink = self
        self.written: list[bytes] = []
        self.closed_with: Disconnect | None = None

    def send(self, data: bytes) -> None:
        self.written.append(data)

    write = send

    def close(self, disconnect: Disconnect) -> None:
        self.closed_with = disconnect

    def frames(self) -> list[list[Any]]:
        """What the client got so far, as [join_ref, ref, topic, event, payload] lists; then forgets it."""
        frames = [orjson.loads(data) for data in self.written]
        self.written.clear()
        return frames


def open_session(host: FakeHost, sub: str = "u1", topics: tuple[str, ...] | None = None
                 ) -> tuple[Session, FakeConnection]:
    conn = FakeConnection()
    identity = Identity(sub=sub, exp=time.time() + 3600, topics=topics)
    return Session(host, "n1.1", identity, conn), conn


def push(session: Session, join_ref: str | None, ref: str, topic: str, event: str, payload: Any = None) -> None:
    session.receive(orjson.dumps([join_ref, ref, topic, event, {} if payload is None else payload]).decode())


def reply(join_ref: str | None, ref: str, topic: str, status: str, response: Any = None) -> list[Any]:
    return [join_ref, ref, topic, "phx_reply", {"status": status, "response": {} if response is None else response}]


def test_join_is_answered_ok_and_subscribes():
    host = FakeHost()
    session, conn = open_session(host)
    push(session, "1", "1", LOBBY, "phx_join")
    assert conn.frames() == [reply("1", "1", LOBBY, "ok")]
    assert host.subscriptions[LOBBY] == [session]
    assert host.metrics.joins.labels("lobby").value == 1


def test_join_reply_waits_for_the_subscription():
    host = FakeHost(confirm_later=True)
    session, conn = open_session(host)
    push(session, "1", "1", LOBBY, "phx_join")
    assert conn.frames() == []  # a reply now could promise broadcasts the node cannot deliver yet
    session.subscribed(LOBBY)
    assert conn.frames() == [reply("1", "1", LOBBY, "ok")]


def test_join_of_a_tracked_topic_sends_presence_state_after_the_reply():
    host = FakeHost()
    session, conn = open_session(host, "alice")
    push(session, "1", "1", THREAD, "phx_join")
    assert conn.frames() == [reply("1", "1", THREAD, "ok"),
                             ["1", None, THREAD, "presence_state", {"alice": {"metas": [{"phx_ref": "r"}]}}]]


def test_join_of_another_users_topic_is_refused():
    host = FakeHost()
    session, conn = open_session(host, "u1")
    push(session, "1", "1", "user:u2", "phx_join")
    assert conn.frames() == [reply("1", "1", "user:u2", "error", {"reason": "unauthorized"})]
    assert host.subscriptions == {}
    assert host.metrics.joins_refused.labels("unauthorized").value == 1


def test_join_outside_the_topics_claim_is_refused():
    host = FakeHost()
    session, conn = open_session(host, topics=("room:lobby:2",))
    push(session, "1", "1", LOBBY, "phx_join")
    assert conn.frames() == [reply("1", "1", LOBBY, "error", {"reason": "unauthorized"})]


def test_join_of_an_unknown_topic_is_refused_without_a_join_ref():
    host = FakeHost()
    session, conn = open_session(host)
    push(session, "1", "1", "chat:1", "phx_join")
    assert conn.frames() == [reply(None, "1", "chat:1", "error", {"reason": "unmatched topic"})]
    assert host.metrics.joins_refused.labels("unmatched_topic").value == 1


def test_join_past_the_channel_limit_is_refused():
    host = FakeHost(Settings(max_topics_per_connection=1))
    session, conn = open_session(host)
    push(session, "1", "1", LOBBY, "phx_join")
    push(session, "2", "2", "room:lobby:2", "phx_join")
    assert conn.frames()[1] == reply("2", "2", "room:lobby:2", "error", {"reason": "too many channels joined"})
    assert list(host.subscriptions) == [LOBBY]


def test_join_with_a_bad_since_is_refused_when_history_is_on():
    host = FakeHost(history=True)
    session, conn = open_session(host)
    push(session, "1", "1", LOBBY, "phx_join", {"since": "42"})
    [frame] = conn.frames()
    assert frame[4]["status"] == "error" and frame[4]["response"]["reason"].startswith("bad since")
    assert host.recoveries == []


def test_broadcasts_during_a_recovery_follow_the_replay_without_duplicates():
    host = FakeHost(history=True)
    session, conn = open_session(host)
    push(session, "1", "1", LOBBY, "phx_join", {"since": "e~1"})
    [(topic, since, done)] = host.recoveries
    assert (topic, since) == (LOBBY, Position("e", 1))
    missed = Broadcast.of(LOBBY, "new_msg", {"n": 2})
    missed.position = Position("e", 2)
    live_copy = Broadcast.of(LOBBY, "new_msg", {"n": 2})  # the live copy of what the replay holds
    live_copy.position = Position("e", 2)
    newer = Broadcast.of(LOBBY, "new_msg", {"n": 3})
    newer.position = Position("e", 3)
    session.deliver(live_copy)
    session.deliver(newer)
    assert conn.frames() == []  # held until the reply and the replay are out
    done(Recovery(Position("e", 2), True, [missed]))
    assert conn.frames() == [reply("1", "1", LOBBY, "ok", {"position": "e~2", "recovered": True}),
                             [None, "e~2", LOBBY, "new_msg", {"n": 2}],
                             [None, "e~3", LOBBY, "new_msg", {"n": 3}]]
    assert host.metrics.recoveries.labels("recovered").value == 1


def test_a_message_to_an_unjoined_topic_gets_an_error_reply():
    host = FakeHost()
    session, conn = open_session(host)
    push(session, "1", "2", LOBBY, "new_msg", {"body": "hi"})
    assert conn.frames() == [reply(None, "2", LOBBY, "error", {"reason": "unmatched topic"})]
    assert host.metrics.client_errors.labels("unmatched_topic").value == 1


def test_a_client_event_on_a_joined_topic_is_refused_calmly():
    host = FakeHost()
    session, conn = open_session(host)
    push(session, "1", "1", LOBBY, "phx_join")
    push(session, "1", "2", LOBBY, "new_msg", {"body": "hi"})
    assert conn.frames()[1] == reply("1", "2", LOBBY, "error", {"reason": "unhandled event"})
    assert session.channels  # still joined: Phoenix would have crashed the channel


def test_heartbeat_is_answered_and_keeps_the_session_alive():
    host = FakeHost()
    session, conn = open_session(host)
    host.clock += 20
    push(session, None, "5", "phoenix", "heartbeat")
    assert conn.frames() == [reply(None, "5", "phoenix", "ok")]
    assert session.last_seen == host.clock


def test_leave_replies_closes_the_channel_and_unsubscribes():
    host = FakeHost()
    session, conn = open_session(host, "alice")
    push(session, "1", "1", THREAD, "phx_join")
    conn.frames()
    push(session, "1", "2", THREAD, "phx_leave")
    assert conn.frames() == [reply("1", "2", THREAD, "ok"), ["1", "1", THREAD, "phx_close", {}]]
    assert host.subscriptions[THREAD] == []
    assert host.presence.present[THREAD] == set()
    assert host.metrics.leaves.labels("topic").value == 1
    push(session, "1", "3", THREAD, "phx_leave")  # leaving again: nothing joined, still ok
    assert conn.frames() == [reply("1", "3", THREAD, "ok")]


def test_rejoin_closes_the_earlier_join_after_the_new_reply():
    host = FakeHost()
    session, conn = open_session(host)
    push(session, "1", "1", LOBBY, "phx_join")
    push(session, "3", "3", LOBBY, "phx_join")
    assert conn.frames()[1:] == [reply("3", "3", LOBBY, "ok"), ["1", "1", LOBBY, "phx_close", {}]]
    assert host.subscriptions[LOBBY] == [session]


def test_an_invalid_frame_disconnects():
    host = FakeHost()
    session, conn = open_session(host)
    push(session, "1", "1", LOBBY, "phx_join")
    session.receive("not json")
    assert conn.closed_with is INVALID_MESSAGE
    assert host.subscriptions[LOBBY] == []
    assert host.metrics.disconnects.labels("invalid message").value == 1


def test_closed_releases_everything_and_writes_nothing_more():
    host = FakeHost()
    session, conn = open_session(host)
    push(session, "1", "1", LOBBY, "phx_join")
    conn.frames()
    session.closed()
    assert host.subscriptions[LOBBY] == []
    assert host.forgotten == [session]
    assert host.presence.forgotten == [session.id]
    session.deliver(Broadcast.of(LOBBY, "new_msg", {}))
    assert conn.frames() == []


# --- access_token: token refresh on a live socket


def test_a_refresh_replaces_the_identity_then_leaves_the_topics_it_no_longer_allows():
    host = FakeHost()
    session, conn = open_session(host, topics=("room:*",))
    push(session, "1", "1", LOBBY, "phx_join")
    push(session, "2", "2", THREAD, "phx_join")
    conn.frames()
    narrow = Identity(sub="u1", exp=time.time() + 7200, topics=("room:lobby:*",))
    host.tokens["narrow"] = narrow
    push(session, "1", "3", LOBBY, "access_token", {"access_token": "narrow"})
    # The reply first, then the server-side leave: phx_close, out of presence, unsubscribed.
    assert conn.frames() == [reply("1", "3", LOBBY, "ok"), ["2", "2", THREAD, "phx_close", {}]]
    assert session.identity is narrow and list(session.channels) == [LOBBY]
    assert host.presence.present[THREAD] == set() and host.subscriptions[THREAD] == []
    assert host.metrics.registry.get_sample_value("push_token_refreshes_total", {"result": "ok"}) == 1


def test_refreshes_verify_at_most_once_a_second_and_a_repeated_token_is_free():
    host = FakeHost()
    session, conn = open_session(host)
    push(session, "1", "1", LOBBY, "phx_join")
    conn.frames()
    host.tokens["a"] = Identity(sub="u1", exp=time.time() + 60)
    host.tokens["b"] = Identity(sub="u1", exp=time.time() + 120)
    push(session, None, "2", "phoenix", "access_token", {"access_token": "a"})
    push(session, "1", "3", LOBBY, "access_token", {"access_token": "a"})  # as clients do, on each channel
    push(session, "1", "4", LOBBY, "access_token", {"access_token": "b"})
    host.clock += 1.0
    push(session, "1", "5", LOBBY, "access_token", {"access_token": "b"})
    assert conn.frames() == [reply(None, "2", "phoenix", "ok"), reply("1", "3", LOBBY, "ok"),
                             reply("1", "4", LOBBY, "error", {"reason": "too_many_refreshes"}),
                             reply("1", "5", LOBBY, "ok")]
    assert host.verified == ["a", "b"] and session.identity is host.tokens["b"]


def test_a_refused_refresh_keeps_the_identity():
    host = FakeHost()
    session, conn = open_session(host)
    first = session.identity
    host.tokens["other"] = Identity(sub="u2", exp=time.time() + 60)
    push(session, None, "1", "phoenix", "access_token", {"access_token": "other"})
    host.clock += 1.0
    push(session, None, "2", "phoenix", "access_token", {"access_token": "forged"})
    push(session, None, "3", "phoenix", "access_token", ["not", "an", "object"])
    assert conn.frames() == [
        reply(None, "1", "phoenix", "error", {"reason": "sub_mismatch: the token is for another sub"}),
        reply(None, "2", "phoenix", "error", {"reason": "bad_signature"}),
        reply(None, "3", "phoenix", "error", {"reason": 'bad_payload: expected {"access_token": "<JWT>"}'})]
    assert session.identity is first
