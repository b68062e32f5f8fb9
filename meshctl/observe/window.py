"""Sliding-window arithmetic over scraped counters and histograms.

Rates and percentiles come from the difference between two scrapes, never
from lifetime totals: a pod that was slow an hour ago must not look slow
now. A counter that went down was reset (its process restarted); what it
counted since the restart is the best estimate of the window's activity,
and a delta is never negative.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


def counter_delta(old: float | None, new: float | None) -> float | None:
    """Increase of a counter between two scrapes; None when the counter does not exist (now)."""
    if new is None:
        return None
    if old is None or new < old:  # new series, or reset by a restart
        return new
    return new - old


def bucket_deltas(old: Mapping[float, float] | None, new: Mapping[float, float]) -> dict[float, float]:
    """Per-``le`` increase of a cumulative histogram; a reset (the +Inf count went down) starts from zero."""
    if not old or new.get(math.inf, 0.0) < old.get(math.inf, 0.0):
        return dict(new)
    return {le: max(0.0, v - old.get(le, 0.0)) for le, v in new.items()}


def histogram_quantile(q: float, cumulative: Mapping[float, float]) -> float | None:
    """Prometheus-style quantile from cumulative bucket counts (linear within the bucket)."""
    if not cumulative:
        return None
    bounds = sorted(cumulative)
    total = cumulative.get(math.inf, cumulative[bounds[-1]])
    if total <= 0:
        return None
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le in bounds:
        count = cumulative[le]
        if count >= rank:
            if math.isinf(le):
                return prev_le  # beyond the last finite bound: all we know is "at least"
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


@dataclass
class Sample(Generic[T]):
    t: float
    value: T


class Window(Generic[T]):
    """The last scrapes of one source, long enough to cover the window."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.samples: deque[Sample[T]] = deque()

    def add(self, t: float, value: T) -> None:
        self.samples.append(Sample(t, value))
        # keep one sample older than the window, so the window is always fully covered once it can be
        while len(self.samples) > 2 and self.samples[1].t <= t - self.seconds:
            self.samples.popleft()

    def span(self) -> tuple[Sample[T], Sample[T]] | None:
        """(oldest sample within reach of the window, newest); None until there are two."""
        if len(self.samples) < 2:
            return None
        return self.samples[0], self.samples[-1]
