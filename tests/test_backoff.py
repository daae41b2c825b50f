"""The reconnect wait both brokers use (broker/backoff.py): doubling up to a cap, quick again after a reset,
and `fresh` only at the start of an outage (one broker_down log line per outage)."""

from __future__ import annotations

from push_service.broker.backoff import Backoff


def test_the_wait_doubles_up_to_the_cap_and_starts_over_after_a_reset():
    backoff = Backoff(0.1, 0.5)
    assert backoff.fresh
    assert [backoff.next() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    assert not backoff.fresh
    backoff.reset()
    assert backoff.fresh and backoff.next() == 0.1
