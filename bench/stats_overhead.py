"""Does watching cost throughput? The seed sidecar demo under closed-model load, with and without
`meshctl stats --watch` polling every second; interleaved repetitions, medians."""

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


def _load(env: dict[str, str], seconds: float, concurrency: int) -> float:
    out = subprocess.run([sys.executable, "-m", "meshctl", "traffic", "a", "-p", "bstats", "--duration",
                          f"{seconds}s", "-c", str(concurrency), "--json"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=seconds + 60, check=True).stdout
    return json.loads(out)["rps"]


def measure(seconds: float = 4, reps: int = 3, concurrency: int = 2) -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix="mbs"))
    env = _env(home)
    subprocess.run([sys.executable, "-m", "meshctl", "up", str(ROOT / "examples/seed/sidecar.yaml"), "-d", "-p",
                    "bstats"], capture_output=True, env=env, cwd=ROOT, timeout=120, check=True)
    quiet, watched = [], []
    try:
        _load(env, 1, concurrency)  # warm up
        for _ in range(reps):
            quiet.append(_load(env, seconds, concurrency))
            watcher = subprocess.Popen([sys.executable, "-m", "meshctl", "stats", "-p", "bstats", "--watch",
                                        "--interval", "1", "-o", "json"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
            try:
                watched.append(_load(env, seconds, concurrency))
            finally:
                watcher.terminate()
                watcher.wait(10)
    finally:
        subprocess.run([sys.executable, "-m", "meshctl", "down", "-p", "bstats"], capture_output=True, env=env,
                       cwd=ROOT, timeout=120)
    q, w = statistics.median(quiet), statistics.median(watched)
    return {"rps_without_stats": q, "rps_with_stats": w, "loss_pct": 100 * (q - w) / q}


def main() -> None:
    res = measure()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
