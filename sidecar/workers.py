"""``--concurrency N``: N worker processes serve the listeners, like Envoy's N worker threads.

Python runs one thread of bytecode at a time, so where Envoy starts threads we start processes. The process the
supervisor started stays the **parent** (the process group leader it signals and probes) and serves no traffic:

* **Listeners.** The parent binds every listener N times with ``SO_REUSEPORT`` (after checking, without it, that
  nobody else holds the port: "cannot listen" as without workers) and hands worker *i* its own socket of each
  listener. The kernel spreads new connections over the N sockets by a hash of their addresses and ports. The
  parent keeps its copies open, so connections that arrive while a worker is being restarted wait in that
  worker's accept queue instead of being refused.
* **Workers** are ``python -m sidecar <the same arguments> --worker SLOT:PARENT_PID:FDS``, started with
  ``subprocess`` (a fresh interpreter, never a fork of the parent's running event loop), each running the
  single-process ``Sidecar`` on its sockets without an admin. A worker asks for SIGKILL when its parent dies
  (``PR_SET_PDEATHSIG``, checked against a parent that died before the ``prctl``), so a ``kill -9`` of the
  parent leaves none behind; a worker that exits is started again (0.1 s doubling to 2 s between quick
  failures; at start-up, a worker that fails before it is ready stops the sidecar with its exit code).
* **Admin** is the parent's alone (TCP port and admin socket). Each worker has a control socket (a socketpair)
  to the parent: length-prefixed ``marshal`` messages. ``/stats``, ``/stats/prometheus`` and ``/clusters`` ask
  every worker for a snapshot and render their sum (``sidecar.stats_merge``); ``/runtime_modify`` and
  ``/healthcheck/fail|ok`` reach every worker before the answer is sent; ``/quitquitquit`` and SIGTERM stop
  them (each drains as a single process does) before the parent exits. A restarted worker starts with the
  parent's runtime overrides and health-check state.
* **Access logs**: each worker writes whole lines; to a pipe (stdout under the supervisor) in writes of at most
  ``PIPE_BUF`` bytes, which the kernel never interleaves (``sidecar.access_log.PIPE_ATOMIC``), to a file with
  ``O_APPEND``.

``--concurrency 1`` (the default) is the single process, untouched: nothing here is imported.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import marshal
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

from sidecar.app import Sidecar
from sidecar.config import Bootstrap, CircuitBreakers
from sidecar.server import Stream
from sidecar.stats import ServerStats
from sidecar.stats_merge import MergedStore, Snapshot, Totals, snapshot

log = logging.getLogger("sidecar")

PR_SET_PDEATHSIG = 1
#: How long the admin waits for a worker's snapshot; a worker that does not answer shows its last one.
ASK_TIMEOUT_S = 2.0
RESTART_MIN_S = 0.1
RESTART_MAX_S = 2.0
#: A worker that ran this long before exiting is restarted at once, its backoff reset.
STABLE_RUN_S = 10.0
#: After SIGTERM, how long the parent waits for its workers to drain (theirs is DRAIN_S) before SIGKILL.
STOP_GRACE_S = 10.0
LISTEN_BACKLOG = 2048
_HEADER = struct.Struct("!I")


# --- the control channel ----------------------------------------------------------------------------------------


def frame(msg: Any) -> bytes:
    data = marshal.dumps(msg)
    return _HEADER.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    return marshal.loads(await reader.readexactly(size))


def _recv_frame_blocking(sock: socket.socket, timeout: float) -> Any:
    sock.settimeout(timeout)
    try:
        head = _recv_exactly(sock, _HEADER.size)
        return marshal.loads(_recv_exactly(sock, _HEADER.unpack(head)[0]))
    finally:
        sock.settimeout(None)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the parent closed the control socket")
        buf += chunk
    return bytes(buf)


# --- parent death -------------------------------------------------------------------------------------------------


def die_with_parent(expected_parent: int) -> None:
    """SIGKILL when the parent dies, however it dies; exit now if it already has (it died before the prctl)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != expected_parent:
        os._exit(1)


# --- the parent ---------------------------------------------------------------------------------------------------


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def check_free(address: str, port: int) -> None:
    """Bind once without SO_REUSEPORT: fails (EADDRINUSE) when anyone listens there, even with SO_REUSEPORT,
    so N sockets bound next never join another process's group."""
    with socket.socket(_family(address), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((address, port))


def reuseport_listener(address: str, port: int) -> socket.socket:
    s = socket.socket(_family(address), socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((address, port))
        s.listen(LISTEN_BACKLOG)
    except OSError:
        s.close()
        raise
    return s


class WorkerGone(Exception):
    """The worker exited (or is not started) while the parent was asking it something."""


@dataclass
class Slot:
    """Worker ``index``: the process serving it now, and what the processes before it counted."""

    index: int
    socks: list[socket.socket] = field(default_factory=list)  # its socket of each listener, in listener order
    proc: subprocess.Popen[bytes] | None = None
    gen: int = 0  # spawns so far: a reply is only kept if it comes from the current process
    live_gen: int | None = None  # the generation whose snapshot ``last`` is (None: nothing live to count)
    ready: bool = False
    ever_ready: bool = False
    writer: asyncio.StreamWriter | None = None
    pending: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    seq: int = 0
    retired: Totals = field(default_factory=Totals)
    last: Snapshot | None = None
    started_at: float = 0.0
    backoff: float = 0.0
    runtime_version: int = 0  # of the runtime overrides it was started with
    restarts: int = 0


@dataclass
class PoolView:
    """A host of a cluster as /clusters prints it, summed over the workers."""

    host: str
    port: int
    address: str
    idle: range = range(0)  # /clusters prints len(idle): the idle connections
    active_requests: int = 0
    hc_failed: bool = False
    ejected: bool = False


@dataclass
class OutlierView:
    sr_average: float = -1.0
    sr_threshold: float = -1.0


@dataclass
class ClusterView:
    name: str
    breakers: CircuitBreakers
    outlier: OutlierView | None = None
    pools: list[PoolView] = field(default_factory=list)


def cluster_data(sidecar: Sidecar) -> list[Any]:
    """A worker's /clusters facts as plain data."""
    out = []
    for c in sidecar.clusters.values():
        od = c.outlier
        out.append((c.name, None if od is None else (od.sr_average, od.sr_threshold),
                    [(p.host, p.port, p.address, len(p.idle), p.active_requests, bool(p.hc_failed), bool(p.ejected))
                     for p in c.pools]))
    return out


def merge_clusters(config: Bootstrap, answers: list[list[Any]]) -> dict[str, ClusterView]:
    """The workers' /clusters facts as one: connections and requests add up, a host is flagged when any worker
    flags it, success rates are the mean of the workers that computed one."""
    views = {c.name: ClusterView(c.name, c.circuit_breakers) for c in config.clusters}
    rates: dict[str, list[tuple[float, float]]] = {}
    for answer in answers:
        for name, od, pools in answer:
            view = views.get(name)
            if view is None:
                continue
            if od is not None:
                rates.setdefault(name, [])
                if od[0] >= 0:
                    rates[name].append(od)
            by_addr = {p.address: p for p in view.pools}
            for host, port, address, idle, active, hc_failed, ejected in pools:
                p = by_addr.get(address)
                if p is None:
                    p = by_addr[address] = PoolView(host, port, address)
                    view.pools.append(p)
                p.idle = range(len(p.idle) + idle)
                p.active_requests += active
                p.hc_failed = p.hc_failed or hc_failed
                p.ejected = p.ejected or ejected
    for name, values in rates.items():
        if values:
            n = len(values)
            views[name].outlier = OutlierView(sum(v[0] for v in values) / n, sum(v[1] for v in values) / n)
        else:
            views[name].outlier = OutlierView()
    return views


class Parent(Sidecar):
    """The admin and the keeper of N workers; ``Admin`` serves it as it serves a single-process ``Sidecar``."""

    def __init__(self, config: Bootstrap, pod_ip: str | None, hosts_path: str | None, source: str,
                 admin_socket: str | None, concurrency: int, worker_args: list[str]) -> None:
        super().__init__(config, pod_ip, hosts_path, source, admin_socket=admin_socket)
        self.concurrency = concurrency
        self.store = MergedStore()
        self.server_stats = ServerStats(self.store, concurrency=concurrency)
        self.store.add_render_hook(self.store.add_worker_memory)
        # Connections open now on every listener: the workers' sum, without the per-worker copies of it.
        self.store.derived_gauge("server.total_connections", self.store.open_connections)
        self.worker_args = list(worker_args)
        self.slots = [Slot(i) for i in range(concurrency)]
        self.stopping = False
        self.runtime_version = 0
        self._startup: asyncio.Future[None] | None = None
        self._watchers: set[asyncio.Task[None]] = set()

    # -- start ---------------------------------------------------------------------------------------------------

    def bind_listeners(self) -> None:
        """Every listener, once per worker (OSError: the port is taken, as ``create_server`` would say)."""
        for lst in self.config.listeners:
            check_free(lst.address, lst.port)
        try:
            for slot in self.slots:
                slot.socks = [reuseport_listener(lst.address, lst.port) for lst in self.config.listeners]
        except OSError:
            self._close_listeners()
            raise

    def _close_listeners(self) -> None:
        for slot in self.slots:
            for s in slot.socks:
                s.close()
            slot.socks = []

    async def start(self) -> None:
        """The admin, then the workers; LIVE once every worker is (WorkerFailed: one failed before that)."""
        loop = asyncio.get_running_loop()
        await self._start_admin()
        self._sweeper = loop.create_task(self._sweep_idle())
        self._startup = loop.create_future()
        for slot in self.slots:
            self._spawn(slot)
        await self._startup
        self.state = "LIVE"

    def _spawn(self, slot: Slot) -> None:
        if self.stopping:
            return
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [child_end.fileno(), *(s.fileno() for s in slot.socks)]
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where the sidecar package lives
        env = dict(os.environ)
        env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        argv = [sys.executable, "-m", "sidecar", *self.worker_args,
                "--worker", f"{slot.index}:{os.getpid()}:{','.join(map(str, fds))}"]
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            slot.proc = subprocess.Popen(argv, pass_fds=fds, env=env, stdin=subprocess.DEVNULL)
        except OSError as exc:
            parent_end.close()
            log.error("cannot start worker %d: %s", slot.index, exc.strerror or exc)
            self._exited(slot, 1)
            return
        finally:
            child_end.close()  # the worker's now
        slot.gen += 1
        slot.live_gen = slot.gen
        slot.ready = False
        slot.started_at = time.monotonic()
        slot.runtime_version = self.runtime_version
        # The worker reads this before it starts serving: the runtime overrides and health state it must have.
        try:
            parent_end.sendall(frame(("init", self._worker_state())))
        except OSError:
            pass  # it died already: the watcher below sees the socket close and handles its exit
        task = asyncio.get_running_loop().create_task(self._watch(slot, parent_end, slot.gen))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    def _worker_state(self) -> dict[str, Any]:
        return {"runtime": dict(self.runtime.values), "state": "DRAINING" if self.state == "DRAINING" else "LIVE"}

    async def _watch(self, slot: Slot, sock: socket.socket, gen: int) -> None:
        """Read the worker's messages until its control socket closes, then reap it and restart it."""
        proc = slot.proc
        assert proc is not None
        writer = None
        try:
            reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
            slot.writer = writer
            while True:
                msg = await read_frame(reader)
                kind = msg[0]
                if kind == "reply":
                    fut = slot.pending.pop(msg[1], None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg[2])
                elif kind == "ready":
                    self._ready(slot)
                elif kind == "final":  # a worker stopping gracefully: its exact last counts
                    if slot.live_gen == gen:
                        slot.last = msg[1]
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError, EOFError):
            pass
        finally:
            if writer is not None:
                writer.close()
            else:
                sock.close()
            if slot.gen == gen:
                slot.writer = None
                slot.ready = False
                for fut in slot.pending.values():
                    if not fut.done():
                        fut.set_exception(WorkerGone())
                slot.pending.clear()
        code = await self._reap(proc)
        if slot.live_gen == gen:
            slot.retired.retire(slot.last)
            slot.last = None
            slot.live_gen = None
        self._exited(slot, code)

    async def _reap(self, proc: subprocess.Popen[bytes]) -> int:
        """The exit code of a worker whose control socket closed (it is exiting); killed if it lingers."""
        deadline = time.monotonic() + STOP_GRACE_S
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                deadline = float("inf")
            await asyncio.sleep(0.01)
        return proc.returncode

    def _ready(self, slot: Slot) -> None:
        slot.ready = True
        slot.ever_ready = True
        if slot.runtime_version != self.runtime_version:  # overrides changed while it was starting
            self._send(slot, ("sync", self._worker_state()))
            slot.runtime_version = self.runtime_version
        if self._startup is not None and not self._startup.done() and all(s.ready for s in self.slots):
            self._startup.set_result(None)

    def _exited(self, slot: Slot, code: int) -> None:
        proc = slot.proc
        pid = proc.pid if proc is not None else "-"
        if self.stopping:
            return
        if not slot.ever_ready and self._startup is not None and not self._startup.done():
            self._startup.set_exception(WorkerFailed(slot.index, code))
            return
        ran = time.monotonic() - slot.started_at
        slot.backoff = 0.0 if ran >= STABLE_RUN_S else min(RESTART_MAX_S, max(RESTART_MIN_S, slot.backoff * 2))
        slot.restarts += 1
        log.warning("worker %d (pid %s) %s; starting it again%s", slot.index, pid, describe_exit(code),
                    f" in {slot.backoff:.1f} s" if slot.backoff else "")
        if slot.backoff:
            asyncio.get_running_loop().call_later(slot.backoff, self._spawn, slot)
        else:
            self._spawn(slot)

    # -- asking the workers ------------------------------------------------------------------------------------------

    def _send(self, slot: Slot, msg: Any) -> bool:
        """Queue ``msg`` to the worker; False when it is gone (its watcher handles the exit)."""
        writer = slot.writer
        if writer is None or writer.is_closing():
            return False
        try:
            writer.write(frame(msg))
        except (OSError, RuntimeError):
            return False
        return True

    async def ask(self, slot: Slot, op: str, arg: Any = None, timeout: float = ASK_TIMEOUT_S) -> Any:
        if slot.writer is None or not slot.ready:
            raise WorkerGone()
        slot.seq += 1
        seq = slot.seq
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        slot.pending[seq] = fut
        if not self._send(slot, ("req", seq, op, arg)):
            slot.pending.pop(seq, None)
            raise WorkerGone()
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            slot.pending.pop(seq, None)

    async def ask_all(self, op: str, arg: Any = None) -> list[tuple[Slot, int, Any]]:
        """(slot, generation, answer or exception) of every ready worker."""
        live = [(s, s.gen) for s in self.slots if s.ready]
        answers = await asyncio.gather(*(self.ask(s, op, arg) for s, _ in live), return_exceptions=True)
        return [(s, g, a) for (s, g), a in zip(live, answers, strict=True)]

    async def collect_stats(self) -> None:
        for slot, gen, answer in await self.ask_all("stats"):
            if isinstance(answer, dict) and slot.live_gen == gen:
                slot.last = answer  # else (timed out, gone): its last snapshot stands in
        self.store.update((s.retired, s.last) for s in self.slots)

    # -- the admin's hook (sidecar.admin.Admin._handle) -------------------------------------------------------------

    def prepare_admin(self, path: str, stream: Stream, q: dict[str, list[str]]) -> Any:
        """What to do with the workers before the admin answers ``path``: an awaitable whose result says whether
        the answer was already sent, or None (nothing to do)."""
        if path in ("/stats", "/stats/prometheus"):
            return self._then_render(self.collect_stats())
        if path == "/clusters":
            return self._collect_clusters()
        if path == "/healthcheck/fail":
            return self._broadcast_state("DRAINING")
        if path == "/healthcheck/ok":
            return self._broadcast_state("LIVE")
        if path == "/runtime_modify":
            return self._runtime_modify(stream)
        return None

    @staticmethod
    async def _then_render(step: Any) -> bool:
        await step
        return False

    async def _collect_clusters(self) -> bool:
        answers = [a for _, _, a in await self.ask_all("clusters") if isinstance(a, list)]
        self.clusters = merge_clusters(self.config, answers)  # type: ignore[assignment]
        return False

    async def _broadcast_state(self, state: str) -> bool:
        await self.ask_all("state", state)
        return False  # the admin's own handler sets the parent's state and answers

    async def _runtime_modify(self, stream: Stream) -> bool:
        """Every worker applies it (each checks the keys against its filters) before the parent answers."""
        from urllib.parse import parse_qs

        q = parse_qs(stream.url.decode("latin-1").partition("?")[2], keep_blank_values=True)
        if not q:
            return False  # the admin's usage answer
        changes = {k: v[-1].strip() for k, v in q.items()}
        answers = await self.ask_all("runtime", changes)
        errors = [a for _, _, a in answers if isinstance(a, str)]
        if errors:  # an unknown key: every worker refused it (they run one configuration)
            stream.reply(400, errors[0].encode())
            return True
        if not any(a is None for _, _, a in answers):
            stream.reply(503, b"no worker is running to check the keys; try again\n")
            return True
        for k, v in changes.items():
            if v == "":
                self.runtime.values.pop(k, None)
            else:
                self.runtime.values[k] = v
        self.runtime_version += 1
        applied = {id(slot) for slot, _, a in answers if a is None}
        for slot in self.slots:
            if id(slot) in applied:
                slot.runtime_version = self.runtime_version
            elif slot.writer is not None:  # alive but slow to answer: it reads this after the request
                self._send(slot, ("sync", self._worker_state()))
                slot.runtime_version = self.runtime_version
            # (a worker starting now gets the overrides when it says it is ready: see _ready)
        stream.reply(200, b"OK\n")
        return True

    # -- stop --------------------------------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop the workers (each drains), then the admin."""
        self.state = "DRAINING"
        self.stopping = True
        if self._startup is not None and not self._startup.done():
            self._startup.cancel()
        self._close_listeners()  # the workers' copies stay until they close them
        live = [s.proc for s in self.slots if s.proc is not None and s.proc.poll() is None]
        for proc in live:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        if live:
            try:
                await asyncio.wait_for(self._wait_all_exited(), STOP_GRACE_S)
            except TimeoutError:
                for proc in live:
                    if proc.poll() is None:
                        log.warning("worker pid %d did not stop in %.0f s: killing it", proc.pid, STOP_GRACE_S)
                        proc.kill()
                await self._wait_all_exited()
        for task in list(self._watchers):
            task.cancel()
        self.clusters = {}  # (views of the workers' clusters: nothing to close here)
        await super().shutdown()

    async def _wait_all_exited(self) -> None:
        while any(s.proc is not None and s.proc.poll() is None for s in self.slots):
            await asyncio.sleep(0.01)


class WorkerFailed(Exception):
    def __init__(self, index: int, code: int) -> None:
        super().__init__(f"worker {index} {describe_exit(code)} before it was ready")
        self.code = code if code > 0 else 1


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


async def serve_parent(config: Bootstrap, pod_ip: str, hosts: str | None, source: str, admin_socket: str | None,
                       concurrency: int, worker_args: list[str]) -> int:
    """``python -m sidecar --concurrency N`` (N > 1): bind, start the workers, serve the admin until told to stop."""
    parent = Parent(config, pod_ip, hosts, source, admin_socket, concurrency, worker_args)
    try:
        parent.bind_listeners()
    except OSError as exc:
        log.error("cannot listen: %s", exc.strerror or exc)
        return 1
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, parent.request_stop)
    start = loop.create_task(parent.start())
    stop = loop.create_task(parent._stop.wait())
    await asyncio.wait((start, stop), return_when=asyncio.FIRST_COMPLETED)
    if not start.done():  # told to stop while starting
        start.cancel()
        await parent.shutdown()
        return 0
    stop.cancel()
    try:
        start.result()
    except OSError as exc:
        log.error("cannot listen: %s", exc.strerror or exc)
        await parent.shutdown()
        return 1
    except WorkerFailed as exc:
        log.error("%s", exc)
        await parent.shutdown()
        return exc.code
    except asyncio.CancelledError:
        await parent.shutdown()
        return 0
    names = ", ".join(f"{lst.name}={lst.address}:{lst.port}" for lst in config.listeners)
    admin = f"; admin {config.admin.address}:{config.admin.port}" if config.admin else ""
    if admin_socket:
        admin += f"; admin socket {admin_socket}"
    pids = ", ".join(str(s.proc.pid) for s in parent.slots if s.proc is not None)
    log.info("live: %s%s; %d workers (pids %s)", names, admin, concurrency, pids)
    await parent.serve()
    return 0


# --- a worker -----------------------------------------------------------------------------------------------------


def parse_worker_arg(value: str) -> tuple[int, int, list[int]]:
    """``SLOT:PARENT_PID:CONTROL_FD,LISTENER_FD,...`` (what ``Parent._spawn`` passes)."""
    try:
        slot, ppid, fds = value.split(":")
        return int(slot), int(ppid), [int(fd) for fd in fds.split(",")]
    except ValueError:
        raise ValueError(f"--worker: expected SLOT:PARENT_PID:FDS, got {value!r}") from None


def worker_main(config: Bootstrap, pod_ip: str, hosts: str | None, source: str, value: str) -> int:
    """A worker process: adopt the parent's sockets, read the initial state, serve until told to stop."""
    from pods.runloop import run as run_loop
    from sidecar import access_log

    slot, ppid, fds = parse_worker_arg(value)
    die_with_parent(ppid)
    ctrl = socket.socket(fileno=fds[0])
    socks = [socket.socket(fileno=fd) for fd in fds[1:]]
    if len(socks) != len(config.listeners):
        log.error("worker %d: %d listener sockets for %d listeners", slot, len(socks), len(config.listeners))
        return 2
    try:
        init = _recv_frame_blocking(ctrl, 30.0)
    except (OSError, ValueError, EOFError) as exc:
        log.error("worker %d: no start message from the parent: %s", slot, exc)
        return 1
    access_log.PIPE_ATOMIC = True  # N processes share stdout: whole lines per write, never interleaved
    return run_loop(_serve_worker(replace(config, admin=None), pod_ip, hosts, source, slot, ctrl, socks, init[1]))


async def _serve_worker(config: Bootstrap, pod_ip: str, hosts: str | None, source: str, slot: int,
                        ctrl: socket.socket, socks: list[socket.socket], init: dict[str, Any]) -> int:
    sidecar = Sidecar(config, pod_ip, hosts, source, listen_socks=socks)
    sidecar.runtime.values.update(init["runtime"])  # before the filters are built: they arm from these
    failed = await sidecar.start_or_exit_code()
    if failed is not None:
        return failed
    if init["state"] == "DRAINING":
        sidecar.state = "DRAINING"
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sidecar.request_stop)
    reader, writer = await asyncio.open_connection(sock=ctrl, limit=1 << 20)
    writer.write(frame(("ready", os.getpid())))
    control = loop.create_task(_control(sidecar, reader, writer))
    await sidecar.serve()
    control.cancel()
    try:
        writer.write(frame(("final", snapshot(sidecar.store))))
        await asyncio.wait_for(writer.drain(), 1.0)
    except (OSError, TimeoutError):
        pass
    writer.close()
    return 0


async def _control(sidecar: Sidecar, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer the parent's requests, in order; the parent gone (EOF) stops the worker."""
    while True:
        try:
            msg = await read_frame(reader)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            log.warning("the parent closed the control socket: stopping")
            sidecar.request_stop()
            return
        if msg[0] == "sync":
            apply_state(sidecar, msg[1])
            continue
        _, seq, op, arg = msg
        try:
            answer = handle(sidecar, op, arg)
        except Exception as exc:  # a bug must cost one admin answer, never the worker
            log.exception("worker: control request %r failed", op)
            answer = f"{type(exc).__name__}: {exc}"
        writer.write(frame(("reply", seq, answer)))


def handle(sidecar: Sidecar, op: str, arg: Any) -> Any:
    if op == "stats":
        return snapshot(sidecar.store)
    if op == "clusters":
        return cluster_data(sidecar)
    if op == "runtime":
        return sidecar.runtime.modify(arg)  # None, or the error message (an unknown key)
    if op == "state":
        sidecar.state = arg
        return None
    raise ValueError(f"unknown control request {op!r}")


def apply_state(sidecar: Sidecar, state: dict[str, Any]) -> None:
    """The parent's overrides and health state, wholesale (they were checked when they were set)."""
    runtime = sidecar.runtime
    runtime.values.clear()
    runtime.values.update(state["runtime"])
    for watch in runtime.watchers:
        watch()
    sidecar.state = state["state"]

