"""`meshctl trace`: recent traces, one trace as a tree, and new traces as they complete.

Reads the mesh's collector through Zipkin's query API only (whatever serves it would do); where the collector
is comes from the supervisor's status. ``TraceError`` carries the message and exit code the user sees.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode

from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from meshctl.client import get_json
from meshctl.tracing.spans import Span, SpanError, service_of, trace_id
from meshctl.tracing.tree import Node, build, is_error, response_flags, status_code, summary, tree_json, upstream

__all__ = ["TraceError", "TraceReader", "completed", "list_table", "parse_trace_id", "summary", "summary_line",
           "trace_json", "trace_tree"]

#: `--follow` asks for at most this many traces per poll (the bound on its work per interval).
FOLLOW_BATCH = 200
#: How many printed trace ids `--follow` remembers, so a trace is printed once.
FOLLOW_MEMORY = 10_000


class TraceError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class TraceReader:
    """The collector's query API, with errors as TraceError."""

    def __init__(self, base_url: str, mesh: str, timeout: float = 10.0) -> None:
        self.base_url, self.mesh, self.timeout = base_url.rstrip("/"), mesh, timeout

    def _get(self, path: str, query: dict[str, Any] | None = None) -> tuple[int, Any]:
        url = f"{self.base_url}{path}" + (f"?{urlencode(query)}" if query else "")
        try:
            return get_json(url, self.timeout)
        except (OSError, http.client.HTTPException) as exc:
            raise TraceError(f"cannot reach the trace collector of mesh '{self.mesh}' at {self.base_url}: "
                             f"{exc}; is its pod running? (`meshctl ps -p {self.mesh}`)") from None

    def traces(self, limit: int, lookback_ms: int | None = None, service: str | None = None) -> list[list[Span]]:
        query: dict[str, Any] = {"limit": limit}
        if lookback_ms is not None:
            query["lookback"] = lookback_ms
        if service:
            query["serviceName"] = service
        status, body = self._get("/api/v2/traces", query)
        if status != 200 or not isinstance(body, list):
            raise TraceError(f"the trace collector answered HTTP {status}: {_reason(body)}")
        return [t for t in body if isinstance(t, list) and t]

    def trace(self, tid: str) -> list[Span]:
        status, body = self._get(f"/api/v2/trace/{tid}")
        if status == 404:
            raise TraceError(f"trace {tid} not found in mesh '{self.mesh}' (the collector keeps the most "
                             "recent traces only)")
        if status != 200 or not isinstance(body, list):
            raise TraceError(f"the trace collector answered HTTP {status}: {_reason(body)}")
        return body


def _reason(body: Any) -> str:
    return body.get("error", "") if isinstance(body, dict) else ""


def parse_trace_id(raw: str) -> str:
    try:
        return trace_id(raw.strip(), "a trace id")
    except SpanError:
        raise TraceError(f"{raw!r} is not a trace id (1 to 32 hex digits, as `meshctl trace` lists them)", 2) from None


# --------------------------------------------------------------------------- rendering


def _clock(us: int | None) -> str:
    if not us:
        return "-"
    return dt.datetime.fromtimestamp(us / 1e6).strftime("%H:%M:%S.%f")[:-3]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _root_text(s: dict[str, Any]) -> str:
    root = s["root"]
    what = root["path"] or root["name"] or "?"
    return f"{root['service'] or '?'} {what}".strip()


def list_table(traces: list[list[Span]], title: str) -> Table:
    table = Table(title=title, box=None, header_style="bold")
    for col in ("TRACE ID", "START", "DURATION MS", "SPANS", "SERVICES", "ERRORS", "RETRIES", "ROOT"):
        table.add_column(col, justify="right" if col in ("DURATION MS", "SPANS", "ERRORS", "RETRIES") else "left",
                         no_wrap=col == "TRACE ID")
    for spans in traces:
        s = summary(spans)
        errors = Text(str(s["errors"]), style="red" if s["errors"] else "")
        table.add_row(s["traceId"], _clock(s["start_us"]), _ms(s["duration_ms"]), str(s["span_count"]),
                      ",".join(s["services"]), errors, str(s["retries"]), _root_text(s))
    return table


def summary_line(spans: list[Span]) -> Text:
    """One trace on one line (`--follow`)."""
    s = summary(spans)
    text = Text(f"{s['traceId']}  {_clock(s['start_us'])}  {_ms(s['duration_ms']):>8} ms  {s['span_count']:>3} spans  "
                f"{','.join(s['services'])}  ")
    text.append(f"{s['errors']} errors", style="red" if s["errors"] else "")
    if s["retries"]:
        text.append(f"  {s['retries']} retries", style="yellow")
    text.append(f"  {_root_text(s)}")
    return text


def span_label(node: Node, origin_us: int | None) -> Text:
    s = node.span
    error = is_error(s)
    text = Text()
    text.append(service_of(s) or "?", style="bold red" if error else "bold")
    text.append(f"  {s.get('name') or '-'}")
    if s.get("kind"):
        text.append(f"  {s['kind']}{' (shared)' if s.get('shared') else ''}", style="dim")
    ts = s.get("timestamp")
    offset = (ts - origin_us) / 1000 if ts and origin_us else None
    text.append(f"  +{_ms(offset)} ms  {_ms(s['duration'] / 1000 if 'duration' in s else None)} ms")
    code = status_code(s)
    if code:
        text.append(f"  {code}", style="red" if error else "green")
    elif error:
        text.append("  error", style="red")
    flags = response_flags(s)
    if flags:
        text.append(f"  {flags}", style="red" if error else "yellow")
    host = upstream(s)
    if host and s.get("kind") == "CLIENT":
        text.append(f"  -> {host}", style="dim")
    if node.attempt:
        text.append(f"  attempt {node.attempt}" + (" (retry)" if node.retry else ""),
                    style="yellow" if node.retry else "dim")
    tags = s.get("tags", {})
    if tags.get("canceled") == "true":  # the proxy gave up on this attempt (retried on its status, timed out)
        text.append("  canceled", style="yellow")
    reason = tags.get("error.reason") or (tags["error"] if tags.get("error") not in (None, "", "true", code) else "")
    if reason:
        text.append(f"  {reason}", style="red")
    return text


def trace_tree(spans: list[Span]) -> Tree:
    s = summary(spans)
    roots = build(spans)
    origin = s["start_us"]
    head = Text(f"trace {s['traceId']}  {_clock(origin)}  {_ms(s['duration_ms'])} ms  {s['span_count']} spans  "
                f"{', '.join(s['services'])}")
    if s["errors"]:
        head.append(f"  {s['errors']} errors", style="red")
    if s["retries"]:
        head.append(f"  {s['retries']} retries", style="yellow")
    tree = Tree(head)

    def add(branch: Tree, node: Node) -> None:
        sub = branch.add(span_label(node, origin))
        for child in node.children:
            add(sub, child)

    for root in roots:
        add(tree, root)
    return tree


def trace_json(spans: list[Span]) -> dict[str, Any]:
    s = summary(spans)
    return {**s, "spans": spans, "tree": tree_json(build(spans), s["start_us"])}


def console() -> Console:
    import sys

    return Console(width=None if sys.stdout.isatty() else 200, soft_wrap=False)


# --------------------------------------------------------------------------- --follow


def completed(reader: TraceReader, interval_s: float, settle_s: float, since_ms: int,
              clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
              ) -> Iterator[list[Span]]:
    """Traces that started after ``since_ms`` (epoch ms), each once, when no span has arrived for ``settle_s``.

    A trace is never known to be complete (a late span can always come); "no new span for a while" is
    what Zipkin's UI assumes too. One query of at most FOLLOW_BATCH traces per ``interval_s``.
    """
    printed: OrderedDict[str, None] = OrderedDict()
    pending: dict[str, tuple[int, float]] = {}
    while True:
        now = clock()
        lookback = max(int(now * 1000) - since_ms, 1)
        seen = set()
        for spans in reversed(reader.traces(FOLLOW_BATCH, lookback_ms=lookback)):  # oldest first
            tid = spans[0]["traceId"]
            seen.add(tid)
            if tid in printed:
                continue
            count, changed = pending.get(tid, (-1, now))
            if count != len(spans):
                pending[tid] = (len(spans), now)
            elif now - changed >= settle_s:
                del pending[tid]
                printed[tid] = None
                if len(printed) > FOLLOW_MEMORY:
                    printed.popitem(last=False)
                yield spans
        for tid in [t for t in pending if t not in seen]:  # evicted or out of the window
            del pending[tid]
        sleep(interval_s)


def dumps(doc: Any) -> str:
    return json.dumps(doc, indent=2)
