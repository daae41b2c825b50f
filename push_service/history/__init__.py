"""Missed-message recovery: a bounded history of recent broadcasts.

`memory` holds the single-node history (positions and `Recovery` are in push_service.messages);
the Redis and NATS brokers keep theirs in Redis streams / JetStream.
"""
