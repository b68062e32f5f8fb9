"""The reaper: kills a mesh's processes when its supervisor dies without stopping them.

PR_SET_PDEATHSIG only reaches a supervisor's direct children. The reaper runs
in its own session (so a terminal's Ctrl-C cannot reach it) and holds the read
end of a pipe whose write end only the supervisor has. The supervisor sends
``+PGID`` / ``-PGID`` lines as processes come and go (``+PGID CREATE_TIME`` is
understood too); a clean stop ends with ``bye``. EOF without ``bye`` means the
supervisor is gone: the reaper sends SIGTERM then SIGKILL to the run's
processes and exits.

What counts as the run's process (pids are reused, and on a 32768-pid machine
quickly): one carrying the run's marker in its environment (descendants that
called setsid too), a recorded group leader whose pid *and* create time still
match, and any member of such a verified leader's group — Linux never reuses a
pid that still names a process group, so a group whose leader is alive cannot
be a stranger's. A recorded group whose leader is gone proves nothing (its id
may since name an unrelated group): only its marked members are killed.
Signals go through psutil, which refuses to signal a pid reused since the scan.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping

import psutil

from pods.markers import MARKER_ENV, PROCESS_ENV

__all__ = ["MARKER_ENV", "PROCESS_ENV", "kill_groups_since", "kill_run", "marked", "sweep"]

#: Two reads of one process's create time can differ by this much (clock-tick rounding).
CREATE_TIME_SLACK_S = 0.05

#: Group id -> its leader's create time, or None for "the caller has just checked that leader".
Groups = Mapping[int, float | None]


def marked(run_id: str, key: str | None = None) -> list[psutil.Process]:
    """Processes carrying this run's marker (of one supervised process, when ``key`` is given)."""
    def match(proc: psutil.Process) -> bool:
        env = proc.environ()
        return env.get(MARKER_ENV) == run_id and (key is None or env.get(PROCESS_ENV) == key)

    return _scan(match)


def _scan(match: Callable[[psutil.Process], bool]) -> list[psutil.Process]:
    """Every other process for which ``match`` holds; processes that vanish or deny us are skipped."""
    out = []
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if match(proc):
                out.append(proc)
        except (psutil.Error, OSError):
            continue
    return out


def sweep(run_id: str, key: str | None = None) -> int:
    """SIGKILL what is left of a process that has already exited (daemonised children, for instance)."""
    procs = marked(run_id, key) if run_id else []
    _signal(procs, signal.SIGKILL)
    return len(procs)


def _leaders(groups: Groups) -> dict[int, psutil.Process]:
    """The recorded group leaders that are still the processes recorded."""
    out = {}
    for pgid, since in groups.items():
        try:
            proc = psutil.Process(pgid)
            if since is None or abs(proc.create_time() - since) < CREATE_TIME_SLACK_S:
                out[pgid] = proc
        except psutil.Error:
            continue
    return out


def _ours(run_id: str, leaders: Mapping[int, psutil.Process]) -> list[psutil.Process]:
    """The run's processes: marked ones, verified leaders and the members of their groups."""
    live = {pgid for pgid, proc in leaders.items() if proc.is_running()}  # is_running compares create times
    return _scan(lambda proc: (proc.pid in live or os.getpgid(proc.pid) in live or (
        bool(run_id) and proc.environ().get(MARKER_ENV) == run_id)) and _alive(proc))


def _alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (a zombie is dead; whoever waits for it will reap it)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(procs: Iterable[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)  # raises NoSuchProcess rather than signal a reused pid
        except psutil.Error:
            pass


def _as_groups(pgids: Iterable[int] | Groups) -> Groups:
    return pgids if isinstance(pgids, Mapping) else dict.fromkeys(pgids)


def kill_groups_since(groups: Groups, run_id: str = "") -> int:
    """SIGKILL at once what is left of recorded groups; returns how many processes were signalled.

    ``groups`` maps pgid -> the leader's create time. Only the groups of leaders that still match,
    and processes carrying ``run_id``'s marker, are touched: an unmarked process in a group whose
    recorded leader is gone may be a stranger that inherited a reused pgid.
    """
    procs = _ours(run_id, _leaders(groups))
    _signal(procs, signal.SIGKILL)
    return len(procs)


def kill_run(pgids: Iterable[int] | Groups, run_id: str, grace_s: float = 1.0) -> None:
    """TERM, wait, KILL the run's processes (see the module docstring for which ones).

    ``pgids`` maps each recorded pgid to its leader's create time; a bare pgid means the caller
    has just checked that its leader is the process it recorded.
    """
    leaders = _leaders(_as_groups(pgids))
    first = _ours(run_id, leaders)
    _signal(first, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _ours(run_id, leaders) and not any(_alive(p) for p in first):
            return
        time.sleep(0.1)
    # The first scan too: an unmarked member of a group whose leader the SIGTERM just ended is still ours.
    _signal([*first, *_ours(run_id, leaders)], signal.SIGKILL)


def _parse(line: str) -> tuple[str, int, float | None] | None:
    """``+PGID``, ``-PGID`` or ``+PGID CREATE_TIME`` -> (sign, pgid, create time)."""
    head, _, rest = line.partition(" ")
    if head[:1] not in ("+", "-") or not head[1:].isdigit():
        return None
    try:
        since = float(rest) if rest else None
    except ValueError:
        return None
    return head[0], int(head[1:]), since


def _leader_create_time(pgid: int) -> float | None:
    """Read at once, while the supervisor's process is surely still the one with that pid."""
    try:
        return psutil.Process(pgid).create_time()
    except psutil.Error:
        return None


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    run_id = sys.argv[1] if len(sys.argv) > 1 else ""
    groups: dict[int, float] = {}
    clean = False
    for raw in sys.stdin:
        line = raw.strip()
        if line == "bye":
            clean = True
            break
        parsed = _parse(line)
        if parsed is None:
            continue
        sign, pgid, since = parsed
        if sign == "-":
            groups.pop(pgid, None)
            continue
        since = since if since is not None else _leader_create_time(pgid)
        if since is not None:  # a leader already gone is covered by the marker alone
            groups[pgid] = since
    if not clean:
        kill_run(groups, run_id)


if __name__ == "__main__":
    main()
