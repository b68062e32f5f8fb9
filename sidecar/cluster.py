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

from pods.addressing import is_ip
from pods.resolver import HostsResolver
from sidecar.config import Cluster
from sidecar.stats import ClusterStats
from sidecar.upstream import Pool


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
        self.breakers = cfg.circuit_breakers
        stats.store.derived_gauge(stats.prefix + "upstream_rq_active", lambda: self.active_requests)
        stats.store.derived_gauge(stats.prefix + "upstream_rq_pending_active", lambda: self.pending_requests)

    async def start(self) -> None:
        await self.refresh()
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
            pool = self._by_addr.get(addr) or Pool(addr[0], addr[1], self.source_ip, stats=self.stats)
            pools.append(pool)
        for addr, pool in self._by_addr.items():
            if addr not in addrs:
                pool.close()
        if set(addrs) != set(self._by_addr):
            self.stats.membership_change.inc()
        self._by_addr = {(p.host, p.port): p for p in pools}
        self.pools = pools
        self.stats.membership_total.set(len(pools))
        self.stats.membership_healthy.set(len(pools))
        if failed:
            self.stats.update_failure.inc()
        else:
            self.stats.update_success.inc()

    def choose(self) -> Pool | None:
        pools = self.pools
        n = len(pools)
        if n == 0:
            return None
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
        for p in self.pools:
            p.close()
