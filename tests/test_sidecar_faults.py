"""The fault and local rate limit filters and the runtime, against a real sidecar process.

Addresses: 127.0.246.x only. Statistical checks state their odds: a 50 % abort over 400 requests is
Binomial(400, 0.5), sigma 10; the bound 200 +- 40 (4 sigma) fails by chance about once in 16,000 runs.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.test_sidecar_proxy import SidecarProc, admin_socket_request
from tests.upstreams import UpstreamServer, serve_upstream

POD = "127.0.246.1"
UPSTREAM = "127.0.246.2"

BOOT = """
admin: {{address: {{socket_address: {{address: {pod}, port_value: {admin}}}}}}}
static_resources:
  listeners:
  - name: l
    address: {{socket_address: {{address: {pod}, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ing
          http_filters:
          - name: envoy.filters.http.fault
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
              abort: {{header_abort: {{}}, percentage: {{numerator: 100}}}}
              delay: {{header_delay: {{}}, percentage: {{numerator: 100}}}}
          - name: envoy.filters.http.fault
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
              abort: {{http_status: 503, percentage: {{numerator: 0}}}}
              delay: {{fixed_delay: 0.2s, percentage: {{numerator: 0}}}}
              abort_percent_runtime: fault.http.x.abort.abort_percent
              abort_http_status_runtime: fault.http.x.abort.http_status
              delay_percent_runtime: fault.http.x.delay.fixed_delay_percent
              delay_duration_runtime: fault.http.x.delay.fixed_duration_ms
          - name: envoy.filters.http.local_ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
              stat_prefix: lrl
              token_bucket: {{max_tokens: 5, tokens_per_fill: 1, fill_interval: 20s}}
              filter_enabled: {{runtime_key: lrl_enabled, default_value: {{numerator: 0}}}}
              filter_enforced: {{runtime_key: lrl_enforced, default_value: {{numerator: 100}}}}
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /override}}
                route: {{cluster: svc}}
                typed_per_filter_config:
                  envoy.filters.http.fault:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
                    abort: {{http_status: 451, percentage: {{numerator: 100}}}}
              - match: {{prefix: /}}
                route: {{cluster: svc}}
  clusters:
  - name: svc
    type: STATIC
    load_assignment:
      cluster_name: svc
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {up}, port_value: {up_port}}}}}}}
"""


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[UpstreamServer, int]]:
    yield from serve_upstream(UPSTREAM)


@pytest.fixture(scope="module")
def sc(tmp_path_factory: pytest.TempPathFactory, upstream: tuple[UpstreamServer, int]) -> Iterator[SidecarProc]:
    wd: Path = tmp_path_factory.mktemp("faults")
    admin, port = free_port(POD), free_port(POD)
    boot = wd / "envoy.yaml"
    boot.write_text(BOOT.format(pod=POD, admin=admin, port=port, up=UPSTREAM, up_port=upstream[1]))
    proc = SidecarProc(wd, POD, admin, envoy=str(boot), admin_socket=True)
    proc.port = port  # type: ignore[attr-defined]
    proc.start()
    yield proc
    proc.stop()


def runtime(sc: SidecarProc, query: str) -> tuple[int, bytes]:
    r = admin_socket_request(sc.admin_socket, "/runtime_modify?" + query, method="POST")
    return r.status, r.body


def get(sc: SidecarProc, path: str, headers: dict[str, str] | None = None,
        conn: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:
    c = conn or http.client.HTTPConnection(POD, sc.port, timeout=10)  # type: ignore[attr-defined]
    c.request("GET", path, headers=headers or {})
    r = c.getresponse()
    body = r.read()
    if conn is None:
        c.close()
    return r.status, body


def stats(sc: SidecarProc) -> dict[str, int]:
    r = admin_socket_request(sc.admin_socket, "/stats?format=json")
    return {s["name"]: s.get("value", 0) for s in json.loads(r.body)["stats"] if "value" in s}


def test_header_abort_and_its_percentage(sc):
    before = stats(sc)["http.ing.fault.aborts_injected"]
    assert get(sc, "/h", {"x-envoy-fault-abort-request": "418"}) == (418, b"fault filter abort")
    assert get(sc, "/h", {"x-envoy-fault-abort-request": "418",
                          "x-envoy-fault-abort-request-percentage": "0"})[0] == 200
    assert stats(sc)["http.ing.fault.aborts_injected"] == before + 1


def test_header_delay_holds_the_request_without_blocking_others(sc):
    results: list[float] = []

    def one() -> None:
        t0 = time.monotonic()
        assert get(sc, "/d", {"x-envoy-fault-delay-request": "300"})[0] == 200
        results.append(time.monotonic() - t0)

    threads = [threading.Thread(target=one) for _ in range(20)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    t_fast = time.monotonic()
    assert get(sc, "/fast")[0] == 200
    fast = time.monotonic() - t_fast
    for t in threads:
        t.join()
    assert len(results) == 20 and min(results) >= 0.29
    assert time.monotonic() - t0 < 1.5  # 20 delays of 300 ms run side by side, not one after another
    assert fast < 0.2  # an undelayed request is not held behind them
    assert stats(sc)["http.ing.fault.active_faults"] == 0


def test_runtime_abort_50_percent_within_4_sigma(sc):
    assert runtime(sc, "fault.http.x.abort.abort_percent=50&fault.http.x.abort.http_status=502")[0] == 200
    try:
        conn = http.client.HTTPConnection(POD, sc.port, timeout=10)  # type: ignore[attr-defined]
        codes = [get(sc, "/r", conn=conn)[0] for _ in range(400)]
        conn.close()
    finally:
        runtime(sc, "fault.http.x.abort.abort_percent=&fault.http.x.abort.http_status=")
    aborted = codes.count(502)
    assert aborted + codes.count(200) == 400
    assert 160 <= aborted <= 240, aborted  # Binomial(400, .5): mean 200, sigma 10
    assert get(sc, "/r")[0] == 200  # removed: the next request is clean


def test_runtime_delay_and_route_override(sc):
    runtime(sc, "fault.http.x.delay.fixed_delay_percent=100&fault.http.x.delay.fixed_duration_ms=150")
    try:
        t0 = time.monotonic()
        assert get(sc, "/slow")[0] == 200
        assert time.monotonic() - t0 >= 0.14
    finally:
        runtime(sc, "fault.http.x.delay.fixed_delay_percent=")
    assert get(sc, "/override/x") == (451, b"fault filter abort")  # the route's typed_per_filter_config


def test_runtime_endpoints(sc):
    status, body = runtime(sc, "no.such.key=1")
    assert status == 400 and b"fault.http.*" in body and b"lrl_enabled" in body
    runtime(sc, "fault.http.y.abort.abort_percent=5")
    dump = json.loads(admin_socket_request(sc.admin_socket, "/runtime").body)
    assert dump["layers"] == ["static", "admin"]
    assert dump["entries"]["fault.http.y.abort.abort_percent"] == {"final_value": "5", "layer_values": ["", "5"]}
    runtime(sc, "fault.http.y.abort.abort_percent=")
    assert "fault.http.y.abort.abort_percent" not in json.loads(
        admin_socket_request(sc.admin_socket, "/runtime").body)["entries"]
    r = admin_socket_request(sc.admin_socket, "/runtime_modify?lrl_enabled=100", method="GET")
    assert r.status == 405


def test_local_rate_limit_token_bucket(sc):
    before = stats(sc)
    assert get(sc, "/rl")[0] == 200 and stats(sc)["lrl.http_local_rate_limit.enabled"] == \
        before["lrl.http_local_rate_limit.enabled"]  # filter_enabled defaults to 0 %
    runtime(sc, "lrl_enabled=100")
    try:
        conn = http.client.HTTPConnection(POD, sc.port, timeout=10)  # type: ignore[attr-defined]
        answers = [get(sc, "/rl", conn=conn) for _ in range(10)]
        conn.close()
    finally:
        runtime(sc, "lrl_enabled=")
    codes = [a[0] for a in answers]
    # 5 tokens, refilled at 1 per 20 s: the first 5 pass (a 6th only if 20 s went by)
    assert codes[:5] == [200] * 5 and codes[5:] == [429] * 5, codes
    assert answers[-1][1] == b"local_rate_limited"
    after = stats(sc)
    d = {k: after[k] - before.get(k, 0) for k in after if k.startswith("lrl.")}
    assert d["lrl.http_local_rate_limit.enabled"] == 10 and d["lrl.http_local_rate_limit.ok"] == 5
    assert d["lrl.http_local_rate_limit.rate_limited"] == 5 and d["lrl.http_local_rate_limit.enforced"] == 5


def test_live_faults_inactive_routes_skip_the_chain_until_their_keys_are_set():
    """The inactive path is precomputed: a route is passive until a runtime key of its own fault is set."""
    from types import SimpleNamespace

    from sidecar.config import Route, RouteConfig, RouteMatch, VirtualHost
    from sidecar.http_filters import FAULT, FaultFilter, HttpFilter, HttpFilterChain, Runtime, live_fault
    from sidecar.stats import Store

    a = Route(RouteMatch(prefix="/a"), cluster="a", fault=live_fault("fault.http.egress.a."))
    b = Route(RouteMatch(prefix="/b"), cluster="b", fault=live_fault("fault.http.egress.b."))
    rc = RouteConfig("rc", (VirtualHost("v", ("*",), (a, b)),))

    hcm = SimpleNamespace(cfg=SimpleNamespace(route_config=rc))
    rt = Runtime()
    chain = HttpFilterChain(hcm, (HttpFilter(FAULT, FaultFilter()),), rt, Store(), "t", lambda h, hs: True)
    assert {id(a), id(b), id(None)} <= chain.passive
    assert rt.modify({"fault.http.egress.b.abort.abort_percent": "100"}) is None
    assert id(a) in chain.passive and id(b) not in chain.passive and id(None) in chain.passive
    assert rt.modify({"fault.http.egress.b.abort.abort_percent": ""}) is None
    assert id(b) in chain.passive
    assert rt.modify({"fault.http.abort.abort_percent": "100"}) is None  # the filter's own key: no route, and
    assert id(None) not in chain.passive and id(a) in chain.passive  # routes with their own config stay passive


def test_live_faults_on_a_weighted_split_hit_only_the_faulted_cluster(tmp_path, upstream):
    """A canary split 50/50: a live abort on one cluster answers about half the requests (Binomial(400, .5),
    sigma 10, 4-sigma bound), the other cluster's share is untouched; the cluster is picked before the filters."""
    from sidecar.config import FaultFilter, Route, RouteMatch, WeightedCluster
    from sidecar.http_filters import _effective

    a, b = WeightedCluster("a", 1, FaultFilter(max_active_faults=1)), WeightedCluster("b", 1)
    route = Route(RouteMatch(prefix="/"), weighted_clusters=(a, b), fault=FaultFilter(max_active_faults=2))
    assert _effective(route, "a", FaultFilter()) is a.fault and _effective(route, "b", FaultFilter()) is route.fault

    other = "127.0.246.3"
    gen = serve_upstream(other)
    _, other_port = next(gen)
    admin, port = free_port(POD), free_port(POD)
    cfg = {"admin": {"port": admin}, "access_log": False,
           "egress": {"port": port, "routes": [{"host": "svc", "to": [
               {"target": f"{UPSTREAM}:{upstream[1]}", "weight": 50},
               {"target": f"{other}:{other_port}", "weight": 50}]}]}}
    proc = SidecarProc(tmp_path / "w", POD, admin, config=cfg, admin_socket=True)
    proc.args.append("--live-faults")
    proc.port = port  # type: ignore[attr-defined]
    proc.start()
    try:
        conn = http.client.HTTPConnection(POD, port, timeout=10)
        assert {get(proc, "/", {"Host": "svc"}, conn)[0] for _ in range(20)} == {200}
        assert runtime(proc, f"fault.http.egress.{other}.abort.abort_percent=10000")[0] == 200
        codes = [get(proc, "/", {"Host": "svc"}, conn)[0] for _ in range(400)]
        assert 160 <= codes.count(503) <= 240 and codes.count(503) + codes.count(200) == 400, codes.count(503)
        assert runtime(proc, f"fault.http.egress.{UPSTREAM}.abort.abort_percent=10000")[0] == 200
        assert {get(proc, "/", {"Host": "svc"}, conn)[0] for _ in range(20)} == {503}
        assert runtime(proc, f"fault.http.egress.{UPSTREAM}.abort.abort_percent=&"
                             f"fault.http.egress.{other}.abort.abort_percent=")[0] == 200
        assert {get(proc, "/", {"Host": "svc"}, conn)[0] for _ in range(20)} == {200}
        conn.close()
    finally:
        proc.stop()
        gen.close()
