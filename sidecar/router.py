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
import enum
import ipaddress
import time
from typing import TYPE_CHECKING

import httptools

from sidecar.access_log import AccessLogger
from sidecar.cluster import ClusterRuntime
from sidecar.config import HttpConnectionManager, Route, VirtualHost
from sidecar.filters import DEFAULT_REQUEST_FILTERS, RequestFilter, new_request_id
from sidecar.flow_control import PEER_SLOW
from sidecar.http1 import HOP_BY_HOP, LAST_CHUNK, Headers, chunk, connection_tokens, framed_body
from sidecar.http_filters import HttpFilterChain, Runtime
from sidecar.request_info import (
    FLAG_NO_HEALTHY_UPSTREAM,
    FLAG_NO_ROUTE,
    FLAG_UPSTREAM_CONNECT_FAILURE,
    FLAG_UPSTREAM_CONNECTION_TERMINATION,
    FLAG_UPSTREAM_OVERFLOW,
    FLAG_UPSTREAM_PROTOCOL_ERROR,
    FLAG_UPSTREAM_REQUEST_TIMEOUT,
    FLAG_UPSTREAM_RETRY_LIMIT_EXCEEDED,
    RequestInfo,
)
from sidecar.retry import CONNECT_FAILURE, PER_TRY_TIMEOUT, RESET, RetryState
from sidecar.routing import RouteTable, _headers_match
from sidecar.server import DownstreamProtocol, Stream, StreamEnd
from sidecar.shadow import ShadowRequest, shadow_request_bytes
from sidecar.shaping import RoutePlan, apply_levels, mirror_sampled, plans_for
from sidecar.stats import ClusterStats, HcmStats, ListenerStats
from sidecar.upstream import Pool, UpstreamConnection

if TYPE_CHECKING:
    from sidecar.tracing import HcmTracer  # imported only by a traced configuration (sidecar.app)

RESET_BODY = b"upstream connect error or disconnect/reset before headers. reset reason: "
#: After retries, Envoy words the same reply this way.
RETRIED_BODY = b"upstream connect error or disconnect/reset before headers. retried and the latest reset reason: "
PROTOCOL_ERROR = "protocol-error"
CONNECT_TIMEOUT = "connect-timeout"
#: kind -> (status, Envoy's reset reason, flag); the body is RESET_BODY or RETRIED_BODY + the reason.
_FAIL_REPLIES = {
    CONNECT_FAILURE: (503, b"remote connection failure", FLAG_UPSTREAM_CONNECT_FAILURE),
    CONNECT_TIMEOUT: (503, b"connection timeout", FLAG_UPSTREAM_CONNECT_FAILURE),
    RESET: (503, b"connection termination", FLAG_UPSTREAM_CONNECTION_TERMINATION),
    PROTOCOL_ERROR: (503, b"protocol error", FLAG_UPSTREAM_PROTOCOL_ERROR),
}
#: Hop-by-hop, plus the two headers the connection manager writes itself (Envoy overwrites an upstream's).
_RESPONSE_DROP = HOP_BY_HOP | {b"server", b"date"}
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
#: Connection values that nominate no header beyond the hop-by-hop ones (nginx's every response says keep-alive).
_SELF_ONLY = frozenset({b"keep-alive", b"close"})


class ForwarderState(enum.Enum):
    """Where one request is in the router. Every request ends in DONE, through ``Forwarder._finish`` only."""

    CREATED = "created"  # not admitted by the cluster's circuit breaker yet: holds nothing
    SCHEDULED = "scheduled"  # admitted; an attempt is due (the first one, or a retry after its backoff)
    CONNECTING = "connecting"  # waiting for a new upstream connection (Envoy: a pending request)
    WAITING = "waiting"  # the request went out on a connection; waiting for the response head
    STREAMING = "streaming"  # the response head went downstream; the body follows
    DONE = "done"


class AttemptMode(enum.Enum):
    """What an upstream try does with its response."""

    AWAITING_HEAD = "awaiting_head"  # the retry-or-forward decision is not taken yet
    FORWARDING = "forwarding"  # it is the response: the body goes downstream
    DISCARDING = "discarding"  # retried or too late: the body is read (to pool the connection) and dropped


class Ending(enum.Enum):
    """How ``Forwarder._finish`` ends a request."""

    COMPLETE = "complete"  # the upstream response went out whole
    LOCAL_REPLY = "local_reply"  # a reply generated here (503 UF, 504 UT...)
    BROKEN = "broken"  # the response was under way: the client is cut off
    CANCELLED = "cancelled"  # the stream ended on the downstream side (client gone, protocol error)


# Module-level aliases: the hot path compares identities without two attribute lookups each time.
_CREATED, _SCHEDULED, _CONNECTING, _WAITING, _STREAMING, _DONE = ForwarderState
_AWAITING_HEAD, _FORWARDING, _DISCARDING = AttemptMode
_COMPLETE, _LOCAL_REPLY, _BROKEN, _CANCELLED = Ending


class Attempt:
    """One upstream try; the ``ResponseSink`` of the connection it runs on."""

    __slots__ = ("fwd", "pool", "conn", "mode", "started", "completed", "timer", "reused", "request_done")

    def __init__(self, fwd: Forwarder, pool: Pool, conn: UpstreamConnection, reused: bool) -> None:
        self.fwd = fwd
        self.pool = pool
        self.conn = conn
        self.mode = _AWAITING_HEAD
        self.started = time.monotonic()
        self.completed = False
        self.timer: asyncio.TimerHandle | None = None
        self.reused = reused
        self.request_done = False  # every byte of the request (body included) was handed to the connection

    def on_head(self, conn: UpstreamConnection, status: int, headers: Headers) -> None:
        if self.timer is not None:
            self.timer.cancel()  # the per-try timeout covers the wait for the head (Envoy)
            self.timer = None
        self.fwd.on_head(self, status, headers)

    def on_body(self, data: bytes) -> None:
        if self.mode is _FORWARDING:
            stream = self.fwd.stream
            if not stream.send_body(data):
                reading = self.conn.reading  # the client reads slowly: slow the upstream down
                reading.pause(PEER_SLOW)
                stream.when_writable(lambda: reading.resume(PEER_SLOW))

    def flush(self) -> None:
        if self.mode is _FORWARDING:
            self.fwd.stream.flush()

    def on_complete(self, conn: UpstreamConnection) -> None:
        self.completed = True
        self.pool.active_requests -= 1
        self.fwd.cluster.rq_attached -= 1
        conn.reading.resume(PEER_SLOW)  # nothing more to hold back: a pooled connection must be readable
        if self.request_done:
            self.pool.release(conn)
        else:
            # The upstream answered before taking the whole body (a 401, a 413...). Pooling this
            # connection would send the rest of this body as the start of someone else's request.
            self.fwd.stop_body()
            conn.reset()
        if self.mode is _FORWARDING:
            self.fwd.on_response_complete()

    def on_reset(self, conn: UpstreamConnection, reason: str) -> None:
        if self.completed:
            return
        self.completed = True
        self.pool.active_requests -= 1
        self.fwd.cluster.rq_attached -= 1
        if self.timer is not None:
            self.timer.cancel()
        if self.mode is _AWAITING_HEAD:
            self.fwd.on_failure(self, PROTOCOL_ERROR if reason == "protocol error" else RESET)
        elif self.mode is _FORWARDING:
            # The body was cut short: Envoy's HTTP/1 codec reports that as a protocol error (UPE).
            self.fwd.broken(FLAG_UPSTREAM_PROTOCOL_ERROR)

    def on_per_try_timeout(self) -> None:
        self.timer = None
        if self.mode is _AWAITING_HEAD and not self.completed:
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
            self.fwd.cluster.rq_attached -= 1
            self.conn.sink = None
            self.conn.reset(active_rq=True)


class Forwarder:
    """Forwards one request to a cluster with retries (the router filter's per-request state).

    It is the stream's ``StreamReceiver`` while it serves it, and talks to the stream only through
    ``send_head`` / ``send_body`` / ``flush`` / ``when_writable`` / ``finish`` / ``reply`` / ``abort`` and
    ``pause_reading`` / ``resume_reading``.
    """

    __slots__ = ("hcm", "stream", "cluster", "cstats", "headers", "path", "retry", "timeout_s", "deadline",
                 "attempts", "state", "attempt", "retry_slot", "global_timer", "retry_timer", "connecting",
                 "loop", "flags", "quiet_retry_used", "uncounted", "body_conn", "attempt_count", "waiting", "plan",
                 "tried", "trace")

    def __init__(self, hcm: HcmRuntime, stream: Stream, route: Route, vh: VirtualHost, cluster: ClusterRuntime,
                 headers: Headers, path: bytes) -> None:
        self.hcm = hcm
        self.loop = hcm.loop
        self.stream = stream
        self.cluster = cluster
        self.cstats: ClusterStats = cluster.stats
        self.headers = headers
        self.path = path
        policy = route.retry_policy or vh.retry_policy
        self.retry = RetryState(policy, stream.headers if stream.envoy_headers else ())
        timeout_s = route.timeout_s
        override = stream.seen.get(b"x-envoy-upstream-rq-timeout-ms") if stream.envoy_headers else None
        if override is not None and override.strip().isdigit():
            timeout_s = int(override) / 1000
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s if timeout_s > 0 else None  # after any fault delay
        self.attempts = 0
        self.state = _CREATED
        self.attempt: Attempt | None = None
        self.retry_slot = False  # holds one of the cluster's max_retries slots (from scheduling to outcome)
        self.global_timer: asyncio.TimerHandle | None = None
        self.retry_timer: asyncio.TimerHandle | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.flags: list[str] = []
        self.quiet_retry_used = False
        #: The current attempt is not in upstream_rq_total yet: it is counted once, when it gets a connection
        #: (or fails to connect: our deliberate difference from Envoy); a quiet resend is the same attempt.
        self.uncounted = False
        self.body_conn: UpstreamConnection | None = None  # where a streamed request body goes
        self.attempt_count = vh.include_request_attempt_count  # Envoy sends x-envoy-attempt-count only then
        self.waiting: Pool | None = None  # waiting for a connection to this endpoint (max_connections)
        self.plan: RoutePlan | None = None  # traffic shaping of the route (sidecar.shaping), if any
        self.tried: list[Pool] | None = [] if policy is not None and policy.previous_hosts else None
        self.trace = stream.trace  # sidecar.tracing.Trace, or None: the hooks below cost one test each

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        cluster = self.cluster
        cluster.active_requests += 1  # given back by _finish, whatever the ending
        self.state = _SCHEDULED
        self.stream.receiver = self
        if self.deadline is not None:
            self.global_timer = self.loop.call_later(self.timeout_s, self.on_global_timeout)
        self.next_attempt()

    def _finish(self, ending: Ending, status: int = 0, body: bytes = b"", flag: str | None = None) -> None:
        """The one way out: all accounting, then tell the stream (unless it ended on its own side)."""
        prev = self.state
        if prev is _DONE:
            return
        self.state = _DONE
        cluster = self.cluster
        if prev is not _CREATED:
            cluster.active_requests -= 1
        if prev is _CONNECTING:
            cluster.pending_requests -= 1
        if self.waiting is not None:
            try:
                cluster.waiters.remove((self, self.waiting))
            except ValueError:
                pass
            self.waiting = None
        if self.retry_slot:
            self.retry_slot = False
            cluster.active_retries -= 1
        if self.global_timer is not None:
            self.global_timer.cancel()
        if self.retry_timer is not None:
            self.retry_timer.cancel()
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
            if ending is _CANCELLED:  # the client left before a connection was had
                self.cstats.upstream_rq_cancelled.value += 1
        self.body_conn = None
        trace = self.trace
        if trace is not None:
            trace.attempts_close(flag, ending is _CANCELLED or ending is _LOCAL_REPLY)
        stream = self.stream
        if stream.receiver is self:
            stream.receiver = None
        attempt = self.attempt
        if ending is _COMPLETE:
            cstats = self.cstats
            if attempt is not None:
                cstats.upstream_rq_time.record((time.monotonic() - attempt.started) * 1000)
            cstats.upstream_rq_completed.value += 1
            stream.finish()
            return
        if attempt is not None:
            attempt.abandon()  # a no-op once the attempt completed
        info_flags = stream.info.response_flags
        info_flags.extend(f for f in self.flags if f not in info_flags)
        if ending is _LOCAL_REPLY:
            plan = self.plan  # Envoy: the route's response_headers_to_add go on the router's local replies too
            extra = apply_levels([], plan.response_levels) if plan is not None else None
            if flag is FLAG_UPSTREAM_OVERFLOW:  # a circuit breaker's overflow
                extra = [*(extra or ()), (b"x-envoy-overloaded", b"true")]
            self.hcm.local_reply(stream, status, body, flag, extra)
        elif ending is _BROKEN:
            if flag is not None:
                info_flags.append(flag)
            stream.abort()
        # _CANCELLED: the stream already ended on the downstream side; there is nobody to answer

    # -- StreamReceiver: what the downstream side tells us ---------------------------------
    def on_downstream_reset(self) -> None:
        """The client went away (or its request went bad): stop the upstream work too."""
        self._finish(_CANCELLED)

    def on_request_body(self, data: bytes) -> None:
        conn = self.body_conn
        if conn is None:
            if self.attempt is None:
                self.stream.body += data  # no connection yet: held until the request goes out
            return  # otherwise the attempt ended before the body did: nobody takes it
        conn.write(chunk(data) if self.stream.chunked_request else data)
        if conn.write_paused:  # the upstream cannot take more: stop reading the client
            stream = self.stream
            stream.pause_reading(PEER_SLOW)
            conn.when_writable(lambda: stream.resume_reading(PEER_SLOW))

    def on_request_end(self) -> None:
        conn = self.body_conn
        if conn is None or self.attempt is None:
            return
        if self.stream.chunked_request:
            conn.write(LAST_CHUNK)
        self.attempt.request_done = True

    def stop_body(self) -> None:
        """No more request body goes upstream (the attempt ended before it was all sent)."""
        self.body_conn = None

    # -- attempts ---------------------------------------------------------------
    def next_attempt(self, quiet: bool = False) -> None:
        """Start an attempt. ``quiet``: resend the current one on a fresh connection (not a new attempt)."""
        self.retry_timer = None
        if self.state is not _SCHEDULED:
            return
        cluster = self.cluster
        pool = cluster.choose()
        if pool is None:
            self.cstats.upstream_cx_none_healthy.value += 1
            self._finish(_LOCAL_REPLY, 503, b"no healthy upstream", FLAG_NO_HEALTHY_UPSTREAM)
            return
        tried = self.tried
        if tried is not None and not quiet:  # retry_host_predicate previous_hosts: re-pick a host already tried
            left = self.retry.host_selection_attempts
            while pool in tried and left > 0:
                pool = cluster.choose() or pool
                left -= 1
            tried.append(pool)
        conn = None if quiet else pool.take_idle()
        breakers = cluster.breakers
        if conn is None and cluster.pending_requests >= breakers.max_pending_requests:
            # Envoy: the pool refuses the stream before it exists (no upstream_rq_total); a 503 of the cluster's
            self.cstats.upstream_rq_pending_overflow.value += 1
            self._upstream_reply(503, RESET_BODY + b"overflow", FLAG_UPSTREAM_OVERFLOW)
            return
        if not quiet:
            self.attempts += 1
            self.uncounted = True
            if self.trace is not None:
                self.trace.attempt_start(pool.address, self.attempts)
        info = self.stream.info
        info.attempts = self.attempts
        info.upstream_host = pool.address
        if conn is not None:
            self._send(pool, conn, True)
        else:
            self.state = _CONNECTING
            cluster.pending_requests += 1
            self.cstats.upstream_rq_pending_total.value += 1
            if cluster.cx_count >= breakers.max_connections:
                # Envoy (HTTP/1): no new connection over the limit; the request waits for one to free up.
                self.cstats.upstream_cx_overflow.value += 1
                self.waiting = pool
                cluster.waiters.append((self, pool))
                return
            self.connecting = self.loop.create_task(self._connect(pool))

    def connect_waiting(self, pool: Pool) -> None:
        """A connection slot freed up (max_connections): open our own."""
        self.waiting = None
        if self.state is _CONNECTING:
            self.connecting = self.loop.create_task(self._connect(pool))

    def use_waiting(self, pool: Pool, conn: UpstreamConnection) -> None:
        """A connection of our endpoint became free: it is ours (taken once its response is fully handled)."""
        self.waiting = None
        self.loop.call_soon(self._use_waiting, pool, conn)

    def _use_waiting(self, pool: Pool, conn: UpstreamConnection) -> None:
        if self.state is not _CONNECTING or conn.closed:
            pool.release(conn)
            if self.state is _CONNECTING:
                self.connect_waiting(pool)
            return
        self.cluster.pending_requests -= 1
        self._send(pool, conn, True)

    async def _connect(self, pool: Pool) -> None:
        timeout = self.cluster.cfg.connect_timeout_s
        if self.deadline is not None:
            timeout = max(0.001, min(timeout, self.deadline - time.monotonic()))
        try:
            conn = await pool.connect(timeout)
        except OSError as exc:  # refused, unreachable, or timed out (the pool counts which)
            self.connecting = None
            reason = getattr(exc, "transport_failure_reason", None)  # a TLS failure (sidecar.tls.TlsError)
            if reason is not None:
                self.stream.info.upstream_transport_failure_reason = reason
            if self.cluster.outlier is not None:
                self.cluster.outlier.local_failure(pool)
            if self.state is _CONNECTING:
                self.cluster.pending_requests -= 1
                self._count_attempt()
                self.on_failure(None, CONNECT_TIMEOUT if isinstance(exc, TimeoutError) else CONNECT_FAILURE)
            return
        self.connecting = None
        if self.state is not _CONNECTING:
            pool.release(conn)
            return
        self.cluster.pending_requests -= 1
        self._send(pool, conn, False)

    def _send(self, pool: Pool, conn: UpstreamConnection, reused: bool) -> None:
        cluster = self.cluster
        if cluster.rq_attached >= cluster.breakers.max_requests:
            # Envoy checks max_requests when the stream attaches to a connection (which stays pooled): 503 UO,
            # upstream_rq_active_overflow, counted as the cluster's 503; the stream never existed upstream.
            pool.release(conn)
            self.cstats.upstream_rq_active_overflow.value += 1
            self._upstream_reply(503, RESET_BODY + b"overflow", FLAG_UPSTREAM_OVERFLOW)
            return
        self._count_attempt()
        if conn.peer_uri_san is not None:  # a TLS upstream (%UPSTREAM_PEER_URI_SAN%)
            self.stream.info.upstream_peer_uri_san = conn.peer_uri_san
        attempt = Attempt(self, pool, conn, reused)
        self.attempt = attempt
        self.state = _WAITING
        pool.active_requests += 1
        cluster.rq_attached += 1
        s = self.stream
        conn.send(self.request_bytes(), attempt, s.method == b"HEAD")
        if s.streaming:
            self._stream_body(conn, attempt)
        else:
            attempt.request_done = True
        per_try = self.retry.per_try_timeout_s
        if per_try and not attempt.completed:
            attempt.timer = self.loop.call_later(per_try, attempt.on_per_try_timeout)

    def _count_attempt(self) -> None:
        if self.uncounted:
            self.uncounted = False
            self.cstats.upstream_rq_total.value += 1

    def request_bytes(self) -> bytes:
        s = self.stream
        out = [b"%s %s HTTP/1.1\r\n" % (s.method, self.path)]
        out.extend(b"%s: %s\r\n" % h for h in self.headers)
        if self.attempt_count:
            out.append(b"x-envoy-attempt-count: %d\r\n" % self.attempts)
        expected = self.timeout_s
        per_try = self.retry.per_try_timeout_s
        if per_try and (expected <= 0 or per_try < expected):
            expected = per_try  # Envoy: what this attempt may take
        if expected > 0:
            out.append(b"x-envoy-expected-rq-timeout-ms: %d\r\n" % int(expected * 1000))
        if self.trace is not None:
            out.append(self.trace.headers())  # (Envoy writes the context last; it marks the attempt connected)
        if s.streaming:
            out.append(b"transfer-encoding: chunked\r\n\r\n" if s.chunked_request
                       else b"content-length: %d\r\n\r\n" % (s.content_length or 0))
            return b"".join(out)
        out.extend(framed_body(bytes(s.body), s.chunked_request, s.content_length))
        return b"".join(out)

    def _stream_body(self, conn: UpstreamConnection, attempt: Attempt) -> None:
        """Forward a body too large to buffer as it arrives (such a request is never retried).

        Flow control both ways: when the upstream's send buffer is full, the client is not read.
        """
        s = self.stream
        self.body_conn = conn
        if s.body:
            data = bytes(s.body)
            s.body.clear()
            self.on_request_body(data)
        if s.body_complete:
            self.on_request_end()

    # -- outcomes ---------------------------------------------------------------------
    def _release_retry_slot(self) -> None:
        """An attempt's result is known: a retry in progress no longer holds a breaker slot (Envoy)."""
        if self.retry_slot:
            self.retry_slot = False
            self.cluster.active_retries -= 1

    def on_head(self, attempt: Attempt, status: int, headers: Headers) -> None:
        if self.state is not _WAITING or attempt is not self.attempt:
            attempt.mode = _DISCARDING
            return
        self._release_retry_slot()
        od = self.cluster.outlier
        if od is not None:
            od.result(attempt.pool, status)
        retry = self.retry
        if retry.retry_on and retry.status_retriable(status) and self._may_retry():
            # As Envoy: the retried response is not read to its end; its stream is reset, which on HTTP/1
            # closes the connection (upstream_cx_destroy_local_with_active_rq).
            attempt.mode = _DISCARDING
            attempt.abandon()
            if self.trace is not None:
                self.trace.attempt_end(status, canceled=True)
            self.cstats.retry_response(status)
            self._schedule_retry()
            return
        attempt.mode = _FORWARDING
        self.state = _STREAMING
        if self.trace is not None:
            self.trace.attempt_status(status)
        self._commit(attempt, status, headers)

    def on_failure(self, attempt: Attempt | None, kind: str) -> None:
        if self.state is _DONE:
            return
        if (kind == RESET and attempt is not None and attempt.reused and not self.quiet_retry_used
                and self.stream.replayable and self.stream.method in _IDEMPOTENT):
            # A pooled connection the server had already closed: not this request's fault. Like nginx,
            # send it again once, on a fresh connection: the same attempt (not counted again, and it keeps
            # its retry slot), not a retry (no budget spent).
            self.quiet_retry_used = True
            self.state = _SCHEDULED
            self.next_attempt(quiet=True)
            return
        self._release_retry_slot()
        if self.trace is not None:
            self._trace_failure(kind)
        od = self.cluster.outlier
        if od is not None and attempt is not None:
            od.local_failure(attempt.pool)  # (a failed connect is reported by _connect)
        if kind == PER_TRY_TIMEOUT:
            self.cstats.upstream_rq_per_try_timeout.value += 1
        kind_for_policy = PER_TRY_TIMEOUT if kind == PER_TRY_TIMEOUT else (
            CONNECT_FAILURE if kind in (CONNECT_FAILURE, CONNECT_TIMEOUT) else RESET)
        if self.retry.failure_retriable(kind_for_policy) and self._may_retry():
            self._schedule_retry()
            return
        if kind == PER_TRY_TIMEOUT:
            self._upstream_reply(504, b"upstream request timeout", FLAG_UPSTREAM_REQUEST_TIMEOUT)
            return
        status, reason, flag = _FAIL_REPLIES[kind]
        self._upstream_reply(status, (RETRIED_BODY if self.retry.attempt_retries else RESET_BODY) + reason, flag)

    def _trace_failure(self, kind: str) -> None:
        """The attempt's span ends without a response: Envoy's flag and reset reason for it."""
        if kind == PER_TRY_TIMEOUT:
            self.trace.attempt_end(0, FLAG_UPSTREAM_REQUEST_TIMEOUT, canceled=True)
        else:
            _, reason, flag = _FAIL_REPLIES[kind]
            self.trace.attempt_end(0, flag, reason.decode())

    def _upstream_reply(self, status: int, body: bytes, flag: str) -> None:
        """A local reply standing for the upstream's answer (failure, timeout): Envoy counts its status as the
        cluster's (upstream_rq_503/504, upstream_rq_completed)."""
        cstats = self.cstats
        cstats.response(status)
        cstats.upstream_rq_completed.value += 1
        self._finish(_LOCAL_REPLY, status, body, flag)

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
        if self.cluster.active_retries >= self.cluster.max_retries():
            self.cstats.upstream_rq_retry_overflow.value += 1
            self.flags.append(FLAG_UPSTREAM_OVERFLOW)  # Envoy flags the response UO
            return False
        return True

    def _schedule_retry(self) -> None:
        retry = self.retry
        retry.retries_left -= 1
        retry.attempt_retries += 1
        self.state = _SCHEDULED
        self.retry_slot = True
        self.cluster.active_retries += 1
        self.cstats.upstream_rq_retry.value += 1
        self.cstats.upstream_rq_retry_backoff_exponential.value += 1
        delay = retry.backoff_s()
        if self.deadline is not None:
            delay = min(delay, max(0.0, self.deadline - time.monotonic()))
        self.retry_timer = self.loop.call_later(delay, self.next_attempt)

    def on_global_timeout(self) -> None:
        self.global_timer = None
        if self.state is _DONE:
            return
        self.cstats.upstream_rq_timeout.value += 1
        if self.state is _STREAMING:
            self._finish(_BROKEN, flag=FLAG_UPSTREAM_REQUEST_TIMEOUT)
        else:
            self._upstream_reply(504, b"upstream request timeout", FLAG_UPSTREAM_REQUEST_TIMEOUT)

    # -- response --------------------------------------------------------------------
    def _commit(self, attempt: Attempt, status: int, headers: Headers) -> None:
        cstats = self.cstats
        cstats.response(status)
        if self.retry.attempt_retries and not self.retry.status_retriable(status):
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
            if n in _RESPONSE_DROP:
                if n == b"connection" and h[1].lower() not in _SELF_ONLY:
                    conn_hdr = True  # it nominates other headers: scanned below
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
        plan = self.plan
        if plan is not None and plan.response_levels:
            kept = apply_levels(kept, plan.response_levels)
        info.raw_response_headers = kept
        self.stream.send_head(status, kept, length)

    def on_response_complete(self) -> None:
        self._finish(_COMPLETE)

    def broken(self, flag: str) -> None:
        """The upstream failed after the head went out: all we can do is cut the client off."""
        self.cstats.upstream_rq_completed.value += 1  # (Envoy counts the ended upstream request as completed)
        self._finish(_BROKEN, flag=flag)


def _rewrite(info: RequestInfo, headers: Headers, path: bytes, new: bytes) -> bytes:
    """A rewritten path: Envoy keeps the original in x-envoy-original-path (and its access log's)."""
    info.original_path = info.path
    headers.append((b"x-envoy-original-path", path))
    return new


_INTERNAL: dict[bytes, bool] = {}


def _internal(ip: bytes) -> bool:
    """Envoy's internal address (RFC 1918, loopback, ...): its x-envoy-internal marks requests from one."""
    known = _INTERNAL.get(ip)
    if known is None:
        try:
            known = ipaddress.ip_address(ip.decode()).is_private
        except ValueError:
            known = False
        if len(_INTERNAL) < 4096:
            _INTERNAL[ip] = known
    return known


class HcmRuntime:
    """One listener's HTTP connection manager: the ``ConnectionManager`` of its downstream connections.

    Connection and stream accounting (Envoy's ``http.<prefix>.downstream_*`` and the listener's stats) is
    all here; ``downstream_rq_active`` is read from the connections themselves.
    """

    def __init__(self, cfg: HttpConnectionManager, clusters: dict[str, ClusterRuntime], stats: HcmStats,
                 listener_stats: ListenerStats, loggers: list[AccessLogger],
                 filters: tuple[RequestFilter, ...] = DEFAULT_REQUEST_FILTERS, runtime: Runtime | None = None,
                 tracer: HcmTracer | None = None) -> None:
        self.cfg = cfg
        self.tracer = tracer  # sidecar.tracing: None when the connection manager has no tracing
        self.table = RouteTable(cfg.route_config)
        self.plans = plans_for(cfg.route_config)  # traffic shaping; empty: nothing to do per request
        self.clusters = clusters
        self.stats = stats
        self.listener_stats = listener_stats
        self.loggers = loggers
        self.filters = filters
        self.loop = asyncio.get_event_loop()
        self.connections: set[DownstreamProtocol] = set()
        self.http_filters: HttpFilterChain | None = None
        if cfg.http_filters:
            self.http_filters = HttpFilterChain(self, cfg.http_filters, runtime or Runtime(), stats.store,
                                                cfg.stat_prefix, _headers_match)
        stats.store.derived_gauge(stats.prefix + "downstream_rq_active", self._active_requests)

    def _active_requests(self) -> int:
        return sum(1 for c in self.connections if c.active is not None)

    # -- ConnectionManager ------------------------------------------------------------
    def on_connection_open(self, conn: DownstreamProtocol) -> None:
        self.connections.add(conn)
        stats = self.stats
        conn.rx_bytes = stats.downstream_cx_rx_bytes_total
        conn.tx_bytes = stats.downstream_cx_tx_bytes_total
        stats.downstream_cx_total.value += 1
        stats.downstream_cx_http1_total.value += 1
        stats.downstream_cx_active.value += 1
        stats.downstream_cx_http1_active.value += 1
        lstats = self.listener_stats
        lstats.downstream_cx_total.value += 1
        lstats.downstream_cx_active.value += 1

    def on_connection_close(self, conn: DownstreamProtocol) -> None:
        self.connections.discard(conn)
        length_ms = (self.loop.time() - conn.opened_at) * 1000
        stats = self.stats
        stats.downstream_cx_active.value -= 1
        stats.downstream_cx_http1_active.value -= 1
        stats.downstream_cx_destroy.value += 1
        stats.downstream_cx_length_ms.record(length_ms)
        lstats = self.listener_stats
        lstats.downstream_cx_active.value -= 1
        lstats.downstream_cx_destroy.value += 1
        lstats.downstream_cx_length_ms.record(length_ms)

    def on_idle_timeout(self, conn: DownstreamProtocol) -> None:
        if conn.active is not None or conn.current is not None:
            self.stats.downstream_rq_idle_timeout.value += 1  # a request stalled (Envoy's stream_idle_timeout)
        else:
            self.stats.downstream_cx_idle_timeout.value += 1  # an idle keep-alive connection

    def local_reply(self, stream: Stream, status: int, body: bytes, flag: str | None,
                    headers: Headers | None = None) -> None:
        if stream.head_sent:
            stream.abort()
            return
        flags = stream.info.response_flags
        if flag and flag not in flags:
            flags.append(flag)
        stream.reply(status, body, headers)

    def on_request(self, stream: Stream) -> None:
        info = stream.info
        stats = self.stats
        stats.downstream_rq_total.value += 1
        stats.downstream_rq_http1_total.value += 1
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
        stats.rq_total.value += 1  # Envoy's router counts every request it sees, routed or not
        for f in self.filters:
            headers = f(stream, headers)
        if self.cfg.use_remote_address:
            headers = self._remote_address(stream, headers)
        if self.tracer is not None:
            headers = self.tracer.start(stream, headers)
        info.path = path.decode("latin-1")
        info.authority = authority.decode("latin-1")
        info.raw_request_headers = headers
        if stream.http_version != "1.1":
            info.protocol = f"HTTP/{stream.http_version}"
        table = self.table
        vh = table.virtual_host(info.authority)
        route = table.route(vh, info.path, headers) if vh is not None else None
        if self.http_filters is not None:  # fault, local rate limit: they may answer, hold or pass the request
            self.http_filters.decode(stream, vh, route, headers, path)
            return
        self.dispatch(stream, vh, route, headers, path)

    def dispatch(self, stream: Stream, vh: VirtualHost | None, route: Route | None, headers: Headers,
                 path: bytes) -> None:
        """The router filter: after the HTTP filters (if any) let the request through."""
        stats = self.stats
        info = stream.info
        if route is None:
            stats.no_route.value += 1
            self.local_reply(stream, 404, b"", FLAG_NO_ROUTE)
            return
        info.route_name = route.name
        plan = self.plans.get(id(route)) if self.plans else None
        if route.direct_response is not None:
            stats.rq_direct_response.value += 1
            stream.reply(route.direct_response.status, route.direct_response.body,
                         apply_levels([], plan.response_levels) if plan is not None else None)
            return
        if plan is not None:
            self._shaped(stream, vh, route, plan, headers, path)
            return
        cluster = self.clusters[route.cluster or ""]
        info.upstream_cluster = cluster.name
        if route.prefix_rewrite is not None and route.match.prefix is not None:
            path = _rewrite(info, headers, path, route.prefix_rewrite.encode() + path[len(route.match.prefix):])
        Forwarder(self, stream, route, vh, cluster, headers, path).start()

    def _shaped(self, stream: Stream, vh: VirtualHost, route: Route, plan: RoutePlan, headers: Headers,
                path: bytes) -> None:
        """dispatch() for a route with traffic shaping: Envoy's finalizeRequestHeaders, then mirrors."""
        info = stream.info
        if plan.total:  # the HTTP filters may have picked already (a weighted cluster's own fault config)
            picked = info.upstream_cluster
            cluster = self.clusters[picked if picked is not None and picked in plan.names else plan.pick_cluster()]
        else:
            cluster = self.clusters[route.cluster or ""]
        info.upstream_cluster = cluster.name
        if plan.request_levels:
            headers = apply_levels(headers, plan.request_levels)
        if plan.host_rewrite is not None:  # Envoy keeps the original in x-envoy-original-host
            original = stream.info.authority.encode("latin-1")
            headers = [(n, plan.host_rewrite if n == b"host" else v) for n, v in headers]
            headers.append((b"x-envoy-original-host", original))
        rx = plan.regex_rewrite
        if route.prefix_rewrite is not None and route.match.prefix is not None:
            path = _rewrite(info, headers, path, route.prefix_rewrite.encode() + path[len(route.match.prefix):])
        elif rx is not None:
            bare, q, query = path.partition(b"?")
            new = rx.pattern.sub(rx.substitution, bare.decode("latin-1")).encode("latin-1")
            if new != bare:
                path = _rewrite(info, headers, path, new + q + query)
        fwd = Forwarder(self, stream, route, vh, cluster, headers, path)
        fwd.plan = plan
        fwd.start()
        if plan.mirrors and stream.replayable:
            for m in plan.mirrors:
                shadow = self.clusters.get(m.cluster)
                if shadow is not None and mirror_sampled(m):
                    data = shadow_request_bytes(stream.method, path, headers, bytes(stream.body),
                                                stream.chunked_request, stream.content_length, fwd.timeout_s)
                    ShadowRequest(shadow, data, stream.method == b"HEAD", fwd.timeout_s).start()

    @staticmethod
    def _remote_address(stream: Stream, headers: Headers) -> Headers:
        """Envoy's use_remote_address: the peer decides whether a request is internal.

        Internal: the peer is an internal address and no x-forwarded-for came with the request (Envoy 1.40 needs
        ``internal_address_config`` for that; we always count loopback and private addresses). It is marked
        ``x-envoy-internal``; any other request gets ``x-envoy-external-address``, its x-envoy-* control headers
        are ignored and its x-request-id is replaced. x-forwarded-proto is the connection's scheme.
        """
        ip = stream.conn.remote_ip
        seen = stream.seen
        if b"x-forwarded-for" not in seen and _internal(ip):
            headers.append((b"x-envoy-internal", b"true"))
        else:
            headers.append((b"x-envoy-external-address", ip))
            stream.envoy_headers = False
            if b"x-request-id" in seen:  # an external caller's id is not trusted: a new one (Envoy's default)
                headers = [h for h in headers if h[0] != b"x-request-id"]
                headers.append((b"x-request-id", new_request_id()))
        if seen.get(b"x-forwarded-proto", b"http") != b"http":
            headers = [h for h in headers if h[0] != b"x-forwarded-proto"]
            headers.append((b"x-forwarded-proto", b"http"))
        return headers

    def on_stream_done(self, stream: Stream, end: StreamEnd) -> None:
        """Every request ends here exactly once: downstream stats and the access log."""
        stats = self.stats
        if end is not StreamEnd.COMPLETE:
            if end is StreamEnd.LOCAL_RESET:
                stats.downstream_rq_tx_reset.value += 1
                stats.downstream_rq_rx_reset.value += 1  # Envoy (HTTP/1) counts the reset both ways
            elif end is StreamEnd.CLIENT_RESET:
                stats.downstream_rq_rx_reset.value += 1
            else:  # never reached on_request: a request all the same
                stats.downstream_rq_total.value += 1
                stats.downstream_rq_http1_total.value += 1
                if end is StreamEnd.PROTOCOL_ERROR:
                    stats.downstream_cx_protocol_error.value += 1
                else:
                    stats.downstream_rq_rx_reset.value += 1
        info = stream.info
        elapsed = time.monotonic() - info.start_monotonic
        info.duration_ms = int(elapsed * 1000)
        if stream.continue_sent:  # Envoy counts its own 100 Continue as a response sent
            stats.response(100)
            self.listener_stats.response(100)
        stats.response(info.response_code)
        self.listener_stats.response(info.response_code)
        self.stats.downstream_rq_time.record(elapsed * 1000)
        for logger in self.loggers:
            logger.log(info)
        if stream.trace is not None:
            self.tracer.finish(stream)  # type: ignore[union-attr]
