"""Children that must not outlive the process that forked them.

Linux's PR_SET_PDEATHSIG delivers a signal to a child when its parent dies,
however it dies (kill -9 included) — the one guarantee a parent cannot give
from a cleanup handler.
"""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(expected_parent: int | None = None) -> None:
    """Ask for SIGKILL when the parent dies; exit at once if it already has (the fork raced its death)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)
