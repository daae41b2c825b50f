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

Address = tuple[str, int]
__all__ = ["SLOTS", "Address", "ClusterURL", "key_slot", "parse_cluster_url", "parse_slots"]


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
    announces no host, as an empty string or `?`, is that node). None for a slot nobody serves."""
    owners: list[Address | None] = [None] * SLOTS
    if not isinstance(reply, list):
        raise ValueError(f"CLUSTER SLOTS answered {reply!r:.100}")
    for entry in reply:
        start, end, master = int(entry[0]), int(entry[1]), entry[2]
        host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
        address = (asked[0] if host in ("", "?") else host, int(master[1]))
        if not 0 <= start <= end < SLOTS:
            raise ValueError(f"CLUSTER SLOTS named slots {start}-{end}")
        owners[start:end + 1] = [address] * (end - start + 1)
    return owners
