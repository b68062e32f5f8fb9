"""Service B: the upstream that fails ERROR_RATE percent of its requests.

Port of iximiuz/envoy-playground basics/service-b. Its only job is to be an
unreliable dependency, so the sidecar's retries and metrics have something to
work on.
"""

from __future__ import annotations

import os
import random
import re
import time

from aiohttp import web
from prometheus_client import Counter

from services import gohttp, golog, serve
from services.zipkin import ServerSpans

REQUESTS = Counter("service_b_requests", "The total number of requests received by Service B.", ["status"])

# strconv.Atoi's grammar: Python's int() would also take " 5" or "1_0".
_ATOI = re.compile(r"[+-]?[0-9]+")


def parse_error_rate(raw: str | None) -> int:
    if raw is None or not _ATOI.fullmatch(raw):
        golog.fatal("Can not parse ERROR_RATE env")
    return int(raw)


def make_handler(error_rate: int) -> gohttp.Handler:
    ok, failed = REQUESTS.labels("2xx"), REQUESTS.labels("5xx")
    randrange, getrandbits = random.randrange, random.getrandbits

    async def handler(request: web.Request) -> web.Response:
        if randrange(100) >= error_rate:
            response = gohttp.text(b"Service B: Yay! nounce %d\n" % getrandbits(32))
            ok.inc()
        else:
            response = gohttp.error(b"Service B: Ooops... nounce %d" % getrandbits(32), 500)
            failed.inc()
        gohttp.log_request(request, response.status)
        return response

    return handler


def traced(handler: gohttp.Handler, spans: ServerSpans) -> gohttp.Handler:
    """``handler`` reporting a SERVER span per request (in a traced mesh: B is then a Zipkin-instrumented
    service, so a trace shows what B itself answered to each of its caller's attempts)."""
    clock, now = time.perf_counter, time.time

    async def with_span(request: web.Request) -> web.StreamResponse:
        start, t0 = now(), clock()
        response = await handler(request)
        spans.record(request, response.status, start, clock() - t0)
        return response

    return with_span


def main() -> None:
    error_rate = parse_error_rate(os.environ.get("ERROR_RATE"))
    listeners = serve.service_listeners()
    handler = make_handler(error_rate)
    spans = ServerSpans.from_env("b")
    if spans is not None:
        handler = traced(handler, spans)
    app = gohttp.default_serve_mux(handler)
    if spans is not None:
        app.cleanup_ctx.append(spans.reporter)
    serve.run(app, listeners)


if __name__ == "__main__":
    main()
