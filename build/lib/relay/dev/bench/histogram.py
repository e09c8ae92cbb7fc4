"""Latency histograms that merge exactly across processes.

Buckets are 0.1 ms wide below 100 ms, 1 ms wide below 10 s and 100 ms wide above, so
percentiles are exact to the bucket width, which is finer than the 1 ms resolution of the append
timestamp (a stream id's millisecond part) everywhere that matters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping


def bucket(ms: float) -> int:
    """Bucket key in units of 0.1 ms (the bucket's lower bound)."""
    if ms < 0:
        return 0
    tenths = int(ms * 10)
    if tenths < 1_000:
        return tenths
    if tenths < 100_000:
        return tenths - tenths % 10
    return tenths - tenths % 1_000


def width(key: int) -> int:
    if key < 1_000:
        return 1
    return 10 if key < 100_000 else 1_000


class Histogram:
    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.max_ms = 0.0
        self.total = 0

    def add(self, ms: float) -> None:
        self.counts[bucket(ms)] += 1
        self.total += 1
        if ms > self.max_ms:
            self.max_ms = ms

    def merge(self, other: Histogram) -> None:
        self.counts.update(other.counts)
        self.total += other.total
        self.max_ms = max(self.max_ms, other.max_ms)

    def percentile(self, q: float) -> float | None:
        """Upper edge (ms) of the bucket holding the q-th percentile; None when empty."""
        if not self.total:
            return None
        rank = q / 100 * self.total
        seen = 0
        for key in sorted(self.counts):
            seen += self.counts[key]
            if seen >= rank:
                return min((key + width(key)) / 10, self.max_ms)
        return self.max_ms

    def to_json(self) -> dict[str, object]:
        return {"max_ms": self.max_ms, "buckets": [[k, v] for k, v in sorted(self.counts.items())]}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Histogram:
        hist = cls()
        buckets = data.get("buckets", [])
        if not isinstance(buckets, list):
            raise TypeError("histogram buckets must be a list of [key, count] pairs")
        for key, count in buckets:
            hist.counts[int(key)] += int(count)
            hist.total += int(count)
        hist.max_ms = float(str(data.get("max_ms", 0.0)))
        return hist

    @classmethod
    def merged(cls, parts: Iterable[Histogram]) -> Histogram:
        total = cls()
        for part in parts:
            total.merge(part)
        return total
