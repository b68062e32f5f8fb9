"""Conformance: HTTP/1.1 framing both ways, 100-continue, large bodies, pipelining, keep-alive, load balancing."""

from __future__ import annotations

import hashlib

import pytest

from tests.conformance.harness import Pair, Probe, check
from tests.upstreams import CHUNKED_BODY

BIG = 2 * 1024 * 1024 + 17  # over the sidecar's 1 MiB replay buffer: streamed


def head_request(p: Probe) -> None:
    p.exchange("HEAD", "/echo/head", "plain.test")
    p.upstream("")


def head_keeps_connection(p: Probe) -> None:
    """A HEAD answer has a content-length and no body: the next request on the connection must still work."""
    with p.conn() as c:
        c.send(p.req("HEAD", "/big/5000", "plain.test"))
        p.response("head", c.response("HEAD"))
        c.send(p.req("GET", "/status/200", "plain.test"))
        p.response("next", c.response())


def chunked_response(p: Probe) -> None:
    r = p.exchange("GET", "/chunked", "plain.test")
    p.put("body_ok", str(r.body == CHUNKED_BODY))


def chunked_response_one_send(p: Probe) -> None:
    p.exchange("GET", "/chunked-one", "plain.test")


def close_delimited_response(p: Probe) -> None:
    r = p.exchange("GET", "/close-delimited", "plain.test")
    p.put("body_length", str(len(r.body)))


def chunked_request(p: Probe) -> None:
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    with p.conn() as c:
        c.send(p.req("POST", "/echo/chunked-up", "plain.test", headers=[("transfer-encoding", "chunked")])[:-2]
               + b"\r\n" + body)
        p.response("", c.response())
    p.upstream("")


def content_length_request(p: Probe) -> None:
    p.exchange("POST", "/echo/cl-up", "plain.test", body=b"x" * 1000)
    p.upstream("")


def expect_100_continue(p: Probe) -> None:
    body = b"y" * 5000
    with p.conn() as c:
        c.send(p.req("POST", "/echo/continue", "plain.test",
                     headers=[("expect", "100-continue"), ("content-length", str(len(body)))]))
        p.put("interim", str(c.wait_interim(1.0)))
        c.send(body)
        p.response("", c.response())
    p.upstream("")


def large_request_body(p: Probe) -> None:
    body = bytes(range(256)) * (BIG // 256) + b"z" * (BIG % 256)
    with p.conn(timeout=10) as c:
        c.send(p.req("POST", "/echo/big-up", "plain.test", body=body))
        r = c.response()
        p.response("", r, body=False)
    recs = p.upstream("")
    if recs:
        p.put("upstream_body_length_ok", str(recs[0].body_length == len(body)))
    p.put("sha_seen_upstream", str(hashlib.sha256(body).hexdigest() in r.body.decode()))


def large_response_body(p: Probe) -> None:
    with p.conn(timeout=10) as c:
        c.send(p.req("GET", f"/big/{BIG}", "plain.test"))
        r = c.response()
    p.response("", r, body=False)
    p.put("body_ok", str(r.body == (b"0123456789abcdef" * (BIG // 16 + 1))[:BIG]))


def pipelining(p: Probe) -> None:
    with p.conn() as c:
        c.send(p.req("GET", "/echo/p1", "plain.test") + p.req("GET", "/status/404", "plain.test")
               + p.req("GET", "/direct/ok", "route.test"))
        for i in range(3):
            p.response(f"r{i}", c.response())


def keep_alive_reuse(p: Probe) -> None:
    """Five requests on one client connection; the upstream side reuses its pooled connection."""
    before = sum(p.engine.upstream.connections.values())
    with p.conn() as c:
        for i in range(5):
            c.send(p.req("GET", f"/status/200?i={i}", "plain.test"))
            r = c.response()
            p.put(f"r{i}.status", str(r.status))
        p.closed("after", c, timeout=0.2)
    p.put("new_upstream_connections_at_most_1", str(sum(p.engine.upstream.connections.values()) - before <= 1))


def connection_close_request(p: Probe) -> None:
    with p.conn() as c:
        c.send(p.req("GET", "/status/200", "plain.test", headers=[("connection", "close")]))
        p.response("", c.response())
        p.closed("after", c)


def upstream_connection_close(p: Probe) -> None:
    """The upstream closes after its response (connection: close): the client's connection stays usable."""
    with p.conn() as c:
        c.send(p.req("GET", "/status/200", "plain.test", headers=[("connection", "close")]))
        c.response()
        p.closed("after", c)


def round_robin(p: Probe) -> None:
    """30 sequential requests over 3 endpoints: round robin gives each exactly 10 (tolerance 0: it is a rotation,
    whatever endpoint it starts from)."""
    u = p.engine.upstream
    with u.lock:
        before = {k: sum(1 for r in u.requests if r.listener == k) for k in (f"{ip}:{p.engine.up_port}"
                                                                             for ip in p.engine.lb)}
    with p.conn() as c:
        for _ in range(30):
            c.send(p.req("GET", "/status/200", "lb.test"))
            c.response()
    with u.lock:
        counts = sorted(sum(1 for r in u.requests if r.listener == k) - n for k, n in before.items())
    p.put("per_endpoint", counts)


round_robin.compare_log = False  # 30 lines, each naming whichever endpoint: the counts say it


SCENARIOS = {f.__name__: f for f in (
    head_request, head_keeps_connection, chunked_response, chunked_response_one_send, close_delimited_response,
    chunked_request, content_length_request, expect_100_continue, large_request_body, large_response_body,
    pipelining, keep_alive_reuse, connection_close_request, upstream_connection_close, round_robin,
)}


@pytest.mark.parametrize("name", SCENARIOS)
def test_http1(pair: Pair, name: str) -> None:
    check(pair, name, SCENARIOS[name])
