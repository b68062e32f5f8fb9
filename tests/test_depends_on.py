"""Start order between pods (``depends_on``): real meshes, real processes.

A pod waits until every pod it depends on is started, ready or completed; `up -d` waits in that order,
and when a dependency can no longer get there, the pods waiting for it are never started and `up -d` says
which pod blocked which.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, Meshctl, free_ports, wait_until


def test_pods_start_in_dependency_order(meshctl: Meshctl, tmp_path: Path) -> None:
    """db takes a second to listen; migrate (a one-shot job) needs db listening and leaves a marker; web
    needs both. Each writes its name when it starts: the order is db, migrate, web, and web saw the marker."""
    db_port, web_port = free_ports(2)
    order, marker = tmp_path / "order", tmp_path / "migrated"
    serve = "exec python -m http.server {} --bind 0.0.0.0"
    web = f"test -f {marker} && echo web >> {order}; {serve.format(web_port)}"
    connect = f"import socket; socket.create_connection(('db', {db_port}), timeout=2)"
    migrate = f"echo migrate >> {order}; python -c {shlex.quote(connect)} && touch {marker}"
    db = f"echo db >> {order}; sleep 1; {serve.format(db_port)}"
    topo = meshctl.write("order.yaml", f"""\
        pods:
          web:
            depends_on: {{migrate: completed, db: ready}}
            service:
              command: [sh, -c, {json.dumps(web)}]
              ready: {{tcp: {web_port}}}
          migrate:
            depends_on: {{db: ready}}
            service:
              command: [sh, -c, {json.dumps(migrate)}]
              restart: never
          db:
            service:
              command: [sh, -c, {json.dumps(db)}]
              ready: {{tcp: {db_port}}}
        """)
    res = meshctl.up(topo, "deporder")
    assert order.read_text().split() == ["db", "migrate", "web"]
    assert marker.exists()
    assert "migrate-0" in res.stdout and "completed" in res.stdout.split("migrate-0", 1)[1].splitlines()[0]
    procs = {p["pod"]: p for p in meshctl.ps("deporder")["processes"]}
    assert procs["migrate"]["state"] == "exited" and procs["migrate"]["last_exit"] == 0
    assert procs["web"]["ready"] and procs["db"]["ready"]
    assert "completed" in meshctl("ps", "-p", "deporder").stdout


def test_a_waiting_pod_says_what_it_waits_for(meshctl: Meshctl, tmp_path: Path) -> None:
    """b is ready only once a file exists: meanwhile a is pending, unstarted, and says it waits for b."""
    (a_port,) = free_ports(1)
    flag = tmp_path / "b-ready"
    topo = meshctl.write("wait.yaml", f"""\
        pods:
          a:
            depends_on: {{b: ready}}
            service:
              command: [python, -m, http.server, "{a_port}", --bind, 0.0.0.0]
              ready: {{tcp: {a_port}}}
          b:
            service:
              command: [sleep, "600"]
              ready: {{exec: [test, -f, {flag}]}}
        """)
    meshctl.started.append("depwait")
    up = subprocess.Popen([sys.executable, "-m", "meshctl", "up", str(topo), "-d", "-p", "depwait"],
                          env=meshctl.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def a_waits() -> bool:
            res = meshctl("ps", "-p", "depwait", "-o", "json", check=False)
            if res.returncode != 0:
                return False
            procs = {p["pod"]: p for p in json.loads(res.stdout)["processes"]}
            return procs["b"]["pid"] is not None and procs["a"]["waiting_for"] == [{"pod": "b", "condition": "ready"}]

        wait_until(a_waits, "a pending, waiting for b")
        procs = {p["pod"]: p for p in meshctl.ps("depwait")["processes"]}
        assert procs["a"]["pid"] is None and procs["a"]["state"] == "pending"
        assert "waiting for b ready" in meshctl("ps", "-p", "depwait").stdout
        flag.touch()
        out, err = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert up.returncode == 0, err
    procs = {p["pod"]: p for p in meshctl.ps("depwait")["processes"]}
    assert procs["a"]["ready"] and procs["a"]["waiting_for"] == []


def test_a_dependency_that_cannot_get_ready_blocks_its_dependents(meshctl: Meshctl) -> None:
    a_port, c_port, b_port = free_ports(3)
    topo = meshctl.write("blocked.yaml", f"""\
        pods:
          a:
            depends_on: {{b: ready}}
            service:
              command: [python, -m, http.server, "{a_port}", --bind, 0.0.0.0]
              ready: {{tcp: {a_port}}}
          c:
            depends_on: [a]
            service: {{command: [python, -m, http.server, "{c_port}", --bind, 0.0.0.0]}}
          b:
            service:
              command: [sh, -c, "echo b cannot start; exit 3"]
              restart: never
              ready: {{tcp: {b_port}}}
        """)
    res = meshctl.up(topo, "depblock", check=False)
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert lines[0] == "meshctl: b-0/service failed to get ready (exited, last exit 3); last log lines:"
    assert "  b-0/service | b cannot start" in lines
    assert "not started, because they wait for b (depends_on): a, c" in lines
    assert "Traceback" not in res.stderr
    logs = meshctl.home / "depblock" / "logs"
    assert not any(p.stat().st_size for p in logs.glob("a-0*")), "a must never have started"
    assert not any(p.stat().st_size for p in logs.glob("c-0*")), "nor c, which waits for a"
