"""Missed-message recovery: per-topic positions and a bounded history of recent broadcasts.

`position` (Position, Recovery) has no dependencies so the hub can import it; `memory` holds the
single-node history; the Redis and NATS brokers keep theirs in Redis streams / JetStream.
"""
