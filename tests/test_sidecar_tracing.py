"""Tracing in our sidecar alone: context propagation, spans per attempt, sampling, malformed headers, the reporter
against a dead, a slow and a healthy collector, its bounded buffer, the stats, and both configuration front ends.

The collector here is a Zipkin receiver in the test (a threaded HTTP server keeping the POSTed spans); what Envoy
does in the same situations is checked side by side in tests/conformance/test_tracing.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pods.resolver import HostsResolver
from sidecar.cluster import ClusterRuntime
from sidecar.config import Cluster, ConfigError, Endpoint
from sidecar.envoy_config import compile_envoy
from sidecar.envoy_export import export_envoy
from sidecar.mesh_tracing import COLLECTOR_CLUSTER, MeshTracing, apply_tracing
from sidecar.stats import ClusterStats, Store, ZipkinStats
from sidecar.tracing import ZipkinReporter, parse_b3_single, parse_traceparent
from tests.conftest import free_port, free_ports, wait_until
from tests.test_sidecar_proxy import ROOT, SidecarProc, request
from tests.upstreams import UpstreamServer
from tests.zipkin_receiver import ZipkinReceiver

POD = "127.0.236.1"
UP = "127.0.236.2"
COLL = "127.0.236.3"
TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"


def _tracing(sampling: float = 100, spawn: bool = True) -> dict[str, Any]:
    return {"random_sampling": {"value": sampling}, "spawn_upstream_span": spawn, "provider": {
        "name": "envoy.tracers.zipkin", "typed_config": {
            "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig", "collector_cluster": "collector",
            "collector_endpoint": "/api/v2/spans", "collector_endpoint_version": "HTTP_JSON",
            "trace_id_128bit": True, "trace_context_option": "USE_B3_WITH_W3C_PROPAGATION"}}}


def _listener(name: str, port: int, tracing: dict[str, Any] | None, direction: str = "INBOUND") -> dict[str, Any]:
    hcm: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                 "HttpConnectionManager",
        "stat_prefix": name,
        "route_config": {"name": name, "virtual_hosts": [
            {"name": "svc", "domains": ["svc"], "routes": [{"match": {"prefix": "/"}, "route": {
                "cluster": "svc", "retry_policy": {"retry_on": "5xx", "num_retries": 2, "per_try_timeout": "0.3s"}}}]},
            {"name": "dead", "domains": ["dead"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "dead"}}]},
        ]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    if tracing is not None:
        hcm["tracing"] = tracing
    return {"name": name, "traffic_direction": direction,
            "address": {"socket_address": {"address": POD, "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}]}


def _cluster(name: str, ip: str, port: int) -> dict[str, Any]:
    return {"name": name, "type": "STATIC", "connect_timeout": "0.25s", "load_assignment": {
        "cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
            "address": ip, "port_value": port}}}}]}]}}


def bootstrap(ports: dict[str, int], collector_port: int, up_port: int) -> dict[str, Any]:
    return {
        "node": {"id": "node-t", "cluster": "pod-t"},
        "layered_runtime": {"layers": [{"name": "static", "static_layer": {
            "tracing.zipkin.flush_interval_ms": 100}}]},
        "admin": {"address": {"socket_address": {"address": POD, "port_value": ports["admin"]}}},
        "static_resources": {
            "listeners": [_listener("ingress", ports["ingress"], _tracing()),
                          _listener("unsampled", ports["unsampled"], _tracing(0)),
                          _listener("plain", ports["plain"], None)],
            "clusters": [_cluster("svc", UP, up_port), _cluster("dead", UP, free_port(UP)),
                         _cluster("collector", COLL, collector_port)]}}


def start_sidecar(workdir: Path, collector_port: int, up_port: int) -> tuple[SidecarProc, dict[str, int]]:
    ports = dict(zip(("admin", "ingress", "unsampled", "plain"), free_ports(4, POD), strict=True))
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "envoy.json"
    cfg.write_text(json.dumps(bootstrap(ports, collector_port, up_port)))
    return SidecarProc(workdir, POD, ports["admin"], envoy=str(cfg)).start(), ports


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    server = UpstreamServer([(UP, free_port(UP))]).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def collector() -> Iterator[ZipkinReceiver]:
    rx = ZipkinReceiver(COLL)
    yield rx
    rx.stop()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, collector: ZipkinReceiver,
            upstream: UpstreamServer) -> Iterator[tuple[SidecarProc, dict[str, int]]]:
    sc, ports = start_sidecar(tmp_path_factory.mktemp("tracing"), collector.port, upstream.addresses[0][1])
    yield sc, ports
    assert sc.alive(), sc.stderr()[-3000:]
    sc.stop()


def stats(ports: dict[str, int]) -> dict[str, int]:
    r = request(POD, ports["admin"], "/stats?format=json")
    return {s["name"]: s["value"] for s in json.loads(r.body)["stats"] if "name" in s}


def get(ports: dict[str, int], path: str, host: str = "svc", listener: str = "ingress",
        headers: dict[str, str] | None = None) -> Any:
    return request(POD, ports[listener], path, host=host, headers=headers)


def echo_headers(resp: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in resp.json()["headers"].items()} if isinstance(resp.json()["headers"], dict) \
        else {k.lower(): v for k, v in resp.json()["headers"]}


def spans_of(collector: ZipkinReceiver, marker: str, count: int) -> list[dict[str, Any]]:
    """The spans of the trace whose connection manager span has ``marker`` in its URL (waits for ``count``)."""
    wait_until(lambda: collector.by_url(marker) is not None, f"the span of {marker}", timeout=5)
    hcm = collector.by_url(marker)
    assert hcm is not None
    wait_until(lambda: len(collector.trace(hcm["traceId"])) >= count, f"{count} spans of {marker}", timeout=5)
    return collector.trace(hcm["traceId"])


# --- the data path ------------------------------------------------------------------------------------------------

def test_known_traceparent_same_trace_new_span_parent_is_the_ingress_span(sidecar, collector):
    _, ports = sidecar
    r = get(ports, "/echo?t=known", headers={"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": "k=v"})
    assert r.status == 200
    seen = echo_headers(r)
    assert seen["x-b3-traceid"] == TRACE and seen["x-b3-parentspanid"] == SPAN
    assert seen["x-b3-spanid"] not in (SPAN, "") and seen["x-b3-sampled"] == "1"
    assert seen["traceparent"] == f"00-{TRACE}-{seen['x-b3-spanid']}-01"
    assert seen["tracestate"] == "k=v"  # passed through as it came
    assert "x-request-id" in seen
    spans = spans_of(collector, "t=known", 2)
    server = next(s for s in spans if s["kind"] == "SERVER")
    client = next(s for s in spans if s["kind"] == "CLIENT")
    assert server["id"] == SPAN and server["shared"] is True and "parentId" not in server  # the shared span
    assert server["localEndpoint"] == {"serviceName": "pod-t", "ipv4": POD, "port": 0}
    assert server["tags"]["node_id"] == "node-t" and server["tags"]["guid:x-request-id"] == seen["x-request-id"]
    assert server["tags"]["http.url"] == "http://svc/echo?t=known" and server["tags"]["http.status_code"] == "200"
    assert client["id"] == seen["x-b3-spanid"] and client["parentId"] == SPAN
    assert client["name"] == "router svc egress" and client["tags"]["upstream_cluster"] == "svc"


def test_no_context_starts_a_sampled_128_bit_trace(sidecar, collector):
    _, ports = sidecar
    seen = echo_headers(get(ports, "/echo?t=fresh"))
    trace = seen["x-b3-traceid"]
    assert len(trace) == 32 and seen["x-b3-parentspanid"] == trace[16:]  # the root span: the low 64 bits
    spans = spans_of(collector, "t=fresh", 2)
    assert {s["traceId"] for s in spans} == {trace}


def test_retries_are_child_spans_with_statuses(sidecar, collector, upstream):
    _, ports = sidecar
    r = get(ports, "/flaky/tr-retry/1/500?t=retry")
    assert r.status == 200
    spans = spans_of(collector, "t=retry", 3)
    server = next(s for s in spans if s["kind"] == "SERVER")
    attempts = sorted((s for s in spans if s["kind"] == "CLIENT"), key=lambda s: s["tags"].get("retry.count", "0"))
    assert [a["tags"]["http.status_code"] for a in attempts] == ["500", "200"]
    assert attempts[0]["tags"]["error"] == "true" and attempts[0]["tags"]["canceled"] == "true"
    assert "retry.count" not in attempts[0]["tags"] and attempts[1]["tags"]["retry.count"] == "1"
    assert all(a["parentId"] == server["id"] for a in attempts)
    recs = [rec for rec in upstream.requests if "/flaky/tr-retry/" in rec.target]
    assert [rec.header("x-b3-spanid") for rec in recs] == [a["id"] for a in attempts]  # a new span per attempt


def test_per_try_timeouts_and_connect_failures_are_flagged(sidecar, collector):
    _, ports = sidecar
    assert get(ports, "/delay/1?t=pertry").status == 504
    attempts = [s for s in spans_of(collector, "t=pertry", 4) if s["kind"] == "CLIENT"]
    assert len(attempts) == 3 and {a["tags"]["response_flags"] for a in attempts} == {"UT"}
    assert all(a["tags"]["canceled"] == "true" and a["tags"]["http.status_code"] == "0" for a in attempts)
    assert get(ports, "/x?t=dead", host="dead").status == 503
    spans = spans_of(collector, "t=dead", 2)
    attempt = next(s for s in spans if s["kind"] == "CLIENT")
    assert attempt["tags"]["response_flags"] == "UF" and attempt["tags"]["http.protocol"] == "-"
    assert attempt["tags"]["error.reason"] == "remote connection failure"
    server = next(s for s in spans if s["kind"] == "SERVER")
    assert server["tags"]["error"] == "true" and server["tags"]["response_flags"] == "UF"


def test_sampling_zero_propagates_an_unsampled_context_and_reports_nothing(sidecar, collector):
    _, ports = sidecar
    seen = echo_headers(get(ports, "/echo?t=unsampled", listener="unsampled"))
    assert seen["x-b3-sampled"] == "0" and seen["traceparent"].endswith("-00")
    get(ports, "/echo?t=after-unsampled")  # reported after the unsampled one would have been
    spans_of(collector, "t=after-unsampled", 2)
    assert collector.by_url("t=unsampled") is None


def test_a_caller_decision_wins_over_sampling(sidecar, collector):
    _, ports = sidecar
    seen = echo_headers(get(ports, "/echo?t=b3-deny", headers={"b3": "0"}))
    assert seen["b3"].split("-")[2] == "0" and "x-b3-traceid" not in seen  # single form answered in kind
    seen = echo_headers(get(ports, "/echo?t=b3-force", listener="unsampled",
                            headers={"x-b3-traceid": TRACE, "x-b3-spanid": SPAN, "x-b3-sampled": "1"}))
    assert seen["x-b3-sampled"] == "1"
    spans_of(collector, "t=b3-force", 2)
    assert collector.by_url("t=b3-deny") is None


@pytest.mark.parametrize("headers", [
    {"traceparent": "00-xyz-b7ad6b7169203331-01"},
    {"traceparent": f"00-{'0' * 32}-{SPAN}-01"},
    {"x-b3-traceid": "not-hex", "x-b3-spanid": SPAN},
    {"x-b3-traceid": TRACE, "x-b3-spanid": "short"},
    {"b3": f"{TRACE}-{SPAN}-maybe"},
    {"b3": "x" * 5000},
], ids=["tp-bad-trace", "tp-zero", "b3-bad-trace", "b3-bad-span", "b3-bad-sampled", "b3-huge"])
def test_malformed_context_starts_a_new_trace_and_is_not_propagated(sidecar, collector, headers):
    _, ports = sidecar
    r = get(ports, "/echo?t=malformed", headers=headers)
    assert r.status == 200
    seen = echo_headers(r)
    trace = seen["x-b3-traceid"]
    assert trace != TRACE and len(trace) == 32 and seen["x-b3-sampled"] == "1"
    for name, value in headers.items():
        assert seen.get(name) != value, f"the malformed {name} went upstream"


def test_untraced_listener_adds_nothing(sidecar):
    _, ports = sidecar
    seen = echo_headers(get(ports, "/echo", listener="plain", headers={"x-b3-traceid": "abc"}))
    assert seen["x-b3-traceid"] == "abc" and "traceparent" not in seen and "x-b3-spanid" not in seen


# --- the collector: dead, slow -----------------------------------------------------------------------------------

def test_dead_collector_never_slows_requests_and_reports_are_dropped(tmp_path, upstream):
    sc, ports = start_sidecar(tmp_path / "dead", free_port(COLL), upstream.addresses[0][1])
    try:
        for i in range(20):
            r = get(ports, f"/status/200?t=dead-coll-{i}")
            assert r.status == 200 and r.elapsed < 0.5
        wait_until(lambda: stats(ports).get("tracing.zipkin.reports_dropped", 0) > 0, "a dropped report")
        st = stats(ports)
        assert st["tracing.zipkin.reports_sent"] == 0 and st["cluster.collector.upstream_cx_connect_fail"] > 0
        assert st["tracing.zipkin.spans_sent"] > 0  # (Envoy counts the spans of every report it attempts)
    finally:
        sc.stop()


def test_slow_collector_does_not_hold_requests_up(tmp_path, upstream):
    rx = ZipkinReceiver(COLL, delay=30)  # answers long after the reporter's 5 s timeout
    sc, ports = start_sidecar(tmp_path / "slow", rx.port, upstream.addresses[0][1])
    try:
        for i in range(30):
            r = get(ports, f"/status/200?t=slow-{i}")
            assert r.status == 200 and r.elapsed < 0.5
        wait_until(lambda: stats(ports)["cluster.collector.upstream_rq_timeout"] >= 1, "the report's timeout",
                   timeout=10)
        assert stats(ports)["tracing.zipkin.reports_dropped"] >= 1
    finally:
        sc.stop()
        rx.stop()


def test_bounded_buffer_drops_and_counts_spans_while_a_report_hangs():
    """A collector that accepts and never answers: one report in flight, the rest bounded, the excess counted."""
    hang = socket.socket()
    hang.bind((COLL, 0))
    hang.listen(8)
    port = hang.getsockname()[1]

    async def burst() -> ZipkinStats:
        store = Store()
        cluster = ClusterRuntime(Cluster("collector", "STATIC", (Endpoint(COLL, port),), connect_timeout_s=1.0),
                                 ClusterStats(store, "collector"), HostsResolver(None))
        await cluster.start()
        zstats = ZipkinStats(store)
        reporter = ZipkinReporter(cluster, "/api/v2/spans", zstats, flush_interval_ms=50, min_flush_spans=5,
                                  max_buffered=10)
        reporter.start()
        reporter.add(['{"id":"1"}'] * 5)  # the first report: it will hang
        while not reporter.inflight:
            await asyncio.sleep(0.01)
        for _ in range(10):
            reporter.add(['{"id":"2"}'] * 3)  # 10 fit in the buffer, 20 do not
        await reporter.close(0.05)
        cluster.close()
        return zstats

    try:
        zstats = asyncio.run(burst())
    finally:
        hang.close()
    assert zstats.spans_sent.value == 5 and zstats.reports_sent.value == 0
    assert zstats.spans_dropped.value == 21  # 30 added while the first report hung; 9 fit (10 - the last 3 + 2)


# --- stats --------------------------------------------------------------------------------------------------------

def test_every_tracing_stat_is_counted(sidecar):
    """Every tracing stat the sidecar exports moved in this module (spans_dropped: the bounded-buffer test,
    reports_dropped: the dead-collector test, both in their own stores)."""
    sc, ports = sidecar
    get(ports, "/echo?t=client", headers={"x-client-trace-id": "abc"})
    wait_until(lambda: stats(ports)["http.ingress.tracing.client_enabled"] > 0, "client_enabled")
    st = stats(ports)
    names = sorted(k for k in st if k.startswith("tracing.") or ".tracing." in k)
    assert names == sorted([
        "http.ingress.tracing.client_enabled", "http.ingress.tracing.random_sampling",
        "http.unsampled.tracing.client_enabled", "http.unsampled.tracing.random_sampling",
        "tracing.zipkin.reports_dropped", "tracing.zipkin.reports_sent", "tracing.zipkin.spans_dropped",
        "tracing.zipkin.spans_sent", "tracing.zipkin.timer_flushed"])
    silent = [k for k in names if not st[k] and not k.endswith(("reports_dropped", "spans_dropped",
                                                                 "unsampled.tracing.client_enabled"))]
    assert silent == [], f"exported but never counted: {silent}"


# --- configuration --------------------------------------------------------------------------------------------------

def _doc(tracing: dict[str, Any] | None = None) -> dict[str, Any]:
    doc = bootstrap({"admin": 9901, "ingress": 8000, "unsampled": 8001, "plain": 8002}, 9411, 8080)
    if tracing is not None:
        doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["tracing"] = tracing
    return doc


def test_envoy_front_end_reads_tracing_node_direction_and_runtime():
    b = compile_envoy(_doc(), POD)
    t = b.listeners[0].hcm.tracing
    assert t is not None and t.collector_cluster == "collector" and t.spawn_upstream_span
    assert t.traffic_direction == "INBOUND" and t.trace_context_option == "USE_B3_WITH_W3C_PROPAGATION"
    assert b.listeners[1].hcm.tracing.random_sampling == 0.0 and b.listeners[2].hcm.tracing is None
    assert (b.node_id, b.node_cluster) == ("node-t", "pod-t")
    assert b.runtime == (("tracing.zipkin.flush_interval_ms", "100"),)
    assert not b.warnings


def test_other_tracers_are_a_warning_naming_the_field():
    doc = _doc({"provider": {"name": "envoy.tracers.opentelemetry", "typed_config": {}}})
    b = compile_envoy(doc, POD)
    assert b.listeners[0].hcm.tracing is None
    assert any("tracing.provider.name" in w and "opentelemetry" in w for w in b.warnings)


@pytest.mark.parametrize(("change", "message"), [
    ({"collector_cluster": "nope"}, "unknown cluster 'nope'"),
    ({"collector_endpoint_version": "HTTP_PROTO"}, "HTTP_PROTO is not supported"),
    ({"trace_context_option": "W3C_ONLY"}, "trace_context_option"),
    ({"split_spans_for_request": True}, "split_spans_for_request"),
    ({"collector_endpoint": "api"}, "starting with '/'"),
])
def test_bad_zipkin_config_is_a_clear_error(change, message):
    tracing = _tracing()
    tracing["provider"]["typed_config"].update(change)
    with pytest.raises(ConfigError, match=message):
        compile_envoy(_doc(tracing), POD)


def test_bad_sampling_is_a_clear_error():
    tracing = _tracing()
    tracing["random_sampling"] = {"value": 150}
    with pytest.raises(ConfigError, match="percentage from 0 to 100"):
        compile_envoy(_doc(tracing), POD)


def test_export_runs_on_the_real_envoy(tmp_path):
    b = apply_tracing(compile_envoy(_doc(), POD), MeshTracing("127.0.0.9", 9411, 50.0, "pod-x"))
    doc = export_envoy(b)
    assert doc["node"] == {"id": "node-t", "cluster": "pod-x"}
    static = doc["layered_runtime"]["layers"][0]["static_layer"]
    assert static == {"tracing.zipkin.flush_interval_ms": 100}  # the bootstrap's own wins over the mesh's 500
    assert doc["static_resources"]["listeners"][0]["traffic_direction"] == "INBOUND"
    again = compile_envoy(doc, POD)
    assert again.listeners[0].hcm.tracing == b.listeners[0].hcm.tracing
    assert again.listeners[2].hcm.tracing.collector_cluster == COLLECTOR_CLUSTER  # the mesh's, on the untraced one
    from tests.conformance.harness import envoy_binary

    envoy = envoy_binary()
    if envoy is None:
        pytest.skip("the real Envoy is not installed")
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = subprocess.run([envoy, "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


def test_context_parsers():
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-01".encode()).sampled is True
    assert parse_traceparent(f"00-{TRACE.upper()}-{SPAN}-00".encode()).trace_id == TRACE  # as Envoy: accepted
    assert parse_traceparent(b"00-abc") is None
    ctx = parse_b3_single(f"{TRACE}-{SPAN}-d-{SPAN}".encode())
    assert (ctx.trace_id, ctx.sampled, ctx.parent_id, ctx.single) == (TRACE, True, SPAN, True)


@pytest.mark.parametrize(("argv", "message"), [
    (["--tracing-collector", "nowhere"], "--tracing-collector must be IP:PORT"),
    (["--tracing-collector", "127.0.0.1:9411", "--tracing-sampling", "150"], "percentage from 0 to 100"),
    (["--tracing-sampling", "5"], "--tracing-sampling needs --tracing-collector"),
])
def test_cli_flags_bad_input_is_one_line(tmp_path, argv, message):
    cfg = tmp_path / "envoy.json"
    cfg.write_text(json.dumps(_doc()))
    out = subprocess.run([sys.executable, "-m", "sidecar", "--envoy", str(cfg), "--pod-ip", POD, "--check", *argv],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_cli_flags_apply_the_mesh_tracing(tmp_path):
    cfg = tmp_path / "envoy.json"
    doc = _doc()
    doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"].pop("tracing")
    cfg.write_text(json.dumps(doc))
    out = subprocess.run([sys.executable, "-m", "sidecar", "--envoy", str(cfg), "--pod-ip", POD, "--check",
                          "--tracing-collector", "127.0.0.9:9411", "--tracing-sampling", "25",
                          "--service-cluster", "web", "--service-node", "web-1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 0, out.stderr
