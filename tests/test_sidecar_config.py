"""The two config front ends: the seed's Envoy file and the short form compile to the same model."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from sidecar.config import ConfigError, RetryPolicy
from sidecar.envoy_config import HCM_TYPES, compile_envoy, load_envoy
from sidecar.short_config import compile_short

ROOT = Path(__file__).resolve().parent.parent
POD = "127.0.7.1"
V3 = HCM_TYPES[1]


def _seed_path() -> Path:
    for p in (ROOT / "examples" / "seed" / "envoy.yaml", ROOT.parent / "shared" / "seed" / "envoy.yaml"):
        if p.exists():
            return p
    pytest.skip("seed envoy.yaml not found")


@pytest.fixture
def seed_doc() -> dict:
    return yaml.safe_load(_seed_path().read_text())


def _hcm(doc: dict, i: int = 0) -> dict:
    return doc["static_resources"]["listeners"][i]["filter_chains"][0]["filters"][0]["typed_config"]


def _minimal(**hcm_extra) -> dict:
    hcm = {"@type": V3, "stat_prefix": "x",
           "route_config": {"name": "r", "virtual_hosts": [
               {"name": "v", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c"}}]}]},
           "http_filters": [{"name": "envoy.filters.http.router"}]}
    hcm.update(hcm_extra)
    return {"static_resources": {
        "listeners": [{"name": "l", "address": {"socket_address": {"address": "0.0.0.0", "port_value": 80}},
                       "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                       "typed_config": hcm}]}]}],
        "clusters": [{"name": "c", "type": "STATIC", "load_assignment": {"endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 8000}}}}]}]}}]}}


def _vhost(doc: dict) -> dict:
    return _hcm(doc)["route_config"]["virtual_hosts"][0]


# --- the seed -----------------------------------------------------------------------------------

def test_seed_compiles(tmp_path):
    path = tmp_path / "envoy.yaml"
    path.write_text(_seed_path().read_text())
    b = load_envoy(path, POD)
    ingress, egress = b.listeners
    assert (ingress.address, ingress.port, ingress.original_address) == (POD, 80, "0.0.0.0")
    assert not ingress.is_egress
    assert (egress.address, egress.port, egress.original_address) == (POD, 9001, "127.0.0.1")
    assert egress.is_egress and b.egress_listener is egress
    assert ingress.hcm.stat_prefix == "ingress_http" and egress.hcm.stat_prefix == "egress_http"
    assert ingress.hcm.access_logs[0].path == "/dev/stdout"
    vh = egress.hcm.route_config.virtual_hosts[0]
    assert vh.name == "remote_service_b"
    assert vh.domains == ("b.local.service", "b.local.service:*")
    assert vh.retry_policy == RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=2)
    assert vh.routes[0].retry_policy is None and vh.routes[0].cluster == "remote_service_b"
    local = b.cluster("local_service")
    assert local.endpoints[0].host == POD and local.endpoints[0].port == 8000
    remote = b.cluster("remote_service_b")
    assert remote.type == "STRICT_DNS" and remote.connect_timeout_s == 0.25
    assert (remote.endpoints[0].host, remote.endpoints[0].port) == ("b.service", 80)
    assert (b.admin.address, b.admin.port, b.admin.access_log_path) == (POD, 9901, "/dev/stdout")
    assert len(b.warnings) == 1 and "admin" in b.warnings[0] and "0.0.0.0" in b.warnings[0]


def test_seed_public_admin_keeps_wildcard(seed_doc):
    b = compile_envoy(seed_doc, POD, public_admin=True)
    assert b.admin.address == "0.0.0.0" and b.warnings == ()


def test_v3_and_json_compile_to_the_same_model(seed_doc, tmp_path):
    v2 = compile_envoy(seed_doc, POD)
    doc = copy.deepcopy(seed_doc)
    for i in range(2):
        _hcm(doc, i)["@type"] = V3
    assert compile_envoy(doc, POD) == v2
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(doc))
    assert load_envoy(path, POD).listeners == v2.listeners


def test_legacy_config_and_names(seed_doc):
    doc = copy.deepcopy(seed_doc)
    f = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    f["name"] = "envoy.http_connection_manager"
    f["config"] = {k: v for k, v in f.pop("typed_config").items() if k != "@type"}
    f["config"]["http_filters"] = [{"name": "envoy.router"}]
    f["config"]["access_log"] = [{"name": "envoy.file_access_log", "config": {"path": "/tmp/a.log", "format": "%REQ%"}}]
    b = compile_envoy(doc, POD)
    assert b.listeners[0].hcm.access_logs[0].path == "/tmp/a.log"
    assert b.listeners[0].hcm.access_logs[0].format == "%REQ%"


# --- errors --------------------------------------------------------------------------------------

def _err(doc: dict, match: str) -> str:
    with pytest.raises(ConfigError, match=match) as exc:
        compile_envoy(doc, POD)
    return str(exc.value)


def test_incomplete_tls_and_v2_tls_context_are_errors(seed_doc):
    # TLS itself is supported (tests/test_sidecar_tls.py); a transport socket without its context is not.
    doc = copy.deepcopy(seed_doc)
    doc["static_resources"]["clusters"][1]["transport_socket"] = {"name": "envoy.transport_sockets.tls"}
    msg = _err(doc, "expected a mapping")
    assert msg.startswith("envoy.yaml: static_resources.clusters[1].transport_socket.typed_config:")
    doc = copy.deepcopy(seed_doc)
    doc["static_resources"]["listeners"][0]["filter_chains"][0]["tls_context"] = {}
    assert "static_resources.listeners[0].filter_chains[0].tls_context" in _err(doc, "use transport_socket")


def test_unknown_http_filter_is_error(seed_doc):
    _hcm(seed_doc)["http_filters"].insert(0, {"name": "envoy.filters.http.lua", "typed_config": {}})
    assert "http_filters[0].name" in _err(seed_doc, "envoy.filters.http.lua")


def test_route_to_missing_cluster_is_error(seed_doc):
    _vhost(seed_doc)["routes"][0]["route"]["cluster"] = "nope"
    assert "routes[0].route.cluster" in _err(seed_doc, "unknown cluster 'nope'")


def test_eds_and_rds_and_dynamic_are_errors(seed_doc):
    doc = copy.deepcopy(seed_doc)
    doc["static_resources"]["clusters"][0]["type"] = "EDS"
    assert "clusters[0].type" in _err(doc, "EDS")
    doc = copy.deepcopy(seed_doc)
    _hcm(doc)["rds"] = _hcm(doc).pop("route_config")
    assert "typed_config.rds" in _err(doc, "dynamic")
    doc = copy.deepcopy(seed_doc)
    doc["dynamic_resources"] = {"cds_config": {}}
    _err(doc, "dynamic_resources")


def test_duplicates_are_errors(seed_doc):
    doc = copy.deepcopy(seed_doc)
    doc["static_resources"]["clusters"][1]["name"] = "local_service"
    _hcm(doc, 1)["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["cluster"] = "local_service"
    _err(doc, r"clusters\[1\].name: duplicate cluster name")
    doc = copy.deepcopy(seed_doc)
    for lst in doc["static_resources"]["listeners"]:
        lst["name"] = "same"
    _err(doc, "duplicate listener name 'same'")
    doc = copy.deepcopy(seed_doc)
    doc["static_resources"]["listeners"][1]["address"]["socket_address"]["port_value"] = 80
    _err(doc, r"listeners\[1\].address: 127.0.0.1:80 is already used")


def test_bad_duration_and_codec_are_errors(seed_doc):
    doc = copy.deepcopy(seed_doc)
    doc["static_resources"]["clusters"][0]["connect_timeout"] = "fast"
    _err(doc, r"clusters\[0\].connect_timeout: invalid duration 'fast'")
    doc = copy.deepcopy(seed_doc)
    _hcm(doc)["codec_type"] = "HTTP2"
    _err(doc, "codec_type: HTTP2 is not supported")


def test_listener_filters_are_error(seed_doc):
    lst = seed_doc["static_resources"]["listeners"][0]
    # tls_inspector is accepted (the permissive TLS pair, tests/test_sidecar_tls.py); any other is not
    lst["listener_filters"] = [{"name": "envoy.filters.listener.proxy_protocol"}]
    _err(seed_doc, "proxy_protocol")


# --- warnings ------------------------------------------------------------------------------------

def test_unknown_fields_warn_with_full_path(seed_doc):
    seed_doc["static_resources"]["clusters"][0]["upstream_connection_options"] = {}
    seed_doc["static_resources"]["clusters"][1]["http2_protocol_options"] = {}
    seed_doc["node"] = {"id": "x", "locality": {"zone": "a"}}  # (node id/cluster are read: tracing)
    seed_doc["static_resources"]["clusters"][0]["lb_policy"] = "MAGLEV"
    _vhost(seed_doc)["retry_policy"] = {"retry_on": "5xx,reset-before-request"}
    b = compile_envoy(seed_doc, POD, public_admin=True)
    w = "\n".join(b.warnings)
    assert "envoy.yaml: static_resources.clusters[0].upstream_connection_options: not implemented, ignored" \
        in b.warnings
    assert "envoy.yaml: node.locality: not implemented, ignored" in b.warnings
    assert "clusters[1].http2_protocol_options" in w and "HTTP/1.1" in w
    assert "clusters[0].lb_policy: lb_policy MAGLEV" in w and b.clusters[0].lb_policy == "ROUND_ROBIN"
    assert "'reset-before-request'" in w
    assert b.listeners[0].hcm.route_config.virtual_hosts[0].retry_policy.retry_on == {"5xx"}
    assert len(b.warnings) == 5


# --- routes ----------------------------------------------------------------------------------------

def test_route_level_and_vhost_level_retry_policy():
    doc = _minimal()
    vh = _vhost(doc)
    vh["retry_policy"] = {"retry_on": "5xx", "num_retries": 3}
    vh["routes"].insert(0, {"match": {"prefix": "/r"}, "route": {
        "cluster": "c", "timeout": "0s",
        "retry_policy": {"retry_on": "connect-failure,retriable-status-codes", "per_try_timeout": "0.5s",
                         "retriable_status_codes": [503, 429],
                         "retry_back_off": {"base_interval": "0.1s", "max_interval": {"seconds": 1, "nanos": 0}}}}})
    b = compile_envoy(doc, POD)
    vhost = b.listeners[0].hcm.route_config.virtual_hosts[0]
    assert vhost.retry_policy == RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=3)
    r0, r1 = vhost.routes
    assert r0.retry_policy == RetryPolicy(retry_on=frozenset({"connect-failure", "retriable-status-codes"}),
                                          num_retries=1, per_try_timeout_s=0.5,
                                          retriable_status_codes=frozenset({503, 429}),
                                          backoff_base_s=0.1, backoff_max_s=1.0)
    assert r0.timeout_s == 0 and r1.timeout_s == 15.0 and r1.retry_policy is None
    assert b.listeners[0].address == POD and b.clusters[0].endpoints[0].host == POD
    assert b.listeners[0].name == "l" and b.warnings == ()


def test_direct_response_regex_and_headers():
    doc = _minimal()
    vh = _vhost(doc)
    vh["routes"][:0] = [
        {"name": "health", "match": {"path": "/healthz"},
         "direct_response": {"status": 200, "body": {"inline_string": "ok"}}},
        {"match": {"safe_regex": {"google_re2": {}, "regex": "/v[0-9]+/.*"}},
         "route": {"cluster": "c", "timeout": 2.5, "prefix_rewrite": "/"}},
        {"match": {"prefix": "/h", "case_sensitive": False, "headers": [
            {"name": "X-Exact", "exact_match": "a"},
            {"name": "x-sm", "string_match": {"prefix": "p"}},
            {"name": "x-ci", "string_match": {"exact": "Ab", "ignore_case": True}},
            {"name": "x-re", "safe_regex_match": {"regex": "^[a-z]+$"}},
            {"name": "x-present"},
            {"name": "x-absent", "present_match": True, "invert_match": True},
        ]}, "route": {"cluster": "c"}},
    ]
    routes = compile_envoy(doc, POD).listeners[0].hcm.route_config.virtual_hosts[0].routes
    assert routes[0].direct_response.status == 200 and routes[0].direct_response.body == b"ok"
    assert routes[0].cluster is None and routes[0].match.path == "/healthz" and routes[0].name == "health"
    assert routes[1].match.regex.fullmatch("/v2/x") and routes[1].timeout_s == 2.5 and routes[1].prefix_rewrite == "/"
    m = routes[2].match
    assert m.case_sensitive is False and m.prefix == "/h"
    h = {x.name: x for x in m.headers}
    assert h["x-exact"].exact == "a" and h["x-sm"].prefix == "p"
    assert h["x-ci"].regex.fullmatch("aB") and not h["x-ci"].regex.fullmatch("aBc")
    assert h["x-re"].regex.pattern == "^[a-z]+$"
    assert h["x-present"].present is True
    assert h["x-absent"].present is True and h["x-absent"].invert is True


def test_bad_regex_and_unsupported_match_are_errors():
    doc = _minimal()
    _vhost(doc)["routes"][0]["match"] = {"safe_regex": {"regex": "("}}
    _err(doc, r"match.safe_regex.regex: invalid regex")
    doc = _minimal()
    _vhost(doc)["routes"][0]["match"]["query_parameters"] = [{"name": "a"}]
    _err(doc, "query_parameters: match condition not supported")


def test_static_cluster_needs_ip():
    doc = _minimal()
    ep = doc["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    ep["endpoint"]["address"]["socket_address"]["address"] = "b.service"
    _err(doc, "STATIC clusters need IP addresses")


def test_cluster_fields_and_legacy_hosts():
    doc = _minimal()
    doc["static_resources"]["clusters"][0] = {
        "name": "c", "type": "logical_dns", "connect_timeout": "100ms", "lb_policy": "least_request",
        "hosts": [{"socket_address": {"address": "localhost", "port_value": 81}}],
        "dns_refresh_rate": "10s", "per_connection_buffer_limit_bytes": 32768,
        "circuit_breakers": {"thresholds": [{"priority": "HIGH", "max_connections": 1},
                                            {"max_connections": 10, "max_retries": 1}]}}
    c = compile_envoy(doc, POD).clusters[0]
    assert c.type == "LOGICAL_DNS" and c.connect_timeout_s == pytest.approx(0.1) and c.lb_policy == "LEAST_REQUEST"
    assert (c.endpoints[0].host, c.endpoints[0].port) == (POD, 81)
    assert c.circuit_breakers.max_connections == 10 and c.circuit_breakers.max_retries == 1
    assert c.circuit_breakers.max_requests == 1024
    assert c.dns_refresh_rate_s == 10 and c.per_connection_buffer_limit_bytes == 32768


def test_hcm_options_and_text_format():
    doc = _minimal(use_remote_address=True, max_request_headers_kb=96, stream_idle_timeout="30s",
                   access_log=[{"name": "envoy.access_loggers.file", "typed_config": {
                       "path": "/dev/stderr",
                       "log_format": {"text_format_source": {"inline_string": "%START_TIME%\n"}}}}])
    hcm = compile_envoy(doc, POD).listeners[0].hcm
    assert hcm.use_remote_address and hcm.max_request_headers_kb == 96 and hcm.stream_idle_timeout_s == 30
    assert hcm.access_logs[0].path == "/dev/stderr" and hcm.access_logs[0].format == "%START_TIME%\n"


# --- short form --------------------------------------------------------------------------------------

FULL_SHORT = {
    "admin": {"port": 9902},
    "access_log": "/tmp/access.log",
    "ingress": {"port": 80, "to": 8000, "timeout": "15s",
                "retry_policy": {"retry_on": "5xx", "num_retries": 2, "per_try_timeout": "1s"}},
    "egress": {"port": 9001, "routes": [
        {"host": "b.local.service", "to": "b:80", "timeout": "2s", "retry_policy": {"retry_on": "5xx,reset"},
         "connect_timeout": "0.25s", "lb_policy": "least_request", "circuit_breakers": {"max_retries": 5}},
        {"hosts": ["c.local.service", "c"], "to": "10.0.0.9:8080"},
        {"host": "b-alt", "to": "b:81"},
    ]},
}


def test_short_full_example():
    b = compile_short(FULL_SHORT, POD)
    ingress, egress = b.listeners
    assert (ingress.name, ingress.address, ingress.port, ingress.original_address) == ("ingress", POD, 80, "0.0.0.0")
    assert ingress.hcm.stat_prefix == "ingress_http" and ingress.hcm.access_logs[0].path == "/tmp/access.log"
    ivh = ingress.hcm.route_config.virtual_hosts[0]
    assert ivh.name == "local_service" and ivh.domains == ("*",)
    assert ivh.routes[0].retry_policy == RetryPolicy(frozenset({"5xx"}), 2, 1.0)
    local = b.cluster("local_service")
    assert local.type == "STATIC" and (local.endpoints[0].host, local.endpoints[0].port) == (POD, 8000)

    assert (egress.name, egress.original_address, egress.is_egress) == ("egress", "127.0.0.1", True)
    assert egress.hcm.stat_prefix == "egress_http"
    vhs = egress.hcm.route_config.virtual_hosts
    assert [v.domains for v in vhs] == [("b.local.service", "b.local.service:*"),
                                         ("c.local.service", "c.local.service:*", "c", "c:*"), ("b-alt", "b-alt:*")]
    assert not any("*" == d for v in vhs for d in v.domains)  # unknown hosts get 404 NR
    assert vhs[0].routes[0].cluster == "b_80" and vhs[0].routes[0].timeout_s == 2
    assert vhs[1].routes[0].cluster == "10.0.0.9" and vhs[2].routes[0].cluster == "b_81"
    b80 = b.cluster("b_80")
    assert b80.type == "STRICT_DNS" and b80.lb_policy == "LEAST_REQUEST" and b80.connect_timeout_s == 0.25
    assert b80.circuit_breakers.max_retries == 5
    assert b.cluster("10.0.0.9").type == "STATIC"
    assert (b.admin.address, b.admin.port) == (POD, 9902) and b.warnings == ()


def test_short_matches_the_seed(seed_doc):
    """The seed written in the short form compiles to the same routing as the seed's Envoy file."""
    route = {"host": "b.local.service", "to": "b.service:80", "retry_policy": {"retry_on": "5xx", "num_retries": 2}}
    short = compile_short({"ingress": {"port": 80, "to": 8000}, "egress": {"port": 9001, "routes": [route]}}, POD)
    seed = compile_envoy(seed_doc, POD)
    assert short.listeners[0].hcm.stat_prefix == seed.listeners[0].hcm.stat_prefix
    s_vh = short.listeners[1].hcm.route_config.virtual_hosts[0]
    e_vh = seed.listeners[1].hcm.route_config.virtual_hosts[0]
    assert s_vh.domains == e_vh.domains
    assert s_vh.routes[0].retry_policy == e_vh.retry_policy
    assert short.admin == seed.admin.__class__(POD, 9901)


def test_short_defaults_and_disabled_log():
    b = compile_short({"access_log": None, "ingress": {"port": 8080, "to": "localhost:8000"}}, POD)
    assert b.listeners[0].hcm.access_logs == () and b.admin.port == 9901
    assert b.clusters[0].endpoints[0].host == POD
    assert compile_short({}, POD).listeners == ()


@pytest.mark.parametrize("section, message", [
    ({"egress": {"port": 9001, "routes": [{"host": "b", "to": "b:80", "retry_polcy": {}}]}},
     "sidecar.egress.routes[0].retry_polcy: unknown key (did you mean 'retry_policy'?)"),
    ({"ingres": {"port": 80, "to": 8000}}, "sidecar.ingres: unknown key (did you mean 'ingress'?)"),
    ({"ingress": {"port": 80, "to": 8000, "retry_policy": {"retry_on": "5xxx"}}},
     "sidecar.ingress.retry_policy.retry_on: unknown retry condition '5xxx' (did you mean '5xx'?)"),
    ({"egress": {"port": 9001, "routes": [{"host": "b", "to": "b:80", "lb_policy": "round_robbin"}]}},
     "did you mean 'round_robin'?"),
    ({"ingress": {"port": 70000, "to": 8000}}, "sidecar.ingress.port: 70000 is out of range"),
    ({"ingress": {"port": "80x", "to": 8000}}, "sidecar.ingress.port: expected an integer"),
    ({"ingress": {"port": 80, "to": 8000, "timeout": "soon"}}, "sidecar.ingress.timeout: invalid duration"),
    ({"egress": {"port": 9001, "routes": "b"}}, "sidecar.egress.routes: expected a list"),
    ({"egress": {"port": 9001, "routes": [{"host": "b", "to": "b"}]}},
     "sidecar.egress.routes[0].to: expected 'host:port'"),
    ({"egress": {"port": 9001, "routes": [{"to": "b:80"}]}}, "exactly one of host or hosts"),
    ({"egress": {"port": 9001, "routes": [{"host": "b", "to": "b:80"}, {"host": "b", "to": "c:80"}]}},
     "sidecar.egress.routes[1]: host 'b' is already routed"),
    ({"ingress": {"port": 80, "to": 8000}, "egress": {"port": 80, "routes": []}},
     "sidecar.egress.port: port 80 is already used by ingress.port"),
    ({"admin": {"port": 9001}, "egress": {"port": 9001, "routes": []}}, "already used by admin.port"),
    ({"admin": {"port": 9901, "address": "0.0.0.0"}}, "sidecar.admin.address: the admin interface is always bound"),
    ({"envoy": "envoy.yaml"}, "sidecar.envoy:"),
    ({"ingress": {"port": 80}}, "sidecar.ingress.to: required"),
])
def test_short_errors(section, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compile_short(section, POD)


def test_short_public_admin_address():
    b = compile_short({"admin": {"port": 9901, "address": "0.0.0.0"}}, POD, public_admin=True)
    assert b.admin.address == "0.0.0.0"


def test_circuit_breaker_thresholds_are_parsed_without_warnings():
    doc = _minimal()
    doc["static_resources"]["clusters"][0]["circuit_breakers"] = {"thresholds": [
        {"max_connections": 10, "max_pending_requests": 20, "max_requests": 30, "max_retries": 1,
         "retry_budget": {"budget_percent": {"value": 25.0}, "min_retry_concurrency": 2}}]}
    b = compile_envoy(doc, POD)
    cb = b.clusters[0].circuit_breakers
    assert (cb.max_connections, cb.max_pending_requests, cb.max_requests, cb.max_retries) == (10, 20, 30, 1)
    assert (cb.retry_budget_percent, cb.min_retry_concurrency) == (25.0, 2)
    assert not any("circuit_breakers" in w for w in b.warnings), b.warnings  # all enforced now
    short = compile_short({"egress": {"port": 9001, "routes": [
        {"host": "b", "to": "b:80", "circuit_breakers": {"max_connections": 1, "max_pending_requests": 1,
                                                         "retry_budget": {"budget_percent": 50}}}]}}, POD)
    scb = short.clusters[0].circuit_breakers
    assert (scb.max_connections, scb.max_pending_requests, scb.retry_budget_percent) == (1, 1, 50.0)
    assert not short.warnings
    with pytest.raises(ConfigError, match="budget_percent"):
        compile_short({"egress": {"port": 9001, "routes": [
            {"host": "b", "to": "b:80", "circuit_breakers": {"retry_budget": {"budget_percent": 150}}}]}}, POD)


def test_outlier_detection_and_health_checks_parse_in_both_forms():
    doc = _minimal()
    c = doc["static_resources"]["clusters"][0]
    c["outlier_detection"] = {"consecutive_5xx": 3, "interval": "0.5s", "base_ejection_time": "2s",
                              "max_ejection_percent": 50, "enforcing_consecutive_gateway_failure": 100}
    c["health_checks"] = [{"timeout": "1s", "interval": "2s", "unhealthy_threshold": 2, "healthy_threshold": 1,
                           "http_health_check": {"path": "/healthz", "expected_statuses": [{"start": 200,
                                                                                            "end": 300}]}}]
    b = compile_envoy(doc, POD)
    od = b.clusters[0].outlier_detection
    assert (od.consecutive_5xx, od.interval_s, od.base_ejection_time_s, od.max_ejection_percent) == (3, 0.5, 2.0, 50)
    hc = b.clusters[0].health_checks[0]
    assert (hc.path, hc.expected_statuses, hc.unhealthy_threshold) == ("/healthz", ((200, 300),), 2)
    assert not b.warnings
    short = compile_short({"egress": {"port": 9001, "routes": [
        {"host": "b", "to": "b:80", "outlier_detection": {"consecutive_5xx": 2},
         "health_check": {"path": "/h", "interval": "1s", "timeout": "0.5s", "expected_statuses": [200, 204]}}]}},
        POD)
    assert short.clusters[0].outlier_detection.consecutive_5xx == 2
    assert short.clusters[0].health_checks[0].expected_statuses == ((200, 201), (204, 205))
    with pytest.raises(ConfigError, match="health_check.path: required"):
        compile_short({"egress": {"port": 9001, "routes": [
            {"host": "b", "to": "b:80", "health_check": {"interval": "1s", "timeout": "1s"}}]}}, POD)
    with pytest.raises(ConfigError, match="max_ejection_percent"):
        compile_short({"egress": {"port": 9001, "routes": [
            {"host": "b", "to": "b:80", "outlier_detection": {"max_ejection_percent": 101}}]}}, POD)


def test_route_and_header_regexes_are_re2_linear_on_hostile_input():
    """A route's safe_regex runs on paths the client picks: under a backtracking engine the pattern below
    takes 2^60 steps on this path (the test would hang until pytest's timeout); RE2 answers at once."""
    doc = _minimal()
    _vhost(doc)["routes"][:0] = [
        {"match": {"safe_regex": {"regex": "/([a-z_]+)+X"}, "headers": [
            {"name": "x-re", "safe_regex_match": {"regex": "([a-z_]+)+X"}}]}, "route": {"cluster": "c"}},
        {"match": {"prefix": "/", "headers": [{"name": "x-ci", "string_match": {"suffix": "_", "ignore_case": True}}]},
         "route": {"cluster": "c"}},
    ]
    routes = compile_envoy(doc, POD).listeners[0].hcm.route_config.virtual_hosts[0].routes
    hostile = "a" * 60
    assert routes[0].match.regex.fullmatch("/" + hostile) is None
    assert routes[0].match.headers[0].regex.fullmatch(hostile) is None
    assert routes[0].match.regex.fullmatch("/" + hostile + "X") is not None
    assert routes[1].match.headers[0].regex.fullmatch(hostile + "_") is not None


def test_short_form_takes_a_quoted_port_as_the_ingress_target():
    """`to: "${PORT}"` interpolates to a string in a topology: it is the port all the same."""
    boot = compile_short({"ingress": {"port": 8080, "to": "3000"}}, POD)
    assert boot.cluster("local_service").endpoints[0].port == 3000


def test_rbac_and_jwt_load_only_when_configured():
    """A plain sidecar never imports the RBAC and JWT modules (start-up time, issue 18); their filter names are
    the ones http_filters knows, and a configuration with them still compiles to their filters."""
    import subprocess
    import sys

    from sidecar import http_filters, jwt_authn, rbac

    assert (http_filters.RBAC, http_filters.JWT_AUTHN) == (rbac.RBAC, jwt_authn.JWT_AUTHN)
    code = ("import json, sys; from sidecar.short_config import compile_short; "
            "from sidecar.http_filters import add_live_faults; "
            "add_live_faults(compile_short({'ingress': {'port': 8080, 'to': 8000}, 'admin': {'port': 9901}}, "
            "'127.0.0.2')); print(json.dumps(sorted(m for m in sys.modules if m in "
            "('sidecar.rbac', 'sidecar.jwt_authn'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    assert json.loads(out) == []
    boot = compile_short({"ingress": {"port": 8080, "to": 8000, "allow": [{"paths": ["/ok"]}]}}, "127.0.0.2")
    names = [f.name for lst in boot.listeners for f in lst.hcm.http_filters]
    assert rbac.RBAC in names
