"""Conformance: cluster-level resilience on tests/conformance/envoy_resilience.yaml — circuit breakers (max_requests,
max_connections + max_pending_requests, max_retries, retry_budget), outlier detection (consecutive_5xx, ejection,
the panic threshold) and active HTTP health checks. Stats of these clusters are compared explicitly (deltas and
gauges named per scenario), since the harness's watched set covers only the shared template's clusters."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.harness import HERE, Pair, Probe, check, start_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    yield from start_pair(Path(tmp_path_factory.mktemp("conformance_resilience")), HERE / "envoy_resilience.yaml")


def _deltas(p: Probe, before: dict[str, int], names: list[str], key: str = "delta") -> None:
    after = p.engine.stats()
    for n in names:
        p.put(f"{key} {n}", str(after.get(n, 0) - before.get(n, 0)))


def _gauges(p: Probe, key: str, names: list[str]) -> None:
    st = p.engine.stats()
    for n in names:
        p.put(f"{key} {n}", str(st.get(n, "(absent)")))


def _wait_stat(p: Probe, name: str, cond: object, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond(p.engine.stats().get(name, 0)):  # type: ignore[operator]
            return
        time.sleep(0.02)


def _clusters_line(p: Probe, cluster: str, field: str) -> None:
    status, body = p.engine.admin("/clusters")
    lines = [ln for ln in body.decode().splitlines() if ln.startswith(cluster + "::") and f"::{field}::" in ln]
    p.put(f"/clusters {cluster} {field}", [p.engine.normalise(ln) for ln in lines])


# --- circuit breakers --------------------------------------------------------------------------------------------


def cb_max_requests_overflow(p: Probe) -> None:
    """max_requests 1: a second request while one is in flight is refused at once: 503 UO."""
    c = "cluster.cb_rq."
    before = p.engine.stats()
    with p.conn() as a:
        a.send(p.req("GET", "/delay/0.4", "rq.test"))
        time.sleep(0.15)
        _gauges(p, "in flight", [c + "circuit_breakers.default.rq_open", c + "upstream_rq_active"])
        p.exchange("GET", "/status/200", "rq.test", key="second", local=True)
        p.response("first", a.response())
    _deltas(p, before, [c + n for n in ("upstream_rq_pending_overflow", "upstream_rq_total", "upstream_rq_200",
                                        "upstream_rq_503", "upstream_rq_completed", "upstream_cx_overflow")])
    _gauges(p, "after", [c + "circuit_breakers.default.rq_open"])


def cb_max_connections_queues_then_pending_overflows(p: Probe) -> None:
    """max_connections 1, max_pending_requests 1: the 2nd request waits for the connection, the 3rd overflows."""
    c = "cluster.cb_cx."
    before = p.engine.stats()
    with p.conn() as a, p.conn() as b:
        a.send(p.req("GET", "/delay/0.4", "cx.test"))
        time.sleep(0.15)
        b.send(p.req("GET", "/delay/0.05", "cx.test"))
        time.sleep(0.1)
        _gauges(p, "waiting", [c + "circuit_breakers.default.cx_open", c + "circuit_breakers.default.rq_pending_open",
                               c + "upstream_rq_pending_active"])
        p.exchange("GET", "/status/200", "cx.test", key="third", local=True)
        p.response("first", a.response())
        rb = b.response()
        p.response("second", rb)
        p.timing("second waited", rb.elapsed, 0.2, 1.0)
    _deltas(p, before, [c + n for n in ("upstream_cx_overflow", "upstream_rq_pending_overflow", "upstream_cx_total",
                                        "upstream_rq_total", "upstream_rq_pending_total", "upstream_rq_200")])


def cb_max_retries_zero(p: Probe) -> None:
    before = p.engine.stats()
    p.exchange("GET", "/status/503", "retry.test")
    p.upstream("", headers=False)
    _deltas(p, before, ["cluster.cb_retry." + n for n in ("upstream_rq_retry_overflow", "upstream_rq_retry",
                                                          "upstream_rq_total")])


def cb_retry_budget_zero(p: Probe) -> None:
    """retry_budget {budget_percent 0, min_retry_concurrency 0}: no retry may start (max_retries is ignored)."""
    before = p.engine.stats()
    p.exchange("GET", "/status/503", "budget.test")
    p.upstream("", headers=False)
    _deltas(p, before, ["cluster.cb_budget." + n for n in ("upstream_rq_retry_overflow", "upstream_rq_retry",
                                                           "upstream_rq_total")])
    _gauges(p, "after", ["cluster.cb_budget.circuit_breakers.default.rq_retry_open"])


# --- outlier detection -------------------------------------------------------------------------------------------


def od_consecutive_5xx_ejects_then_panic(p: Probe) -> None:
    """consecutive_5xx 2 on a one-host cluster: the host is ejected after the 2nd 503; with no healthy host left
    (below the 50 % panic threshold) the next request still goes to it (lb_healthy_panic)."""
    c = "cluster.od."
    o = c + "outlier_detection."
    before = p.engine.stats()
    p.exchange("GET", "/status/503", "od.test", key="1")
    p.exchange("GET", "/status/503", "od.test", key="2")
    _wait_stat(p, o + "ejections_active", lambda v: v >= 1)
    _deltas(p, before, [o + n for n in ("ejections_enforced_consecutive_5xx", "ejections_detected_consecutive_5xx",
                                        "ejections_enforced_total", "ejections_total", "ejections_consecutive_5xx",
                                        "ejections_overflow", "ejections_detected_consecutive_gateway_failure")])
    _gauges(p, "ejected", [o + "ejections_active", c + "membership_healthy", c + "membership_total"])
    _clusters_line(p, "od", "health_flags")
    p.exchange("GET", "/status/200", "od.test", key="3")
    _deltas(p, before, [c + "lb_healthy_panic", c + "upstream_cx_none_healthy"])


def od_gateway_failure_not_500(p: Probe) -> None:
    """consecutive_gateway_failure 1 (enforced): a 500 is no gateway failure, a 502 ejects the host."""
    o = "cluster.od_gw.outlier_detection."
    names = [o + n for n in ("ejections_enforced_consecutive_gateway_failure",
                             "ejections_detected_consecutive_gateway_failure", "ejections_enforced_total",
                             "ejections_detected_consecutive_5xx")]
    before = p.engine.stats()
    p.exchange("GET", "/status/500", "odgw.test", key="500")
    time.sleep(0.1)
    _deltas(p, before, names, "after 500:")
    p.exchange("GET", "/status/502", "odgw.test", key="502")
    _wait_stat(p, o + "ejections_active", lambda v: v >= 1)
    _deltas(p, before, names, "after 502:")
    _gauges(p, "ejected", [o + "ejections_active"])
    _clusters_line(p, "od_gw", "health_flags")


def od_connect_failures_count_as_5xx(p: Probe) -> None:
    """Without split_external_local_origin_errors, connect failures count as 5xx: two of them eject the host."""
    o = "cluster.od_dead.outlier_detection."
    before = p.engine.stats()
    p.exchange("GET", "/x", "oddead.test", key="1", local=True)
    p.exchange("GET", "/x", "oddead.test", key="2", local=True)
    _wait_stat(p, o + "ejections_active", lambda v: v >= 1)
    _deltas(p, before, [o + n for n in ("ejections_enforced_consecutive_5xx", "ejections_detected_consecutive_5xx",
                                        "ejections_detected_consecutive_gateway_failure",
                                        "ejections_detected_consecutive_local_origin_failure")])
    _gauges(p, "ejected", [o + "ejections_active"])


# --- active health checks ----------------------------------------------------------------------------------------


def hc_failing_host_marked_and_panic(p: Probe) -> None:
    """hc_dead: nobody listens (a network failure). /status/503 as the health check path: a host starts
    unhealthy and stays so after its first (failed) check, /failed_active_hc; the other cluster's host is healthy
    after its first success. Before any traffic the next check waits no_traffic_interval (60 s), so each host is
    checked once here. The failing cluster's only host still gets traffic (panic)."""
    _wait_stat(p, "cluster.hc_bad.health_check.failure", lambda v: v >= 1)
    _wait_stat(p, "cluster.hc_good.health_check.success", lambda v: v >= 1)
    _wait_stat(p, "cluster.hc_dead.health_check.failure", lambda v: v >= 1)
    time.sleep(0.3)
    for cl in ("hc_bad", "hc_good", "hc_dead"):
        h = f"cluster.{cl}.health_check."
        st = p.engine.stats()
        p.put(f"{cl} healthy", str(st.get(h + "healthy", "(absent)")))
        p.put(f"{cl} membership_healthy", str(st.get(f"cluster.{cl}.membership_healthy", "(absent)")))
        p.put(f"{cl} network_failure", str(st.get(h + "network_failure", "(absent)")))
        for n in ("attempt", "success", "failure"):
            p.put(f"{cl} {n}", str(st.get(h + n, "(absent)")))
        _clusters_line(p, cl, "health_flags")
    p.exchange("GET", "/status/200", "hcbad.test", key="bad")
    p.exchange("GET", "/status/200", "hcgood.test", key="good")
    with p.engine.upstream.lock:  # health check requests carry no scenario tag
        first = next((r for r in p.engine.upstream.requests if r.target == "/status/503" and r.header("x-scn") is None),
                     None)
    if first is not None:
        p.put("health check request", f"{first.method} {first.target}")
        p.put("health check headers", sorted(f"{n.lower()}: {v}" for n, v in first.headers
                                             if n.lower() not in ("x-request-id",)))


SCENARIOS = {f.__name__: f for f in (
    cb_max_requests_overflow, cb_max_connections_queues_then_pending_overflows, cb_max_retries_zero,
    cb_retry_budget_zero, od_consecutive_5xx_ejects_then_panic, od_gateway_failure_not_500,
    od_connect_failures_count_as_5xx, hc_failing_host_marked_and_panic,
)}


@pytest.mark.parametrize("name", SCENARIOS)
def test_resilience_cluster(pair: Pair, name: str) -> None:
    check(pair, name, SCENARIOS[name])
