"""Start order between pods (``depends_on``), as compose and process-compose do it.

A pod that depends on others starts once every replica of each of them meets its condition: ``started``
(the service process has been started), ``ready`` (its readiness probe passes) or ``completed`` (it exited 0,
for one-shot jobs). Only the first start waits: a dependency that dies later does not stop its dependents
(compose does the same), and ``meshctl restart`` starts at once.

The supervisor owns one ``Pulse``, fired at every change of any process; a ``StartGate`` re-checks its
conditions at each pulse. Nothing polls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from meshctl.supervisor.states import completed
from pods.topology import Dependency

if TYPE_CHECKING:
    from meshctl.supervisor.process import ManagedProcess


class Pulse:
    """Wakes every waiter at the next change."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self) -> None:
        await self._event.wait()


def condition_met(condition: str, services: Sequence[ManagedProcess]) -> bool:
    """Whether every one of a pod's service processes meets ``condition``."""
    if condition == "started":
        return all(p.started_at is not None for p in services)
    if condition == "ready":
        return all(p.ready for p in services)
    return all(completed(p.state, p.last_exit) for p in services)


def describe(dep: Dependency) -> str:
    return f"{dep.pod} ({dep.condition})"


class StartGate:
    """What a pod's first process waits for before its first start."""

    def __init__(self, depends_on: Sequence[Dependency], services: Mapping[str, Sequence[ManagedProcess]],
                 pulse: Pulse) -> None:
        self.depends_on = tuple(depends_on)
        self._services = services
        self._pulse = pulse

    def unmet(self) -> list[Dependency]:
        return [d for d in self.depends_on if not condition_met(d.condition, self._services.get(d.pod, ()))]

    def open(self) -> bool:
        return not self.unmet()

    def describe(self) -> str:
        return ", ".join(describe(d) for d in self.unmet())

    async def wait(self) -> None:
        """Returns once every condition is met (the caller races it against being stopped)."""
        while not self.open():
            await self._pulse.wait()


def gates(depends_on: Mapping[str, Sequence[Dependency]], processes: Sequence[ManagedProcess],
          pulse: Pulse) -> dict[str, StartGate]:
    """{process key: its gate} for the first process of each replica of every pod that depends on others
    (its sidecar when it has one: the service already waits for its sidecar)."""
    services: dict[str, list[ManagedProcess]] = {}
    for p in processes:
        if p.plan.role == "service":
            services.setdefault(p.plan.replica.pod, []).append(p)
    out: dict[str, StartGate] = {}
    firsts: dict[str, ManagedProcess] = {}
    for p in processes:  # the plan lists a replica's sidecar before its service
        firsts.setdefault(p.plan.replica.name, p)
    for p in firsts.values():
        deps = depends_on.get(p.plan.replica.pod, ())
        if deps:
            out[p.key] = StartGate(deps, services, pulse)
    return out
