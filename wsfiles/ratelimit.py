"""Command rate limits shared by all of a client's connections on this instance.

A per-connection limit let one client open 16 connections and run 16 times
the rate (16 connections listing a 3000-file folder held a core at 96%).  One
token bucket per client, shared by its command channels, fixes that; the
anonymous client is many people, so it gets one bucket per address.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from wsfiles.admission import TokenBucket


class ClientBuckets:
    """Hands out one TokenBucket per key, kept while a connection holds it."""

    def __init__(self, rate: float, clock: IReactorTime) -> None:
        self._rate = rate
        self._clock = clock
        self._buckets: dict[str, tuple[TokenBucket, int]] = {}

    @staticmethod
    def key(client: str, address: str, *, anonymous: bool) -> str:
        return f"{client}@{address}" if anonymous else client

    def take(self, key: str) -> TokenBucket:
        bucket, holders = self._buckets.get(key) or (TokenBucket(self._rate, self._clock), 0)
        self._buckets[key] = (bucket, holders + 1)
        return bucket

    def release(self, key: str) -> None:
        bucket, holders = self._buckets[key]
        if holders <= 1:
            del self._buckets[key]  # a later connection starts with a full bucket
        else:
            self._buckets[key] = (bucket, holders - 1)

    def __len__(self) -> int:
        return len(self._buckets)


class FloodWatch:
    """One connection's refused commands within the last second.

    The bucket is shared by a client's connections, but closing for a flood
    is about the connection that floods: many connections each sending one
    ``list`` at once are refused, never closed, while one connection sending
    more than ten times the rate in a second is.
    """

    __slots__ = ("_clock", "_count", "_limit", "_start")

    def __init__(self, rate: float, clock: IReactorTime) -> None:
        self._clock = clock
        self._limit = 10 * rate
        self._start = clock.seconds()
        self._count = 0

    def refused(self) -> bool:
        """Count a refusal; whether this connection is flooding."""
        now = self._clock.seconds()
        if now - self._start >= 1:
            self._start, self._count = now, 0
        self._count += 1
        return self._count > self._limit
