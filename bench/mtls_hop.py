"""Benchmark: the mTLS hop between two sidecars, ours and the real Envoy's, same run.

wrk (plaintext) -> client-side proxy (egress cluster originating TLS with a mesh certificate) -> server-side
proxy (strict listener: client certificate required, SPIFFE SAN checked) -> nginx. Both proxies are the same
engine: our sidecar pair vs a real Envoy pair (one worker each), interleaved repetitions, medians; CPU per
request is the two proxies' together. Handshakes: ``openssl s_time`` against the server-side proxy with the
client's certificate, full handshakes (``-new``) and resumed sessions (``-reuse``): the rate, and the server's CPU
per handshake. s_time makes one connection at a time, so against a fast server its rate is capped by the client
(bench/NOTES.md, "TLS handshakes"): CPU per handshake is the fair comparison.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

from bench.peers import Peer, cpu_seconds, nginx, process_tree, require, rss_bytes, temp_workdir, wait_port
from bench.sidecar_hop import envoy_binary
from bench.wrk import run_wrk
from meshctl.identity.ca import ensure_ca
from pods.identity import spiffe_id

BACKEND = ("127.0.240.1", 8080)
#: engine -> (client-side alias, server-side alias)
PAIRS = {"sidecar": ("127.0.241.1", "127.0.242.1"), "envoy": ("127.0.243.1", "127.0.244.1")}
PORT = 8080
MESH = "bench"

_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def _tls_socket(kind: str, certs: Path, pod: str, peer: str, **extra: object) -> dict:
    common = {"tls_certificates": [{"certificate_chain": {"filename": f"{certs}/{pod}.pem"},
                                    "private_key": {"filename": f"{certs}/{pod}-key.pem"}}],
              "validation_context": {"trusted_ca": {"filename": f"{certs}/ca.pem"},
                                     "match_typed_subject_alt_names": [
                                         {"san_type": "URI", "matcher": {"exact": spiffe_id(MESH, peer)}}]}}
    return {"name": "envoy.transport_sockets.tls",
            "typed_config": {"@type": _TLS + kind, "common_tls_context": common, **extra}}


def config(workdir: Path, certs: Path, side: str, ip: str, upstream: tuple[str, int]) -> Path:
    """``side`` "client": plaintext listener, TLS cluster to the server; "server": strict TLS listener.

    Like the plain hop's bootstrap (bench.sidecar_hop): a retry policy, a file access log, stats on.
    """
    hcm = {"@type": _HCM, "stat_prefix": side,
           "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
               "path": str(workdir / f"{side}-{ip}.log")}}],
           "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                                               "retry_policy": {"retry_on": "5xx", "num_retries": 2},
                                               "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "next"}}]}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    chain: dict = {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
    cluster: dict = {"name": "next", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
        "cluster_name": "next", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
            "address": upstream[0], "port_value": upstream[1]}}}}]}]}}
    if side == "client":
        cluster["transport_socket"] = _tls_socket("UpstreamTlsContext", certs, "client", "server")
    else:
        chain["transport_socket"] = _tls_socket("DownstreamTlsContext", certs, "server", "client",
                                                require_client_certificate=True)
    boot = {"static_resources": {"listeners": [{"address": {"socket_address": {"address": ip, "port_value": PORT}},
                                                "filter_chains": [chain]}],
                                 "clusters": [cluster]},
            "admin": {"address": {"socket_address": {"address": ip, "port_value": 9901}}}}
    path = workdir / f"{side}-{ip}.yaml"
    path.write_text(json.dumps(boot, indent=1))  # JSON is YAML: both engines read it
    return path


def make_certs(workdir: Path) -> Path:
    certs = workdir / "certs"
    ca = ensure_ca(certs, MESH)
    for pod, ip in (("client", "127.0.0.1"), ("server", "127.0.0.1")):
        issued = ca.issue(spiffe_id(MESH, pod), dns=("localhost",), ips=(ip,))
        (certs / f"{pod}.pem").write_bytes(issued.cert_pem)
        key = certs / f"{pod}-key.pem"
        key.write_bytes(issued.key_pem)
        key.chmod(0o600)
    return certs


def _peer(engine: str, cfg: Path, ip: str, workdir: Path) -> Peer:
    if engine == "sidecar":
        argv = [sys.executable, "-m", "sidecar", "--envoy", str(cfg), "--pod-ip", ip]
    else:
        binary = envoy_binary()
        assert binary is not None
        argv = [binary, "-c", str(cfg), "--concurrency", "1", "--disable-hot-restart", "--log-level", "error",
                "--base-id", str(abs(hash(ip)) % 10000)]
    return Peer(f"{engine}-{ip}", argv, ip, PORT)


def s_time(ip: str, certs: Path, reuse: bool, seconds: int, tls12: bool = False) -> tuple[float, int]:
    """Handshakes per second that ``openssl s_time`` completes against ip:PORT (client cert presented).

    Resumption is measured on TLS 1.2: s_time (OpenSSL 3.0) does not resume TLS 1.3 sessions, whose tickets
    arrive after the handshake.
    """
    argv = [require("openssl"), "s_time", "-connect", f"{ip}:{PORT}", "-reuse" if reuse else "-new",
            *(["-tls1_2"] if tls12 else []), "-time", str(seconds),
            "-cert", str(certs / "client.pem"), "-key", str(certs / "client-key.pem"),
            "-CAfile", str(certs / "ca.pem")]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30).stdout
    m = re.search(r"(\d+) connections in (\d+) real seconds", out)  # wall clock, not the client's CPU
    if m is None:
        raise RuntimeError(f"openssl s_time {ip}: no result: {out[-300:]}")
    return int(m.group(1)) / max(float(m.group(2)), 1e-9), int(m.group(1))


def handshakes(server: Peer, certs: Path, reuse: bool, seconds: int, tls12: bool = False) -> tuple[float, float]:
    """(handshakes/s, the server's CPU µs per handshake) of one s_time run."""
    procs = process_tree(server.pid)
    cpu0 = cpu_seconds(procs)
    rate, count = s_time(server.ip, certs, reuse, seconds, tls12)
    return rate, (cpu_seconds(procs) - cpu0) / max(count, 1) * 1e6


def measure(duration_s: float = 5, reps: int = 3, handshake_s: int = 3) -> dict[str, dict[str, float]]:
    workdir = temp_workdir()
    certs = make_certs(workdir)
    backend = nginx(workdir, *BACKEND)
    engines = [e for e in PAIRS if e == "sidecar" or envoy_binary() is not None]
    peers: dict[str, tuple[Peer, Peer]] = {}
    for engine in engines:
        cip, sip = PAIRS[engine]
        server = _peer(engine, config(workdir, certs, "server", sip, BACKEND), sip, workdir)
        client = _peer(engine, config(workdir, certs, "client", cip, (sip, PORT)), cip, workdir)
        peers[engine] = (server, client)
    samples: dict[str, list[dict[str, float]]] = {e: [] for e in engines}
    try:
        backend.start()
        for server, client in peers.values():
            server.start()
            client.start()
            wait_port(client.ip, 9901)
        for engine in engines:
            run_wrk(f"http://{peers[engine][1].ip}:{PORT}/", 1)  # warm up: pools and sessions
        for rep in range(reps):
            for engine in engines[rep % len(engines):] + engines[:rep % len(engines)]:
                server, client = peers[engine]
                procs = process_tree(server.pid) + process_tree(client.pid)
                cpu0 = cpu_seconds(procs)
                r = run_wrk(f"http://{client.ip}:{PORT}/", duration_s)
                r["cpu_us_per_rq"] = (cpu_seconds(procs) - cpu0) / max(r["requests"], 1) * 1e6
                r["rss_mb"] = rss_bytes(procs) / 1024 / 1024
                for key, reuse, tls12 in (("new", False, False), ("new_tls12", False, True),
                                          ("reuse_tls12", True, True)):
                    rate, cpu = handshakes(server, certs, reuse, handshake_s, tls12)
                    r[f"handshakes_{key}_per_s"], r[f"handshake_{key}_cpu_us"] = rate, cpu
                samples[engine].append(r)
    finally:
        for server, client in peers.values():
            client.stop()
            server.stop()
        backend.stop()
    return {e: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for e, rs in samples.items() if rs}


def main() -> None:
    res = measure(float(sys.argv[1]) if len(sys.argv) > 1 else 5, int(sys.argv[2]) if len(sys.argv) > 2 else 3)
    for name, r in res.items():
        print(f"{name:<8} {r['rps']:>8.0f} rps  p99 {r['p99_ms']:.2f} ms  cpu {r['cpu_us_per_rq']:.1f} us/rq "
              f"(2 proxies)  rss {r['rss_mb']:.1f} MB  handshakes/s: {r['handshakes_new_per_s']:.0f} new (TLS 1.3), "
              f"{r['handshakes_new_tls12_per_s']:.0f} new / {r['handshakes_reuse_tls12_per_s']:.0f} resumed (TLS 1.2); "
              f"server CPU/handshake {r['handshake_new_cpu_us']:.0f} / {r['handshake_new_tls12_cpu_us']:.0f} / "
              f"{r['handshake_reuse_tls12_cpu_us']:.0f} us  "
              f"non-2xx {r['non_2xx']:.0f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
