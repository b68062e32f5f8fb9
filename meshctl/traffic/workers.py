"""Spreading one load run over several processes, one event loop each.

A single Python event loop tops out around one core. For big runs ``meshctl
traffic`` forks workers, gives each an equal share of the connections,
requests and rate, and merges their results (the latency histograms merge
exactly: same buckets). The target of a local run (127.0.0.0/8, ::1) shares
this machine's cores, so by default the workers take half of them: on 2 cores
one worker beside nginx's one worker did 137k requests/s where two did 97k
(bench/NOTES.md, "Load generator (issue 18)").
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection

from meshctl.parent_death import die_with_parent
from meshctl.traffic.engine import Engine, LoadSpec, Results
from pods.addressing import is_loopback
from pods.runloop import run as run_loop

#: Below this many requests (and without --duration) one process is quicker: forking costs more than it saves.
MIN_REQUESTS_TO_FORK = 10_000


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def auto_workers(spec: LoadSpec, cores: int | None = None) -> int:
    if spec.concurrency < 2 or (spec.n is not None and spec.n < MIN_REQUESTS_TO_FORK and spec.rate is None):
        return 1
    cores = usable_cores() if cores is None else cores
    if all(is_loopback(ip) for ip, _ in spec.targets):
        cores //= 2  # the target runs here too: every core we take is one it does not get
    return max(1, min(cores, spec.concurrency, 8))


def split(spec: LoadSpec, workers: int) -> list[LoadSpec]:
    def share(total: int, i: int) -> int:
        return total // workers + (1 if i < total % workers else 0)

    out = []
    for i in range(workers):
        out.append(replace(spec, concurrency=max(1, share(spec.concurrency, i)),
                           n=None if spec.n is None else share(spec.n, i),
                           rate=None if spec.rate is None else spec.rate / workers))
    return [s for s in out if s.n is None or s.n > 0]


def _child(spec: LoadSpec, slot: int, counts: "multiprocessing.Array", conn: Connection,  # noqa: UP037
           classify: Callable[[int, bytes], tuple[str, str]], parent: int) -> None:
    die_with_parent(parent)  # a killed `meshctl traffic` must not leave load running behind it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when a run is interrupted

    async def main() -> Results:
        engine = Engine(spec, classify)

        async def report_progress() -> None:
            while True:
                counts[slot] = engine.requests_done()
                await asyncio.sleep(0.1)

        task = asyncio.get_running_loop().create_task(report_progress())
        try:
            return await engine.run()
        finally:
            task.cancel()

    results = run_loop(main())
    conn.send(results)
    conn.close()


def run_workers(spec: LoadSpec, workers: int, classify: Callable[[int, bytes], tuple[str, str]],
                on_progress: Callable[[int], None] | None = None) -> Results:
    ctx = multiprocessing.get_context("fork")
    shares = split(spec, workers)
    counts = ctx.Array("q", len(shares), lock=False)
    procs, pipes = [], []
    for i, s in enumerate(shares):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, args=(s, i, counts, child, classify, os.getpid()), daemon=True)
        p.start()
        child.close()
        procs.append(p)
        pipes.append(parent)
    results: list[Results] = []
    try:
        pending = dict(enumerate(pipes))
        while pending:
            for i, pipe in list(pending.items()):
                if pipe.poll(0.05 / len(pending)):
                    try:
                        results.append(pipe.recv())
                    except EOFError:
                        raise RuntimeError(f"load worker {i} died (exit code {procs[i].exitcode})") from None
                    del pending[i]
            if on_progress is not None:
                on_progress(sum(counts))
    except BaseException:
        for p in procs:
            if p.is_alive():
                p.kill()
        raise
    finally:
        for p in procs:
            p.join(5)
    return merge(results)


def merge(parts: list[Results]) -> Results:
    out = Results()
    out.hist.merge(r.hist for r in parts)
    for r in parts:
        out.status.update(r.status)
        out.errors.update(r.errors)
        out.groups.update(r.groups)
    out.started = min((r.started for r in parts), default=time.perf_counter())
    out.finished = max((r.finished for r in parts), default=out.started)
    return out
