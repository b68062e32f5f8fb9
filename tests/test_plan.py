"""The mesh plan: pure, complete, and what the supervisor runs."""

from __future__ import annotations

import pickle
import sys
import textwrap
from pathlib import Path

from pods.markers import MARKER_ENV
from pods.plan import HostFacts, plan_mesh
from pods.topology import parse_topology

SEED = """
name: pl
pods:
  b:
    service:
      command: [python, -m, services.b]
      env: {SERVICE_PORT: "8000", HTTP_PROXY: "http://pods-own:1"}
      ready: {tcp: 8000}
  a:
    sidecar:
      ingress: {port: 8080, to: 8000}
      egress:
        port: 9001
        routes: [{host: b.local.service, to: "b:8000"}]
      admin: {port: 9901}
    service:
      command: [python, -m, services.a]
      env: {SERVICE_PORT: "8000"}
"""


def _plan(tmp_path: Path, environ: dict[str, str], text: str = SEED, **facts):
    topo = parse_topology(textwrap.dedent(text), tmp_path / "t.yaml")
    return plan_mesh(topo, tmp_path / "state", HostFacts(environ=environ, **facts), run_id="r1")


def test_environment_layers_caller_then_mesh_then_pod(tmp_path):
    caller = {"PATH": "/usr/bin:/bin", "HOME": "/home/x", "LANG": "C.UTF-8", "HTTP_PROXY": "http://corp:3128",
              MARKER_ENV: "someone-elses-run"}
    plan = _plan(tmp_path, caller)
    env = {p.key: p.env for p in plan.processes}
    a, b = env["a-0/service"], env["b-0/service"]
    assert a["HOME"] == "/home/x" and a["LANG"] == "C.UTF-8" and a["PATH"] == "/usr/bin:/bin"
    ip = plan.pods["a"].replicas[0].ip
    assert a["HTTP_PROXY"] == f"http://{ip}:9001"  # the mesh's egress beats the caller's proxy
    assert b["HTTP_PROXY"] == "http://pods-own:1"  # the pod's own env beats both
    assert a[MARKER_ENV] == "r1" and b[MARKER_ENV] == "r1"


def test_plan_is_complete_and_starts_nothing(tmp_path):
    plan = _plan(tmp_path, {"PATH": "/usr/bin:/bin"})
    assert not (tmp_path / "state").exists()  # nothing written
    assert [p.key for p in plan.processes] == ["b-0/service", "a-0/sidecar", "a-0/service"]
    sidecar = next(p for p in plan.processes if p.role == "sidecar")
    assert sidecar.argv[0] == sys.executable
    assert "--admin-socket" in sidecar.argv
    assert str(plan.admin_sockets["a-0"]) == sidecar.argv[sidecar.argv.index("--admin-socket") + 1]
    assert plan.pods["a"].port == 8080 and plan.pods["b"].port == 8000
    assert set(plan.hosts_files) == {"a-0", "b-0"}
    assert "b.local.service" not in plan.hosts_text(plan.pods["a"].replicas[0])
    assert any(path.suffix == ".json" for path in plan.files)  # the short-form sidecar config to write
    assert pickle.loads(pickle.dumps(plan)) == plan  # what `up -d` hands to the supervisor


def test_commands_resolve_with_the_process_path(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "tool-q").write_text("#!/bin/sh\n")
    (bindir / "tool-q").chmod(0o755)
    text = "pods:\n  t:\n    service:\n      command: [tool-q, --flag]\n"
    plan = _plan(tmp_path, {"PATH": f"{bindir}:/usr/bin"}, text)
    assert plan.processes[0].argv == (str(bindir / "tool-q"), "--flag")
    plan = _plan(tmp_path, {"PATH": "/usr/bin"}, text)
    expected = f"{tmp_path / 't.yaml'}:4: pod 't': command 'tool-q' not found on PATH=/usr/bin"
    assert [str(e) for e in plan.errors] == [expected]


def test_privileged_ports_are_problems_only_without_the_privilege(tmp_path):
    plan = _plan(tmp_path, {"PATH": "/usr/bin"}, can_bind_privileged=False, unprivileged_port_start=8001)
    assert any("uses port 8000, which needs root" in str(e) for e in plan.errors)
    assert not _plan(tmp_path, {"PATH": "/usr/bin"}).errors
