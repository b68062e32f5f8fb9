"""The downstream side: one protocol object per client connection, httptools callbacks.

Shaped like uvicorn's httptools protocol: the parser drives callbacks, each
request becomes a ``Stream``, streams of one connection are served strictly
in order (pipelining), and flow control is end to end — when the client reads
slowly, the upstream side is paused, never buffered without bound.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections import deque
from collections.abc import Callable

import httptools

from sidecar.flow_control import WriteFlowControl
from sidecar.http1 import LAST_CHUNK, Headers, chunk, no_body_expected, serialize_headers, status_line
from sidecar.request_info import FLAG_DOWNSTREAM_PROTOCOL_ERROR, RequestInfo

Handler = Callable[["Stream"], None]

#: A request body up to this size is buffered so it can be replayed on retry.
BODY_BUFFER_LIMIT = 1024 * 1024
MAX_URL_BYTES = 16 * 1024
HIGH_WATER = 256 * 1024


class Stream:
    """One request and its response on a downstream connection."""

    __slots__ = (
        "conn", "method", "url", "headers", "http_version", "keep_alive", "body", "body_complete",
        "streaming", "body_sink", "body_done_sink", "info", "head_sent", "chunked_response", "done",
        "head_only", "header_bytes", "content_length", "chunked_request", "expect_continue",
        "response_close", "bytes_sent", "on_cancel", "seen", "envoy_headers", "headers_done", "continue_sent",
    )

    def __init__(self, conn: DownstreamProtocol) -> None:
        self.conn = conn
        self.method = b""
        self.url = b""
        self.headers: Headers = []
        self.seen: dict[bytes, bytes] = {}  # last value of each header name: O(1) lookups on the hot path
        self.envoy_headers = False  # any x-envoy-* request header (retry/timeout overrides) present
        self.headers_done = False  # later on_header calls are trailers: never merged into the head
        self.continue_sent = False
        self.http_version = "1.1"
        self.keep_alive = True
        self.body = bytearray()
        self.body_complete = False
        self.streaming = False  # body larger than the buffer limit: forwarded as it comes, no replay
        self.body_sink: Callable[[bytes], None] | None = None
        self.body_done_sink: Callable[[], None] | None = None
        now = time.time()
        self.info = RequestInfo(start_time=now, start_monotonic=time.monotonic(),
                                downstream_remote=conn.remote, downstream_local=conn.local)
        self.head_sent = False
        self.chunked_response = False
        self.done = False
        self.head_only = False
        self.on_cancel: Callable[[], None] | None = None  # stops the upstream work if the client leaves
        self.header_bytes = 0
        self.content_length: int | None = None
        self.chunked_request = False
        self.expect_continue = False
        self.response_close = False
        self.bytes_sent = 0

    def describe_request(self) -> None:
        """Method and target for the access log of a request that never reached the router."""
        info = self.info
        if info.method == "-" and self.method:
            info.method = self.method.decode("latin-1")
        if info.path == "-" and self.url:
            info.path = self.url.decode("latin-1")
        host = self.seen.get(b"host")
        if not info.authority and host:
            info.authority = host.decode("latin-1")

    @property
    def replayable(self) -> bool:
        return self.body_complete and not self.streaming

    def header(self, name: bytes) -> bytes | None:
        return self.seen.get(name)

    # -- response ---------------------------------------------------------------
    def send_head(self, status: int, headers: Headers, content_length: int | None) -> None:
        """Start the response; ``content_length`` None means the length is unknown (chunked)."""
        if self.head_sent:
            return
        self.head_sent = True
        self.info.response_code = status
        self.head_only = no_body_expected(self.method, status)
        out = [status_line(status), serialize_headers(headers)]
        if not self.head_only or self.method == b"HEAD":
            if content_length is not None:
                out.append(b"content-length: %d\r\n" % content_length)
            elif not self.head_only:
                if self.http_version == "1.1":
                    self.chunked_response = True
                    out.append(b"transfer-encoding: chunked\r\n")
                else:
                    self.response_close = True
        if not self.keep_alive or self.response_close:
            out.append(b"connection: close\r\n")
        elif self.http_version == "1.0":
            out.append(b"connection: keep-alive\r\n")  # a 1.0 client assumes close unless told
        out.append(b"\r\n")
        self.conn.write(b"".join(out))

    def send_body(self, data: bytes) -> None:
        if self.head_only or not data or self.done:
            return
        self.bytes_sent += len(data)
        self.conn.write(chunk(data) if self.chunked_response else data)

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        if self.chunked_response and not self.head_only:
            self.conn.write(LAST_CHUNK)
        self.conn.flush()
        self.info.bytes_sent = self.bytes_sent
        self.conn.stream_finished(self)

    def reply(self, status: int, body: bytes = b"", headers: Headers | None = None,
              content_type: bytes = b"text/plain") -> None:
        """A complete response generated here (local reply, admin page)."""
        hdrs = list(headers or [])
        if body:
            hdrs.append((b"content-type", content_type))
        self.send_head(status, hdrs, len(body))
        self.send_body(body)
        self.finish()

    def abort(self) -> None:
        """Give up on a response already under way: the client sees a truncated reply."""
        self.done = True
        self.info.bytes_sent = self.bytes_sent
        self.conn.flush()
        self.conn.stream_finished(self, broken=True)


class DownstreamProtocol(WriteFlowControl, asyncio.Protocol):
    def __init__(self, handler: Handler, on_open: Callable[[], None] | None = None,
                 on_close: Callable[[], None] | None = None, max_header_bytes: int = 60 * 1024,
                 on_protocol_error: Callable[[Stream, int], None] | None = None,
                 on_stream_done: Callable[[Stream], None] | None = None,
                 on_early_close: Callable[[Stream], None] | None = None, idle_timeout_s: float = 0.0,
                 on_idle_timeout: Callable[[], None] | None = None) -> None:
        self.handler = handler
        self.idle_timeout_s = idle_timeout_s  # enforced by the sidecar's sweeper; 0: never
        self.on_idle_timeout = on_idle_timeout
        self.on_early_close = on_early_close
        self.on_stream_done = on_stream_done
        self.on_open = on_open
        self.on_close = on_close
        self.on_protocol_error = on_protocol_error
        self.max_header_bytes = max_header_bytes
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.remote = ""
        self.remote_ip = b""
        self.local = ""
        self.current: Stream | None = None  # being parsed
        self.active: Stream | None = None  # being served
        self.queue: deque[Stream] = deque()
        self.closed = False
        self.write_paused = False
        self.drain_waiters: list[Callable[[], None]] = []
        self.wbuf: list[bytes] = []
        self.loop = asyncio.get_event_loop()
        self.last_activity = self.loop.time()  # for the idle sweeper (slow or silent clients)
        self.in_head = False  # between a request's first byte and the end of its headers
        self.head_bytes = 0
        self.failed = False  # a protocol error was seen: ignore further input
        self.deferred_error: tuple[Stream, int, bytes] | None = None  # sent after the in-flight response
        self._draining = False

    # -- connection ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        self.remote = f"{peer[0]}:{peer[1]}" if peer else ""
        self.remote_ip = peer[0].encode() if peer else b""
        self.local = f"{sock[0]}:{sock[1]}" if sock else ""
        if self.on_open:
            self.on_open()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        s = self.active
        if s is not None and not s.done:
            s.info.response_flags.append("DC")
            if s.on_cancel is not None:
                s.on_cancel()  # the client is gone: stop the upstream attempt too
            s.done = True
            self.active = None
            if self.on_stream_done is not None:
                self.on_stream_done(s)
        cur = self.current
        if cur is not None and cur is not s and cur.headers_done and not cur.done and self.on_early_close:
            cur.done = True  # the client left mid-upload, before the request could be served
            cur.info.response_flags.append("DC")
            cur.describe_request()
            self.on_early_close(cur)
        self.queue.clear()
        for w in self.drain_waiters:
            w()
        self.drain_waiters.clear()
        if self.on_close:
            self.on_close()

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        if self.failed:
            return
        if self.in_head:
            # httptools buffers a header line whole before calling us: bound it here, per chunk.
            self.head_bytes += len(data)
            if self.head_bytes > self.max_header_bytes + MAX_URL_BYTES:
                self._protocol_error(431, b"request header fields too large")
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # The request was served as a plain one (Upgrade is hop-by-hop and not forwarded);
            # go on parsing whatever follows it as HTTP/1.1.
            self.parser = httptools.HttpRequestParser(self)
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            if data[offset:]:
                self.data_received(data[offset:])
        except httptools.HttpParserError as exc:
            # httptools wraps exceptions raised in our callbacks; a _Reject carries its own status.
            rej = exc.__context__
            if isinstance(rej, _Reject):
                self._protocol_error(rej.status, rej.body)
            else:
                self._protocol_error(400, b"malformed request")

    def _protocol_error(self, status: int, body: bytes) -> None:
        self.failed = True
        if self.transport is not None:
            self.transport.pause_reading()
        s = self.current
        if s is not None and s is self.active:
            # The request being served went bad mid-body: end it through the normal path, once.
            s.keep_alive = False
            s.info.response_flags.append(FLAG_DOWNSTREAM_PROTOCOL_ERROR)
            if s.on_cancel is not None:
                s.on_cancel()
            if not s.head_sent:
                s.reply(status, body)
            else:
                s.abort()
            self.close()
            return
        stream = s or Stream(self)
        stream.keep_alive = False
        stream.describe_request()
        stream.info.response_flags.append(FLAG_DOWNSTREAM_PROTOCOL_ERROR)
        stream.info.response_code = status
        if self.active is not None or self.queue:
            self.deferred_error = (stream, status, body)  # earlier pipelined requests are answered first
            return
        self._send_error(stream, status, body)

    def _send_error(self, stream: Stream, status: int, body: bytes) -> None:
        if self.on_protocol_error:
            self.on_protocol_error(stream, status)
        hdrs: Headers = [(b"content-type", b"text/plain")]
        self.write(status_line(status) + serialize_headers(hdrs)
                   + b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.close()

    def write(self, data: bytes) -> None:
        """Buffer: a response's head and body leave in one send() at the next flush."""
        self.wbuf.append(data)

    def flush(self) -> None:
        if self.wbuf:
            data = b"".join(self.wbuf) if len(self.wbuf) > 1 else self.wbuf[0]
            self.wbuf = []
            if self.transport is not None and not self.closed:
                self.transport.write(data)
                self.last_activity = self.loop.time()

    def close(self) -> None:
        self.flush()
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    # -- parser callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.current = Stream(self)
        self.in_head = True
        self.head_bytes = 0

    def on_url(self, url: bytes) -> None:
        s = self.current
        assert s is not None
        s.url += url
        if len(s.url) > MAX_URL_BYTES:
            raise _Reject(414, b"uri too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        s = self.current
        assert s is not None
        if s.headers_done:
            return  # a trailer: never allowed to change routing or policy decided on the head
        s.header_bytes += len(name) + len(value) + 4
        if s.header_bytes > self.max_header_bytes:
            raise _Reject(431, b"request header fields too large")
        name = name.lower()
        s.headers.append((name, value))
        seen = s.seen
        if name in seen:
            if name == b"content-length" and seen[name] != value:
                raise _Reject(400, b"conflicting content-length")
            if name == b"host":
                raise _Reject(400, b"more than one host header")  # RFC 7230 5.4
            if name == b"transfer-encoding":
                value = seen[name] + b", " + value  # codings add up across lines
        seen[name] = value
        if name[:8] == b"x-envoy-":
            s.envoy_headers = True

    def on_headers_complete(self) -> None:
        s = self.current
        assert s is not None
        p = self.parser
        s.method = p.get_method()
        s.http_version = p.get_http_version()
        s.keep_alive = p.should_keep_alive()
        s.headers_done = True
        self.in_head = False
        if s.method == b"CONNECT":
            raise _Reject(405, b"CONNECT is not supported")
        seen = s.seen
        te = seen.get(b"transfer-encoding")
        cl = seen.get(b"content-length")
        expect = seen.get(b"expect")
        if expect is not None and expect.lower() == b"100-continue" and s.http_version == "1.1":
            s.expect_continue = True  # (an HTTP/1.0 client must not be sent a 1xx, RFC 7231 5.1.1)
        if te is not None:
            if cl is not None:  # request smuggling vector (RFC 7230 3.3.3): refuse outright
                raise _Reject(400, b"content-length and transfer-encoding together")
            if te.strip().lower() != b"chunked":
                raise _Reject(501, b"unsupported transfer-encoding")
            s.chunked_request = True
        elif cl is not None:
            s.content_length = int(cl)
        if s.expect_continue and self.active is None:
            self._send_continue(s)
        if not s.chunked_request and not s.content_length:
            s.body_complete = True
            self._ready(s)

    def on_body(self, body: bytes) -> None:
        s = self.current
        assert s is not None
        s.info.bytes_received += len(body)
        if s.streaming:
            if s.body_sink is not None:
                s.body_sink(body)
            else:
                s.body += body
            return
        s.body += body
        if len(s.body) > BODY_BUFFER_LIMIT:
            s.streaming = True
            self._ready(s)

    def on_message_complete(self) -> None:
        s = self.current
        assert s is not None
        self.current = None
        if s.body_complete and not s.streaming:
            return  # no body: already dispatched
        s.body_complete = True
        if s.streaming:
            if s.body_done_sink is not None:
                s.body_done_sink()
        else:
            self._ready(s)

    # -- serving ----------------------------------------------------------------
    def _ready(self, s: Stream) -> None:
        if self.active is None:
            self._start(s)
        else:
            self.queue.append(s)
            if self.transport is not None:
                self.transport.pause_reading()  # pipelined: don't read further ahead

    def _send_continue(self, s: Stream) -> None:
        if not s.continue_sent and not s.body_complete:
            s.continue_sent = True
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.flush()

    def _start(self, s: Stream) -> None:
        self.active = s
        if s.expect_continue:
            self._send_continue(s)
        try:
            self.handler(s)
        except Exception as exc:  # a bug must cost one request, never the process
            if not s.head_sent:
                s.info.response_flags.append("LR")
                s.keep_alive = False
                s.reply(500, f"internal error: {type(exc).__name__}".encode())
            elif not s.done:
                s.abort()
            traceback.print_exc()

    def stream_finished(self, s: Stream, broken: bool = False) -> None:
        if s is not self.active:
            return
        self.active = None
        if self.on_stream_done is not None:
            self.on_stream_done(s)
        if broken or not s.keep_alive or s.response_close or not s.body_complete:
            self.close()
            return
        self._next()

    def _next(self) -> None:
        """Serve queued (pipelined) requests in order, iteratively: local replies finish synchronously,
        and starting the next one from inside the previous one's completion would recurse."""
        if self._draining:
            return
        self._draining = True
        try:
            while self.active is None and self.queue and not self.closed:
                self._start(self.queue.popleft())
        finally:
            self._draining = False
        if self.active is None and not self.closed:
            if self.deferred_error is not None:
                stream, status, body = self.deferred_error
                self.deferred_error = None
                self._send_error(stream, status, body)
            elif self.transport is not None and not self.failed:
                self.transport.resume_reading()



class _Reject(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body
