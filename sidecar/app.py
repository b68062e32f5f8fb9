"""The sidecar process: builds the runtime from a Bootstrap and serves until told to stop.

Start-up order matters to the supervisor: clusters resolve first, then the
listeners bind, and only then does /ready say LIVE, so a service started
after its sidecar is ready never sees a refused egress connection.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Sequence
from typing import Any

from pods.resolver import HostsResolver
from sidecar.access_log import AccessLogger
from sidecar.admin import Admin, AdminConnections
from sidecar.cluster import ClusterRuntime
from sidecar.config import Bootstrap, ConfigError, Listener
from sidecar.http_filters import Runtime
from sidecar.router import HcmRuntime
from sidecar.server import DownstreamProtocol, Handler
from sidecar.stats import ClusterStats, HcmStats, ListenerStats, ServerStats, Store, TracingStats, ZipkinStats

DRAIN_S = 5.0
IDLE_SWEEP_S = 1.0

log = logging.getLogger("sidecar")


class Sidecar:
    def __init__(self, config: Bootstrap, pod_ip: str | None = None, hosts_path: str | None = None,
                 source: str = "", admin_socket: str | None = None,
                 listen_socks: Sequence[socket.socket] | None = None) -> None:
        self.config = config
        self.admin_socket = admin_socket
        #: A worker's listening sockets, one per listener in order, bound by its parent (sidecar.workers);
        #: None: bind them here.
        self.listen_socks = listen_socks
        self._socket_inode: int | None = None  # of the admin socket we bound: never unlink someone else's
        self.admin: Admin | None = None
        self.pod_ip = pod_ip
        self.source = source
        self.resolver = HostsResolver(hosts_path)
        self.store = Store()
        self.runtime = Runtime()  # admin /runtime_modify: read by the HTTP filters on each request
        self.server_stats = ServerStats(self.store)
        self.clusters: dict[str, ClusterRuntime] = {}
        self.loggers: dict[str, AccessLogger] = {}
        self.servers: list[asyncio.AbstractServer] = []
        self.connections: set[DownstreamProtocol] = set()  # the admin's; each HcmRuntime keeps its own
        self.hcms: list[HcmRuntime] = []
        self.tls_listeners: list[Any] = []  # sidecar.tls.TlsListener (own accept path; plain listeners: servers)
        self.tls_contexts: list[Any] = []  # sidecar.tls.TlsContext of listeners and clusters, reloaded by the sweeper
        self.reporters: dict[tuple[str, str], Any] = {}  # sidecar.tracing.ZipkinReporter per collector
        self.state = "PRE_INITIALIZING"
        self.started = time.monotonic()
        self._stop = asyncio.Event()

    def _logger(self, path: str, fmt: str | None) -> AccessLogger:
        key = f"{path}\0{fmt}"
        if key not in self.loggers:
            self.loggers[key] = AccessLogger(path, fmt)
        return self.loggers[key]

    async def start_or_exit_code(self) -> int | None:
        """``start()``; if it fails, why is logged, what started is shut down, and the process's exit code is
        returned: 1 a listener cannot be bound, 2 a configuration that does not load (certificate files)."""
        try:
            await self.start()
            return None
        except OSError as exc:
            log.error("cannot listen: %s", exc.strerror or exc)
            code = 1
        except ConfigError as exc:
            log.error("%s", exc)
            code = 2
        await self.shutdown()
        return code

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for c in self.config.clusters:
            runtime = ClusterRuntime(c, ClusterStats(self.store, c.name), self.resolver, self.pod_ip)
            await runtime.start()
            self.clusters[c.name] = runtime
            if runtime.tls is not None:
                self.tls_contexts.append(runtime.tls.ctx)
        for i, lst in enumerate(self.config.listeners):
            hcm_cfg = lst.hcm
            loggers = [self._logger(a.path, a.format) for a in hcm_cfg.access_logs]
            hstats = HcmStats(self.store, hcm_cfg.stat_prefix)
            lstats = ListenerStats(self.store, f"{lst.address}_{lst.port}", hcm_cfg.stat_prefix)
            tracer = self._tracer(lst) if hcm_cfg.tracing is not None else None
            hcm = HcmRuntime(hcm_cfg, self.clusters, hstats, lstats, loggers, runtime=self.runtime, tracer=tracer)
            self.hcms.append(hcm)
            max_header = hcm_cfg.max_request_headers_kb * 1024
            sock = self.listen_socks[i] if self.listen_socks is not None else None
            if lst.tls is not None:
                self._start_tls_listener(lst, hcm, hstats, lstats, max_header, sock)
                continue
            where: dict[str, Any] = ({"host": lst.address, "port": lst.port, "reuse_address": True} if sock is None
                                     else {"sock": sock})
            server = await loop.create_server(
                lambda hcm=hcm, max_header=max_header: DownstreamProtocol(hcm, max_header,
                                                                          hcm.cfg.stream_idle_timeout_s),
                backlog=2048, **where)
            self.servers.append(server)
        await self._start_admin()
        for logger in self.loggers.values():
            await logger.start()
        self._sweeper = loop.create_task(self._sweep_idle())
        self.state = "LIVE"

    async def _start_admin(self) -> None:
        """The admin's TCP port (read-only pages) and its Unix socket (everything), when configured."""
        loop = asyncio.get_running_loop()
        a = self.config.admin
        if a is not None or self.admin_socket:
            self.admin = Admin(self, self.admin_socket)
            idle = a.idle_timeout_s if a is not None else 300.0
            if a is not None:
                self.servers.append(await loop.create_server(
                    self._admin_factory(self.admin.handle_tcp, idle), a.address, a.port, reuse_address=True))
            if self.admin_socket:
                self.servers.append(await loop.create_unix_server(
                    self._admin_factory(self.admin.handle_socket, idle), sock=self._bind_admin_socket()))

    def _tracer(self, lst: Listener) -> Any:
        """The listener's connection manager tracer; one reporter per collector, shared (Envoy: one per tracer
        configuration, all counting into tracing.zipkin.*)."""
        from sidecar import tracing  # only a traced configuration pays for importing it

        cfg = lst.hcm.tracing
        assert cfg is not None
        key = (cfg.collector_cluster, cfg.collector_endpoint)
        reporter = self.reporters.get(key)
        if reporter is None:
            boot = self.config
            if not self.reporters:
                self.zipkin_stats = ZipkinStats(self.store)
            reporter = tracing.ZipkinReporter(
                self.clusters[cfg.collector_cluster], cfg.collector_endpoint, self.zipkin_stats,
                boot.runtime_int(tracing.FLUSH_INTERVAL_KEY, tracing.DEFAULT_FLUSH_INTERVAL_MS),
                boot.runtime_int(tracing.MIN_FLUSH_SPANS_KEY, tracing.DEFAULT_MIN_FLUSH_SPANS))
            reporter.start()
            self.reporters[key] = reporter
        # localEndpoint.ipv4: the pod's address (Envoy puts its host's first address there)
        ip = self.pod_ip or lst.address
        return tracing.HcmTracer(cfg, TracingStats(self.store, lst.hcm.stat_prefix), reporter,
                                 self.config.node_id, self.config.node_cluster, ip)

    def _start_tls_listener(self, lst: Listener, hcm: HcmRuntime, hstats: HcmStats, lstats: ListenerStats,
                            max_header: int, sock: socket.socket | None = None) -> None:
        """A listener with a DownstreamTlsContext: its own accept path (sidecar.tls), strict or permissive."""
        from sidecar import tls  # only a TLS configuration loads OpenSSL (sidecar.no_tls)

        assert lst.tls is not None
        ctx = tls.TlsContext(lst.tls, f"listener {lst.name}")  # ReloadError (a ConfigError): unusable files
        self.tls_contexts.append(ctx)
        tstats = tls.TlsStats(self.store, lstats.prefix)
        ssl_total = self.store.counter(hstats.prefix + "downstream_cx_ssl_total")
        ssl_active = self.store.gauge(hstats.prefix + "downstream_cx_ssl_active")
        refusals = tls.RefusalLog(f"listener {lst.name} ({lst.address}:{lst.port})")

        def refused(peer: str, stat: str, reason: str) -> None:
            # Envoy counts a connection whose handshake failed as one its listener and connection manager
            # accepted and destroyed (checked with Envoy 1.40), plus the ssl.* reason.
            tstats.counters[stat].value += 1
            ssl_total.value += 1
            lstats.downstream_cx_total.value += 1
            lstats.downstream_cx_destroy.value += 1
            hstats.downstream_cx_total.value += 1
            hstats.downstream_cx_destroy.value += 1
            refusals.refused(peer, reason)

        shared = tls.TlsDownstream(ctx, tstats, ssl_total, ssl_active, refused)
        idle = hcm.cfg.stream_idle_timeout_s
        listener = tls.TlsListener(
            lst.address, lst.port, ctx, lst.plaintext_allowed,
            lambda: tls.TlsDownstreamProtocol(shared, hcm, max_header, idle),
            lambda: DownstreamProtocol(hcm, max_header, idle), refused)
        listener.start(sock)
        self.tls_listeners.append(listener)

    async def _sweep_idle(self) -> None:
        """Close connections silent for longer than their stream idle timeout (Envoy: 5 min default),
        so a client that sends half a request and stops cannot hold a connection forever. Also picks up
        rotated TLS certificates (one stat per file per second)."""
        while True:
            await asyncio.sleep(IDLE_SWEEP_S)
            for ctx in self.tls_contexts:
                ctx.maybe_reload()
            now = asyncio.get_running_loop().time()
            for conn in self.all_connections():
                if conn.idle_timeout_s and now - conn.last_activity > conn.idle_timeout_s:
                    conn.manager.on_idle_timeout(conn)
                    conn.close()

    def all_connections(self) -> list[DownstreamProtocol]:
        """Every open connection, admin and data path (a copy: closing one changes the sets)."""
        return [*self.connections, *(c for hcm in self.hcms for c in hcm.connections)]

    def _bind_admin_socket(self) -> socket.socket:
        """The admin socket, mode 0600 from birth (umask at bind: no window in which another user could connect).

        A socket file left by a previous run is replaced; one a live process still answers on is not.
        """
        path = self.admin_socket
        assert path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                if probe.connect_ex(path) == 0:
                    raise OSError(errno.EADDRINUSE, f"{path} is in use by another process")
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        self._socket_inode = os.stat(path).st_ino
        return sock

    def _admin_factory(self, handler: Handler, idle_timeout_s: float) -> Callable[[], DownstreamProtocol]:
        manager = AdminConnections(handler, self.connections)
        return lambda: DownstreamProtocol(manager, idle_timeout_s=idle_timeout_s)

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
        for tl in self.tls_listeners:
            tl.close()
        if self.admin is not None:
            self.admin.close()
        self._unlink_admin_socket()
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline and any(c.active is not None for c in self.all_connections()):
            await asyncio.sleep(0.02)
        for c in self.all_connections():
            c.close()
        for reporter in self.reporters.values():
            await reporter.close()  # the last spans, briefly: a dead collector must not hold the exit up
        for cluster in self.clusters.values():
            cluster.close()
        for logger in self.loggers.values():
            logger.close()

    def _unlink_admin_socket(self) -> None:
        if self.admin_socket and self._socket_inode is not None:
            try:
                if os.stat(self.admin_socket).st_ino == self._socket_inode:
                    os.unlink(self.admin_socket)
            except OSError as exc:
                log.warning("cannot remove the admin socket %s: %s", self.admin_socket, exc.strerror or exc)
            self._socket_inode = None
