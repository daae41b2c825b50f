"""What the single-Redis broker (redis.py) and the Redis Cluster broker (redis_cluster.py) share: key names,
the publish script, the history read and the presence store.

In cluster mode every key and channel of a topic carries the hash tag `{<topic>}`, so a topic's meta hash,
history stream, presence hash and sharded channel live in one hash slot: the publish script may touch them
all, and one shard serves the topic. Topic names start with `room:` or `user:`, so the tag is never empty.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from push_service.broker import envelope
from push_service.broker.base import Deliver, Signal
from push_service.config import Settings
from push_service.errors import BrokerUnavailable
from push_service.history.window import recovery_window
from push_service.messages import Broadcast, Position, Recovery, new_epoch
from push_service.presence.replicated import PresenceStore

log = logging.getLogger("push_service.broker")


@dataclass(frozen=True)
class KeyScheme:
    """Where a topic's data lives. The single-Redis names predate cluster mode and stay as they were, so a
    running deployment keeps its history and presence across an upgrade."""

    channel_prefix: str
    channel_suffix: str
    presence_prefix: str
    presence_suffix: str
    node_prefix: str

    def channel(self, topic: str) -> str:
        return f"{self.channel_prefix}{topic}{self.channel_suffix}"

    def topic_of(self, channel: bytes) -> str | None:
        """The topic of one of our channels, None for another channel."""
        name = channel.decode(errors="replace")
        if not (name.startswith(self.channel_prefix) and name.endswith(self.channel_suffix)):
            return None
        return name[len(self.channel_prefix):len(name) - len(self.channel_suffix)]

    @staticmethod
    def history(topic: str) -> tuple[str, str]:
        """The meta hash (epoch e, last seq s) and the history stream; hash-tagged in both modes."""
        return f"push:{{{topic}}}:meta", f"push:{{{topic}}}:history"

    def presence(self, topic: str) -> str:
        return f"{self.presence_prefix}{topic}{self.presence_suffix}"

    def node(self, node_id: str) -> str:
        return f"{self.node_prefix}{node_id}"


STANDALONE = KeyScheme("push:t:", "", "push:p:", "", "push:node:")
# Node heartbeats share one slot (`{nodes}`), so `alive` reads them all with one MGET.
CLUSTER = KeyScheme("push:{", "}:t", "push:{", "}:p", "push:{nodes}:")


# Position, store and publish in one step, so every node sees one order and one numbering.
# KEYS: the topic's meta hash (epoch e, last seq s), its history stream, its pub/sub channel.
# ARGV: a new epoch (used if none), stream length, stream TTL, meta TTL, event, payload, published
# at, and the envelope's two halves around the position.
_PUBLISH_SCRIPT = """
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'e', epoch)
end
local seq = redis.call('HINCRBY', KEYS[1], 's', 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], seq .. '-1', 'e', ARGV[5], 'p', ARGV[6], 't', ARGV[7])
redis.call('EXPIRE', KEYS[2], ARGV[3])
local position = epoch .. '~' .. seq
redis.call('{publish}', KEYS[3], ARGV[8] .. position .. ARGV[9])
return position
"""


@dataclass(frozen=True)
class PublishScript:
    text: str
    sha: str


def publish_script(sharded: bool) -> PublishScript:
    """The script for PUBLISH (one Redis) or SPUBLISH (a cluster: its channel lives in the topic's slot)."""
    text = _PUBLISH_SCRIPT.replace("{publish}", "SPUBLISH" if sharded else "PUBLISH")
    return PublishScript(text, hashlib.sha1(text.encode()).hexdigest())


class HistoryOptions:
    """The history settings as the Redis brokers use them."""

    def __init__(self, settings: Settings) -> None:
        self.size = settings.history_size
        self.ttl = settings.history_ttl
        # The counter outlives the stream, so a stream that expired never reuses a position.
        self.meta_ttl = int(max(settings.history_ttl * 10, 86400))
        # A join records a quiet topic's epoch for this long only: a client joining made-up names must not
        # leave a key a day each. A joiner's position outlasting it is answered recovered: false, never a gap.
        self.quiet_ttl_ms = max(1000, int(settings.history_ttl * 1000))


def publish_command(broadcast: Broadcast, keys: KeyScheme, script: PublishScript, history: HistoryOptions,
                    publish: str = "PUBLISH") -> tuple[Any, ...]:
    """The one command that publishes `broadcast`: the script with history on, else a plain (S)PUBLISH."""
    if not history.size:
        return (publish, keys.channel(broadcast.topic), envelope.pack_broadcast(broadcast))
    head, tail = envelope.split_broadcast(broadcast)
    return ("EVALSHA", script.sha, 3, *keys.history(broadcast.topic), keys.channel(broadcast.topic), new_epoch(),
            history.size, int(history.ttl) + 1, history.meta_ttl, broadcast.event, broadcast.payload_json,
            time.time(), head, tail)


async def read_recovery(client: Any, topic: str, since: Position | None, limit: int | None,
                        history: HistoryOptions) -> Recovery:
    """The topic's position and what came after `since`, read with redis-py (`client`: a Redis or a
    RedisCluster; the keys share a slot, so the transaction runs on one shard)."""
    meta, stream = KeyScheme.history(topic)
    count = min(limit or history.size, history.size)
    try:
        async with client.pipeline(transaction=True) as pipe:
            pipe.hsetnx(meta, "e", new_epoch())  # a topic never published to gets its epoch now
            pipe.pexpire(meta, history.quiet_ttl_ms, nx=True)  # a publish extends it to meta_ttl
            pipe.hmget(meta, "e", "s")
            if since is None:
                pipe.xrevrange(stream, count=count)
            else:
                pipe.xrange(stream, min=f"{since.seq + 1}-0", count=count + 1)
            *_, (epoch, seq), entries = await pipe.execute()
    except (RedisError, OSError, asyncio.TimeoutError) as exc:
        raise BrokerUnavailable(f"redis history read failed: {type(exc).__name__}") from None
    current = Position(epoch.decode(), int(seq or 0))
    if since is None:
        entries.reverse()
    expired_before = time.time() - history.ttl
    messages = [Broadcast(topic, fields[b"e"].decode(), fields[b"p"], None,
                          Position(current.epoch, int(entry_id.split(b"-", 1)[0])))
                for entry_id, fields in entries if float(fields[b"t"]) >= expired_before]
    return recovery_window(current, since, messages, limit)


def heard(data: bytes, node_id: str, deliver: Deliver, signal: Signal) -> None:
    """A message on a push channel: a broadcast for the hub, or another node's presence signal (our own
    signals come back to us too, and are not for us)."""
    try:
        item = envelope.unpack(data)
    except envelope.EnvelopeError:
        log.warning("foreign message on a push channel", extra={"event": "bad_envelope"})
        return
    if isinstance(item, Broadcast):
        deliver(item)
    elif item[1] != node_id:
        signal(item[0], item[2])


class RedisPresenceStore(PresenceStore):
    """Per-topic hashes (conn id -> [key, meta]) and node heartbeats, named by `keys`; `client` is a
    redis-py Redis or RedisCluster."""

    HASH_TTL = 24 * 3600  # an abandoned topic's hash (every node gone) disappears eventually

    def __init__(self, client: Any, node_timeout: float, keys: KeyScheme = STANDALONE) -> None:
        self._client = client
        self._keys = keys
        self._ttl_ms = max(1, int(node_timeout * 1000 * 2 / 3))

    async def put(self, topic: str, conn_id: str, value: bytes) -> None:
        key = self._keys.presence(topic)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(key, conn_id, value)
            pipe.expire(key, self.HASH_TTL)
            await pipe.execute()

    async def delete(self, topic: str, conn_id: str) -> None:
        await self._client.hdel(self._keys.presence(topic), conn_id)

    async def load(self, topic: str) -> dict[str, bytes]:
        raw = await self._client.hgetall(self._keys.presence(topic))
        return {key.decode(): value for key, value in raw.items()}

    async def heartbeat(self, node_id: str) -> None:
        await self._client.set(self._keys.node(node_id), b"1", px=self._ttl_ms)

    async def alive(self, node_ids: set[str]) -> set[str]:
        if not node_ids:
            return set()
        ordered = sorted(node_ids)
        values = await self._client.mget([self._keys.node(node_id) for node_id in ordered])
        return {node_id for node_id, value in zip(ordered, values, strict=True) if value is not None}

    async def forget_node(self, node_id: str) -> None:
        await self._client.delete(self._keys.node(node_id))
