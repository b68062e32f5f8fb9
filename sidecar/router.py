"""The HTTP connection manager and its router: from a parsed request to an upstream response.

Per request: normalise the target (absolute form for HTTP_PROXY use), run the
request filters, pick virtual host and route, then forward with Envoy's retry
and timeout semantics. Local replies use Envoy's bodies and response flags so
that tools and people used to Envoy read them the same way.
"""

from __future__ import annotations

import asyncio
import time

import httptools

from sidecar.access_log import AccessLogger
from sidecar.cluster import ClusterRuntime
from sidecar.config import HttpConnectionManager, Route, VirtualHost
from sidecar.filters import DEFAULT_REQUEST_FILTERS, RequestFilter
from sidecar.http1 import Headers, strip_hop_by_hop
from sidecar.request_info import (
    FLAG_NO_HEALTHY_UPSTREAM,
    FLAG_NO_ROUTE,
    FLAG_UPSTREAM_CONNECT_FAILURE,
    FLAG_UPSTREAM_CONNECTION_TERMINATION,
    FLAG_UPSTREAM_OVERFLOW,
    FLAG_UPSTREAM_PROTOCOL_ERROR,
    FLAG_UPSTREAM_REQUEST_TIMEOUT,
    FLAG_UPSTREAM_RETRY_LIMIT_EXCEEDED,
)
from sidecar.retry import CONNECT_FAILURE, PER_TRY_TIMEOUT, RESET, RetryState
from sidecar.routing import RouteTable
from sidecar.server import Stream
from sidecar.stats import ClusterStats, HcmStats, ListenerStats
from sidecar.upstream import Pool, UpstreamConnection

RESET_BODY = b"upstream connect error or disconnect/reset before headers. reset reason: "

# Outcomes of one attempt.
COMMITTED = "committed"  # the response head went to the client
RETRY_STATUS = "retry-status"  # a retriable response; its body is being dropped
PROTOCOL_ERROR = "protocol-error"
GLOBAL_TIMEOUT = "timeout"


class Attempt:
    """One upstream try; a ``ResponseSink`` for the connection it runs on."""

    __slots__ = ("fwd", "pool", "future", "mode", "status", "started", "conn", "completed")

    def __init__(self, fwd: Forwarder, pool: Pool) -> None:
        self.fwd = fwd
        self.pool = pool
        self.future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.mode = ""  # "" until the head arrives, then "forward" or "discard"
        self.status = 0
        self.started = time.monotonic()
        self.conn: UpstreamConnection | None = None
        self.completed = False

    def on_head(self, conn: UpstreamConnection, status: int, headers: Headers) -> None:
        self.status = status
        if self.future.done():  # timed out meanwhile
            return
        if self.fwd.retry_for_status(status):
            self.mode = "discard"
            self.future.set_result(RETRY_STATUS)
            return
        self.mode = "forward"
        self.fwd.commit(self, status, headers)
        self.future.set_result(COMMITTED)

    def on_body(self, data: bytes) -> None:
        if self.mode == "forward":
            stream = self.fwd.stream
            stream.send_body(data)
            if stream.conn.write_paused and self.conn is not None:
                conn = self.conn
                conn.pause_reading()  # the client reads slowly: slow the upstream down
                stream.conn.when_writable(conn.resume_reading)

    def on_complete(self, conn: UpstreamConnection) -> None:
        self.completed = True
        self.pool.active_requests -= 1
        self.pool.release(conn)
        if self.mode == "forward":
            self.fwd.finish(self)

    def on_reset(self, conn: UpstreamConnection, reason: str) -> None:
        if self.completed:
            return
        self.completed = True
        self.pool.active_requests -= 1
        if not self.future.done():
            self.future.set_result(PROTOCOL_ERROR if reason == "protocol error" else RESET)
        elif self.mode == "forward":
            self.fwd.broken(FLAG_UPSTREAM_CONNECTION_TERMINATION)

    def timeout(self, kind: str) -> None:
        if not self.future.done():
            self.future.set_result(kind)
            self.abandon()
        elif self.mode == "forward" and not self.completed and kind == GLOBAL_TIMEOUT:
            self.abandon()
            self.fwd.broken(FLAG_UPSTREAM_REQUEST_TIMEOUT)

    def abandon(self) -> None:
        """Reset the upstream stream: its connection is no longer usable."""
        if not self.completed:
            self.completed = True
            self.pool.active_requests -= 1
            if self.conn is not None:
                self.conn.sink = None
                self.conn.close()


class Forwarder:
    """Forwards one request to a cluster with retries; the router filter's per-request state."""

    def __init__(self, hcm: HcmRuntime, stream: Stream, route: Route, vh: VirtualHost, cluster: ClusterRuntime,
                 headers: Headers, path: bytes) -> None:
        self.hcm = hcm
        self.stream = stream
        self.route = route
        self.cluster = cluster
        self.cstats: ClusterStats = cluster.stats
        self.headers = headers
        self.path = path
        self.retry = RetryState(route.retry_policy or vh.retry_policy, stream.headers)
        self.done_future: asyncio.Future[None] | None = None
        self.final_flags: list[str] = []
        timeout_s = route.timeout_s
        for n, v in stream.headers:
            if n == b"x-envoy-upstream-rq-timeout-ms" and v.strip().isdigit():
                timeout_s = int(v) / 1000
        self.timeout_s = timeout_s
        self.deadline = stream.info.start_monotonic + timeout_s if timeout_s > 0 else None
        self.attempts = 0
        self.retried = False
        self.in_retry = False

    # -- decisions (synchronous, called from parser callbacks) -------------------
    def retry_for_status(self, status: int) -> bool:
        if not self.retry.status_retriable(status):
            return False
        if self.can_retry():
            self.cstats.retry_response(status)
            return True
        return False

    def can_retry(self) -> bool:
        if self.retry.retries_left <= 0:
            if self.retry.retry_on:
                self.cstats.upstream_rq_retry_limit_exceeded.value += 1
                self.final_flags.append(FLAG_UPSTREAM_RETRY_LIMIT_EXCEEDED)
            return False
        if not self.stream.replayable:
            return False
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return False
        if self.cluster.active_retries >= self.cluster.breakers.max_retries:
            self.cstats.upstream_rq_retry_overflow.value += 1
            return False
        return True

    # -- response --------------------------------------------------------------
    def commit(self, attempt: Attempt, status: int, headers: Headers) -> None:
        self.cstats.response(status)
        if self.retried and not self.retry.status_retriable(status):
            self.cstats.upstream_rq_retry_success.value += 1
        info = self.stream.info
        info.response_flags.extend(self.final_flags)
        elapsed = int((time.monotonic() - attempt.started) * 1000)
        info.upstream_service_time_ms = elapsed
        out = strip_hop_by_hop(headers)
        length: int | None = None
        kept: Headers = []
        for n, v in out:
            if n == b"content-length":
                try:
                    length = int(v)
                except ValueError:
                    length = None
            else:
                kept.append((n, v))
        kept.append((b"x-envoy-upstream-service-time", b"%d" % elapsed))
        info.response_headers = {n.decode("latin-1"): v.decode("latin-1") for n, v in kept}
        self.stream.send_head(status, kept, length)

    def finish(self, attempt: Attempt) -> None:
        self.cstats.upstream_rq_time.record((time.monotonic() - attempt.started) * 1000)
        self.cstats.upstream_rq_completed.value += 1
        self.stream.finish()
        if self.done_future is not None and not self.done_future.done():
            self.done_future.set_result(None)

    def broken(self, flag: str) -> None:
        """The upstream failed after the head went out: all we can do is cut the client off."""
        self.stream.info.response_flags.append(flag)
        if flag == FLAG_UPSTREAM_REQUEST_TIMEOUT:
            self.cstats.upstream_rq_timeout.value += 1
        self.stream.abort()
        if self.done_future is not None and not self.done_future.done():
            self.done_future.set_result(None)

    # -- the attempt loop ----------------------------------------------------------
    def request_bytes(self) -> bytes:
        s = self.stream
        hdrs = self.headers
        lines = [b"%s %s HTTP/1.1\r\n" % (s.method, self.path)]
        lines.extend(b"%s: %s\r\n" % (n, v) for n, v in hdrs)
        lines.append(b"x-envoy-attempt-count: %d\r\n" % self.attempts)
        if self.timeout_s > 0:
            lines.append(b"x-envoy-expected-rq-timeout-ms: %d\r\n" % int(self.timeout_s * 1000))
        if s.streaming and s.chunked_request:
            lines.append(b"transfer-encoding: chunked\r\n")
        elif s.streaming:
            lines.append(b"content-length: %d\r\n" % (s.content_length or 0))
        elif s.body or s.chunked_request or s.content_length is not None:
            lines.append(b"content-length: %d\r\n" % len(s.body))
        lines.append(b"\r\n")
        if not s.streaming:
            lines.append(bytes(s.body))
        return b"".join(lines)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.done_future = loop.create_future()
        cluster = self.cluster
        cb = cluster.breakers
        if cluster.active_requests >= cb.max_requests:
            self.cstats.upstream_rq_pending_overflow.value += 1
            self.hcm.local_reply(self.stream, 503, RESET_BODY + b"overflow", FLAG_UPSTREAM_OVERFLOW)
            return
        cluster.active_requests += 1
        self.cstats.upstream_rq_active.value += 1
        try:
            await self._attempts(loop)
            if self.stream.head_sent and not self.stream.done:
                await self.done_future
        finally:
            cluster.active_requests -= 1
            self.cstats.upstream_rq_active.value -= 1

    async def _attempts(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            pool = self.cluster.choose()
            if pool is None:
                self.hcm.local_reply(self.stream, 503, b"no healthy upstream", FLAG_NO_HEALTHY_UPSTREAM)
                return
            self.attempts += 1
            self.stream.info.attempts = self.attempts
            self.stream.info.upstream_host = pool.address
            outcome = await self._try(loop, pool)
            if self.in_retry:
                self.in_retry = False
                self.cluster.active_retries -= 1
            if outcome == COMMITTED:
                return
            if outcome == GLOBAL_TIMEOUT:
                self.cstats.upstream_rq_timeout.value += 1
                self.hcm.local_reply(self.stream, 504, b"upstream request timeout", FLAG_UPSTREAM_REQUEST_TIMEOUT)
                return
            if outcome != RETRY_STATUS:
                if outcome == PER_TRY_TIMEOUT:
                    self.cstats.upstream_rq_per_try_timeout.value += 1
                retriable = self.retry.failure_retriable(
                    CONNECT_FAILURE if outcome == CONNECT_FAILURE else
                    PER_TRY_TIMEOUT if outcome == PER_TRY_TIMEOUT else RESET)
                if not (retriable and self.can_retry()):
                    self._fail(outcome)
                    return
            # retry
            self.retry.retries_left -= 1
            self.retry.attempt_retries += 1
            self.retried = True
            self.in_retry = True
            self.cluster.active_retries += 1
            self.cstats.upstream_rq_retry.value += 1
            delay = self.retry.backoff_s()
            if self.deadline is not None:
                delay = min(delay, max(0.0, self.deadline - time.monotonic()))
            if delay > 0:
                await asyncio.sleep(delay)
            if self.deadline is not None and time.monotonic() >= self.deadline:
                self.cluster.active_retries -= 1
                self.in_retry = False
                self.cstats.upstream_rq_timeout.value += 1
                self.hcm.local_reply(self.stream, 504, b"upstream request timeout", FLAG_UPSTREAM_REQUEST_TIMEOUT)
                return

    def _fail(self, outcome: str) -> None:
        flags = list(self.final_flags)
        if outcome == PER_TRY_TIMEOUT:
            self.hcm.local_reply(self.stream, 504, b"upstream request timeout", FLAG_UPSTREAM_REQUEST_TIMEOUT,
                                 extra=flags)
        elif outcome == CONNECT_FAILURE:
            self.hcm.local_reply(self.stream, 503, RESET_BODY + b"connection failure",
                                 FLAG_UPSTREAM_CONNECT_FAILURE, extra=flags)
        elif outcome == PROTOCOL_ERROR:
            self.hcm.local_reply(self.stream, 503, RESET_BODY + b"protocol error", FLAG_UPSTREAM_PROTOCOL_ERROR,
                                 extra=flags)
        else:
            self.hcm.local_reply(self.stream, 503, RESET_BODY + b"connection termination",
                                 FLAG_UPSTREAM_CONNECTION_TERMINATION, extra=flags)

    async def _try(self, loop: asyncio.AbstractEventLoop, pool: Pool) -> str:
        cfg = self.cluster.cfg
        remaining = None if self.deadline is None else self.deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return GLOBAL_TIMEOUT
        self.cstats.upstream_rq_total.value += 1
        conn = pool.take_idle()
        reused = conn is not None
        if conn is None:
            self.cstats.upstream_cx_total.value += 1
            timeout = cfg.connect_timeout_s if remaining is None else min(cfg.connect_timeout_s, remaining)
            try:
                conn = await pool.connect(timeout)
            except (TimeoutError, OSError):
                self.cstats.upstream_cx_connect_fail.value += 1
                if remaining is not None and time.monotonic() >= (self.deadline or 0):
                    return GLOBAL_TIMEOUT
                return CONNECT_FAILURE
        attempt = Attempt(self, pool)
        attempt.conn = conn
        pool.active_requests += 1
        s = self.stream
        conn.send(self.request_bytes(), attempt, head_only=s.method == b"HEAD")
        if s.streaming:
            self._stream_body(conn)
        per_try = self.retry.per_try_timeout_s
        timers = []
        if per_try:
            timers.append(loop.call_later(per_try, attempt.timeout, PER_TRY_TIMEOUT))
        if self.deadline is not None:
            timers.append(loop.call_later(max(0.0, self.deadline - time.monotonic()), attempt.timeout,
                                          GLOBAL_TIMEOUT))
        try:
            outcome = await attempt.future
        except asyncio.CancelledError:
            attempt.abandon()  # the client went away: stop the upstream work too
            for t in timers:
                t.cancel()
            raise
        if outcome == COMMITTED:
            # Keep the route timeout armed until the body is done; per-try ends at the head (Envoy).
            if per_try:
                timers[0].cancel()
            if self.done_future is not None:
                self.done_future.add_done_callback(lambda _: [t.cancel() for t in timers])
            return outcome
        for t in timers:
            t.cancel()
        if outcome == RESET and reused and attempt.status == 0 and s.replayable:
            # A pooled connection the server had already closed: not the request's fault, retry once quietly.
            return await self._try(loop, pool)
        return outcome

    def _stream_body(self, conn: UpstreamConnection) -> None:
        """Forward a body too large to buffer as it arrives (no retry possible)."""
        s = self.stream
        framed = s.chunked_request

        def send(data: bytes) -> None:
            conn.write(b"%x\r\n%s\r\n" % (len(data), data) if framed else data)

        def done() -> None:
            if framed:
                conn.write(b"0\r\n\r\n")

        if s.body:
            send(bytes(s.body))
            s.body.clear()
        if s.body_complete:
            done()
        else:
            s.body_sink = send
            s.body_done_sink = done


class HcmRuntime:
    """One listener's HTTP connection manager."""

    def __init__(self, cfg: HttpConnectionManager, clusters: dict[str, ClusterRuntime], stats: HcmStats,
                 listener_stats: ListenerStats, loggers: list[AccessLogger],
                 filters: tuple[RequestFilter, ...] = DEFAULT_REQUEST_FILTERS) -> None:
        self.cfg = cfg
        self.table = RouteTable(cfg.route_config)
        self.clusters = clusters
        self.stats = stats
        self.listener_stats = listener_stats
        self.loggers = loggers
        self.filters = filters

    def local_reply(self, stream: Stream, status: int, body: bytes, flag: str | None,
                    extra: list[str] | None = None) -> None:
        if stream.head_sent:
            stream.abort()
            return
        info = stream.info
        if extra:
            info.response_flags.extend(f for f in extra if f not in info.response_flags)
        if flag and flag not in info.response_flags:
            info.response_flags.append(flag)
        stream.reply(status, body)

    async def handle(self, stream: Stream) -> None:
        info = stream.info
        self.stats.downstream_rq_total.value += 1
        self.stats.downstream_rq_active.value += 1
        url = stream.url
        info.method = stream.method.decode("latin-1")
        authority: bytes | None = None
        if url[:1] == b"/" or url == b"*":
            path = url
        else:
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                self.local_reply(stream, 400, b"invalid request target", "DPE")
                return
            if parsed.schema not in (b"http", None) or parsed.host is None:
                self.local_reply(stream, 400, b"unsupported request target", "DPE")
                return
            authority = parsed.host + (b":%d" % parsed.port if parsed.port else b"")
            path = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
        headers = stream.headers
        if authority is not None:  # absolute form wins over Host (RFC 7230 5.4)
            headers = [(n, v) for n, v in headers if n != b"host"]
            headers.insert(0, (b"host", authority))
        else:
            authority = stream.header(b"host") or b""
        for f in self.filters:
            headers = f(stream, headers)
        info.path = path.decode("latin-1")
        info.authority = authority.decode("latin-1")
        info.request_headers = {n.decode("latin-1"): v.decode("latin-1") for n, v in headers}
        if stream.http_version != "1.1":
            info.protocol = f"HTTP/{stream.http_version}"
        vh = self.table.virtual_host(info.authority)
        route = self.table.route(vh, info.path, headers) if vh is not None else None
        if route is None:
            self.stats.no_route.value += 1
            self.local_reply(stream, 404, b"", FLAG_NO_ROUTE)
            return
        info.route_name = route.name
        if route.direct_response is not None:
            self.stats.rq_direct_response.value += 1
            stream.reply(route.direct_response.status, route.direct_response.body)
            return
        cluster = self.clusters[route.cluster or ""]
        info.upstream_cluster = cluster.name
        if route.prefix_rewrite is not None and route.match.prefix is not None:
            info.original_path = info.path
            path = route.prefix_rewrite.encode() + path[len(route.match.prefix):]
        await Forwarder(self, stream, route, vh, cluster, headers, path).run()  # type: ignore[arg-type]

    def stream_done(self, stream: Stream) -> None:
        """Every request ends here exactly once: downstream stats and the access log."""
        info = stream.info
        info.duration_ms = int((time.monotonic() - info.start_monotonic) * 1000)
        self.stats.downstream_rq_active.value -= 1
        self.stats.response(info.response_code)
        self.listener_stats.response(info.response_code)
        self.stats.downstream_rq_time.record((time.monotonic() - info.start_monotonic) * 1000)
        for logger in self.loggers:
            logger.log(info)
