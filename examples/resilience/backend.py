"""Service B for the resilience lab: the seed's B (``services.b``), made to misbehave on demand.

    python backend.py      # with the environment of services.b (ERROR_RATE, SERVICE_PORT, METRICS_PORT), plus
    DELAY_MS=200           # answer every request this many milliseconds late (a slow B; default 0)
    FAIL_REPLICA=2         # the replica (POD_REPLICA) that fails every request: ERROR_RATE 100 there (default: none)

Everything else (bodies, the ``service_b_requests_total`` metric, the log line) is services.b's.
"""

from __future__ import annotations

import asyncio
import os

from aiohttp import web

from services import b, gohttp, serve


def main() -> None:
    error_rate = b.parse_error_rate(os.environ.get("ERROR_RATE", "0"))
    bad = os.environ.get("FAIL_REPLICA", "")
    if bad and bad == os.environ.get("POD_REPLICA"):
        error_rate = 100
    handler = b.make_handler(error_rate)
    delay = int(os.environ.get("DELAY_MS", "0") or 0) / 1000
    if delay > 0:
        fast = handler

        async def handler(request: web.Request) -> web.Response:
            await asyncio.sleep(delay)
            return await fast(request)

    serve.run(gohttp.default_serve_mux(handler), serve.service_listeners())


if __name__ == "__main__":
    main()
