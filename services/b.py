"""Service B: the upstream that fails ERROR_RATE percent of its requests.

Port of iximiuz/envoy-playground basics/service-b. Its only job is to be an
unreliable dependency, so the sidecar's retries and metrics have something to
work on.
"""

from __future__ import annotations

import os
import random
import re

from aiohttp import web
from prometheus_client import Counter

from services import gohttp, golog, serve

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


def main() -> None:
    error_rate = parse_error_rate(os.environ.get("ERROR_RATE"))
    listeners = serve.service_listeners()
    serve.run(gohttp.default_serve_mux(make_handler(error_rate)), listeners)


if __name__ == "__main__":
    main()
