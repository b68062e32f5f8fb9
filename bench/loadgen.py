"""Benchmark: ``meshctl traffic`` as a load generator, against hey and wrk, all driving one nginx.

Run as ``python -m bench.loadgen [N] [REPS]``. Same backend, same concurrency
(10 connections), interleaved repetitions, medians: the machine is shared and
noisy, so only ratios measured alongside mean anything. Goal: traffic >= 2x hey.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.peers import nginx, require, temp_workdir
from bench.wrk import run_wrk

BACKEND = ("127.0.236.1", 8080)
CONNECTIONS = 10
ROOT = Path(__file__).resolve().parent.parent


def run_traffic(url: str, n: int, home: Path) -> dict[str, float]:
    """``meshctl traffic`` in its own process; rps as it reports it, wall time including start-up."""
    argv = [sys.executable, "-m", "meshctl", "traffic", url, "--n", str(n), "-c", str(CONNECTIONS), "--json",
            "--no-progress"]
    env = {**os.environ, "MESHCTL_HOME": str(home), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"meshctl traffic failed ({res.returncode}): {res.stderr}")
    report = json.loads(res.stdout)
    if report["requests"] != n or report["success_ratio"] != 1:
        raise RuntimeError(f"meshctl traffic: unexpected report {report}")
    return {"rps": report["rps"], "wall_s": wall, "p50_ms": report["latency_ms"]["p50"],
            "p99_ms": report["latency_ms"]["p99"]}


def run_hey(url: str, n: int) -> dict[str, float]:
    argv = [require("hey"), "-n", str(n), "-c", str(CONNECTIONS), url]
    t0 = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    m = re.search(r"Requests/sec:\s+([\d.]+)", res.stdout)
    if m is None:
        raise RuntimeError(f"hey {url} failed: {res.stdout} {res.stderr}")
    lat = dict(re.findall(r"^\s+(50|99)%+ in ([\d.]+) secs", res.stdout, re.M))
    return {"rps": float(m.group(1)), "wall_s": wall,
            "p50_ms": float(lat.get("50", "nan")) * 1000, "p99_ms": float(lat.get("99", "nan")) * 1000}


def _summary(rs: list[dict[str, float]]) -> dict[str, float]:
    out = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
    out["rps_min"] = min(r["rps"] for r in rs)
    out["rps_max"] = max(r["rps"] for r in rs)
    return out


def measure(n: int = 50_000, reps: int = 3, wrk_s: float = 3) -> dict:
    workdir = temp_workdir()
    home = workdir / "home"
    backend = nginx(workdir, *BACKEND)
    url = f"http://{BACKEND[0]}:{BACKEND[1]}/"
    samples: dict[str, list[dict[str, float]]] = {"traffic": [], "hey": [], "wrk": []}
    try:
        backend.start()
        run_traffic(url, min(n, 2000), home)  # warm up: page cache, imports
        run_hey(url, min(n, 2000))
        for _ in range(reps):
            samples["traffic"].append(run_traffic(url, n, home))
            samples["hey"].append(run_hey(url, n))
            samples["wrk"].append(run_wrk(url, wrk_s, CONNECTIONS))
    finally:
        backend.stop()
    out: dict = {name: _summary(rs) for name, rs in samples.items()}
    out["n"] = n
    out["reps"] = reps
    out["traffic_vs_hey"] = out["traffic"]["rps"] / out["hey"]["rps"]
    out["traffic_vs_wrk"] = out["traffic"]["rps"] / out["wrk"]["rps"]
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    res = measure(n, reps)
    print(f"nginx on {BACKEND[0]}:{BACKEND[1]}, -c {CONNECTIONS}, n={n}, {reps} reps (medians, min-max)")
    for name in ("traffic", "hey", "wrk"):
        r = res[name]
        print(f"{name:<8} {r['rps']:>9.0f} rps ({r['rps_min']:.0f}-{r['rps_max']:.0f})  "
              f"p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms")
    verdict = "ok" if res["traffic_vs_hey"] >= 2 else "below goal"
    print(f"traffic / hey = x{res['traffic_vs_hey']:.2f} (goal >= 2: {verdict}); "
          f"traffic / wrk = x{res['traffic_vs_wrk']:.2f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
