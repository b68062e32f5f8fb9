"""``python -m meshctl.tracing.collector``: the mesh's trace collector, a small Zipkin server.

It speaks enough of Zipkin's HTTP API that any Zipkin reporter can send to it and any Zipkin client (the
Zipkin UI, ``meshctl trace``) can read from it:

* ``POST /api/v2/spans``: a JSON v2 array; 202 as Zipkin answers; a malformed body is a 400 with the reason,
  a body over ``--max-body`` a 413 (read no further), a non-JSON encoding a 415;
* ``GET /api/v2/traces`` (``serviceName``, ``spanName``, ``minDuration``, ``maxDuration``, ``endTs``,
  ``lookback``, ``limit``), ``GET /api/v2/trace/{traceId}`` (404 unknown), ``GET /api/v2/services``,
  ``GET /api/v2/spans?serviceName=``, ``GET /api/v2/remoteServices?serviceName=``;
* ``GET /health`` (the readiness probe) and ``GET /metrics`` (Prometheus text: spans received, dropped,
  traces evicted, forwarding).

Memory is bounded by ``TraceStore``; forwarding (``--forward-zipkin URL`` or ``--forward-otlp URL``) never
slows intake (``Forwarder``). A sender waits at most for one bounded request: the body is read and parsed
in one go, nothing else is awaited.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from typing import Any

from aiohttp import web

from meshctl.tracing.forward import Forwarder
from meshctl.tracing.spans import SpanError, parse_body, trace_id
from meshctl.tracing.store import TraceStore

log = logging.getLogger("meshctl.tracing.collector")

DEFAULT_MAX_BODY = 4 * 1024 * 1024
MAX_LIMIT = 10_000
#: Encodings of Zipkin's other transports, which this collector does not read.
_NOT_JSON = ("application/x-protobuf", "application/x-thrift")
_CORS = {"Access-Control-Allow-Origin": "*"}  # a Zipkin UI served from elsewhere may read the query API


class IntakeCounters:
    """Zipkin's own collector metrics (``zipkin_collector_*``), plus the reasons spans were refused."""

    def __init__(self) -> None:
        self.messages = 0
        self.messages_dropped = 0
        self.bytes = 0
        self.spans = 0
        #: reason -> spans (or messages, for bodies that could not be read at all) refused
        self.spans_dropped: dict[str, int] = {"malformed": 0, "trace_full": 0, "too_large": 0}


class Collector:
    def __init__(self, store: TraceStore, forwarder: Forwarder | None = None,
                 max_body: int = DEFAULT_MAX_BODY) -> None:
        self.store = store
        self.forwarder = forwarder
        self.max_body = max_body
        self.intake = IntakeCounters()
        self.started = time.time()

    # ---- intake

    async def post_spans(self, request: web.Request) -> web.Response:
        self.intake.messages += 1
        ctype = request.content_type.lower()
        if ctype in _NOT_JSON:
            self.intake.messages_dropped += 1
            return _error(415, f"{ctype} is not accepted: send Zipkin v2 JSON (application/json)")
        if request.content_length is not None and request.content_length > self.max_body:
            return self._too_large(request.content_length)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._too_large(None)
        self.intake.bytes += len(body)
        try:
            spans = parse_body(body)
        except SpanError as exc:
            self.intake.messages_dropped += 1
            self.intake.spans_dropped["malformed"] += 1
            log.info("refused a body of %d bytes from %s: %s", len(body), request.remote, exc)
            return _error(400, str(exc))
        self.intake.spans += len(spans)
        kept, dropped = self.store.add(spans)
        self.intake.spans_dropped["trace_full"] += dropped
        if self.forwarder is not None and kept:
            self.forwarder.offer(kept)
        return web.Response(status=202, headers=_CORS)

    def _too_large(self, length: int | None) -> web.Response:
        self.intake.messages_dropped += 1
        self.intake.spans_dropped["too_large"] += 1
        shown = f"{length} bytes" if length is not None else "the body"
        return _error(413, f"{shown} is over this collector's limit of {self.max_body} bytes: send smaller batches")

    # ---- query API

    async def get_traces(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            limit = _int_param(q, "limit", 10, 1, MAX_LIMIT)
            end_ts = _int_param(q, "endTs", None, 0, None)
            lookback = _int_param(q, "lookback", None, 0, None)
            min_duration = _int_param(q, "minDuration", None, 0, None)
            max_duration = _int_param(q, "maxDuration", None, 0, None)
        except ValueError as exc:
            return _error(400, str(exc))
        traces = self.store.query(service=q.get("serviceName") or None, span_name=q.get("spanName") or None,
                                  end_ts_ms=end_ts, lookback_ms=lookback, limit=limit,
                                  min_duration_us=min_duration, max_duration_us=max_duration)
        return web.json_response(traces, headers=_CORS)

    async def get_trace(self, request: web.Request) -> web.Response:
        raw = request.match_info["trace_id"]
        try:
            tid = trace_id(raw)
        except SpanError:
            return _error(400, f"{raw[:40]!r} is not a trace id (1 to 32 hex digits)")
        spans = self.store.get(tid)
        if spans is None:
            return _error(404, f"trace {tid} not found")
        return web.json_response(spans, headers=_CORS)

    async def get_services(self, _: web.Request) -> web.Response:
        return web.json_response(self.store.services(), headers=_CORS)

    async def get_span_names(self, request: web.Request) -> web.Response:
        service = request.query.get("serviceName")
        if not service:
            return _error(400, "serviceName is required")
        return web.json_response(self.store.span_names(service), headers=_CORS)

    async def get_remote_services(self, request: web.Request) -> web.Response:
        service = request.query.get("serviceName")
        if not service:
            return _error(400, "serviceName is required")
        return web.json_response(self.store.remote_services(service), headers=_CORS)

    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "UP", "zipkin": {"status": "UP"}})

    async def metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self.metrics_text().encode(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    def metrics_text(self) -> str:
        i, c, s = self.intake, self.store.counters, self.store
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.extend((f"# HELP {name} {help_}", f"# TYPE {name} {kind}"))
            lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

        http = '{transport="http"}'
        metric("zipkin_collector_messages_total", "counter", "Messages (POST bodies) received.", [(http, i.messages)])
        metric("zipkin_collector_messages_dropped_total", "counter", "Messages refused (malformed, too large).",
               [(http, i.messages_dropped)])
        metric("zipkin_collector_bytes_total", "counter", "Body bytes received.", [(http, i.bytes)])
        metric("zipkin_collector_spans_total", "counter", "Spans received in well-formed messages.",
               [(http, i.spans)])
        metric("zipkin_collector_spans_dropped_total", "counter", "Spans dropped (a full trace).",
               [(http, i.spans_dropped["trace_full"])])
        metric("meshctl_tracing_spans_received_total", "counter", "Spans received and kept.",
               [("", c.spans_accepted)])
        metric("meshctl_tracing_spans_dropped_total", "counter",
               "Spans dropped: trace_full (max_spans_per_trace); malformed and too_large count refused messages.",
               [(f'{{reason="{r}"}}', n) for r, n in i.spans_dropped.items()])
        metric("meshctl_tracing_traces_evicted_total", "counter", "Traces evicted to stay within max_traces.",
               [("", c.traces_evicted)])
        metric("meshctl_tracing_traces", "gauge", "Traces held.", [("", len(s.traces))])
        metric("meshctl_tracing_spans", "gauge", "Spans held.", [("", s.span_count)])
        metric("meshctl_tracing_max_traces", "gauge", "The trace bound.", [("", s.max_traces)])
        if self.forwarder is not None:
            f = self.forwarder
            kind = f'kind="{f.kind}"'
            metric("meshctl_tracing_forward_spans_total", "counter",
                   "Spans forwarded (sent), refused by a full queue (dropped) or lost with a failed batch (failed).",
                   [(f'{{{kind},result="{r}"}}', n) for r, n in
                    (("sent", f.counters.sent), ("dropped", f.counters.dropped), ("failed", f.counters.failed))])
            metric("meshctl_tracing_forward_batches_total", "counter", "Batches sent upstream.",
                   [(f"{{{kind}}}", f.counters.batches)])
            metric("meshctl_tracing_forward_queue", "gauge", "Spans waiting to be forwarded.",
                   [(f"{{{kind}}}", len(f.queue))])
        return "\n".join(lines) + "\n"

    def app(self) -> web.Application:
        # The body cap is aiohttp's too: a chunked body without Content-Length stops being read at the limit.
        app = web.Application(client_max_size=self.max_body)
        app.router.add_post("/api/v2/spans", self.post_spans)
        app.router.add_get("/api/v2/traces", self.get_traces)
        app.router.add_get("/api/v2/trace/{trace_id}", self.get_trace)
        app.router.add_get("/api/v2/services", self.get_services)
        app.router.add_get("/api/v2/spans", self.get_span_names)
        app.router.add_get("/api/v2/remoteServices", self.get_remote_services)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=_CORS)


def _int_param(query: Any, name: str, default: int | None, low: int, high: int | None) -> int | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit():
        raise ValueError(f"{name} must be a whole number, got {raw[:40]!r}")
    value = int(raw)
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be from {low} to {high}, got {value}" if high is not None
                         else f"{name} must be at least {low}, got {value}")
    return value


# --------------------------------------------------------------------------- the process


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value!r}")
    return int(value)


def _url(value: str) -> str:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, got {value!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m meshctl.tracing.collector",
                                description="The mesh's trace collector: Zipkin's v2 HTTP API, in memory.")
    p.add_argument("--listen", type=_listen, required=True, metavar="HOST:PORT")
    p.add_argument("--max-traces", type=_positive, default=1000, help="traces kept (LRU by last span)")
    p.add_argument("--max-spans-per-trace", type=_positive, default=1000, help="spans kept per trace")
    p.add_argument("--max-body", type=_positive, default=DEFAULT_MAX_BODY, help="largest POST body, bytes")
    fwd = p.add_mutually_exclusive_group()
    fwd.add_argument("--forward-zipkin", type=_url, metavar="URL", help="also send spans to this Zipkin")
    fwd.add_argument("--forward-otlp", type=_url, metavar="URL", help="also send spans to this OTLP/HTTP endpoint")
    p.add_argument("--forward-queue", type=_positive, default=10_000, help="spans waiting to be forwarded, at most")
    p.add_argument("--forward-batch", type=_positive, default=500, help="spans per forwarded request, at most")
    p.add_argument("--forward-interval", type=float, default=0.5, help="seconds between forwarded batches")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


async def serve(args: argparse.Namespace, ready: asyncio.Event | None = None) -> None:
    forwarder = None
    if args.forward_zipkin or args.forward_otlp:
        kind, url = ("zipkin", args.forward_zipkin) if args.forward_zipkin else ("otlp", args.forward_otlp)
        forwarder = Forwarder(kind, url, queue_size=args.forward_queue, batch_size=args.forward_batch,
                              interval_s=args.forward_interval)
    collector = Collector(TraceStore(args.max_traces, args.max_spans_per_trace), forwarder, args.max_body)
    runner = web.AppRunner(collector.app(), access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    host, port = args.listen
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise SystemExit(f"collector: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    log.info("collector on http://%s:%d (max %d traces, %d spans each%s)", host, port, args.max_traces,
             args.max_spans_per_trace, f", forwarding to {forwarder.kind} {forwarder.url}" if forwarder else "")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(forwarder.run()) if forwarder is not None else None
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await task
        await runner.cleanup()
    log.info("collector stopped: %s", json.dumps({"spans": collector.intake.spans,
                                                  "traces": len(collector.store.traces)}))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pods.runloop import run

    run(serve(args))


if __name__ == "__main__":
    main()
