"""The supervisor's start pacer: how many of a mesh's processes may be busy starting at once."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from meshctl.supervisor import start_pacer
from meshctl.supervisor.start_pacer import StartPacer, running


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


class Fake:
    """pid -> running? (what /proc/PID/stat would say)."""

    def __init__(self) -> None:
        self.state: dict[int, bool] = {}

    def __call__(self, pid: int) -> bool:
        return self.state.get(pid, False)


def test_at_most_limit_running_starts_and_services_first():
    fake = Fake()

    async def main() -> list[str]:
        pacer = StartPacer(limit=2, running=fake)
        order: list[str] = []

        async def start(name: str, pid: int, priority: int) -> None:
            await pacer.admit(name, priority)
            order.append(name)
            fake.state[pid] = True
            pacer.started(name, pid)

        await start("a", 1, 1)
        await start("b", 2, 1)
        waiting = [asyncio.ensure_future(start("sidecar", 3, 1)), asyncio.ensure_future(start("service", 4, 0))]
        await asyncio.sleep(0)
        assert order == ["a", "b"] and pacer.busy() == 2
        pacer.forget("a")  # ready: the service goes first, though it asked last
        await waiting[1]
        assert order == ["a", "b", "service"] and not waiting[0].done()
        fake.state[2] = False  # b's start is over (asleep): it stops counting, the sidecar goes
        await waiting[0]
        assert order == ["a", "b", "service", "sidecar"]
        pacer.close()
        return order

    run(main())


def test_a_long_start_stops_counting(monkeypatch):
    monkeypatch.setattr(start_pacer, "MAX_START_S", 0.05)
    fake = Fake()

    async def main() -> None:
        pacer = StartPacer(limit=1, running=fake)
        await pacer.admit("busy")
        fake.state[1] = True  # never asleep, never ready: a busy loop
        pacer.started("busy", 1)
        await pacer.admit("next")  # admitted once MAX_START_S has passed
        assert pacer.busy() == 1  # "next" (admitted, not spawned yet)
        pacer.close()

    run(main())


def test_a_cancelled_wait_gives_nothing_away():
    fake = Fake()

    async def main() -> None:
        pacer = StartPacer(limit=1, running=fake)
        await pacer.admit("first")
        waiter = asyncio.ensure_future(pacer.admit("stopped"))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        pacer.started("first", None)  # could not be spawned: its turn is over
        await pacer.admit("third")  # the cancelled one took no turn
        assert pacer.busy() == 1
        pacer.forget("third")
        assert pacer.busy() == 0
        pacer.close()

    run(main())


def test_running_reads_the_process_state():
    assert running(os.getpid())  # reading our own stat: we are on a CPU
    sleeper = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        deadline = asyncio.run(_until(lambda: not running(sleeper.pid)))
        assert deadline, "a process blocked on its stdin should be asleep"
    finally:
        assert sleeper.stdin is not None
        sleeper.stdin.close()
        sleeper.wait(10)
    assert not running(sleeper.pid)  # gone


async def _until(check, timeout: float = 10.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if check():
            return True
        await asyncio.sleep(0.01)
    return False
