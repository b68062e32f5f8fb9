"""Request header filters applied to every proxied request, in order.

Each is a small function (stream, headers) -> headers, so a feature is one
entry in ``DEFAULT_REQUEST_FILTERS`` rather than a branch inside the router
(the mitmproxy addon idea, at the size this proxy needs).
"""

from __future__ import annotations

from collections.abc import Callable
from random import getrandbits
from typing import TYPE_CHECKING

from sidecar.http1 import HOP_BY_HOP, Headers, connection_tokens

if TYPE_CHECKING:
    from sidecar.server import Stream

RequestFilter = Callable[["Stream", Headers], Headers]

#: Headers that steer this proxy; they are consumed here, not sent upstream. Content-Length is
#: re-framed by the router (the body may be buffered, replayed or streamed), so it is dropped too.
CONTROL_HEADERS = frozenset({
    b"x-envoy-retry-on", b"x-envoy-max-retries", b"x-envoy-retriable-status-codes",
    b"x-envoy-upstream-rq-timeout-ms", b"x-envoy-upstream-rq-per-try-timeout-ms", b"content-length",
})
_DROP = HOP_BY_HOP | CONTROL_HEADERS
#: End-to-end headers this proxy relies on: a Connection nomination never removes them. (The downstream codec
#: already refuses nominations of Host and X-Forwarded-*, as Envoy does; x-request-id must keep joining traces.)
_NEVER_NOMINATED = frozenset({b"host", b"x-request-id", b"x-forwarded-for", b"x-forwarded-proto"})


def strip_hop_by_hop(stream: Stream, headers: Headers) -> Headers:
    """Connection-level headers belong to one hop (RFC 7230 6.1), as do our control headers."""
    seen = stream.seen
    conn = seen.get(b"connection")
    if conn is not None:
        extra = connection_tokens(headers) - _NEVER_NOMINATED
        out = [h for h in headers if h[0] not in _DROP and h[0] not in extra]
    else:
        out = [h for h in headers if h[0] not in _DROP]
    if stream.expect_continue:  # answered here (100 Continue), as Envoy does: not asked of the upstream
        out = [h for h in out if h[0] != b"expect"]
    te = seen.get(b"te")
    if te is not None and te.strip().lower() == b"trailers":
        out.append((b"te", b"trailers"))  # the one TE value Envoy forwards
    return out


def forwarded_for(stream: Stream, headers: Headers) -> Headers:
    """Append the client's address so the upstream can see who asked."""
    ip = stream.conn.remote_ip
    seen = stream.seen
    for i, (n, v) in enumerate(headers) if b"x-forwarded-for" in seen else ():
        if n == b"x-forwarded-for":
            headers[i] = (n, v + b"," + ip)  # Envoy appends with a bare comma
            break
    else:  # (also when an earlier filter removed it: the client's address must always get through)
        headers.append((b"x-forwarded-for", ip))
    if b"x-forwarded-proto" not in seen:
        headers.append((b"x-forwarded-proto", b"http"))
    return headers


def _uuid4() -> bytes:
    """A version-4 UUID; request ids need uniqueness, not secrecy, so no urandom syscall per request."""
    h = "%032x" % ((getrandbits(128) & _UUID_CLEAR) | _UUID_SET)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}".encode()


new_request_id = _uuid4

_UUID_CLEAR = ~((0xF << 76) | (0x3 << 62))
_UUID_SET = (0x4 << 76) | (0x2 << 62)


def request_id(stream: Stream, headers: Headers) -> Headers:
    """Keep a caller's x-request-id (tracing joins on it), make one up otherwise."""
    if b"x-request-id" not in stream.seen:
        headers.append((b"x-request-id", _uuid4()))
    return headers


DEFAULT_REQUEST_FILTERS: tuple[RequestFilter, ...] = (strip_hop_by_hop, forwarded_for, request_id)
