"""Does watching cost throughput? The seed sidecar demo under an open-model load below 1k rps (800 rps), with
and without `meshctl stats --watch` polling every second; interleaved repetitions, medians of the delivered
rate (and of p50 latency, for information).

Open model on purpose: a closed-model run of this demo is latency-bound (retry backoff sleeps), so its
rate measures random backoff more than capacity."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "MESHCTL_HOME": str(home)}


def _load(env: dict[str, str], seconds: float, rate: float) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-m", "meshctl", "traffic", "a", "-p", "bstats", "--duration",
                          f"{seconds}s", "--rate", str(rate), "-c", "50", "--workers", "1", "--json"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=seconds + 60, check=True).stdout
    report = json.loads(out)
    return report["rps"], report["latency_ms"]["p50"]


def measure(seconds: float = 4, reps: int = 3, rate: float = 800) -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix="mbs"))
    env = _env(home)
    subprocess.run([sys.executable, "-m", "meshctl", "up", str(ROOT / "examples/seed/sidecar.yaml"), "-d", "-p",
                    "bstats"], capture_output=True, env=env, cwd=ROOT, timeout=120, check=True)
    quiet: list[tuple[float, float]] = []
    watched: list[tuple[float, float]] = []
    try:
        _load(env, 1, rate)  # warm up
        for _ in range(reps):
            quiet.append(_load(env, seconds, rate))
            watcher = subprocess.Popen([sys.executable, "-m", "meshctl", "stats", "-p", "bstats", "--watch",
                                        "--interval", "1", "-o", "json"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
            try:
                watched.append(_load(env, seconds, rate))
            finally:
                watcher.terminate()
                watcher.wait(10)
    finally:
        subprocess.run([sys.executable, "-m", "meshctl", "down", "-p", "bstats"], capture_output=True, env=env,
                       cwd=ROOT, timeout=120)
    q, w = statistics.median(r for r, _ in quiet), statistics.median(r for r, _ in watched)
    return {"rate": rate, "rps_without_stats": q, "rps_with_stats": w, "loss_pct": 100 * (q - w) / q,
            "p50_ms_without_stats": statistics.median(p for _, p in quiet),
            "p50_ms_with_stats": statistics.median(p for _, p in watched)}


def main() -> None:
    res = measure()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
