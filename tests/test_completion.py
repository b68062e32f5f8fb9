"""Shell completion (click's own): pod and replica names of the running mesh for the commands that take them."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, Meshctl, free_ports


def complete(meshctl: Meshctl, words: str, shell: str = "bash") -> list[str]:
    """What the shell would offer for the last word of ``words`` (click's bash/zsh completion protocol)."""
    parts = words.split(" ")
    env = {**meshctl.env, "_MESHCTL_COMPLETE": f"{shell}_complete", "COMP_WORDS": words,
           "COMP_CWORD": str(len(parts) - 1)}
    res = subprocess.run([sys.executable, "-m", "meshctl"], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    return [line.split(",", 1)[1] for line in res.stdout.splitlines() if line.startswith("plain,")]


def test_completes_pod_and_replica_names_of_the_running_mesh(meshctl: Meshctl) -> None:
    a_port, b_port = free_ports(2)
    topo = meshctl.write("complete.yaml", f"""\
        pods:
          api:
            replicas: 2
            service: {{command: [python, -m, http.server, "{a_port}", --bind, 0.0.0.0], ready: {{tcp: {a_port}}}}}
          backend:
            service: {{command: [python, -m, http.server, "{b_port}", --bind, 0.0.0.0], ready: {{tcp: {b_port}}}}}
        """)
    meshctl.up(topo, "complete")
    everything = ["api", "backend", "api-0", "api-1", "backend-0"]
    for command in ("logs", "restart", "exec", "traffic"):
        assert complete(meshctl, f"meshctl {command} ") == everything, command
    assert complete(meshctl, "meshctl logs api") == ["api", "api-0", "api-1"]
    assert complete(meshctl, "meshctl logs -p complete back") == ["backend", "backend-0"]
    assert complete(meshctl, "meshctl logs x") == []


def test_no_mesh_no_names_no_error(meshctl: Meshctl) -> None:
    assert complete(meshctl, "meshctl logs ") == []
    assert complete(meshctl, "meshctl restart -p nosuch ") == []


def test_the_completion_script_is_click_s(meshctl: Meshctl) -> None:
    for shell in ("bash", "zsh", "fish"):
        env = {**meshctl.env, "_MESHCTL_COMPLETE": f"{shell}_source"}
        res = subprocess.run([sys.executable, "-m", "meshctl"], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=30)
        assert res.returncode == 0 and "_MESHCTL_COMPLETE" in res.stdout, (shell, res.stderr)
