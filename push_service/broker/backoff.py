"""The wait between two attempts to reach a broker that is away: doubling from `first` up to `most`, so an
outage costs the broker few attempts and a short blip costs the service a short wait."""

from __future__ import annotations


class Backoff:
    def __init__(self, first: float = 0.1, most: float = 5.0) -> None:
        self.first = first
        self.most = most
        self._delay = first

    @property
    def fresh(self) -> bool:
        """No attempt has failed since the last reset: the first failure of an outage, worth a log line."""
        return self._delay == self.first

    def next(self) -> float:
        """How long to wait before the next attempt; each call doubles the one after, up to `most`."""
        delay = self._delay
        self._delay = min(delay * 2, self.most)
        return delay

    def reset(self) -> None:
        """The broker was reached: the next outage starts from `first` again."""
        self._delay = self.first
