"""The HTTP connection manager and its router: from a parsed request to an upstream response.

Per request: normalise the target (absolute form for HTTP_PROXY use), run the
request filters, pick virtual host and route, then forward with Envoy's retry
and timeout semantics. Local replies use Envoy's bodies and response flags so
that tools and people used to Envoy read them the same way.

The forwarding path is a callback state machine, not a coroutine per request:
parser callbacks, ``call_later`` timers and (only when a new upstream
connection is needed) one connect task. That keeps a proxied request to a few
dozen microseconds of Python.
"""

from __future__ import annotations

import asyncio
import time

import httptools

from sidecar.access_log import AccessLogger
from sidecar.cluster import ClusterRuntime
from sidecar.config import HttpConnectionManager, Route, VirtualHost
from sidecar.filters import DEFAULT_REQUEST_FILTERS, RequestFilter
from sidecar.http1 import HOP_BY_HOP, LAST_CHUNK, Headers, chunk, connection_tokens
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
PROTOCOL_ERROR = "protocol-error"
_FAIL_REPLIES = {
    CONNECT_FAILURE: (503, RESET_BODY + b"connection failure", FLAG_UPSTREAM_CONNECT_FAILURE),
    RESET: (503, RESET_BODY + b"connection termination", FLAG_UPSTREAM_CONNECTION_TERMINATION),
    PROTOCOL_ERROR: (503, RESET_BODY + b"protocol error", FLAG_UPSTREAM_PROTOCOL_ERROR),
    PER_TRY_TIMEOUT: (504, b"upstream request timeout", FLAG_UPSTREAM_REQUEST_TIMEOUT),
}
_FORWARD = 1
_DISCARD = 2
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


class Attempt:
    """One upstream try; the ``ResponseSink`` of the connection it runs on."""

    __slots__ = ("fwd", "pool", "conn", "mode", "status", "started", "completed", "timer", "reused", "request_done")

    def __init__(self, fwd: Forwarder, pool: Pool, conn: UpstreamConnection, reused: bool) -> None:
        self.fwd = fwd
        self.pool = pool
        self.conn = conn
        self.mode = 0
        self.status = 0
        self.started = time.monotonic()
        self.completed = False
        self.timer: asyncio.TimerHandle | None = None
        self.reused = reused
        self.request_done = False  # every byte of the request (body included) was handed to the connection

    def on_head(self, conn: UpstreamConnection, status: int, headers: Headers) -> None:
        self.status = status
        if self.timer is not None:
            self.timer.cancel()  # the per-try timeout covers the wait for the head (Envoy)
            self.timer = None
        self.fwd.on_head(self, status, headers)

    def on_body(self, data: bytes) -> None:
        if self.mode == _FORWARD:
            stream = self.fwd.stream
            stream.send_body(data)
            if stream.conn.write_paused:
                conn = self.conn
                conn.pause_reading()  # the client reads slowly: slow the upstream down
                stream.conn.when_writable(conn.resume_reading)

    def flush(self) -> None:
        if self.mode == _FORWARD:
            self.fwd.stream.conn.flush()

    def on_complete(self, conn: UpstreamConnection) -> None:
        self.completed = True
        self.pool.active_requests -= 1
        if self.request_done:
            self.pool.release(conn)
        else:
            # The upstream answered before taking the whole body (a 401, a 413...). Pooling this
            # connection would send the rest of this body as the start of someone else's request.
            self.fwd.stop_body()
            conn.reset()
        if self.mode == _FORWARD:
            self.fwd.on_response_complete(self)

    def on_reset(self, conn: UpstreamConnection, reason: str) -> None:
        if self.completed:
            return
        self.completed = True
        self.pool.active_requests -= 1
        if self.timer is not None:
            self.timer.cancel()
        if self.mode == 0:
            self.fwd.on_failure(self, PROTOCOL_ERROR if reason == "protocol error" else RESET)
        elif self.mode == _FORWARD:
            self.fwd.broken(FLAG_UPSTREAM_CONNECTION_TERMINATION)

    def on_per_try_timeout(self) -> None:
        self.timer = None
        if self.mode == 0 and not self.completed:
            self.abandon()
            self.fwd.on_failure(self, PER_TRY_TIMEOUT)

    def abandon(self) -> None:
        """Reset the upstream stream: its connection cannot be reused."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.completed:
            self.completed = True
            self.pool.active_requests -= 1
            self.conn.sink = None
            self.conn.reset()


class Forwarder:
    """Forwards one request to a cluster with retries (the router filter's per-request state)."""

    __slots__ = ("hcm", "stream", "cluster", "cstats", "headers", "path", "retry", "timeout_s", "deadline",
                 "attempts", "retried", "in_retry", "attempt", "finished", "global_timer", "retry_timer",
                 "connecting", "holding", "loop", "flags", "quiet_retry_used")

    def __init__(self, hcm: HcmRuntime, stream: Stream, route: Route, vh: VirtualHost, cluster: ClusterRuntime,
                 headers: Headers, path: bytes) -> None:
        self.hcm = hcm
        self.loop = hcm.loop
        self.stream = stream
        self.cluster = cluster
        self.cstats: ClusterStats = cluster.stats
        self.headers = headers
        self.path = path
        self.retry = RetryState(route.retry_policy or vh.retry_policy, stream.headers if stream.envoy_headers else ())
        timeout_s = route.timeout_s
        override = stream.seen.get(b"x-envoy-upstream-rq-timeout-ms") if stream.envoy_headers else None
        if override is not None and override.strip().isdigit():
            timeout_s = int(override) / 1000
        self.timeout_s = timeout_s
        self.deadline = stream.info.start_monotonic + timeout_s if timeout_s > 0 else None
        self.attempts = 0
        self.retried = False
        self.in_retry = False
        self.attempt: Attempt | None = None
        self.finished = False
        self.global_timer: asyncio.TimerHandle | None = None
        self.retry_timer: asyncio.TimerHandle | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.holding = False
        self.flags: list[str] = []
        self.quiet_retry_used = False

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        cluster = self.cluster
        if cluster.active_requests >= cluster.breakers.max_requests:
            self.cstats.upstream_rq_pending_overflow.value += 1
            self.local_reply(503, RESET_BODY + b"overflow", FLAG_UPSTREAM_OVERFLOW)
            return
        cluster.active_requests += 1
        self.cstats.upstream_rq_active.value += 1
        self.holding = True
        self.stream.on_cancel = self.cancel
        if self.deadline is not None:
            self.global_timer = self.loop.call_later(self.timeout_s, self.on_global_timeout)
        self.next_attempt()

    def _release(self) -> None:
        """Exactly once per request: give back breaker slots and timers."""
        if self.finished:
            return
        self.finished = True
        if self.holding:
            self.cluster.active_requests -= 1
            self.cstats.upstream_rq_active.value -= 1
        if self.in_retry:
            self.in_retry = False
            self.cluster.active_retries -= 1
        for timer in (self.global_timer, self.retry_timer):
            if timer is not None:
                timer.cancel()
        if self.connecting is not None:
            self.connecting.cancel()
        self.stream.on_cancel = None

    def local_reply(self, status: int, body: bytes, flag: str) -> None:
        self._release()
        self.stream.info.response_flags.extend(f for f in self.flags if f not in self.stream.info.response_flags)
        self.hcm.local_reply(self.stream, status, body, flag)

    def cancel(self) -> None:
        """The client went away: stop the upstream work too."""
        if self.attempt is not None:
            self.attempt.abandon()
        self._release()

    # -- attempts ---------------------------------------------------------------
    def next_attempt(self, fresh: bool = False) -> None:
        self.retry_timer = None
        if self.finished:
            return
        pool = self.cluster.choose()
        if pool is None:
            self.local_reply(503, b"no healthy upstream", FLAG_NO_HEALTHY_UPSTREAM)
            return
        self.attempts += 1
        info = self.stream.info
        info.attempts = self.attempts
        info.upstream_host = pool.address
        self.cstats.upstream_rq_total.value += 1
        conn = None if fresh else pool.take_idle()
        if conn is not None:
            self._send(pool, conn, True)
        else:
            self.cstats.upstream_cx_total.value += 1
            self.connecting = self.loop.create_task(self._connect(pool))

    async def _connect(self, pool: Pool) -> None:
        timeout = self.cluster.cfg.connect_timeout_s
        if self.deadline is not None:
            timeout = max(0.001, min(timeout, self.deadline - time.monotonic()))
        try:
            conn = await pool.connect(timeout)
        except (OSError, TimeoutError):
            self.connecting = None
            self.cstats.upstream_cx_connect_fail.value += 1
            if not self.finished:
                self.on_failure(None, CONNECT_FAILURE)
            return
        self.connecting = None
        if self.finished:
            pool.release(conn)
            return
        self._send(pool, conn, False)

    def _send(self, pool: Pool, conn: UpstreamConnection, reused: bool) -> None:
        attempt = Attempt(self, pool, conn, reused)
        self.attempt = attempt
        pool.active_requests += 1
        s = self.stream
        conn.send(self.request_bytes(), attempt, s.method == b"HEAD")
        if s.streaming:
            self._stream_body(conn, attempt)
        else:
            attempt.request_done = True
        per_try = self.retry.per_try_timeout_s
        if per_try and not attempt.completed:
            attempt.timer = self.loop.call_later(per_try, attempt.on_per_try_timeout)

    def request_bytes(self) -> bytes:
        s = self.stream
        out = [b"%s %s HTTP/1.1\r\n" % (s.method, self.path)]
        out.extend(b"%s: %s\r\n" % h for h in self.headers)
        out.append(b"x-envoy-attempt-count: %d\r\n" % self.attempts)
        if self.timeout_s > 0:
            out.append(b"x-envoy-expected-rq-timeout-ms: %d\r\n" % int(self.timeout_s * 1000))
        if s.streaming:
            out.append(b"transfer-encoding: chunked\r\n\r\n" if s.chunked_request
                       else b"content-length: %d\r\n\r\n" % (s.content_length or 0))
            return b"".join(out)
        if s.body or s.chunked_request or s.content_length is not None:
            out.append(b"content-length: %d\r\n\r\n" % len(s.body))
            out.append(bytes(s.body))
        else:
            out.append(b"\r\n")
        return b"".join(out)

    def _stream_body(self, conn: UpstreamConnection, attempt: Attempt) -> None:
        """Forward a body too large to buffer as it arrives (such a request is never retried).

        Flow control both ways: when the upstream's send buffer is full, the client is not read.
        """
        s = self.stream
        framed = s.chunked_request
        down = s.conn

        def send(data: bytes) -> None:
            conn.write(chunk(data) if framed else data)
            if conn.write_paused and down.transport is not None and not down.closed:
                down.transport.pause_reading()
                conn.when_writable(resume)

        def resume() -> None:
            if down.transport is not None and not down.closed and not down.failed:
                down.transport.resume_reading()

        def done() -> None:
            if framed:
                conn.write(LAST_CHUNK)
            attempt.request_done = True

        if s.body:
            send(bytes(s.body))
            s.body.clear()
        if s.body_complete:
            done()
        else:
            s.body_sink = send
            s.body_done_sink = done

    def stop_body(self) -> None:
        """No more request body goes upstream (the attempt ended before it was all sent)."""
        self.stream.body_sink = None
        self.stream.body_done_sink = None

    # -- outcomes ---------------------------------------------------------------------
    def _attempt_outcome(self) -> None:
        """An attempt's result is known: a retry in progress no longer holds a breaker slot (Envoy)."""
        if self.in_retry:
            self.in_retry = False
            self.cluster.active_retries -= 1

    def on_head(self, attempt: Attempt, status: int, headers: Headers) -> None:
        if self.finished:
            attempt.mode = _DISCARD
            return
        self._attempt_outcome()
        retry = self.retry
        if retry.retry_on and retry.status_retriable(status) and self._may_retry():
            attempt.mode = _DISCARD
            self.cstats.retry_response(status)
            self._schedule_retry()
            return
        attempt.mode = _FORWARD
        self._commit(attempt, status, headers)

    def on_failure(self, attempt: Attempt | None, kind: str) -> None:
        if self.finished:
            return
        self._attempt_outcome()
        if kind == PER_TRY_TIMEOUT:
            self.cstats.upstream_rq_per_try_timeout.value += 1
        elif (kind == RESET and attempt is not None and attempt.reused and not self.quiet_retry_used
              and self.stream.replayable and self.stream.method in _IDEMPOTENT):
            # A pooled connection the server had already closed: not this request's fault. Like nginx,
            # retry once, on a fresh connection, without spending the retry budget (idempotent only).
            self.quiet_retry_used = True
            self.attempts -= 1
            self.next_attempt(fresh=True)
            return
        kind_for_policy = PER_TRY_TIMEOUT if kind == PER_TRY_TIMEOUT else (
            CONNECT_FAILURE if kind == CONNECT_FAILURE else RESET)
        if self.retry.failure_retriable(kind_for_policy) and self._may_retry():
            self._schedule_retry()
            return
        status, body, flag = _FAIL_REPLIES[kind]
        self.local_reply(status, body, flag)

    def _may_retry(self) -> bool:
        retry = self.retry
        if retry.retries_left <= 0:
            self.cstats.upstream_rq_retry_limit_exceeded.value += 1
            self.flags.append(FLAG_UPSTREAM_RETRY_LIMIT_EXCEEDED)
            return False
        if not self.stream.replayable:
            return False
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return False
        if self.cluster.active_retries >= self.cluster.breakers.max_retries:
            self.cstats.upstream_rq_retry_overflow.value += 1
            return False
        return True

    def _schedule_retry(self) -> None:
        retry = self.retry
        retry.retries_left -= 1
        retry.attempt_retries += 1
        self.retried = True
        self.in_retry = True
        self.cluster.active_retries += 1
        self.cstats.upstream_rq_retry.value += 1
        delay = retry.backoff_s()
        if self.deadline is not None:
            delay = min(delay, max(0.0, self.deadline - time.monotonic()))
        self.retry_timer = self.loop.call_later(delay, self.next_attempt)

    def on_global_timeout(self) -> None:
        self.global_timer = None
        if self.finished:
            return
        self.cstats.upstream_rq_timeout.value += 1
        attempt = self.attempt
        if attempt is not None and attempt.mode == _FORWARD:
            attempt.abandon()
            self.broken(FLAG_UPSTREAM_REQUEST_TIMEOUT)
            return
        if attempt is not None:
            attempt.abandon()
        self.local_reply(504, b"upstream request timeout", FLAG_UPSTREAM_REQUEST_TIMEOUT)

    # -- response --------------------------------------------------------------------
    def _commit(self, attempt: Attempt, status: int, headers: Headers) -> None:
        cstats = self.cstats
        cstats.response(status)
        if self.retried and not self.retry.status_retriable(status):
            cstats.upstream_rq_retry_success.value += 1
        info = self.stream.info
        if self.flags:
            info.response_flags.extend(self.flags)
        elapsed = int((time.monotonic() - attempt.started) * 1000)
        info.upstream_service_time_ms = elapsed
        length: int | None = None
        kept: Headers = []
        conn_hdr = False
        for h in headers:
            n = h[0]
            if n in HOP_BY_HOP:
                conn_hdr = conn_hdr or n == b"connection"
                continue
            if n == b"content-length":
                try:
                    length = int(h[1])
                except ValueError:
                    length = None
                continue
            kept.append(h)
        if conn_hdr:  # names listed in Connection are hop-by-hop for this message too
            extra = connection_tokens(headers)
            kept = [h for h in kept if h[0] not in extra]
        kept.append((b"x-envoy-upstream-service-time", b"%d" % elapsed))
        info.raw_response_headers = kept
        self.stream.send_head(status, kept, length)

    def on_response_complete(self, attempt: Attempt) -> None:
        self.cstats.upstream_rq_time.record((time.monotonic() - attempt.started) * 1000)
        self.cstats.upstream_rq_completed.value += 1
        self._release()
        self.stream.finish()

    def broken(self, flag: str) -> None:
        """The upstream failed after the head went out: all we can do is cut the client off."""
        self._release()
        self.stream.info.response_flags.append(flag)
        self.stream.abort()


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
        self.loop = asyncio.get_event_loop()

    def local_reply(self, stream: Stream, status: int, body: bytes, flag: str | None) -> None:
        if stream.head_sent:
            stream.abort()
            return
        flags = stream.info.response_flags
        if flag and flag not in flags:
            flags.append(flag)
        stream.reply(status, body)

    def handle(self, stream: Stream) -> None:
        info = stream.info
        stats = self.stats
        stats.downstream_rq_total.value += 1
        stats.downstream_rq_active.value += 1
        url = stream.url
        info.method = stream.method.decode("latin-1")
        headers = stream.headers
        if url[:1] == b"/" or url == b"*":
            path = url
            authority = stream.header(b"host") or b""
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
            # absolute form wins over Host (RFC 7230 5.4)
            headers = [(b"host", authority), *(h for h in headers if h[0] != b"host")]
        for f in self.filters:
            headers = f(stream, headers)
        info.path = path.decode("latin-1")
        info.authority = authority.decode("latin-1")
        info.raw_request_headers = headers
        if stream.http_version != "1.1":
            info.protocol = f"HTTP/{stream.http_version}"
        table = self.table
        vh = table.virtual_host(info.authority)
        route = table.route(vh, info.path, headers) if vh is not None else None
        if route is None:
            stats.no_route.value += 1
            self.local_reply(stream, 404, b"", FLAG_NO_ROUTE)
            return
        info.route_name = route.name
        if route.direct_response is not None:
            stats.rq_direct_response.value += 1
            stream.reply(route.direct_response.status, route.direct_response.body)
            return
        cluster = self.clusters[route.cluster or ""]
        info.upstream_cluster = cluster.name
        if route.prefix_rewrite is not None and route.match.prefix is not None:
            info.original_path = info.path
            path = route.prefix_rewrite.encode() + path[len(route.match.prefix):]
        Forwarder(self, stream, route, vh, cluster, headers, path).start()  # type: ignore[arg-type]

    def stream_done(self, stream: Stream) -> None:
        """Every request ends here exactly once: downstream stats and the access log."""
        info = stream.info
        elapsed = time.monotonic() - info.start_monotonic
        info.duration_ms = int(elapsed * 1000)
        self.stats.downstream_rq_active.value -= 1
        self.stats.response(info.response_code)
        self.listener_stats.response(info.response_code)
        self.stats.downstream_rq_time.record(elapsed * 1000)
        for logger in self.loggers:
            logger.log(info)
