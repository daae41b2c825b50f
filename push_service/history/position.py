"""Positions: where a broadcast stands in its topic's history.

Written `<epoch>~<seq>`: the epoch changes whenever the topic's history is lost (a memory broker
restart, an evicted or expired topic), the sequence counts the topic's broadcasts from 1. The
`~` keeps it from ever looking like one of phoenix.js's own refs, which are decimal counters.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field

_FORMAT = re.compile(r"([A-Za-z0-9_-]{1,32})~([0-9]{1,19})")  # ASCII digits only, as documented


def new_epoch() -> str:
    return secrets.token_urlsafe(6)


@dataclass(frozen=True, slots=True)
class Position:
    epoch: str
    seq: int

    def __str__(self) -> str:
        return f"{self.epoch}~{self.seq}"

    @classmethod
    def parse(cls, text: object) -> Position:
        if not isinstance(text, str) or not (match := _FORMAT.fullmatch(text)):
            raise ValueError("a position looks like <epoch>~<seq>, as sent in a broadcast's ref")
        return cls(match.group(1), int(match.group(2)))


@dataclass(slots=True)
class Recovery:
    """What a client missed since a position, and whether that is all of it."""

    position: Position                # the topic's latest position now
    recovered: bool                   # True: `messages` is exactly what was missed
    messages: list = field(default_factory=list)  # Broadcasts after `since`, in order
