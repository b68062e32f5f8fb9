"""``meshctl stats``: golden signals per pod and per edge, from scrapes of the running mesh.

Every poll reads the supervisor's process table (control socket), every
sidecar's ``/stats/prometheus`` (and runtime, on its admin socket: live faults) and every declared
service metrics endpoint, concurrently and with a short timeout, so a hung pod costs one empty cell
rather than a frozen screen. Numbers are deltas over a sliding window.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import aiohttp

from meshctl.client import call
from meshctl.fault import active as active_faults
from meshctl.observe.promtext import Labels, parse
from meshctl.observe.window import Window, bucket_deltas, counter_delta, histogram_quantile
from meshctl.state import StateDir
from meshctl.supervisor.states import COMING_UP, State
from pods.replica import SidecarLaunch

SCRAPE_TIMEOUT_S = 1.0
Index = dict[tuple[str, Labels], float]


def _matches(labels: Labels, want: dict[str, str]) -> bool:
    d = dict(labels)
    return all(d.get(k) == v for k, v in want.items())


def total(idx: Index | None, name: str, **want: str) -> float | None:
    if idx is None:
        return None
    values = [v for (n, labels), v in idx.items() if n == name and _matches(labels, want)]
    return sum(values) if values else None


def buckets(idx: Index | None, name: str, **want: str) -> dict[float, float]:
    out: dict[float, float] = {}
    if idx is None:
        return out
    for (n, labels), v in idx.items():
        if n == name and _matches(labels, want):
            le = dict(labels).get("le", "+Inf")
            bound = math.inf if le in ("+Inf", "Inf") else float(le)
            out[bound] = out.get(bound, 0.0) + v
    return out


def delta(old: Index | None, new: Index | None, name: str, **want: str) -> float | None:
    return counter_delta(total(old, name, **want), total(new, name, **want))


@dataclass
class PodRow:
    pod: str
    status: str
    ready: str
    restarts: int
    cpu_percent: float | None
    rss_bytes: int | None
    meshed: bool
    success: float | None
    rps: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    retries_per_s: float | None
    upstream_5xx_per_s: float | None
    faults: list[dict[str, Any]] = field(default_factory=list)  # live ingress faults (meshctl fault)


@dataclass
class EdgeRow:
    source: str
    cluster: str
    rps: float | None
    success: float | None  # after retries: what the caller saw
    actual_success: float | None  # before retries: per upstream attempt
    retries_per_s: float | None
    timeouts_per_s: float | None
    p99_ms: float | None
    faults: list[dict[str, Any]] = field(default_factory=list)  # live egress faults (meshctl fault)
    to_pod: str | None = None  # the pod the cluster's endpoints belong to (None: outside the mesh, or not known yet)


@dataclass
class Snapshot:
    mesh: str
    window_s: float
    measured_s: float | None
    pods: list[PodRow]
    edges: list[EdgeRow]

    def to_json(self) -> dict[str, Any]:
        def clean(d: dict[str, Any]) -> dict[str, Any]:
            return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}

        return {"mesh": self.mesh, "window_s": self.window_s,
                "measured_s": None if self.measured_s is None else round(self.measured_s, 3),
                "pods": [clean(asdict(p)) for p in self.pods],
                "edges": [clean({"from": e.source, "to": e.cluster,
                                 **{k: v for k, v in asdict(e).items() if k not in ("source", "cluster")}})
                          for e in self.edges]}


class Collector:
    def __init__(self, state: StateDir, window_s: float = 10.0) -> None:
        self.state = state
        self.window_s = window_s
        #: The mesh's pods as the supervisor describes them (``GET /v1/status``'s ``pods``).
        self.pods: dict[str, dict[str, Any]] = {}
        self.launches: dict[str, SidecarLaunch] = {}
        self.status: dict[str, Any] = {}
        self.windows: dict[str, Window[Index]] = {}  # "replica/sidecar" or "replica/service" -> scrapes
        self.session: aiohttp.ClientSession | None = None
        #: Live faults (``meshctl.fault.active``): read from each replica's admin socket runtime.
        self.faults: list[dict[str, Any]] = []
        #: (pod, egress cluster) -> the pod its endpoints are, from the sidecar's GET /clusters (both engines).
        self.targets: dict[tuple[str, str], str | None] = {}

    async def __aenter__(self) -> Collector:
        timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)
        self.session = aiohttp.ClientSession(timeout=timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    async def _get(self, url: str) -> str | None:
        assert self.session is not None
        try:
            async with self.session.get(url) as resp:
                return await resp.text() if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    async def poll(self) -> None:
        # The one control client is synchronous (cheap for one-shot commands): here it runs in a thread.
        self.status = await asyncio.get_running_loop().run_in_executor(
            None, call, self.state.control_socket, "GET", "/v1/status", SCRAPE_TIMEOUT_S)
        self.pods = {pod["pod"]: pod for pod in self.status["pods"]}
        self.launches = {name: _launch(pod["sidecar"]) for name, pod in self.pods.items() if pod["sidecar"]}
        jobs: dict[str, str] = {}
        for p in self.status["processes"]:
            pod = self.pods.get(p["pod"])
            if pod is None or not p["pid"]:
                continue
            launch = self.launches.get(p["pod"])
            metrics = pod["metrics"]
            if p["role"] == "sidecar" and launch is not None and launch.admin_port:
                jobs[f"{p['replica']}/sidecar"] = f"http://{p['ip']}:{launch.admin_port}/stats/prometheus"
            elif p["role"] == "service" and metrics is not None:
                jobs[f"{p['replica']}/service"] = f"http://{p['ip']}:{metrics['port']}{metrics['path']}"
        texts, self.faults, _ = await asyncio.gather(
            asyncio.gather(*(self._get(u) for u in jobs.values())),
            asyncio.get_running_loop().run_in_executor(None, partial(active_faults, self.status, SCRAPE_TIMEOUT_S)),
            self._resolve_targets())
        now = time.monotonic()
        for key, text in zip(jobs, texts, strict=True):
            if text is None:
                continue
            idx: Index = {(n, labels): v for n, labels, v in parse(text)}
            self.windows.setdefault(key, Window(self.window_s)).add(now, idx)

    async def _resolve_targets(self) -> None:
        """Which pod each egress cluster reaches: its endpoints' addresses against the replicas' aliases. Asked
        once per sidecar (a cluster's endpoints are fixed for a mesh's life); a sidecar that did not answer yet is
        asked again at the next poll."""
        by_ip = {r["ip"]: pod["pod"] for pod in self.status["pods"] for r in pod["replicas"]}
        jobs = []
        for name, launch in self.launches.items():
            if not launch.egress_clusters or all((name, c) in self.targets for c in launch.egress_clusters):
                continue
            replica = next((r for r in self.pods[name]["replicas"] if r.get("sidecar_admin")), None)
            if replica is not None:
                jobs.append((name, launch, self._get(f"http://{replica['sidecar_admin']}/clusters")))
        for (name, launch, _), text in zip(jobs, await asyncio.gather(*(j[2] for j in jobs)), strict=True):
            if text is None:
                continue
            hosts: dict[str, set[str]] = {}
            for line in text.splitlines():  # Envoy's text form: cluster::host:port::stat::value
                parts = line.split("::")
                if len(parts) >= 3 and parts[1].rpartition(":")[0] in by_ip:
                    hosts.setdefault(parts[0], set()).add(by_ip[parts[1].rpartition(":")[0]])
            for c in launch.egress_clusters:
                pods = hosts.get(c, set())
                self.targets[(name, c)] = next(iter(pods)) if len(pods) == 1 else None

    def _span(self, key: str) -> tuple[Index | None, Index | None, float | None]:
        w = self.windows.get(key)
        span = w.span() if w else None
        if span is None:
            return None, None, None
        old, new = span
        return old.value, new.value, new.t - old.t

    def snapshot(self) -> Snapshot:
        pods, edges = [], []
        spans: list[float] = []
        for name, pod in self.pods.items():
            procs = [p for p in self.status.get("processes", []) if p["pod"] == name]
            replicas = sorted({p["replica"] for p in procs})
            launch = self.launches.get(name)
            row = self._pod_row(name, procs)
            req = err = retries = up5xx = 0.0
            have_traffic = have_retries = False
            hist: dict[float, float] = {}
            dts: list[float] = []
            for r in replicas:
                if launch is not None and not launch.ingress_stat_prefixes and launch.egress_clusters:
                    old, new, dt = self._span(f"{r}/sidecar")  # an egress-only sidecar: its edges, no pod row
                    if dt is not None:
                        edges.extend(self._edges(name, r, launch, old, new, dt))
                if launch is not None and launch.ingress_stat_prefixes:
                    old, new, dt = self._span(f"{r}/sidecar")
                    if dt is None:
                        continue
                    dts.append(dt)
                    for prefix in launch.ingress_stat_prefixes:
                        d = delta(old, new, "envoy_http_downstream_rq_xx", envoy_http_conn_manager_prefix=prefix)
                        e = delta(old, new, "envoy_http_downstream_rq_xx", envoy_http_conn_manager_prefix=prefix,
                                  envoy_response_code_class="5")
                        if d is not None:
                            have_traffic = True
                            req += d
                            err += e or 0.0
                        for le, v in bucket_deltas(
                                buckets(old, "envoy_http_downstream_rq_time_bucket",
                                        envoy_http_conn_manager_prefix=prefix),
                                buckets(new, "envoy_http_downstream_rq_time_bucket",
                                        envoy_http_conn_manager_prefix=prefix)).items():
                            hist[le] = hist.get(le, 0.0) + v
                    rt = delta(old, new, "envoy_cluster_upstream_rq_retry")
                    if rt is not None:
                        have_retries = True
                        retries += rt
                    up5xx += _upstream_5xx(old, new, launch)
                    edges.extend(self._edges(name, r, launch, old, new, dt))
                elif pod["metrics"] is not None:
                    old, new, dt = self._span(f"{r}/service")
                    if dt is None:
                        continue
                    dts.append(dt)
                    for (n, labels), _ in (new or {}).items():
                        if n.endswith("_requests_total") and any(k in ("status", "code") for k, _ in labels):
                            d = counter_delta((old or {}).get((n, labels)), (new or {}).get((n, labels))) or 0.0
                            have_traffic = True
                            req += d
                            code = next(v for k, v in labels if k in ("status", "code"))
                            if code.startswith("5"):
                                err += d
            dt = sum(dts) / len(dts) if dts else None
            if dt:
                spans.append(dt)
            if have_traffic and dt and req > 0:
                row.rps = req / dt
                row.success = (req - err) / req
                row.p50_ms, row.p95_ms, row.p99_ms = (histogram_quantile(q, hist) for q in (0.5, 0.95, 0.99))
            if launch is not None and dt:
                row.meshed = True
                if have_retries:
                    row.retries_per_s = retries / dt
                    row.upstream_5xx_per_s = up5xx / dt
            pods.append(row)
        merged = self._merge_edges(edges)
        for f in self.faults:
            short = {k: f[k] for k in ("abort_percent", "status", "delay_ms", "delay_percent", "replicas")}
            if f["direction"] == "egress":
                edge = next((e for e in merged if e.source == f["pod"] and e.cluster == f["cluster"]), None)
                if edge is None:  # not scraped yet: the fault is shown all the same
                    edge = EdgeRow(f["pod"], f["cluster"], None, None, None, None, None, None)
                    merged.append(edge)
                edge.faults.append(short)
            else:
                for p in pods:
                    if p.pod == f["pod"]:
                        p.faults.append({"cluster": f["cluster"], **short})
        for e in merged:
            e.to_pod = self.targets.get((e.source, e.cluster))
        return Snapshot(self.status.get("mesh", self.state.mesh), self.window_s,
                        max(spans) if spans else None, pods, merged)

    @staticmethod
    def _pod_row(name: str, procs: list[dict[str, Any]]) -> PodRow:
        ready = sum(1 for p in procs if p["ready"])
        loop = [p for p in procs if p["state"] == State.CRASHLOOP]
        if loop:
            status = f"crashloop (exit {loop[0]['last_exit']})"
        elif any(p["state"] in (State.EXITED, State.FAILED) for p in procs):
            status = "down"
        elif ready < len(procs):
            status = "starting" if any(p["state"] in COMING_UP for p in procs) else "not ready"
        else:
            status = "running"
        cpus = [p["cpu_percent"] for p in procs if p["cpu_percent"] is not None]
        rss = [p["rss_bytes"] for p in procs if p["rss_bytes"] is not None]
        return PodRow(pod=name, status=status, ready=f"{ready}/{len(procs)}",
                      restarts=sum(p["restarts"] for p in procs), cpu_percent=sum(cpus) if cpus else None,
                      rss_bytes=sum(rss) if rss else None, meshed=False, success=None, rps=None, p50_ms=None,
                      p95_ms=None, p99_ms=None, retries_per_s=None, upstream_5xx_per_s=None)

    @staticmethod
    def _edges(pod: str, replica: str, launch: SidecarLaunch, old: Index | None, new: Index | None,
               dt: float) -> list[tuple[str, str, dict[str, Any]]]:
        out = []
        for c in launch.egress_clusters:
            attempts = delta(old, new, "envoy_cluster_upstream_rq_total", envoy_cluster_name=c)
            if attempts is None:
                continue
            retries = delta(old, new, "envoy_cluster_upstream_rq_retry", envoy_cluster_name=c) or 0.0
            final = delta(old, new, "envoy_cluster_upstream_rq_xx", envoy_cluster_name=c) or 0.0
            final5 = delta(old, new, "envoy_cluster_upstream_rq_xx", envoy_cluster_name=c,
                           envoy_response_code_class="5") or 0.0
            timeouts = sum(delta(old, new, n, envoy_cluster_name=c) or 0.0
                           for n in ("envoy_cluster_upstream_rq_timeout", "envoy_cluster_upstream_rq_per_try_timeout"))
            hist = bucket_deltas(buckets(old, "envoy_cluster_upstream_rq_time_bucket", envoy_cluster_name=c),
                                 buckets(new, "envoy_cluster_upstream_rq_time_bucket", envoy_cluster_name=c))
            out.append((pod, c, {"attempts": attempts, "retries": retries, "ok": final - final5,
                                 "timeouts": timeouts, "hist": hist, "dt": dt}))
        return out

    @staticmethod
    def _merge_edges(edges: list[tuple[str, str, dict[str, Any]]]) -> list[EdgeRow]:
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        for pod, c, d in edges:
            m = merged.setdefault((pod, c), {"attempts": 0.0, "retries": 0.0, "ok": 0.0, "timeouts": 0.0,
                                             "hist": {}, "dts": []})
            for k in ("attempts", "retries", "ok", "timeouts"):
                m[k] += d[k]
            for le, v in d["hist"].items():
                m["hist"][le] = m["hist"].get(le, 0.0) + v
            m["dts"].append(d["dt"])
        rows = []
        for (pod, c), m in merged.items():
            dt = sum(m["dts"]) / len(m["dts"])
            requests = m["attempts"] - m["retries"]
            traffic = requests > 0
            rows.append(EdgeRow(
                source=pod, cluster=c, rps=requests / dt if dt and traffic else None,
                # a request counted in one window and answered in the next can push a short window over 1
                success=min(1.0, m["ok"] / requests) if traffic else None,
                actual_success=m["ok"] / m["attempts"] if m["attempts"] > 0 else None,
                retries_per_s=m["retries"] / dt if dt and traffic else None,
                timeouts_per_s=m["timeouts"] / dt if dt and traffic else None,
                p99_ms=histogram_quantile(0.99, m["hist"]) if traffic else None))
        return rows


def _upstream_5xx(old: Index | None, new: Index | None, launch: SidecarLaunch) -> float:
    """5xx answers from the pod's upstreams, retried ones included: its egress clusters (the mesh's hops), or,
    for an ingress-only sidecar, its own service. Not both: a service that fails because its upstream failed
    would count one failure twice."""
    names = launch.egress_clusters or (None,)
    total = 0.0
    for name in names:
        want = {} if name is None else {"envoy_cluster_name": name}
        for metric in ("envoy_cluster_upstream_rq_xx", "envoy_cluster_retry_upstream_rq_xx"):
            total += delta(old, new, metric, envoy_response_code_class="5", **want) or 0.0
    return total


def _launch(sidecar: dict[str, Any]) -> SidecarLaunch:
    """A sidecar as the control API describes it; only the fields ``stats`` reads."""
    return SidecarLaunch(args=(), admin_port=sidecar["admin_port"], listener_ports=tuple(sidecar["listener_ports"]),
                         egress_port=sidecar["egress_port"],
                         ingress_stat_prefixes=tuple(sidecar["ingress_stat_prefixes"]),
                         egress_clusters=tuple(sidecar["egress_clusters"]))
