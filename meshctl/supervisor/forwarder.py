"""``publish``: a TCP forwarder from a host port to a pod's alias, like podman --publish.

Byte-level and protocol-agnostic. Each accepted connection picks the next ready
replica (round robin) so a published pod with replicas is load balanced per
connection. Flow control is end to end: when one side's transport buffer is
full, reading from the other side pauses. Half-closes pass through (an EOF from
one side becomes a write_eof on the other); once both directions have ended,
both sockets are closed, and an error or close on either side closes the other.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

CONNECT_TIMEOUT_S = 2.0


class _Half(asyncio.Protocol):
    """One side of a forwarded connection; writes what it reads into its peer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.pending: list[bytes] = []
        #: This side has sent EOF: nothing more will come from it.
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)
            return
        peer.transport.write(data)

    def eof_received(self) -> bool:
        """Pass the half-close on; returning False makes asyncio close this side (after flushing it)."""
        self.eof = True
        peer = self.peer
        if peer is None:
            return True  # not linked yet (the upstream is connecting): link() passes the EOF on
        if peer.transport is None or not peer.transport.can_write_eof():
            return False  # connection_lost closes the peer
        peer.transport.write_eof()
        if peer.eof:  # both directions are done: nothing more can flow either way
            peer.transport.close()
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
        self.peer = None

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def link(self, peer: _Half) -> None:
        self.peer = peer
        if peer.transport is None:
            return
        for chunk in self.pending:
            peer.transport.write(chunk)
        self.pending.clear()
        if self.eof and peer.transport.can_write_eof():
            peer.transport.write_eof()
            if peer.eof and self.transport is not None:
                peer.transport.close()
                self.transport.close()


class _Downstream(_Half):
    def __init__(self, forwarder: Forwarder) -> None:
        super().__init__()
        self.forwarder = forwarder
        self._connecting: asyncio.Task[None] | None = None  # a reference, or the loop may drop the task

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.pause_reading()  # type: ignore[attr-defined]
        self._connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        for ip in self.forwarder.candidates():
            try:
                _, up = await asyncio.wait_for(
                    loop.create_connection(_Half, ip, self.forwarder.pod_port), CONNECT_TIMEOUT_S)
            except (TimeoutError, OSError):
                continue
            if self.transport is None or self.transport.is_closing():
                up.transport.close()  # type: ignore[union-attr]
                return
            up.link(self)
            self.link(up)
            self.transport.resume_reading()
            return
        if self.transport is not None:
            self.transport.close()


class Forwarder:
    def __init__(self, host_ip: str, host_port: int, pod_port: int,
                 targets: Callable[[], tuple[list[str], list[str]]]) -> None:
        """``targets`` returns (ready aliases, all aliases) at connect time."""
        self.host_ip = host_ip
        self.host_port = host_port
        self.pod_port = pod_port
        self._targets = targets
        self._rr = itertools.count()
        self._server: asyncio.AbstractServer | None = None

    def candidates(self) -> list[str]:
        ready, every = self._targets()
        pool = ready or every
        if not pool:
            return []
        start = next(self._rr) % len(pool)
        return pool[start:] + pool[:start]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Downstream(self), self.host_ip, self.host_port,
                                                reuse_address=True, backlog=1024)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
