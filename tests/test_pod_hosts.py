"""Every process of a pod sees the replica's hosts file as /etc/hosts; `meshctl exec` enters the pod.

The host's /etc/hosts is never touched: the bind mount lives in each process's private mount namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from meshctl.supervisor.pod_namespace import pod_hosts_problem
from tests.conftest import ROOT, wait_for

ETC_HOSTS = Path("/etc/hosts")
PROBLEM = pod_hosts_problem()
needs_pod_hosts = pytest.mark.skipif(PROBLEM is not None, reason=f"no per-pod /etc/hosts here: {PROBLEM}")

TOPOLOGY = """
    name: {mesh}
    pods:
      b:
        ip: 127.0.{net}.1
        service:
          command: [sleep, "300"]
      c:
        ip: 127.0.{net2}.1
        add_hosts: {{b.service: b}}
        service:
          command: [sh, -c, "getent hosts b.service > resolved.txt; exec sleep 300"]
          workdir: {workdir}
"""


def _ps(meshctl, mesh: str, env: dict[str, str] | None = None) -> dict:
    return json.loads(meshctl("ps", "-p", mesh, "-o", "json", env=env).stdout)


@needs_pod_hosts
def test_programs_in_a_pod_resolve_mesh_names_and_exec_enters_the_pod(meshctl):
    before = ETC_HOSTS.read_bytes()
    work = meshctl.workdir / "c"
    work.mkdir()
    topo = meshctl.write("ph.yaml", TOPOLOGY.format(mesh="ph", net=152, net2=153, workdir=work))
    meshctl.up(topo, "ph")
    # glibc in the service itself (getent), written by the pod's own process at start
    assert wait_for(lambda: (work / "resolved.txt").exists() and (work / "resolved.txt").read_text(), 10)
    assert (work / "resolved.txt").read_text().split() == ["127.0.152.1", "b.service"]
    res = meshctl("exec", "c", "--", "getent", "hosts", "b.service")
    assert res.stdout.split() == ["127.0.152.1", "b.service"]
    assert meshctl("exec", "c-0", "getent", "hosts", "b").stdout.split()[0] == "127.0.152.1"
    # the pod's environment and working directory come along
    out = meshctl("exec", "c", "--", "sh", "-c", 'echo "$POD_IP $REPLICA_NAME $(pwd)"').stdout.split()
    assert out == ["127.0.153.1", "c-0", str(work)]
    assert meshctl("exec", "c", "--", "sh", "-c", "exit 7", check=False).returncode == 7
    assert ETC_HOSTS.read_bytes() == before  # during the run
    ps = _ps(meshctl, "ph")
    assert ps["hosts_mode"] == "mount" and {p["hosts_mode"] for p in ps["processes"]} == {"mount"}
    assert "its own mount namespace" in meshctl("hosts", "c", "-p", "ph").stdout
    meshctl("down", "-p", "ph")
    assert ETC_HOSTS.read_bytes() == before  # and after


def test_exec_mistakes_are_one_line(meshctl):
    topo = meshctl.write("px.yaml", """
        name: px
        pods:
          a:
            ip: 127.0.154.1
            service:
              command: [sleep, "300"]
          gone:
            ip: 127.0.155.1
            restart: never
            service:
              command: [sh, -c, "sleep 1; exit 3"]
              restart: never
    """.replace("            restart: never\n            service", "            service"))
    meshctl.up(topo, "px")
    res = meshctl("exec", "nope", "--", "true", "-p", "px", check=False)
    assert res.returncode == 2 and "no pod or replica named 'nope'" in res.stderr, res
    assert wait_for(lambda: next(p for p in _ps(meshctl, "px")["processes"] if p["pod"] == "gone")["state"]
                    == "exited", 10)
    res = meshctl("exec", "-p", "px", "gone", "--", "true", check=False)
    assert res.returncode == 1 and "not running" in res.stderr and res.stderr.count("\n") == 1, res
    res = meshctl("exec", "-p", "px", "a", "--", "no-such-program-xyz", check=False)
    assert res.returncode == 127, res
    res = meshctl("exec", "-p", "px", "a", check=False)
    assert res.returncode == 2, res
    meshctl("down", "-p", "px")
    res = meshctl("exec", "-p", "px", "a", "--", "true", check=False)
    assert res.returncode == 1 and "not running" in res.stderr and "Traceback" not in res.stderr, res


def _nobody_python() -> tuple[list[str], dict[str, str]] | str:
    """How the unprivileged user runs meshctl: this interpreter, or the system one with our packages."""
    if os.geteuid() != 0:
        return "needs root to switch to an unprivileged user"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    site = sysconfig.get_paths()["purelib"]
    # The system Python of the same version first: a venv under root's home is often out of reach.
    for python in (f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}", sys.executable):
        env = {"PATH": os.environ.get("PATH", os.defpath), "PYTHONPATH": f"{ROOT}:{site}", "HOME": "/tmp"}
        check = ("import subprocess, sys, meshctl.cli, psutil, aiohttp, uvloop, httptools; "
                 "subprocess.run([sys.executable, '-c', ''], check=True)")  # it can start itself again
        probe = subprocess.run([*drop, python, "-c", check], env=env, capture_output=True, cwd="/", timeout=30)
        if probe.returncode == 0:
            return [*drop, python, "-m", "meshctl"], env
    return (f"neither {sys.executable} nor the system Python can import meshctl as an unprivileged user "
            f"(is {ROOT} or {site} readable by others?)")


@pytest.fixture
def nobody_dir():
    """A directory the unprivileged user owns (pytest's tmp_path is under a root-only directory)."""
    path = Path(tempfile.mkdtemp(prefix="mt-nobody-"))
    os.chown(path, 65534, 65534)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_pods_get_their_own_hosts_as_a_normal_user(nobody_dir):
    """A user namespace mapping only the user's own ids: no root inside, the pod's /etc/hosts, exec works."""
    how = _nobody_python()
    if isinstance(how, str):
        pytest.skip(how)
    cmd, env = how
    tmp_path = nobody_dir
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, 65534, 65534)
    env = {**env, "MESHCTL_HOME": str(home)}
    problem = subprocess.run([*cmd[:-2], "-c", "from meshctl.supervisor.pod_namespace import pod_hosts_problem as p; "
                              "print(p() or '')"], env=env, capture_output=True, text=True, cwd="/", timeout=30)
    if problem.stdout.strip():
        pytest.skip(f"the kernel refuses unprivileged pods their own /etc/hosts: {problem.stdout.strip()}")
    topo = tmp_path / "nu.yaml"
    topo.write_text(TOPOLOGY.format(mesh="nu", net=156, net2=157, workdir=tmp_path))
    os.chown(topo, 65534, 65534)
    before = ETC_HOSTS.read_bytes()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, cwd="/", timeout=60)

    try:
        up = run("up", str(topo), "-d")
        assert up.returncode == 0, up.stderr
        got = run("exec", "c", "--", "sh", "-c", "getent hosts b.service; id -u")
        assert got.returncode == 0, got.stderr
        assert got.stdout.split() == ["127.0.156.1", "b.service", "65534"]  # the user's own uid, not root
        assert run("exec", "c", "--", "sh", "-c", "exit 7").returncode == 7
        if shutil.which("node"):  # Node's resolver (getaddrinfo through libuv) in the unprivileged pod
            lookup = "require('dns').lookup('b.service', (e, a) => { if (e) throw e; console.log(a) })"
            got = run("exec", "c", "--", "node", "-e", lookup)
            assert got.returncode == 0 and got.stdout.strip() == "127.0.156.1", got
        assert ETC_HOSTS.read_bytes() == before
    finally:
        down = run("down", "-p", "nu")
    assert down.returncode == 0, down.stderr
    assert ETC_HOSTS.read_bytes() == before


def test_a_pod_whose_program_is_missing_does_not_stop_the_rest(meshctl):
    """`validate` refuses it; `up` names pod, command and PATH in one line, starts the rest, exits 1."""
    topo = meshctl.write("miss.yaml", """
        name: miss
        pods:
          ok:
            ip: 127.0.158.1
            service:
              command: [sleep, "300"]
          broken:
            ip: 127.0.159.1
            service:
              command: [no-such-program-xyz, --flag]
    """)
    res = meshctl("validate", str(topo), check=False)
    assert res.returncode == 2 and f"{topo}:11: pod 'broken': command 'no-such-program-xyz' not found" in res.stderr
    meshctl.started.append("miss")
    res = meshctl("up", str(topo), "-d", check=False)
    assert res.returncode == 1, res
    lines = [line for line in res.stderr.splitlines() if "no-such-program-xyz" in line]
    assert len(lines) == 1 and "pod 'broken'" in lines[0] and "PATH=" in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    procs = {p["pod"]: p for p in _ps(meshctl, "miss")["processes"]}
    assert procs["ok"]["ready"] and procs["ok"]["state"] == "running"
    assert procs["broken"]["state"] == "failed" and not procs["broken"]["ready"]
