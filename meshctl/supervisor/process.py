"""One supervised process: spawn, readiness, exit, restart with backoff, stop.

Each process runs in its own session/process group so that a stop reaches its
whole tree, and with PR_SET_PDEATHSIG so that it dies with the supervisor even
before the reaper acts (set by an exec wrapper, see meshctl/parent_death.py:
no Python runs between fork and exec, the supervisor has threads). Exit is noticed through a pidfd on the event loop (no
threads, no SIGCHLD games). stdout and stderr are merged into one pipe that the
supervisor reads line by line into the log file and the printer, so the order
of a process's output is preserved and no line is lost on exit.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import psutil

from meshctl.parent_death import launch_argv
from meshctl.supervisor.logfile import RotatingLog
from meshctl.supervisor.pod_namespace import pod_argv
from meshctl.supervisor.probes import probe
from meshctl.supervisor.reaper import MARKER_ENV, sweep
from meshctl.supervisor.states import State
from pods.replica import ProcessPlan

if TYPE_CHECKING:
    from meshctl.supervisor.dependencies import StartGate
    from meshctl.supervisor.start_pacer import StartPacer

BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 10.0
#: A run at least this long counts as stable and resets the backoff.
STABLE_RUN_S = 10.0
#: This many quick failures in a row make a crash loop.
CRASHLOOP_AFTER = 3
#: Until a process is ready its probe runs every 20 ms (a quick service is seen Ready almost at once), less
#: often when many are starting: all of them together are probed at most PROBE_RATE times a second (a hundred
#: processes starting together: every 250 ms each), so that they do not spend the CPU they need on being asked.
PROBE_INTERVAL_S = 0.02
PROBE_INTERVAL_MAX_S = 0.25
PROBE_RATE = 400.0
#: A starting process's output (a server's "listening on ..." line) brings its next probe forward to this long
#: after the previous one.
PROBE_ON_OUTPUT_S = 0.005
#: A process without a readiness probe counts as ready once it has run this long.
NO_PROBE_SETTLE_S = 0.25
#: Once ready, the probe keeps running at this period (Kubernetes' readinessProbe periodSeconds), so that
#: readiness follows the process (a sidecar's /healthcheck/fail, an overloaded service). A probe costs the
#: supervisor ~0.15 ms of CPU: every 2 s keeps a 100-process mesh's idle supervisor under 1 % of a core.
READY_PROBE_PERIOD_S = 2.0
#: This many failed probes in a row make a ready process unready (Kubernetes' failureThreshold): one lost
#: probe is not enough. A single success makes it ready again (successThreshold 1).
READY_FAILURE_THRESHOLD = 2


class ProbePacer:
    """The mesh's processes that are waiting to be ready share one probe budget (PROBE_RATE)."""

    def __init__(self, rate: float = PROBE_RATE) -> None:
        self.rate = rate
        self.starting = 0

    def interval(self) -> float:
        return min(max(self.starting / self.rate, PROBE_INTERVAL_S), PROBE_INTERVAL_MAX_S)


LineSink = Callable[["ManagedProcess", str], None]
EventSink = Callable[["ManagedProcess", str], None]


class _LogPipe(asyncio.Protocol):
    """Splits a process's output into lines for the log file and the printer."""

    def __init__(self, proc: ManagedProcess) -> None:
        self.proc = proc
        self.partial = b""
        self.closed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        data = self.partial + data
        cut = data.rfind(b"\n") + 1
        self.partial = data[cut:]
        if len(self.partial) > 65536:  # a runaway line: flush it rather than grow forever
            cut, self.partial = len(data), b""
        if cut:
            self.proc.emit_output(data[:cut])

    def connection_lost(self, exc: Exception | None) -> None:
        if self.partial:
            self.proc.emit_output(self.partial + b"\n")
            self.partial = b""
        if not self.closed.done():
            self.closed.set_result(None)


class ManagedProcess:
    def __init__(self, plan: ProcessPlan, log: RotatingLog, on_line: LineSink | None,
                 on_event: EventSink, on_change: Callable[[ManagedProcess], None],
                 after: ManagedProcess | None = None, gate: StartGate | None = None,
                 pacer: ProbePacer | None = None, starts: StartPacer | None = None) -> None:
        self.plan = plan
        #: Started only once this one is ready (the service waits for its sidecar).
        self.after = after
        #: The pods this one's pod depends on (``depends_on``), met before the first start.
        self.gate = gate
        #: Shared by the mesh's processes (None: a pacer of this process's own).
        self.pacer = pacer or ProbePacer()
        #: Shared by the mesh's processes: how many may be busy starting at once (None: no limit).
        self.starts = starts
        self.ready_event = asyncio.Event()
        self.shutting_down = False  # set by the supervisor for good when the mesh stops
        self._lifecycle = asyncio.Lock()  # one stop/restart at a time
        self.log = log
        self.on_line = on_line
        self.on_event = on_event
        self.on_change = on_change
        self.state = State.PENDING
        self.ready = False
        self.pid: int | None = None
        self.create_time: float | None = None
        self.started_at: float | None = None
        self.restarts = 0
        self.last_exit: int | None = None
        self.failures = 0  # consecutive quick failures
        self.error: str | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._psutil: psutil.Process | None = None
        self._children: dict[int, psutil.Process] = {}  # a worker-forking sidecar's workers, for status()
        self._stop = False
        self._wake = asyncio.Event()
        self._probe_wake: asyncio.Event | None = None  # while starting: set by output, to probe sooner
        self._exited: asyncio.Future[int] | None = None
        self._pipe: _LogPipe | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def key(self) -> str:
        return self.plan.key

    # -- output ---------------------------------------------------------
    def emit_output(self, chunk: bytes) -> None:
        if self._probe_wake is not None:
            self._probe_wake.set()
        self.log.write(chunk)
        if self.on_line is not None:
            for line in chunk.decode("utf-8", "replace").splitlines():
                self.on_line(self, line)

    # -- lifecycle ------------------------------------------------------
    def start(self) -> None:
        if self.shutting_down:
            return  # the mesh is stopping: nothing may start any more
        self.task = asyncio.get_running_loop().create_task(self._supervise(), name=self.key)

    def _argv(self) -> list[str]:
        if self.plan.hosts_file is not None:
            return pod_argv(self.plan.argv, self.plan.env, self.plan.cwd, self.plan.hosts_file)
        return launch_argv(self.plan.argv, self.plan.env, self.plan.cwd)

    async def _spawn(self) -> bool:
        loop = asyncio.get_running_loop()
        try:
            # Signals: SIGPIPE goes back to default (restore_signals), SIGINT is handled by the supervisor
            # and so resets to default at exec; the event loop thread spawns, and it lives as long as we do.
            popen = subprocess.Popen(
                self._argv(), env=self.plan.env, cwd=self.plan.cwd,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True)
        except OSError as exc:
            self.error = f"cannot start {self.plan.argv[0]!r}: {exc.strerror or exc}"
            self.on_event(self, self.error)
            return False
        self._popen = popen
        self.pid = popen.pid
        try:
            self._psutil = psutil.Process(popen.pid)
            self.create_time = self._psutil.create_time()
        except psutil.Error:
            self._psutil, self.create_time = None, time.time()
        if self._psutil is not None:
            try:
                self._psutil.cpu_percent(None)  # prime: later calls measure since now
            except psutil.Error:
                pass
        self.started_at = time.monotonic()
        assert popen.stdout is not None
        _, self._pipe = await loop.connect_read_pipe(lambda: _LogPipe(self), popen.stdout)
        self._exited = loop.create_future()
        pidfd = os.pidfd_open(popen.pid)

        def on_exit() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            # Leftovers of the group die now, while the unreaped leader keeps its pid (and so the group id)
            # from being reused: after the wait() a stranger could own that group.
            try:
                os.killpg(popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            code = popen.wait()
            self._start_over()
            self.ready = False  # at once: `up -d` must never see a dead process as ready
            self.ready_event.clear()
            if self._exited is not None and not self._exited.done():
                self._exited.set_result(code)

        loop.add_reader(pidfd, on_exit)
        return True

    async def _supervise(self) -> None:
        if not await self._wait_to_start():
            self._set(State.STOPPED)
            return
        while not self._stop:
            self.error = None
            self.ready = False
            if not await self._admitted():
                break
            self._set(State.STARTING)
            spawned = await self._spawn()
            if self.starts is not None:
                self.starts.started(self, self.pid if spawned else None)
            if not spawned:
                self._set(State.FAILED)
                return
            self.on_event(self, f"started (pid {self.pid})")
            self.on_change(self)
            code = await self._run_until_exit()
            await self._drain()
            self.last_exit = code
            self.ready = False
            self.ready_event.clear()
            if self._stop:
                break
            ran = time.monotonic() - (self.started_at or 0)
            self.failures = 0 if ran >= STABLE_RUN_S else self.failures + 1
            if not self._should_restart(code):
                self.on_event(self, f"exited with {describe_exit(code)}")
                self._set(State.EXITED)
                return
            delay = min(BACKOFF_BASE_S * 2 ** max(self.failures - 1, 0), BACKOFF_CAP_S)
            crashloop = self.failures >= CRASHLOOP_AFTER
            self._set(State.CRASHLOOP if crashloop else State.BACKOFF)
            self.on_event(self, f"exited with {describe_exit(code)}; restarting in {delay:.1f}s"
                          + (" (crash loop)" if crashloop else ""))
            if await self._sleep_unless_stopped(delay):
                break
            self.restarts += 1
        self._set(State.STOPPED)

    async def _wait_to_start(self) -> bool:
        """Before the first start: the pods this one depends on, then (a service) its sidecar ready.
        False: stopped meanwhile."""
        gate = self.gate
        if gate is not None and not gate.open():
            self._set(State.PENDING)
            self.on_event(self, f"waiting for {gate.describe()}")
            if not await self._unless_stopped(gate.wait()):
                return False
            self.gate = None  # met: a restart never waits again
        if self.after is not None and not self.after.ready:
            self._set(State.PENDING)
            if not await self._unless_stopped(self.after.ready_event.wait()):
                return False
        return True

    async def _admitted(self) -> bool:
        """Our turn to start (meshctl/supervisor/start_pacer.py): services before sidecars. False: stopped
        meanwhile."""
        if self.starts is None:
            return True
        if await self._unless_stopped(self.starts.admit(self, 0 if self.plan.role == "service" else 1)):
            return True
        self._start_over()  # admitted as it was stopped: the turn goes to the next one
        return False

    def _start_over(self) -> None:
        if self.starts is not None:
            self.starts.forget(self)

    async def _unless_stopped(self, awaitable: Awaitable[object]) -> bool:
        """Wait for ``awaitable`` or a stop, whichever comes first; False: stopped."""
        waiter = asyncio.ensure_future(awaitable)
        stopper = asyncio.ensure_future(self._wake.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stopper.cancel()
        return not self._stop

    async def _run_until_exit(self) -> int:
        assert self._exited is not None
        if self.plan.ready is None:
            # No probe: "running" is all we can know, but a process that dies at once is not ready.
            try:
                return await asyncio.wait_for(asyncio.shield(self._exited), NO_PROBE_SETTLE_S)
            except TimeoutError:
                pass
            self._mark_ready()
            return await self._exited
        prober = asyncio.ensure_future(self._probe_loop())
        try:
            return await self._exited
        finally:
            prober.cancel()

    async def _probe(self) -> bool:
        assert self.plan.ready is not None
        return await probe(self.plan.ready, self.plan.replica.ip, self.plan.env, str(self.plan.cwd))

    async def _probe_loop(self) -> None:
        """Quick probes until ready; then one a period for as long as the process runs."""
        self._probe_wake = asyncio.Event()
        self.pacer.starting += 1
        try:
            while not await self._probe():
                await self._probe_pause()
        finally:
            self.pacer.starting -= 1
            self._probe_wake = None
        self._mark_ready()
        failures = 0
        while True:
            await asyncio.sleep(until_probe_tick())
            if await self._probe():
                failures = 0
                if not self.ready:
                    self._mark_ready("ready again")
                continue
            failures += 1
            if self.ready and failures >= READY_FAILURE_THRESHOLD:
                self._mark_unready(f"not ready: {failures} readiness probes failed in a row")

    async def _probe_pause(self) -> None:
        """Until the next probe while starting: the pacer's interval, or PROBE_ON_OUTPUT_S when the process
        printed something (during the last probe too: that probe may have come too early)."""
        wake = self._probe_wake
        assert wake is not None
        if not wake.is_set():
            try:
                await asyncio.wait_for(wake.wait(), self.pacer.interval())
            except TimeoutError:
                wake.clear()
                return
        wake.clear()
        await asyncio.sleep(PROBE_ON_OUTPUT_S)

    def _mark_ready(self, event: str = "ready") -> None:
        self._start_over()
        self.ready = True
        self.ready_event.set()
        self._set(State.RUNNING)
        self.on_event(self, event)

    def _mark_unready(self, event: str) -> None:
        self.ready = False
        self.ready_event.clear()
        self.on_change(self)  # the publish forwarders and `ps` read .ready: nothing more to tell them
        self.on_event(self, event)

    async def _drain(self) -> None:
        """Collect the last output; kill any descendant that left the group (a daemonised child would
        otherwise keep the port the next instance needs; the group itself died in on_exit)."""
        run_id = self.plan.env.get(MARKER_ENV, "")
        if run_id:
            await asyncio.get_running_loop().run_in_executor(None, sweep, run_id, self.key)
        if self._pipe is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._pipe.closed), 2.0)
            except TimeoutError:
                pass

    def _should_restart(self, code: int) -> bool:
        policy = self.plan.restart
        return policy == "always" or (policy == "on-failure" and code != 0)

    async def _sleep_unless_stopped(self, delay: float) -> bool:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), delay)
        except TimeoutError:
            pass
        return self._stop

    def _set(self, state: State) -> None:
        self.state = state
        self.on_change(self)

    async def stop(self, grace_s: float | None = None, final: bool = False) -> None:
        """SIGTERM the group (and descendants that left it), wait, then SIGKILL."""
        if final:
            self.shutting_down = True
        async with self._lifecycle:
            await self._stop_locked(grace_s)

    async def _stop_locked(self, grace_s: float | None) -> None:
        self._stop = True
        self._wake.set()
        grace = self.plan.stop_grace_s if grace_s is None else grace_s
        if self._exited is not None and not self._exited.done() and self.pid is not None:
            self._set(State.STOPPING)
            tree = self._descendants()
            self._signal(signal.SIGTERM, tree)
            try:
                await asyncio.wait_for(asyncio.shield(self._exited), grace)
            except TimeoutError:
                self.on_event(self, f"did not stop within {grace:g}s; killing")
            self._signal(signal.SIGKILL, tree)
        task = self.task
        if task is not None:
            await task
        self.ready = False

    async def restart(self) -> None:
        """Stop and start again (a manual restart counts in RESTARTS, as in Kubernetes)."""
        async with self._lifecycle:
            if self.shutting_down:
                return
            await self._stop_locked(None)
            self._stop = False
            self._wake.clear()  # the stop above set it: the new start must not take it for another stop
            self.failures = 0
            self.restarts += 1
            self.start()

    def _descendants(self) -> list[psutil.Process]:
        if self._psutil is None:
            return []
        try:
            return self._psutil.children(recursive=True)
        except psutil.Error:
            return []

    def _signal(self, sig: int, tree: list[psutil.Process]) -> None:
        if self.pid is not None and self.is_alive():  # once reaped, the pid (and group id) may be reused
            try:
                os.killpg(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for child in tree:
            try:
                child.send_signal(sig)
            except psutil.Error:
                pass

    # -- reporting ------------------------------------------------------
    def is_alive(self) -> bool:
        return self._exited is not None and not self._exited.done()

    @property
    def _forks_workers(self) -> bool:
        """A sidecar with ``--concurrency N`` (N > 1) serves from worker processes: its CPU and memory are
        theirs. Only then are the children walked (a /proc scan), never for the other processes."""
        argv = self.plan.argv
        try:
            return int(argv[argv.index("--concurrency") + 1]) > 1 and self.plan.role == "sidecar"
        except (ValueError, IndexError):
            return False

    def _add_workers(self, cpu: float, rss: int) -> tuple[float, int]:
        """The process's CPU and RSS plus its children's (their psutil objects kept: cpu_percent measures
        since the previous call on the same object)."""
        assert self._psutil is not None
        try:
            children = self._psutil.children(recursive=True)
        except psutil.Error:
            return cpu, rss
        known = self._children
        self._children = {c.pid: known.get(c.pid, c) for c in children}
        for child in self._children.values():
            try:
                with child.oneshot():
                    cpu += child.cpu_percent(None)
                    rss += child.memory_info().rss
            except psutil.Error:
                continue
        return cpu, rss

    def status(self, resources: bool = True) -> dict[str, Any]:
        """``resources=False`` skips the /proc reads (CPU, RSS): `up -d` polls often while pods start."""
        cpu = rss = None
        alive = self.is_alive()
        if alive and resources and self._psutil is not None:
            try:
                with self._psutil.oneshot():
                    cpu = self._psutil.cpu_percent(None)
                    rss = self._psutil.memory_info().rss
            except psutil.Error:
                pass
            if cpu is not None and rss is not None and self._forks_workers:
                cpu, rss = self._add_workers(cpu, rss)
        r = self.plan.replica
        return {
            "pod": r.pod, "replica": r.name, "ip": r.ip, "role": self.plan.role,
            "pid": self.pid if alive else None, "pgid": self.pid if alive else None,
            "create_time": self.create_time if alive else None,
            "state": self.state.value, "ready": self.ready, "restarts": self.restarts,
            "last_exit": self.last_exit, "error": self.error,
            "uptime_s": round(time.monotonic() - self.started_at, 3) if alive and self.started_at else None,
            "cpu_percent": cpu, "rss_bytes": rss,
            "waiting_for": ([{"pod": d.pod, "condition": d.condition} for d in self.gate.unmet()]
                            if self.gate is not None and self.state == State.PENDING else []),
        }


def until_probe_tick(period: float = READY_PROBE_PERIOD_S) -> float:
    """Seconds until the mesh's next probe tick (a multiple of ``period`` on the loop's clock). Every ready
    process is probed on the same ticks: one wakeup of the loop probes them all. Processes that became ready
    one by one (starts are paced) would otherwise each wake it at their own phase: 0.8 % of a core for an idle
    100-process mesh became 1.2 %."""
    now = asyncio.get_running_loop().time()
    return period - now % period


def describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"
