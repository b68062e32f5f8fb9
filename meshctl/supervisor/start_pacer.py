"""How many of the mesh's processes may be busy starting at once: one more than there are cores.

A start is a burst of CPU (an interpreter's imports, a JIT's warm-up). Started all together, a hundred of them
only take turns on the cores, each with cold caches, and each spends more CPU on the same start: on 2 cores the
demo service took 150 ms of CPU alone and ~185 ms among 100 starting processes, our sidecar 80 vs ~95 ms. So
a process is admitted to start when fewer than ``limit`` of the mesh's started-but-not-ready processes are
running or runnable (state R in ``/proc/PID/stat``); the others wait their turn, services before sidecars (a
sidecar that is up waits for its service: that pod is ready sooner). A process stops counting once it is ready
or exited, once it has been seen asleep for ``SETTLE_S`` (its start is waiting on something else: it is not
using a CPU), or ``MAX_START_S`` after its spawn (a long start, or a busy loop, never holds the others up).

Only the mesh's own processes count, never the machine's other load, so a busy machine slows a mesh's start
no more than it would have anyway.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

#: While processes wait to be admitted, how often the starting ones are looked at.
INTERVAL_S = 0.005
#: Asleep at two looks this far apart: its start's CPU burst is over (for now).
SETTLE_S = 0.01
#: A process counts at most this long after its spawn.
MAX_START_S = 2.0


def default_limit() -> int:
    """One more than the usable cores: a core does not wait while the next process is spawned."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return cores + 1


def running(pid: int) -> bool:
    """Whether ``pid`` is running or waiting for a CPU (False: asleep, or gone)."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return False
    try:
        stat = os.read(fd, 1024)
    except OSError:
        return False
    finally:
        os.close(fd)
    return stat[stat.rfind(b")") + 2:][:1] == b"R"


@dataclass(eq=False)
class _Start:
    pid: int
    since: float = field(default_factory=time.monotonic)
    asleep_since: float | None = None


class StartPacer:
    def __init__(self, limit: int | None = None, running: Callable[[int], bool] = running) -> None:
        self.limit = max(1, limit if limit is not None else default_limit())
        self._running = running
        self._queue: list[tuple[int, int, object, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._admitted: set[object] = set()  # admitted, not spawned yet: they will be busy in a moment
        self._starting: dict[object, _Start] = {}
        self._timer: asyncio.TimerHandle | None = None

    def busy(self) -> int:
        """The processes that count against the limit now."""
        now = time.monotonic()
        n = len(self._admitted)
        for owner, start in list(self._starting.items()):
            if now - start.since >= MAX_START_S:
                del self._starting[owner]
            elif self._running(start.pid):
                start.asleep_since = None
                n += 1
            elif start.asleep_since is None:
                start.asleep_since = now
            elif now - start.asleep_since >= SETTLE_S:
                del self._starting[owner]
        return n

    async def admit(self, owner: object, priority: int = 0) -> None:
        """Returns when ``owner`` may be spawned (then ``started`` or ``forget``); lower priorities first."""
        if not self._queue and self.busy() < self.limit:
            self._admitted.add(owner)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._queue, (priority, next(self._seq), owner, fut))
        self._arm()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # admitted as it was cancelled: pass the turn on
                self.forget(owner)
            raise

    def started(self, owner: object, pid: int | None) -> None:
        """``owner`` was spawned as ``pid`` (None: it could not be): watched until its start is over."""
        self._admitted.discard(owner)
        if pid is not None:
            self._starting[owner] = _Start(pid)
        self._pump()

    def forget(self, owner: object) -> None:
        """``owner`` is ready, exited, or gave up its turn."""
        self._admitted.discard(owner)
        self._starting.pop(owner, None)
        self._pump()

    def _arm(self) -> None:
        if self._timer is None and self._queue:
            self._timer = asyncio.get_running_loop().call_later(INTERVAL_S, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._pump()
        self._arm()

    def _pump(self) -> None:
        while self._queue and self._queue[0][3].done():  # cancelled waiters
            heapq.heappop(self._queue)
        if not self._queue:
            return
        busy = self.busy()
        while self._queue and busy < self.limit:
            _, _, owner, fut = heapq.heappop(self._queue)
            if fut.done():
                continue
            self._admitted.add(owner)
            busy += 1
            fut.set_result(None)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
