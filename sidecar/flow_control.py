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

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiters, self.drain_waiters = self.drain_waiters, []
        for w in waiters:
            w()
