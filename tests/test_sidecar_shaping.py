"""Traffic shaping in our sidecar: weighted clusters, header mutations, rewrites, mirroring, previous_hosts.

Addresses: 127.0.251.1 (the sidecar), 127.0.252.x (scripted upstreams), 127.0.253.x (a shadow nobody serves and
one that accepts and never answers). Ports are the kernel's free picks.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import ConfigError
from sidecar.envoy_config import compile_envoy
from sidecar.envoy_export import export_envoy
from sidecar.short_config import compile_short
from tests.conftest import free_port
from tests.test_sidecar_proxy import SidecarProc, request
from tests.upstreams import UpstreamServer

POD = "127.0.251.1"
MAIN, CANARY, SHADOW = "127.0.252.1", "127.0.252.2", "127.0.252.3"
LB = ["127.0.252.11", "127.0.252.12", "127.0.252.13"]
DEAD = "127.0.253.1"  # nothing listens: connection refused
SILENT = "127.0.253.2"  # accepts, reads, never answers


def _cluster(name: str, ips: list[str], port: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "STATIC", "connect_timeout": "0.5s", **extra,
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}}} for ip in ips]}]}}


def _hdr(key: str, value: str, action: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"header": {"key": key, "value": value}}
    if action:
        out["append_action"] = action
    return out


def bootstrap(port: int, admin: int, up: int, silent: int) -> dict[str, Any]:
    routes = [
        {"match": {"prefix": "/split"}, "route": {"weighted_clusters": {"clusters": [
            {"name": "main", "weight": 90}, {"name": "canary", "weight": 10}]}}},
        {"match": {"prefix": "/echo/hdr"},
         "request_headers_to_add": [_hdr("x-route", "r"), _hdr("x-over", "route", "OVERWRITE_IF_EXISTS_OR_ADD"),
                                    _hdr("x-absent", "route", "ADD_IF_ABSENT")],
         "request_headers_to_remove": ["x-drop-me"],
         "response_headers_to_add": [_hdr("x-resp", "route")],
         "response_headers_to_remove": ["x-upstream"],
         "route": {"cluster": "main"}},
        {"match": {"prefix": "/mirror/dead"}, "route": {"cluster": "main", "request_mirror_policies": [
            {"cluster": "dead"}]}},
        {"match": {"prefix": "/mirror/silent"}, "route": {"cluster": "main", "timeout": "2s",
                                                         "request_mirror_policies": [{"cluster": "silent"}]}},
        {"match": {"prefix": "/mirror/half"}, "route": {"cluster": "main", "request_mirror_policies": [
            {"cluster": "shadow", "runtime_fraction": {"default_value": {"numerator": 50}}}]}},
        {"match": {"prefix": "/mirror"}, "route": {"cluster": "main", "request_mirror_policies": [
            {"cluster": "shadow"}]}},
        {"match": {"prefix": "/prev"}, "route": {"cluster": "lb", "prefix_rewrite": "", "retry_policy": {
            "retry_on": "5xx", "num_retries": 2, "retry_back_off": {"base_interval": "0.001s"},
            "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts"}],
            "host_selection_retry_max_attempts": 50}}},
        {"match": {"prefix": "/regex/"}, "route": {"cluster": "main", "regex_rewrite": {
            "pattern": {"regex": "^/regex/([a-z]+)/(\\d+)$"}, "substitution": "/echo/\\2/\\1"}}},
        {"match": {"prefix": "/host"}, "route": {"cluster": "main", "host_rewrite_literal": "rewritten.example",
                                                 "prefix_rewrite": "/echo/host"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "main"}},
    ]
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                 "HttpConnectionManager",
        "stat_prefix": "shaping",
        "http_filters": [{"name": "envoy.filters.http.router"}],
        "route_config": {
            "name": "shaping",
            "request_headers_to_add": [_hdr("x-global", "g"), _hdr("x-over", "global", "OVERWRITE_IF_EXISTS_OR_ADD"),
                                       _hdr("x-absent", "global", "ADD_IF_ABSENT")],
            "response_headers_to_add": [_hdr("x-resp", "global", "ADD_IF_ABSENT")],
            "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes,
                               "request_headers_to_add": [_hdr("x-vhost", "v")]}],
        },
    }
    return {
        "admin": {"address": {"socket_address": {"address": POD, "port_value": admin}}},
        "static_resources": {
            "listeners": [{"name": "in", "address": {"socket_address": {"address": POD, "port_value": port}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": hcm}]}]}],
            "clusters": [
                _cluster("main", [MAIN], up), _cluster("canary", [CANARY], up), _cluster("shadow", [SHADOW], up),
                _cluster("dead", [DEAD], up), _cluster("lb", LB, up, lb_policy="RANDOM"),
                _cluster("silent", [SILENT], silent, circuit_breakers={"thresholds": [{"max_requests": 2}]}),
            ],
        },
    }


class Silent:
    """A listener that accepts and reads everything, and never answers (a hung shadow)."""

    def __init__(self, ip: str) -> None:
        self.sock = socket.socket()
        self.sock.bind((ip, 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.accepted = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(c)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    up = free_port(MAIN)
    server = UpstreamServer([(ip, up) for ip in (MAIN, CANARY, SHADOW, *LB)]).start()
    silent = Silent(SILENT)
    port, admin = free_port(POD), free_port(POD)
    while admin == port:
        admin = free_port(POD)
    work = Path(tmp_path_factory.mktemp("shaping"))
    cfg = work / "envoy.yaml"
    cfg.write_text(yaml.safe_dump(bootstrap(port, admin, up, silent.port)))
    sc = SidecarProc(work / "sc", POD, admin, envoy=str(cfg)).start()
    try:
        yield {"sc": sc, "port": port, "admin": admin, "up": server, "silent": silent}
        assert sc.alive(), sc.stderr()[-2000:]
    finally:
        sc.stop()
        server.stop()
        silent.close()


def stats(env: dict[str, Any]) -> dict[str, int]:
    r = request(POD, env["admin"], "/stats?format=json")
    return {s["name"]: s["value"] for s in r.json()["stats"] if "name" in s}


def get(env: dict[str, Any], path: str, headers: dict[str, str] | None = None) -> Any:
    return request(POD, env["port"], path, host="svc.test", headers=headers)


# --- weighted clusters --------------------------------------------------------------------------------------------


def test_weighted_split_90_10(env: dict[str, Any]) -> None:
    """N = 2000, p = 0.10: sd of the canary share = sqrt(.1 * .9 / 2000) = 0.0067, so +-0.03 is 4.5 sd
    (a false failure about once in 150 000 runs). Each request counts in its chosen cluster's stats only."""
    n = 2000
    before = stats(env)
    conn = http.client.HTTPConnection(POD, env["port"], timeout=10)
    servers = []
    for _ in range(n):
        conn.request("GET", "/split", headers={"Host": "svc.test"})
        r = conn.getresponse()
        assert r.status == 200
        servers.append(json.loads(r.read())["server"].split(":")[0])
    conn.close()
    canary = servers.count(CANARY) / n
    assert servers.count(MAIN) + servers.count(CANARY) == n
    assert abs(canary - 0.10) <= 0.03, canary
    after = stats(env)
    delta = {c: after[f"cluster.{c}.upstream_rq_total"] - before.get(f"cluster.{c}.upstream_rq_total", 0)
             for c in ("main", "canary")}
    assert delta == {"main": servers.count(MAIN), "canary": servers.count(CANARY)}


# --- header mutations and rewrites ----------------------------------------------------------------------------


def test_header_levels_and_append_actions(env: dict[str, Any]) -> None:
    r = get(env, "/echo/hdr", headers={"x-drop-me": "1", "x-over": "client", "x-absent": "client"})
    assert r.status == 200
    assert r.headers["x-resp"] == "route"  # the global ADD_IF_ABSENT sees the route's
    assert "x-upstream" not in r.headers
    seen = [(n.lower(), v) for n, v in json.loads(r.body)["headers"]]
    names = [n for n, _ in seen]
    assert "x-drop-me" not in names
    assert ("x-route", "r") in seen and ("x-vhost", "v") in seen and ("x-global", "g") in seen
    assert [v for n, v in seen if n == "x-over"] == ["global"]  # the most global level is evaluated last
    assert [v for n, v in seen if n == "x-absent"] == ["client"]


def test_route_without_mutations_still_gets_global_ones(env: dict[str, Any]) -> None:
    r = get(env, "/echo/plain")
    seen = [(n.lower(), v) for n, v in json.loads(r.body)["headers"]]
    assert ("x-global", "g") in seen and ("x-vhost", "v") in seen and ("x-route", "r") not in seen
    assert r.headers["x-resp"] == "global"


def test_regex_rewrite(env: dict[str, Any]) -> None:
    r = get(env, "/regex/abc/42?q=1")
    body = json.loads(r.body)
    assert body["path"] == "/echo/42/abc?q=1"
    seen = {n.lower(): v for n, v in body["headers"]}
    assert seen["x-envoy-original-path"] == "/regex/abc/42?q=1"


def test_host_rewrite_literal(env: dict[str, Any]) -> None:
    r = get(env, "/host")
    body = json.loads(r.body)
    seen = {n.lower(): v for n, v in body["headers"]}
    assert seen["host"] == "rewritten.example"
    assert body["path"] == "/echo/host"


# --- mirroring ----------------------------------------------------------------------------------------------------


def _wait(cond: Any, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_mirror_copies_with_shadow_host(env: dict[str, Any]) -> None:
    up: UpstreamServer = env["up"]
    r = get(env, "/mirror/one", headers={"x-tag": "mirror-one"})
    assert r.status == 200 and json.loads(r.body)["server"].startswith(MAIN)
    assert _wait(lambda: any(x.header("x-tag") == "mirror-one" and x.listener.startswith(SHADOW)
                             for x in list(up.requests)))
    shadow = next(x for x in list(up.requests) if x.header("x-tag") == "mirror-one" and x.listener.startswith(SHADOW))
    assert shadow.header("host") == "svc.test-shadow"
    assert shadow.target == "/mirror/one"


def test_mirror_fraction(env: dict[str, Any]) -> None:
    """50 % of 400: sd 10; 200 +- 60 is 6 sd."""
    before = stats(env).get("cluster.shadow.upstream_rq_total", 0)
    for _ in range(400):
        assert get(env, "/mirror/half").status == 200
    _wait(lambda: False, 0.3)
    n = stats(env)["cluster.shadow.upstream_rq_total"] - before
    assert 140 <= n <= 260, n


def test_mirror_to_dead_cluster_never_affects_main(env: dict[str, Any]) -> None:
    for _ in range(20):
        r = get(env, "/mirror/dead")
        assert r.status == 200 and r.elapsed < 0.5
    assert _wait(lambda: stats(env).get("cluster.dead.upstream_rq_503", 0) >= 20)
    assert stats(env).get("cluster.main.upstream_rq_5xx", 0) == 0


def test_mirror_to_silent_cluster_is_bounded(env: dict[str, Any]) -> None:
    """The shadow never answers: main requests stay fast, at most max_requests (2) copies are in flight and the
    rest are dropped as overflows; the shadows time out with the route (2 s)."""
    t0 = time.monotonic()
    for _ in range(30):
        r = get(env, "/mirror/silent")
        assert r.status == 200 and r.elapsed < 0.5
    assert time.monotonic() - t0 < 5
    s = stats(env)
    assert s["cluster.silent.upstream_rq_pending_overflow"] >= 28
    assert s["cluster.silent.upstream_rq_total"] <= 2
    assert env["silent"].accepted <= 2
    assert _wait(lambda: stats(env).get("cluster.silent.upstream_rq_timeout", 0) >= 1, 4)


# --- retry host predicate -------------------------------------------------------------------------------------


def test_previous_hosts_retries_go_to_other_hosts(env: dict[str, Any]) -> None:
    """3 attempts over 3 hosts, all distinct: a re-pick misses 51 times with odds (2/3)^51 ~ 1e-9."""
    up: UpstreamServer = env["up"]
    for i in range(20):
        tag = f"prev-{i}"
        r = get(env, "/prev/status/503", headers={"x-tag": tag})
        assert r.status == 503
        assert _wait(lambda t=tag: len([x for x in list(up.requests) if x.header("x-tag") == t]) == 3)
        hosts = [x.listener.split(":")[0] for x in list(up.requests) if x.header("x-tag") == tag]
        assert sorted(hosts) == sorted(LB), hosts


# --- configuration and export ---------------------------------------------------------------------------------


def test_export_renders_every_shaping_field() -> None:
    boot = compile_envoy(bootstrap(1, 2, 3, 4), POD)
    exported = export_envoy(boot)
    again = compile_envoy(exported, POD)
    assert [lst.hcm.route_config.headers for lst in again.listeners if lst.name == "in"] == \
        [boot.listeners[0].hcm.route_config.headers]
    routes = next(lst for lst in again.listeners if lst.name == "in").hcm.route_config.virtual_hosts[0].routes
    orig = boot.listeners[0].hcm.route_config.virtual_hosts[0].routes
    for a, b in zip(routes, orig, strict=True):
        assert (a.weighted_clusters, a.mirror_policies, a.headers, a.host_rewrite_literal, a.retry_policy) == \
            (b.weighted_clusters, b.mirror_policies, b.headers, b.host_rewrite_literal, b.retry_policy)
        assert (a.regex_rewrite is None) == (b.regex_rewrite is None)
        if a.regex_rewrite is not None:
            assert a.regex_rewrite.pattern.pattern == b.regex_rewrite.pattern.pattern


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r["route"]["weighted_clusters"].update(total_weight=99), "add up to 100, not 99"),
    (lambda r: r["route"]["weighted_clusters"]["clusters"][0].update(name="nope"), "unknown cluster 'nope'"),
    (lambda r: r["route"].update(cluster="main"), "exactly one of cluster or weighted_clusters"),
])
def test_weighted_clusters_errors(change: Any, message: str) -> None:
    doc = bootstrap(1, 2, 3, 4)
    route = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"]["virtual_hosts"][0]["routes"][0]
    change(route)
    with pytest.raises(ConfigError, match=message):
        compile_envoy(doc, POD)


def test_header_value_with_command_operator_is_refused() -> None:
    doc = bootstrap(1, 2, 3, 4)
    doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"][
        "request_headers_to_add"] = [_hdr("x-a", "%DOWNSTREAM_REMOTE_ADDRESS%")]
    with pytest.raises(ConfigError, match="command operators"):
        compile_envoy(doc, POD)


def test_short_form_canary_and_mirror() -> None:
    boot = compile_short({"egress": {"port": 15001, "routes": [{
        "host": "b", "to": [{"target": "b:8080", "weight": 90}, {"target": "b-canary:8080", "weight": 10}],
        "request_mirror_policies": [{"cluster": "b-shadow:8080"}],
        "request_headers_to_add": [_hdr("x-via", "egress")]}]}}, POD)
    route = boot.egress_listener.hcm.route_config.virtual_hosts[0].routes[0]
    assert [(w.name, w.weight) for w in route.weighted_clusters] == [("b", 90), ("b-canary", 10)]
    assert [m.cluster for m in route.mirror_policies] == ["b-shadow"]
    assert route.headers.request_add[0].name == "x-via"
    assert {c.name for c in boot.clusters} >= {"b", "b-canary", "b-shadow"}


def test_exported_shaping_validates_on_the_real_envoy(tmp_path: Path) -> None:
    """Both front ends' shaping, exported, is a bootstrap the real Envoy 1.40 accepts (``--mode validate``)."""
    from tests.conformance.harness import envoy_binary

    envoy = envoy_binary()
    if envoy is None:
        pytest.skip("the real Envoy is not installed (meshctl[envoy])")
    from sidecar.envoy_export import export_envoy_yaml

    short = compile_short({"admin": {"port": 19901}, "egress": {"port": 15001, "routes": [{
        "host": "b", "to": [{"target": "127.0.252.1:8080", "weight": 90}, {"target": "127.0.252.2:8080", "weight": 10}],
        "request_mirror_policies": [{"cluster": "127.0.252.3:8080",
                                     "runtime_fraction": {"default_value": {"numerator": 5}}}],
        "retry_policy": {"retry_on": "5xx",
                         "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts"}]},
        "request_headers_to_add": [_hdr("x-via", "egress 100%%")]}]}}, POD)
    for name, boot in (("envoy", compile_envoy(bootstrap(18000, 18001, 18002, 18003), POD)), ("short", short)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(export_envoy_yaml(boot))
        r = subprocess.run([envoy, "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
