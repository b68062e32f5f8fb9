"""A pod's own /etc/hosts for every process in it, whatever its language: what podman's --add-host gives.

Each process starts in a private mount namespace in which its replica's hosts file is bind-mounted over
/etc/hosts; glibc, Node, Go, Java, curl and Envoy then resolve ``b.service`` and the pod names. The host's
/etc/hosts is never touched (the bind exists only inside the namespace). As root, util-linux does it with
no Python in the child (setpriv for the parent-death signal, unshare, sh + mount); as a normal user,
``pod_launch.py`` does it in the child itself, in a user namespace that maps only the caller's own ids.
Where the kernel refuses, ``pod_hosts_problem`` says why and the mesh runs without it (MESH_HOSTS only).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from meshctl.parent_death import ORPHANED_EXIT, resolve_program

LAUNCHER = Path(__file__).with_name("pod_launch.py")
#: After `unshare --mount` (private propagation by default): $0 the expected parent, $1 the hosts file.
_SH_BIND = (f'[ "$PPID" = "$0" ] || exit {ORPHANED_EXIT}; '
            '{mount} --bind "$1" /etc/hosts || exit 126; shift; exec "$@"')


@functools.cache
def _root_tools() -> tuple[str, str, str] | None:
    """setpriv (with --pdeathsig), unshare and mount, when all three are here."""
    from meshctl.parent_death import setpriv

    tools = (setpriv(), shutil.which("unshare"), shutil.which("mount"))
    return tools if all(tools) else None  # type: ignore[return-value]


def pod_argv(argv: Sequence[str], env: Mapping[str, str], cwd: Path | str, hosts: Path) -> list[str]:
    """``argv`` wrapped to run with ``hosts`` as its /etc/hosts and to die with this process."""
    program = resolve_program(argv[0], env, cwd)
    parent = str(os.getpid())
    tools = _root_tools() if os.geteuid() == 0 else None
    if tools is not None:
        setpriv, unshare, mount = tools
        return [setpriv, "--pdeathsig", "KILL", "--", unshare, "--mount", "--", "/bin/sh", "-c",
                _SH_BIND.format(mount=mount), parent, str(hosts), program, *argv[1:]]
    return [sys.executable, "-S", "-I", str(LAUNCHER), parent, str(hosts), program, *argv[1:]]


def enter_argv(pid: int, cwd: str, command: Sequence[str], user_namespace: bool) -> list[str]:
    """Run ``command`` inside the mount namespace of process ``pid`` (``meshctl exec``), like nsenter -m."""
    nsenter = shutil.which("nsenter")
    if nsenter is None:
        raise FileNotFoundError("nsenter (util-linux) is needed to enter a pod")
    # A normal user's pod lives in a user namespace of its own: join it first, keeping our own ids.
    user = ["--user", "--preserve-credentials"] if user_namespace else []
    return [nsenter, "--target", str(pid), *user, "--mount", f"--wd={cwd}", "--", *command]


def pod_hosts_problem() -> str | None:
    """None when pods can have their own /etc/hosts here, else the reason (tried for real, once)."""
    marker = "meshctl-pod-hosts-check"
    with tempfile.TemporaryDirectory(prefix="meshctl-ns") as tmp:
        hosts = Path(tmp) / "hosts"
        hosts.write_text(f"127.0.0.1 {marker}\n")
        hosts.chmod(0o644)
        argv = ["/bin/sh", "-c", f"grep -q {marker} /etc/hosts"]
        try:
            res = subprocess.run(pod_argv(argv, os.environ, tmp, hosts), capture_output=True, text=True,
                                 timeout=10, cwd=tmp)
        except (OSError, subprocess.SubprocessError) as exc:
            return str(exc)
    if res.returncode == 0:
        return None
    reason = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"
    return reason.removeprefix("meshctl: ")
