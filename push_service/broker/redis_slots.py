"""Redis Cluster's addressing, without I/O: the hash slot of a key and the slot map a node answers to
CLUSTER SLOTS (the seeds of a `redis+cluster://` URL are read by values.parse_cluster_url).

slot = CRC16(key) mod 16384, where CRC16 is the XMODEM variant (binascii.crc_hqx with 0 as its start) and
only the part between the first `{` and the next `}` is hashed when that part is not empty (a hash tag).
"""

from __future__ import annotations

import binascii
from typing import Any

from push_service.values import ClusterURL, parse_cluster_url

SLOTS = 16384
MAX_MASTERS = 1000  # Redis Cluster's own documented ceiling of nodes

Address = tuple[str, int]
__all__ = ["MAX_MASTERS", "SLOTS", "Address", "ClusterURL", "key_slot", "parse_cluster_url", "parse_slots",
           "redirection"]


def key_slot(key: str | bytes) -> int:
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1:end]
    return binascii.crc_hqx(data, 0) % SLOTS


def parse_slots(reply: Any, asked: Address) -> list[Address | None]:
    """Slot -> its master's address, from a CLUSTER SLOTS reply of the node at `asked` (a master that
    announces no host, as an empty string or `?`, is that node). None for a slot nobody serves.
    ValueError for a reply of another shape, or naming more than MAX_MASTERS masters: each gets two
    connections, so a broken or hostile node must not make us open thousands."""
    owners: list[Address | None] = [None] * SLOTS
    if not isinstance(reply, list):
        raise ValueError(f"CLUSTER SLOTS answered {reply!r:.100}")
    masters: set[Address] = set()
    for entry in reply:
        try:
            start, end, master = int(entry[0]), int(entry[1]), entry[2]
            host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            address = (asked[0] if host in ("", "?") else host, int(master[1]))
        except (TypeError, ValueError, IndexError, KeyError, UnicodeDecodeError):
            raise ValueError(f"CLUSTER SLOTS answered an entry {entry!r:.100}") from None
        if not 0 <= start <= end < SLOTS or not 0 < address[1] < 65536:
            raise ValueError(f"CLUSTER SLOTS named slots {start}-{end} at port {address[1]}")
        masters.add(address)
        if len(masters) > MAX_MASTERS:
            raise ValueError(f"CLUSTER SLOTS named over {MAX_MASTERS} masters")
        owners[start:end + 1] = [address] * (end - start + 1)
    return owners


def redirection(message: str) -> tuple[int, Address]:
    """The slot and the node of a `MOVED <slot> <host>:<port>` or `ASK ...` error; ValueError if it is not one."""
    try:
        _, slot, where = message.split()
        host, _, port = where.rpartition(":")
        target = (host.strip("[]"), int(port))
        if not (0 <= int(slot) < SLOTS and host and 0 < target[1] < 65536):
            raise ValueError
        return int(slot), target
    except ValueError:
        raise ValueError(f"not a redirection: {message!r:.100}") from None
