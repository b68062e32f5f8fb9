"""A cluster at run time: resolved endpoints, their connection pools, load balancing, breakers.

strict_dns names resolve through the pod's hosts file first (a pod name gives
all of its replicas), then the system resolver, and are re-resolved every
``dns_refresh_rate``; pools of addresses that stay are kept, so refreshing
does not drop warm connections.
"""

from __future__ import annotations

import asyncio
import random
import socket
import statistics
import time
from collections import deque
from typing import Any

from pods.addressing import is_ip
from pods.resolver import HostsResolver
from sidecar.config import Cluster, HealthCheck, OutlierDetection
from sidecar.stats import ClusterStats
from sidecar.upstream import Pool, UpstreamConnection


class ClusterRuntime:
    def __init__(self, cfg: Cluster, stats: ClusterStats, resolver: HostsResolver,
                 source_ip: str | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.stats = stats
        self.resolver = resolver
        self.source_ip = source_ip
        self.pools: list[Pool] = []
        self._by_addr: dict[tuple[str, int], Pool] = {}
        self._rr = 0
        self.active_retries = 0
        self.active_requests = 0  # admitted requests not finished yet: the breaker's count and the gauge's
        self.pending_requests = 0  # requests waiting for a new connection
        self._refresher: asyncio.Task[None] | None = None
        self.panic = False
        self.breakers = b = cfg.circuit_breakers
        self.cx_count = 0  # connections open or opening, across endpoints (max_connections)
        self.rq_attached = 0  # requests on an upstream connection (max_requests, as Envoy counts it)
        self.waiters: deque[tuple[Any, Pool]] = deque()  # requests waiting for a connection (max_connections)
        self.lb_pools: list[Pool] = []  # what choose() picks from: healthy endpoints (or all, in panic)
        self.outlier: OutlierDetector | None = None
        self.health: HealthChecker | None = None
        store = stats.store
        store.derived_gauge(stats.prefix + "upstream_rq_active", lambda: self.active_requests)
        store.derived_gauge(stats.prefix + "upstream_rq_pending_active", lambda: self.pending_requests)
        cb = stats.prefix + "circuit_breakers."
        # Envoy sets an *_open gauge when its count moves: a limit of 0 with nothing in use reads 0.
        store.derived_gauge(cb + "default.cx_open", lambda: _open(self.cx_count, b.max_connections))
        store.derived_gauge(cb + "default.cx_pool_open", lambda: 0)
        store.derived_gauge(cb + "default.rq_pending_open",
                            lambda: _open(self.pending_requests, b.max_pending_requests))
        store.derived_gauge(cb + "default.rq_open", lambda: _open(self.rq_attached, b.max_requests))
        store.derived_gauge(cb + "default.rq_retry_open", lambda: _open(self.active_retries, self.max_retries()))
        for g in ("cx_open", "cx_pool_open", "rq_pending_open", "rq_open", "rq_retry_open"):
            store.derived_gauge(cb + "high." + g, lambda: 0)  # no HIGH-priority routes here
        self.lb_healthy_panic = store.counter(stats.prefix + "lb_healthy_panic")
        if cfg.outlier_detection is not None:
            self.outlier = OutlierDetector(self, cfg.outlier_detection)
        if cfg.health_checks:
            self.health = HealthChecker(self, cfg.health_checks[0])
        self.tls: Any = None  # sidecar.tls.TlsUpstream: the pools connect through it (cluster transport_socket)
        if cfg.tls is not None:
            from sidecar import tls  # only a TLS configuration loads OpenSSL (sidecar.no_tls)

            ctx = tls.TlsContext(cfg.tls, f"cluster {cfg.name}")
            self.tls = tls.TlsUpstream(ctx, tls.TlsStats(store, stats.prefix), cfg.tls.sni)

    def max_retries(self) -> int:
        """Retries allowed in flight: max_retries, or the retry budget's share of the requests (Envoy)."""
        b = self.breakers
        if b.retry_budget_percent is None:
            return b.max_retries
        share = int(b.retry_budget_percent * (self.active_requests + self.pending_requests) / 100)
        return max(b.min_retry_concurrency, share)

    # -- connections and the max_connections breaker --------------------------------------------
    def cx_freed(self) -> None:
        """A connection ended: a request waiting for one (max_connections) may open its own now."""
        waiters = self.waiters
        if waiters and self.cx_count < self.breakers.max_connections:  # one connection ended: one more may open
            fwd, pool = waiters.popleft()
            fwd.connect_waiting(pool)

    def cx_idle(self, pool: Pool, conn: UpstreamConnection) -> bool:
        """A connection of ``pool`` became free: it goes to a request waiting on that endpoint, if any."""
        for i, (fwd, p) in enumerate(self.waiters):
            if p is pool:
                del self.waiters[i]
                fwd.use_waiting(pool, conn)
                return True
        return False

    # -- health (outlier detection, active health checks) -------------------------------------------
    def update_hosts(self) -> None:
        """Recompute the load balancer's hosts after a health change (Envoy's 50 % panic threshold)."""
        pools = self.pools
        healthy = [p for p in pools if not p.ejected and not p.hc_failed]
        self.stats.membership_healthy.set(len(healthy))
        if len(healthy) * 100 < 50 * len(pools):
            self.lb_pools = pools  # panic: too few healthy hosts, use them all
            self.panic = True
        else:
            self.lb_pools = healthy
            self.panic = False

    async def start(self) -> None:
        await self.refresh()
        if self.outlier is not None:
            self.outlier.start()
        if self.health is not None:
            self.health.start()
        if self.cfg.type in ("STRICT_DNS", "LOGICAL_DNS") and any(not is_ip(e.host) for e in self.cfg.endpoints):
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.dns_refresh_rate_s)
            await self.refresh()

    async def _resolve(self, host: str, port: int) -> list[str] | None:
        """The addresses of ``host``; None when the lookup failed (as opposed to finding nothing)."""
        if is_ip(host):
            return [host]
        ips = self.resolver.lookup(host)
        if ips:
            return ips
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_STREAM)
        except OSError:
            return None
        return list(dict.fromkeys(i[4][0] for i in infos))

    async def refresh(self) -> None:
        self.stats.update_attempt.inc()
        addrs: list[tuple[str, int]] = []
        failed = False
        for ep in self.cfg.endpoints:
            ips = await self._resolve(ep.host, ep.port)
            if ips is None:
                failed = True
                ips = []
            if self.cfg.type == "LOGICAL_DNS":
                ips = ips[:1]
            addrs.extend((ip, ep.port) for ip in ips)
        addrs = list(dict.fromkeys(addrs))
        pools = []
        for addr in addrs:
            pool = self._by_addr.get(addr) or Pool(addr[0], addr[1], self.source_ip, stats=self.stats, owner=self)
            if addr not in self._by_addr and self.health is not None:
                pool.hc_failed = True  # Envoy: a new host is unhealthy until its first check passes
                if self.health.started:
                    self.health.add(pool)
            pools.append(pool)
        for addr, pool in self._by_addr.items():
            if addr not in addrs:
                pool.closed_for_good = True
                if pool.hc_timer is not None:
                    pool.hc_timer.cancel()
                pool.close()
        if set(addrs) != set(self._by_addr):
            self.stats.membership_change.inc()
        self._by_addr = {(p.host, p.port): p for p in pools}
        self.pools = pools
        self.stats.membership_total.set(len(pools))
        self.update_hosts()
        if failed:
            self.stats.update_failure.inc()
        else:
            self.stats.update_success.inc()

    def choose(self) -> Pool | None:
        pools = self.lb_pools
        n = len(pools)
        if n == 0:
            return None
        if self.panic:
            self.lb_healthy_panic.value += 1
        if n == 1:
            return pools[0]
        policy = self.cfg.lb_policy
        if policy == "LEAST_REQUEST":
            a, b = random.sample(pools, 2)
            return a if a.active_requests <= b.active_requests else b
        if policy == "RANDOM":
            return pools[random.randrange(n)]
        self._rr = (self._rr + 1) % n
        return pools[self._rr]

    def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        if self.outlier is not None:
            self.outlier.stop()
        if self.health is not None:
            self.health.stop()
        for p in self.pools:
            p.close()


def _open(count: int, limit: int) -> int:
    return int(count > 0 and count >= limit)


#: Envoy's outlier_detection.* counters (all exported once the cluster has outlier detection).
_OUTLIER_KINDS = ("consecutive_5xx", "consecutive_gateway_failure", "consecutive_local_origin_failure",
                  "success_rate", "local_origin_success_rate", "failure_percentage",
                  "local_origin_failure_percentage")
_GATEWAY = (502, 503, 504)


class OutlierDetector:
    """Envoy's passive outlier detection for one cluster: consecutive 5xx / gateway / local-origin failures
    (ejected at once), success rate (evaluated every ``interval``). One timer per cluster.

    Per host, on the Pool: ``od_5xx``, ``od_gw``, ``od_local`` (consecutive counts), ``od_ok``/``od_total``
    (this interval's external results), ``ejected`` (since when, or 0.0) and ``ejections`` (the multiplier of
    base_ejection_time, decremented after an interval without ejection).
    """

    def __init__(self, cluster: ClusterRuntime, cfg: OutlierDetection) -> None:
        self.cluster = cluster
        self.cfg = cfg
        self.timer: asyncio.TimerHandle | None = None
        store = cluster.stats.store
        p = cluster.stats.prefix + "outlier_detection."
        self.c = {n: store.counter(p + n) for n in (
            "ejections_enforced_total", "ejections_total", "ejections_overflow", "ejections_consecutive_5xx",
            "ejections_success_rate", "ejections_detected_degradation",
            *(f"ejections_enforced_{k}" for k in _OUTLIER_KINDS), *(f"ejections_detected_{k}" for k in _OUTLIER_KINDS))}
        store.derived_gauge(p + "ejections_active", lambda: sum(1 for x in cluster.pools if x.ejected))
        self.sr_average = -1.0
        self.sr_threshold = -1.0

    def start(self) -> None:
        self.timer = asyncio.get_running_loop().call_later(self.cfg.interval_s, self.tick)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # -- results from the data path ------------------------------------------------------------
    def result(self, pool: Pool, status: int) -> None:
        """An upstream response's status (external origin)."""
        pool.od_total += 1
        pool.od_local = 0  # the connection worked: a local-origin success (split mode)
        if status >= 500:
            cfg = self.cfg
            pool.od_5xx += 1
            if status in _GATEWAY:
                pool.od_gw += 1
                if pool.od_gw == cfg.consecutive_gateway_failure:
                    self._detected(pool, "consecutive_gateway_failure", cfg.enforcing_consecutive_gateway_failure)
            if pool.od_5xx == cfg.consecutive_5xx:
                self._detected(pool, "consecutive_5xx", cfg.enforcing_consecutive_5xx)
        else:
            pool.od_ok += 1
            pool.od_5xx = pool.od_gw = 0

    def local_failure(self, pool: Pool) -> None:
        """A connect failure, timeout or reset: a local-origin error (or, unsplit, a gateway error as in Envoy)."""
        cfg = self.cfg
        if not cfg.split_external_local_origin_errors:
            self.result(pool, 503)
            return
        pool.od_local += 1
        if pool.od_local == cfg.consecutive_local_origin_failure:
            self._detected(pool, "consecutive_local_origin_failure", cfg.enforcing_consecutive_local_origin_failure)

    def local_success(self, pool: Pool) -> None:
        pool.od_local = 0

    # -- ejection ---------------------------------------------------------------------------------
    def _detected(self, pool: Pool, kind: str, enforcing: int) -> None:
        c = self.c
        c["ejections_detected_" + kind].value += 1  # (a streak is detected once: its count equals the threshold)
        if pool.ejected or enforcing <= 0 or random.randrange(100) >= enforcing:
            return
        cluster = self.cluster
        ejected = sum(1 for x in cluster.pools if x.ejected)
        if ejected * 100 >= self.cfg.max_ejection_percent * len(cluster.pools):
            c["ejections_overflow"].value += 1
            return
        pool.ejected = time.monotonic()
        pool.ejections += 1
        pool.od_ejected_this_interval = True
        c["ejections_enforced_total"].value += 1
        c["ejections_total"].value += 1
        c["ejections_enforced_" + kind].value += 1
        if kind == "consecutive_5xx":
            c["ejections_consecutive_5xx"].value += 1
        elif kind == "success_rate":
            c["ejections_success_rate"].value += 1
        cluster.update_hosts()

    def ejection_time(self, pool: Pool) -> float:
        cfg = self.cfg
        return min(cfg.base_ejection_time_s * pool.ejections, max(cfg.max_ejection_time_s, cfg.base_ejection_time_s))

    def tick(self) -> None:
        """Every interval: uneject hosts whose time is up, decay ejection counts, evaluate success rates."""
        cfg = self.cfg
        cluster = self.cluster
        now = time.monotonic()
        changed = False
        for pool in cluster.pools:
            if pool.ejected:
                if now - pool.ejected >= self.ejection_time(pool):
                    pool.ejected = 0.0
                    pool.od_5xx = pool.od_gw = pool.od_local = 0
                    changed = True
            elif pool.ejections and not pool.od_ejected_this_interval:
                pool.ejections -= 1
            pool.od_ejected_this_interval = False
        if changed:
            cluster.update_hosts()
        self._success_rate()
        for pool in cluster.pools:
            pool.od_ok = pool.od_total = 0
        self.timer = asyncio.get_running_loop().call_later(cfg.interval_s, self.tick)

    def _success_rate(self) -> None:
        cfg = self.cfg
        hosts = [(p, 100.0 * p.od_ok / p.od_total) for p in self.cluster.pools
                 if not p.ejected and p.od_total >= cfg.success_rate_request_volume]
        self.sr_average = self.sr_threshold = -1.0
        if len(hosts) < cfg.success_rate_minimum_hosts or not hosts:
            return
        rates = [r for _, r in hosts]
        mean = statistics.fmean(rates)
        stdev = statistics.pstdev(rates)
        self.sr_average = mean
        self.sr_threshold = threshold = mean - stdev * cfg.success_rate_stdev_factor / 1000
        for pool, rate in hosts:
            if rate < threshold:
                self._detected(pool, "success_rate", cfg.enforcing_success_rate)


class _Probe(asyncio.Protocol):
    """One health check request on its own connection, closed once the status line is read (Envoy keeps it for
    the next check, reuse_connection; the request is the same: GET path, host, user-agent Envoy/HC)."""

    def __init__(self, checker: HealthChecker, pool: Pool) -> None:
        self.checker = checker
        self.pool = pool
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.done = False
        self.connecting: asyncio.Future[Any] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.done:  # timed out or stopped while connecting
            transport.close()
            return
        hc = self.checker.cfg
        host = hc.host or self.checker.cluster.name
        transport.write(f"GET {hc.path} HTTP/1.1\r\nhost: {host}\r\nuser-agent: Envoy/HC\r\n\r\n".encode())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        line, sep, _ = self.buf.partition(b"\r\n")
        if sep or len(self.buf) > 1024:
            parts = line.split(b" ", 2)
            code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            self.finish(code)

    def connection_lost(self, exc: Exception | None) -> None:
        self.finish(None)

    def finish(self, code: int | None) -> None:
        if self.done:
            return
        self.done = True
        if self.transport is not None:
            self.transport.close()
        elif self.connecting is not None:
            self.connecting.cancel()
        self.checker.outcome(self.pool, code)


class HealthChecker:
    """Envoy's active HTTP health checking: one timer per host, one probe in flight per host at most."""

    def __init__(self, cluster: ClusterRuntime, cfg: HealthCheck) -> None:
        self.cluster = cluster
        self.cfg = cfg
        self.stopped = False
        self.started = False
        store = cluster.stats.store
        p = cluster.stats.prefix + "health_check."
        self.c = {n: store.counter(p + n) for n in ("attempt", "success", "failure", "network_failure",
                                                    "passive_failure", "verify_cluster")}
        store.derived_gauge(p + "healthy", lambda: sum(1 for x in cluster.pools if not x.hc_failed))
        store.derived_gauge(p + "degraded", lambda: 0)

    def start(self) -> None:
        self.started = True
        for pool in self.cluster.pools:
            self.add(pool)

    def add(self, pool: Pool) -> None:
        self._schedule(pool, 0.0)

    def stop(self) -> None:
        self.stopped = True
        for pool in self.cluster.pools:
            if pool.hc_timer is not None:
                pool.hc_timer.cancel()
                pool.hc_timer = None
            probe = pool.hc_probe
            if probe is not None:
                probe.done = True
                if probe.transport is not None:
                    probe.transport.abort()
                elif probe.connecting is not None:
                    probe.connecting.cancel()
            if pool.hc_deadline is not None:
                pool.hc_deadline.cancel()
                pool.hc_deadline = None

    def _schedule(self, pool: Pool, delay: float) -> None:
        if self.stopped or pool.closed_for_good:
            return
        pool.hc_timer = asyncio.get_running_loop().call_later(delay, self._check, pool)

    def _check(self, pool: Pool) -> None:
        pool.hc_timer = None
        if self.stopped:
            return
        self.c["attempt"].value += 1
        loop = asyncio.get_running_loop()
        probe = _Probe(self, pool)
        pool.hc_probe = probe
        tls = self.cluster.tls  # Envoy health-checks through the cluster's transport socket
        kw: dict[str, Any] = {} if tls is None else {"ssl": tls.ctx.context, "server_hostname": tls.sni or pool.host}
        fut = asyncio.ensure_future(loop.create_connection(lambda: probe, pool.host, pool.port,
                                                           local_addr=(pool.source_ip, 0) if pool.source_ip else None,
                                                           **kw))
        probe.connecting = fut
        fut.add_done_callback(lambda f: probe.finish(None) if f.cancelled() or f.exception() else None)
        pool.hc_deadline = loop.call_later(self.cfg.timeout_s, self._timeout, probe)

    def _timeout(self, probe: _Probe) -> None:
        if not probe.done:
            if probe.transport is not None:
                probe.transport.abort()
            probe.finish(None)

    def outcome(self, pool: Pool, code: int | None) -> None:
        if pool.hc_deadline is not None:
            pool.hc_deadline.cancel()
            pool.hc_deadline = None
        pool.hc_probe = None
        if self.stopped:
            return
        cfg = self.cfg
        ok = code is not None and any(lo <= code < hi for lo, hi in cfg.expected_statuses)
        changed = False
        if ok:
            self.c["success"].value += 1
            pool.hc_fails = 0
            pool.hc_oks += 1
            if pool.hc_failed and (pool.hc_oks >= cfg.healthy_threshold or pool.hc_first):
                pool.hc_failed = False
                changed = True
        else:
            self.c["failure"].value += 1
            if code is None:
                self.c["network_failure"].value += 1
            pool.hc_oks = 0
            pool.hc_fails += 1
            if not pool.hc_failed and pool.hc_fails >= cfg.unhealthy_threshold:
                pool.hc_failed = True
                changed = True
        pool.hc_first = False
        if changed:
            self.cluster.update_hosts()
        # Envoy: until the cluster has had traffic (a connection), checks run every no_traffic_interval
        used = self.cluster.stats.upstream_cx_total.value > 0
        self._schedule(pool, cfg.interval_s if used else cfg.no_traffic_interval_s)
