"""Distributed tracing in the data path: Envoy's Zipkin tracer (``envoy.tracers.zipkin``), as Envoy 1.40 runs it.

Per request on a connection manager with ``tracing``: read the caller's context (B3 multi-header, the single
``b3`` header, and W3C ``traceparent`` with ``USE_B3_WITH_W3C_PROPAGATION``; B3 wins when both come), decide
sampling, and send a child context upstream on every attempt. At the end of the request (``finish``, called from
the connection manager's one ending path) the values its spans differ in are handed to the ``ZipkinReporter``
with a memoized %-template of the spans (Zipkin v2 JSON); the reporter renders them a page of requests at a time
when it builds a report and POSTs them to the collector cluster in batches from the event loop, never holding a
request up. Nothing here runs per byte, and nothing here starts a task per request. (What each step costs, and
what did not pay: bench/NOTES.md, "Tracing overhead (issue 15)".)

Envoy's facts this follows (checked by running Envoy 1.40, see tests/conformance/test_tracing.py):

- The connection manager's span is SERVER on an INBOUND listener (and an unspecified one), CLIENT on an OUTBOUND
  one, except with ``spawn_upstream_span``: then it is SERVER on an OUTBOUND listener too (as meshctl's
  mesh_tracing sets it, every sidecar's egress). Its name is the request's authority. A SERVER span shares the
  caller's span id (``shared: true``, the caller's parent as its parentId); a CLIENT span gets a new id whose
  parent is the caller's span. A new trace's root span id is the low 64 bits of the trace id.
- With ``spawn_upstream_span`` every upstream attempt is a CLIENT span ``router <cluster> egress``, child of the
  connection manager's span, with ``retry.count`` from the second attempt on, and ``canceled`` when the router gave
  up on it (retried on its status, per-try timeout). Upstream, ``x-b3-spanid`` is the span making the call and
  ``x-b3-parentspanid`` its parent; ``traceparent`` carries the same ids; a single ``b3`` header is answered with a
  single ``b3`` header. ``x-b3-flags`` and ``tracestate`` pass through untouched.
- A malformed ``traceparent`` (or one with a zero id) starts a new trace and is replaced. A malformed B3 context
  makes Envoy give up tracing the request and pass the bad headers on; we start a new trace and drop them
  instead (docs/envoy-differences.md).
"""

# ruff: noqa: UP031  (JSON templates full of braces read better with %-formatting than with doubled {{ }})
from __future__ import annotations

import asyncio
import logging
import random
import time
from binascii import hexlify as _hexlify
from json.encoder import encode_basestring as _q  # type: ignore[attr-defined]  # (the C-accelerated quoting)
from typing import TYPE_CHECKING, Any

from sidecar.config import Tracing
from sidecar.http1 import Headers
from sidecar.stats import TracingStats, ZipkinStats

if TYPE_CHECKING:
    from sidecar.cluster import ClusterRuntime
    from sidecar.server import Stream
    from sidecar.upstream import Pool, UpstreamConnection

log = logging.getLogger("sidecar.tracing")

#: Envoy's runtime keys for the reporter (its bootstrap's layered_runtime static layer sets them) and defaults.
FLUSH_INTERVAL_KEY = "tracing.zipkin.flush_interval_ms"
MIN_FLUSH_SPANS_KEY = "tracing.zipkin.min_flush_spans"
DEFAULT_FLUSH_INTERVAL_MS = 5000
DEFAULT_MIN_FLUSH_SPANS = 5
#: Spans waiting for the collector beyond this are dropped (and counted): a slow collector costs spans, not memory.
MAX_BUFFERED_SPANS = 10_000
#: Envoy's timeout for a report (its async client sends x-envoy-expected-rq-timeout-ms: 5000).
REPORT_TIMEOUT_S = 5.0
#: Reports triggered by min_flush_spans start at least this far apart. Envoy sends one per 5 spans; under load
#: that is a POST every few requests, whose cost in Python would be a large share of each request's. Bigger
#: reports a few milliseconds later cost the collector nothing and the proxy little (issue 15: <= 10 %).
MIN_REPORT_GAP_S = 0.025

#: The context headers we read and rewrite (x-b3-flags and tracestate are passed through as they came).
B3_HEADERS = (b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid", b"x-b3-sampled")
_B3_DROP = frozenset(B3_HEADERS) | {b"b3"}
_ALL_DROP = _B3_DROP | {b"traceparent"}
_HEX = frozenset(b"0123456789abcdefABCDEF")
_SAMPLED = {b"1": True, b"true": True, b"d": True, b"0": False, b"false": False}

_M64 = (1 << 64) - 1
#: Entries kept in each of a tracer's memo dicts (values that repeat across requests) before it starts over.
_MEMO_MAX = 1024
#: Requests per page of a report being collected (see ZipkinReporter.templates): about 80 KB of JSON.
_PAGE = 64

_bits = random.getrandbits
_random = random.random
_time = time.time


def _hex_id(value: bytes | None, lengths: tuple[int, ...]) -> str | None:
    """A lower-case hex id of one of ``lengths`` that is not all zeros, or None."""
    if value is None or len(value) not in lengths or not _HEX.issuperset(value) or not value.strip(b"0"):
        return None
    return value.decode().lower()


def new_span_id() -> bytes:
    return b"%016x" % (_bits(64) or 1)


def _b(value: str | None) -> bytes | None:
    return None if value is None else value.encode()


class Context:
    """A caller's trace context: ids, its sampling decision (None: none given), which header form it came in."""

    __slots__ = ("trace_id", "span_id", "parent_id", "sampled", "single")

    def __init__(self, trace_id: str | None, span_id: str | None, parent_id: str | None = None,
                 sampled: bool | None = None, single: bool = False) -> None:
        self.trace_id = trace_id  # None with span_id None: only a sampling decision came (b3: 0)
        self.span_id = span_id
        self.parent_id = parent_id
        self.sampled = sampled
        self.single = single


#: What extraction found: a usable context, a decision alone, nothing, or something malformed.
MALFORMED = Context(None, None)


def parse_b3_multi(seen: dict[bytes, bytes]) -> Context | None:
    """x-b3-* headers: a Context, MALFORMED, or None (no ids: a trace id alone starts a new trace, as Envoy)."""
    flags = seen.get(b"x-b3-flags")
    raw_sampled = seen.get(b"x-b3-sampled")
    sampled = True if flags == b"1" else (_SAMPLED.get(raw_sampled.lower()) if raw_sampled is not None else None)
    trace, span = seen.get(b"x-b3-traceid"), seen.get(b"x-b3-spanid")
    if trace is None or span is None:
        return Context(None, None, sampled=sampled) if sampled is not None and trace is None and span is None \
            else None
    trace_id, span_id = _hex_id(trace, (16, 32)), _hex_id(span, (16,))
    parent = seen.get(b"x-b3-parentspanid")
    parent_id = _hex_id(parent, (16,)) if parent is not None else None
    if trace_id is None or span_id is None or (parent is not None and parent_id is None):
        return MALFORMED
    return Context(trace_id, span_id, parent_id, sampled)


def parse_b3_single(value: bytes) -> Context:
    """``b3: {trace}-{span}[-{sampled}[-{parent}]]`` or a decision alone (``0``, ``1``, ``d``); MALFORMED else."""
    value = value.strip()
    if value in _SAMPLED:
        return Context(None, None, sampled=_SAMPLED[value], single=True)
    parts = value.split(b"-")
    if not 2 <= len(parts) <= 4:
        return MALFORMED
    trace_id, span_id = _hex_id(parts[0], (16, 32)), _hex_id(parts[1], (16,))
    sampled = _SAMPLED.get(parts[2]) if len(parts) > 2 else None
    parent_id = _hex_id(parts[3], (16,)) if len(parts) > 3 else None
    if trace_id is None or span_id is None or (len(parts) > 2 and sampled is None) or \
            (len(parts) > 3 and parent_id is None):
        return MALFORMED
    return Context(trace_id, span_id, parent_id, sampled, single=True)


def parse_traceparent(value: bytes) -> Context | None:
    """W3C ``{version}-{trace}-{span}-{flags}``; None when malformed (Envoy then starts a new trace).

    Envoy 1.40 accepts any two-hex-digit version (even ``ff``) and upper-case hex: so do we.
    """
    parts = value.strip().split(b"-")
    if len(parts) < 4 or len(parts[0]) != 2 or not _HEX.issuperset(parts[0]) or len(parts[3]) != 2 \
            or not _HEX.issuperset(parts[3]):
        return None
    trace_id, span_id = _hex_id(parts[1], (32,)), _hex_id(parts[2], (16,))
    if trace_id is None or span_id is None:
        return None
    return Context(trace_id, span_id, None, bool(int(parts[3], 16) & 1))


class Trace:
    """One request's tracing state (``Stream.trace``): its span, and its upstream attempts when spawned.

    Ids are lower-case hex bytes, ready for the upstream headers and the span templates. Times are kept as
    ``time.time()`` floats and turned into Zipkin's µs when the request's spans are handed to the reporter.
    """

    __slots__ = ("tracer", "trace_id", "span_id", "parent_id", "sampled", "single", "start", "attempts", "call",
                 "spare")

    def __init__(self, tracer: HcmTracer, trace_id: bytes, span_id: bytes, parent_id: bytes | None, sampled: bool,
                 single: bool, start: float, spare: bytes | None = None) -> None:
        self.tracer = tracer
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.sampled = sampled
        self.single = single
        self.start = start
        #: One list per upstream attempt: [span id, start, host, retry count, end (0: open), status, flag,
        #: canceled, error reason, connected]. Lists, not objects: a few of them per request, touched twice each.
        self.attempts: list[list[Any]] = []
        self.call: bytes = b""  # the context headers of the current attempt
        #: The first attempt's span id, drawn with a new trace's id (one getrandbits for both).
        self.spare = spare

    # -- upstream attempts (the router's) ------------------------------------------------------------------
    def attempt_start(self, host: str, number: int) -> None:
        tracer = self.tracer
        if tracer.spawn:
            span = self.spare
            if span is None:
                span = new_span_id()
            else:
                self.spare = None
            self.attempts.append([span, _time(), host, number - 1, 0, 0, None, False, None, False])
            if self.single or not tracer.w3c:
                self.call = self._headers(span, self.span_id)
            else:  # the usual case, one template: B3 multi with a parent, and traceparent
                tid = self.trace_id
                flag = b"1" if self.sampled else b"0"
                self.call = _CALL % (tid, span, self.span_id, flag, tid if len(tid) == 32 else tid.rjust(32, b"0"),
                                     span, flag)
        elif not self.call:
            self.call = self._headers(self.span_id, self.parent_id)

    def headers(self) -> bytes:
        """The context headers for the request going upstream now (the router calls this as it sends the
        attempt's request on a connection it has: the attempt is connected)."""
        if self.attempts:
            self.attempts[-1][9] = True
        elif not self.call:
            self.call = self._headers(self.span_id, self.parent_id)
        return self.call

    def _headers(self, span: bytes, parent: bytes | None) -> bytes:
        flag = b"1" if self.sampled else b"0"
        tid = self.trace_id
        if self.single:
            out = b"b3: %s-%s-%s%s\r\n" % (tid, span, flag, b"-" + parent if parent else b"")
        elif parent:
            out = b"x-b3-traceid: %s\r\nx-b3-spanid: %s\r\nx-b3-parentspanid: %s\r\nx-b3-sampled: %s\r\n" % (
                tid, span, parent, flag)
        else:
            out = b"x-b3-traceid: %s\r\nx-b3-spanid: %s\r\nx-b3-sampled: %s\r\n" % (tid, span, flag)
        if self.tracer.w3c:
            out += b"traceparent: 00-%s-%s-0%s\r\n" % (tid if len(tid) == 32 else tid.rjust(32, b"0"), span, flag)
        return out

    def attempt_status(self, status: int) -> None:
        """The attempt's response head arrived and is being forwarded (it ends with the request)."""
        if self.attempts:
            self.attempts[-1][5] = status

    def attempt_end(self, status: int, flag: str | None = None, reason: str | None = None,
                    canceled: bool = False) -> None:
        """The attempt is over before the request is: retried, failed, timed out."""
        if self.attempts:
            a = self.attempts[-1]
            if not a[4]:
                a[4], a[5], a[6], a[7], a[8] = _time(), status, flag, canceled, reason

    def attempts_close(self, flag: str | None, canceled: bool) -> None:
        """The request ended: an attempt still open ends with it (``canceled``: cut off, not answered)."""
        if self.attempts:
            a = self.attempts[-1]
            if not a[4]:
                a[4] = _time()
                if canceled:
                    a[7] = True
                if flag is not None:
                    a[6] = flag


#: An attempt's context headers in the usual case (B3 multi with a parent, and W3C).
_CALL = (b"x-b3-traceid: %s\r\nx-b3-spanid: %s\r\nx-b3-parentspanid: %s\r\nx-b3-sampled: %s\r\n"
         b"traceparent: 00-%s-%s-0%s\r\n")


class HcmTracer:
    """One connection manager's tracer: its configuration, pre-rendered span constants, stats and reporter.

    Per request, on the request's path: ``start`` (context, sampling, ids) and ``finish``, which takes the values
    the request's spans differ in (ids, times, status, sizes, x-request-id) and hands them to the reporter with a
    %-template of the spans that has everything else rendered in: templates are memoized per request shape
    (authority, path, peer, user agent, downstream cluster, method, protocol, cluster, upstream host). The
    reporter renders a whole report with one %-operation (see ``ZipkinReporter``). All of it in bytes: the ids
    go upstream and into the JSON as they are, nothing is encoded twice.
    """

    def __init__(self, cfg: Tracing, stats: TracingStats, reporter: ZipkinReporter, node_id: str, service: str,
                 ip: str) -> None:
        self.cfg = cfg
        self.stats = stats
        self.reporter = reporter
        self.spawn = cfg.spawn_upstream_span
        self.w3c = cfg.trace_context_option == "USE_B3_WITH_W3C_PROPAGATION"
        self.drop = _ALL_DROP if self.w3c else _B3_DROP
        #: Any of these in a request: there is a context to read (one isdisjoint test when there is none).
        self.context_names = frozenset(
            (*B3_HEADERS, b"x-b3-flags", b"b3", *((b"traceparent",) if self.w3c else ())))
        #: The connection manager's span is SERVER (shared with the caller when shared_span_context) unless the
        #: listener is OUTBOUND and the router spawns no spans of its own: with spawn_upstream_span Envoy 1.40 makes
        #: it SERVER on an OUTBOUND listener too (the attempts' CLIENT spans are the egress).
        self.server = cfg.traffic_direction != "OUTBOUND" or self.spawn
        self.bits = 128 if cfg.trace_id_128bit else 64
        self.id_bytes = self.bits // 8 + 8  # a new trace's id and its first attempt's span id, drawn at once
        self.shared = cfg.shared_span_context
        self.random_sampling = cfg.random_sampling
        self.client_sampling = cfg.client_sampling
        self.overall_sampling = cfg.overall_sampling
        #: Every request sampled whatever it brings (no random draw needed).
        self.always = min(cfg.random_sampling, cfg.client_sampling) >= 100.0 and cfg.overall_sampling >= 100.0
        self.max_path = cfg.max_path_tag_length
        endpoint = _pct('{"serviceName":%s,"ipv4":%s,"port":0}' % (_q(service), _q(ip)))
        kind, note = ("SERVER", "ss") if self.server else ("CLIENT", "cr")
        shared = '"shared":true,' if self.server and self.shared else ""
        # The spans' templates, in pieces around the values memoized per request shape (the literal braces of
        # JSON doubled for %-formatting are not needed: % only reads %s/%d). The connection manager's span,
        # [memoized]: traceId, id, parentId (or ""), [name], timestamp, duration, end, [http.method, http.url,
        # http.protocol], status, response_flags, request_size, response_size, [peer.address, user_agent,
        # downstream_cluster], the guid: tags, [upstream_cluster tags], error.
        self.hcm_parts = (
            '{"traceId":"%s","id":"%s",%s"name":',
            ',"timestamp":%d,"duration":%d,"kind":"' + kind + '","localEndpoint":' + endpoint + "," + shared
            + '"annotations":[{"timestamp":%d,"value":"' + note + '"}],"tags":{"component":"proxy","node_id":'
            + _pct(_q(node_id)) + ',"http.method":"',
            '","http.url":',
            ',"http.protocol":"',
            '","http.status_code":"%d","response_flags":"%s","request_size":"%d","response_size":"%d",'
            '"peer.address":"',
            '","user_agent":',
            ',"downstream_cluster":',
            '%s',
            '%s}}')
        # An attempt's span: traceId, id, parentId, [name], timestamp, duration, end, http.protocol, status,
        # response_flags, [peer/upstream tags], retry.count/error/canceled/error.reason.
        self.up_parts = (
            '{"traceId":"%s","id":"%s","parentId":"%s","name":',
            ',"timestamp":%d,"duration":%d,"kind":"CLIENT","localEndpoint":' + endpoint
            + ',"annotations":[{"timestamp":%d,"value":"cr"}],"tags":{"component":"proxy","http.protocol":"%s",'
            '"http.status_code":"%d","response_flags":"%s"',
            '%s}}')
        #: Memoized templates (bounded: started over when full), by what they have rendered in.
        self.templates: dict[tuple[Any, ...], bytes] = {}

    # -- the request's start: context, sampling, headers ------------------------------------------------
    def start(self, stream: Stream, headers: Headers) -> Headers:
        """Decide and set ``stream.trace``; the forwarded headers without the incoming context headers."""
        seen = stream.seen
        stats = self.stats
        if b"x-client-trace-id" in seen:
            stats.client_enabled.value += 1
            rate = self.client_sampling
        else:
            stats.random_sampling.value += 1
            rate = self.random_sampling
        decided = self.always or ((rate >= 100.0 or _random() * 100.0 < rate) and
                                  (self.overall_sampling >= 100.0 or _random() * 100.0 < self.overall_sampling))
        ctx: Context | None = None
        if not self.context_names.isdisjoint(seen):
            found = False
            if b"x-b3-traceid" in seen or b"x-b3-spanid" in seen or b"x-b3-sampled" in seen or \
                    b"x-b3-flags" in seen:
                ctx = parse_b3_multi(seen)
                found = True
            if (ctx is None or ctx is MALFORMED) and b"b3" in seen:
                ctx = parse_b3_single(seen[b"b3"])
                found = True
            if ctx is None and self.w3c and b"traceparent" in seen:
                ctx = parse_traceparent(seen[b"traceparent"])
                found = True
            if found:
                drop = self.drop
                headers = [h for h in headers if h[0] not in drop]
            if ctx is MALFORMED:
                ctx = None
        if ctx is None:  # the usual first hop: a new trace
            # One draw for the trace id and the first attempt's span id; neither may be all zeros (then 1).
            r = _bits(self.bits + 64)
            if r >> 64 and r & _M64:
                ids = _hexlify(r.to_bytes(self.id_bytes, "big"))
            else:
                ids = (b"%032x%016x" if self.bits == 128 else b"%016x%016x") % ((r >> 64) or 1, (r & _M64) or 1)
            trace_id = ids[:-16]
            stream.trace = Trace(self, trace_id, trace_id[-16:], None, decided, False, stream.info.start_time,
                                 ids[-16:] if self.spawn else None)
            return headers
        start = stream.info.start_time
        if ctx.trace_id is not None:
            sampled = decided if ctx.sampled is None else ctx.sampled
            if self.server and self.shared:
                trace = Trace(self, ctx.trace_id.encode(), _b(ctx.span_id) or new_span_id(), _b(ctx.parent_id),
                              sampled, ctx.single, start)
            else:
                trace = Trace(self, ctx.trace_id.encode(), new_span_id(), _b(ctx.span_id), sampled, ctx.single,
                              start)
        else:  # a sampling decision without ids (b3: 0): a new trace that keeps it
            decided = ctx.sampled if ctx.sampled is not None else decided
            trace_id = b"%032x" % (_bits(128) or 1) if self.bits == 128 else b"%016x" % (_bits(64) or 1)
            trace = Trace(self, trace_id, trace_id[-16:], None, decided, ctx.single, start)
        stream.trace = trace
        return headers

    # -- the request's end: spans ---------------------------------------------------------------------------
    def finish(self, stream: Stream) -> None:
        """Hand a sampled request's spans to the reporter: their template and the values that fill it in.

        Only flat ints and bytes are kept (nothing the garbage collector has to walk while reports wait).
        """
        trace: Trace = stream.trace
        if not trace.sampled:
            return
        info = stream.info
        end = int(_time() * 1e6)
        seen = stream.seen
        ids = b""
        for name, value in reversed(info.raw_request_headers):  # (a generated id was appended: near the end)
            if name == b"x-request-id":
                ids = b',"guid:x-request-id":' + _q(value.decode("latin-1")).encode()
                break
        client_id = seen.get(b"x-client-trace-id")
        if client_id is not None:
            ids += b',"guid:x-client-trace-id":' + _q(client_id.decode("latin-1")).encode()
        code = info.response_code
        parent = trace.parent_id
        start = int(trace.start * 1e6)
        tid = trace.trace_id
        sid = trace.span_id
        attempts = trace.attempts
        key = (info.authority, info.original_path or info.path, stream.conn.remote_ip, seen.get(b"user-agent"),
               seen.get(b"x-envoy-downstream-service-cluster"), info.method, info.protocol, info.upstream_cluster,
               attempts[0][2] if len(attempts) == 1 else None)
        template = self.templates.get(key) or self._template(key)
        if len(attempts) == 1:  # the usual request: its two spans in one template
            span, a_start, _, retries, a_end, status, flag, canceled, reason, connected = attempts[0]
            a_start = int(a_start * 1e6)
            a_end = int(a_end * 1e6) if a_end else end
            args: tuple[Any, ...] = (
                tid, span, sid, a_start, max(a_end - a_start, 1), a_end, b"HTTP/1.1" if connected else b"-", status,
                b"-" if flag is None else flag.encode(), _attempt_tags(retries, status, canceled, reason)
                if retries or canceled or reason or not 0 < status < 500 else b"",
                tid, sid, b'"parentId":"%s",' % parent if parent else b"", start, max(end - start, 1), end, code,
                info.flags_text.encode() if info.response_flags else b"-", info.bytes_received, info.bytes_sent, ids,
                b',"error":"true"' if code == 0 or code >= 500 else b"")
            spans = 2
        else:  # no attempt, or retries: the attempts' spans rendered here, the template around them
            rendered = []
            for span, a_start, host, retries, a_end, status, flag, canceled, reason, connected in attempts:
                a_start = int(a_start * 1e6)
                a_end = int(a_end * 1e6) if a_end else end
                rendered.append(self._up_template(info.upstream_cluster or "", host) % (
                    tid, span, sid, a_start, max(a_end - a_start, 1), a_end, b"HTTP/1.1" if connected else b"-",
                    status, b"-" if flag is None else flag.encode(), _attempt_tags(retries, status, canceled, reason)))
            template = b"%s," * len(rendered) + template
            args = (*rendered, tid, sid, b'"parentId":"%s",' % parent if parent else b"", start, max(end - start, 1),
                    end, code, info.flags_text.encode() if info.response_flags else b"-", info.bytes_received,
                    info.bytes_sent, ids, b',"error":"true"' if code == 0 or code >= 500 else b"")
            spans = len(rendered) + 1
        # Into the reporter's current page (inline, not a call: this runs for every sampled request).
        reporter = self.reporter
        count = reporter.count + spans
        if count > reporter.max_buffered:
            reporter.stats.spans_dropped.value += spans
            return
        page = reporter.templates
        page.append(template)
        reporter.args += args
        reporter.count = count
        if len(page) >= _PAGE:
            reporter.next_page()
        if count >= reporter.min_flush and not reporter.inflight and not reporter.soon:
            reporter._schedule()

    def _template(self, key: tuple[Any, ...]) -> bytes:
        """The request spans' template for ``finish``'s key (its upstream host None: the connection manager's
        span alone)."""
        templates = self.templates
        if len(templates) >= _MEMO_MAX:
            templates.clear()
        authority, path, ip, ua, dc, method, protocol, cluster, host = key
        if len(path) > self.max_path:
            path = path[:self.max_path]
        cq = "" if cluster is None else _q(cluster)
        p = self.hcm_parts
        template = (p[0] + _pct(_q(authority)) + p[1] + _pct(method) + p[2] + _pct(_q("http://" + authority + path))
                    + p[3] + _pct(protocol) + p[4] + _pct(ip.decode("latin-1")) + p[5]
                    + _pct('"-"' if ua is None else _q(ua.decode("latin-1"))) + p[6]
                    + _pct('"-"' if dc is None else _q(dc.decode("latin-1"))) + p[7]
                    + ("" if cluster is None else _pct(',"upstream_cluster":%s,"upstream_cluster.name":%s' % (cq, cq)))
                    + p[8]).encode()
        if host is not None:
            template = self._up_template(cluster or "", host) + b"," + template
        templates[key] = template
        return template

    def _up_template(self, cluster: str, host: str) -> bytes:
        """An attempt span's template for (cluster, upstream host)."""
        key = (cluster, host)
        template = self.templates.get(key)
        if template is None:
            if len(self.templates) >= _MEMO_MAX:
                self.templates.clear()
            cq, hq = _q(cluster), _q(host)
            p = self.up_parts
            template = self.templates[key] = (
                p[0] + _pct(_q(f"router {cluster} egress")) + p[1]
                + _pct(',"peer.address":%s,"upstream_address":%s,"upstream_cluster":%s,"upstream_cluster.name":%s'
                       % (hq, hq, cq, cq)) + p[2]).encode()
        return template


def _pct(text: str) -> str:
    """``text`` as a literal inside a %-template."""
    return text.replace("%", "%%")


def _attempt_tags(retries: int, status: int, canceled: bool, reason: str | None) -> bytes:
    """An attempt span's optional tags, in Envoy's order."""
    extra = b""
    if retries:
        extra = b',"retry.count":"%d"' % retries
    if status == 0 or status >= 500:
        extra += b',"error":"true"'
    if canceled:
        extra += b',"canceled":"true"'
    if reason:
        extra += b',"error.reason":' + _q(reason).encode()
    return extra


class ZipkinReporter:
    """Buffers spans (as templates and values) and POSTs them to the collector cluster as one JSON array per report.

    A report goes out when ``min_flush_spans`` are buffered or every ``flush_interval`` (Envoy's runtime keys and
    defaults). One report at a time: while one is in flight, spans accumulate (a busy proxy sends bigger reports,
    not more of them), up to ``MAX_BUFFERED_SPANS``; past that they are dropped and counted. Connections come
    from the collector cluster's own pools, so its cluster stats count the reports as Envoy's do.
    """

    def __init__(self, cluster: ClusterRuntime, endpoint: str, stats: ZipkinStats, flush_interval_ms: int,
                 min_flush_spans: int, max_buffered: int = MAX_BUFFERED_SPANS) -> None:
        self.cluster = cluster
        self.stats = stats
        self.min_flush = max(1, min_flush_spans)
        self.interval_s = max(1, flush_interval_ms) / 1000
        self.max_buffered = max_buffered
        self.head = (f"POST {endpoint} HTTP/1.1\r\nhost: {cluster.name}\r\ncontent-type: application/json\r\n"
                     "content-length: ").encode()
        #: What the next report holds: %-templates of spans, one per finished request (``b"%s"`` per span already
        #: rendered), and the values that fill them in, in order (ints and bytes only: nothing the garbage
        #: collector walks); ``count`` spans in all. In pages of _PAGE templates, each rendered with one
        #: %-operation when the report is built: pieces well below malloc's mmap threshold, where one buffer for a
        #: whole report (a few hundred KB) would be mapped and page-faulted in anew for every report.
        self.templates: list[bytes] = []
        self.args: list[Any] = []
        self.pages: list[tuple[list[bytes], list[Any]]] = []
        self.count = 0
        self.last_report = 0.0  # loop time the last report started
        self.inflight = False
        self.soon = False  # a flush is scheduled for the end of this loop iteration
        self.loop = asyncio.get_event_loop()
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.closed = False

    def start(self) -> None:
        self.timer = self.loop.call_later(self.interval_s, self._tick)

    def add(self, spans: list[str]) -> None:
        """Spans already rendered (JSON objects)."""
        n = len(spans)
        if self.count + n > self.max_buffered:
            self.stats.spans_dropped.value += n
            return
        for span in spans:
            self.templates.append(b"%s")
            self.args.append(span.encode())
            if len(self.templates) >= _PAGE:
                self.next_page()
        self.count += n
        if self.count >= self.min_flush and not self.inflight and not self.soon:
            self._schedule()

    def next_page(self) -> None:
        """The current page is full (HcmTracer.finish and add fill it): start another."""
        self.pages.append((self.templates, self.args))
        self.templates, self.args = [], []

    def render(self) -> list[bytes]:
        """The buffered spans as one JSON array, in pieces (one %-operation per page), the buffer emptied."""
        if self.templates:
            self.next_page()
        pages, self.pages, self.count = self.pages, [], 0
        chunks = []
        sep = b"["
        for templates, args in pages:
            templates[0] = sep + templates[0]  # (the separators go into the templates: no copy of a page)
            sep = b","
            chunks.append(b",".join(templates) % tuple(args))
        chunks.append(b"]")
        return chunks

    def _schedule(self) -> None:
        """A report soon: at the end of this loop iteration (the spans of every request ending in it go together),
        or once MIN_REPORT_GAP_S has passed since the last one."""
        self.soon = True
        wait = self.last_report + MIN_REPORT_GAP_S - self.loop.time()
        if wait > 0:
            self.loop.call_later(wait, self._flush_soon)
        else:
            self.loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self.soon = False
        self.flush()

    def _tick(self) -> None:
        self.stats.timer_flushed.value += 1
        self.flush()
        if not self.closed:
            self.timer = self.loop.call_later(self.interval_s, self._tick)

    def flush(self) -> None:
        if self.inflight or not self.count:
            return
        self.last_report = self.loop.time()
        self.stats.spans_sent.value += self.count  # (Envoy counts the spans of every report it attempts)
        chunks = self.render()
        data = (self.head + b"%d\r\n\r\n" % sum(map(len, chunks)), chunks)  # (written piece by piece: no copy)
        cstats = self.cluster.stats
        cstats.upstream_rq_total.value += 1
        pool = self.cluster.choose()
        if pool is None:
            cstats.upstream_cx_none_healthy.value += 1
            self._done(503)
            return
        self.inflight = True
        conn = pool.take_idle()
        if conn is not None:
            _Report(self, pool, conn, data)
        else:
            self.task = self.loop.create_task(self._connect(pool, data))

    async def _connect(self, pool: Pool, data: tuple[bytes, list[bytes]]) -> None:
        try:
            conn = await pool.connect(self.cluster.cfg.connect_timeout_s)
        except OSError:  # refused, unreachable, timed out: Envoy's async client answers a local 503
            self.task = None
            self._done(503)
            return
        self.task = None
        if self.closed:
            pool.release(conn)
            return
        _Report(self, pool, conn, data)

    def _done(self, status: int) -> None:
        """A report's outcome: its status (0: no answer), as Envoy's async client would have seen it."""
        self.inflight = False
        cstats = self.cluster.stats
        if status:
            cstats.response(status)
        cstats.upstream_rq_completed.value += 1
        if 200 <= status < 300:
            self.stats.reports_sent.value += 1
        else:
            self.stats.reports_dropped.value += 1
            log.debug("span report dropped: collector answered %s", status or "nothing")
        if self.count >= self.min_flush and not self.closed and not self.soon:
            self._schedule()

    async def close(self, timeout: float = 0.5) -> None:
        """Stop the timer; send what is buffered, waiting for it at most ``timeout`` (a stopping proxy's last spans)."""
        if self.timer is not None:
            self.timer.cancel()
        deadline = time.monotonic() + timeout
        while (self.inflight or self.count) and time.monotonic() < deadline:
            self.flush()
            await asyncio.sleep(0.01)
        self.closed = True
        if self.task is not None:
            self.task.cancel()


class _Report:
    """One POST to the collector on an upstream connection: the connection's ``ResponseSink``."""

    __slots__ = ("reporter", "pool", "conn", "status", "over", "timer")

    def __init__(self, reporter: ZipkinReporter, pool: Pool, conn: UpstreamConnection,
                 data: tuple[bytes, list[bytes]]) -> None:
        self.reporter = reporter
        self.pool = pool
        self.conn = conn
        self.status = 0
        self.over = False
        self.timer = reporter.loop.call_later(REPORT_TIMEOUT_S, self.on_timeout)
        conn.send(data[0], self, False)  # the head,
        for chunk in data[1]:  # then the body
            conn.write(chunk)

    def on_head(self, conn: UpstreamConnection, status: int, headers: Headers) -> None:
        self.status = status

    def on_body(self, data: bytes) -> None:
        pass

    def flush(self) -> None:
        pass

    def on_complete(self, conn: UpstreamConnection) -> None:
        if self.over:
            return
        self.over = True
        self.timer.cancel()
        self.pool.release(conn)
        self.reporter._done(self.status)

    def on_reset(self, conn: UpstreamConnection, reason: str) -> None:
        if self.over:
            return
        self.over = True
        self.timer.cancel()
        self.reporter._done(503)  # Envoy: a reset before the response is a local 503

    def on_timeout(self) -> None:
        if self.over:
            return
        self.over = True
        self.conn.sink = None
        self.conn.reset(active_rq=True)
        self.reporter.cluster.stats.upstream_rq_timeout.value += 1
        self.reporter._done(504)
