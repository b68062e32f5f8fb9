"""Drawing ``meshctl stats``: two rich tables, live in the alternate screen or printed once.

``-`` stands wherever there is nothing to measure (no traffic yet, no
sidecar): a zero would be a claim. Pods that are down or crash-looping are
drawn in red.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import termios
import tty
from collections.abc import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from meshctl.fault import describe
from meshctl.observe.collector import Collector, Snapshot


def _num(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _pct(v: float | None) -> Text:
    if v is None:
        return Text("-")
    style = "green" if v >= 0.99 else "yellow" if v >= 0.95 else "red"
    return Text(f"{100 * v:.2f}%", style=style)


def _mem(b: int | None) -> str:
    return "-" if b is None else f"{b / 1024 / 1024:.1f}Mi"


def _faults(faults: list[dict]) -> Text:
    """Live faults (meshctl fault) in one cell: ``abort 10% (503), delay 100ms@5%``; ``-`` without."""
    if not faults:
        return Text("-")
    return Text("; ".join((f"{f['cluster']}: " if "cluster" in f else "") + describe(f) for f in faults),
                style="bold magenta")


def render(snap: Snapshot) -> Group:
    pods = Table(title=f"mesh {snap.mesh} — pods (inbound, last {snap.window_s:g}s)", box=None,
                 header_style="bold", title_justify="left")
    pod_faults = any(p.faults for p in snap.pods)  # the column only while an ingress fault is on
    for col in ("POD", "STATUS", "READY", "RESTARTS", "CPU %", "MEM", "SUCCESS", "RPS", "P50", "P95", "P99",
                "RETRIES/s", "5XX/s", *(("FAULTS",) if pod_faults else ())):
        pods.add_column(col, justify="left" if col in ("POD", "STATUS", "FAULTS") else "right")
    for p in snap.pods:
        bad = p.status.startswith(("crashloop", "down"))
        status = Text(p.status, style="bold red" if bad else ("yellow" if p.status != "running" else "green"))
        pods.add_row(Text(p.pod, style="bold red" if bad else ""), status, p.ready, str(p.restarts),
                     _num(p.cpu_percent), _mem(p.rss_bytes), _pct(p.success), _num(p.rps),
                     _num(p.p50_ms, "{:.2f}"), _num(p.p95_ms, "{:.2f}"), _num(p.p99_ms, "{:.2f}"),
                     _num(p.retries_per_s), _num(p.upstream_5xx_per_s),
                     *((_faults(p.faults),) if pod_faults else ()))
    edges = Table(title="edges (outbound through sidecars)", box=None, header_style="bold", title_justify="left")
    for col in ("FROM", "TO", "RPS", "SUCCESS", "ACTUAL", "RETRIES/s", "TIMEOUTS/s", "P99", "FAULTS"):
        edges.add_column(col, justify="left" if col in ("FROM", "TO", "FAULTS") else "right")
    for e in snap.edges:
        edges.add_row(e.source, e.cluster, _num(e.rps), _pct(e.success), _pct(e.actual_success),
                      _num(e.retries_per_s), _num(e.timeouts_per_s), _num(e.p99_ms, "{:.2f}"), _faults(e.faults))
    if not snap.edges:
        edges.add_row("-", "-", "-", "-", "-", "-", "-", "-", "-")
    footer = Text("SUCCESS: after retries (what callers saw); ACTUAL: per upstream attempt. q quits.",
                  style="dim")
    return Group(pods, Text(""), edges, Text(""), footer)


async def _collect_once(collector: Collector, interval: float) -> Snapshot:
    await collector.poll()
    await asyncio.sleep(interval)
    await collector.poll()
    return collector.snapshot()


async def once(collector: Collector, interval: float, as_json: bool) -> None:
    async with collector:
        snap = await _collect_once(collector, interval)
    _emit(snap, as_json)


async def watch(collector: Collector, interval: float, as_json: bool, count: int | None) -> None:
    """Not a terminal: one snapshot per interval, as plain tables or JSON lines."""
    async with collector:
        await collector.poll()
        n = 0
        while count is None or n < count:
            await asyncio.sleep(interval)
            await collector.poll()
            _emit(collector.snapshot(), as_json)
            n += 1


def _emit(snap: Snapshot, as_json: bool) -> None:
    if as_json:
        print(json.dumps(snap.to_json()), flush=True)
    else:
        Console(width=160 if not sys.stdout.isatty() else None).print(render(snap))


class _Keys:
    """cbreak mode on stdin so a single ``q`` quits; the terminal is restored whatever happens."""

    def __init__(self, on_quit: Callable[[], None]) -> None:
        self.on_quit = on_quit
        self.fd = sys.stdin.fileno()
        self.saved: list | None = None

    def __enter__(self) -> _Keys:
        if os.isatty(self.fd):
            self.saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
            asyncio.get_running_loop().add_reader(self.fd, self._read)
        return self

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 64)
        except OSError:
            return
        if not data or b"q" in data.lower() or b"\x03" in data:
            self.on_quit()

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            asyncio.get_running_loop().remove_reader(self.fd)
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)


async def live(collector: Collector, interval: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with collector:
        await collector.poll()
        with _Keys(stop.set), Live(render(collector.snapshot()), screen=True, auto_refresh=False,
                                   transient=True) as view:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), interval)
                except TimeoutError:
                    pass
                if stop.is_set():
                    break
                await collector.poll()
                view.update(render(collector.snapshot()), refresh=True)
