"""End-to-end: real meshes started with `meshctl up -d`, checked from the outside."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import psutil

from tests.conftest import ROOT, free_port, marked_processes, seed_direct_env, wait_for

HTTP_SERVER = "[python, -m, http.server, --bind, '${POD_IP}', '8000']"


def get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def listening(ip: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((ip, port)) == 0


def proc(status: dict, replica: str, role: str = "service") -> dict:
    return next(p for p in status["processes"] if p["replica"] == replica and p["role"] == role)


def test_seed_direct_demo(meshctl):
    """The seed's direct setup: A -> B with 20 % errors, published on 127.0.0.1 (the seed's 8080, here a free
    port: PUBLISH_PORT; the pods' port 80 becomes a free one when a non-root user cannot bind it)."""
    env = seed_direct_env()
    out = meshctl.up(ROOT / "examples/seed/direct.yaml", "seed", env=env).stdout
    assert "ready in" in out
    st = meshctl.ps("seed")
    assert {p["replica"] for p in st["processes"]} == {"a-0", "b-0"}
    for p in st["processes"]:
        assert p["ip"].startswith("127.") and p["ip"].endswith(".1") and p["ip"] != "127.0.0.1"
        assert p["state"] == "running" and p["ready"] and p["pid"] and p["rss_bytes"] > 0
        assert psutil.pid_exists(p["pid"])
    assert proc(st, "a-0")["ip"] != proc(st, "b-0")["ip"]
    status, body = get(f"http://127.0.0.1:{env['PUBLISH_PORT']}/")
    assert (status, body.split(" nounce")[0]) in {
        (200, "Service A: upstream responded with: Service B: Yay!"),
        (500, "Service A: upstream failed with: HTTP 500 - Service B: Ooops..."),
    }
    report = json.loads(meshctl("traffic", "a", "--n", "1000", "-p", "seed", "--json").stdout)
    assert report["requests"] == 1000
    assert set(report["status"]) <= {"200", "500"} and not report["errors"]
    # Binomial(1000, 0.8): +-0.05 is ~4 standard deviations.
    assert 0.75 <= report["success_ratio"] <= 0.85, report
    bodies = {g["body"] for g in report["groups"]}
    assert "Service A: upstream responded with: Service B: Yay! nounce <n>" in bodies
    # B's counters (the seed's service_b_requests_total) saw every request.
    b = proc(st, "b-0")
    _, metrics = get(f"http://{b['ip']}:8081/metrics")
    total = sum(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("service_b_requests_total{"))
    assert total >= 1000


def test_kill9_service_is_restarted(meshctl):
    topo = meshctl.write("k.yaml", f"""
        pods:
          web:
            ip: 127.0.101.1
            service:
              command: {HTTP_SERVER}
              ready: {{tcp: 8000}}
    """)
    meshctl.up(topo, "k9")
    before = proc(meshctl.ps("k9"), "web-0")
    os.kill(before["pid"], signal.SIGKILL)

    def back() -> dict | None:
        p = proc(meshctl.ps("k9"), "web-0")
        return p if p["ready"] and p["pid"] != before["pid"] else None

    after = wait_for(back, 10)
    assert after, "not restarted"
    assert after["restarts"] == 1 and after["state"] == "running"
    assert get("http://127.0.101.1:8000/")[0] == 200


def test_kill9_supervisor_leaves_no_orphans(meshctl):
    """Children, grandchildren and even a setsid'd great-grandchild die with the supervisor."""
    topo = meshctl.write("o.yaml", f"""
        pods:
          web:
            ip: 127.0.102.1
            replicas: 2
            service:
              command: {HTTP_SERVER}
              ready: {{tcp: 8000}}
          tree:
            ip: 127.0.104.1
            service:
              command: [sh, -c, "sleep 300 & setsid sleep 301 & exec sleep 302"]
    """)
    meshctl.up(topo, "orph")
    rec = meshctl.record("orph")
    mesh_procs = marked_processes(rec["run_id"])
    assert len(mesh_procs) >= 5  # 2 servers, sh->sleep x3
    os.kill(rec["supervisor"]["pid"], signal.SIGKILL)
    gone = wait_for(lambda: not marked_processes(rec["run_id"]), 5)
    assert gone, f"alive 5 s after kill -9: {marked_processes(rec['run_id'])}"
    assert not listening("127.0.102.1", 8000) and not listening("127.0.103.1", 8000)
    # The next command cleans the record and reports the mesh down.
    assert "is down" in meshctl("down", "-p", "orph").stdout


def test_down_leaves_no_process_and_no_socket(meshctl):
    port = free_port()
    topo = meshctl.write("d.yaml", f"""
        pods:
          web:
            ip: 127.0.105.1
            publish: ["{port}:8000"]
            service:
              command: {HTTP_SERVER}
              ready: {{tcp: 8000}}
    """)
    meshctl.up(topo, "dn")
    rec = meshctl.record("dn")
    assert get(f"http://127.0.0.1:{port}/")[0] == 200
    sock = meshctl.home / "dn" / "control.sock"
    assert sock.stat().st_mode & 0o777 == 0o600
    assert "is down" in meshctl("down", "-p", "dn").stdout
    assert not marked_processes(rec["run_id"])
    assert not psutil.pid_exists(rec["supervisor"]["pid"]) or \
        psutil.Process(rec["supervisor"]["pid"]).status() == psutil.STATUS_ZOMBIE
    assert not listening("127.0.105.1", 8000) and not listening("127.0.0.1", port)
    assert not sock.exists()


def test_crashloop_is_reported_and_up_fails(meshctl):
    topo = meshctl.write("c.yaml", """
        pods:
          bad:
            ip: 127.0.106.1
            service:
              command: [sh, -c, "echo boom from bad; exit 3"]
              ready: {tcp: 8000}
    """)
    res = meshctl("up", str(topo), "-d", "-p", "crash", check=False)
    meshctl.started.append("crash")
    assert res.returncode == 1
    assert "bad-0/service failed to get ready" in res.stderr
    assert "crashloop, last exit 3" in res.stderr
    assert "boom from bad" in res.stderr
    assert "Traceback" not in res.stderr


def test_crashloop_state_in_ps(meshctl):
    """A process that keeps failing shows `crashloop` and its last exit code; others keep running."""
    topo = meshctl.write("c2.yaml", """
        pods:
          ok:
            ip: 127.0.107.1
            service:
              command: [sleep, "300"]
          flaky:
            ip: 127.0.108.1
            service:
              command: [sh, -c, "exit 7"]
              restart: on-failure
    """)
    # `up -d` stops a mesh that fails to get ready, so run this one in the foreground.
    fg = subprocess.Popen([sys.executable, "-m", "meshctl", "up", str(topo), "-p", "cl"], env=meshctl.env,
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meshctl.started.append("cl")
    try:
        def looping() -> dict | None:
            res = meshctl("ps", "-p", "cl", "-o", "json", check=False)
            if res.returncode != 0:
                return None
            p = proc(json.loads(res.stdout), "flaky-0")
            return p if p["state"] == "crashloop" else None

        p = wait_for(looping, 15, interval=0.2)
        assert p, "never reached crashloop"
        assert p["last_exit"] == 7 and p["restarts"] >= 2 and not p["ready"]
        ok = proc(meshctl.ps("cl"), "ok-0")
        assert ok["state"] == "running" and ok["restarts"] == 0
        table = meshctl("ps", "-p", "cl").stdout
        assert "crashloop (exit 7)" in table
    finally:
        fg.send_signal(signal.SIGINT)
        fg.wait(20)


def test_foreign_service_and_pod_env(meshctl):
    topo = meshctl.write("f.yaml", f"""
        pods:
          web:
            ip: 127.0.109.1
            service:
              command: {HTTP_SERVER}
              ready: {{http: /, port: 8000}}
          env:
            ip: 127.0.110.1
            add_hosts: {{web.local: web, self.local: 127.0.0.1, ext: 10.1.2.3}}
            service:
              command: [sh, -c, "env; exec sleep 300"]
              env:
                URL: http://localhost:9001/x
                BIND: 0.0.0.0:80
                KEEP: 127.0.0.10
                NAME: "${{POD_NAME}}-${{REPLICA}}@${{MESH}}"
    """)
    meshctl.up(topo, "fs")
    status, body = get("http://127.0.109.1:8000/")
    assert status == 200 and "Directory listing" in body
    def env_logged() -> str | None:
        out = meshctl("logs", "env-0", "-p", "fs").stdout
        return out if "URL" in out else None

    logs = wait_for(env_logged, 5)
    assert "URL=http://127.0.110.1:9001/x" in logs
    assert "BIND=127.0.110.1:80" in logs
    assert "KEEP=127.0.0.10" in logs
    assert "NAME=env-0@fs" in logs
    assert "POD_IP=127.0.110.1" in logs and "POD_NAME=env" in logs and "POD_REPLICA=0" in logs
    assert "MESH_NAME=fs" in logs and "MESH_HOSTS=" in logs
    hosts = meshctl("hosts", "env", "-p", "fs").stdout
    lines = [line.split() for line in hosts.splitlines() if line and not line.startswith("#")]
    assert ["127.0.109.1", "web.local"] in lines
    assert ["127.0.110.1", "self.local"] in lines
    assert ["10.1.2.3", "ext"] in lines
    assert any(line[0] == "127.0.110.1" and "localhost" in line for line in lines)


def test_replicas_publish_round_robin_and_restart(meshctl):
    for i in range(2):
        d = meshctl.workdir / f"r{i}"
        d.mkdir()
        (d / "id.txt").write_text(f"replica {i}\n")
    port = free_port()
    topo = meshctl.write("r.yaml", f"""
        pods:
          web:
            ip: 127.0.111.1
            replicas: 2
            publish: ["{port}:8000"]
            service:
              command: [python, -m, http.server, --bind, "${{POD_IP}}", --directory, "r${{REPLICA}}", "8000"]
              ready: {{tcp: 8000}}
    """)
    meshctl.up(topo, "rr")
    st = meshctl.ps("rr")
    assert [p["ip"] for p in st["processes"]] == ["127.0.111.1", "127.0.112.1"]
    seen = {get(f"http://127.0.0.1:{port}/id.txt")[1].strip() for _ in range(6)}
    assert seen == {"replica 0", "replica 1"}
    old = {p["replica"]: p["pid"] for p in st["processes"]}
    assert meshctl("restart", "web-1", "-p", "rr").stdout.strip() == "restarted web-1/service"
    st2 = meshctl.ps("rr")
    assert proc(st2, "web-1")["pid"] != old["web-1"] and proc(st2, "web-1")["restarts"] == 1
    assert proc(st2, "web-0")["pid"] == old["web-0"] and proc(st2, "web-0")["restarts"] == 0


def test_two_meshes_side_by_side(meshctl):
    topo = meshctl.write("t.yaml", f"""
        pods:
          web:
            service:
              command: {HTTP_SERVER}
              ready: {{tcp: 8000}}
    """)
    meshctl.up(topo, "one")
    meshctl.up(topo, "two")
    a, b = proc(meshctl.ps("one"), "web-0")["ip"], proc(meshctl.ps("two"), "web-0")["ip"]
    assert a != b
    assert get(f"http://{a}:8000/")[0] == 200 and get(f"http://{b}:8000/")[0] == 200
    res = meshctl("ps", check=False)
    assert res.returncode == 1 and "several meshes are running" in res.stderr and "-p" in res.stderr


def test_foreground_up_prefixes_lines_and_stops_on_ctrl_c(meshctl):
    topo = meshctl.write("fg.yaml", """
        pods:
          talk:
            ip: 127.0.113.1
            service:
              command: [python, -c, "import time; print('hello from talk', flush=True); time.sleep(300)"]
    """)
    p = subprocess.Popen([sys.executable, "-m", "meshctl", "up", str(topo), "-p", "fg"], env=meshctl.env,
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    meshctl.started.append("fg")
    lines = []
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            lines.append(line)
            if "hello from talk" in line:
                break
        assert any(line.startswith("talk-0/service | hello from talk") for line in lines), lines
        rec = meshctl.record("fg")
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out
    assert "stopped 1 processes" in out
    assert not marked_processes(rec["run_id"])
