"""The floor of a Python proxy (bench/NOTES.md, issue 18): the leanest HTTP/1.1 keep-alive forwarder on uvloop.

GET only, content-length responses, no header rewriting, no stats, no log, no error handling: whatever it costs
per request, no feature-complete Python proxy costs less. A measuring stick, never a product.

    python -m bench.floor_proxy LISTEN_IP PORT UPSTREAM_IP UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import sys

import uvloop


class _Upstream(asyncio.Protocol):
    def __init__(self, idle: list[_Upstream]) -> None:
        self.idle = idle
        self.transport: asyncio.Transport | None = None
        self.down: _Downstream | None = None
        self.buf = b""
        self.need = -1  # bytes of the whole response, once its head is in

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if self.need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            i = buf.lower().find(b"content-length: ", 0, end)
            self.need = end + 4 + int(buf[i + 16:buf.find(b"\r\n", i)])
        if len(buf) < self.need:
            self.buf = buf
            return
        self.buf, self.need = b"", -1
        down, self.down = self.down, None
        self.idle.append(self)
        assert down is not None and down.transport is not None
        down.transport.write(buf)


class _Downstream(asyncio.Protocol):
    def __init__(self, idle: list[_Upstream], upstream: tuple[str, int]) -> None:
        self.idle = idle
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if buf.find(b"\r\n\r\n") < 0:
            self.buf = buf
            return
        self.buf = b""
        if self.idle:
            up = self.idle.pop()
            up.down = self
            assert up.transport is not None
            up.transport.write(buf)
        else:
            asyncio.get_running_loop().create_task(self._connect(buf))

    async def _connect(self, buf: bytes) -> None:
        _, up = await asyncio.get_running_loop().create_connection(lambda: _Upstream(self.idle), *self.upstream)
        up.down = self
        assert up.transport is not None
        up.transport.write(buf)


async def serve(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    idle: list[_Upstream] = []
    await asyncio.get_running_loop().create_server(lambda: _Downstream(idle, upstream), *listen, reuse_address=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(serve((sys.argv[1], int(sys.argv[2])), (sys.argv[3], int(sys.argv[4]))))
