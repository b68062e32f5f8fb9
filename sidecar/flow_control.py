"""Write-side flow control shared by both ends of the proxy.

asyncio tells a protocol when its transport's send buffer is above the high
water mark (``pause_writing``) and when it drained (``resume_writing``).
Whoever feeds this side registers a callback with ``when_writable`` and
pauses its own reading meanwhile, so a slow reader on one side throttles
the other instead of growing a buffer without bound.
"""

from __future__ import annotations

from collections.abc import Callable


class WriteFlowControl:
    __slots__ = ()
    write_paused: bool
    drain_waiters: list[Callable[[], None]]
    closed: bool

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiters, self.drain_waiters = self.drain_waiters, []
        for w in waiters:
            w()

    def when_writable(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` now, or once the send buffer has drained (or the connection is gone)."""
        if not self.write_paused or self.closed:
            callback()
        else:
            self.drain_waiters.append(callback)
