"""Cluster-level resilience in our sidecar, end to end: circuit breakers, outlier detection, active health checks.

A real sidecar process and real upstream sockets. Addresses: 127.0.240.x (the pod), 127.0.241.x (upstreams:
.1/.2 healthy, .3 answers 503 to everything). Everything here is deterministic (round robin, fixed thresholds):
no statistical bounds are needed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sidecar.cluster import ClusterRuntime
from sidecar.config import CircuitBreakers, Cluster, Endpoint
from sidecar.stats import ClusterStats, Store
from tests.test_sidecar_proxy import SidecarProc, request
from tests.test_sidecar_router import free_port
from tests.upstreams import UpstreamServer, _Conn, _Req

POD = "127.0.240.1"
GOOD = ("127.0.241.1", "127.0.241.2")
BAD = "127.0.241.3"


class _Upstream(UpstreamServer):
    """The usual behaviours, except that BAD answers 503 to everything (a broken replica)."""

    async def handle(self, conn: _Conn, req: _Req, rec: Any) -> None:
        if conn.listener.startswith(BAD + ":"):
            conn.respond(503, b"broken replica\n", keep_alive=req.keep_alive)
            return
        await super().handle(conn, req, rec)


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return {"up": free_port(GOOD[0]), "egress": free_port(POD), "admin": free_port(POD)}


@pytest.fixture(scope="module")
def upstream(ports: dict[str, int]) -> Iterator[UpstreamServer]:
    server = _Upstream([(ip, ports["up"]) for ip in (*GOOD, BAD)]).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, ports: dict[str, int],
            upstream: UpstreamServer) -> Iterator[SidecarProc]:
    up = ports["up"]
    g1 = f"{GOOD[0]}:{up}"
    routes = [
        {"host": "cx.svc", "to": g1, "circuit_breakers": {"max_connections": 1, "max_pending_requests": 1}},
        {"host": "rq.svc", "to": f"{GOOD[1]}:{up}", "circuit_breakers": {"max_requests": 2}},
        {"host": "budget.svc", "to": f"{BAD}:{up}", "retry_policy": {"retry_on": "5xx", "num_retries": 3},
         "circuit_breakers": {"retry_budget": {"budget_percent": 0, "min_retry_concurrency": 0}}},
        {"host": "od.svc", "to": f"trio:{up}",
         "outlier_detection": {"consecutive_5xx": 3, "interval": "0.2s", "base_ejection_time": "30s",
                               "max_ejection_percent": 50}},
        {"host": "hc.svc", "to": f"duo:{up}",
         "health_check": {"path": "/status/200", "interval": "0.1s", "timeout": "0.5s", "no_traffic_interval": "0.1s",
                          "unhealthy_threshold": 2, "healthy_threshold": 1}},
    ]
    hosts = "".join(f"{ip} trio\n" for ip in (*GOOD, BAD)) + f"{GOOD[0]} duo\n{BAD} duo\n"
    work = tmp_path_factory.mktemp("sidecar_resilience")
    config = {"admin": {"port": ports["admin"]}, "egress": {"port": ports["egress"], "routes": routes}}
    sc = SidecarProc(work, POD, ports["admin"], config=config, hosts=hosts)
    sc.start()
    yield sc
    assert sc.alive(), sc.stderr()[-3000:]
    sc.stop()


def _stats(ports: dict[str, int]) -> dict[str, int]:
    r = request(POD, ports["admin"], "/stats?format=json")
    return {s["name"]: s["value"] for s in json.loads(r.body)["stats"] if "name" in s}


def _concurrently(ports: dict[str, int], host: str, paths: list[str], stagger: float = 0.05) -> list[Any]:
    out: list[Any] = [None] * len(paths)

    def one(i: int, path: str) -> None:
        out[i] = request(POD, ports["egress"], path, host=host)

    threads = []
    for i, p in enumerate(paths):
        t = threading.Thread(target=one, args=(i, p))
        t.start()
        threads.append(t)
        time.sleep(stagger)  # arrival order = list order
    for t in threads:
        t.join(10)
    return out


def test_max_connections_queues_and_max_pending_requests_overflows(sidecar, ports, upstream):
    """max_connections 1: the 2nd request waits for the one connection (upstream_cx_overflow), the 3rd finds
    the pending queue (max_pending_requests 1) full: 503 UO at once (upstream_rq_pending_overflow)."""
    before = _stats(ports)
    rs = _concurrently(ports, "cx.svc", ["/delay/0.4?t=cx1", "/delay/0.1?t=cx2", "/status/200?t=cx3"])
    assert [r.status for r in rs] == [200, 200, 503]
    assert rs[2].body.endswith(b"reset reason: overflow") and rs[2].elapsed < 0.3
    assert rs[1].elapsed > 0.3  # it waited for the first request's connection
    after = _stats(ports)
    c = f"cluster.{GOOD[0]}"  # the short form names a cluster after its target's host
    d = {k: after.get(f"{c}.{k}", 0) - before.get(f"{c}.{k}", 0)
         for k in ("upstream_cx_total", "upstream_cx_overflow", "upstream_rq_pending_overflow", "upstream_rq_total")}
    assert d == {"upstream_cx_total": 1, "upstream_cx_overflow": 1, "upstream_rq_pending_overflow": 1,
                 "upstream_rq_total": 2}, d
    assert after[f"{c}.circuit_breakers.default.cx_open"] == 1  # the one connection is open and pooled


def test_max_requests_overflow_is_503_uo(sidecar, ports, upstream):
    rs = _concurrently(ports, "rq.svc", ["/delay/0.4?t=rq1", "/delay/0.4?t=rq2", "/status/200?t=rq3"])
    assert [r.status for r in rs] == [200, 200, 503]
    assert b"overflow" in rs[2].body


def test_retry_budget_of_zero_allows_no_retry(sidecar, ports, upstream):
    before = _stats(ports)
    r = request(POD, ports["egress"], "/status/503?t=budget", host="budget.svc")
    assert r.status == 503
    after = _stats(ports)
    c = f"cluster.{BAD}."
    assert after[c + "upstream_rq_retry_overflow"] - before.get(c + "upstream_rq_retry_overflow", 0) == 1
    assert after[c + "upstream_rq_retry"] == 0 and after[c + "upstream_rq_total"] == 1


def test_retry_budget_share_of_active_requests() -> None:
    """budget_percent of (active + pending) requests, at least min_retry_concurrency (Envoy's formula)."""
    cfg = Cluster(name="c", type="STATIC", endpoints=(Endpoint("127.0.241.9", 1),),
                  circuit_breakers=CircuitBreakers(retry_budget_percent=20.0, min_retry_concurrency=3))
    rt = ClusterRuntime(cfg, ClusterStats(Store(), "c"), resolver=None)  # type: ignore[arg-type]
    assert rt.max_retries() == 3
    rt.active_requests, rt.pending_requests = 40, 10
    assert rt.max_retries() == 10
    plain = ClusterRuntime(Cluster(name="d", type="STATIC", endpoints=()), ClusterStats(Store(), "d"),
                           resolver=None)  # type: ignore[arg-type]
    plain.active_requests = 1000
    assert plain.max_retries() == 3  # no budget: max_retries


def test_consecutive_5xx_ejects_the_broken_replica(sidecar, ports, upstream):
    """Round robin over 3 replicas, one always 503: after its 3rd consecutive 5xx it is ejected (30 s), and
    max_ejection_percent 50 lets one of three go; then every request succeeds."""
    statuses = [request(POD, ports["egress"], f"/status/200?t=od{i}", host="od.svc").status for i in range(30)]
    assert statuses.count(503) == 3, statuses
    assert all(s == 200 for s in statuses[9:]), statuses
    st = _stats(ports)
    p = "cluster.trio.outlier_detection."
    assert st[p + "ejections_enforced_consecutive_5xx"] == 1
    assert st[p + "ejections_detected_consecutive_5xx"] == 1
    assert st[p + "ejections_enforced_total"] == 1
    assert st[p + "ejections_active"] == 1
    assert st["cluster.trio.membership_healthy"] == 2
    clusters = request(POD, ports["admin"], "/clusters").body.decode()
    assert f"trio::{BAD}:{ports['up']}::health_flags::/failed_outlier_check" in clusters
    assert f"trio::{GOOD[0]}:{ports['up']}::health_flags::healthy" in clusters
    assert "trio::outlier::success_rate_average::-1" in clusters
    # Envoy's rows, in its order (checked against Envoy 1.40's /clusters)
    head = [ln for ln in clusters.splitlines() if ln.startswith("trio::")][:14]
    assert head[0] == "trio::observability_name::trio" and head[1].startswith("trio::outlier::success_rate_average")
    assert head[5:7] == ["trio::default_priority::max_connections::1024",
                         "trio::default_priority::max_pending_requests::1024"]
    assert head[12:14] == ["trio::high_priority::max_retries::3", "trio::added_via_api::false"]


def test_active_health_check_takes_the_failing_host_out(sidecar, ports, upstream):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        st = _stats(ports)
        if st.get("cluster.duo.health_check.failure", 0) >= 2 and st.get("cluster.duo.health_check.healthy") == 1:
            break
        time.sleep(0.05)
    p = "cluster.duo.health_check."
    assert st[p + "healthy"] == 1 and st[p + "success"] >= 1 and st[p + "attempt"] >= 3
    assert st[p + "network_failure"] == 0
    clusters = request(POD, ports["admin"], "/clusters").body.decode()
    assert f"duo::{BAD}:{ports['up']}::health_flags::/failed_active_hc" in clusters
    # one of two healthy is not below Envoy's 50 % panic threshold: only the healthy host gets traffic
    assert [request(POD, ports["egress"], f"/status/200?t=hc{i}", host="hc.svc").status
            for i in range(6)] == [200] * 6
    assert st["cluster.duo.lb_healthy_panic"] == 0
    checks = [r for r in upstream.requests_for("/status/200") if r.header("user-agent") == "Envoy/HC"]
    assert checks and checks[0].header("host") == "duo"


def test_resilience_fields_survive_the_export_and_warn_when_not_implemented() -> None:
    import yaml

    from sidecar.envoy_config import compile_envoy
    from sidecar.envoy_export import export_envoy
    from tests.test_export import IP, comparable, roundtrip

    doc = {"static_resources": {"clusters": [{
        "name": "c", "type": "STATIC", "load_assignment": {"endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "10.0.0.1", "port_value": 80}}}}]}]},
        "circuit_breakers": {"thresholds": [{"max_connections": 7, "max_pending_requests": 8, "max_requests": 9,
                                             "max_retries": 2, "retry_budget": {"budget_percent": {"value": 30.0},
                                                                                "min_retry_concurrency": 4}}]},
        "outlier_detection": {"consecutive_5xx": 3, "consecutive_gateway_failure": 4,
                              "consecutive_local_origin_failure": 6, "split_external_local_origin_errors": True,
                              "interval": "0.5s", "base_ejection_time": "2s", "max_ejection_time": "20s",
                              "max_ejection_percent": 40, "enforcing_consecutive_5xx": 90,
                              "enforcing_consecutive_gateway_failure": 80, "enforcing_success_rate": 70,
                              "success_rate_minimum_hosts": 3, "success_rate_request_volume": 50,
                              "success_rate_stdev_factor": 1500, "failure_percentage_threshold": 80},
        "health_checks": [{"timeout": "1s", "interval": "3s", "unhealthy_threshold": 3, "healthy_threshold": 2,
                           "no_traffic_interval": "9s",
                           "http_health_check": {"path": "/hz", "host": "h.local",
                                                 "expected_statuses": [{"start": 200, "end": 204}]}}]}]}}
    boot = compile_envoy(doc, IP)
    assert boot.warnings == ("envoy.yaml: static_resources.clusters[0].outlier_detection.failure_percentage_threshold:"
                             " not implemented, ignored",)
    assert comparable(roundtrip(boot)) == comparable(boot)
    text = yaml.safe_dump(export_envoy(boot))
    assert "retry_budget" in text and "outlier_detection" in text and "http_health_check" in text


def _od_cluster(n_hosts: int, **od: Any) -> ClusterRuntime:
    """A static cluster of n hosts with outlier detection, refreshed (no I/O: IPs) but not started (no timer)."""
    import asyncio

    from sidecar.config import OutlierDetection
    cfg = Cluster(name="od", type="STATIC", endpoints=tuple(Endpoint(f"127.0.242.{i + 1}", 80) for i in range(n_hosts)),
                  outlier_detection=OutlierDetection(**od))
    rt = ClusterRuntime(cfg, ClusterStats(Store(), "od"), resolver=None)  # type: ignore[arg-type]
    asyncio.run(rt.refresh())
    return rt


def _count(rt: ClusterRuntime, name: str) -> int:
    return rt.stats.store.counter(f"cluster.od.outlier_detection.{name}").value


def test_ejection_time_grows_with_the_ejection_count_and_decays(monkeypatch) -> None:
    import sidecar.cluster as cl
    rt = _od_cluster(2, consecutive_5xx=2, base_ejection_time_s=10.0, max_ejection_time_s=25.0,
                     max_ejection_percent=50)
    od = rt.outlier
    assert od is not None
    monkeypatch.setattr(od, "timer", None)
    monkeypatch.setattr(cl.asyncio, "get_running_loop", lambda: type("L", (), {"call_later": lambda *a: None})())
    now = [1000.0]
    monkeypatch.setattr(cl.time, "monotonic", lambda: now[0])
    bad = rt.pools[0]
    for want_s in (10.0, 20.0, 25.0):  # base x count, capped by max_ejection_time
        od.result(bad, 503)
        od.result(bad, 503)
        assert bad.ejected and od.ejection_time(bad) == want_s
        assert rt.lb_pools == [rt.pools[1]]  # the ejected host left the load balancer (1 of 2: no panic)
        now[0] += want_s - 0.01
        od.tick()
        assert bad.ejected  # not yet
        now[0] += 0.02
        od.tick()
        assert not bad.ejected and len(rt.lb_pools) == 2
    assert _count(rt, "ejections_enforced_consecutive_5xx") == 3
    count = bad.ejections
    od.tick()  # an interval without ejection: the multiplier decays
    assert bad.ejections == count - 1


def test_max_ejection_percent_and_gateway_and_local_origin() -> None:
    rt = _od_cluster(3, consecutive_5xx=1, consecutive_gateway_failure=1, enforcing_consecutive_gateway_failure=100,
                     consecutive_local_origin_failure=2, split_external_local_origin_errors=True,
                     max_ejection_percent=33)
    od = rt.outlier
    assert od is not None
    a, b, c = rt.pools
    od.result(a, 500)  # a 5xx but not a gateway error
    assert a.ejected and _count(rt, "ejections_detected_consecutive_gateway_failure") == 0
    od.result(b, 502)  # both detectors fire; one of three out is already 33 %: overflow
    assert not b.ejected and _count(rt, "ejections_overflow") >= 1
    assert _count(rt, "ejections_detected_consecutive_gateway_failure") == 1
    od.local_failure(c)  # split: local-origin errors have their own count
    assert not c.ejected and c.od_5xx == 0
    od.result(c, 200)  # a response: the connection worked, the local streak ends
    od.local_failure(c)
    assert c.od_local == 1


def test_success_rate_ejects_the_outlier_host() -> None:
    rt = _od_cluster(5, consecutive_5xx=1000, success_rate_minimum_hosts=5, success_rate_request_volume=100,
                     success_rate_stdev_factor=1900, max_ejection_percent=100)
    od = rt.outlier
    assert od is not None
    for i, pool in enumerate(rt.pools):
        for k in range(100):
            od.result(pool, 503 if (i == 0 and k % 2 == 0) else 200)  # host 0: 50 %, others 100 %
    od._success_rate()
    assert rt.pools[0].ejected and not any(p.ejected for p in rt.pools[1:])
    assert _count(rt, "ejections_enforced_success_rate") == 1
    assert (od.sr_average, od.sr_threshold) == (90.0, 52.0)  # mean - 1.9 x stdev (20)
