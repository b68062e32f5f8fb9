"""Fixtures that run real meshes: real processes, real sockets, each test on its own addresses."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent


class Meshctl:
    """Runs the real CLI in a subprocess against a private MESHCTL_HOME."""

    def __init__(self, home: Path, workdir: Path) -> None:
        self.home = home
        self.workdir = workdir
        self.env = {**os.environ, "MESHCTL_HOME": str(home), "PYTHONPATH": str(ROOT)}
        self.started: list[str] = []

    def __call__(self, *args: str, check: bool = True, timeout: float = 60,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "meshctl", *args], capture_output=True, text=True,
                              env={**self.env, **(env or {})}, cwd=ROOT, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"meshctl {' '.join(args)} exited {proc.returncode}\n"
                                 f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def write(self, name: str, text: str) -> Path:
        path = self.workdir / name
        path.write_text(textwrap.dedent(text))
        return path

    def up(self, path: Path | str, project: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        self.started.append(project)
        return self("up", str(path), "-d", "-p", project, **kw)

    def ps(self, project: str) -> dict[str, Any]:
        return json.loads(self("ps", "-p", project, "-o", "json").stdout)

    def record(self, project: str) -> dict[str, Any]:
        return json.loads((self.home / project / "state.json").read_text())


def marked_processes(run_id: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("MESHCTL_RUN_ID") == run_id:
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


def wait_until(cond: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    """Poll ``cond`` until it holds; fail the test naming ``what`` when it does not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def wait_for(pred: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            return value
        time.sleep(interval)


def terminate(proc: subprocess.Popen[Any] | None, grace: float = 10.0) -> int | None:
    """SIGTERM a process we started, SIGKILL it after ``grace`` seconds; its exit code (None: never started)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


@pytest.fixture
def meshctl() -> Iterator[Meshctl]:
    # Short paths: the control socket must fit in 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="mt"))
    m = Meshctl(base / "h", base)
    try:
        yield m
    finally:
        for project in m.started:
            m("down", "-p", project, check=False)
            rec_path = m.home / project / "state.json"
            if rec_path.exists():
                run_id = json.loads(rec_path.read_text()).get("run_id", "")
                leftovers = marked_processes(run_id) if run_id else []
                for p in leftovers:
                    p.kill()
                assert not leftovers, f"processes left behind by mesh {project}: {leftovers}"
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Ports: tests take free ones; a test about the seed's fixed ports skips when it cannot have them.

# An address no test pod uses: binding a port here tells whether a pod alias could bind it (the
# privilege for ports < 1024, or a wildcard listener of another program holding the port).
POD_ALIAS_PROBE = "127.255.254.1"


def free_port(ip: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at ``ip`` right now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def free_ports(n: int, ip: str = "127.0.0.1") -> list[int]:
    """``n`` distinct free ports (the kernel may hand the same one out twice in a row)."""
    ports: list[int] = []
    while len(ports) < n:
        if (port := free_port(ip)) not in ports:
            ports.append(port)
    return ports


def bind_problem(ip: str, port: int) -> str | None:
    """Why a server could not bind ``ip:port`` here, or None when it can."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no obstacle
        try:
            s.bind((ip, port))
        except PermissionError:
            return (f"port {port} needs root or CAP_NET_BIND_SERVICE (uid {os.geteuid()}, unprivileged ports "
                    f"start at {_unprivileged_port_start()})")
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"{ip}:{port} is already in use by another program"
            return f"cannot bind {ip}:{port}: {exc}"
    return None


def _unprivileged_port_start() -> str:
    try:
        return Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text().strip()
    except OSError:
        return "1024"


def can_bind(ip: str, port: int) -> bool:
    return bind_problem(ip, port) is None


def require_ports(what: str, *addresses: tuple[str, int]) -> None:
    """Skip the calling test, with the reason, unless every ``(ip, port)`` can be bound."""
    problems = [p for ip, port in addresses if (p := bind_problem(ip, port))]
    if problems:
        pytest.skip(f"{what}: {'; '.join(problems)}")


# The seed's sidecar setup fixes these pod-alias ports (its envoy.yaml is the seed's, unchanged).
SEED_SIDECAR_POD_PORTS = (80, 8000, 8081, 9001, 9901)


def seed_sidecar_env() -> dict[str, str]:
    """Environment for `meshctl up examples/seed/sidecar.yaml`: the published port is a free one.

    Skips the calling test when a pod could not bind the seed's fixed ports (port 80 as a
    non-root user, or another program listening on one of them on every address).
    """
    require_ports("examples/seed/sidecar.yaml binds the seed's fixed ports in its pods",
                  *((POD_ALIAS_PROBE, port) for port in SEED_SIDECAR_POD_PORTS))
    return {"PUBLISH_PORT": str(free_port())}


def seed_direct_env() -> dict[str, str]:
    """Environment for `meshctl up examples/seed/direct.yaml`: the seed's port 80 when it can be bound
    (else a free one, as `make demo` uses PORT=8000 for a non-root user), a free published port."""
    require_ports("examples/seed/direct.yaml binds the seed's metrics port in its pods", (POD_ALIAS_PROBE, 8081))
    env = {"PUBLISH_PORT": str(free_port())}
    if not can_bind(POD_ALIAS_PROBE, 80):
        env["PORT"] = str(free_port(POD_ALIAS_PROBE))
    return env


def require_privileged_ports(what: str) -> None:
    """Skip the calling test, with the reason, when this user may not bind ports below 1024 at all."""
    problem = bind_problem(POD_ALIAS_PROBE, 80)
    if problem and "needs root" in problem:
        pytest.skip(f"{what}: {problem}")
