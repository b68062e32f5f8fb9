"""Running wrk and reading its report (requests/s and latency percentiles)."""

from __future__ import annotations

import re
import subprocess

from bench.peers import require

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(url: str, duration_s: float = 5, connections: int = 10, threads: int = 1,
            pin: str | None = None) -> dict[str, float]:
    """One wrk run; ``pin``: a CPU list for taskset (wrk kept off the cores a measured proxy uses)."""
    argv = [require("wrk"), f"-t{threads}", f"-c{connections}", f"-d{int(duration_s)}s", "--latency", url]
    if pin:
        argv = ["taskset", "-c", pin, *argv]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 30)
    out = res.stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m is None:
        raise RuntimeError(f"wrk {url} failed: {out} {res.stderr}")
    rps = float(m.group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    lat = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "requests": total, "p50_ms": _ms(lat.get("50", "")), "p99_ms": _ms(lat.get("99", "")),
            "non_2xx": int(errors.group(1)) if errors else 0}
