"""The downstream side: one protocol object per client connection, httptools callbacks.

Shaped like uvicorn's httptools protocol: the parser drives callbacks, each
request becomes a ``Stream``, streams of one connection are served strictly
in order (pipelining), and flow control is end to end — when the client reads
slowly, the upstream side is paused, never buffered without bound.
"""

from __future__ import annotations

import asyncio
import enum
import time
import traceback
from collections import deque
from collections.abc import Callable
from email.utils import formatdate
from typing import Any, Protocol

import httptools

from sidecar.flow_control import FAILED, PIPELINED, ReadFlowControl, WriteFlowControl
from sidecar.http1 import LAST_CHUNK, Headers, chunk, no_body_expected, serialize_headers, status_line
from sidecar.request_info import FLAG_DOWNSTREAM_PROTOCOL_ERROR, RequestInfo
from sidecar.stats import Counter

Handler = Callable[["Stream"], None]

#: A request body up to this size is buffered so it can be replayed on retry.
BODY_BUFFER_LIMIT = 1024 * 1024
MAX_URL_BYTES = 16 * 1024
HIGH_WATER = 256 * 1024
#: Envoy's default max_request_headers_count: the 101st request header is a 431.
MAX_HEADERS_COUNT = 100
#: What nghttp2 (and so Envoy) accepts in an authority: anything else in Host is a 400 (http.invalid_authority).
_AUTHORITY_BYTES = b"-.0123456789:ABCDEFGHIJKLMNOPQRSTUVWXYZ[]_abcdefghijklmnopqrstuvwxyz~!$&'()*+,;=%@"
#: Envoy refuses a Connection header that nominates these (removing them would hide who asked), or 10+ tokens.
_NOT_NOMINABLE = frozenset({b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto"})
MAX_CONNECTION_TOKENS = 9
BAD_REQUEST = b"Bad Request"  # Envoy's body for a request its codec refuses
#: Envoy's HCM sends these on every response (server_name "envoy", server_header_transformation OVERWRITE: an
#: upstream's own Server header is replaced). The Date line is formatted once per second.
SERVER_HEADER = b"server: envoy\r\n"
_date_cache: list = [0, b""]


def date_header() -> bytes:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = b"date: %s\r\n" % formatdate(now, usegmt=True).encode()
    return _date_cache[1]


class StreamEnd(enum.Enum):
    """How a stream ended, as the connection manager counts it."""

    COMPLETE = "complete"  # served: the response went out whole
    LOCAL_RESET = "local_reset"  # served, but we cut the response short (Envoy: downstream_rq_tx_reset)
    CLIENT_RESET = "client_reset"  # the client left while it was being served (downstream_rq_rx_reset)
    CLIENT_LEFT_EARLY = "client_left_early"  # the client left mid-upload, before it could be served
    PROTOCOL_ERROR = "protocol_error"  # refused by the codec, never served


class StreamReceiver(Protocol):
    """What the layer serving a stream (the router) hears from the downstream side: nothing else."""

    def on_request_body(self, data: bytes) -> None:
        """A piece of a request body too large to buffer (``Stream.streaming``)."""

    def on_request_end(self) -> None:
        """The last byte of such a body arrived."""

    def on_downstream_reset(self) -> None:
        """The stream ends under the receiver's feet (client gone, protocol error): stop the upstream work."""


class ConnectionManager(Protocol):
    """What a downstream connection tells the layer above it (the HTTP connection manager, or the admin)."""

    def on_connection_open(self, conn: DownstreamProtocol) -> None: ...

    def on_connection_close(self, conn: DownstreamProtocol) -> None: ...

    def on_request(self, stream: Stream) -> None:
        """A request head (and its body, unless it streams) arrived and its turn came: serve it."""

    def on_stream_done(self, stream: Stream, end: StreamEnd) -> None:
        """Every stream that had a request head ends here exactly once (served or not)."""

    def on_idle_timeout(self, conn: DownstreamProtocol) -> None:
        """The connection was silent too long and is being closed."""


class HandlerOnly:
    """A ``ConnectionManager`` that only serves requests (the admin interface)."""

    __slots__ = ("on_request",)

    def __init__(self, handler: Handler) -> None:
        self.on_request = handler

    def on_connection_open(self, conn: DownstreamProtocol) -> None:
        pass

    def on_connection_close(self, conn: DownstreamProtocol) -> None:
        pass

    def on_stream_done(self, stream: Stream, end: StreamEnd) -> None:
        pass

    def on_idle_timeout(self, conn: DownstreamProtocol) -> None:
        pass


class Stream:
    """One request and its response on a downstream connection."""

    __slots__ = (
        "conn", "method", "url", "headers", "http_version", "keep_alive", "body", "body_complete",
        "streaming", "receiver", "info", "head_sent", "chunked_response", "done",
        "head_only", "header_bytes", "content_length", "chunked_request", "expect_continue",
        "response_close", "bytes_sent", "seen", "envoy_headers", "headers_done", "continue_sent", "trace",
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
        self.receiver: StreamReceiver | None = None  # who serves it (the router), while it does
        now = time.time()
        self.info = RequestInfo(start_time=now, start_monotonic=time.monotonic(),
                                downstream_remote=conn.remote, downstream_local=conn.local)
        self.head_sent = False
        self.chunked_response = False
        self.done = False
        self.head_only = False
        self.header_bytes = 0
        self.content_length: int | None = None
        self.chunked_request = False
        self.expect_continue = False
        self.response_close = False
        self.bytes_sent = 0
        self.trace: Any = None  # sidecar.tracing.Trace when the connection manager traces this request

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
        out = [status_line(status), serialize_headers(headers), date_header(), SERVER_HEADER]
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

    def send_body(self, data: bytes) -> bool:
        """Queue body bytes; False when the client is not keeping up (see ``when_writable``)."""
        conn = self.conn
        if self.head_only or not data or self.done:
            return not conn.write_paused
        self.bytes_sent += len(data)
        conn.write(chunk(data) if self.chunked_response else data)
        return not conn.write_paused

    def flush(self) -> None:
        """Send what was queued, in one write."""
        self.conn.flush()

    def when_writable(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the client has drained its backlog (or is gone)."""
        self.conn.when_writable(callback)

    def pause_reading(self, reason: int) -> None:
        """Stop reading this stream's connection for ``reason`` (a ``sidecar.flow_control`` reason)."""
        self.conn.reading.pause(reason)

    def resume_reading(self, reason: int) -> None:
        self.conn.reading.resume(reason)

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


#: Byte counters of connections nobody counts (the admin's).
_UNCOUNTED = Counter("uncounted")


class DownstreamProtocol(WriteFlowControl, asyncio.Protocol):
    #: The verified client certificate's first URI SAN (a SPIFFE id) on a TLS connection; None for plaintext
    #: or no client certificate. A class attribute: plaintext connections never pay for setting it.
    peer_identity: str | None = None
    #: The TLS connection's details for the access log (sidecar.tls.TlsInfo); None on plaintext.
    tls_info: object | None = None

    def __init__(self, manager: ConnectionManager, max_header_bytes: int = 60 * 1024,
                 idle_timeout_s: float = 0.0) -> None:
        self.manager = manager
        self.idle_timeout_s = idle_timeout_s  # enforced by the sidecar's sweeper; 0: never
        self.max_header_bytes = max_header_bytes
        self.rx_bytes = self.tx_bytes = _UNCOUNTED  # the manager points these at its counters
        self.transport: asyncio.Transport | None = None
        self.reading = ReadFlowControl(None)
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
        self.last_activity = self.opened_at = self.loop.time()  # for the idle sweeper (slow or silent clients)
        self.in_head = False  # between a request's first byte and the end of its headers
        self.head_bytes = 0
        self.failed = False  # a protocol error was seen: ignore further input
        self.deferred_error: tuple[Stream, int, bytes] | None = None  # sent after the in-flight response
        self._draining = False

    # -- connection ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.reading.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        self.remote = f"{peer[0]}:{peer[1]}" if peer else ""
        self.remote_ip = peer[0].encode() if peer else b""
        self.local = f"{sock[0]}:{sock[1]}" if sock else ""
        self.manager.on_connection_open(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        s = self.active
        if s is not None and not s.done:
            s.info.response_flags.append("DC")
            if s.receiver is not None:
                s.receiver.on_downstream_reset()  # the client is gone: stop the upstream attempt too
            s.done = True
            self.active = None
            self.manager.on_stream_done(s, StreamEnd.CLIENT_RESET)
        cur = self.current
        if cur is not None and cur is not s and cur.headers_done and not cur.done:
            cur.done = True  # the client left mid-upload, before the request could be served
            cur.info.response_flags.append("DC")
            cur.describe_request()
            self.manager.on_stream_done(cur, StreamEnd.CLIENT_LEFT_EARLY)
        self.queue.clear()
        for w in self.drain_waiters:
            w()
        self.drain_waiters.clear()
        self.manager.on_connection_close(self)

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        self.rx_bytes.value += len(data)
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
                self._protocol_error(rej.status, rej.body, rej.flag)
            else:
                self._protocol_error(400, b"malformed request")

    def _protocol_error(self, status: int, body: bytes, flag: str | None = FLAG_DOWNSTREAM_PROTOCOL_ERROR) -> None:
        self.failed = True
        self.reading.pause(FAILED)
        s = self.current
        if s is not None and s is self.active:
            # The request being served went bad mid-body: end it through the normal path, once.
            s.keep_alive = False
            if flag is not None:
                s.info.response_flags.append(flag)
            if s.receiver is not None:
                s.receiver.on_downstream_reset()
            if not s.head_sent:
                s.reply(status, body)
            else:
                s.abort()
            self.close()
            return
        stream = s or Stream(self)
        stream.keep_alive = False
        if not stream.method and stream.url:  # (the parser's method is only meaningful once a URL followed it)
            stream.method = self.parser.get_method()  # known from the request line, even if the head failed later
        stream.describe_request()
        if flag is not None:
            stream.info.response_flags.append(flag)
        stream.info.response_code = status
        if self.active is not None or self.queue:
            self.deferred_error = (stream, status, body)  # earlier pipelined requests are answered first
            return
        self._send_error(stream, status, body)

    def _send_error(self, stream: Stream, status: int, body: bytes) -> None:
        stream.done = True  # answered: the close below must not log it a second time as a client reset
        self.manager.on_stream_done(stream, StreamEnd.PROTOCOL_ERROR)
        hdrs: Headers = [(b"content-type", b"text/plain")] if body else []
        self.write(status_line(status) + serialize_headers(hdrs) + date_header() + SERVER_HEADER
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
                self.tx_bytes.value += len(data)
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
        if len(s.headers) >= MAX_HEADERS_COUNT:
            raise _Reject(431, b"Request Header Fields Too Large")  # Envoy's body (http1.too_many_headers)
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
        if s.http_version != "1.1" and s.http_version != "1.0":
            raise _Reject(400, b"")  # HTTP/0.9 has no headers, so no Host: Envoy answers an empty 400
        seen = s.seen
        if s.url[:1] == b"/" or s.url == b"*":
            self._check_authority(s)  # (absolute form: the router takes the authority from the URL)
        if b"connection" in seen:
            self._check_connection(s)
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

    @staticmethod
    def _check_authority(s: Stream) -> None:
        """Origin form names its target only through Host, which therefore must exist and be well formed.

        Envoy (accept_http_10 on, no default host) answers a missing Host with an empty 400 and no response
        flag, for HTTP/1.0 too; an empty Host is allowed (RFC 7230 5.4).
        """
        host = s.seen.get(b"host")
        if host is None:
            raise _Reject(400, b"", None)
        if host.translate(None, _AUTHORITY_BYTES):
            raise _Reject(400, BAD_REQUEST)

    @staticmethod
    def _check_connection(s: Stream) -> None:
        """Connection tokens nominate hop-by-hop headers (RFC 7230 6.1); Envoy refuses the dangerous ones.

        Nominating X-Forwarded-* would let a client erase what the proxies before us recorded, and a pseudo
        header or 10+ tokens is not a real request: 400 with DPE, as Envoy. Envoy removes a nominated Host
        and then finds Host missing; we never drop Host, so that request gets the same empty 400 directly.
        """
        tokens = [t.strip().lower() for n, v in s.headers if n == b"connection" for t in v.split(b",")]
        if len(tokens) > MAX_CONNECTION_TOKENS:
            raise _Reject(400, BAD_REQUEST)
        if any(t in _NOT_NOMINABLE or t[:1] == b":" for t in tokens):
            raise _Reject(400, BAD_REQUEST)
        if b"host" in tokens and (s.url[:1] == b"/" or s.url == b"*"):
            raise _Reject(400, b"", None)

    def on_body(self, body: bytes) -> None:
        s = self.current
        assert s is not None
        s.info.bytes_received += len(body)
        if s.streaming:
            if s.receiver is not None:
                s.receiver.on_request_body(body)
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
            if s.receiver is not None:
                s.receiver.on_request_end()
        else:
            self._ready(s)

    # -- serving ----------------------------------------------------------------
    def _ready(self, s: Stream) -> None:
        if self.active is None:
            self._start(s)
        else:
            self.queue.append(s)
            self.reading.pause(PIPELINED)  # don't read further ahead

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
            self.manager.on_request(s)
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
        self.manager.on_stream_done(s, StreamEnd.LOCAL_RESET if broken else StreamEnd.COMPLETE)
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
            else:
                self.reading.resume(PIPELINED)



class _Reject(Exception):
    def __init__(self, status: int, body: bytes, flag: str | None = FLAG_DOWNSTREAM_PROTOCOL_ERROR) -> None:
        self.status = status
        self.body = body
        self.flag = flag  # None: a local reply Envoy's HCM makes (no response flag), not a codec error
