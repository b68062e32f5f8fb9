"""The upstream side: keep-alive HTTP/1.1 connections to endpoints, pooled per endpoint.

A connection carries one request at a time. The response head is handed to
the attempt synchronously from the parser callback, so the decision "retry or
forward" is taken before any body byte moves; body bytes then flow straight
to the client (or are dropped for a retried attempt) without an extra queue.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

import httptools

from sidecar.flow_control import ReadFlowControl, WriteFlowControl
from sidecar.http1 import Headers, HeadResponseParsing
from sidecar.stats import ClusterStats, Store


class ResponseSink(Protocol):
    def on_head(self, conn: UpstreamConnection, status: int, headers: Headers) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_complete(self, conn: UpstreamConnection) -> None: ...
    def on_reset(self, conn: UpstreamConnection, reason: str) -> None: ...
    def flush(self) -> None: ...


class UpstreamConnection(HeadResponseParsing, WriteFlowControl, asyncio.Protocol):
    __slots__ = ("pool", "transport", "parser", "sink", "headers", "closed", "keep_alive", "head_only",
                 "write_paused", "drain_waiters", "status", "close_delimited", "stale_parser", "head_bytes",
                 "reading", "opened_at", "active_rq", "peer_uri_san", "tls_refused")

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sink: ResponseSink | None = None
        self.headers: Headers = []
        self.closed = False
        self.keep_alive = True
        self.head_only = False
        self.write_paused = False
        self.drain_waiters: list[Callable[[], None]] = []
        self.status = 0
        self.close_delimited = False
        self.stale_parser = False
        self.head_bytes = 0
        self.reading = ReadFlowControl(None)
        self.opened_at = 0.0
        self.active_rq = False  # closed by us in the middle of a request (Envoy: ..._with_active_rq)
        self.peer_uri_san: str | None = None  # a TLS upstream's verified identity (sidecar.tls)
        self.tls_refused = False  # the TLS peer failed our checks: a connect failure, never an open connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.reading.transport = transport  # type: ignore[assignment]
        self.opened_at = time.monotonic()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tls_refused:
            return  # counted as a connect failure by Pool.connect
        closed_here = self.closed  # close() and reset() mark the connection before asyncio reports it lost
        self.closed = True
        self.pool.discard(self)
        sink, self.sink = self.sink, None
        active = self.active_rq or (sink is not None and not (self.status and self.close_delimited))
        self.pool.on_closed(closed_here, time.monotonic() - self.opened_at, active)
        if sink is not None:
            if self.status and self.close_delimited:
                self.keep_alive = False
                sink.on_complete(self)  # a body without framing ends with the connection
            else:
                sink.on_reset(self, "connection termination")
        for w in self.drain_waiters:
            w()
        self.drain_waiters.clear()

    def send(self, data: bytes, sink: ResponseSink, head_only: bool) -> None:
        self.sink = sink
        self.headers = []
        self.head_only = head_only
        self.status = 0
        self.head_bytes = 0
        self.close_delimited = False
        self.renew_parser()
        # Otherwise one parser per connection: httptools resets between keep-alive messages, and a
        # message cut short never comes back here (its connection is closed, not pooled).
        assert self.transport is not None
        self.transport.write(data)
        self.pool.stats.upstream_cx_tx_bytes_total.value += len(data)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)
            self.pool.stats.upstream_cx_tx_bytes_total.value += len(data)

    def data_received(self, data: bytes) -> None:
        self.pool.stats.upstream_cx_rx_bytes_total.value += len(data)
        if self.sink is None:
            self.close()  # bytes nobody asked for: the connection is not reusable
            return
        sink = self.sink
        if not self.status:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
            if not self.status and self.head_bytes > MAX_RESPONSE_HEAD_BYTES and self.sink is not None:
                # An endless header: give up, do not buffer it. (Checked after parsing: the read that brings
                # the head may carry a large body too, which is not head bytes.)
                self.sink = None
                self.reset()
                sink.on_reset(self, "protocol error")
                return
            sink.flush()  # one send() to the client per upstream read
        except httptools.HttpParserError:
            sink, self.sink = self.sink, None
            self.close()
            if sink is not None:
                sink.on_reset(self, "protocol error")
        except httptools.HttpParserUpgrade:
            sink, self.sink = self.sink, None
            self.close()
            if sink is not None:
                sink.on_reset(self, "protocol error")

    # parser callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if 100 <= self.status < 200 and self.status != 101:
            self.headers = []
            self.status = 0
            return  # interim response (100 Continue): wait for the real one
        if self.status == 101:
            # We never ask to upgrade: a 101 here is an upstream that does not speak our HTTP.
            sink, self.sink = self.sink, None
            self.reset()
            if sink is not None:
                sink.on_reset(self, "protocol error")
            return
        self.keep_alive = self.parser.should_keep_alive()
        if not self.keep_alive and not self.head_only and self.status not in (204, 304):
            # Only a response that cannot be kept alive may be delimited by the close: keep-alive
            # responses (the common case) skip the scan.
            self.close_delimited = not any(n in (b"content-length", b"transfer-encoding") for n, _ in self.headers)
        if self.sink is not None:
            self.sink.on_head(self, self.status, self.headers)
        if self.head_only:
            self.end_head_only()

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.sink.on_body(body)

    def on_message_complete(self) -> None:
        if self.status == 0:
            return  # the end of an interim (1xx) response
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.on_complete(self)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def reset(self, active_rq: bool = False) -> None:
        """Drop the connection now, unsent bytes included (close() would wait for them to drain).

        ``active_rq``: a request is abandoned on it (counted as ``upstream_cx_destroy_local_with_active_rq``).
        """
        self.active_rq = self.active_rq or active_rq or self.sink is not None
        self.closed = True
        if self.transport is not None:
            self.transport.abort()



MAX_RESPONSE_HEAD_BYTES = 96 * 1024


class Pool:
    """Idle keep-alive connections to one endpoint (LIFO: the warmest first)."""

    def __init__(self, host: str, port: int, source_ip: str | None, max_idle: int = 64,
                 stats: ClusterStats | None = None, owner: Any = None) -> None:
        # Connection stats are always counted somewhere (a pool built alone counts into a private store).
        self.stats = stats if stats is not None else ClusterStats(Store(), f"{host}:{port}")
        self.host = host
        self.port = port
        self.source_ip = source_ip
        self.idle: list[UpstreamConnection] = []
        self.max_idle = max_idle
        self.active_requests = 0
        self.address = f"{host}:{port}"
        self.owner = owner  # the ClusterRuntime: connection count (max_connections) and waiting requests
        # outlier detection and active health checking state (sidecar.cluster)
        self.ejected = 0.0  # since when (monotonic), 0.0: not ejected
        self.ejections = 0
        self.od_5xx = self.od_gw = self.od_local = self.od_ok = self.od_total = 0
        self.od_ejected_this_interval = False
        self.hc_failed = False
        self.hc_first = True
        self.hc_oks = self.hc_fails = 0
        self.hc_timer: asyncio.TimerHandle | None = None
        self.hc_deadline: asyncio.TimerHandle | None = None
        self.hc_probe: Any = None
        self.closed_for_good = False

    def take_idle(self) -> UpstreamConnection | None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def connect(self, timeout: float) -> UpstreamConnection:
        """A new connection; counts upstream_cx_total (as Envoy, also when it fails) and its outcome."""
        loop = asyncio.get_running_loop()
        local = (self.source_ip, 0) if self.source_ip else None
        stats = self.stats
        stats.upstream_cx_total.value += 1
        stats.upstream_cx_http1_total.value += 1
        started = time.monotonic()
        owner = self.owner
        if owner is not None:
            owner.cx_count += 1
        conn_failed = True
        tls = owner.tls if owner is not None else None
        try:
            if tls is None:
                _, conn = await asyncio.wait_for(
                    loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port,
                                           local_addr=local),
                    timeout)
            else:
                conn = await asyncio.wait_for(tls.connect(self, local, timeout), timeout)
            conn_failed = False
        except TimeoutError:
            # Envoy counts a timed-out connect as a failure too, and the connection as destroyed by us.
            stats.upstream_cx_connect_timeout.value += 1
            stats.upstream_cx_connect_fail.value += 1
            stats.upstream_cx_destroy.value += 1
            stats.upstream_cx_destroy_local.value += 1
            raise
        except OSError:
            stats.upstream_cx_connect_fail.value += 1
            stats.upstream_cx_destroy.value += 1
            stats.upstream_cx_destroy_remote.value += 1
            raise
        except asyncio.CancelledError:  # the request went away first: we dropped the connect
            stats.upstream_cx_destroy.value += 1
            stats.upstream_cx_destroy_local.value += 1
            raise
        finally:
            if owner is not None and conn_failed:
                owner.cx_count -= 1
                owner.cx_freed()
        stats.upstream_cx_connect_ms.record((time.monotonic() - started) * 1000)
        stats.upstream_cx_active.value += 1
        return conn

    def on_closed(self, closed_here: bool, lifetime_s: float, active_rq: bool = False) -> None:
        stats = self.stats
        stats.upstream_cx_active.value -= 1
        stats.upstream_cx_destroy.value += 1
        if closed_here:
            stats.upstream_cx_destroy_local.value += 1
        else:
            stats.upstream_cx_destroy_remote.value += 1
        if active_rq:
            stats.upstream_cx_destroy_with_active_rq.value += 1
            if closed_here:
                stats.upstream_cx_destroy_local_with_active_rq.value += 1
            else:
                stats.upstream_cx_destroy_remote_with_active_rq.value += 1
        stats.upstream_cx_length_ms.record(lifetime_s * 1000)
        owner = self.owner
        if owner is not None:
            owner.cx_count -= 1
            if owner.waiters:
                owner.cx_freed()

    def release(self, conn: UpstreamConnection) -> None:
        if conn.closed or not conn.keep_alive or len(self.idle) >= self.max_idle:
            conn.close()
            return
        owner = self.owner
        if owner is not None and owner.waiters and owner.cx_idle(self, conn):
            return  # a request waiting for a connection (max_connections) took it
        self.idle.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def close(self) -> None:
        for c in self.idle:
            c.close()
        self.idle.clear()
