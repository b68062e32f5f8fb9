"""CLI behaviour for mistakes: one clear line, exit code 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, seed_direct_env


def test_validate_ok(meshctl):
    # The seed's port 80 where this user may bind it, else PORT (validate refuses ports it could not bind).
    res = meshctl("validate", str(ROOT / "examples/seed/direct.yaml"), env=seed_direct_env())
    assert "ok (mesh 'seed', 2 pods, 2 replicas)" in res.stdout


@pytest.mark.parametrize("body, line, phrase", [
    ("pods:\n  b:\n    replicass: 2\n    service: {command: [x]}\n", 3, "did you mean 'replicas'"),
    ("pods:\n  b:\n    service: {command: [sleep, '1']}\n  b:\n    service: {command: [sleep, '1']}\n", 4,
     "duplicate pod 'b'"),
    ("pods:\n  a:\n    add_hosts: {x.local: bb}\n    service: {command: [sleep, '1']}\n"
     "  bb2:\n    service: {command: [sleep, '1']}\n", 3, "neither an IP address nor a pod"),
    ("pods:\n  a:\n    publish: ['8080-80']\n    service: {command: [sleep, '1']}\n", 3, "bad publish"),
    ("pods:\n  a:\n    service: {env: {X: '1'}}\n", 3, "command"),
])
def test_validate_errors(meshctl, body, line, phrase):
    path = meshctl.write("bad.yaml", body)
    for cmd in (["validate", str(path)], ["up", str(path), "-d"]):
        res = meshctl(*cmd, check=False)
        assert res.returncode == 2, res
        assert "Traceback" not in res.stderr
        first = res.stderr.splitlines()[0]
        assert first.startswith(f"{path}:{line}: "), res.stderr
        assert phrase in res.stderr


def test_missing_program_is_reported_before_start(meshctl):
    path = meshctl.write("np.yaml", "pods:\n  a:\n    service:\n      command: [no-such-program-xyz]\n")
    res = meshctl("validate", str(path), check=False)
    assert res.returncode == 2 and "'no-such-program-xyz' not found on PATH" in res.stderr
    assert res.stderr.startswith(f"{path}:4: ")


def test_missing_file_and_usage_errors(meshctl):
    res = meshctl("validate", "/nonexistent/topo.yaml", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "no such file" in res.stderr
    res = meshctl("up", check=False)
    assert res.returncode == 2 and "Missing argument" in res.stderr
    res = meshctl("traffic", "http://10.0.0.1/", check=False)
    assert res.returncode == 2 and "only 127.0.0.0/8" in res.stderr


def test_commands_without_a_running_mesh(meshctl):
    for cmd in (["ps"], ["down"], ["restart", "a"], ["logs", "a"]):
        res = meshctl(*cmd, check=False)
        assert res.returncode == 1 and "no mesh is running" in res.stderr, (cmd, res)
        assert "Traceback" not in res.stderr
    res = meshctl("ps", "-p", "ghost", check=False)
    assert res.returncode == 1 and "mesh 'ghost' is not running" in res.stderr


def test_privileged_port_explained_without_bind_capability(meshctl):
    """Without CAP_NET_BIND_SERVICE (a normal user), ports below 1024 get one up-front line."""
    import shutil

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to drop the capability")
    if int(open("/proc/sys/net/ipv4/ip_unprivileged_port_start").read()) <= 80:
        pytest.skip("net.ipv4.ip_unprivileged_port_start <= 80: port 80 needs no capability here")
    drop = ["setpriv", "--inh-caps=-net_bind_service", "--bounding-set=-net_bind_service", "--"]
    cmd = [*drop, sys.executable, "-m", "meshctl", "validate", str(ROOT / "examples/seed/direct.yaml")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=meshctl.env, cwd=ROOT, timeout=60)
    assert res.returncode == 2, res
    assert "uses port 80, which needs root here" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.splitlines()) == 2  # one line per pod
    res = subprocess.run(cmd, capture_output=True, text=True, env={**meshctl.env, "PORT": "8000"}, cwd=ROOT,
                         timeout=60)
    assert res.returncode == 0, res


def test_logs_tail_and_roles(meshctl):
    path = meshctl.write("l.yaml", """
        pods:
          talk:
            ip: 127.0.114.1
            replicas: 2
            service:
              command: [sh, -c, "for i in 1 2 3 4 5; do echo line $$i of ${POD_NAME}-${REPLICA}; done; exec sleep 300"]
    """)
    meshctl.up(path, "lg")
    from tests.conftest import wait_for

    def five() -> str | None:
        out = meshctl("logs", "talk-1", "-p", "lg").stdout
        return out if out.count("\n") >= 5 else None

    assert wait_for(five, 5) == "".join(f"line {i} of talk-1\n" for i in range(1, 6))
    tail = meshctl("logs", "talk", "-p", "lg", "--tail", "2").stdout.splitlines()
    assert tail == ["talk-0/service | line 4 of talk-0", "talk-0/service | line 5 of talk-0",
                    "talk-1/service | line 4 of talk-1", "talk-1/service | line 5 of talk-1"]
    assert meshctl("logs", "talk", "-p", "lg", "--role", "sidecar", check=False).returncode == 1
