"""Fixtures that run real meshes: real processes, real sockets, each test on its own addresses."""

from __future__ import annotations

import json
import os
import shutil
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


def wait_for(pred: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            return value
        time.sleep(interval)


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
