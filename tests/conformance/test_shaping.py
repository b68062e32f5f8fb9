"""Conformance: traffic shaping on tests/conformance/envoy_shaping.yaml — weighted clusters, header mutations at
three levels with their append actions, regex_rewrite, host_rewrite_literal, request mirroring, previous_hosts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.harness import HERE, Pair, Probe, check, start_pair, wait_upstream


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    yield from start_pair(Path(tmp_path_factory.mktemp("conformance_shaping")), HERE / "envoy_shaping.yaml")


def weighted_split(p: Probe) -> None:
    """90/10 over N = 1000 on keep-alive connections. Envoy picks at random per request (not a fixed order), so
    the share is compared within a bound: sd = sqrt(.1 * .9 / 1000) = 0.0095, +-0.04 is 4.2 sd (a false failure
    about once in 40 000 runs per engine). Every request counts in its chosen cluster's stats, nowhere else."""
    n = 1000
    before = p.engine.stats()
    tag = p.tag()
    with p.conn() as c:
        for i in range(n):
            c.send(p.req("GET", f"/split/{i}", "shape.test", headers=[("x-split", tag)]))
            assert c.response().status == 200
    time.sleep(0.1)
    with p.engine.upstream.lock:
        recs = [r for r in p.engine.upstream.requests if r.header("x-split") == tag]
    canary = sum(1 for r in recs if r.listener.startswith(p.engine.lb[0]))
    share = canary / n
    p.put("requests seen upstream", str(len(recs)))
    p.put("canary share", "within 0.06-0.14" if 0.06 <= share <= 0.14 else f"{share:.3f}")
    after = p.engine.stats()
    delta = {c: after.get(f"cluster.{c}.upstream_rq_total", 0) - before.get(f"cluster.{c}.upstream_rq_total", 0)
             for c in ("svc", "canary")}
    p.put("stats match the upstreams", str(delta == {"svc": n - canary, "canary": canary}))


weighted_split.compare_stats = False  # random by design: the observations above bound them
weighted_split.compare_log = False


def weighted_zero_weight(p: Probe) -> None:
    """A cluster of weight 0 is never chosen; the weights need not add up to 100."""
    for i in range(5):
        p.exchange("GET", f"/all-canary/{i}", "shape.test", key=f"r{i}")


def header_levels(p: Probe) -> None:
    p.exchange("GET", "/echo/hdr", "shape.test", headers=[
        ("x-drop-me", "1"), ("x-over", "client"), ("x-absent", "client"), ("x-only-if", "client"),
        ("x-appended", "client"), ("x-forwarded-proto", "http")])
    p.upstream("")


def header_overwrite_if_exists_absent(p: Probe) -> None:
    """OVERWRITE_IF_EXISTS adds nothing when the header is absent; an empty value is not added."""
    p.exchange("GET", "/echo/hdr", "shape.test")
    p.upstream("")


def header_global_only(p: Probe) -> None:
    """A route without mutations still gets its virtual host's and the route configuration's."""
    p.exchange("GET", "/echo/plain", "shape.test")
    p.upstream("")


def response_headers_local_reply(p: Probe) -> None:
    """A local reply of the router (503, the cluster is down) and the route's response_headers_to_add."""
    p.exchange("GET", "/local-hdr", "shape.test", local=True)


def response_headers_direct(p: Probe) -> None:
    p.exchange("GET", "/direct-hdr", "shape.test", local=True)


def regex_rewrite(p: Probe) -> None:
    p.exchange("GET", "/regex/abc/42?q=1", "shape.test", key="groups")
    p.upstream("groups")
    p.exchange("GET", "/regex-all/banana?a=a", "shape.test", key="global")  # every match; the query untouched
    p.upstream("global")


def host_rewrite(p: Probe) -> None:
    p.exchange("GET", "/host/x", "shape.test")
    p.upstream("")


def _mirror_records(p: Probe, tag: str) -> None:
    recs = wait_upstream(p.engine.upstream, tag, timeout=1.0)
    deadline = time.monotonic() + 1.0
    while len(recs) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
        recs = wait_upstream(p.engine.upstream, tag)
    p.put("upstream requests", str(len(recs)))
    for r in recs:
        who = "shadow" if r.listener.startswith(p.engine.lb[2]) else "main"
        p.put(f"{who}.request", f"{r.method} {r.target} body={r.body_length}")
        p.put(f"{who}.headers", p._headers([(n.lower(), v) for n, v in r.headers]))


def mirror(p: Probe) -> None:
    p.exchange("GET", "/mirror/x", "shape.test")
    _mirror_records(p, p.tags[-1])


def mirror_with_port_and_body(p: Probe) -> None:
    p.exchange("POST", "/mirror/post", "shape.test:8080", body=b"hello shadow")
    _mirror_records(p, p.tags[-1])


def mirror_shadow_down(p: Probe) -> None:
    """The shadow cluster refuses connections: the main request does not notice."""
    t0 = time.monotonic()
    p.exchange("GET", "/mirror/dead", "shape.test")
    p.timing("elapsed", time.monotonic() - t0, 0.0, 0.2)
    time.sleep(0.4)  # the shadow's connect failure lands in the dead cluster's stats


def previous_hosts(p: Probe) -> None:
    """3 attempts on a RANDOM cluster of 3 hosts: previous_hosts (re-picking up to 50 times) spreads them."""
    for i in range(5):
        r = p.exchange("GET", "/prev/status/503", "shape.test", key=f"r{i}")
        assert r.status == 503
        recs = wait_upstream(p.engine.upstream, p.tags[-1])
        deadline = time.monotonic() + 1
        while len(recs) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
            recs = wait_upstream(p.engine.upstream, p.tags[-1])
        p.put(f"r{i}.distinct hosts", str(len({r.listener for r in recs})))


previous_hosts.compare_log = False  # the access log names the (random) last host


SCENARIOS = [weighted_split, weighted_zero_weight, header_levels, header_overwrite_if_exists_absent,
             header_global_only, response_headers_local_reply, response_headers_direct, regex_rewrite,
             host_rewrite, mirror, mirror_with_port_and_body, mirror_shadow_down, previous_hosts]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.__name__ for s in SCENARIOS])
def test_shaping(pair: Pair, scenario) -> None:  # noqa: ANN001
    check(pair, scenario.__name__, scenario)
