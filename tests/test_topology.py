"""Topology loader/validator: the happy path and one case per kind of mistake, with exact lines."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pods.topology import (
    RESTART_POLICIES,
    MetricsSpec,
    PortClaim,
    Problem,
    PublishSpec,
    ReadyProbe,
    TopologyError,
    load_topology,
    parse_topology,
)

SEED = """\
name: seed-direct
pods:
  b:
    service:
      command: [python, -m, services.b]
      env: {ERROR_RATE: "20", SERVICE_PORT: "${PORT:-80}", METRICS_PORT: "8081"}
      ready: {tcp: "${PORT:-80}"}
    metrics: {port: 8081}
  a:
    publish: ["8080:${PORT:-80}"]
    add_hosts: {b.service: b}
    service:
      command: python -m services.a
      env: {SERVICE_HOST: 0.0.0.0, SERVICE_PORT: "${PORT:-80}", METRICS_HOST: 0.0.0.0, METRICS_PORT: "8081", UPSTREAM_SERVICE: "http://b.service:${PORT:-80}"}
      ready: {http: /metrics, port: 8081}
"""  # noqa: E501


def write(tmp_path: Path, text: str, name: str = "mesh.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def errors_of(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(TopologyError) as info:
        load_topology(path, environ or {})
    assert str(info.value) == "\n".join(map(str, info.value.problems))
    return [str(p) for p in info.value.problems if p.severity == "error"]


def test_seed_example_parses(tmp_path):
    path = write(tmp_path, SEED)
    topo = load_topology(path, {})
    assert topo.name == "seed-direct"
    assert topo.path == path.resolve()
    assert list(topo.pods) == ["b", "a"]
    assert topo.warnings == []
    assert topo.prometheus is None

    b = topo.pods["b"]
    assert (b.name, b.replicas, b.ip, b.line) == ("b", 1, None, 3)
    assert b.service.command == ("python", "-m", "services.b")
    assert b.service.env == {"ERROR_RATE": "20", "SERVICE_PORT": "80", "METRICS_PORT": "8081"}
    assert b.service.ready == ReadyProbe(kind="tcp", port=80, line=7)
    assert b.service.restart == "always"
    assert b.service.stop_grace_s == 10.0
    assert b.service.workdir == tmp_path.resolve()
    assert b.metrics == MetricsSpec(port=8081, path="/metrics", line=8)
    assert b.sidecar is None and b.sidecar_line == 0
    assert sorted(c.port for c in b.port_claims()) == [80, 8081]

    a = topo.pods["a"]
    assert a.service.command == ("python", "-m", "services.a")  # string command is shlex-split
    assert a.service.env["UPSTREAM_SERVICE"] == "http://b.service:80"
    assert a.service.env["SERVICE_HOST"] == "0.0.0.0"
    assert a.service.ready == ReadyProbe(kind="http", port=8081, path="/metrics", line=15)
    assert a.publish == (PublishSpec(host_ip="127.0.0.1", host_port=8080, pod_port=80, line=10),)
    assert a.add_hosts == (("b.service", "b"),)
    assert a.metrics is None


def test_seed_example_with_port_from_environment(tmp_path):
    topo = load_topology(write(tmp_path, SEED), {"PORT": "9000"})
    assert topo.pods["b"].service.ready.port == 9000
    assert topo.pods["a"].publish[0].pod_port == 9000


def test_full_featured_pod(tmp_path):
    path = write(tmp_path, """\
        x-common: &common
          restart: on-failure
        prometheus: {scrape_interval: 5s}
        pods:
          b:
            replicas: 3
            ip: 127.0.10.1
            service:
              <<: *common
              command: ["sleep", 10]
              env:
                FLAG: true
                RATIO: 0.5
                EMPTY: null
                COUNT: 3
              ready: {exec: "test -e /tmp/ready"}
              stop_grace_period: 1.5s
              workdir: sub/dir
            sidecar:
              listeners: [{port: 15001}]
            metrics: {port: 9100, path: /stats}
          c:
            ip: 127.0.20.1
            publish: ["127.0.0.2:8080:80/tcp", "8081:81"]
            add_hosts: ["b.service:b", "db:10.0.0.5", "me:localhost", "v6:::1"]
            service:
              command: echo 'hello world'
              restart: never
              stop_grace_period: 250ms
    """, name="My Mesh.yaml")
    topo = load_topology(path, {})
    assert topo.name == "my-mesh"  # default: the file stem made valid
    assert topo.prometheus is not None and topo.prometheus.scrape_interval_s == 5.0
    assert topo.prometheus.publish == 9090 and topo.prometheus.line == 3
    b = topo.pods["b"]
    assert (b.replicas, b.ip) == (3, "127.0.10.1")
    assert b.service.command == ("sleep", "10")
    assert b.service.env == {"FLAG": "true", "RATIO": "0.5", "EMPTY": "", "COUNT": "3"}
    assert b.service.ready == ReadyProbe(kind="exec", command=("test", "-e", "/tmp/ready"), line=16)
    assert b.service.restart == "on-failure"  # via the YAML merge key
    assert b.service.stop_grace_s == 1.5
    assert b.service.workdir == tmp_path.resolve() / "sub" / "dir"
    assert b.sidecar == {"listeners": [{"port": 15001}]} and b.sidecar_line == 19
    assert b.metrics == MetricsSpec(port=9100, path="/stats", line=21)
    c = topo.pods["c"]
    assert c.service.command == ("echo", "hello world")
    assert c.service.restart == "never"
    assert c.service.stop_grace_s == 0.25
    assert c.publish == (PublishSpec("127.0.0.2", 8080, 80, 24), PublishSpec("127.0.0.1", 8081, 81, 24))
    assert c.add_hosts == (("b.service", "b"), ("db", "10.0.0.5"), ("me", "localhost"), ("v6", "::1"))


@pytest.mark.parametrize("policy", ["always", "on-failure", "never"])
def test_each_restart_policy_loads(tmp_path, policy):
    path = write(tmp_path, f"pods:\n  b:\n    service: {{command: [x], restart: {policy}}}\n")
    assert load_topology(path, {}).pods["b"].service.restart == policy
    assert policy in RESTART_POLICIES


def test_restart_policy_error_lists_the_policies(tmp_path):
    path = write(tmp_path, "pods:\n  b:\n    service: {command: [x], restart: sometimes}\n")
    assert errors_of(path) == [f"{path}:3: pods.b.service.restart must be one of {', '.join(RESTART_POLICIES)}, "
                               "got string 'sometimes'"]


@pytest.mark.parametrize("value,seconds", [("10s", 10), ("500ms", 0.5), ("2m", 120), (7, 7), ("1m30s", 90),
                                           (2.5, 2.5), ("3", 3)])
def test_durations(tmp_path, value, seconds):
    path = write(tmp_path, f"""\
        pods:
          b:
            service: {{command: [x], stop_grace_period: {value}}}
    """)
    assert load_topology(path, {}).pods["b"].service.stop_grace_s == seconds


def test_port_claims_carry_env_lines(tmp_path):
    path = write(tmp_path, """\
        pods:
          a:
            service:
              command: [x]
              env:
                SERVICE_PORT: 80
                METRICS_PORT: "8081"
                NOT_A_PORT: "x"
                PORTS: "90"
    """)
    claims = load_topology(path, {}).pods["a"].port_claims()
    assert claims == [PortClaim(80, "SERVICE_PORT", 6), PortClaim(8081, "METRICS_PORT", 7)]


# Lines 1-4 of many cases: the service mapping is open, so line 5 is the next service key.
SVC_B = "pods:\n  b:\n    service:\n      command: [x]\n"
SVC_A = SVC_B.replace("b:", "a:")

MINIMAL_B = """\
  b:
    service:
      command: [python, -m, services.b]
"""

# (file text, expected "LINE: message fragment")
ERROR_CASES = {
    "yaml_syntax": ("pods:\n  b: [1, 2\n  c: 3\n", 3, "YAML syntax error:"),
    "empty_file": ("", 1, "topology file is empty"),
    "top_not_mapping": ("- a\n- b\n", 1, "top level must be a mapping"),
    "missing_pods": ("name: x\n", 1, "missing required key 'pods'"),
    "empty_pods": ("pods: {}\n", 1, "pods must not be empty"),
    "unknown_top_key": ("podz: {}\npods:\n" + MINIMAL_B, 1,
                        "unknown key 'podz' at top level (did you mean 'pods'?)"),
    "bad_mesh_name": ("name: Bad Name\npods:\n" + MINIMAL_B, 1, "is not a valid mesh name"),
    "unknown_pod_key": ("pods:\n  b:\n    replicass: 2\n    service: {command: [x]}\n", 3,
                        "unknown key 'replicass' in pod 'b' (did you mean 'replicas'?)"),
    "unknown_key_no_hint": ("pods:\n  b:\n    zzz: 2\n    service: {command: [x]}\n", 3,
                            "unknown key 'zzz' in pod 'b'$"),
    "unknown_service_key": ("pods:\n  b:\n    service:\n      comand: [x]\n      command: [x]\n", 4,
                            "unknown key 'comand' in pods.b.service (did you mean 'command'?)"),
    "unknown_ready_key": (SVC_B + "      ready: {tcpp: 80, tcp: 80}\n", 5,
                          "unknown key 'tcpp' in pods.b.service.ready (did you mean 'tcp'?)"),
    "unknown_metrics_key": ("pods:\n  b:\n    service: {command: [x]}\n    metrics:\n      port: 1\n"
                            "      pth: /m\n", 6,
                            "unknown key 'pth' in pods.b.metrics (did you mean 'path'?)"),
    "replicas_type": ("pods:\n  b:\n    replicas: two\n    service: {command: [x]}\n", 3,
                      "pods.b.replicas must be an integer, got string 'two'"),
    "replicas_zero": ("pods:\n  b:\n    replicas: 0\n    service: {command: [x]}\n", 3,
                      "pods.b.replicas must be at least 1, got 0"),
    "replicas_too_many": ("pods:\n  b:\n    replicas: 201\n    service: {command: [x]}\n", 3,
                          "pods.b.replicas must be at most 200"),
    "env_not_mapping": (SVC_A + "      env: [A=1]\n", 5,
                        "pods.a.service.env must be a mapping"),
    "env_nested": (SVC_A + "      env:\n        A:\n          b: 1\n", 7,
                   "pods.a.service.env.A must be a string, number or boolean, got a mapping"),
    "duplicate_pod": ("pods:\n  b:\n    service: {command: [x]}\n  b:\n    service: {command: [y]}\n", 4,
                      "duplicate pod 'b' (first defined at line 2)"),
    "duplicate_key": ("pods:\n  b:\n    replicas: 1\n    replicas: 2\n    service: {command: [x]}\n", 4,
                      "duplicate key 'replicas' in pod 'b' (first defined at line 3)"),
    "duplicate_env_key": (SVC_B + "      env:\n        A: 1\n        A: 2\n",
                          7, "duplicate key 'A' in pods.b.service.env (first defined at line 6)"),
    "alias_clash": ("pods:\n  b:\n    ip: 127.0.2.1\n    replicas: 2\n    service: {command: [x]}\n"
                    "  c:\n    ip: 127.0.3.1\n    service: {command: [x]}\n", 6,
                    "pod 'c' alias 127.0.3.1 clashes with pod 'b'"),
    "bad_ip": ("pods:\n  b:\n    ip: 10.0.0.1\n    service: {command: [x]}\n", 3, "is outside 127.0.0.0/8"),
    "reserved_ip": ("pods:\n  b:\n    ip: 127.0.0.1\n    service: {command: [x]}\n", 3, "is reserved"),
    "port_clash": (SVC_A + "      env:\n        SERVICE_PORT: 80\n"
                   "        METRICS_PORT: '80'\n", 7,
                   "port 80 is claimed twice in pod 'a': SERVICE_PORT (line 6) and METRICS_PORT (line 7)"),
    "missing_service": ("pods:\n  b:\n    replicas: 1\n", 2, "pod 'b' has no service"),
    "missing_command": ("pods:\n  b:\n    service:\n      env: {}\n", 3, "pods.b.service has no command"),
    "empty_command_list": ("pods:\n  b:\n    service:\n      command: []\n", 4,
                           "pods.b.service.command is empty"),
    "empty_command_str": ("pods:\n  b:\n    service:\n      command: '  '\n", 4,
                          "pods.b.service.command is empty"),
    "unbalanced_quote": ("pods:\n  b:\n    service:\n      command: \"echo 'hi\"\n", 4, "cannot be split"),
    "bad_publish": ("pods:\n  a:\n    publish: ['8080-80']\n    service: {command: [x]}\n", 3,
                    "bad publish '8080-80' in pod 'a': expected HOST_PORT:POD_PORT or IP:HOST_PORT:POD_PORT"),
    "publish_port_range": ("pods:\n  a:\n    publish: ['8080:70000']\n    service: {command: [x]}\n", 3,
                           "port 70000 is out of range"),
    "publish_ip": ("pods:\n  a:\n    publish: ['10.0.0.1:8080:80']\n    service: {command: [x]}\n", 3,
                   "not in 127.0.0.0/8"),
    "publish_twice": ("pods:\n  a:\n    publish: ['8080:80']\n    service: {command: [x]}\n"
                      "  c:\n    publish:\n      - 127.0.0.1:8080:81\n    service: {command: [x]}\n", 7,
                      "host port 127.0.0.1:8080 is published twice: by pod 'a' (line 3) and pod 'c'"),
    "add_hosts_unknown_pod": (
        "pods:\n" + MINIMAL_B + "  a:\n    add_hosts:\n      b.service: bb\n    service: {command: [x]}\n", 7,
        "add_hosts in pod 'a': 'bb' is neither an IP address nor a pod of this topology (did you mean 'b'?)"),
    "add_hosts_bad_name": (
        "pods:\n" + MINIMAL_B + "  a:\n    add_hosts: ['b..service:b']\n    service: {command: [x]}\n", 6,
        "add_hosts in pod 'a': 'b..service' is not a valid host name"),
    "bad_restart": (SVC_B + "      restart: allways\n", 5,
                    "must be one of always, on-failure, never, got string 'allways' "
                    "(did you mean 'always'?)"),
    "bad_duration": (SVC_B + "      stop_grace_period: soon\n", 5,
                     "pods.b.service.stop_grace_period must be a duration"),
    "ready_two_kinds": (SVC_B + "      ready: {tcp: 80, exec: [true]}\n", 5,
                        "needs exactly one of tcp, http, exec (found tcp, exec)"),
    "ready_none": (SVC_B + "      ready: {}\n", 5,
                   "needs exactly one of tcp, http, exec (found none)"),
    "ready_http_no_port": (SVC_B + "      ready: {http: /x}\n", 5,
                           "an http probe needs 'port'"),
    "ready_bad_port": (SVC_B + "      ready:\n        tcp: http\n", 6,
                       "pods.b.service.ready.tcp must be a port number (1..65535), got string 'http'"),
    "bad_pod_name": ("pods:\n  B_x:\n    service: {command: [x]}\n", 2, "pod name 'B_x' is not a DNS label"),
    "required_variable": (SVC_B + "      env: {P: '${PORT:?set PORT}'}\n", 5,
                          "required variable PORT is missing a value: set PORT"),
    "reserved_with_modifier": ("pods:\n  b:\n    service:\n      command: ['${POD_IP:-x}']\n", 4,
                               "${POD_IP} is filled in per replica"),
    "bad_interpolation": ("pods:\n  b:\n    service:\n      command: ['${9}']\n", 4,
                          "invalid interpolation format"),
    "unsupported_tag": ("pods:\n  b:\n    service:\n      command: [!foo x]\n", 4,
                        "unsupported YAML tag '!foo'"),
    "sidecar_not_mapping": ("pods:\n  b:\n    service: {command: [x]}\n    sidecar: [1]\n", 4,
                            "pods.b.sidecar must be a mapping"),
    "image_with_space": ("pods:\n  b:\n    image: 'my image'\n    service: {command: [x]}\n", 3,
                         "pods.b.image must be an image reference like registry/name:tag, got 'my image'"),
    "image_not_string": ("pods:\n  b:\n    image: [x]\n    service: {command: [x]}\n", 3,
                         "pods.b.image must be a string"),
    "ports_not_list": ("pods:\n  b:\n    ports: 80\n    service: {command: [x]}\n", 3,
                       "pods.b.ports must be a list of ports"),
    "ports_bad_protocol": ("pods:\n  b:\n    ports:\n      - 80\n      - 5432/udp\n    service: {command: [x]}\n",
                           5, "pods.b.ports: string '5432/udp' is not a port like 8080"),
    "depends_on_unknown": ("pods:\n  a:\n    depends_on: [bb]\n    service: {command: [x]}\n" + MINIMAL_B, 3,
                           "pods.a.depends_on: no pod named 'bb' (did you mean 'b'?)"),
    "depends_on_self": ("pods:\n  a:\n    depends_on: {a: ready}\n    service: {command: [x]}\n", 3,
                        "pods.a.depends_on: pod 'a' cannot depend on itself"),
    "depends_on_condition": ("pods:\n  a:\n    depends_on: {b: healthy}\n    service: {command: [x]}\n"
                             + MINIMAL_B, 3, "pods.a.depends_on.b must be one of started, ready, completed, "
                                             "got string 'healthy'"),
    "depends_on_compose_form": ("pods:\n  a:\n    depends_on:\n      b: {condition: service_healthy}\n"
                                "    service: {command: [x]}\n" + MINIMAL_B, 4,
                                "pods.a.depends_on.b: write the condition itself (b: ready)"),
    "depends_on_cycle": ("pods:\n  a:\n    depends_on: [c]\n    service: {command: [x]}\n"
                         "  b:\n    depends_on: [a]\n    service: {command: [x]}\n"
                         "  c:\n    depends_on: {b: ready}\n    service: {command: [x]}\n", 3,
                         "depends_on cycle: a -> c -> b -> a (none of them would ever start)"),
    "depends_on_never_completes": ("pods:\n  a:\n    depends_on: {b: completed}\n    service: {command: [x]}\n"
                                   + MINIMAL_B, 3, "pods.a.depends_on: b has restart: always, so it never completes"),
    "ports_twice": ("pods:\n  b:\n    ports: [80, '80/tcp']\n    service: {command: [x]}\n", 3,
                    "pods.b.ports: port 80 is listed twice"),
}


@pytest.mark.parametrize("text,line,fragment", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_error_kinds(tmp_path, text, line, fragment):
    path = tmp_path / "mesh.yaml"
    path.write_text(text)
    errors = errors_of(path)
    prefix = f"{path}:{line}: "
    matching = [e for e in errors if e.startswith(prefix)]
    assert matching, f"no error at line {line}; got:\n" + "\n".join(errors)
    if fragment.endswith("$"):
        assert any(e.endswith(fragment[:-1]) for e in matching), matching
    else:
        assert any(fragment in e for e in matching), matching


def test_problems_all_reported_together_in_line_order(tmp_path):
    path = write(tmp_path, """\
        pods:
          b:
            replicas: two
            service:
              command: []
              restart: sometimes
          a:
            publish: ['nope']
            add_hosts: {x: zz}
    """)
    errors = errors_of(path)
    lines = [int(e.split(":")[1]) for e in errors]
    assert lines == sorted(lines)
    assert lines == [3, 5, 6, 7, 8, 9]
    assert "pod 'a' has no service" in errors[3]


def test_no_traceback_text_for_garbage(tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_text("pods: {b: {service: {command: [x]}}}\n\tfoo: [\n")
    errors = errors_of(path)
    assert len(errors) == 1 and "YAML syntax error" in errors[0]


def test_file_not_found(tmp_path):
    path = tmp_path / "missing.yaml"
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    assert info.value.problems == [Problem(str(path), 0, "no such file")]
    assert str(info.value) == f"{path}: no such file"


def test_problem_str():
    assert str(Problem("f.yaml", 3, "boom")) == "f.yaml:3: boom"
    assert str(Problem("f.yaml", 3, "hmm", "warning")) == "f.yaml:3: warning: hmm"
    assert str(Problem("f.yaml", 0, "gone")) == "f.yaml: gone"


# --------------------------------------------------------------------------- interpolation


def interpolated_env(tmp_path: Path, env_block: str, environ: dict[str, str]):
    path = write(tmp_path, "pods:\n  b:\n    service:\n      command: [x]\n      env:\n" + env_block)
    topo = load_topology(path, environ)
    return topo.pods["b"].service.env, [str(w) for w in topo.warnings]


def test_interpolation_forms(tmp_path):
    env, warnings = interpolated_env(tmp_path, textwrap.indent(textwrap.dedent("""\
        PLAIN: "${HOST}:${PORT}"
        BARE: "$HOST"
        DEF_EMPTY: "${EMPTY:-fallback}"
        DASH_EMPTY: "${EMPTY-fallback}"
        DASH_UNSET: "${NOPE-fallback}"
        NESTED: "${NOPE:-${HOST}}"
        ALT: "${HOST:+yes}"
        DOLLARS: "cost $$5 and $${HOST}"
        LONE: "^a$"
        RESERVED: "${POD_IP}:${POD_NAME}/${REPLICA}@${MESH} $POD_IP"
    """), "        "), {"HOST": "h", "PORT": "80", "EMPTY": ""})
    assert env == {
        "PLAIN": "h:80",
        "BARE": "h",
        "DEF_EMPTY": "fallback",
        "DASH_EMPTY": "",
        "DASH_UNSET": "fallback",
        "NESTED": "h",
        "ALT": "yes",
        "DOLLARS": "cost $5 and ${HOST}",
        "LONE": "^a$",
        "RESERVED": "${POD_IP}:${POD_NAME}/${REPLICA}@${MESH} $POD_IP",
    }
    assert warnings == []


def test_interpolation_applies_to_values_not_keys(tmp_path):
    path = write(tmp_path, """\
        pods:
          b:
            service: {command: [x]}
            sidecar: {"${X}": "${X}"}
    """)
    assert load_topology(path, {"X": "y"}).pods["b"].sidecar == {"${X}": "y"}


def test_unset_variable_is_a_warning(tmp_path):
    path = write(tmp_path, """\
        pods:
          b:
            service:
              command: [x]
              env:
                A: "${MISSING}"
                B: "${MISSING}x"
    """)
    topo = load_topology(path, {})
    assert topo.pods["b"].service.env == {"A": "", "B": "x"}
    assert [str(w) for w in topo.warnings] == [
        f"{path}:6: warning: variable MISSING is not set; substituting an empty string"
    ]


def test_warnings_ride_along_with_errors(tmp_path):
    path = write(tmp_path, "pods:\n  b:\n    replicas: '${N}'\n    service: {command: [x]}\n")
    with pytest.raises(TopologyError) as info:
        load_topology(path, {})
    assert [p.severity for p in info.value.problems] == ["warning", "error"]


def test_extension_fields_are_ignored(tmp_path):
    path = write(tmp_path, """\
        x-unused: {command: "${REQUIRED:?never evaluated}"}
        pods:
          b: {service: {command: [x]}}
    """)
    assert list(load_topology(path, {}).pods) == ["b"]


def test_parse_topology_uses_os_environ_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHCTL_TEST_CMD", "hello")
    text = "pods:\n  b:\n    service: {command: '${MESHCTL_TEST_CMD} x'}\n"
    topo = parse_topology(text, tmp_path / "t.yaml")
    assert topo.pods["b"].service.command == ("hello", "x")
    assert topo.name == "t"


@pytest.mark.parametrize("body, line, phrase", [
    ("prometheus: {publsh: 9091}\n", 1, "did you mean 'publish'"),
    ("prometheus: {scrape_interval: soon}\n", 1, "prometheus.scrape_interval must be a positive duration"),
    ("prometheus: {ip: 10.0.0.1}\n", 1, "outside 127.0.0.0/8"),
])
def test_prometheus_section_errors(tmp_path, body, line, phrase):
    path = tmp_path / "p.yaml"
    path.write_text(body + "pods:\n  a:\n    service: {command: [sleep, '1']}\n")
    with pytest.raises(TopologyError) as err:
        load_topology(path)
    text = str(err.value)
    assert text.startswith(f"{path}:{line}: ") and phrase in text, text


def test_prometheus_section_defaults_and_publish_false(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("prometheus:\npods:\n  a:\n    service: {command: [sleep, '1']}\n")
    assert load_topology(path).prometheus.publish == 9090
    path.write_text("prometheus: {publish: false, port: 9091}\npods:\n  a:\n    service: {command: [sleep, '1']}\n")
    spec = load_topology(path).prometheus
    assert spec.publish is None and spec.port == 9091


def test_image_and_ports_for_export(tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_text("pods:\n  b:\n    image: registry.example/b:1\n    ports: [8080, '5432/tcp', 50051/grpc]\n"
                    "    service: {command: [x]}\n")
    pod = load_topology(path).pods["b"]
    assert (pod.image, pod.image_line) == ("registry.example/b:1", 3)
    assert [(p.port, p.protocol) for p in pod.ports] == [(8080, "http"), (5432, "tcp"), (50051, "grpc")]
