"""The states of a supervised process: one definition for the supervisor and for every reader of its status."""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    CRASHLOOP = "crashloop"
    EXITED = "exited"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


#: A process in one of these will not become ready without help (`up -d` gives up on it).
BROKEN = frozenset({State.CRASHLOOP, State.EXITED, State.FAILED})
#: Not running, and with an exit code worth showing.
DOWN = BROKEN | {State.BACKOFF}
#: On its way to running.
COMING_UP = frozenset({State.PENDING, State.STARTING, State.BACKOFF})


def completed(state: str, last_exit: int | None) -> bool:
    """A one-shot process that finished: exited 0 and not restarted (restart never, or on-failure)."""
    return state == State.EXITED and last_exit == 0
