"""Benchmark: the seed's measuring loop (1000 sequential curls) versus ``meshctl traffic``.

Run as ``python -m bench.seed``. Starts ``examples/seed/direct.yaml`` with the
real CLI under a temporary MESHCTL_HOME, times ``up`` until ready, then sends
1000 requests to the published 127.0.0.1:8080 both ways and compares wall time
(process start-up included) and success ratio. Goal: traffic >= 20x faster.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.peers import require

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "benchseed"
URL = "127.0.0.1:8080"
OK_PREFIX = b"Service A: upstream responded"


def _meshctl(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshctl", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


def wait_port_free(ip: str, port: int, timeout: float = 60) -> None:
    """The seed publishes on 127.0.0.1:8080; another mesh (a test run, a demo) may hold it for a while."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((ip, port)) != 0:
                return
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {ip}:{port} is in use (another mesh?); stop it and run again")
        time.sleep(0.5)


def curl_loop(n: int) -> dict[str, float]:
    """The seed's ``for i in $(seq 1000); do curl --silent localhost:8080; done``."""
    curl = require("curl")
    ok = 0
    t0 = time.perf_counter()
    for _ in range(n):
        res = subprocess.run([curl, "--silent", "--max-time", "10", URL], capture_output=True, timeout=30)
        ok += res.stdout.startswith(OK_PREFIX)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "requests": n, "success_ratio": ok / n}


def traffic(env: dict[str, str], n: int) -> dict[str, float]:
    t0 = time.perf_counter()
    res = _meshctl(env, "traffic", "a", "--n", str(n), "-p", PROJECT, "--json")
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"meshctl traffic failed ({res.returncode}): {res.stderr}")
    report = json.loads(res.stdout)
    return {"wall_s": wall, "requests": report["requests"], "success_ratio": report["success_ratio"],
            "rps": report["rps"], "p50_ms": report["latency_ms"]["p50"], "p99_ms": report["latency_ms"]["p99"]}


def measure(n: int = 1000, reps: int = 3) -> dict:
    """The curl loop once (it is the slow side), `meshctl traffic` ``reps`` times around it; medians."""
    home = Path(tempfile.mkdtemp(prefix="mbseed"))
    env = {**os.environ, "MESHCTL_HOME": str(home / "h"), "PYTHONPATH": str(ROOT)}
    if os.geteuid() != 0:
        env["PORT"] = "8000"  # the seed's port 80 needs root (see `make demo`)
    wait_port_free("127.0.0.1", 8080)
    try:
        t0 = time.perf_counter()
        up = _meshctl(env, "up", str(ROOT / "examples/seed/direct.yaml"), "-d", "-p", PROJECT)
        up_s = time.perf_counter() - t0
        if up.returncode != 0:
            raise RuntimeError(f"meshctl up failed ({up.returncode}): {up.stdout} {up.stderr}")
        loads = [traffic(env, n)]
        curl = curl_loop(n)
        loads += [traffic(env, n) for _ in range(reps - 1)]
        loads.sort(key=lambda r: r["wall_s"])
        load = loads[len(loads) // 2]
        load["wall_min_s"], load["wall_max_s"] = loads[0]["wall_s"], loads[-1]["wall_s"]
    finally:
        _meshctl(env, "down", "-p", PROJECT, timeout=60)
        shutil.rmtree(home, ignore_errors=True)
    return {"up_to_ready_s": up_s, "curl": curl, "traffic": load, "speedup": curl["wall_s"] / load["wall_s"]}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    res = measure(n)
    c, t = res["curl"], res["traffic"]
    print(f"up -d to ready: {res['up_to_ready_s']:.2f} s")
    print(f"curl loop      {c['wall_s']:>7.2f} s  success {100 * c['success_ratio']:.1f}%  ({n} processes)")
    print(f"meshctl traffic{t['wall_s']:>7.2f} s  success {100 * t['success_ratio']:.1f}%  "
          f"({t['rps']:.0f} rps, p50 {t['p50_ms']} ms, p99 {t['p99_ms']} ms)")
    verdict = "ok" if res["speedup"] >= 20 else "below goal"
    print(f"speedup x{res['speedup']:.1f} (goal >= 20: {verdict})")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
