"""A log-bucketed latency histogram: constant memory, relative error <= 1 %.

Buckets grow geometrically (DDSketch's mapping): a value v falls in bucket
ceil(log(v) / log(gamma)) with gamma = (1 + a) / (1 - a); reporting the
bucket's centre 2 gamma^i / (gamma + 1) is within a (here 1 %) of every
value in it. Recording is one log and one dict increment, cheap enough to
stay on at tens of thousands of requests per second.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

RELATIVE_ACCURACY = 0.01
_GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
_LOG_GAMMA = math.log(_GAMMA)
#: Values are seconds; anything under a microsecond is recorded as one.
_MIN_VALUE = 1e-6


class LatencyHistogram:
    __slots__ = ("buckets", "count", "total", "min", "max")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = 0.0

    def record(self, seconds: float) -> None:
        v = seconds if seconds > _MIN_VALUE else _MIN_VALUE
        i = math.ceil(math.log(v) / _LOG_GAMMA)
        b = self.buckets
        b[i] = b.get(i, 0) + 1
        self.count += 1
        self.total += seconds
        if seconds < self.min:
            self.min = seconds
        if seconds > self.max:
            self.max = seconds

    def merge(self, others: Iterable[LatencyHistogram]) -> None:
        for o in others:
            for i, n in o.buckets.items():
                self.buckets[i] = self.buckets.get(i, 0) + n
            self.count += o.count
            self.total += o.total
            self.min = min(self.min, o.min)
            self.max = max(self.max, o.max)

    @staticmethod
    def _value(i: int) -> float:
        return 2 * _GAMMA ** i / (_GAMMA + 1)

    def quantile(self, q: float) -> float | None:
        """The value at rank ceil(q * count) (nearest-rank), within 1 %; None when empty."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for i in sorted(self.buckets):
            seen += self.buckets[i]
            if seen >= rank:
                return min(max(self._value(i), self.min), self.max)
        return self.max

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def bars(self, rows: int = 10) -> list[tuple[float, float, int]]:
        """(low, high, count) for ``rows`` log-spaced ranges between min and max, for a text chart."""
        if not self.count:
            return []
        lo, hi = max(self.min, _MIN_VALUE), max(self.max, _MIN_VALUE)
        if hi <= lo * 1.0001:
            return [(lo, hi, self.count)]
        edges = [lo * (hi / lo) ** (k / rows) for k in range(rows + 1)]
        counts = [0] * rows
        for i, n in self.buckets.items():
            v = min(max(self._value(i), lo), hi)
            k = min(rows - 1, int(math.log(v / lo) / math.log(hi / lo) * rows))
            counts[k] += n
        return [(edges[k], edges[k + 1], counts[k]) for k in range(rows)]
