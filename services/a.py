"""Service A: the public API that calls service B on every request.

Port of iximiuz/envoy-playground basics/service-a. The upstream name (e.g.
``b.service``) comes from the pod's hosts file, as podman's ``--add-host`` did
in the blog post, and HTTP_PROXY is honoured so the egress sidecar can be
slotted in without touching this code. It passes the trace context headers of
each request on to B (``services.zipkin.PROPAGATED``), as Istio asks of applications.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.helpers import get_env_proxy_for_url
from prometheus_client import Counter
from yarl import URL

from pods.aio_resolver import MeshResolver
from services import gohttp, serve
from services.zipkin import propagated

REQUESTS = Counter("service_a_requests", "The total number of requests received by Service A.", ["status"])

# Go's http.Get has no timeout at all; a bounded one keeps a hung upstream from
# piling up requests forever while staying far above any sane response time.
UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=30)

_RESPONDED = b"Service A: upstream responded with: "
_FAILED = b"Service A: upstream failed with: "

_UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError)


def describe(url: str, exc: BaseException) -> str:
    """Go's ``*url.Error`` text: ``Get "<url>": <cause>``."""
    if isinstance(exc, asyncio.TimeoutError):
        cause = "context deadline exceeded (Client.Timeout exceeded while awaiting headers)"
    else:
        cause = str(exc) or type(exc).__name__
    return f'Get "{url}": {cause}'


# Linux: let connect() pick the source port, so binding a source address does
# not reserve an ephemeral port per address up front.
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def pod_socket_factory(pod_ip: str | None) -> aiohttp.connector.SocketFactoryType | None:
    """Make loopback connections leave from the pod's alias, as they would leave a pod's own IP.

    Without it every pod talks from 127.0.0.1, so upstream logs and any
    source-based policy could not tell pods apart. Only loopback destinations
    get the source address: a 127.x source cannot reach another network.
    """
    try:
        if not pod_ip or not ipaddress.IPv4Address(pod_ip).is_loopback:
            return None
    except ValueError:
        return None

    def factory(addr_info: tuple) -> socket.socket:
        family, type_, proto, _, address = addr_info
        sock = socket.socket(family, type_, proto)
        if family == socket.AF_INET and address[0].startswith("127."):
            try:
                if sys.platform == "linux":
                    sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((pod_ip, 0))
            except OSError:
                sock.close()
                raise
        return sock

    return factory


def env_proxy(url: str) -> tuple[URL | None, aiohttp.BasicAuth | None]:
    """The HTTP_PROXY/NO_PROXY decision for ``url``, like Go's ProxyFromEnvironment.

    Decided once, not per request: aiohttp's ``trust_env`` re-reads the
    environment and ~/.netrc on every request, which cut A's throughput to a
    quarter, and a process's environment cannot change under it anyway.
    """
    try:
        return get_env_proxy_for_url(URL(url))
    except (LookupError, ValueError):
        return None, None


class App:
    """Service A's handler plus the one HTTP client it reuses for every request.

    One keep-alive session per process: opening a connection (and resolving the
    name) per request would dominate the latency we are trying to measure.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self._proxy, self._proxy_auth = env_proxy(upstream)
        self.session: aiohttp.ClientSession | None = None
        self._ok, self._failed = REQUESTS.labels("2xx"), REQUESTS.labels("5xx")

    async def client(self, _app: web.Application) -> AsyncIterator[None]:
        # limit=0: concurrency is bounded by our clients, not by a pool queue.
        # A short DNS cache TTL lets scaled pods (hosts file rewrites) show up
        # quickly, while aiohttp's cache still rotates through the replicas.
        connector = aiohttp.TCPConnector(
            resolver=MeshResolver(),
            limit=0,
            ttl_dns_cache=1,
            socket_factory=pod_socket_factory(os.environ.get("POD_IP")),
        )
        # No cookie jar: Go's http.Get keeps none, and cookie handling costs on every response.
        session = aiohttp.ClientSession(connector=connector, timeout=UPSTREAM_TIMEOUT, trust_env=False,
                                        cookie_jar=aiohttp.DummyCookieJar())
        async with session:
            self.session = session
            yield
            self.session = None

    async def handle(self, request: web.Request) -> web.Response:
        assert self.session is not None
        # The trace context goes on to B as it came (Istio asks this of applications): the sidecars' spans of
        # this request and of the call to B then join into one trace.
        context = propagated(request.headers) or None
        try:
            async with self.session.get(self.upstream, proxy=self._proxy, proxy_auth=self._proxy_auth,
                                        headers=context) as upstream:
                status, body = upstream.status, await upstream.read()
        except _UPSTREAM_ERRORS as exc:
            response = gohttp.error(_FAILED + describe(self.upstream, exc).encode(), 500)
        else:
            if status == 200:
                response = gohttp.text(_RESPONDED + body + b"\n")
            else:
                response = gohttp.error(_FAILED + b"HTTP %d - %s" % (status, body), 500)
        (self._ok if response.status == 200 else self._failed).inc()
        gohttp.log_request(request, response.status)
        return response

    def web_app(self) -> web.Application:
        app = gohttp.default_serve_mux(self.handle)
        app.cleanup_ctx.append(self.client)
        return app


def main() -> None:
    listeners = serve.service_listeners()
    serve.run(App(os.environ.get("UPSTREAM_SERVICE", "")).web_app(), listeners)


if __name__ == "__main__":
    main()
