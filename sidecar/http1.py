"""HTTP/1.1 wire details shared by the downstream and upstream sides.

Headers travel as lists of (name, value) byte pairs in arrival order, names
lower-cased once at parse time: the proxy must keep repeated headers and
their order, and lower-case names make the hop-by-hop checks a set lookup.
"""

from __future__ import annotations

import httptools

Headers = list[tuple[bytes, bytes]]

#: RFC 7230 6.1 hop-by-hop headers, plus the legacy ones proxies strip too.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"transfer-encoding", b"upgrade",
})

STATUS_REASONS = {
    100: b"Continue", 200: b"OK", 201: b"Created", 204: b"No Content", 301: b"Moved Permanently",
    302: b"Found", 304: b"Not Modified", 400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found",
    405: b"Method Not Allowed", 408: b"Request Timeout", 409: b"Conflict", 413: b"Payload Too Large",
    414: b"URI Too Long", 429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway", 503: b"Service Unavailable",
    504: b"Gateway Timeout",
}

_STATUS_LINES: dict[int, bytes] = {}


def status_line(code: int) -> bytes:
    line = _STATUS_LINES.get(code)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (code, STATUS_REASONS.get(code, b"Unknown"))
        _STATUS_LINES[code] = line
    return line


def connection_tokens(headers: Headers) -> set[bytes]:
    """Header names listed in Connection: they are hop-by-hop for this message only."""
    out: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            out.update(t.strip().lower() for t in value.split(b","))
    return out


def serialize_headers(headers: Headers) -> bytes:
    return b"".join(b"%s: %s\r\n" % (n, v) for n, v in headers)


def no_body_expected(method: bytes, status: int) -> bool:
    return method == b"HEAD" or status in (204, 304) or 100 <= status < 200


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def framed_body(body: bytes, chunked: bool, content_length: int | None) -> list[bytes]:
    """The end of a head and its buffered body, framed as the request came: chunked (one chunk, as Envoy
    forwards a buffered chunked body), with a length, or no body at all."""
    if chunked:
        return [b"transfer-encoding: chunked\r\n\r\n", *((chunk(body),) if body else ()), LAST_CHUNK]
    if body or content_length is not None:
        return [b"content-length: %d\r\n\r\n" % len(body), body]
    return [b"\r\n"]


class HeadResponseParsing:
    """The one workaround for HEAD replies, for every protocol that parses responses with httptools.

    httptools ignores a callback's "no body" answer, so after the head of a HEAD reply the parser
    would wait for its Content-Length bytes forever. ``end_head_only`` ends the message at once and
    marks the parser stale; ``renew_parser`` gives the next response a fresh one (called before the
    next request is sent, so no byte of it can reach the old parser).
    """

    __slots__ = ()
    parser: httptools.HttpResponseParser
    stale_parser: bool

    def on_message_complete(self) -> None:  # pragma: no cover - every user defines its own
        raise NotImplementedError

    def end_head_only(self) -> None:
        self.stale_parser = True
        self.on_message_complete()

    def renew_parser(self) -> None:
        if self.stale_parser:
            self.parser = httptools.HttpResponseParser(self)
            self.stale_parser = False
