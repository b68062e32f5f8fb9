"""The collector's memory: the last N traces, least recently *reported* first out.

Bounded two ways, so the collector's size is known whatever the senders do: at most ``max_traces`` traces
(a new trace evicts the one whose last span arrived longest ago: a long-running trace that keeps reporting
stays) and at most ``max_spans_per_trace`` spans in one trace (beyond it spans are dropped, so a runaway loop
in one request cannot evict everything else). Every eviction and drop is counted for ``/metrics``.

The queries are Zipkin's (``/api/v2/traces``, ``/trace/{id}``, ``/services``, ``/spans``) over a
few thousand traces in memory: a scan per query is microseconds per trace, and it keeps intake O(1).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from meshctl.tracing.spans import Span, service_of


@dataclass
class Trace:
    spans: list[Span] = field(default_factory=list)
    #: When its last span arrived (monotonic): the LRU order, and `meshctl trace --follow`'s "quiet" test.
    last_seen: float = 0.0
    services: set[str] = field(default_factory=set)
    #: The earliest span timestamp and the latest span end, µs since the epoch (0: no timed span yet).
    start_us: int = 0
    end_us: int = 0

    def add(self, span: Span) -> None:
        self.spans.append(span)
        if service := service_of(span):
            self.services.add(service)
        ts = span.get("timestamp")
        if ts:
            self.start_us = ts if not self.start_us else min(self.start_us, ts)
            self.end_us = max(self.end_us, ts + span.get("duration", 0))


@dataclass
class Counters:
    spans_accepted: int = 0
    #: Spans refused because their trace already holds ``max_spans_per_trace``.
    spans_dropped_trace_full: int = 0
    traces_evicted: int = 0


class TraceStore:
    def __init__(self, max_traces: int = 1000, max_spans_per_trace: int = 1000) -> None:
        if max_traces < 1 or max_spans_per_trace < 1:
            raise ValueError("max_traces and max_spans_per_trace must be at least 1")
        self.max_traces = max_traces
        self.max_spans_per_trace = max_spans_per_trace
        self.traces: OrderedDict[str, Trace] = OrderedDict()
        self.counters = Counters()
        self.span_count = 0

    def add(self, spans: Iterable[Span], now: float | None = None) -> tuple[list[Span], int]:
        """Keep ``spans`` (normalised); returns (the spans kept, how many were dropped: their trace was full)."""
        now = time.monotonic() if now is None else now
        kept: list[Span] = []
        dropped = 0
        for span in spans:
            tid = span["traceId"]
            trace = self.traces.get(tid)
            if trace is None:
                trace = self.traces[tid] = Trace()
                while len(self.traces) > self.max_traces:
                    _, old = self.traces.popitem(last=False)
                    self.span_count -= len(old.spans)
                    self.counters.traces_evicted += 1
            else:
                self.traces.move_to_end(tid)
            trace.last_seen = now
            if len(trace.spans) >= self.max_spans_per_trace:
                dropped += 1
                continue
            trace.add(span)
            kept.append(span)
        self.span_count += len(kept)
        self.counters.spans_accepted += len(kept)
        self.counters.spans_dropped_trace_full += dropped
        return kept, dropped

    def get(self, trace_id: str) -> list[Span] | None:
        """A trace's spans by its (normalised) id; a 64-bit id also finds the 128-bit trace it is the low half
        of, as Zipkin does when it is not strict about trace ids."""
        trace = self.traces.get(trace_id)
        if trace is None and len(trace_id) == 16:
            trace = next((t for tid, t in self.traces.items() if len(tid) == 32 and tid.endswith(trace_id)), None)
        return None if trace is None else list(trace.spans)

    def query(self, service: str | None = None, span_name: str | None = None, end_ts_ms: int | None = None,
              lookback_ms: int | None = None, limit: int = 10, min_duration_us: int | None = None,
              max_duration_us: int | None = None) -> list[list[Span]]:
        """Zipkin's ``GET /api/v2/traces``: traces with a span of ``service`` (named ``span_name``) that started
        in [end - lookback, end], newest first, at most ``limit``."""
        end_us = (end_ts_ms if end_ts_ms is not None else int(time.time() * 1000)) * 1000
        begin_us = end_us - (lookback_ms if lookback_ms is not None else 86_400_000) * 1000
        service = service.lower() if service else None
        span_name = span_name.lower() if span_name else None
        found: list[tuple[int, int, Trace]] = []
        for order, trace in enumerate(self.traces.values()):
            if not begin_us <= trace.start_us <= end_us:
                continue
            if service is not None and service not in trace.services:
                continue
            if span_name is not None or min_duration_us is not None or max_duration_us is not None:
                if not any(_matches(s, service, span_name, min_duration_us, max_duration_us) for s in trace.spans):
                    continue
            found.append((trace.start_us, order, trace))
        found.sort(key=lambda item: (item[0], item[1]), reverse=True)
        return [list(t.spans) for _, _, t in found[:limit]]

    def services(self) -> list[str]:
        return sorted({s for t in self.traces.values() for s in t.services})

    def span_names(self, service: str) -> list[str]:
        service = service.lower()
        return sorted({s["name"].lower() for t in self.traces.values() if service in t.services
                       for s in t.spans if s.get("name") and service_of(s) == service})

    def remote_services(self, service: str) -> list[str]:
        service = service.lower()
        return sorted({s["remoteEndpoint"]["serviceName"] for t in self.traces.values() if service in t.services
                       for s in t.spans if service_of(s) == service
                       and s.get("remoteEndpoint", {}).get("serviceName")})


def _matches(span: Span, service: str | None, name: str | None, min_us: int | None, max_us: int | None) -> bool:
    if service is not None and service_of(span) != service:
        return False
    if name is not None and span.get("name", "").lower() != name:
        return False
    duration = span.get("duration")
    if min_us is not None and (duration is None or duration < min_us):
        return False
    return not (max_us is not None and (duration is None or duration > max_us))
