"""Bounded caches: the oldest entries out first, in batches.

Dropping one entry per insert (`del entries[next(iter(entries))]`) walks over every slot deleted since the dict
last resized, so once a 10,000-entry cache is full each insert costs about 2 µs more (0.3 µs in batches of an
eighth: docs/performance.md, "Connects in batches"), and every connect with a new token inserts.
"""

from __future__ import annotations

import itertools
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def with_room(entries: dict[K, V], limit: int) -> dict[K, V]:
    """`entries` with room for one more under `limit`: as it is, or a copy without its oldest eighth (at least one)."""
    if len(entries) < limit:
        return entries
    return dict(itertools.islice(entries.items(), max(1, limit // 8), None))
