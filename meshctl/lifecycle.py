"""A mesh's life as the CLI drives it: plan it, start it (here or in the background), find it, stop it.

The CLI parses arguments and renders; everything here returns data or raises
``MeshError`` with the message and exit code the user should see.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

# meshctl.client (http.client, email, ssl) is imported where a command talks to a supervisor: the supervisor
# itself imports this module, and never does.
from meshctl.state import (
    StateDir,
    acquire_mesh_lock,
    aliases_by_mesh,
    all_meshes,
    listening_aliases,
    meshctl_home,
    running_meshes,
)
from meshctl.supervisor.states import BROKEN, State, completed
from pods.plan import HostFacts, MeshPlan, plan_mesh
from pods.source import Problem
from pods.topology import PrometheusSpec, TracingSpec

USAGE_ERROR = 2
CAP_NET_BIND_SERVICE = 10
#: `up -d` asks the supervisor to answer once the mesh has settled, waiting at most this long per request.
SETTLE_WAIT_S = 2.0
#: How often `up -d` looks for the control socket before the supervisor has created it.
SOCKET_POLL_S = 0.01


class MeshError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class PlanError(MeshError):
    """The topology cannot run; ``problems`` lists every reason (``FILE:LINE``)."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(map(str, problems)), USAGE_ERROR)
        self.problems = problems


# --------------------------------------------------------------------------- planning


PROC_ROOT = Path("/proc")


def read_proc(relative: str, proc_root: Path = PROC_ROOT) -> str | None:
    """The text of ``proc_root/relative``, or None when it cannot be read: any OSError (a kernel without the
    entry, a sandbox without /proc, a permission). Every /proc read goes through here, so each caller decides
    what "unknown" means, and tests point ``proc_root`` at a directory of their own."""
    try:
        return (proc_root / relative).read_text(errors="replace")
    except OSError:
        return None


def unprivileged_port_start(proc_root: Path = PROC_ROOT) -> int | None:
    """net.ipv4.ip_unprivileged_port_start: ports below it need CAP_NET_BIND_SERVICE. None when /proc does not say."""
    try:
        return int(read_proc("sys/net/ipv4/ip_unprivileged_port_start", proc_root) or "")
    except ValueError:
        return None


def can_bind_privileged(proc_root: Path = PROC_ROOT) -> bool | None:
    """Whether this process holds CAP_NET_BIND_SERVICE. Root is not enough (capabilities can be dropped) and not
    needed (the capability is). None when /proc does not say."""
    for line in (read_proc("self/status", proc_root) or "").splitlines():
        if line.startswith("CapEff:"):
            try:
                return bool(int(line.split()[1], 16) >> CAP_NET_BIND_SERVICE & 1)
            except (ValueError, IndexError):
                return None
    return None


def host_facts(to_run: bool = True) -> HostFacts:
    from meshctl.supervisor.pod_namespace import pod_hosts_problem
    from pods.sidecars import find_envoy

    port_start, capable = unprivileged_port_start(), can_bind_privileged()
    return HostFacts(environ=dict(os.environ), mesh_aliases=aliases_by_mesh(), listening_aliases=listening_aliases(),
                     unprivileged_port_start=1024 if port_start is None else port_start,
                     can_bind_privileged=(os.geteuid() == 0 if capable is None else capable) or not to_run,
                     pod_hosts_problem=pod_hosts_problem() if to_run else None,
                     envoy_bin=find_envoy(os.environ))


def make_plan(file: str, project: str | None = None, with_prometheus: bool = False,
              prometheus_bin: str | None = None, to_run: bool = True, starting: bool = False,
              sidecar_engine: str | None = None, with_tracing: bool = False) -> MeshPlan:
    """Load, check and plan ``file``; raises PlanError with every problem (warnings are in the plan).

    ``to_run=False`` plans only to read the result (hosts files, the scrape config): nothing will bind
    a port, so privileged ports are no problem. ``starting`` (`up`): a pod whose program is missing is a
    warning, and the rest of the mesh starts without it. ``sidecar_engine``: every sidecar on this engine.
    ``with_tracing`` (`up --tracing`): the tracing collector with its defaults unless the file has a section.
    """
    from pods.topology import TopologyError, load_topology

    facts, home = host_facts(to_run), meshctl_home()  # first: the plan itself reads nothing of the host
    facts = replace(facts, start_despite_missing_commands=starting)
    try:
        topo = load_topology(file)
    except TopologyError as err:
        raise PlanError(err.problems) from None
    if project:
        topo = replace(topo, name=project)
    spec = topo.prometheus
    if spec is None and (with_prometheus or prometheus_bin):
        spec = PrometheusSpec()
    if spec is not None and prometheus_bin:
        spec = replace(spec, bin=prometheus_bin)
    tracing = topo.tracing or (TracingSpec() if with_tracing else None)
    plan = plan_mesh(topo, home / topo.name, facts, prometheus=spec, sidecar_engine=sidecar_engine, tracing=tracing)
    if plan.errors:
        raise PlanError(list(plan.problems))
    return plan


# --------------------------------------------------------------------------- finding a mesh


def pick_mesh(project: str | None, need_running: bool = True) -> StateDir:
    if project:
        state = StateDir.for_mesh(project)
        if need_running and not state.supervisor_alive():
            known = ", ".join(s.mesh for s in running_meshes()) or "none"
            raise MeshError(f"mesh '{project}' is not running (running: {known})")
        if not state.root.exists():
            raise MeshError(f"no mesh named '{project}'")
        return state
    pool = running_meshes() if need_running else (running_meshes() or all_meshes())
    if not pool:
        raise MeshError("no mesh is running (start one with `meshctl up FILE`)")
    if len(pool) > 1:
        raise MeshError("several meshes are running: " + ", ".join(s.mesh for s in pool) + "; pick one with -p NAME")
    return pool[0]


def ask(state: StateDir, method: str, url: str, timeout: float = 10.0) -> dict[str, Any]:
    """One control API call, errors as MeshError."""
    from meshctl.client import ControlError, call

    try:
        return call(state.control_socket, method, url, timeout=timeout)
    except ControlError as exc:
        # "no such pod" is the user's mistake (a usage error); anything else is the mesh's state
        raise MeshError(str(exc), USAGE_ERROR if exc.status == 404 else 1) from None


# --------------------------------------------------------------------------- starting


def claim(plan: MeshPlan) -> tuple[StateDir, int]:
    """The mesh's state dir and its lock (an fd the supervisor keeps for its whole life)."""
    state = StateDir.for_mesh(plan.mesh)
    pid = state.supervisor_alive()
    if pid:
        raise MeshError(f"mesh '{plan.mesh}' is already running (supervisor pid {pid}); "
                        f"`meshctl down -p {plan.mesh}` first")
    try:
        state.create()
    except OSError as exc:
        raise MeshError(str(exc)) from None
    lock = acquire_mesh_lock(state)
    if lock is None:
        raise MeshError(f"mesh '{plan.mesh}' is already running or starting; `meshctl down -p {plan.mesh}` first")
    return state, lock


def ensure_mesh_ca(plan: MeshPlan) -> None:
    """The mesh CA exists and is usable before the supervisor starts, so `up` can say why not in one line.

    Only for a mesh that uses mTLS or ``tls: mesh``: any other mesh gets no CA (and no cryptography import).
    """
    if plan.identity is None:
        return
    from meshctl.identity.ca import CAError, ensure_ca

    try:
        ensure_ca(plan.identity.dir, plan.mesh, plan.identity.supplied_ca)
    except CAError as exc:
        raise MeshError(f"mesh '{plan.mesh}': {exc}") from None


def ensure_certificates(plan: MeshPlan, replicas: list[str]) -> None:
    """The CA and a certificate for each of ``replicas`` that has none yet (`meshctl export envoy`: the real Envoy
    refuses a bootstrap naming files that do not exist). A running mesh's certificates are left alone."""
    if plan.identity is None:
        return
    from meshctl.identity.ca import CAError, ensure_ca
    from meshctl.identity.issuer import Issuer

    wanted = [r for r in replicas if r in plan.identity.replicas
              and not Path(plan.identity.replicas[r].identity.cert).exists()]
    if not wanted:
        return
    try:
        issuer = Issuer(plan.identity, ensure_ca(plan.identity.dir, plan.mesh, plan.identity.supplied_ca))
        for replica in wanted:
            issuer.issue(replica)
    except CAError as exc:
        raise MeshError(f"mesh '{plan.mesh}': {exc}") from None
    except OSError as exc:
        raise MeshError(f"mesh '{plan.mesh}': cannot write a certificate in {plan.identity.dir}: "
                        f"{exc.strerror or exc}") from None


def run_supervisor(plan: MeshPlan, state: StateDir, foreground: bool) -> int:
    """Run the mesh in this process until it is stopped (signals: one stops, a second forces)."""
    import asyncio

    from meshctl.supervisor.supervisor import Supervisor
    from pods.runloop import run as run_loop

    printer = None
    if foreground:
        from meshctl.supervisor.printer import Printer

        printer = Printer()
    else:  # supervisor.log: one line per event, with time and level
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    sup = Supervisor(plan, state, printer)

    async def main_task() -> int:
        loop = asyncio.get_running_loop()
        presses = 0

        def on_signal() -> None:
            nonlocal presses
            presses += 1
            if presses == 1:
                sup.request_stop()
            else:
                sup.force_now()

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):  # a closed terminal too
            loop.add_signal_handler(sig, on_signal)
        return await sup.run()

    return run_loop(main_task())


def read_plan(stream: Any) -> MeshPlan:
    """The plan handed over by ``start_detached`` (pickled: it only ever crosses from us to our child)."""
    plan = pickle.load(stream)
    if not isinstance(plan, MeshPlan):
        raise MeshError("supervise: stdin does not hold a mesh plan", USAGE_ERROR)
    return plan


class _Forked:
    """The forked supervisor, with the little of ``subprocess.Popen`` that waiting for it needs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def _fork_supervisor(plan: MeshPlan, state: StateDir, lock: int) -> _Forked | None:
    """This process, forked, becomes the supervisor: it has imported and planned everything already, where a new
    interpreter would start, import and unpickle the plan first (~100 ms before the first pod starts, and as
    much CPU). None: not here (threads would not survive the fork; no fork on this platform)."""
    import threading

    if threading.active_count() != 1 or not hasattr(os, "fork"):
        return None
    log = os.open(state.supervisor_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError:
        os.close(log)
        return None
    if pid:
        os.close(log)
        return _Forked(pid)
    code = 1
    try:  # the child: never returns into the command line
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        _close_inherited(keep=lock)
        _set_title(f"meshctl supervise --project {plan.mesh}")
        code = run_supervisor(plan, state, foreground=False)
    except BaseException:  # noqa: BLE001 - whatever it was, it goes to supervisor.log
        import traceback

        traceback.print_exc()
    finally:
        try:
            import logging

            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _close_inherited(keep: int) -> None:
    """Close what `up` inherited from its own parent (a test harness's pipes: whoever waits for them to close
    must not wait for the mesh), as the exec'd supervisor's close_fds did; Python's own descriptors are
    close-on-exec and stay. The mesh's lock stays, and no program the supervisor starts inherits it."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd != keep:
            try:
                if os.get_inheritable(fd):
                    os.close(fd)
            except OSError:  # the listing's own descriptor, closed meanwhile
                pass
    os.set_inheritable(keep, False)


def _set_title(title: str) -> None:
    """What ps shows for this process (its command line), as setproctitle does: the kernel reads it from the
    argv area of the process's own memory, which Python copied at start and no longer uses."""
    import ctypes

    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (fields 48, 49)
    except (OSError, ValueError, IndexError):
        return
    first = os.fsencode(sys.orig_argv[0]) + b"\0" if sys.orig_argv else b""
    if not first or not 0 < start < end <= start + (1 << 20) or ctypes.string_at(start, len(first)) != first:
        return  # not the argv area we expect: leave it alone
    text = b"\0".join(arg.encode() for arg in title.split(" "))[: end - start - 1]
    ctypes.memmove(start, text + b"\0" * (end - start - len(text)), end - start)


def start_detached(plan: MeshPlan, state: StateDir, lock: int, wait_timeout: float) -> tuple[dict[str, Any], float]:
    """Start the supervisor in the background with this very plan; wait until every process is ready.

    Returns the final status and the seconds it took. On failure the mesh is stopped and MeshError says why.
    """
    start = time.monotonic()
    forked = _fork_supervisor(plan, state, lock)
    if forked is not None:
        os.close(lock)  # the supervisor holds the lock now
        try:
            return _wait_ready(plan, state, forked, start, wait_timeout), time.monotonic() - start
        except KeyboardInterrupt:
            stop_supervisor(state, forked.pid)
            raise MeshError(f"interrupted: mesh '{plan.mesh}' stopped", 130) from None
    with open(state.supervisor_log, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshctl.supervisor", "supervise", "--project", plan.mesh], stdin=subprocess.PIPE,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True, pass_fds=(lock,))
    os.close(lock)  # the supervisor holds the lock now
    try:
        assert proc.stdin is not None
        pickle.dump(plan, proc.stdin)
        proc.stdin.close()
        return _wait_ready(plan, state, proc, start, wait_timeout), time.monotonic() - start
    except BrokenPipeError:
        return _wait_ready(plan, state, proc, start, wait_timeout), time.monotonic() - start
    except KeyboardInterrupt:
        stop_supervisor(state, proc.pid)
        raise MeshError(f"interrupted: mesh '{plan.mesh}' stopped", 130) from None


def _wait_ready(plan: MeshPlan, state: StateDir, proc: subprocess.Popen[bytes] | _Forked, start: float,
                wait_timeout: float) -> dict[str, Any]:
    """Until every process is ready: the supervisor answers a status request once the mesh has settled (every
    process ready or done, or one broken), so this asks about once, not every few milliseconds."""
    from meshctl.client import ControlError, call

    deadline = start + wait_timeout
    status: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = tail_lines(state.supervisor_log, 10)
            raise MeshError(f"the supervisor of mesh '{plan.mesh}' exited ({proc.returncode}):\n" + "\n".join(tail))
        asked = time.monotonic()
        if state.control_socket.exists():
            # Bounded, so that a supervisor that dies or hangs is noticed within a few seconds.
            wait = max(0.0, min(deadline - asked, SETTLE_WAIT_S))
            try:
                status = call(state.control_socket, "GET", f"/v1/status?resources=0&wait={wait:.3f}",
                              timeout=wait + 10)
            except ControlError:
                status = None
        if status and status["processes"]:
            # A pod whose program is missing was reported when planning; the rest of the mesh starts.
            procs = [p for p in status["processes"] if f"{p['replica']}/{p['role']}" not in plan.unstartable]
            # A one-shot job that exited 0 (restart never/on-failure) is done, not broken.
            broken = [p for p in procs if p["state"] in BROKEN and not completed(p["state"], p["last_exit"])]
            if broken:
                _fail_startup(plan, state, broken[0], proc, blocked=_blocked(procs, broken[0]["pod"]))
            if all((p["ready"] and p["pid"] and p["state"] == State.RUNNING) or completed(p["state"], p["last_exit"])
                   for p in procs):
                # One status with resources: it rescans the listening sockets, so `up` can name wildcard binds.
                try:
                    return call(state.control_socket, "GET", "/v1/status", timeout=10)
                except ControlError:
                    return status
        if time.monotonic() - asked < SOCKET_POLL_S:
            time.sleep(SOCKET_POLL_S)  # no socket yet (or an answer at once): a stat every few milliseconds
    not_ready = [p for p in (status or {}).get("processes", [])
                 if not p["ready"] and not completed(p["state"], p["last_exit"])
                 and f"{p['replica']}/{p['role']}" not in plan.unstartable]
    if not_ready:
        # The first that is not waiting for another pod is the one to blame (its dependents are listed).
        first = next((p for p in not_ready if not p.get("waiting_for")), not_ready[0])
        _fail_startup(plan, state, first, proc, timed_out=wait_timeout,
                      blocked=_blocked(status["processes"] if status else [], first["pod"]))
    stop_supervisor(state, proc.pid)
    raise MeshError(f"mesh '{plan.mesh}' did not start within {wait_timeout:g}s")


def _blocked(procs: list[dict[str, Any]], pod: str) -> list[str]:
    """The pods that were never started because they wait for ``pod`` (depends_on), directly or not."""
    out: list[str] = []
    frontier = {pod}
    while frontier:
        waiting = {p["pod"] for p in procs if p["pod"] not in out and p["pod"] not in frontier
                   and any(w["pod"] in frontier for w in p.get("waiting_for") or ())}
        out += sorted(waiting)
        frontier = waiting
    return out


def _fail_startup(plan: MeshPlan, state: StateDir, bad: dict[str, Any], proc: subprocess.Popen[bytes] | _Forked,
                  timed_out: float | None = None, blocked: list[str] | None = None) -> None:
    key = f"{bad['replica']}/{bad['role']}"
    why = (f"not ready after {timed_out:g}s" if timed_out else
           f"{bad['state']}" + (f", last exit {bad['last_exit']}" if bad.get("last_exit") is not None else ""))
    if bad.get("error"):
        why += f": {bad['error']}"
    if bad.get("waiting_for"):
        why += ": still waiting for " + ", ".join(f"{w['pod']} ({w['condition']})" for w in bad["waiting_for"])
    lines = [f"{key} failed to get ready ({why}); last log lines:"]
    lines += [f"  {key} | {line}" for line in tail_lines(state.log_path(bad["replica"], bad["role"]), 15)]
    if blocked:
        lines.append(f"not started, because they wait for {bad['pod']} (depends_on): {', '.join(blocked)}")
    stop_supervisor(state, proc.pid)
    lines.append(f"meshctl: mesh '{plan.mesh}' stopped; logs kept in {state.logs}")
    raise MeshError("\n".join(lines))


# --------------------------------------------------------------------------- stopping


def stop_supervisor(state: StateDir, pid: int | None, timeout: float = 30.0) -> bool:
    """Ask the supervisor to stop; SIGTERM it if it does not answer; wait for it. False: it had to be killed."""
    from meshctl.client import ControlError, call

    try:
        call(state.control_socket, "POST", "/v1/down", timeout=5)
    except ControlError:
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    if pid and not _wait_gone(pid, timeout):
        os.kill(pid, signal.SIGKILL)  # its reaper now kills what it leaves; wait for both
        _wait_gone(pid, 5)
        return False
    return True


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited. A zombie has: a foreground `up` started by a program that reaps its child
    only after `down` returns (a test's Popen, a script) would otherwise hold `down` for the whole timeout."""
    import psutil

    deadline = time.monotonic() + timeout
    try:
        proc = psutil.Process(pid)
        while True:
            try:
                proc.wait(0.1)
                return True
            except psutil.TimeoutExpired:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    return True
                if time.monotonic() >= deadline:
                    return False
    except psutil.NoSuchProcess:
        return True


def down(state: StateDir, timeout: float) -> int:
    """Stop the mesh and everything it started; returns how many leftovers of a dead supervisor were reaped."""
    from meshctl.state import mesh_lock_held
    from meshctl.supervisor.reaper import marked
    from meshctl.supervisor.supervisor import reap_record

    pid = state.supervisor_alive()
    deadline = time.monotonic() + 10
    while not pid and mesh_lock_held(state) and time.monotonic() < deadline:
        time.sleep(0.05)  # an `up` is starting this mesh: wait for its supervisor, then stop it
        pid = state.supervisor_alive()
    if pid and not stop_supervisor(state, pid, timeout):
        _wait_for_reaper(state)
    left = reap_record(state)
    run_id = (state.read_record() or {}).get("run_id", "")
    survivors = marked(run_id) if run_id else []
    if survivors:
        raise MeshError(f"mesh '{state.mesh}': {len(survivors)} processes survived the stop: "
                        + ", ".join(str(p.pid) for p in survivors[:10]))
    return left


def _wait_for_reaper(state: StateDir, timeout: float = 5.0) -> None:
    """After a forced kill of the supervisor its reaper kills the mesh: wait until no marked process is left."""
    from meshctl.supervisor.reaper import marked

    run_id = (state.read_record() or {}).get("run_id", "")
    deadline = time.monotonic() + timeout
    while run_id and marked(run_id) and time.monotonic() < deadline:
        time.sleep(0.05)


def tail_lines(path: Path, n: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-n:]
