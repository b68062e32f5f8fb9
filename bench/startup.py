"""Start-up and footprint: `up -d` to all-ready (the seed's direct and sidecar demos, 50 pods with sidecars =
100 processes), the CPU each process took to get there, the supervisor's idle CPU with 100 processes, and the RSS
of a sidecar, a demo service and the supervisor."""

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


def _meshctl(home: Path, *args: str, check: bool = True,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **(env or {}), "MESHCTL_HOME": str(home)}
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


def time_up(home: Path, topology: Path, project: str, env: dict[str, str] | None = None) -> float:
    t0 = time.monotonic()
    _meshctl(home, "up", str(topology), "-d", "-p", project, "--wait-timeout", "120", env=env)
    return time.monotonic() - t0


def _status(home: Path, project: str) -> dict:
    return json.loads(_meshctl(home, "ps", "-p", project, "-o", "json").stdout)


def cpu_ms(pid: int) -> float:
    """CPU time a process has used so far (on a CPU, from /proc/PID/schedstat: nanoseconds, not clock ticks)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e6
    except (OSError, ValueError, IndexError):
        t = psutil.Process(pid).cpu_times()
        return (t.user + t.system) * 1000


def cpu_by_role(status: dict) -> dict[str, float]:
    """The median CPU per process of each role (sidecar, service) and the supervisor's, in ms, right after up."""
    roles: dict[str, list[float]] = {}
    for p in status["processes"]:
        if p["pid"]:
            roles.setdefault(p["role"], []).append(cpu_ms(p["pid"]))
    out = {role: statistics.median(v) for role, v in roles.items()}
    out["supervisor"] = cpu_ms(status["supervisor"]["pid"])
    return out


def measure(seed_reps: int = 3) -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix="mbu"))
    out: dict[str, float] = {}
    # The seed's port 80 needs root; its unprivileged variants differ only in ports (see `make demo` and
    # `make demo-sidecar`).
    root = os.geteuid() == 0
    seed = ROOT / ("examples/seed/sidecar.yaml" if root else "examples/seed/sidecar-unprivileged.yaml")
    direct, direct_env = ROOT / "examples/seed/direct.yaml", ({} if root else {"PORT": "8000"})
    times, direct_times, direct_cpu = [], [], []
    try:
        for _ in range(seed_reps):  # the two demos interleaved: both see the machine as it is
            direct_times.append(time_up(home, direct, "bdirect", direct_env))
            direct_cpu.append(cpu_by_role(_status(home, "bdirect")))
            _meshctl(home, "down", "-p", "bdirect")
            times.append(time_up(home, seed, "bseed"))
            st = _status(home, "bseed")
            _meshctl(home, "down", "-p", "bseed")
        out["seed_direct_up_s"] = statistics.median(direct_times)
        out["seed_direct_up_min_s"], out["seed_direct_up_max_s"] = min(direct_times), max(direct_times)
        out["seed_direct_service_cpu_ms"] = statistics.median(c["service"] for c in direct_cpu)
        out["seed_direct_supervisor_cpu_ms"] = statistics.median(c["supervisor"] for c in direct_cpu)
        out["seed_up_s"] = statistics.median(times)
        out["seed_up_min_s"], out["seed_up_max_s"] = min(times), max(times)
        for p in st["processes"]:
            if p["role"] == "sidecar":
                out["sidecar_rss_mb"] = p["rss_bytes"] / 2**20
            elif p["pod"] == "b":
                out["service_rss_mb"] = p["rss_bytes"] / 2**20
        topo = fifty_pods(home / "fifty.yaml")
        fifty, fifty_cpu = [], []
        for _ in range(seed_reps):  # a fresh start each time; the last run stays up for the idle check
            if fifty:
                _meshctl(home, "down", "-p", "fifty")
            fifty.append(time_up(home, topo, "fifty"))
            st = _status(home, "fifty")
            fifty_cpu.append(cpu_by_role(st))
        out["fifty_up_s"] = statistics.median(fifty)
        out["fifty_up_min_s"], out["fifty_up_max_s"] = min(fifty), max(fifty)
        # CPU to get there, per process (medians of the runs' medians): what 100 starts cost the 2 cores.
        for role in ("sidecar", "service", "supervisor"):
            out[f"fifty_{role}_cpu_ms"] = statistics.median(c[role] for c in fifty_cpu)
        out["fifty_processes"] = len(st["processes"])
        sup = psutil.Process(st["supervisor"]["pid"])
        out["supervisor_rss_mb"] = sup.memory_info().rss / 2**20
        time.sleep(2)  # let start-up settle, then measure a quiet minute's slice
        t0, c0 = time.monotonic(), sum(sup.cpu_times()[:2])
        time.sleep(10)
        out["supervisor_idle_cpu_pct"] = 100 * (sum(sup.cpu_times()[:2]) - c0) / (time.monotonic() - t0)
    finally:
        for project in ("bdirect", "bseed", "fifty"):
            _meshctl(home, "down", "-p", project, check=False)
    return out


def main() -> None:
    res = measure()
    for k, v in res.items():
        print(f"{k:<26} {v:.2f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
