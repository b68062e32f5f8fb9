"""Children that must not outlive the process that forked them.

Linux's PR_SET_PDEATHSIG delivers a signal to a child when its parent dies,
however it dies (kill -9 included) — the one guarantee a parent cannot give
from a cleanup handler. It must be set by the child itself, and it has a race:
a parent that dies between the fork and the prctl sends nothing, so the child
then checks that its parent is still the one it expects (``expected_parent``).

Two ways to set it:

* ``die_with_parent`` inside a Python child (a forked worker that runs Python
  anyway, e.g. ``meshctl traffic``'s);
* ``launch_argv`` for a program started with ``subprocess``: an exec wrapper,
  so that no Python runs between fork and exec. ``preexec_fn`` would run Python
  in the child of a process with threads (the supervisor's executor), which can
  deadlock on a lock held by another thread at the fork; it also forces a full
  fork where ``subprocess`` otherwise uses vfork. The wrapper is util-linux's
  ``setpriv --pdeathsig KILL`` exec'ing ``/bin/sh`` for the parent check, which
  then execs the program: same pid, about 2 ms of CPU per start. ``posix_spawn``
  has no pdeathsig attribute, and a ``python -c`` wrapper costs ~9 ms per start
  (a second a hundred processes): it is only the fallback when ``setpriv`` is
  missing or too old (util-linux < 2.33).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

PR_SET_PDEATHSIG = 1
#: The exit code of a child whose parent died before it could ask for PDEATHSIG.
ORPHANED_EXIT = 125
_libc = ctypes.CDLL(None, use_errno=True)

#: After setpriv: $0 is the expected parent pid, "$@" the program. dash's $PPID is getppid() at its start,
#: which is after setpriv's prctl.
_SH_CHECK = f'[ "$PPID" = "$0" ] || exit {ORPHANED_EXIT}; exec "$@"'
#: The fallback, self-contained (-S -I: no site, no user paths: the quickest Python start).
_PY_CHECK = ("import ctypes, os, sys\n"
             f"ctypes.CDLL(None).prctl({PR_SET_PDEATHSIG}, {int(signal.SIGKILL)})\n"
             f"if os.getppid() != int(sys.argv[1]): os._exit({ORPHANED_EXIT})\n"
             "os.execv(sys.argv[2], sys.argv[2:])\n")


def die_with_parent(expected_parent: int | None = None) -> None:
    """Ask for SIGKILL when the parent dies; exit at once if it already has (the fork raced its death)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)


@functools.cache
def setpriv() -> str | None:
    """setpriv, if it knows --pdeathsig (asked once per process)."""
    path = shutil.which("setpriv")
    if path is None:
        return None
    try:
        res = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return path if "--pdeathsig" in res.stdout else None


def wrapper_argv(expected_parent: int, use_setpriv: bool | None = None) -> tuple[str, ...]:
    """The argv prefix that sets PDEATHSIG, checks the parent, then execs the program that follows it."""
    tool = setpriv() if use_setpriv is not False else None
    if use_setpriv and tool is None:
        raise FileNotFoundError(errno.ENOENT, "setpriv with --pdeathsig not found", "setpriv")
    if tool is not None:
        return (tool, "--pdeathsig", "KILL", "--", "/bin/sh", "-c", _SH_CHECK, str(expected_parent))
    return (sys.executable, "-S", "-I", "-c", _PY_CHECK, str(expected_parent))


def resolve_program(program: str, env: Mapping[str, str], cwd: Path | str) -> str:
    """The absolute path exec would run, or the OSError ``subprocess`` would raise.

    The wrapper execs the program, so a missing program would otherwise show up as an exit code
    and a line in the log instead of an error at start.
    """
    if os.sep in program:
        path = os.path.join(cwd, program)
    else:
        found = shutil.which(program, path=os.pathsep.join(os.get_exec_path(dict(env))))
        if found is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
        path = os.path.join(cwd, found)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
    return path


def launch_argv(argv: Sequence[str], env: Mapping[str, str], cwd: Path | str,
                expected_parent: int | None = None, use_setpriv: bool | None = None) -> list[str]:
    """``argv`` wrapped so that the program dies with ``expected_parent`` (default: this process).

    Spawn the result from the thread that stays alive as long as the child should: Linux sends the
    death signal when the *thread* that forked the child exits.
    """
    parent = os.getpid() if expected_parent is None else expected_parent
    return [*wrapper_argv(parent, use_setpriv), resolve_program(argv[0], env, cwd), *argv[1:]]
