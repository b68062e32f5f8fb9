"""Start-up and footprint: `up -d` to all-ready (seed demo, 50 pods with sidecars = 100 processes),
the supervisor's idle CPU with 100 processes, and the RSS of a sidecar, a demo service and the supervisor."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def _meshctl(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESHCTL_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "meshctl", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300, check=check)


def fifty_pods(path: Path, pods: int = 50) -> Path:
    """Demo service B behind a short-form sidecar in every pod: 2 processes each."""
    lines = ["name: fifty", "pods:"]
    for i in range(pods):
        lines += [f"  p{i}:",
                  "    sidecar: {ingress: {port: 8080, to: 8000}, admin: {port: 9901}, access_log: false}",
                  "    service:",
                  "      command: [python, -m, services.b]",
                  "      env: {ERROR_RATE: '0', SERVICE_HOST: 127.0.0.1, SERVICE_PORT: '8000', METRICS_PORT: '8081'}",
                  "      ready: {tcp: 8000}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def time_up(home: Path, topology: Path, project: str) -> float:
    t0 = time.monotonic()
    _meshctl(home, "up", str(topology), "-d", "-p", project, "--wait-timeout", "120")
    return time.monotonic() - t0


def _status(home: Path, project: str) -> dict:
    return json.loads(_meshctl(home, "ps", "-p", project, "-o", "json").stdout)


def measure(seed_reps: int = 3) -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix="mbu"))
    out: dict[str, float] = {}
    # The seed's port 80 needs root; its unprivileged variant differs only in ports (see `make demo-sidecar`).
    seed = ROOT / ("examples/seed/sidecar.yaml" if os.geteuid() == 0 else "examples/seed/sidecar-unprivileged.yaml")
    times = []
    try:
        for _ in range(seed_reps):
            times.append(time_up(home, seed, "bseed"))
            st = _status(home, "bseed")
            _meshctl(home, "down", "-p", "bseed")
        out["seed_up_s"] = statistics.median(times)
        out["seed_up_min_s"], out["seed_up_max_s"] = min(times), max(times)
        for p in st["processes"]:
            if p["role"] == "sidecar":
                out["sidecar_rss_mb"] = p["rss_bytes"] / 2**20
            elif p["pod"] == "b":
                out["service_rss_mb"] = p["rss_bytes"] / 2**20
        topo = fifty_pods(home / "fifty.yaml")
        fifty = []
        for _ in range(max(1, seed_reps - 1)):  # a fresh start each time; the last run stays up for the idle check
            if fifty:
                _meshctl(home, "down", "-p", "fifty")
            fifty.append(time_up(home, topo, "fifty"))
        out["fifty_up_s"] = statistics.median(fifty)
        out["fifty_up_min_s"], out["fifty_up_max_s"] = min(fifty), max(fifty)
        st = _status(home, "fifty")
        out["fifty_processes"] = len(st["processes"])
        sup = psutil.Process(st["supervisor"]["pid"])
        out["supervisor_rss_mb"] = sup.memory_info().rss / 2**20
        time.sleep(2)  # let start-up settle, then measure a quiet minute's slice
        t0, c0 = time.monotonic(), sum(sup.cpu_times()[:2])
        time.sleep(10)
        out["supervisor_idle_cpu_pct"] = 100 * (sum(sup.cpu_times()[:2]) - c0) / (time.monotonic() - t0)
    finally:
        for project in ("bseed", "fifty"):
            _meshctl(home, "down", "-p", project, check=False)
    return out


def main() -> None:
    res = measure()
    for k, v in res.items():
        print(f"{k:<26} {v:.2f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
