"""Certificate rotation on the supervisor's event loop: one timer per replica, due at 2/3 of the lifetime.

No task, no thread: a timer calls back, the issuer writes the next generation (about a millisecond)
and the timer is set again from the new certificate. A forced rotation (``meshctl certs --rotate``)
is the same call ahead of time. A failed issue (a full disk) is reported and retried soon, while the
current certificate is still valid for a third of its life.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable

from meshctl.identity.issuer import CertState, Issuer

log = logging.getLogger(__name__)

#: After a failed issue, try again this soon (the current certificate still has a third of its life).
RETRY_S = 5.0


class Rotation:
    def __init__(self, issuer: Issuer, on_event: Callable[[str, bool], None]) -> None:
        self.issuer = issuer
        self.on_event = on_event  # (text, is_error)
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._stopped = False

    def start(self) -> None:
        """Issue every replica's first certificate (before any sidecar starts) and arm the timers.

        Raises OSError when a first certificate cannot be written: the mesh cannot start its sidecars.
        """
        for replica in self.issuer.plan.replicas:
            self.issuer.issue(replica)
            self._arm(replica)

    def rotate(self, replica: str) -> CertState:
        """Issue ``replica``'s next certificate now (raises OSError) and re-arm its timer."""
        state = self.issuer.issue(replica)
        self._arm(replica)
        self.on_event(f"{replica} certificate rotated: serial {state.serial:x}, valid until "
                      f"{state.not_after:%Y-%m-%d %H:%M:%S}Z", False)
        return state

    def _arm(self, replica: str) -> None:
        if self._stopped:
            return
        old = self._timers.pop(replica, None)
        if old is not None:
            old.cancel()
        delay = (self.issuer.rotate_at(replica) - dt.datetime.now(dt.UTC)).total_seconds()
        self._set(replica, max(delay, 0.0))

    def _set(self, replica: str, delay: float) -> None:
        self._timers[replica] = asyncio.get_running_loop().call_later(delay, self._due, replica)

    def _due(self, replica: str) -> None:
        self._timers.pop(replica, None)
        try:
            self.rotate(replica)
        except OSError as exc:
            self.on_event(f"{replica}: cannot rotate its certificate ({exc.strerror or exc}); "
                          f"retrying in {RETRY_S:g}s", True)
            if not self._stopped:
                self._set(replica, RETRY_S)

    def stop(self) -> None:
        self._stopped = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
