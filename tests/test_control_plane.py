"""The control plane's shape: one plan, executed by the supervisor; readers ask the running supervisor."""

from __future__ import annotations

import json
import os
import stat

from meshctl.client import call
from tests.conftest import ROOT, free_port, seed_direct_env, wait_for


def _status(meshctl, project):
    return call(meshctl.home / project / "control.sock", "GET", "/v1/status?resources=0")


def _web_behind_a_sidecar(meshctl, mesh: str, ip: str):
    """Start mesh ``mesh``: pod web (demo service B, never failing) behind a short-form sidecar on ``ip``.

    Returns (topology path, ingress port, admin port, service port).
    """
    ingress, admin, app, metrics = (free_port("127.255.254.1") for _ in range(4))
    topo = meshctl.write(f"{mesh}.yaml", f"""
        name: {mesh}
        pods:
          web:
            ip: {ip}
            sidecar:
              ingress: {{port: {ingress}, to: {app}}}
              admin: {{port: {admin}}}
            service:
              command: [python, -m, services.b]
              env: {{SERVICE_PORT: "{app}", ERROR_RATE: "0", METRICS_PORT: "{metrics}"}}
              ready: {{tcp: {app}}}
    """)
    meshctl.up(topo, mesh)
    return topo, ingress, admin, app


def test_traffic_goes_to_the_port_the_mesh_runs_on(meshctl):
    """`PORT=N up direct.yaml -d` then `traffic a-0` (without PORT) must hit N, not the YAML's default 80."""
    env = {**seed_direct_env(), "PORT": str(free_port("127.255.254.1"))}
    meshctl("up", str(ROOT / "examples/seed/direct.yaml"), "-d", "-p", "tport", env=env)
    meshctl.started.append("tport")
    res = meshctl("traffic", "a-0", "--n", "100", "-p", "tport", "--json")
    report = json.loads(res.stdout)
    assert report["target"].endswith(f":{env['PORT']}/"), report["target"]
    assert report["requests"] == 100
    assert not report["errors"], report["errors"]
    assert sum(report["status"].values()) == 100


def test_status_describes_pods_ports_and_sidecar_admin(meshctl):
    topo, ingress, admin, app = _web_behind_a_sidecar(meshctl, "st", "127.0.161.1")
    status = _status(meshctl, "st")
    (pod,) = status["pods"]
    assert pod["pod"] == "web" and pod["port"] == ingress
    assert pod["replicas"][0]["sidecar_admin"] == f"127.0.161.1:{admin}"
    sock = pod["replicas"][0]["admin_socket"]
    assert sock and stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    ports = {p["role"]: p["ports"] for p in status["processes"]}
    assert ingress in ports["sidecar"] and admin in ports["sidecar"]
    assert app in ports["service"]
    # the topology is not read again: a broken file does not disturb readers of the running mesh
    topo.write_text("pods: [this is not a topology\n")
    res = meshctl("stats", "--once", "--interval", "0.2", "-o", "json", "-p", "st", check=False)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert [p["pod"] for p in json.loads(res.stdout)["pods"]] == ["web"]
    config = meshctl("prometheus-config", "-p", "st").stdout  # from the supervisor, not the broken file
    assert "job_name: web/sidecar" in config and f"127.0.161.1:{admin}" in config
    res = meshctl("traffic", "web", "--n", "20", "-p", "st", "--json")
    assert json.loads(res.stdout)["status"] == {"200": 20}
    assert "127.0.161.1\tlocalhost web-0 web" in meshctl("hosts", "web", "-p", "st").stdout
    meshctl("restart", "web", "-p", "st")
    assert wait_for(lambda: all(p["ready"] for p in meshctl.ps("st")["processes"]), 20)


def test_logs_negative_tail_is_a_usage_error(meshctl):
    res = meshctl("logs", "a", "--tail", "-3", check=False)
    assert res.returncode == 2, res
    assert "--tail" in res.stderr and "Traceback" not in res.stderr


def test_stats_window_zero_names_the_window_option(meshctl):
    res = meshctl("stats", "--window", "0", check=False)
    assert res.returncode == 2, res
    assert "--window" in res.stderr and "--duration" not in res.stderr


def test_pod_processes_get_the_callers_environment_and_path(meshctl):
    """PATH, HOME, LANG... reach every process; the program checked is the program run."""
    bindir = meshctl.workdir / "bin"
    bindir.mkdir()
    tool = bindir / "meshtool-xyz"
    tool.write_text('#!/bin/sh\necho "tool ran PATH=$PATH HOME=$HOME LANG=$LANG"\nexec sleep 300\n')
    tool.chmod(0o755)
    topo = meshctl.write("env.yaml", """
        name: envt
        pods:
          t:
            ip: 127.0.162.1
            service:
              command: [meshtool-xyz]
    """)
    path = f"{bindir}:{os.environ.get('PATH', os.defpath)}"
    env = {"PATH": path, "LANG": "C.UTF-8", "HOME": str(meshctl.workdir)}
    assert "ok" in meshctl("validate", str(topo), env=env).stdout
    meshctl("up", str(topo), "-d", "-p", "envt", env=env)
    meshctl.started.append("envt")
    log = meshctl.home / "envt" / "logs" / "t-0.service.log"
    assert wait_for(lambda: log.exists() and "tool ran" in log.read_text(), 10), "the tool never ran"
    line = next(x for x in log.read_text().splitlines() if "tool ran" in x)
    assert f"PATH={path} " in line and f"HOME={meshctl.workdir} " in line and line.endswith("LANG=C.UTF-8")
    # without the directory on PATH, validate and up refuse the same way
    res = meshctl("validate", str(topo), check=False)
    assert res.returncode == 2 and f"{topo}:7: " in res.stderr and "meshtool-xyz" in res.stderr


def test_healthcheck_fail_on_the_admin_socket_makes_the_pod_unready(meshctl):
    """The mutating admin is reachable only through the replica's socket (meshctl admin), and readiness
    follows the sidecar's /ready: `ps` shows the pod unready after /healthcheck/fail, ready after /ok."""
    import urllib.error
    import urllib.request

    _, _, admin, _ = _web_behind_a_sidecar(meshctl, "hc", "127.0.163.1")

    def sidecar_ready():
        return next(p["ready"] for p in meshctl.ps("hc")["processes"] if p["role"] == "sidecar")

    tcp = urllib.request.Request(f"http://127.0.163.1:{admin}/healthcheck/fail", method="POST")
    try:
        urllib.request.urlopen(tcp, timeout=5)
        raise AssertionError("POST /healthcheck/fail answered on TCP")
    except urllib.error.HTTPError as err:
        assert err.code == 403
    assert sidecar_ready()
    assert meshctl("admin", "web", "/healthcheck/fail", "-X", "POST", "-p", "hc").returncode == 0
    assert wait_for(lambda: not sidecar_ready(), 10), "ps still shows the sidecar ready"
    assert meshctl("admin", "web-0", "/healthcheck/ok", "-X", "POST", "-p", "hc").returncode == 0
    assert wait_for(sidecar_ready, 10)
    dump = json.loads(meshctl("admin", "web", "/config_dump", "-p", "hc").stdout)
    assert dump
    res = meshctl("admin", "nope", "/ready", "-p", "hc", check=False)
    assert res.returncode == 2 and "no pod or replica named 'nope'" in res.stderr


def test_validate_refuses_an_ingress_routed_to_itself(meshctl):
    """Defect 11: `ingress: {port: 80, to: 80}` looped through itself ~64 times; validate names the line."""
    topo = meshctl.write("loop.yaml", """
        pods:
          a:
            sidecar:
              ingress: {port: 8090, to: 8090}
            service:
              command: [sleep, "300"]
    """)
    res = meshctl("validate", str(topo), check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith(f"{topo}:4: pod 'a' sidecar: ") and "own ingress listener" in res.stderr, res.stderr
