"""The reaper: kills a mesh's processes when its supervisor dies without stopping them.

PR_SET_PDEATHSIG only reaches a supervisor's direct children. The reaper runs
in its own session (so a terminal's Ctrl-C cannot reach it) and holds the read
end of a pipe whose write end only the supervisor has. The supervisor sends
``+PGID`` / ``-PGID`` lines as processes come and go; a clean stop ends with
``bye``. EOF without ``bye`` means the supervisor is gone: the reaper sends
SIGTERM then SIGKILL to every group it knows, then to any process still
carrying the mesh's run marker in its environment (descendants that called
setsid), and exits.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import psutil

MARKER_ENV = "MESHCTL_RUN_ID"
PROCESS_ENV = "MESHCTL_PROCESS"


def _signal_groups(pgids: set[int], sig: int) -> None:
    for pgid in pgids:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _marked(run_id: str, key: str | None = None) -> list[psutil.Process]:
    """Processes carrying this run's marker (of one supervised process, when ``key`` is given)."""
    out = []
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if env.get(MARKER_ENV) == run_id and (key is None or env.get(PROCESS_ENV) == key):
            out.append(proc)
    return out


def sweep(run_id: str, key: str | None = None) -> int:
    """SIGKILL what is left of a process that has already exited (daemonised children, for instance)."""
    procs = _marked(run_id, key) if run_id else []
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return len(procs)


def kill_groups_since(groups: dict[int, float]) -> int:
    """SIGKILL members of recorded process groups, even when the leader is gone.

    ``groups`` maps pgid -> the leader's create time; only processes created
    since then can belong to that group (guards against pgid reuse).
    """
    n = 0
    for proc in psutil.process_iter():
        try:
            pgid = os.getpgid(proc.pid)
            since = groups.get(pgid)
            if since is not None and proc.create_time() >= since - 0.05:
                proc.kill()
                n += 1
        except (psutil.Error, OSError):
            continue
    return n


def kill_run(pgids: set[int], run_id: str, grace_s: float = 1.0) -> None:
    """TERM, wait, KILL: every known group, then every marked straggler."""
    _signal_groups(pgids, signal.SIGTERM)
    for proc in _marked(run_id) if run_id else []:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not (_marked(run_id) if run_id else []) and not _any_group_alive(pgids):
            return
        time.sleep(0.1)
    _signal_groups(pgids, signal.SIGKILL)
    for proc in _marked(run_id) if run_id else []:
        try:
            proc.kill()
        except psutil.Error:
            pass


def _any_group_alive(pgids: set[int]) -> bool:
    for pgid in pgids:
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            continue
    return False


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    run_id = sys.argv[1] if len(sys.argv) > 1 else ""
    pgids: set[int] = set()
    clean = False
    for raw in sys.stdin:
        line = raw.strip()
        if line == "bye":
            clean = True
            break
        if line[:1] in "+-" and line[1:].isdigit():
            (pgids.add if line[0] == "+" else pgids.discard)(int(line[1:]))
    if not clean:
        kill_run(pgids, run_id)


if __name__ == "__main__":
    main()
