"""The recovery window: from what a history still keeps after a client's `since`, what that client is
sent and whether it is all it missed. Every history (memory, Redis, NATS) reads, then asks this."""

from __future__ import annotations

from collections.abc import Sequence

from push_service.messages import Broadcast, Position, Recovery


def recovery_window(current: Position, since: Position | None, kept: Sequence[Broadcast], limit: int | None,
                    intact: bool | None = None) -> Recovery:
    """`current`: the topic's latest position. `kept`: with `since`, the kept broadcasts after it in order (all
    of them, or at least the first limit + 1); without, the latest ones. `intact`: whether nothing after `since`
    was lost before kept[0]; None where a topic's positions count 1, 2, 3... so the positions tell.
    At most `limit` messages; a client that missed more gets the first `limit` (recovered: false), or none
    when the oldest of what it missed is no longer kept."""
    if since is None:
        return Recovery(current, True, list(kept[-limit:] if limit else kept))
    if since.epoch != current.epoch or since.seq > current.seq:
        return Recovery(current, False)
    if intact is None:
        over = limit is not None and current.seq - since.seq > limit
        head = kept[:limit] if over else kept
        intact = _runs_on_from(since.seq, head) and len(head) == (limit if over else current.seq - since.seq)
    else:
        over = limit is not None and len(kept) > limit
        head = kept[:limit] if over else kept
    if over:
        return Recovery(current, False, list(head) if intact else [])
    return Recovery(current, intact, list(kept) if intact else [])


def _runs_on_from(seq: int, broadcasts: Sequence[Broadcast]) -> bool:
    """Whether the broadcasts are seq + 1, seq + 2, ... with no gap (positions only ever increase)."""
    if not broadcasts:
        return True
    first, last = broadcasts[0].position, broadcasts[-1].position
    return first is not None and last is not None and first.seq == seq + 1 and last.seq == seq + len(broadcasts)
