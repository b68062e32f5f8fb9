"""Request mirroring (Envoy's request_mirror_policies): a fire-and-forget copy of a request to a shadow cluster.

The copy goes out with the authority suffixed ``-shadow``; its response is read (so the connection can be
pooled) and dropped. It never touches the main request: own connections, own timers, no shared state but the
shadow cluster's counters. It is bounded by that cluster's circuit breakers: past ``max_requests`` (or
``max_pending_requests`` while connecting) the copy is not made and ``upstream_rq_pending_overflow`` counts it,
as Envoy's async client does for a shadow. Stats land on the shadow cluster as for any request
(``upstream_rq_total``, ``upstream_rq_<code>``, ``upstream_rq_completed``, ``upstream_rq_timeout``).
"""

from __future__ import annotations

import asyncio
import time

from sidecar.cluster import ClusterRuntime
from sidecar.http1 import Headers, framed_body
from sidecar.shaping import shadow_host
from sidecar.upstream import Pool, UpstreamConnection


def shadow_request_bytes(method: bytes, path: bytes, headers: Headers, body: bytes, chunked: bool,
                         content_length: int | None, timeout_s: float) -> bytes:
    out = [b"%s %s HTTP/1.1\r\n" % (method, path)]
    for n, v in headers:
        out.append(b"%s: %s\r\n" % (n, shadow_host(v) if n == b"host" else v))
    if timeout_s > 0:
        out.append(b"x-envoy-expected-rq-timeout-ms: %d\r\n" % int(timeout_s * 1000))
    out.extend(framed_body(body, chunked, content_length))
    return b"".join(out)


class ShadowRequest:
    """One mirrored request; the ``ResponseSink`` of its upstream connection."""

    __slots__ = ("cluster", "data", "head_only", "timeout_s", "pool", "conn", "timer", "done", "started",
                 "connecting", "pending")

    def __init__(self, cluster: ClusterRuntime, data: bytes, head_only: bool, timeout_s: float) -> None:
        self.cluster = cluster
        self.data = data
        self.head_only = head_only
        self.timeout_s = timeout_s
        self.pool: Pool | None = None
        self.conn: UpstreamConnection | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.done = True  # until admitted
        self.started = 0.0
        self.connecting: asyncio.Task[None] | None = None
        self.pending = False

    def start(self) -> None:
        cluster = self.cluster
        stats = cluster.stats
        if cluster.active_requests >= cluster.breakers.max_requests:
            stats.upstream_rq_pending_overflow.value += 1  # dropped, as the breaker drops any request
            return
        pool = cluster.choose()
        if pool is None:
            stats.upstream_cx_none_healthy.value += 1
            return
        self.done = False
        cluster.active_requests += 1
        self.pool = pool
        self.started = time.monotonic()
        loop = asyncio.get_running_loop()
        if self.timeout_s > 0:
            self.timer = loop.call_later(self.timeout_s, self._on_timeout)
        conn = pool.take_idle()
        if conn is not None:
            self._send(conn)
            return
        if cluster.pending_requests >= cluster.breakers.max_pending_requests:
            stats.upstream_rq_pending_overflow.value += 1
            self._end()
            return
        self.pending = True
        cluster.pending_requests += 1
        stats.upstream_rq_pending_total.value += 1
        self.connecting = loop.create_task(self._connect(pool))

    async def _connect(self, pool: Pool) -> None:
        try:
            conn = await pool.connect(self.cluster.cfg.connect_timeout_s)
        except OSError:
            self.connecting = None
            self._unpend()
            if not self.done:
                self._local(503)
            return
        self.connecting = None
        self._unpend()
        if self.done:
            pool.release(conn)
            return
        self._send(conn)

    def _unpend(self) -> None:
        if self.pending:
            self.pending = False
            self.cluster.pending_requests -= 1

    def _send(self, conn: UpstreamConnection) -> None:
        assert self.pool is not None
        self.conn = conn
        self.pool.active_requests += 1
        self.cluster.stats.upstream_rq_total.value += 1  # as Envoy: once handed to a connection
        conn.send(self.data, self, self.head_only)

    # -- ResponseSink ----------------------------------------------------------------------------------
    def on_head(self, conn: UpstreamConnection, status: int, headers: Headers) -> None:
        if not self.done:
            self.cluster.stats.response(status)

    def on_body(self, data: bytes) -> None:
        pass  # the shadow's response is ignored

    def flush(self) -> None:
        pass

    def on_complete(self, conn: UpstreamConnection) -> None:
        assert self.pool is not None
        self.pool.active_requests -= 1
        self.conn = None
        self.pool.release(conn)
        if not self.done:
            stats = self.cluster.stats
            stats.upstream_rq_completed.value += 1
            stats.upstream_rq_time.record((time.monotonic() - self.started) * 1000)
            self._end()

    def on_reset(self, conn: UpstreamConnection, reason: str) -> None:
        if self.conn is None:
            return
        assert self.pool is not None
        self.pool.active_requests -= 1
        self.conn = None
        if not self.done:
            self._local(503)

    # -- endings ---------------------------------------------------------------------------------------
    def _on_timeout(self) -> None:
        self.timer = None
        if self.done:
            return
        self.cluster.stats.upstream_rq_timeout.value += 1
        conn = self.conn
        if conn is not None:
            assert self.pool is not None
            self.conn = None
            self.pool.active_requests -= 1
            conn.sink = None
            conn.reset(active_rq=True)
        self._local(504)

    def _local(self, status: int) -> None:
        """A failure stands for the shadow's answer, as a local reply stands for the main request's."""
        stats = self.cluster.stats
        stats.response(status)
        stats.upstream_rq_completed.value += 1
        self._end()

    def _end(self) -> None:
        if self.done:
            return
        self.done = True
        self.cluster.active_requests -= 1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
            self._unpend()
