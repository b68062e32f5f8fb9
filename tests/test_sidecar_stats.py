"""The sidecar's Envoy-compatible stats: names, Envoy's tag extraction for Prometheus, /stats text and JSON."""

from __future__ import annotations

import math

import pytest

from sidecar.stats import (
    BUCKETS,
    ClusterStats,
    HcmStats,
    Histogram,
    ListenerStats,
    ServerStats,
    Store,
    extract_tags,
    listener_stat_address,
)


def prom_lines(store: Store) -> set[str]:
    return set(store.render_prometheus().splitlines())


def test_counter_gauge_basics():
    s = Store()
    c = s.counter("a.b")
    assert s.counter("a.b") is c
    c.inc()
    c.inc(4)
    c.value += 1
    assert c.value == 6
    g = s.gauge("g")
    g.inc()
    g.inc(2)
    g.dec()
    assert g.value == 2
    g.set(7)
    assert g.value == 7
    assert s.histogram("h") is s.histogram("h")


def test_cluster_prometheus_exact_lines():
    s = Store()
    c = ClusterStats(s, "remote_service_b")
    for _ in range(5):
        c.response(200)
    c.response(503)
    c.retry_response(500)
    c.upstream_rq_total.inc(7)
    c.upstream_rq_retry.value += 1
    lines = prom_lines(s)
    assert 'envoy_cluster_upstream_rq{envoy_response_code="200",envoy_cluster_name="remote_service_b"} 5' in lines
    assert 'envoy_cluster_upstream_rq{envoy_response_code="503",envoy_cluster_name="remote_service_b"} 1' in lines
    assert ('envoy_cluster_upstream_rq_xx{envoy_response_code_class="2",envoy_cluster_name="remote_service_b"} 5'
            in lines)
    assert ('envoy_cluster_upstream_rq_xx{envoy_response_code_class="5",envoy_cluster_name="remote_service_b"} 1'
            in lines)
    assert ('envoy_cluster_retry_upstream_rq{envoy_response_code="500",envoy_cluster_name="remote_service_b"} 1'
            in lines)
    assert ('envoy_cluster_retry_upstream_rq_xx{envoy_response_code_class="5",envoy_cluster_name="remote_service_b"} 1'
            in lines)
    assert 'envoy_cluster_upstream_rq_total{envoy_cluster_name="remote_service_b"} 7' in lines
    assert 'envoy_cluster_upstream_rq_retry{envoy_cluster_name="remote_service_b"} 1' in lines
    assert "# TYPE envoy_cluster_upstream_rq counter" in lines
    assert "# TYPE envoy_cluster_upstream_cx_active gauge" in lines
    assert "# TYPE envoy_cluster_upstream_rq_time histogram" in lines


def test_cluster_name_with_dots():
    s = Store()
    c = ClusterStats(s, "b.service")
    c.response(200)
    c.retry_response(503)
    c.upstream_rq_total.inc()
    lines = prom_lines(s)
    assert 'envoy_cluster_upstream_rq{envoy_response_code="200",envoy_cluster_name="b.service"} 1' in lines
    assert 'envoy_cluster_upstream_rq_xx{envoy_response_code_class="2",envoy_cluster_name="b.service"} 1' in lines
    assert 'envoy_cluster_retry_upstream_rq{envoy_response_code="503",envoy_cluster_name="b.service"} 1' in lines
    assert 'envoy_cluster_retry_upstream_rq_xx{envoy_response_code_class="5",envoy_cluster_name="b.service"} 1' in lines
    assert 'envoy_cluster_upstream_rq_total{envoy_cluster_name="b.service"} 1' in lines


def test_extraction_by_structure_without_registration():
    # never registered: the stat part is found from its known structure, not by splitting at the first dot
    assert extract_tags("cluster.b.service.upstream_rq_200") == (
        "envoy_cluster_upstream_rq", [("envoy_response_code", "200"), ("envoy_cluster_name", "b.service")])
    assert extract_tags("cluster.a.b.c.retry.upstream_rq_5xx") == (
        "envoy_cluster_retry_upstream_rq_xx", [("envoy_response_code_class", "5"), ("envoy_cluster_name", "a.b.c")])
    assert extract_tags("cluster.x.y.circuit_breakers.default.rq_open") == (
        "envoy_cluster_circuit_breakers_default_rq_open", [("envoy_cluster_name", "x.y")])
    assert extract_tags("cluster_manager.cluster_added") == ("envoy_cluster_manager_cluster_added", [])
    # registration wins when the structure is ambiguous
    assert extract_tags("cluster.b.service.custom.thing", clusters={"b.service"}) == (
        "envoy_cluster_custom_thing", [("envoy_cluster_name", "b.service")])


def test_hcm_and_listener_prometheus_exact_lines():
    s = Store()
    h = HcmStats(s, "ingress_http")
    h.downstream_rq_total.inc(3)
    h.response(200)
    h.response(201)
    h.response(404)
    listener = ListenerStats(s, "127.0.3.1_80", "ingress_http")
    listener.downstream_cx_total.inc()
    listener.response(200)
    ServerStats(s)
    lines = prom_lines(s)
    assert ('envoy_http_downstream_rq_xx{envoy_response_code_class="2",'
            'envoy_http_conn_manager_prefix="ingress_http"} 2') in lines
    assert ('envoy_http_downstream_rq_xx{envoy_response_code_class="4",'
            'envoy_http_conn_manager_prefix="ingress_http"} 1') in lines
    assert 'envoy_http_downstream_rq_total{envoy_http_conn_manager_prefix="ingress_http"} 3' in lines
    assert 'envoy_http_downstream_rq_completed{envoy_http_conn_manager_prefix="ingress_http"} 3' in lines
    assert 'envoy_listener_downstream_cx_total{envoy_listener_address="127.0.3.1_80"} 1' in lines
    assert ('envoy_listener_http_downstream_rq_xx{envoy_response_code_class="2",'
            'envoy_http_conn_manager_prefix="ingress_http",envoy_listener_address="127.0.3.1_80"} 1') in lines
    assert "envoy_server_live 1" in lines
    assert "# TYPE envoy_server_live gauge" in lines


def test_prometheus_groups_one_type_line_per_metric():
    s = Store()
    ClusterStats(s, "a").response(200)
    ClusterStats(s, "b.c").response(200)
    text = s.render_prometheus()
    assert text.count("# TYPE envoy_cluster_upstream_rq counter") == 1
    lines = text.splitlines()
    i = lines.index("# TYPE envoy_cluster_upstream_rq counter")
    assert all(line.startswith("envoy_cluster_upstream_rq{") for line in lines[i + 1:i + 3])
    # every series line belongs to the metric of the TYPE line above it
    current = None
    for line in lines:
        if line.startswith("# TYPE "):
            current = line.split()[2]
            continue
        name = line.split("{")[0].split(" ")[0]
        assert name == current or name.rsplit("_", 1)[0] == current, line


def test_label_escaping_and_name_sanitising():
    s = Store()
    s.counter('cluster.we"ird\\name.upstream_rq_total').inc()
    s.counter("some-thing.with:colons").inc()
    lines = prom_lines(s)
    assert 'envoy_cluster_upstream_rq_total{envoy_cluster_name="we\\"ird\\\\name"} 1' in lines
    assert "envoy_some_thing_with_colons 1" in lines


def test_listener_ipv6_address():
    assert listener_stat_address("::1", 80) == "[__1]_80"
    s = Store()
    ListenerStats(s, "::1_80", "p").downstream_cx_total.inc()
    assert "listener.[__1]_80.downstream_cx_total" in s.counters
    assert 'envoy_listener_downstream_cx_total{envoy_listener_address="[__1]_80"} 1' in prom_lines(s)
    assert extract_tags("listener.[__1]_80.downstream_cx_total") == (
        "envoy_listener_downstream_cx_total", [("envoy_listener_address", "[__1]_80")])
    assert extract_tags("listener.admin.downstream_cx_total") == ("envoy_listener_admin_downstream_cx_total", [])


def test_histogram_buckets_cumulative_sum_count():
    s = Store()
    c = ClusterStats(s, "svc")
    for v in (0.3, 0.5, 0.7, 3, 7, 7, 99, 4000000):
        c.upstream_rq_time.record(v)
    text = s.render_prometheus()
    pre = 'envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name="svc",'
    assert f'{pre}le="0.5"}} 2' in text  # le is inclusive
    assert f'{pre}le="1"}} 3' in text
    assert f'{pre}le="5"}} 4' in text
    assert f'{pre}le="10"}} 6' in text
    assert f'{pre}le="100"}} 7' in text
    assert f'{pre}le="1.8e+06"}} 7' in text
    assert f'{pre}le="3.6e+06"}} 7' in text
    assert f'{pre}le="+Inf"}} 8' in text
    assert 'envoy_cluster_upstream_rq_time_sum{envoy_cluster_name="svc"} 4000117.5' in text
    assert 'envoy_cluster_upstream_rq_time_count{envoy_cluster_name="svc"} 8' in text
    # buckets are monotonic and there is one per bound + Inf
    vals = [int(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(pre)]
    assert len(vals) == len(BUCKETS) + 1 and vals == sorted(vals)


def test_histogram_quantiles():
    h = Histogram("x")
    assert math.isnan(h.quantile(0.5))
    h.record(42)
    assert h.quantile(0) == h.quantile(0.5) == h.quantile(1) == 42
    h2 = Histogram("y")
    for v in range(1, 101):  # 1..100 ms
        h2.record(v)
    assert h2.quantile(0) == 1 and h2.quantile(1) == 100
    assert 40 <= h2.quantile(0.5) <= 60
    assert 90 <= h2.quantile(0.99) <= 100
    qs = [h2.quantile(q) for q in (0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 1)]
    assert qs == sorted(qs)


def test_render_text_sorted_filter_used_only():
    s = Store()
    c = ClusterStats(s, "svc")
    c.response(200)
    c.upstream_rq_time.record(5)
    s.gauge("server.live").set(1)
    text = s.render_text()
    lines = text.splitlines()
    plain = [line for line in lines if "P0(" not in line and "No recorded values" not in line]
    assert plain == sorted(plain)
    assert "cluster.svc.upstream_rq_200: 1" in lines
    assert "server.live: 1" in lines
    # histograms come last
    first_hist = next(i for i, line in enumerate(lines) if "P0(" in line or "No recorded values" in line)
    assert all("P0(" in line or "No recorded values" in line for line in lines[first_hist:])
    assert "cluster.svc.upstream_cx_connect_ms: No recorded values" in lines
    hist = next(line for line in lines if line.startswith("cluster.svc.upstream_rq_time: "))
    assert hist.startswith("cluster.svc.upstream_rq_time: P0(nan,5) P25(nan,")
    assert hist.endswith("P99.9(nan,5) P100(nan,5)")
    filtered = s.render_text(filter=r"upstream_rq_\d")
    assert filtered.splitlines() == ["cluster.svc.upstream_rq_200: 1", "cluster.svc.upstream_rq_2xx: 1"]
    used = s.render_text(used_only=True).splitlines()
    assert "cluster.svc.upstream_rq_total: 0" not in used
    assert "cluster.svc.upstream_rq_200: 1" in used
    assert any(line.startswith("cluster.svc.upstream_rq_time: P0") for line in used)
    assert not any("upstream_cx_connect_ms" in line for line in used)
    with pytest.raises(ValueError, match="invalid filter"):
        s.render_text(filter="(")


def test_render_json_shape():
    s = Store()
    c = ClusterStats(s, "svc")
    c.response(503)
    c.upstream_rq_time.record(2)
    doc = s.render_json(filter="svc")
    stats = doc["stats"]
    assert {"name": "cluster.svc.upstream_rq_503", "value": 1} in stats
    names = [e["name"] for e in stats[:-1]]
    assert names == sorted(names)
    hist = stats[-1]["histograms"]
    assert hist["supported_quantiles"] == [0.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 100.0]
    by_name = {h["name"]: h["values"] for h in hist["computed_quantiles"]}
    assert by_name["cluster.svc.upstream_rq_time"][0] == {"interval": None, "cumulative": 2}
    assert len(by_name["cluster.svc.upstream_rq_time"]) == 10
    assert by_name["cluster.svc.upstream_cx_connect_ms"][5] == {"interval": None, "cumulative": None}


def test_response_vs_retry_response_semantics():
    s = Store()
    c = ClusterStats(s, "svc")
    # a 503 that was retried, then a 200 that was returned
    c.retry_response(503)
    c.response(200)
    counters = {n: x.value for n, x in s.counters.items() if x.value}
    assert counters == {
        "cluster.svc.retry.upstream_rq_503": 1,
        "cluster.svc.retry.upstream_rq_5xx": 1,
        "cluster.svc.upstream_rq_200": 1,
        "cluster.svc.upstream_rq_2xx": 1,
    }
    # per-code counters are created on first use only, then cached (same objects)
    assert "cluster.svc.upstream_rq_404" not in s.counters
    before = s.counters["cluster.svc.upstream_rq_200"]
    c.response(200)
    assert s.counters["cluster.svc.upstream_rq_200"] is before and before.value == 2


def test_hcm_response_ignores_nonsense_codes():
    s = Store()
    h = HcmStats(s, "p")
    h.response(0)  # no response sent (client went away): not a completed request
    h.response(999)
    assert all(s.counters[f"http.p.downstream_rq_{n}xx"].value == 0 for n in range(1, 6))
    assert h.downstream_rq_completed.value == 0


def test_server_stats_refreshed_at_render():
    s = Store()
    ServerStats(s, concurrency=1)
    listener = ListenerStats(s, "127.0.3.1_80", "ingress_http")
    listener.downstream_cx_active.inc(2)
    lines = s.render_text().splitlines()
    assert "server.live: 1" in lines
    assert "server.concurrency: 1" in lines
    assert "server.total_connections: 2" in lines
    srv = ServerStats(Store())
    srv.refresh(12.7, "PRE_INITIALIZING")
    assert (srv.uptime.value, srv.state.value) == (12, 2)
    srv.store.render_text()  # the render hook keeps the last state given
    assert srv.state.value == 2
    srv.refresh(state="LIVE")
    assert srv.state.value == 0
    mem = next(int(line.split(": ")[1]) for line in lines if line.startswith("server.memory_allocated: "))
    assert mem > 1_000_000
