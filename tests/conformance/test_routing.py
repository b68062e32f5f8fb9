"""Conformance: virtual host and route matching, direct responses, the headers both sides see."""

from __future__ import annotations

import pytest

from tests.conformance.harness import Pair, Probe, check


def host_exact(p: Probe) -> None:
    p.exchange("GET", "/echo/host", "route.test")
    p.upstream("")


def host_with_port(p: Probe) -> None:
    """route.test:8080 is not the domain route.test: the catch-all virtual host, which has no such route."""
    p.exchange("GET", "/echo/port", "route.test:8080")


def host_case_insensitive(p: Probe) -> None:
    p.exchange("GET", "/echo/case", "ROUTE.Test")
    p.upstream("", headers=False)


def host_suffix_wildcard(p: Probe) -> None:
    p.exchange("GET", "/", "a.b.wild.test", key="deep")
    p.exchange("GET", "/", "wild.test", key="bare")  # the suffix needs something before it


def host_prefix_wildcard(p: Probe) -> None:
    p.exchange("GET", "/", "pre.example.org")


def host_catch_all(p: Probe) -> None:
    p.exchange("GET", "/catchall/x", "unknown.example")


def no_route_unknown_host(p: Probe) -> None:
    p.exchange("GET", "/nothing-here", "unknown.example")


def no_route_in_virtual_host(p: Probe) -> None:
    p.exchange("GET", "/echo/x", "route.test", headers=[("x-no-route", "1")])


def path_exact(p: Probe) -> None:
    p.exchange("GET", "/exact", "route.test", key="hit")
    p.upstream("hit")
    p.exchange("GET", "/exact?q=1", "route.test", key="query")  # the query is not part of the path
    p.upstream("query", headers=False)
    p.exchange("GET", "/exact/more", "route.test", headers=[("x-no-route", "1")], key="longer")


def prefix_case_insensitive(p: Probe) -> None:
    p.exchange("GET", "/CI/Upper", "route.test")
    p.upstream("")


def regex_path(p: Probe) -> None:
    p.exchange("GET", "/re/123", "route.test", key="digits")
    p.upstream("digits", headers=False)
    p.exchange("GET", "/re/12a", "route.test", headers=[("x-no-route", "1")], key="letters")  # full match only


def header_matchers(p: Probe) -> None:
    p.exchange("GET", "/hdr", "route.test", headers=[("x-variant", "blue")], key="exact")
    p.exchange("GET", "/hdr", "route.test", headers=[("x-present", "")], key="present")
    p.exchange("GET", "/hdr", "route.test", headers=[("x-num", "123")], key="regex")
    p.exchange("GET", "/hdr", "route.test", headers=[("x-num", "1234")], key="regex_full")
    p.exchange("GET", "/hdr", "route.test", headers=[("x-variant", "green")], key="inverted_out")
    p.exchange("GET", "/hdr", "route.test", headers=[("x-variant", "Blue")], key="exact_case")


def prefix_rewrite(p: Probe) -> None:
    p.exchange("GET", "/rewrite/a/b?x=1", "route.test")
    p.upstream("")


def direct_response_ok(p: Probe) -> None:
    p.exchange("GET", "/direct/ok", "route.test", local=True)


def direct_response_503(p: Probe) -> None:
    p.exchange("GET", "/direct/unavailable", "route.test", local=True)


def direct_response_empty(p: Probe) -> None:
    p.exchange("GET", "/direct/empty", "route.test", local=True)


def direct_response_head(p: Probe) -> None:
    p.exchange("HEAD", "/direct/ok", "route.test", local=True)


def forwarded_headers(p: Probe) -> None:
    """x-forwarded-for / -proto, x-request-id generated, hop-by-hop request headers removed."""
    p.exchange("GET", "/echo/fwd", "plain.test",
               headers=[("connection", "keep-alive, x-hop"), ("x-hop", "1"), ("keep-alive", "timeout=5"),
                        ("te", "trailers"), ("user-agent", "conformance/1")])
    p.upstream("")


def forwarded_headers_kept(p: Probe) -> None:
    """A caller's x-request-id and x-forwarded-for."""
    p.exchange("GET", "/echo/kept", "plain.test",
               headers=[("x-request-id", "caller-id-1"), ("x-forwarded-for", "203.0.113.7"),
                        ("x-forwarded-proto", "https")])
    p.upstream("")


def response_hop_by_hop(p: Probe) -> None:
    p.exchange("GET", "/hop-response", "plain.test")


def upstream_server_header(p: Probe) -> None:
    """What the client sees of an upstream's own Server and Date headers, and of a 404 from it."""
    p.exchange("GET", "/status/404", "plain.test")


def absolute_form(p: Probe) -> None:
    with p.conn() as c:
        c.send(p.req("GET", "http://route.test/echo/abs", "other.example"))
        p.response("", c.response())
    p.upstream("")


def http10(p: Probe) -> None:
    """HTTP/1.0: Envoy's default (accept_http_10 false) is a 426; we serve it (see docs/envoy-differences.md)."""
    with p.conn() as c:
        c.send(p.req("GET", "/echo/http10", "plain.test", version="1.0"))
        r = c.response()
    p.put("status", str(r.status))


http10.compare_stats = False  # a whole-request difference: status is the one observation
http10.compare_log = False


def edge_forwarded_for(p: Probe) -> None:
    """The listener with Envoy's default use_remote_address (false): Envoy leaves x-forwarded-for alone."""
    with p.conn(edge=True) as c:
        c.send(p.req("GET", "/echo/edge", "plain.test"))
        p.put("status", str(c.response().status))
    p.upstream("")


def edge_envoy_headers(p: Probe) -> None:
    """x-envoy-* request headers on that listener: Envoy treats the request as external and ignores them."""
    with p.conn(edge=True) as c:
        c.send(p.req("GET", "/status/503", "plain.test",
                     headers=[("x-envoy-retry-on", "5xx"), ("x-envoy-max-retries", "2")]))
        p.put("status", str(c.response().status))
    p.upstream("", headers=False)


for _f in (edge_forwarded_for, edge_envoy_headers):  # one documented difference each: the observations above say it
    _f.compare_stats = False
    _f.compare_log = False


SCENARIOS = {f.__name__: f for f in (
    host_exact, host_with_port, host_case_insensitive, host_suffix_wildcard, host_prefix_wildcard,
    host_catch_all, no_route_unknown_host, no_route_in_virtual_host, path_exact, prefix_case_insensitive,
    regex_path, header_matchers, prefix_rewrite, direct_response_ok, direct_response_503, direct_response_empty,
    direct_response_head, forwarded_headers, forwarded_headers_kept, response_hop_by_hop, upstream_server_header,
    absolute_form, http10, edge_forwarded_for, edge_envoy_headers,
)}


@pytest.mark.parametrize("name", SCENARIOS)
def test_routing(pair: Pair, name: str) -> None:
    check(pair, name, SCENARIOS[name])
