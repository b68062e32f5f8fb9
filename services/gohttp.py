"""Go ``net/http`` idioms the demo services rely on, rebuilt on aiohttp.

The services are ports of Go programs whose observable behaviour (status
codes, headers, bodies, the extra routes Go's DefaultServeMux exposes) is what
the blog post shows, so these helpers reproduce it byte for byte.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, disable_created_metrics, generate_latest

from services import golog

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# What Go's content sniffing picks for these plain-text bodies.
_TEXT = "text/plain"
_CHARSET = "utf-8"


def text(body: bytes, status: int = 200) -> web.Response:
    """A ``fmt.Fprintln(w, ...)`` response; ``body`` already carries Println's newline."""
    return web.Response(body=body, status=status, content_type=_TEXT, charset=_CHARSET)


def error(message: bytes, status: int) -> web.Response:
    """``http.Error``: Go appends a newline and forbids MIME sniffing."""
    response = web.Response(body=message + b"\n", status=status, content_type=_TEXT, charset=_CHARSET)
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def remote_addr(request: web.Request) -> str:
    """Go's ``r.RemoteAddr``: host:port of the peer, IPv6 in brackets."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not peer:
        return request.remote or ""
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def log_request(request: web.Request, status: int) -> None:
    """The ``log.Println("HTTP 200", r.Method, r.URL, r.RemoteAddr)`` line both services print."""
    golog.println(f"HTTP {status}", request.method, request.raw_path, remote_addr(request))


async def _metrics(_request: web.Request) -> web.Response:
    response = web.Response(body=generate_latest(REGISTRY))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def default_serve_mux(handler: Handler) -> web.Application:
    """Go's DefaultServeMux as the services configure it: ``/metrics`` plus ``/`` for everything else.

    Go serves this one mux on both the service port and the metrics port, so
    every listener answers both routes; we keep that (one app, several sites)
    because scrapers and curl users of the original rely on it.
    """
    # client_golang has no *_created series; keep the exposition the same.
    disable_created_metrics()
    app = web.Application()
    app.router.add_route("*", "/metrics", _metrics)
    app.router.add_route("*", "/{path:.*}", handler)
    return app
