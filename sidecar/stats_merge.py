"""One view of the stats of N worker processes (``--concurrency N``, sidecar/workers.py).

A worker's ``snapshot`` of its store is plain data (dicts of numbers, sent to the parent with ``marshal``); the
parent folds the snapshots into a ``MergedStore``, a ``Store`` whose values are overwritten before each rendering,
so ``/stats``, ``/stats?format=json`` and ``/stats/prometheus`` render it with the single process's code.

How values combine is Envoy's across its worker threads:

* counters add up; a worker that exits leaves its last counts behind (``Totals.retire``), so a sum never goes
  down when a worker is restarted (Prometheus would read that as a counter reset);
* histograms merge: bucket counts, count and sum add up, min and max are the extremes (quantiles are then
  computed from the merged buckets, as Envoy merges its per-thread histograms);
* gauges that count work in flight (connections, requests, active faults) add up; gauges that describe a
  cluster's state, which every worker keeps for itself (``membership_*``, ``health_check.healthy``,
  ``outlier_detection.ejections_active``, ``circuit_breakers.*``), show the largest worker's value; ``server.*``
  gauges are the parent's own (state, uptime, concurrency), the memory gauges the parent's plus the workers';
* Envoy's per-worker listener stats, ``listener.<address>.worker_<i>.downstream_cx_total`` and
  ``downstream_cx_active``, are added, tagged ``envoy_worker_id`` in Prometheus as Envoy tags them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from sidecar.stats import Store

#: A histogram as plain data: (per-bucket counts, count, sum, min, max).
HistData = tuple[list[int], int, float, float, float]
Snapshot = dict[str, Any]

#: Gauges describing a cluster's state rather than counting work: the largest worker's value, never a sum.
_STATE_GAUGE_SUFFIXES = (".membership_total", ".membership_healthy", ".membership_degraded", ".membership_excluded",
                         ".health_check.healthy", ".health_check.degraded", ".outlier_detection.ejections_active")
_SERVER_MEMORY = ("server.memory_allocated", "server.memory_physical_size")
#: Envoy's per-handler listener stats (``listener.<address>.worker_<i>.<stat>``).
_PER_WORKER = ("downstream_cx_total", "downstream_cx_active")
_RE_WORKER_STAT = re.compile(r"^(listener\.(?:[_.0-9]*|[_\[\]a-fA-F0-9]*)\.)worker_(\d+)\.(.+)$")


def snapshot(store: Store) -> Snapshot:
    """Every stat of ``store`` as plain data (read-time gauges refreshed first), for ``marshal``."""
    store._refresh()
    return {
        "counters": {n: c.value for n, c in store.counters.items()},
        "gauges": {n: g.value for n, g in store.gauges.items()},
        "histograms": {n: (list(h.counts), h.count, h.sum, h.min, h.max) for n, h in store.histograms.items()},
        "clusters": sorted(store._clusters),
        "hcm_prefixes": sorted(store._hcm_prefixes),
    }


def _is_state_gauge(name: str) -> bool:
    return name.endswith(_STATE_GAUGE_SUFFIXES) or ".circuit_breakers." in name


def _listener_scope(name: str, stat: str) -> str | None:
    """``listener.<address>`` when ``name`` is that listener's own ``stat`` (not a connection manager's)."""
    if name.startswith("listener.") and name.endswith("." + stat) and ".http." not in name:
        return name[:-len(stat) - 1]
    return None


def merge_hist(into: dict[str, HistData], name: str, h: HistData) -> None:
    cur = into.get(name)
    if cur is None:
        into[name] = (list(h[0]), h[1], h[2], h[3], h[4])
        return
    counts = [a + b for a, b in zip(cur[0], h[0], strict=True)]
    into[name] = (counts, cur[1] + h[1], cur[2] + h[2], min(cur[3], h[3]), max(cur[4], h[4]))


class Totals:
    """What the processes that served one worker slot counted, the dead ones included."""

    __slots__ = ("counters", "histograms")

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self.histograms: dict[str, HistData] = {}

    def retire(self, snap: Snapshot | None) -> None:
        """Keep the counters and histograms of a worker that exited (its gauges end with it)."""
        if not snap:
            return
        counters = self.counters
        for name, v in snap["counters"].items():
            counters[name] = counters.get(name, 0) + v
        for name, h in snap["histograms"].items():
            merge_hist(self.histograms, name, h)


class MergedStore(Store):
    """The parent's store: the workers' stats folded together (``update``), rendered by ``Store``'s code."""

    def __init__(self) -> None:
        super().__init__()
        self.worker_memory = 0  # the workers' RSS: ``add_worker_memory`` adds it to the parent's own

    def add_worker_memory(self) -> None:
        """A render hook, registered after ``ServerStats``' (which sets server.memory_* to this process's RSS)."""
        for name in _SERVER_MEMORY:
            g = self.gauges.get(name)
            if g is not None:
                g.value += self.worker_memory

    def open_connections(self) -> int:
        """``server.total_connections``: every listener's open connections, the per-worker copies left out."""
        total = 0
        for name, g in self.gauges.items():
            scope = _listener_scope(name, "downstream_cx_active")
            if scope is not None and ".worker_" not in scope:
                total += g.value
        return total

    def update(self, slots: Iterable[tuple[Totals, Snapshot | None]]) -> None:
        """Set every stat to the sum over the worker slots: each slot's retired totals plus its live snapshot."""
        counters: dict[str, int] = {}
        gauges: dict[str, int] = {}
        hists: dict[str, HistData] = {}
        memory = 0
        for i, (retired, snap) in enumerate(slots):
            live_counters = snap["counters"] if snap else {}
            for table in (retired.counters, live_counters):
                for name, v in table.items():
                    counters[name] = counters.get(name, 0) + v
                    scope = _listener_scope(name, "downstream_cx_total")
                    if scope is not None:
                        per = f"{scope}.worker_{i}.downstream_cx_total"
                        counters[per] = counters.get(per, 0) + v
            for name, h in retired.histograms.items():
                merge_hist(hists, name, h)
            if not snap:
                continue
            for name, h in snap["histograms"].items():
                merge_hist(hists, name, h)
            for name, v in snap["gauges"].items():
                if name.startswith("server."):
                    if name == _SERVER_MEMORY[0]:
                        memory += v
                    continue
                if _is_state_gauge(name):
                    gauges[name] = max(gauges.get(name, v), v)
                else:
                    gauges[name] = gauges.get(name, 0) + v
                scope = _listener_scope(name, "downstream_cx_active")
                if scope is not None:
                    gauges[f"{scope}.worker_{i}.downstream_cx_active"] = v
            for name in snap["clusters"]:
                if name not in self._clusters:
                    self.register_cluster(name)
            for prefix in snap["hcm_prefixes"]:
                if prefix not in self._hcm_prefixes:
                    self.register_hcm_prefix(prefix)
        for name, v in counters.items():
            self.counter(name).value = v
        for name, g in self.gauges.items():
            if not name.startswith("server.") and name not in gauges:
                g.value = 0  # no live worker has it now (a per-worker gauge of a worker being restarted)
        for name, v in gauges.items():
            self.gauge(name).value = v
        for name, (counts, count, total, lo, hi) in hists.items():
            h = self.histograms.get(name)
            if h is None:
                h = self.histogram(name)
            h.counts = counts
            h.count = count
            h.sum = total
            h.min = lo
            h.max = hi
        self.worker_memory = memory

    def _tags(self, name: str) -> tuple[str, str]:
        """Envoy's ``envoy.worker_id`` tag: ``listener.<a>.worker_0.downstream_cx_total`` is
        ``envoy_listener_worker_downstream_cx_total{envoy_worker_id="0",envoy_listener_address="<a>"}``."""
        t = self._tag_cache.get(name)
        if t is not None:
            return t
        m = _RE_WORKER_STAT.match(name)
        if m is None:
            return super()._tags(name)
        metric, labels = super()._tags(m.group(1) + m.group(3))
        metric = metric.replace("envoy_listener_", "envoy_listener_worker_", 1)
        t = (metric, f'envoy_worker_id="{m.group(2)}"' + ("," + labels if labels else ""))
        self._tag_cache[name] = t
        return t

