"""Sidecar workers scaling: our sidecar --concurrency 1 vs 2, the real Envoy --concurrency 1 vs 2, same YAML.

Usage: .venv/bin/python -m bench.workers REPS SECONDS CONNECTIONS [WRK_THREADS] [TASKSET_LOAD]
(not part of `make bench`: bench/NOTES.md "Sidecar workers" quotes its results).
Interleaved, rotated repetitions; medians. CPU of each process tree (psutil) and of wrk (RUSAGE_CHILDREN).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.peers import Peer, cpu_seconds, nginx, process_tree, temp_workdir, wait_port  # noqa: E402
from bench.sidecar_hop import envoy_binary, sidecar_config  # noqa: E402
from bench.wrk import run_wrk  # noqa: E402

BACKEND = ("127.0.144.1", 8080)
QUIET = 0.10
TARGETS = {"ours-1": "127.0.144.2", "ours-2": "127.0.144.3", "envoy-1": "127.0.144.4", "envoy-2": "127.0.144.5"}


def main() -> None:
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the finally: stop the peers
    reps, seconds, conns = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    pin = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] != "-" else None
    nroutes = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    work = temp_workdir()
    backend = nginx(work, *BACKEND)
    peers: dict[str, Peer] = {}
    for name, ip in TARGETS.items():
        cfg = sidecar_config(work, ip if name.startswith("envoy") else "0.0.0.0", name=name)
        text = cfg.read_text().replace("127.0.230.1", BACKEND[0])
        if nroutes:  # proxy-bound: a route table walked per request (regex routes that never match, then /)
            extra = "".join(f'{{match: {{safe_regex: {{regex: "^/api/v{i}/items/[0-9]+$"}}}}, '
                            f'route: {{cluster: backend}}}}, ' for i in range(nroutes))
            text = text.replace("routes: [{match: {prefix: /}", "routes: [" + extra + "{match: {prefix: /}")
            assert extra in text
        cfg.write_text(text)
        n = name[-1]
        if name.startswith("ours"):
            argv = [sys.executable, "-m", "sidecar", "--envoy", str(cfg), "--pod-ip", ip, "--concurrency", n]
        else:
            binary = envoy_binary()
            if binary is None:
                continue
            argv = [binary, "-c", str(cfg), "--concurrency", n, "--disable-hot-restart", "--log-level", "error"]
        peers[name] = Peer(name, argv, ip, 8080)
    samples: dict[str, list[dict]] = {k: [] for k in peers}
    try:
        backend.start()
        for p in peers.values():
            p.start()
        for p in peers.values():
            wait_port(p.ip, 9901)
            time.sleep(0.5)
        for p in peers.values():  # warm up
            run_wrk(f"http://{p.ip}:8080/", 1, conns, threads, pin)
        order = list(peers)
        budget = time.monotonic() + float(os.environ.get("BUDGET_S", "600"))
        rep = 0
        while time.monotonic() < budget and not all(
                sum(1 for x in samples[n] if x["others_cores"] < QUIET) >= reps for n in order):
            k = rep % len(order)
            rep += 1
            for name in order[k:] + order[:k]:
                p = peers[name]
                procs = process_tree(p.pid)
                nprocs = process_tree(backend.pid)
                c0, n0 = cpu_seconds(procs), cpu_seconds(nprocs)
                w0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                s0 = psutil.cpu_times()
                t0 = time.monotonic()
                r = run_wrk(f"http://{p.ip}:8080/", seconds, conns, threads, pin)
                wall = time.monotonic() - t0
                w1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                s1 = psutil.cpu_times()
                c1, n1 = cpu_seconds(procs), cpu_seconds(nprocs)
                busy = lambda t: t.user + t.nice + t.system + t.irq + t.softirq  # noqa: E731
                wrk_s = (w1.ru_utime + w1.ru_stime) - (w0.ru_utime + w0.ru_stime)
                r["others_cores"] = (busy(s1) - busy(s0) - (c1 - c0) - (n1 - n0) - wrk_s) / wall
                req = max(r["requests"], 1)
                r["proxy_cores"] = (c1 - c0) / wall
                r["proxy_us_per_rq"] = (c1 - c0) / req * 1e6
                r["nginx_us_per_rq"] = (n1 - n0) / req * 1e6
                r["wrk_us_per_rq"] = ((w1.ru_utime + w1.ru_stime) - (w0.ru_utime + w0.ru_stime)) / req * 1e6
                r["load"] = os.getloadavg()[0]
                samples[name].append(r)
                print(name, json.dumps({k2: round(v, 2) for k2, v in r.items()}), flush=True)
    finally:
        for p in (*peers.values(), backend):
            p.stop()
    print("\nmedians (all samples)")
    med = {}
    for name, rs in samples.items():
        med[name] = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
        print(name, json.dumps({k: round(v, 2) for k, v in med[name].items()}))
    for eng in ("ours", "envoy"):
        if f"{eng}-1" in med and f"{eng}-2" in med:
            ratios = [b["rps"] / a["rps"] for a, b in zip(samples[f"{eng}-1"], samples[f"{eng}-2"], strict=False)]
            print(f"{eng}: rps x{med[f'{eng}-2']['rps'] / med[f'{eng}-1']['rps']:.2f} (median of paired ratios "
                  f"x{statistics.median(ratios):.2f}, min {min(ratios):.2f}, max {max(ratios):.2f})")
    quiet_report(samples)


def quiet_report(samples: dict, limit: float = QUIET) -> None:
    print(f"\nmedians of samples where other processes used < {limit} cores")
    for eng in ("ours", "envoy"):
        a = [x for x in samples.get(f"{eng}-1", []) if x["others_cores"] < limit]
        b = [x for x in samples.get(f"{eng}-2", []) if x["others_cores"] < limit]
        if a and b:
            ma = {k: statistics.median(x[k] for x in a) for k in a[0]}
            mb = {k: statistics.median(x[k] for x in b) for k in b[0]}
            print(f"{eng}-1 n={len(a)}", json.dumps({k: round(v, 2) for k, v in ma.items()}))
            print(f"{eng}-2 n={len(b)}", json.dumps({k: round(v, 2) for k, v in mb.items()}))
            print(f"{eng}: x{mb['rps'] / ma['rps']:.2f}")


if __name__ == "__main__":
    main()
