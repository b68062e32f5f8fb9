"""Envoy-compatible stats: a tiny store plus Envoy's three admin renderings.

Why hand-rolled: the sidecar must stay under 25 MB RSS and handle tens of
thousands of requests/s, so ``prometheus_client`` (memory, locks, label
lookups per increment) is out. A stat here is a plain slotted object the data
path increments directly (``c.value += 1``); every name is formatted once, when
the stat is created, never per request. No locks: the data path and the admin
endpoint run on the same event loop thread.

Names are Envoy's dotted names (``cluster.<name>.upstream_rq_200``) so that
``/stats`` reads like Envoy's; ``render_prometheus`` applies Envoy's default
tag extractors so Grafana dashboards and queries written against Envoy
(``envoy_cluster_upstream_rq{envoy_response_code="200",envoy_cluster_name=..}``)
work unchanged.
"""

from __future__ import annotations

import math
import os
import re
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from sidecar.safe_regex import RegexError, compile_regex

#: Envoy's default histogram bucket upper bounds, in ms.
BUCKETS: tuple[float, ...] = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
                              300000, 600000, 1800000, 3600000)
#: The quantiles Envoy's /stats shows for histograms (as fractions; JSON shows them in percent).
QUANTILES: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0)


class _Value:
    """A named number the data path bumps directly (``c.value += 1``): no call on the hot path."""

    __slots__ = ("name", "value")

    def __init__(self, name: str) -> None:
        self.name = name
        self.value = 0

    def inc(self, n: int = 1) -> None:
        self.value += n


class Counter(_Value):
    """Only ever goes up (Prometheus ``counter``)."""

    __slots__ = ()


class Gauge(_Value):
    """Goes up and down: active connections, membership (Prometheus ``gauge``)."""

    __slots__ = ()

    def dec(self, n: int = 1) -> None:
        self.value -= n

    def set(self, value: int) -> None:
        self.value = value


class DerivedGauge:
    """A gauge read from the state it describes (open connections, requests in flight), never kept by hand.

    Nothing can increment it, so it cannot drift from its source or be right only after a render.
    """

    __slots__ = ("name", "source")

    def __init__(self, name: str, source: Callable[[], int]) -> None:
        self.name = name
        self.source = source

    @property
    def value(self) -> int:
        return self.source()


class Histogram:
    """Fixed-bucket histogram in ms, Envoy's default buckets.

    Per record: one bisect on a 19-tuple plus a few adds. Counts are kept per
    bucket (not cumulative) so recording touches one slot; cumulative counts
    are computed at render time (``cumulative_counts``). Min and max are kept
    so that P0/P100 and the interpolation at the edges are exact.
    """

    __slots__ = ("name", "counts", "count", "sum", "min", "max")

    def __init__(self, name: str) -> None:
        self.name = name
        self.counts = [0] * (len(BUCKETS) + 1)  # last slot: above the last bound (+Inf)
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def record(self, value_ms: float) -> None:
        self.counts[bisect_left(BUCKETS, value_ms)] += 1
        self.count += 1
        self.sum += value_ms
        if value_ms < self.min:
            self.min = value_ms
        if value_ms > self.max:
            self.max = value_ms

    def cumulative_counts(self) -> list[int]:
        """Counts of samples <= each bound of ``BUCKETS``, then the total (the +Inf bucket)."""
        out = []
        acc = 0
        for c in self.counts:
            acc += c
            out.append(acc)
        return out

    def quantile(self, q: float) -> float:
        """Estimate the q-quantile (0..1) by linear interpolation inside the bucket holding it.

        NaN when empty (Envoy prints ``nan`` then). Bucket edges are clamped to
        the observed min/max, so a single sample gives exactly that sample.
        """
        if self.count == 0:
            return math.nan
        if q <= 0.0:
            return self.min
        if q >= 1.0:
            return self.max
        rank = q * self.count
        acc = 0
        for i, c in enumerate(self.counts):
            if c and acc + c >= rank:
                lo = BUCKETS[i - 1] if i > 0 else 0.0
                hi = BUCKETS[i] if i < len(BUCKETS) else self.max
                lo = max(lo, self.min)
                hi = min(hi, self.max)
                return lo + (hi - lo) * ((rank - acc) / c)
            acc += c
        return self.max


# --- Envoy's default tag extraction (for Prometheus) ---------------------------------------------------------------

#: Sub-scopes that may sit between a cluster's name and the stat (``cluster.<c>.retry.upstream_rq_500``), used to
#: find where a never-registered cluster's name ends.
_CLUSTER_SUBSCOPES = ("circuit_breakers.default.", "circuit_breakers.high.", "retry.", "outlier_detection.",
                      "health_check.", "internal.", "external.", "canary.", "lb_subsets.")
_RE_CODE = re.compile(r"_rq_(\d{3})$")
_RE_CODE_CLASS = re.compile(r"_rq_(\d)xx$")
# Envoy's listener address extractor: digits/dots/underscores (IPv4_port) or the IPv6 form "[__1]_80".
_RE_LISTENER_ADDR = re.compile(r"^listener\.([_.0-9]*|[_\[\]a-fA-F0-9]*)\.")
_RE_PROM_INVALID = re.compile(r"[^a-zA-Z0-9_]")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _longest_registered(rest: str, names: set[str]) -> str | None:
    """Longest registered name ``n`` such that ``rest`` starts with ``n + "."``."""
    best = None
    i = rest.find(".")
    while i > 0:
        if rest[:i] in names:
            best = rest[:i]
        i = rest.find(".", i + 1)
    return best


def _split_cluster(rest: str, clusters: set[str]) -> tuple[str, str] | None:
    """Split ``<cluster name>.<stat>`` knowing the stat's structure, not by the first dot.

    Cluster names may contain dots ("b.service"), so: a registered cluster
    name wins (longest match); otherwise the stat is the last segment, widened
    to a known sub-scope (``retry.``, ``circuit_breakers.default.`` ...).
    """
    name = _longest_registered(rest, clusters)
    if name is not None:
        return name, rest[len(name) + 1:]
    cut = rest.rfind(".")
    if cut <= 0:
        return None
    head = rest[:cut + 1]
    for sub in _CLUSTER_SUBSCOPES:
        if head.endswith("." + sub):
            cut = len(head) - len(sub) - 1
            break
    return rest[:cut], rest[cut + 1:]


def _split_hcm(rest: str, prefixes: set[str]) -> tuple[str, str] | None:
    """Split ``<stat_prefix>.<stat>``: a registered prefix wins, else the first segment (Envoy's ``(.*?)\\.``)."""
    name = _longest_registered(rest, prefixes)
    if name is not None:
        return name, rest[len(name) + 1:]
    cut = rest.find(".")
    if cut <= 0:
        return None
    return rest[:cut], rest[cut + 1:]


def extract_tags(name: str, clusters: set[str] = frozenset(), hcm_prefixes: set[str] = frozenset()
                 ) -> tuple[str, list[tuple[str, str]]]:
    """Envoy's default tag extraction: (prometheus metric name, [(label, value), ...]).

    Labels come in the order Envoy prints them (response code first, the
    scope name last). The metric name is ``envoy_`` + the remaining dotted
    name with anything not ``[a-zA-Z0-9_]`` turned into ``_``.
    """
    tail: list[tuple[str, str]] = []
    scope: list[tuple[str, str]] = []
    if "_rq_" in name:
        m = _RE_CODE.search(name)
        if m:
            tail.append(("envoy_response_code", m.group(1)))
            name = name[:m.start()] + "_rq"
        else:
            m = _RE_CODE_CLASS.search(name)
            if m:
                tail.append(("envoy_response_code_class", m.group(1)))
                name = name[:m.start()] + "_rq_xx"
    if name.startswith("cluster."):
        split = _split_cluster(name[8:], clusters)
        if split is not None:
            scope.append(("envoy_cluster_name", split[0]))
            name = "cluster." + split[1]
    elif name.startswith("http."):
        split = _split_hcm(name[5:], hcm_prefixes)
        if split is not None:
            scope.append(("envoy_http_conn_manager_prefix", split[0]))
            name = "http." + split[1]
    elif name.startswith("listener."):
        m = _RE_LISTENER_ADDR.match(name)
        if m and m.group(1):
            addr = m.group(1)
            rest = name[m.end():]
            if rest.startswith("http."):
                split = _split_hcm(rest[5:], hcm_prefixes)
                if split is not None:
                    scope.append(("envoy_http_conn_manager_prefix", split[0]))
                    rest = "http." + split[1]
            scope.append(("envoy_listener_address", addr))
            name = "listener." + rest
    return "envoy_" + _RE_PROM_INVALID.sub("_", name), tail + scope


def _num(v: float) -> str:
    """Short number text for /stats and JSON-free output: ints without a point, floats to 10 digits."""
    if v != v:  # nan
        return "nan"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.10g}"


class Store:
    """Get-or-create registry of all stats of one sidecar.

    Lookups are dict gets; hot-path code should look a stat up once (or use
    the ``*Stats`` classes below) and keep the object.
    """

    def __init__(self) -> None:
        self.counters: dict[str, Counter] = {}
        self.gauges: dict[str, Gauge] = {}
        self.histograms: dict[str, Histogram] = {}
        self._clusters: set[str] = set()
        self._hcm_prefixes: set[str] = set()
        self._render_hooks: list[Callable[[], None]] = []
        self._tag_cache: dict[str, tuple[str, str]] = {}

    def counter(self, name: str) -> Counter:
        c = self.counters.get(name)
        if c is None:
            c = self.counters[name] = Counter(name)
        return c

    def gauge(self, name: str) -> Gauge:
        g = self.gauges.get(name)
        if g is None:
            g = self.gauges[name] = Gauge(name)
        return g

    def derived_gauge(self, name: str, source: Callable[[], int]) -> DerivedGauge:
        """Register (or replace) the gauge ``name`` as a view of ``source``."""
        g = DerivedGauge(name, source)
        self.gauges[name] = g  # type: ignore[assignment]
        return g

    def histogram(self, name: str) -> Histogram:
        h = self.histograms.get(name)
        if h is None:
            h = self.histograms[name] = Histogram(name)
        return h

    def register_cluster(self, name: str) -> None:
        """Tell tag extraction that ``cluster.<name>.`` is a scope (needed for names with dots)."""
        self._clusters.add(name)
        self._tag_cache.clear()

    def register_hcm_prefix(self, prefix: str) -> None:
        self._hcm_prefixes.add(prefix)
        self._tag_cache.clear()

    def add_render_hook(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` before every rendering (to refresh gauges that are only worth computing when read)."""
        self._render_hooks.append(hook)

    def _refresh(self) -> None:
        for hook in self._render_hooks:
            hook()

    @staticmethod
    def _matcher(filter: str | None) -> Callable[[str], object] | None:
        if not filter:
            return None
        try:
            return compile_regex(filter).search
        except RegexError as e:
            raise ValueError(f"invalid filter regex {filter!r}: {e}") from e

    # --- /stats ---

    @staticmethod
    def _selected(tables: tuple[dict[str, Any], ...], match: Callable[[str], object] | None,
                  used_only: bool) -> list[tuple[str, Any]]:
        """The (name, stat) pairs a render shows: ``?filter=`` and ``?usedonly`` applied once, here."""
        return [(name, v) for d in tables for name, v in d.items()
                if not (used_only and not v.value) and (match is None or match(name))]

    def render_text(self, filter: str | None = None, used_only: bool = False) -> str:
        """Envoy's ``/stats``: sorted ``name: value`` lines for counters and gauges, then histograms.

        ``filter`` is a regex searched in the name (Envoy's ``?filter=``);
        ``used_only`` keeps counters/gauges that are non-zero and histograms
        with samples (we have no "used" bit: a stat that was used and is back
        to 0 is omitted).
        """
        self._refresh()
        match = self._matcher(filter)
        items = sorted((name, v.value) for name, v in self._selected((self.counters, self.gauges), match, used_only))
        lines = [f"{name}: {value}" for name, value in items]
        for name in sorted(self.histograms):
            h = self.histograms[name]
            if (used_only and not h.count) or (match is not None and not match(name)):
                continue
            if h.count == 0:
                lines.append(f"{name}: No recorded values")
            else:
                qs = " ".join(f"P{_num(q * 100)}(nan,{_num(h.quantile(q))})" for q in QUANTILES)
                lines.append(f"{name}: {qs}")
        return "\n".join(lines) + ("\n" if lines else "")

    def render_json(self, filter: str | None = None, used_only: bool = False) -> dict:
        """Envoy's ``/stats?format=json``: counters/gauges as name/value, then one histograms entry."""
        self._refresh()
        match = self._matcher(filter)
        items = sorted((name, v.value) for name, v in self._selected((self.counters, self.gauges), match, used_only))
        stats: list[dict] = [{"name": name, "value": value} for name, value in items]
        computed = []
        for name in sorted(self.histograms):
            h = self.histograms[name]
            if (used_only and not h.count) or (match is not None and not match(name)):
                continue
            values = []
            for q in QUANTILES:
                v = h.quantile(q)
                values.append({"interval": None, "cumulative": None if v != v else v})
            computed.append({"name": name, "values": values})
        stats.append({"histograms": {"supported_quantiles": [q * 100 for q in QUANTILES],
                                     "computed_quantiles": computed}})
        return {"stats": stats}

    # --- /stats/prometheus ---

    def _tags(self, name: str) -> tuple[str, str]:
        """(metric name, rendered label list without braces), memoised: names never change."""
        t = self._tag_cache.get(name)
        if t is None:
            metric, labels = extract_tags(name, self._clusters, self._hcm_prefixes)
            t = (metric, ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels))
            self._tag_cache[name] = t
        return t

    def render_prometheus(self, filter: str | None = None, used_only: bool = False) -> str:
        """Envoy's ``/stats/prometheus`` (text exposition 0.0.4).

        Counters, then gauges, then histograms; within each, metrics sorted by
        name, each metric's series under one ``# TYPE`` line. Histogram
        buckets are in ms with Envoy's ``le`` spelling (``%g``: "1.8e+06").
        """
        self._refresh()
        match = self._matcher(filter)
        out: list[str] = []
        for kind, d in (("counter", self.counters), ("gauge", self.gauges)):
            groups: dict[str, list[str]] = {}
            for name, s in self._selected((d,), match, used_only):
                metric, labels = self._tags(name)
                line = f"{metric}{{{labels}}} {s.value}" if labels else f"{metric} {s.value}"
                groups.setdefault(metric, []).append(line)
            for metric in sorted(groups):
                out.append(f"# TYPE {metric} {kind}")
                out.extend(sorted(groups[metric]))
        hgroups: dict[str, list[tuple[str, Histogram]]] = {}
        for name, h in self.histograms.items():
            if (used_only and not h.count) or (match is not None and not match(name)):
                continue
            metric, labels = self._tags(name)
            hgroups.setdefault(metric, []).append((labels, h))
        for metric in sorted(hgroups):
            out.append(f"# TYPE {metric} histogram")
            for labels, h in sorted(hgroups[metric], key=lambda x: x[0]):
                sep = labels + "," if labels else ""
                cum = h.cumulative_counts()
                for bound, c in zip(BUCKETS, cum, strict=False):
                    out.append(f'{metric}_bucket{{{sep}le="{bound:g}"}} {c}')
                out.append(f'{metric}_bucket{{{sep}le="+Inf"}} {cum[-1]}')
                lb = f"{{{labels}}}" if labels else ""
                out.append(f"{metric}_sum{lb} {_num(h.sum)}")
                out.append(f"{metric}_count{lb} {h.count}")
        return "\n".join(out) + ("\n" if out else "")


# --- per-scope stat bundles for the data path ------------------------------------------------------------------------

# Only stats the sidecar really counts, with Envoy's meaning. Not exported because nothing here could count them:
# upstream_rq_rx_reset / upstream_rq_tx_reset (Envoy 1.40
# leaves them at 0 for HTTP/1 upstreams: a reset there is a connection close, see upstream_cx_destroy_*),
# update_empty (EDS only).
_CLUSTER_COUNTERS = (
    "upstream_rq_total", "upstream_rq_completed", "upstream_rq_retry", "upstream_rq_retry_success",
    "upstream_rq_retry_limit_exceeded", "upstream_rq_retry_overflow", "upstream_rq_timeout",
    "upstream_rq_per_try_timeout", "upstream_rq_pending_overflow", "upstream_rq_pending_total",
    "upstream_rq_cancelled", "upstream_cx_overflow", "upstream_cx_pool_overflow",
    "upstream_rq_active_overflow",
    "upstream_cx_total", "upstream_cx_http1_total", "upstream_cx_connect_fail", "upstream_cx_connect_timeout",
    "upstream_cx_destroy", "upstream_cx_destroy_local", "upstream_cx_destroy_remote", "upstream_cx_none_healthy",
    "upstream_cx_destroy_with_active_rq", "upstream_cx_destroy_local_with_active_rq",
    "upstream_cx_destroy_remote_with_active_rq", "upstream_rq_retry_backoff_exponential",
    "upstream_cx_rx_bytes_total", "upstream_cx_tx_bytes_total",
    "membership_change", "update_attempt", "update_success", "update_failure",
)
#: upstream_rq_active and upstream_rq_pending_active are views of the cluster's state (``ClusterRuntime``).
_CLUSTER_GAUGES = ("upstream_cx_active", "membership_total", "membership_healthy")
_CLUSTER_HISTOGRAMS = ("upstream_rq_time", "upstream_cx_connect_ms", "upstream_cx_length_ms")


class ClusterStats:
    """Envoy's ``cluster.<name>.*`` stats, pre-created as attributes for the hot path.

    Per-code counters (``upstream_rq_200``) are created on first use, as in
    Envoy, and cached per code so later calls are a dict get and two adds.
    """

    __slots__ = ("store", "cluster", "prefix", "_codes", "_retry_codes") + _CLUSTER_COUNTERS + _CLUSTER_GAUGES \
        + _CLUSTER_HISTOGRAMS

    def __init__(self, store: Store, cluster: str) -> None:
        self.store = store
        self.cluster = cluster
        self.prefix = p = f"cluster.{cluster}."
        store.register_cluster(cluster)
        for n in _CLUSTER_COUNTERS:
            setattr(self, n, store.counter(p + n))
        for n in _CLUSTER_GAUGES:
            setattr(self, n, store.gauge(p + n))
        for n in _CLUSTER_HISTOGRAMS:
            setattr(self, n, store.histogram(p + n))
        self._codes: dict[int, tuple[Counter, Counter]] = {}
        self._retry_codes: dict[int, tuple[Counter, Counter]] = {}

    def _make(self, table: dict[int, tuple[Counter, Counter]], scope: str, code: int) -> tuple[Counter, Counter]:
        pair = (self.store.counter(f"{scope}upstream_rq_{code}"),
                self.store.counter(f"{scope}upstream_rq_{code // 100}xx"))
        table[code] = pair
        return pair

    def response(self, code: int) -> None:
        """Count a FINAL upstream response: ``upstream_rq_<code>`` and ``upstream_rq_<N>xx``.

        Does not touch ``upstream_rq_completed`` (the caller counts that, once per attempt).
        """
        pair = self._codes.get(code)
        if pair is None:
            pair = self._make(self._codes, self.prefix, code)
        pair[0].value += 1
        pair[1].value += 1

    def retry_response(self, code: int) -> None:
        """Count an upstream response that TRIGGERED a retry: ``retry.upstream_rq_<code>`` / ``<N>xx``."""
        pair = self._retry_codes.get(code)
        if pair is None:
            pair = self._make(self._retry_codes, self.prefix + "retry.", code)
        pair[0].value += 1
        pair[1].value += 1


# Not exported because nothing here could count them: downstream_rq_timeout (no request_timeout),
# downstream_rq_too_large (large bodies are streamed, never refused), no_cluster (routes to unknown clusters are
# refused when the configuration is loaded).
_HCM_COUNTERS = (
    "downstream_cx_total", "downstream_cx_destroy", "downstream_cx_http1_total", "downstream_cx_protocol_error",
    "downstream_cx_rx_bytes_total", "downstream_cx_tx_bytes_total", "downstream_cx_idle_timeout",
    "downstream_rq_total", "downstream_rq_http1_total", "downstream_rq_completed",
    "downstream_rq_idle_timeout", "downstream_rq_rx_reset", "downstream_rq_tx_reset",
    "downstream_rq_1xx", "downstream_rq_2xx", "downstream_rq_3xx", "downstream_rq_4xx", "downstream_rq_5xx",
    "no_route", "rq_direct_response", "rq_total",
)
#: downstream_rq_active is a view of the connection manager's streams (``HcmRuntime``).
_HCM_GAUGES = ("downstream_cx_active", "downstream_cx_http1_active")
_HCM_HISTOGRAMS = ("downstream_rq_time", "downstream_cx_length_ms")


class HcmStats:
    """Envoy's ``http.<stat_prefix>.*`` stats (connection manager + router), pre-created.

    Envoy creates ``downstream_rq_1xx``..``5xx`` up front for a connection
    manager, so we do too (they show as 0 before traffic).
    """

    __slots__ = ("store", "prefix", "_xx") + _HCM_COUNTERS + _HCM_GAUGES + _HCM_HISTOGRAMS

    def __init__(self, store: Store, stat_prefix: str) -> None:
        self.store = store
        store.register_hcm_prefix(stat_prefix)
        self.prefix = p = f"http.{stat_prefix}."
        for n in _HCM_COUNTERS:
            setattr(self, n, store.counter(p + n))
        for n in _HCM_GAUGES:
            setattr(self, n, store.gauge(p + n))
        for n in _HCM_HISTOGRAMS:
            setattr(self, n, store.histogram(p + n))
        self._xx = (None, self.downstream_rq_1xx, self.downstream_rq_2xx, self.downstream_rq_3xx,
                    self.downstream_rq_4xx, self.downstream_rq_5xx)  # indexed by code // 100

    def response(self, code: int) -> None:
        """Count a response sent downstream: ``downstream_rq_<N>xx`` and ``downstream_rq_completed``.

        Code 0 (no response was sent, e.g. the client went away) counts nothing, as in Envoy.
        """
        if 100 <= code < 600:
            self._xx[code // 100].value += 1
            self.downstream_rq_completed.value += 1


def listener_stat_address(address: str, port: int) -> str:
    """Envoy's listener scope name: "127.0.3.1_80", IPv6 "[__1]_80" (':' is not allowed in stat names)."""
    if ":" in address:
        return f"[{address.replace(':', '_')}]_{port}"
    return f"{address}_{port}"


# Not exported: downstream_cx_overflow (no listener connection limit), no_filter_chain_match (one filter chain).
_LISTENER_COUNTERS = ("downstream_cx_total", "downstream_cx_destroy")
_LISTENER_GAUGES = ("downstream_cx_active",)
_LISTENER_HTTP = ("downstream_rq_1xx", "downstream_rq_2xx", "downstream_rq_3xx", "downstream_rq_4xx",
                  "downstream_rq_5xx", "downstream_rq_completed")


class ListenerStats:
    """Envoy's ``listener.<addr>_<port>.*`` stats, incl. the per-listener ``http.<prefix>.downstream_rq_<N>xx``.

    ``address`` is the listener's stat scope, "<ip>_<port>" ("127.0.3.1_80");
    an IPv6 "::1_80" is turned into Envoy's "[__1]_80" (no ':' in stat names).
    """

    __slots__ = ("prefix", "http_prefix", "_xx", "downstream_cx_length_ms") + _LISTENER_COUNTERS \
        + _LISTENER_GAUGES + _LISTENER_HTTP

    def __init__(self, store: Store, address: str, stat_prefix: str | None = None) -> None:
        if ":" in address and not address.startswith("["):
            host, _, port = address.rpartition("_")
            address = listener_stat_address(host, int(port)) if host and port.isdigit() else address.replace(":", "_")
        self.prefix = p = f"listener.{address}."
        for n in _LISTENER_COUNTERS:
            setattr(self, n, store.counter(p + n))
        for n in _LISTENER_GAUGES:
            setattr(self, n, store.gauge(p + n))
        self.downstream_cx_length_ms = store.histogram(p + "downstream_cx_length_ms")
        if stat_prefix is not None:
            store.register_hcm_prefix(stat_prefix)
            self.http_prefix = hp = f"{p}http.{stat_prefix}."
            for n in _LISTENER_HTTP:
                setattr(self, n, store.counter(hp + n))
        else:  # no HTTP connection manager: counts go nowhere
            self.http_prefix = ""
            for n in _LISTENER_HTTP:
                setattr(self, n, Counter(n))
        self._xx = (None, self.downstream_rq_1xx, self.downstream_rq_2xx, self.downstream_rq_3xx,
                    self.downstream_rq_4xx, self.downstream_rq_5xx)  # indexed by code // 100

    def response(self, code: int) -> None:
        """Count a response sent on this listener: ``http.<p>.downstream_rq_<N>xx`` and ``..._completed``."""
        if 100 <= code < 600:
            self._xx[code // 100].value += 1
            self.downstream_rq_completed.value += 1


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


#: Envoy's server.state values.
_SERVER_STATES = {"LIVE": 0, "DRAINING": 1, "PRE_INITIALIZING": 2, "INITIALIZING": 3}


class ServerStats:
    """Envoy's ``server.*`` gauges; uptime, memory and connection totals are refreshed only when rendered."""

    __slots__ = ("store", "started", "live", "state", "uptime", "memory_allocated", "memory_physical_size",
                 "total_connections", "concurrency", "version")

    def __init__(self, store: Store, concurrency: int = 1, version: int = 0) -> None:
        self.store = store
        self.started = time.monotonic()
        self.live = store.gauge("server.live")
        self.live.set(1)
        self.state = store.gauge("server.state")  # 0: LIVE
        self.uptime = store.gauge("server.uptime")
        self.memory_allocated = store.gauge("server.memory_allocated")
        self.memory_physical_size = store.gauge("server.memory_physical_size")
        # Envoy's meaning: connections open now, on every listener. Derived, so it is right whenever read.
        self.total_connections = store.derived_gauge("server.total_connections", self._open_connections)
        self.concurrency = store.gauge("server.concurrency")
        self.concurrency.set(concurrency)
        self.version = store.gauge("server.version")
        self.version.set(version)
        store.add_render_hook(self.refresh)

    def refresh(self, uptime_s: float | None = None, state: str | int | None = None) -> None:
        """Update the read-time gauges (the store calls this, without arguments, before each rendering).

        ``state`` is Envoy's server state, by name ("LIVE", "DRAINING",
        "PRE_INITIALIZING", "INITIALIZING") or number; it is kept until the
        next call that gives one. ``uptime_s`` defaults to the time since this
        object was created.
        """
        if state is not None:
            self.state.set(_SERVER_STATES.get(state, 0) if isinstance(state, str) else int(state))
        self.uptime.set(int(time.monotonic() - self.started if uptime_s is None else uptime_s))
        rss = _rss_bytes()
        self.memory_allocated.set(rss)
        self.memory_physical_size.set(rss)

    def _open_connections(self) -> int:
        return sum(g.value for name, g in self.store.gauges.items()
                   if name.startswith("listener.") and name.endswith(".downstream_cx_active") and ".http." not in name)


# --- tracing ---------------------------------------------------------------------------------------------------------

#: The connection manager's tracing decisions (Envoy's ``http.<prefix>.tracing.*``), created only for a connection
#: manager that traces. Not exported: service_forced (x-envoy-force-trace is not honoured), not_traceable (any
#: x-request-id may carry a trace) and health_check (no health-check filter): nothing here could count them.
_TRACING_HCM_COUNTERS = ("random_sampling", "client_enabled")
#: Envoy's Zipkin reporter (``tracing.zipkin.*``), one scope per process. Not exported: reports_skipped_no_cluster
#: (a missing collector cluster is refused when the configuration loads, as Envoy does) and reports_failed (Envoy
#: 1.40 turns a failed report into a local 503/504 and counts it as reports_dropped; so do we). spans_dropped is
#: ours: spans refused because the bounded buffer was full while the collector was slow or down.
_ZIPKIN_COUNTERS = ("spans_sent", "timer_flushed", "reports_sent", "reports_dropped", "spans_dropped")


class TracingStats:
    """``http.<stat_prefix>.tracing.*`` of one traced connection manager."""

    __slots__ = _TRACING_HCM_COUNTERS

    def __init__(self, store: Store, stat_prefix: str) -> None:
        for n in _TRACING_HCM_COUNTERS:
            setattr(self, n, store.counter(f"http.{stat_prefix}.tracing.{n}"))


class ZipkinStats:
    """``tracing.zipkin.*``: what the span reporter sent, flushed and dropped."""

    __slots__ = _ZIPKIN_COUNTERS

    def __init__(self, store: Store) -> None:
        for n in _ZIPKIN_COUNTERS:
            setattr(self, n, store.counter(f"tracing.zipkin.{n}"))
