"""The supervisor under stress: crashes at start, races, daemonised children, lost reapers, hang-ups."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import termios
from pathlib import Path

import psutil

from tests.conftest import ROOT, marked_processes, wait_for

DAEMON = """
import os, signal, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(300)
    os._exit(0)
time.sleep(300)
"""


def _reaper_has_read_its_pipe(pid: int) -> bool:
    """The reaper is blocked reading its stdin pipe and nothing is left unread in it: it has every
    ``+PGID`` line the supervisor sent when it started it."""
    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text()
        fd = os.open(f"/proc/{pid}/fd/0", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        buf = bytearray(4)
        fcntl.ioctl(fd, termios.FIONREAD, buf)
    finally:
        os.close(fd)
    # wchan reads "0" where the kernel hides it: then the empty pipe is all there is to go by.
    return int.from_bytes(buf, "little") == 0 and ("pipe" in wchan or wchan in ("", "0"))


def test_up_fails_when_a_probe_less_service_dies_at_once(meshctl):
    topo = meshctl.write("boom.yaml", """
        pods:
          ok:
            ip: 127.0.130.1
            service: {command: [sleep, "300"]}
          boom:
            ip: 127.0.131.1
            service: {command: [sh, -c, "echo starting; exit 3"]}
    """)
    for i in range(3):
        res = meshctl("up", str(topo), "-d", "-p", "boom", check=False)
        meshctl.started.append("boom")
        assert res.returncode == 1, (i, res.stdout, res.stderr)
        assert "boom-0/service failed to get ready" in res.stderr and "starting" in res.stderr


def test_one_supervisor_per_mesh(meshctl):
    topo = meshctl.write("one.yaml", """
        pods:
          web:
            ip: 127.0.132.1
            service:
              command: [python, -m, http.server, --bind, "${POD_IP}", "8000"]
              ready: {tcp: 8000}
    """)
    cmd = [sys.executable, "-m", "meshctl", "up", str(topo), "-d", "-p", "onesup"]
    procs = [subprocess.Popen(cmd, env=meshctl.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    meshctl.started.append("onesup")
    results = [p.communicate(timeout=60) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 1], results
    assert any("already running or starting" in r[1] for r in results)
    sups = [p for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and "supervise" in p.info["cmdline"] and "onesup" in p.info["cmdline"]]
    assert len(sups) == 1


def test_daemonised_descendants_die_with_a_clean_stop(meshctl):
    script = meshctl.workdir / "daemon.py"
    script.write_text(DAEMON)
    topo = meshctl.write("d.yaml", f"""
        pods:
          d:
            ip: 127.0.133.1
            service: {{command: [python, "{script}"]}}
    """)
    fg = subprocess.Popen([sys.executable, "-m", "meshctl", "up", str(topo), "-p", "daemons"], env=meshctl.env,
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meshctl.started.append("daemons")
    rec = wait_for(lambda: meshctl.record("daemons") if (meshctl.home / "daemons/state.json").exists() else None, 10)
    assert wait_for(lambda: len(marked_processes(rec["run_id"])) >= 2, 10)
    fg.send_signal(signal.SIGINT)
    assert fg.wait(30) == 0
    assert not marked_processes(rec["run_id"])  # gone when `up` returns, not later


def test_a_killed_reaper_is_replaced(meshctl):
    script = meshctl.workdir / "daemon.py"
    script.write_text(DAEMON)
    topo = meshctl.write("r.yaml", f"""
        pods:
          d:
            ip: 127.0.134.1
            service: {{command: [python, "{script}"]}}
          t:
            ip: 127.0.135.1
            service: {{command: [sh, -c, "trap '' TERM; sleep 300 & sleep 301"]}}
    """)
    meshctl.up(topo, "reap")
    rec = meshctl.record("reap")
    sup = psutil.Process(rec["supervisor"]["pid"])
    reapers = [c for c in psutil.process_iter(["cmdline"])
               if c.info["cmdline"] and "meshctl.supervisor.reaper" in c.info["cmdline"]
               and rec["run_id"] in c.info["cmdline"]]
    assert len(reapers) == 1
    reapers[0].kill()
    new = wait_for(lambda: [c for c in psutil.process_iter(["cmdline"]) if c.info["cmdline"]
                            and "meshctl.supervisor.reaper" in c.info["cmdline"] and rec["run_id"] in c.info["cmdline"]
                            and c.pid != reapers[0].pid], 5)
    assert new
    # Kill the supervisor only once the new reaper has been told the process groups.
    assert wait_for(lambda: _reaper_has_read_its_pipe(new[0].pid), 10)
    sup.kill()
    assert wait_for(lambda: not marked_processes(rec["run_id"]), 5), marked_processes(rec["run_id"])


def test_sighup_stops_gracefully(meshctl):
    topo = meshctl.write("h.yaml", """
        pods:
          g:
            ip: 127.0.136.1
            service:
              command: [sh, -c, "trap 'echo got TERM; exit 0' TERM; while true; do sleep 0.1; done"]
              stop_grace_period: 3s
    """)
    meshctl.up(topo, "hup")
    rec = meshctl.record("hup")
    os.kill(rec["supervisor"]["pid"], signal.SIGHUP)
    assert wait_for(lambda: not psutil.pid_exists(rec["supervisor"]["pid"])
                    or psutil.Process(rec["supervisor"]["pid"]).status() == psutil.STATUS_ZOMBIE, 10)
    assert "got TERM" in (meshctl.home / "hup/logs/g-0.service.log").read_text()
    assert not marked_processes(rec["run_id"])


def test_project_names_cannot_escape_the_state_dir(meshctl):
    topo = meshctl.write("p.yaml", "pods:\n  a:\n    service: {command: [sleep, '1']}\n")
    before = sorted(p.name for p in meshctl.workdir.iterdir()), os.path.exists("/etc/x")
    for bad in ("..", "/etc/x", "a/b", "UPPER"):
        res = meshctl("up", str(topo), "-d", "-p", bad, check=False)
        assert res.returncode == 2 and "is not a mesh name" in res.stderr, (bad, res.stderr)
        assert "Traceback" not in res.stderr
    # Nothing was started and nothing was written: not in the state dir, not next to it, not in /etc.
    res = meshctl("ps", "-o", "json", check=False)
    assert res.returncode == 1 and "no mesh is running" in res.stderr, (res.stdout, res.stderr)
    assert not meshctl.home.exists() or not any(meshctl.home.iterdir()), list(meshctl.home.iterdir())
    assert (sorted(p.name for p in meshctl.workdir.iterdir()), os.path.exists("/etc/x")) == before


def test_logs_follow_survives_rotation_without_losing_lines(meshctl):
    """13 MB of numbered lines cross the 10 MB rotation while `logs -f` follows: every line, in order."""
    n = 130_000
    script = meshctl.workdir / "spam.py"
    script.write_text(f"""
import sys, time
for batch in range(100):
    lines = range(batch * {n // 100}, (batch + 1) * {n // 100})
    sys.stdout.write("".join(str(i).zfill(6) + " " + "x" * 92 + "\\n" for i in lines))
    sys.stdout.flush()
    time.sleep(0.04)
time.sleep(300)
""")
    topo = meshctl.write("spam.yaml", f"""
        pods:
          spam:
            ip: 127.0.137.1
            service: {{command: [python, "{script}"]}}
    """)
    meshctl.up(topo, "spam")
    sink = open(meshctl.workdir / "followed.txt", "w")  # a file, not a pipe: the follower must never block
    follower = subprocess.Popen([sys.executable, "-m", "meshctl", "logs", "spam", "-f", "-p", "spam"], env=meshctl.env,
                                cwd=ROOT, stdout=sink, stderr=subprocess.DEVNULL, text=True)
    try:
        logs = meshctl.home / "spam" / "logs"
        assert wait_for(lambda: (logs / "spam-0.service.log.1").exists(), 30)

        def complete() -> bool:
            text = (logs / "spam-0.service.log").read_text()
            return text.rstrip().endswith(f"{n - 1:06d} " + "x" * 92)

        assert wait_for(complete, 30)

        def followed_to_the_end() -> bool:
            text = (meshctl.workdir / "followed.txt").read_text()
            return text.rstrip().endswith(f"{n - 1:06d} " + "x" * 92)

        assert wait_for(followed_to_the_end, 30)
    finally:
        follower.terminate()
        follower.wait(10)
        sink.close()
    out = (meshctl.workdir / "followed.txt").read_text()
    numbers = [int(line[:6]) for line in out.splitlines() if line[:6].isdigit()]
    assert numbers and numbers == list(range(numbers[0], n)), (len(numbers), numbers[:3], numbers[-3:])


def test_up_d_forks_its_supervisor_which_keeps_none_of_ups_inherited_descriptors(meshctl):
    """`up -d` becomes the supervisor by forking (no second interpreter start); like the exec'd one it keeps
    nothing `up` inherited (whoever waits for such a pipe to close must not wait for the mesh), shows as
    `meshctl supervise --project NAME`, and is its own session."""
    import select

    topo = meshctl.write("fork.yaml", """
        pods:
          web:
            ip: 127.0.138.1
            service:
              command: [python, -m, http.server, --bind, "${POD_IP}", "8000"]
              ready: {tcp: 8000}
    """)
    read_end, write_end = os.pipe()
    try:
        up = subprocess.Popen([sys.executable, "-m", "meshctl", "up", str(topo), "-d", "-p", "forked"],
                              env=meshctl.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              pass_fds=(write_end,))
        meshctl.started.append("forked")
        os.close(write_end)
        out, err = up.communicate(timeout=60)
        assert up.returncode == 0, err
        readable, _, _ = select.select([read_end], [], [], 10)
        assert readable and os.read(read_end, 1) == b"", "the supervisor kept up's inherited pipe open"
    finally:
        os.close(read_end)
    sup = psutil.Process(meshctl.record("forked")["supervisor"]["pid"])
    assert [a for a in sup.cmdline() if a] == ["meshctl", "supervise", "--project", "forked"]
    assert os.getsid(sup.pid) == sup.pid
