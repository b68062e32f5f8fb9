"""The reaper kills a run's processes, and nothing else, even after pids have been reused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator

import psutil
import pytest

from meshctl.supervisor.reaper import MARKER_ENV, kill_groups_since, kill_run
from tests.conftest import ROOT, wait_for


class Group:
    """A process group of our own: ``sh`` leading one ``sleep`` per member, marked with ``run_id`` or not."""

    def __init__(self, run_id: str, marked_members: list[bool], leader_marked: bool = False) -> None:
        env = {k: v for k, v in os.environ.items() if k != MARKER_ENV}
        if leader_marked:
            env[MARKER_ENV] = run_id
        script = " ".join(f"{MARKER_ENV}={run_id if m else 'other'} sleep 300 &" for m in marked_members) + " wait"
        self.leader = subprocess.Popen(["sh", "-c", script], start_new_session=True, env=env)
        self.pgid = self.leader.pid
        me = psutil.Process(self.leader.pid)
        self.create_time = me.create_time()

        def sleepers() -> list[psutil.Process]:
            kids = [p for p in me.children() if _name(p) == "sleep"]
            return kids if len(kids) == len(marked_members) else []

        kids = wait_for(sleepers, 10)
        assert kids, "the group's members did not start"
        by_pid = {p.pid: p for p in kids}
        self.marked = [p for p in by_pid.values() if p.environ().get(MARKER_ENV) == run_id]
        self.unmarked = [p for p in by_pid.values() if p not in self.marked]

    def close(self) -> None:
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.leader.wait(10)


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


def _dead(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _leader(g: Group) -> psutil.Process:
    return psutil.Process(g.leader.pid)


@pytest.fixture
def groups() -> Iterator[list[Group]]:
    made: list[Group] = []
    yield made
    for g in made:
        g.close()


def test_a_reused_pgid_spares_the_stranger_and_kills_only_marked_members(groups):
    run_id = uuid.uuid4().hex
    stranger = Group(run_id, [True, False])
    groups.append(stranger)
    # The record says our process had this pid, created 5 s before the process that has it now:
    # the pid was reused, and the group with that id is a stranger's (except for the marked member).
    recorded = {stranger.pgid: stranger.create_time - 5.0}
    kill_run(recorded, run_id, grace_s=0.5)  # what `up`/`down` do with a dead supervisor's record...
    kill_groups_since(recorded)  # ...then for groups whose leader is gone
    assert all(wait_for(lambda p=p: _dead(p), 5) for p in stranger.marked)
    assert not _dead(_leader(stranger)) and not any(_dead(p) for p in stranger.unmarked)


def test_a_verified_leader_takes_its_whole_group_with_it(groups):
    run_id = uuid.uuid4().hex
    ours = Group(run_id, [False], leader_marked=True)
    other = Group(uuid.uuid4().hex, [True])  # another run's processes
    groups.extend([ours, other])
    assert kill_groups_since({ours.pgid: ours.create_time}, run_id) == 2
    assert wait_for(lambda: _dead(_leader(ours)) and all(_dead(p) for p in ours.unmarked), 5)
    assert not _dead(_leader(other)) and not any(_dead(p) for p in other.marked)


def test_the_reaper_process_kills_its_run_when_the_supervisor_vanishes(groups):
    run_id = uuid.uuid4().hex
    pod = Group(run_id, [False], leader_marked=True)
    reused = Group(run_id, [True, False])
    groups.extend([pod, reused])
    reaper = subprocess.Popen([sys.executable, "-m", "meshctl.supervisor.reaper", run_id], stdin=subprocess.PIPE,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert reaper.stdin is not None
    reaper.stdin.write(f"+{pod.pgid}\n+{reused.pgid} {reused.create_time - 5.0:.3f}\n".encode())
    reaper.stdin.close()  # EOF without "bye": the supervisor died
    assert reaper.wait(15) == 0
    assert wait_for(lambda: _dead(_leader(pod)) and all(_dead(p) for p in pod.unmarked + reused.marked), 5)
    assert not _dead(_leader(reused)) and not any(_dead(p) for p in reused.unmarked)
