"""Which TCP addresses the pods' processes listen on, and a warning for a wildcard bind.

Pods share the host's network namespace: a process that binds 0.0.0.0 or ``::``
takes its port on every pod's alias, and the next pod that binds that port
fails (most frameworks default to 0.0.0.0). The supervisor scans the listening
sockets of each process and its descendants once the process is ready and when
``GET /v1/status`` asks for resources, and names such binds with the fix.

One scan asks the kernel for its listening sockets once (sock_diag), reads the
process table once, then only the file descriptors of the mesh's processes:
psutil's ``Process.net_connections()`` would re-read (and parse in Python) the
whole system's TCP tables, TIME_WAIT entries included, once per process, and
``Process.children()`` the whole process table once per process (measured with
100 listening processes: 1.2 s against 9 ms; the kernel's text tables alone
took 15 ms, sock_diag 0.03 ms).
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

# The listening-socket table lives in its own module, without asyncio: `up` asks it for the taken aliases.
from meshctl.supervisor.listen_table import (  # noqa: F401 - re-exported: the table's readers
    _decode,
    _listen_table_netlink,
    _listen_table_proc,
    listen_table,
)

WILDCARDS = frozenset({"0.0.0.0", "::"})
#: A status with resources rescans at most this often: `meshctl stats --watch` asks every second.
RESCAN_MIN_S = 1.0


@dataclass(frozen=True)
class Target:
    """A running pod process: its key (``web-0/service``), pid and pod alias."""

    key: str
    pid: int
    alias: str


def format_address(ip: str, port: int) -> str:
    """``127.0.2.1:80``, ``[::]:8000``."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def wildcard_warning(key: str, ip: str, port: int, alias: str) -> str:
    """One line: the process, the address and the fix."""
    return (f"{key} listens on {format_address(ip, port)} (every address): it takes port {port} on every pod's "
            f"alias and breaks the next pod that binds it; bind ${{POD_IP}} ({alias}) or 127.0.0.1, which "
            f"meshctl rewrites to {alias} in the pod's command and env")


def socket_inodes(pid: int) -> set[int]:
    """The socket inodes among a process's file descriptors; empty if it is gone or not ours."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return set()
    inodes = set()
    for fd in fds:
        try:
            link = os.readlink(f"{fd_dir}/{fd}")
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    return inodes


def children_map() -> dict[int, list[int]]:
    """Parent pid -> child pids, from one pass over the process table."""
    import psutil  # here: `up` asks listen_table() alone, and needs no psutil for it

    children: dict[int, list[int]] = {}
    for proc in psutil.process_iter(["ppid"]):
        ppid = proc.info["ppid"]
        if ppid is not None:
            children.setdefault(ppid, []).append(proc.pid)
    return children


@functools.cache
def _has_children_files() -> bool:
    """Whether this kernel lists each task's children in /proc (CONFIG_PROC_CHILDREN)."""
    return os.path.exists(f"/proc/self/task/{os.getpid()}/children")


class KernelChildren(Mapping[int, list[int]]):
    """Parent pid -> child pids, asked of the kernel per process (``/proc/PID/task/TID/children``): for a few
    targets (a process that just became ready) much cheaper than a pass over the whole process table."""

    def __getitem__(self, pid: int) -> list[int]:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return []
        out: list[int] = []
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                    out.extend(int(c) for c in f.read().split())
            except OSError:  # the thread or the process is gone
                continue
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(())

    def __len__(self) -> int:
        return 0


#: Up to this many targets, their descendants are asked of the kernel process by process.
FEW_TARGETS = 8


def _tree(pid: int, children: Mapping[int, list[int]]) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def scan(targets: Iterable[Target]) -> dict[Target, list[tuple[str, int]]]:
    """Each target's listening (ip, port), its descendants' included, sorted. Blocking: run it in a thread."""
    targets = list(targets)
    if not targets:
        return {}
    children: Mapping[int, list[int]] = (KernelChildren() if len(targets) <= FEW_TARGETS and _has_children_files()
                                         else children_map())
    table = listen_table()
    out = {}
    for t in targets:
        found = {table[i] for p in _tree(t.pid, children) for i in socket_inodes(p) if i in table}
        out[t] = sorted(found, key=lambda a: (":" in a[0], a))
    return out


@dataclass(frozen=True)
class Found:
    pid: int
    listening: list[str]
    warnings: list[str]


class ListeningWatch:
    """The supervisor's cache of listening addresses and warnings, per process key.

    Scans run in a thread, coalesced: processes that become ready together are scanned in one pass,
    and status requests share a scan in flight and rescan at most every ``RESCAN_MIN_S``.
    """

    def __init__(self, on_warning: Callable[[str], None], rescan_min_s: float = RESCAN_MIN_S) -> None:
        self.on_warning = on_warning
        self.rescan_min_s = rescan_min_s
        self._found: dict[str, Found] = {}
        self._warned: set[tuple[str, str]] = set()  # (key, address): one event each, not one per restart
        self._pending: dict[str, Target] = {}
        self._ready_pid: dict[str, int] = {}  # the instance of each key scanned (or queued) at readiness
        self._busy = asyncio.Lock()  # one scan at a time: a crowd of `ps` callers shares it
        self._last_full = -math.inf
        self._tasks: set[asyncio.Task[None]] = set()  # held: the loop keeps only weak references to tasks

    def ready(self, target: Target) -> None:
        """A process became ready: scan it soon (with the others that become ready meanwhile)."""
        if self._ready_pid.get(target.key) == target.pid:
            return  # "ready again" after a failed probe is the same instance: nothing new to scan
        self._ready_pid[target.key] = target.pid
        first = not self._pending
        self._pending[target.key] = target
        if first:
            task = asyncio.get_running_loop().create_task(self._scan_pending())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _scan_pending(self) -> None:
        async with self._busy:
            batch, self._pending = list(self._pending.values()), {}
            await self._scan(batch)

    async def refresh(self, targets: list[Target]) -> None:
        """Rescan every running process, unless a rescan finished less than ``rescan_min_s`` ago."""
        async with self._busy:
            if time.monotonic() - self._last_full < self.rescan_min_s:
                return
            await self._scan(targets)
            self._last_full = time.monotonic()

    async def _scan(self, targets: list[Target]) -> None:
        import psutil

        try:
            result = await asyncio.get_running_loop().run_in_executor(None, scan, targets)
        except (OSError, psutil.Error):  # a scan is advice; the mesh runs on without it
            return
        for t, addrs in result.items():
            listening, warnings = [], []
            for ip, port in addrs:
                addr = format_address(ip, port)
                listening.append(addr)
                if ip not in WILDCARDS:
                    continue
                warnings.append(wildcard_warning(t.key, ip, port, t.alias))
                if (t.key, addr) not in self._warned:
                    self._warned.add((t.key, addr))
                    self.on_warning(warnings[-1])
            self._found[t.key] = Found(t.pid, listening, warnings)

    def report(self, key: str, pid: int | None) -> dict[str, list[str]]:
        """``listening`` and ``warnings`` of the process instance ``pid`` (nothing once it has exited)."""
        found = self._found.get(key)
        if found is None or pid is None or found.pid != pid:
            return {"listening": [], "warnings": []}
        return {"listening": list(found.listening), "warnings": list(found.warnings)}
