"""Flow control shared by both ends of the proxy: when to stop reading, and when writing may go on.

Reading: several independent reasons may stop a transport from being read (a
pipelined request waits its turn, the peer on the other side cannot take more,
a protocol error). ``ReadFlowControl`` owns the pause: each reason is set and
cleared on its own, and reading resumes only once no reason remains, so one
reason going away can never undo another (as uvicorn's ``FlowControl``, with
named reasons instead of one flag).

Writing: asyncio tells a protocol when its transport's send buffer is above the high
water mark (``pause_writing``) and when it drained (``resume_writing``).
Whoever feeds this side registers a callback with ``when_writable`` and
pauses its own reading meanwhile, so a slow reader on one side throttles
the other instead of growing a buffer without bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

#: Why a transport is not read. Reasons are bits so that setting one twice is harmless.
PIPELINED = 1  # a complete request waits behind the one being served: do not read further ahead
PEER_SLOW = 2  # the other side of the proxy is not draining what we forward: stop taking more
FAILED = 4  # a protocol error ended the connection's input for good


class ReadFlowControl:
    """The one owner of a transport's pause_reading/resume_reading."""

    __slots__ = ("transport", "reasons")

    def __init__(self, transport: asyncio.Transport | None) -> None:
        self.transport = transport
        self.reasons = 0

    def pause(self, reason: int) -> None:
        if not self.reasons and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self.reasons |= reason

    def resume(self, reason: int) -> None:
        """Clear ``reason``; read again if it was the last one."""
        if not self.reasons & reason:
            return  # the common case on the hot path: nothing was paused for this reason
        self.reasons &= ~reason
        if not self.reasons and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def paused(self, reason: int = ~0) -> bool:
        return bool(self.reasons & reason)


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
