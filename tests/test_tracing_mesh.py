"""Tracing in a mesh: the topology's `tracing:` section, what the plan gives every process and sidecar, the
trace tree, and end to end: one request with a known traceparent through the seed's sidecar demo (both
engines), read back with `meshctl trace`."""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshctl.tracing.tree import build, summary, walk
from pods.plan import HostFacts, plan_mesh
from pods.sidecars import find_envoy
from pods.topology import TopologyError, TracingSpec, parse_topology
from tests.conftest import ROOT, free_port, wait_until

EXAMPLE = ROOT / "examples/tracing/tracing.yaml"

MESH = """
name: tr
{tracing}
pods:
  b:
    service:
      command: [python, -m, services.b]
      env: {{ERROR_RATE: "0", SERVICE_PORT: "8000"}}
  a:
    sidecar:
      ingress: {{port: 8080, to: 8000}}
      egress:
        port: 9001
        routes: [{{host: b.local.service, to: "b:8000"}}]
      admin: {{port: 9901}}
    service:
      command: [python, -m, services.a]
      env: {{SERVICE_PORT: "8000", UPSTREAM_SERVICE: "http://b.local.service:9001"}}
"""


def _plan(tmp_path: Path, tracing: str = "", spec: TracingSpec | None = None, **kw: Any):
    topo = parse_topology(textwrap.dedent(MESH.format(tracing=tracing)), tmp_path / "t.yaml")
    return plan_mesh(topo, tmp_path / "state", HostFacts(environ={"PATH": os.environ["PATH"]},
                                                        envoy_bin=find_envoy(os.environ)),
                     run_id="r1", tracing=spec, **kw)


# --------------------------------------------------------------------------- topology


def test_the_section_and_its_defaults(tmp_path):
    for text in ("tracing:", "tracing: true"):
        topo = parse_topology(textwrap.dedent(MESH.format(tracing=text)), tmp_path / "t.yaml")
        assert topo.tracing == TracingSpec(line=3)
    topo = parse_topology(textwrap.dedent(MESH.format(tracing="tracing: {sampling: '12.5%', port: 19411, "
                                                               "ip: 127.0.9.1, max_traces: 50, "
                                                               "max_spans_per_trace: 7, "
                                                               "forward: {otlp: 'http://h:4318/v1/traces'}}")),
                          tmp_path / "t.yaml")
    assert topo.tracing == TracingSpec(sampling=12.5, port=19411, ip="127.0.9.1", max_traces=50,
                                       max_spans_per_trace=7, forward=("otlp", "http://h:4318/v1/traces"), line=3)
    assert parse_topology(textwrap.dedent(MESH.format(tracing="")), tmp_path / "t.yaml").tracing is None
    assert parse_topology(textwrap.dedent(MESH.format(tracing="tracing: false")), tmp_path / "t.yaml").tracing is None


@pytest.mark.parametrize(("section", "line", "message"), [
    ("tracing: {sampling: 101}", 3, "tracing.sampling must be a percentage from 0 to 100"),
    ("tracing: {sampling: lots}", 3, "tracing.sampling must be a percentage"),
    ("tracing: {port: 0}", 3, "tracing.port must be a port number (1..65535), got 0"),
    ("tracing: {ip: 10.0.0.1}", 3, "tracing.ip 10.0.0.1 is outside 127.0.0.0/8"),
    ("tracing: {max_traces: 0}", 3, "tracing.max_traces must be at least 1, got 0"),
    ("tracing: {max_spans_per_trace: many}", 3, "tracing.max_spans_per_trace must be an integer"),
    ("tracing: {samplng: 5}", 3, "unknown key 'samplng' in tracing (did you mean 'sampling'?)"),
    ("tracing: {forward: {}}", 3, "tracing.forward needs exactly one of zipkin"),
    ("tracing: {forward: {zipkin: 'http://a/', otlp: 'http://b/'}}", 3, "(found zipkin, otlp)"),
    ("tracing: {forward: {zipkin: 'ftp://a/'}}", 3, "tracing.forward.zipkin must be an http:// or https:// URL"),
    ("tracing: {forward: {jaeger: 'http://a/'}}", 3, "unknown key 'jaeger' in tracing.forward"),
    ("tracing: [1]", 3, "tracing must be a mapping"),
])
def test_section_errors_are_file_line(tmp_path, section, line, message):
    with pytest.raises(TopologyError) as err:
        parse_topology(textwrap.dedent(MESH.format(tracing=section)), tmp_path / "t.yaml")
    assert any(p.line == line and message in p.message for p in err.value.problems), err.value.problems
    assert f"t.yaml:{line}: " in str(err.value)


def test_validate_says_where(meshctl):
    path = meshctl.write("bad.yaml", MESH.format(tracing="tracing:\n  sampling: 200"))
    proc = meshctl("validate", str(path), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"{path}:4: tracing.sampling must be a percentage from 0 to 100 (e.g. 100, 12.5 " \
                                  'or "1%"), got number 200'


# --------------------------------------------------------------------------- plan


def test_an_untraced_mesh_plans_exactly_as_before(tmp_path):
    plan = _plan(tmp_path)
    assert plan.tracing is None and "tracing" not in plan.pods
    for proc in plan.processes:
        assert "TRACING_ENDPOINT" not in proc.env and "OTEL_EXPORTER_ZIPKIN_ENDPOINT" not in proc.env
        assert not any(a.startswith("--tracing") for a in proc.argv)
    assert "tracing" not in plan.prometheus_config


def test_a_traced_mesh_runs_the_collector_and_tells_every_process(tmp_path):
    plan = _plan(tmp_path, "tracing: {sampling: 25, max_traces: 10, forward: {zipkin: 'http://z:9411/api/v2/spans'}}")
    assert not plan.errors, plan.errors
    ip = plan.pods["tracing"].replicas[0].ip
    assert plan.tracing.describe() == {
        "pod": "tracing", "collector": f"{ip}:9411", "endpoint": f"http://{ip}:9411/api/v2/spans",
        "query_url": f"http://{ip}:9411", "sampling": 25.0, "max_traces": 10, "max_spans_per_trace": 1000,
        "forward": {"kind": "zipkin", "url": "http://z:9411/api/v2/spans"}}
    procs = {p.key: p for p in plan.processes}
    collector = procs["tracing-0/service"]
    assert collector.argv[1:] == ("-m", "meshctl.tracing.collector", "--listen", f"{ip}:9411", "--max-traces", "10",
                                  "--max-spans-per-trace", "1000", "--forward-zipkin", "http://z:9411/api/v2/spans")
    assert collector.ready.kind == "http" and collector.ready.path == "/health" and collector.restart == "always"
    for proc in procs.values():
        assert proc.env["TRACING_ENDPOINT"] == proc.env["OTEL_EXPORTER_ZIPKIN_ENDPOINT"] == plan.tracing.endpoint
    sidecar = procs["a-0/sidecar"].argv
    i = sidecar.index("--tracing-collector")
    assert sidecar[i:i + 6] == ("--tracing-collector", f"{ip}:9411", "--tracing-sampling", "25",
                                "--service-cluster", "a")
    # A honours HTTP_PROXY: its spans to the collector must not go through its sidecar's egress.
    assert ip in procs["a-0/service"].env["NO_PROXY"].split(",")
    # Scraped by the mesh's Prometheus as one more pod with metrics.
    jobs = {j["job_name"]: j for j in yaml.safe_load(plan.prometheus_config)["scrape_configs"]}
    assert jobs["tracing"]["metrics_path"] == "/metrics"
    assert jobs["tracing"]["static_configs"][0]["targets"] == [f"{ip}:9411"]


def test_up_tracing_is_the_section_with_defaults_and_the_file_wins(tmp_path):
    plan = _plan(tmp_path, spec=TracingSpec())
    assert plan.tracing is not None and plan.tracing.sampling == 100.0 and plan.tracing.port == 9411


def test_a_pod_named_tracing_is_a_problem(tmp_path):
    text = MESH.format(tracing="tracing:") + "  tracing:\n    service: {command: [sleep, '1']}\n"
    topo = parse_topology(textwrap.dedent(text), tmp_path / "t.yaml")
    plan = plan_mesh(topo, tmp_path / "state", HostFacts(environ={"PATH": os.environ["PATH"]}))
    assert any(p.line == 3 and "a pod named 'tracing' already exists" in p.message for p in plan.errors)


@pytest.mark.skipif(find_envoy(os.environ) is None, reason="the real Envoy is not installed (meshctl[envoy])")
def test_the_real_envoy_gets_the_tracer_in_its_bootstrap(tmp_path):
    plan = _plan(tmp_path, "tracing: {sampling: 50}", sidecar_engine="envoy")
    assert not plan.errors, plan.errors
    boot = yaml.safe_load(next(t for p, t in plan.files.items() if p.name == "a-0.envoy.yaml"))
    ip = plan.tracing.ip
    cluster = next(c for c in boot["static_resources"]["clusters"] if c["name"] == "meshctl_tracing")
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert endpoint["socket_address"] == {"address": ip, "port_value": 9411}
    assert boot["node"]["cluster"] == "a"
    hcms = [f["typed_config"] for lst in boot["static_resources"]["listeners"] if lst["name"] != "admin_readonly"
            for chain in lst["filter_chains"] for f in chain["filters"]
            if f["name"] == "envoy.filters.network.http_connection_manager"]
    assert hcms and all(h["tracing"]["random_sampling"]["value"] == 50 for h in hcms)
    sidecar = next(p for p in plan.processes if p.key == "a-0/sidecar")
    assert "--tracing-collector" not in sidecar.argv  # Envoy has it in its bootstrap
    assert plan.envoy_bootstrap("a") == next(t for p, t in plan.files.items() if p.name == "a-0.envoy.yaml")


# --------------------------------------------------------------------------- the tree


def _s(sid: str, parent: str | None = None, kind: str = "CLIENT", ts: int = 0, service: str = "a",
       name: str = "router b egress", shared: bool = False, **tags: str) -> dict[str, Any]:
    out: dict[str, Any] = {"traceId": "1" * 32, "id": sid, "kind": kind, "timestamp": 1_000_000 + ts,
                           "duration": 10, "name": name, "localEndpoint": {"serviceName": service}, "tags": tags}
    if parent:
        out["parentId"] = parent
    if shared:
        out["shared"] = True
    return out


def test_attempts_are_numbered_and_shared_halves_joined():
    spans = [
        _s("0000000000000001", kind="SERVER", name="ingress", **{"http.status_code": "200"}),
        _s("0000000000000002", "0000000000000001", ts=1, name="egress", **{"http.status_code": "200"}),
        _s("0000000000000004", "0000000000000002", ts=50, **{"http.status_code": "200", "retry.count": "1"}),
        _s("0000000000000003", "0000000000000002", ts=2, **{"http.status_code": "500", "error": "true"}),
        # b's sidecar shares attempt 2's span id; b's own span is a child of that server half.
        _s("0000000000000004", "0000000000000002", kind="SERVER", ts=51, service="b", name="ingress", shared=True),
        _s("0000000000000005", "0000000000000004", kind="SERVER", ts=52, service="b", name="GET /"),
        _s("0000000000000009", "00000000000000ff", ts=60, name="orphan"),
    ]
    roots = build(spans)
    assert [r.span.get("name") for r in roots] == ["ingress", "orphan"]
    order = [(d, n.span["name"], n.span["localEndpoint"]["serviceName"], n.attempt) for d, n in walk(roots)]
    assert order == [(0, "ingress", "a", 0), (1, "egress", "a", 0), (2, "router b egress", "a", 1),
                     (2, "router b egress", "a", 2), (3, "ingress", "b", 0), (4, "GET /", "b", 0),
                     (0, "orphan", "a", 0)]
    s = summary(spans)
    assert s["retries"] == 1 and s["errors"] == 1 and s["span_count"] == 7 and s["roots"] == 2


def test_loops_in_parent_links_lose_no_span():
    spans = [_s("0000000000000001", "0000000000000002"), _s("0000000000000002", "0000000000000001", ts=1)]
    assert sorted(n.span["id"] for _, n in walk(build(spans))) == ["0000000000000001", "0000000000000002"]


# --------------------------------------------------------------------------- end to end


def _demo_env(error_rate: int) -> dict[str, str]:
    return {"PUBLISH_PORT": str(free_port()), "TRACING_PORT": str(free_port()), "B_ERROR_RATE": str(error_rate)}


def _get(url: str, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code


def _trace(meshctl, project: str, tid: str) -> dict[str, Any] | None:
    proc = meshctl("trace", tid, "-p", project, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def _complete(doc: dict[str, Any] | None) -> bool:
    """The sidecar's spans of the request are in (it reports them together) and B's span of every attempt."""
    if doc is None:
        return False
    spans = doc["spans"]
    attempts = [s for s in spans if s.get("name", "").startswith("router b ")]
    at_b = [s for s in spans if s["localEndpoint"].get("serviceName") == "b"]
    roots = [s for s in spans if s.get("kind") == "SERVER" and s["localEndpoint"].get("serviceName") == "a"]
    return bool(roots) and bool(attempts) and len(at_b) == len(attempts)


def _attempt_statuses(doc: dict[str, Any]) -> list[str]:
    egress = _find(doc["tree"], lambda n: n["name"].startswith("b.local.service"))
    return [c["status"] for c in egress["children"]]


def _find(tree: list[dict[str, Any]], pred: Any) -> dict[str, Any]:
    stack = list(tree)
    while stack:
        node = stack.pop()
        if pred(node):
            return node
        stack.extend(node["children"])
    raise AssertionError("no such span in the tree")


ENGINES = ["meshctl", pytest.param("envoy", marks=pytest.mark.skipif(
    find_envoy(os.environ) is None, reason="the real Envoy is not installed (meshctl[envoy])"))]


@pytest.mark.parametrize("engine", ENGINES)
def test_one_request_with_a_known_traceparent_through_the_seed_demo(meshctl, engine):
    project = f"trace{engine[:3]}"
    env = _demo_env(error_rate=50)
    meshctl("up", str(EXAMPLE), "-d", "-p", project, "--sidecar-engine", engine, env=env)
    meshctl.started.append(project)
    url = f"http://127.0.0.1:{env['PUBLISH_PORT']}/"
    # B fails half of its requests at random and A's sidecar retries 5xx twice, so one request's trace is
    # "attempt 1 (500), attempt 2 (200)" with p = 0.5 x 0.5 = 1/4: among 40 requests there is one except with
    # p = 0.75^40 = 1.0e-5; an all-success one (1/2 each) except with p = 0.5^40 < 1e-12.
    sent: dict[str, tuple[str, str, int]] = {}
    for _ in range(40):
        tid, parent, rid = f"{random.getrandbits(128):032x}", f"{random.getrandbits(64) | 1:016x}", os.urandom(8).hex()
        status = _get(url, {"traceparent": f"00-{tid}-{parent}-01", "x-request-id": rid})
        sent[tid] = (parent, rid, status)
    docs: dict[str, dict[str, Any]] = {}

    def all_in() -> bool:
        for tid in sent:
            if tid not in docs or not _complete(docs[tid]):
                doc = _trace(meshctl, project, tid)
                if not _complete(doc):
                    return False
                docs[tid] = doc
        return True

    # Envoy reports every 5 s (or 5 spans), our sidecar likewise; B every 0.5 s.
    wait_until(all_in, "every request's spans in the collector", timeout=60)
    by_attempts = {tid: _attempt_statuses(doc) for tid, doc in docs.items()}
    for tid, statuses in by_attempts.items():  # what A answered agrees with the last attempt
        assert statuses[-1] == ("200" if sent[tid][2] == 200 else "500"), (statuses, sent[tid])
        assert 1 <= len(statuses) <= 3
    retried = next(tid for tid, s in by_attempts.items() if s == ["500", "200"])
    assert any(s == ["200"] for s in by_attempts.values())

    doc = docs[retried]
    parent, rid, status = sent[retried]
    assert status == 200 and doc["traceId"] == retried
    spans = doc["spans"]
    assert {s["traceId"] for s in spans} == {retried}  # one trace, B's own span included: same trace id at B
    ingress = doc["tree"][0]
    assert len(doc["tree"]) == 1 and ingress["kind"] == "SERVER" and ingress["service"] == "a"
    assert ingress["id"] == parent and ingress["shared"]  # the caller's span, shared (B3's shared span context)
    assert ingress["status"] == "200"
    (local,) = ingress["children"]  # a's sidecar -> A
    assert local["kind"] == "CLIENT" and local["status"] == "200"
    (egress,) = local["children"]  # A -> a's sidecar egress: A passed the context on
    assert egress["service"] == "a" and egress["name"].startswith("b.local.service")
    # Both engines (an upstream span per attempt, as apply_tracing sets it): the OUTBOUND connection manager's span
    # is a SERVER span sharing the id of the span A was called with, the attempts' CLIENT spans under it.
    assert (egress["kind"], egress["shared"], egress["id"]) == ("SERVER", True, local["id"])
    first, second = egress["children"]
    assert (first["status"], first["attempt"], first["retry"], first["error"]) == ("500", 1, False, True)
    assert (second["status"], second["attempt"], second["retry"], second["error"]) == ("200", 2, True, False)
    assert first["id"] != second["id"]
    by_id = {s["id"]: s for s in spans}
    assert by_id[second["id"]]["tags"]["retry.count"] == "1"
    for attempt, code in ((first, "500"), (second, "200")):
        (at_b,) = attempt["children"]  # B's own span, a child of the attempt that reached it
        assert at_b["service"] == "b" and at_b["kind"] == "SERVER" and at_b["status"] == code
        assert by_id[at_b["id"]]["parentId"] == attempt["id"]
    # A passed x-request-id on too: the sidecar's ingress and egress spans carry the one we sent.
    rids = {s["tags"].get("guid:x-request-id") for s in spans if "guid:x-request-id" in s.get("tags", {})}
    assert rids == {rid}

    text = meshctl("trace", retried, "-p", project).stdout
    assert text.startswith(f"trace {retried}") and "attempt 2 (retry)" in text and "attempt 1 " in text
    lines = text.splitlines()
    assert any(" b " in line and "SERVER" in line and " 500" in line for line in lines), text
    listed = json.loads(meshctl("trace", "-p", project, "-o", "json", "--limit", "100").stdout)
    row = next(t for t in listed if t["traceId"] == retried)
    assert row["retries"] == 1 and row["errors"] >= 1 and row["services"] == ["a", "b"]
    assert row["root"]["path"] == "GET /" and row["root"]["status"] == "200"
    table = meshctl("trace", "-p", project, "--limit", "100").stdout
    assert retried in table and "a GET /" in table

    unknown = meshctl("trace", "f" * 32, "-p", project, check=False)
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr == f"meshctl: trace {'f' * 32} not found in mesh '{project}' (the collector keeps the " \
                             "most recent traces only)\n"
    bad = meshctl("trace", "xyz", "-p", project, check=False)
    assert bad.returncode == 2 and "is not a trace id" in bad.stderr and "Traceback" not in bad.stderr

    # The collector is a pod of the mesh, scraped like one.
    status = json.loads(meshctl("ps", "-p", project, "-o", "json").stdout)
    assert any(p["pod"] == "tracing" and p["ready"] for p in status["processes"])
    collector = _status(meshctl, project)["tracing"]["collector"]
    with urllib.request.urlopen(f"http://{collector}/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    assert 'zipkin_collector_spans_total{transport="http"}' in metrics


def _status(meshctl, project: str) -> dict[str, Any]:
    """The supervisor's status: where the collector is (what `meshctl trace` asks)."""
    from meshctl.client import call
    from meshctl.state import StateDir

    return call(StateDir(meshctl.home / project).control_socket, "GET", "/v1/status?resources=0")


def test_follow_prints_new_traces_and_ctrl_c_is_exit_0(meshctl):
    env = _demo_env(error_rate=0)
    meshctl.up(EXAMPLE, "tracefol", env=env)
    proc = subprocess.Popen([sys.executable, "-m", "meshctl", "trace", "--follow", "-o", "json", "-p", "tracefol",
                             "--settle", "0.5", "--interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=meshctl.env, cwd=ROOT)
    try:
        tid = f"{random.getrandbits(128):032x}"
        status = _get(f"http://127.0.0.1:{env['PUBLISH_PORT']}/", {"traceparent": f"00-{tid}-{'1' * 16}-01"})
        assert status == 200, meshctl("logs", "a", "-p", "tracefol", "--tail", "20").stdout
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while not any(t["traceId"] == tid for t in seen):
            assert time.monotonic() < deadline, f"no trace {tid} from --follow: {seen}"
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            if ready:
                line = proc.stdout.readline()
                assert line, proc.stderr.read()
                seen.append(json.loads(line))
        row = next(t for t in seen if t["traceId"] == tid)
        assert row["services"] == ["a", "b"] and row["errors"] == 0 and row["spans"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_trace_on_an_untraced_mesh_says_how_to_enable_it(meshctl):
    path = meshctl.write("plain.yaml", """
        pods:
          b:
            service:
              command: [python, -m, services.b]
              env: {ERROR_RATE: "0", SERVICE_PORT: "8000"}
              ready: {tcp: 8000}
    """)
    meshctl.up(path, "traceoff")
    proc = meshctl("trace", "-p", "traceoff", check=False)
    assert proc.returncode == 1
    assert proc.stderr == ("meshctl: mesh 'traceoff' is not traced: add a `tracing:` section to its topology or "
                           "start it with `meshctl up FILE --tracing`\n")
    assert "tracing" not in {p["pod"] for p in meshctl.ps("traceoff")["processes"]}
