"""``meshctl traffic``: drive load at a pod or URL and report it the way the seed (and hey) would.

The seed measures with ``curl ... | sort | uniq -w 24 -c``; the report starts
with those groups — status + body with volatile numbers masked, so "nounce
1008262846" and "nounce 3494557023" fall into one group — then adds what hey
and fortio give: status and error breakdown, rate, latency percentiles and a
small histogram.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshctl.traffic.engine import Engine, LoadSpec, Results
from pods.runloop import run as run_loop

_VOLATILE = re.compile(
    r"\b(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|0x[0-9a-f]+|[0-9a-f]*\d[0-9a-f]{7,}|\d{4,})\b",
    re.I)
BODY_WIDTH = 100
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99), ("p999", 0.999))


def mask_body(body: str) -> str:
    """One line, with numbers and ids that change per request replaced by <n>."""
    text = " ".join(body.split())
    text = _VOLATILE.sub("<n>", text)
    return text if len(text) <= BODY_WIDTH else text[: BODY_WIDTH - 1] + "…"


def classify(status: int, body: bytes) -> tuple[str, str]:
    return str(status), mask_body(body.decode("utf-8", "replace"))


def build_request(method: str, host: str, path: str, headers: Mapping[str, str], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    names = {k.lower() for k in headers}
    if "user-agent" not in names:
        lines.append("User-Agent: meshctl-traffic/0.1")
    if "accept" not in names:
        lines.append("Accept: */*")
    lines.extend(f"{k}: {v}" for k, v in headers.items())
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Report:
    target: str
    results: Results
    model: str

    @property
    def requests(self) -> int:
        return self.results.requests

    @property
    def duration_s(self) -> float:
        return max(self.results.finished - self.results.started, 1e-9)

    @property
    def success_ratio(self) -> float:
        ok = sum(n for code, n in self.results.status.items() if 200 <= code < 400)
        return ok / self.requests if self.requests else 0.0

    def latency_ms(self) -> dict[str, float | None]:
        h = self.results.hist

        def ms(v: float | None) -> float | None:
            return None if v is None or v == float("inf") else round(v * 1000, 3)

        out = {"min": ms(h.min if h.count else None), "mean": ms(h.mean)}
        out.update({name: ms(h.quantile(q)) for name, q in QUANTILES})
        out["max"] = ms(h.max if h.count else None)
        return out

    def to_json(self) -> dict[str, Any]:
        r = self.results
        return {
            "target": self.target, "model": self.model, "requests": self.requests,
            "duration_s": round(self.duration_s, 4), "rps": round(self.requests / self.duration_s, 1),
            "success_ratio": round(self.success_ratio, 4),
            "status": {str(k): v for k, v in sorted(r.status.items())},
            "errors": dict(sorted(r.errors.items())),
            "latency_ms": self.latency_ms(),
            "groups": [{"count": n, "status": s, "body": b} for (s, b), n in r.groups.most_common()],
        }

    def render(self) -> str:
        r = self.results
        n = max(self.requests, 1)
        out = [f"{self.requests} requests to {self.target} in {self.duration_s:.2f}s "
               f"({self.requests / self.duration_s:.0f} rps, {self.model})", ""]
        out.append(f"{'count':>8} {'%':>6}  {'status':<7} body")
        for (status, body), count in r.groups.most_common():
            out.append(f"{count:>8} {100 * count / n:>5.1f}%  {status:<7} {body}")
        out += ["", "Status codes:"]
        out += [f"  {code}: {count} ({100 * count / n:.1f}%)" for code, count in sorted(r.status.items())] or ["  -"]
        out += ["", "Errors:"]
        out += [f"  {kind}: {count} ({100 * count / n:.1f}%)" for kind, count in sorted(r.errors.items())] or ["  none"]
        out += ["", f"Success ratio: {100 * self.success_ratio:.2f}%", "", "Latency (ms):"]
        lat = self.latency_ms()
        out.append("  " + "  ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in lat.items()))
        bars = r.hist.bars(10)
        if bars:
            out += ["", "Histogram (ms):"]
            top = max(c for _, _, c in bars) or 1
            for lo, hi, c in bars:
                out.append(f"  {lo * 1000:>9.3f} – {hi * 1000:>9.3f} |{'■' * round(40 * c / top):<40}| {c}")
        return "\n".join(out)


def _progress_bar() -> Any:
    """A rich progress bar on stderr (the report goes to stdout); only drawn on a TTY by the callers."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("[bold]traffic"), BarColumn(), TextColumn("{task.completed} requests"),
               TextColumn("{task.fields[rps]:.0f} rps"), TimeElapsedColumn()]
    return Progress(*columns, transient=True, console=Console(stderr=True))


def _model(spec: LoadSpec, workers: int = 1) -> str:
    model = "open model" if spec.rate else f"closed model, {spec.concurrency} connections"
    return model + (f", {workers} workers" if workers > 1 else "")


async def _progress(engine: Engine, total: int | None, duration: float | None) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    with _progress_bar() as progress:
        task = progress.add_task("load", total=total or None, rps=0.0)
        while not engine.done.done():
            done = engine.requests_done()
            elapsed = max(loop.time() - start, 1e-9)
            if total is None and duration:
                progress.update(task, total=int(duration * 10), completed=int(min(elapsed, duration) * 10),
                                rps=done / elapsed)
            else:
                progress.update(task, completed=done, rps=done / elapsed)
            await asyncio.sleep(0.1)


async def run(spec: LoadSpec, target: str, progress: bool = False) -> Report:
    engine = Engine(spec, classify)
    bar = asyncio.ensure_future(_progress(engine, spec.n, spec.duration_s)) if progress else None
    try:
        results = await engine.run()
    finally:
        if bar is not None:
            bar.cancel()
            try:
                await bar
            except asyncio.CancelledError:
                pass
    return Report(target, results, _model(spec))


def run_sync(spec: LoadSpec, target: str, progress: bool = False, workers: int = 1) -> Report:
    if workers > 1:
        return _run_forked(spec, target, progress, workers)
    return run_loop(run(spec, target, progress))


def _run_forked(spec: LoadSpec, target: str, progress: bool, workers: int) -> Report:
    from meshctl.traffic.workers import run_workers

    if not progress:
        return Report(target, run_workers(spec, workers, classify), _model(spec, workers))
    start = time.monotonic()
    with _progress_bar() as bar:
        task = bar.add_task("load", total=spec.n, rps=0.0)

        def update(done: int) -> None:
            bar.update(task, completed=done, rps=done / max(time.monotonic() - start, 1e-9))

        results = run_workers(spec, workers, classify, update)
    return Report(target, results, _model(spec, workers))


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()
