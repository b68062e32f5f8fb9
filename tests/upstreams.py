"""Scripted HTTP/1.1 upstream servers for sidecar tests: raw asyncio + httptools in a background thread.

Behaviour is chosen by the request path (the query string is ignored for dispatch but is part of the
target the server counts, so tests make their targets unique with ``?t=<test>``):

- ``/status/<code>``: reply <code>.
- ``/flaky/<key>/<n>/<code>``: the first n requests for <key> get <code>, later ones 200.
- ``/delay/<seconds>``: wait, then 200.
- ``/reset-before-headers``: reset the connection without answering.
- ``/reset-mid-body``: headers with content-length 1000, 10 body bytes, then close.
- ``/chunked``: a chunked body (``CHUNKED_BODY``) in several pieces.
- ``/close-delimited``: no content-length, the body ends with the connection (``CLOSE_BODY``).
- ``/echo``: JSON with the method, target, headers as received, body length and sha256.
- ``/garbage``: a reply that is not HTTP.
- ``/hop-response``: a 200 carrying hop-by-hop response headers (and ``x-end-to-end: kept``).
- anything else: 200 with a small JSON body.

A HEAD request gets the head the GET would get, without the body. Every response carries
``x-upstream: ip:port`` (which listener served it). One server object can listen on many addresses;
they share the counters.
"""

from __future__ import annotations

import asyncio
import hashlib
import http
import json
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httptools

from tests.conftest import free_port

CHUNKED_BODY = b"".join(b"chunk-%03d;" % i for i in range(200))
CLOSE_BODY = b"".join(b"close-%04d;" % i for i in range(300))


@dataclass
class Recorded:
    listener: str
    method: str
    target: str
    headers: list[tuple[str, str]]
    body_length: int
    keep_alive: bool

    def header(self, name: str) -> str | None:
        name = name.lower()
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n.lower() == name]


@dataclass
class _Req:
    url: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body_length: int = 0
    sha: Any = field(default_factory=hashlib.sha256)
    method: str = ""
    keep_alive: bool = True
    early: bool = False


def _status_line(code: int) -> bytes:
    try:
        reason = http.HTTPStatus(code).phrase
    except ValueError:
        reason = "Unknown"
    return f"HTTP/1.1 {code} {reason}\r\n".encode()


class _Conn(asyncio.Protocol):
    def __init__(self, server: UpstreamServer, listener: str) -> None:
        self.server = server
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.cur: _Req | None = None
        self.queue: asyncio.Queue[_Req] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.method = ""  # of the request being answered

    # connection
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        with self.server.lock:
            self.server.connections[self.listener] += 1
        self.task = asyncio.get_running_loop().create_task(self._serve())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()

    # parser callbacks
    def on_message_begin(self) -> None:
        self.cur = _Req()

    def on_url(self, url: bytes) -> None:
        assert self.cur is not None
        self.cur.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.cur is not None
        self.cur.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        assert self.cur is not None
        self.cur.method = self.parser.get_method().decode()
        self.cur.keep_alive = self.parser.should_keep_alive()
        if self.cur.url.startswith(b"/early"):
            # Answer before the body arrives (like a 401/413 would) and keep the connection open.
            self.cur.early = True
            self.method = self.cur.method
            self.respond(200, b"early\n")

    def on_body(self, body: bytes) -> None:
        assert self.cur is not None
        self.cur.body_length += len(body)
        self.cur.sha.update(body)

    def on_message_complete(self) -> None:
        assert self.cur is not None
        self.queue.put_nowait(self.cur)
        self.cur = None

    # output
    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def reset(self) -> None:
        self.closed = True
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.transport.abort()

    def respond(self, code: int, body: bytes = b"", headers: list[tuple[str, str]] | None = None,
                keep_alive: bool = True, content_type: str = "text/plain") -> None:
        hdrs = [("x-upstream", self.listener), ("content-type", content_type),
                ("content-length", str(len(body))), *(headers or [])]
        if not keep_alive:
            hdrs.append(("connection", "close"))
        head = _status_line(code) + "".join(f"{n}: {v}\r\n" for n, v in hdrs).encode("latin-1") + b"\r\n"
        self.write(head if self.method == "HEAD" else head + body)
        if not keep_alive:
            self.close()

    async def _serve(self) -> None:
        while not self.closed:
            req = await self.queue.get()
            target = req.url.decode("latin-1")
            rec = Recorded(self.listener, req.method, target, req.headers, req.body_length, req.keep_alive)
            self.server.record(rec)
            if req.early:
                continue  # already answered from on_headers_complete
            self.method = req.method
            try:
                await self.server.handle(self, req, rec)
            except Exception as exc:  # a bug in a test server must show, not hang the test
                self.respond(500, f"test server error: {exc!r}".encode(), keep_alive=False)
                raise


class UpstreamServer:
    """Scripted upstream on one or more (ip, port) listeners, served by a private event loop thread."""

    def __init__(self, addresses: list[tuple[str, int]]) -> None:
        self.addresses = addresses
        self.lock = threading.Lock()
        self.hits: Counter[str] = Counter()  # by request target (path + query)
        self.keys: Counter[str] = Counter()  # flaky keys
        self.connections: Counter[str] = Counter()  # accepted connections per listener
        self.requests: list[Recorded] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._servers: list[asyncio.AbstractServer] = []

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> UpstreamServer:
        self.thread = threading.Thread(target=self._run, name="upstreams", daemon=True)
        self.thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("upstream server did not start")
        if self._error is not None:
            raise RuntimeError(f"upstream server failed to start: {self._error!r}")
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            for host, port in self.addresses:
                listener = f"{host}:{port}"
                server = loop.run_until_complete(loop.create_server(
                    lambda listener=listener: _Conn(self, listener), host, port, reuse_address=True))
                self._servers.append(server)
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            for s in self._servers:
                s.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    def stop(self) -> None:
        if self.loop is not None and self.thread is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)

    def __enter__(self) -> UpstreamServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- observations --------------------------------------------------------------
    def record(self, rec: Recorded) -> None:
        with self.lock:
            self.hits[rec.target] += 1
            self.requests.append(rec)

    def count(self, target: str) -> int:
        with self.lock:
            return self.hits[target]

    def requests_for(self, target: str) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.target == target]

    # -- behaviour -----------------------------------------------------------------
    async def handle(self, conn: _Conn, req: _Req, rec: Recorded) -> None:
        path = rec.target.split("?", 1)[0]
        parts = [p for p in path.split("/") if p]
        head = parts[0] if parts else ""
        ka = req.keep_alive
        if head == "status" and len(parts) == 2:
            code = int(parts[1])
            conn.respond(code, f"status {code}\n".encode(), keep_alive=ka)
        elif head == "flaky" and len(parts) == 4:
            key, n, code = parts[1], int(parts[2]), int(parts[3])
            with self.lock:
                self.keys[key] += 1
                seen = self.keys[key]
            if seen <= n:
                conn.respond(code, f"flaky {key} attempt {seen}: {code}\n".encode(), keep_alive=ka)
            else:
                conn.respond(200, f"flaky {key} attempt {seen}: ok\n".encode(), keep_alive=ka)
        elif head == "delay" and len(parts) == 2:
            await asyncio.sleep(float(parts[1]))
            conn.respond(200, b"delayed\n", keep_alive=ka)
        elif head == "reset-before-headers":
            conn.reset()
        elif head == "reset-mid-body":
            conn.write(_status_line(200) + f"x-upstream: {conn.listener}\r\n".encode()
                       + b"content-type: text/plain\r\ncontent-length: 1000\r\n\r\n" + b"0123456789")
            await asyncio.sleep(0.05)
            conn.close()
        elif head == "chunked":
            conn.write(_status_line(200) + f"x-upstream: {conn.listener}\r\n".encode()
                       + b"content-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n")
            step = 333
            for i in range(0, len(CHUNKED_BODY) if rec.method != "HEAD" else 0, step):
                piece = CHUNKED_BODY[i:i + step]
                conn.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await asyncio.sleep(0.002)
            if rec.method != "HEAD":
                conn.write(b"0\r\n\r\n")
            if not ka:
                conn.close()
        elif head == "close-delimited":
            conn.write(_status_line(200) + f"x-upstream: {conn.listener}\r\n".encode()
                       + b"content-type: text/plain\r\nconnection: close\r\n\r\n")
            step = 700
            for i in range(0, len(CLOSE_BODY), step):
                conn.write(CLOSE_BODY[i:i + step])
                await asyncio.sleep(0.002)
            conn.close()
        elif head == "echo":
            body = json.dumps({
                "method": rec.method, "path": rec.target, "headers": rec.headers,
                "body_length": req.body_length, "body_sha256": req.sha.hexdigest(), "server": conn.listener,
            }).encode()
            conn.respond(200, body, keep_alive=ka, content_type="application/json")
        elif head == "hop-response":
            conn.respond(200, b"hop\n", keep_alive=ka, headers=[
                ("connection", "keep-alive, x-resp-hop"), ("keep-alive", "timeout=5"), ("x-resp-hop", "1"),
                ("proxy-authenticate", "Basic"), ("x-end-to-end", "kept")])
        elif head == "garbage":
            conn.write(b"THIS IS NOT HTTP AT ALL\r\n\r\n")
            await asyncio.sleep(0.05)
            conn.close()
        else:
            body = json.dumps({"server": conn.listener, "path": rec.target}).encode()
            conn.respond(200, body, keep_alive=ka, content_type="application/json")


def serve_upstream(ip: str) -> Iterator[tuple[UpstreamServer, int]]:
    """A scripted upstream on a free port of ``ip`` for a test module: ``yield from`` it in a fixture."""
    port = free_port(ip)
    server = UpstreamServer([(ip, port)]).start()
    try:
        yield server, port
    finally:
        server.stop()
