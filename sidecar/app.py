"""The sidecar process: builds the runtime from a Bootstrap and serves until told to stop.

Start-up order matters to the supervisor: clusters resolve first, then the
listeners bind, and only then does /ready say LIVE, so a service started
after its sidecar is ready never sees a refused egress connection.
"""

from __future__ import annotations

import asyncio
import time

from pods.resolver import HostsResolver
from sidecar.access_log import AccessLogger
from sidecar.admin import Admin
from sidecar.cluster import ClusterRuntime
from sidecar.config import Bootstrap
from sidecar.router import HcmRuntime
from sidecar.server import DownstreamProtocol, HandlerOnly
from sidecar.stats import ClusterStats, HcmStats, ListenerStats, ServerStats, Store

DRAIN_S = 5.0
IDLE_SWEEP_S = 1.0


class Sidecar:
    def __init__(self, config: Bootstrap, pod_ip: str | None = None, hosts_path: str | None = None,
                 source: str = "") -> None:
        self.config = config
        self.pod_ip = pod_ip
        self.source = source
        self.resolver = HostsResolver(hosts_path)
        self.store = Store()
        self.server_stats = ServerStats(self.store)
        self.clusters: dict[str, ClusterRuntime] = {}
        self.loggers: dict[str, AccessLogger] = {}
        self.servers: list[asyncio.AbstractServer] = []
        self.hcms: list[HcmRuntime] = []
        self.state = "PRE_INITIALIZING"
        self.started = time.monotonic()
        self._stop = asyncio.Event()

    def _logger(self, path: str, fmt: str | None) -> AccessLogger:
        key = f"{path}\0{fmt}"
        if key not in self.loggers:
            self.loggers[key] = AccessLogger(path, fmt)
        return self.loggers[key]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for c in self.config.clusters:
            runtime = ClusterRuntime(c, ClusterStats(self.store, c.name), self.resolver, self.pod_ip)
            await runtime.start()
            self.clusters[c.name] = runtime
        for lst in self.config.listeners:
            hcm_cfg = lst.hcm
            loggers = [self._logger(a.path, a.format) for a in hcm_cfg.access_logs]
            hstats = HcmStats(self.store, hcm_cfg.stat_prefix)
            lstats = ListenerStats(self.store, f"{lst.address}_{lst.port}", hcm_cfg.stat_prefix)
            hcm = HcmRuntime(hcm_cfg, self.clusters, hstats, lstats, loggers)
            self.hcms.append(hcm)
            max_header = hcm_cfg.max_request_headers_kb * 1024
            server = await loop.create_server(
                lambda hcm=hcm, max_header=max_header: DownstreamProtocol(hcm, max_header,
                                                                          hcm.cfg.stream_idle_timeout_s),
                lst.address, lst.port, reuse_address=True, backlog=2048)
            self.servers.append(server)
        if self.config.admin is not None:
            admin = Admin(self)
            a = self.config.admin
            self.servers.append(await loop.create_server(
                lambda: DownstreamProtocol(HandlerOnly(admin.handle)), a.address, a.port, reuse_address=True))
        for logger in self.loggers.values():
            await logger.start()
        self._sweeper = loop.create_task(self._sweep_idle())
        self.state = "LIVE"

    async def _sweep_idle(self) -> None:
        """Close connections silent for longer than their stream idle timeout (Envoy: 5 min default),
        so a client that sends half a request and stops cannot hold a connection forever."""
        while True:
            await asyncio.sleep(IDLE_SWEEP_S)
            now = asyncio.get_running_loop().time()
            for conn in self.all_connections():
                if conn.idle_timeout_s and now - conn.last_activity > conn.idle_timeout_s:
                    conn.manager.on_idle_timeout(conn)
                    conn.close()

    def all_connections(self) -> list[DownstreamProtocol]:
        """Every open data-path connection (a copy: closing one changes its manager's set)."""
        return [c for hcm in self.hcms for c in hcm.connections]

    def refresh_server_stats(self) -> None:
        self.server_stats.refresh(time.monotonic() - self.started, self.state)

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self) -> None:
        await self._stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), flush the access logs."""
        self.state = "DRAINING"
        if getattr(self, "_sweeper", None) is not None:
            self._sweeper.cancel()
        for s in self.servers:
            s.close()
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline and any(c.active is not None for c in self.all_connections()):
            await asyncio.sleep(0.02)
        for c in self.all_connections():
            c.close()
        for cluster in self.clusters.values():
            cluster.close()
        for logger in self.loggers.values():
            logger.close()
