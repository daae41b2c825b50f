"""Topic families (Linen's) and the join rule: the JWT decides, we only read it."""

from __future__ import annotations

from typing import NamedTuple, Protocol

LOBBY = "lobby"          # room:lobby:<channel_id>
THREAD = "topic"         # room:topic:<thread_id>
COMMUNITY = "community"  # room:<community_id>
USER = "user"            # user:<user_id>
FAMILIES = (LOBBY, THREAD, COMMUNITY, USER)

# Binary Phoenix frames carry the topic in a one-byte length field: keep every topic sendable.
MAX_TOPIC_BYTES = 255


class Topic(NamedTuple):
    name: str
    family: str
    id: str


def parse_topic(name: str) -> Topic | None:
    """The family of a topic name, or None when it is not one we serve ("unmatched topic")."""
    if len(name.encode()) > MAX_TOPIC_BYTES:
        return None
    if name.startswith("room:"):
        rest = name[5:]
        for prefix, family in (("lobby:", LOBBY), ("topic:", THREAD)):
            if rest.startswith(prefix):
                ident = rest[len(prefix):]
                return Topic(name, family, ident) if ident else None
        return Topic(name, COMMUNITY, rest) if rest else None
    if name.startswith("user:"):
        ident = name[5:]
        return Topic(name, USER, ident) if ident else None
    return None


# The names parse_topic refuses for an empty id, among those its prefixes take.
_EMPTY_IDS = frozenset(("room:", "room:lobby:", "room:topic:", "user:"))


def is_topic(name: str) -> bool:
    """`parse_topic(name) is not None`, without building the Topic: the publish API asks it per message."""
    return (name.startswith(("room:", "user:")) and name not in _EMPTY_IDS
            and len(name.encode()) <= MAX_TOPIC_BYTES)


def topic_for(family: str, ident: str) -> str:
    if family == LOBBY:
        return f"room:lobby:{ident}"
    if family == THREAD:
        return f"room:topic:{ident}"
    if family == COMMUNITY:
        return f"room:{ident}"
    if family == USER:
        return f"user:{ident}"
    raise ValueError(f"unknown topic family {family!r}")


def claim_allows(patterns: tuple[str, ...], topic: str) -> bool:
    """A `topics` claim entry is an exact topic, or a prefix ending in `*`."""
    for pattern in patterns:
        if pattern.endswith("*"):
            if topic.startswith(pattern[:-1]):
                return True
        elif pattern == topic:
            return True
    return False


class Bearer(Protocol):
    """What the join rule reads of a verified token (auth.Identity); declared here so this module
    stays a leaf that config can import."""

    @property
    def sub(self) -> str: ...

    @property
    def topics(self) -> tuple[str, ...] | None: ...


def may_join(identity: Bearer, topic: Topic, require_topics_claim: bool) -> bool:
    if topic.family == USER and topic.id != identity.sub:
        return False
    if identity.topics is not None:
        return claim_allows(identity.topics, topic.name)
    # No claim: room topics are open to any valid token unless the operator requires one.
    return topic.family == USER or not require_topics_claim
