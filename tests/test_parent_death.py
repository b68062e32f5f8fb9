"""Supervised processes die with their parent, and spawning them runs no Python between fork and exec."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from meshctl.parent_death import ORPHANED_EXIT, launch_argv, setpriv
from meshctl.supervisor.logfile import RotatingLog
from meshctl.supervisor.process import ManagedProcess
from pods.replica import ProcessPlan, Replica
from tests.conftest import ROOT, wait_for

WRAPPERS = [pytest.param(True, id="setpriv", marks=pytest.mark.skipif(
                setpriv() is None, reason="util-linux setpriv with --pdeathsig is not installed")),
            pytest.param(False, id="python")]

#: Starts ``sleep`` through the wrapper, prints its pid, then waits to be killed.
MIDDLE = """
import subprocess, sys, time
from meshctl.parent_death import launch_argv
argv = launch_argv(["sleep", "300"], {"PATH": "/usr/bin:/bin"}, "/", use_setpriv=sys.argv[1] == "True")
print(subprocess.Popen(argv, start_new_session=True).pid, flush=True)
time.sleep(300)
"""


@pytest.mark.parametrize("use_setpriv", WRAPPERS)
def test_a_child_whose_parent_changed_before_the_prctl_exits_without_running(tmp_path, use_setpriv):
    ran = tmp_path / "ran"
    # The expected parent is not the real one: as if the parent had died between fork and prctl.
    argv = launch_argv(["touch", str(ran)], os.environ, tmp_path, expected_parent=1, use_setpriv=use_setpriv)
    assert subprocess.run(argv, timeout=10).returncode == ORPHANED_EXIT
    assert not ran.exists()
    assert subprocess.run(launch_argv(["touch", str(ran)], os.environ, tmp_path, use_setpriv=use_setpriv),
                          timeout=10).returncode == 0
    assert ran.exists()


@pytest.mark.parametrize("use_setpriv", WRAPPERS)
def test_the_child_dies_when_its_parent_is_killed(use_setpriv):
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE, str(use_setpriv)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    assert middle.stdout is not None
    child = psutil.Process(int(middle.stdout.readline()))
    try:
        assert wait_for(lambda: child.name() == "sleep", 5)  # exec'ed through the wrapper, same pid
        middle.kill()
        middle.wait(5)
        assert wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 5)
    finally:
        try:
            child.kill()
        except psutil.Error:
            pass


def test_a_missing_program_is_an_error_at_start_not_an_exit_code(tmp_path):
    with pytest.raises(FileNotFoundError):
        launch_argv(["no-such-program-here"], {"PATH": str(tmp_path)}, tmp_path)
    (tmp_path / "script").write_text("#!/bin/sh\n")
    with pytest.raises(PermissionError):
        launch_argv(["./script"], {"PATH": ""}, tmp_path)


def test_spawning_a_supervised_process_runs_no_python_in_the_child(tmp_path):
    # Python's fork hooks run around a fork only when Python code will run in the child
    # (a preexec_fn): with an exec wrapper they must not run at all.
    forks: list[int] = []
    watching = [True]
    os.register_at_fork(before=lambda: forks.append(1) if watching[0] else None)
    plan = ProcessPlan(replica=Replica("spawn", 0, "127.0.215.1"), role="service", argv=("sleep", "300"),
                       env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, cwd=Path(tmp_path), ready=None,
                       restart="never", stop_grace_s=1.0)
    events: list[str] = []

    async def run() -> tuple[int | None, int | None]:
        proc = ManagedProcess(plan, RotatingLog(tmp_path / "log"), None, lambda p, text: events.append(text),
                              lambda p: None)
        proc.start()
        await asyncio.wait_for(proc.ready_event.wait(), 10)
        pid = proc.pid
        assert pid is not None
        info = psutil.Process(pid)
        ppid, sid = info.ppid(), os.getsid(pid)
        await proc.stop(1.0, final=True)
        proc.log.close()
        return ppid, sid if sid == pid else None

    try:
        ppid, sid = asyncio.run(run())
    finally:
        watching[0] = False
    assert forks == [], "Python ran around the fork: a preexec_fn is back"
    assert ppid == os.getpid() and sid is not None, "not our child, or not in a session of its own"
    assert any("ready" in e for e in events), events
