"""The one message shape both protocol versions carry."""

from __future__ import annotations

from typing import Any, NamedTuple

PHOENIX_TOPIC = "phoenix"
HEARTBEAT = "heartbeat"
JOIN = "phx_join"
LEAVE = "phx_leave"
REPLY = "phx_reply"
CLOSE = "phx_close"
ERROR = "phx_error"

# Refs are opaque to the server: phoenix.js sends decimal strings, other clients may send
# integers. Whatever came in is echoed back unchanged so the client's own matching works.
Ref = str | int | None


class Message(NamedTuple):
    """A tuple: built on every frame in and out, and a tuple is the cheapest immutable record."""

    join_ref: Ref
    ref: Ref
    topic: str
    event: str
    payload: Any

    @classmethod
    def reply(cls, join_ref: Ref, ref: Ref, topic: str, status: str, response: Any) -> Message:
        return cls(join_ref, ref, topic, REPLY, {"status": status, "response": response})
