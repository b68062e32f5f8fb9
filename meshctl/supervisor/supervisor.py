"""The supervisor: runs a mesh plan and keeps it running until told to stop.

One asyncio loop owns every process, the publish forwarders and the control
socket. It records what it started (pid + create time) in the state dir, and
keeps a reaper process informed, so that neither a crash of the supervisor nor
a ``kill -9`` leaves a process behind.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psutil

from meshctl.state import StateDir, process_alive
from meshctl.supervisor.control_server import serve
from meshctl.supervisor.dependencies import Pulse, gates
from meshctl.supervisor.forwarder import Forwarder
from meshctl.supervisor.listening import ListeningWatch, Target
from meshctl.supervisor.logfile import RotatingLog
from meshctl.supervisor.process import ManagedProcess, ProbePacer
from meshctl.supervisor.reaper import kill_groups_since, kill_run
from meshctl.supervisor.start_pacer import StartPacer
from meshctl.supervisor.states import BROKEN, State, completed
from pods.atomic_file import write_atomic
from pods.plan import MeshPlan

if TYPE_CHECKING:
    from meshctl.identity.rotation import Rotation
    from meshctl.supervisor.printer import Printer  # the foreground's (click): never imported under `up -d`

log = logging.getLogger(__name__)


def reap_record(state: StateDir) -> int:
    """Stop what a dead supervisor left behind; returns how many processes were found."""
    rec = state.read_record()
    if not rec or state.supervisor_alive():
        return 0
    procs = [p for p in rec.get("processes", []) if p.get("pid")]
    alive = [p for p in procs if process_alive(p["pid"], p["create_time"])]
    kill_run({p["pgid"] for p in alive}, rec.get("run_id", ""), grace_s=2.0)
    # Groups whose leader is already dead (PDEATHSIG) may still have members.
    kill_groups_since({p["pgid"]: p["create_time"] for p in procs if p.get("pgid") and p.get("create_time")},
                      rec.get("run_id", ""))
    rec["processes"] = []
    rec.pop("supervisor", None)
    state.write_record(rec)
    return len(alive)


def _target(proc: ManagedProcess) -> Target:
    assert proc.pid is not None
    return Target(proc.key, proc.pid, proc.plan.replica.ip)


class Supervisor:
    def __init__(self, plan: MeshPlan, state: StateDir, printer: Printer | None = None) -> None:
        self.plan = plan
        self.state = state
        self.printer = printer
        self.processes: list[ManagedProcess] = []
        self.forwarders: list[Forwarder] = []
        self.run_id = plan.run_id
        self.started = time.monotonic()
        self._stop = asyncio.Event()
        self._force = False
        self._reaper: subprocess.Popen[bytes] | None = None
        self._reported_pgids: dict[str, int] = {}
        self._record_dirty = False
        self._all_ready_reported = False
        self._forwarder_pods: list[tuple[str, Forwarder]] = []
        self.listening = ListeningWatch(lambda text: self._event(text, warning=True))
        self.exit_code = 0
        #: Issues and rotates the replicas' certificates (None: nothing in this mesh uses mTLS).
        self.rotation: Rotation | None = None
        #: Fired at every change of any process: what pods waiting on depends_on re-check.
        self._pulse = Pulse()
        #: The probe budget of the processes that are not ready yet.
        self.pacer = ProbePacer()
        #: How many processes may be busy starting at once (one more than the cores).
        self.starts = StartPacer()

    # -- events from processes ----------------------------------------------
    def _on_line(self, proc: ManagedProcess, line: str) -> None:
        if self.printer is not None:
            self.printer.line(proc.key, line)

    def _event(self, text: str, error: bool = False, warning: bool = False) -> None:
        """Mesh events: on the terminal in the foreground, in supervisor.log (via logging) under `up -d`."""
        if self.printer is not None:
            self.printer.event(text, error=error, warning=warning)
        else:
            log.log(logging.ERROR if error else logging.WARNING if warning else logging.INFO, "%s", text)

    def _on_event(self, proc: ManagedProcess, text: str) -> None:
        self._event(f"{proc.key} {text}", error="exited" in text or "cannot" in text)

    def _on_change(self, proc: ManagedProcess) -> None:
        self._pulse.fire()
        pgid = proc.pid if proc.is_alive() else None
        old = self._reported_pgids.get(proc.key)
        if pgid != old:
            if old is not None:
                self._tell_reaper(f"-{old}")
            if pgid is not None:
                # With the leader's create time the reaper can tell our group from a later one with the same id.
                self._tell_reaper(f"+{pgid} {proc.create_time}")
                self._reported_pgids[proc.key] = pgid
            else:
                self._reported_pgids.pop(proc.key, None)
            self._schedule_record()
        if proc.ready and pgid is not None:  # what it listens on is settled now (a wildcard bind warns)
            self.listening.ready(_target(proc))
        if (not self._all_ready_reported and self.processes
                and all(p.ready or completed(p.state, p.last_exit) for p in self.processes)):
            self._all_ready_reported = True
            self._event(f"mesh {self.plan.mesh} ready: {len(self.plan.replicas())} "
                                   f"replicas, {len(self.processes)} processes in "
                                   f"{time.monotonic() - self.started:.2f}s")

    def _tell_reaper(self, line: str) -> None:
        if self._reaper is not None and self._reaper.stdin is not None:
            try:
                self._reaper.stdin.write(line.encode() + b"\n")
                self._reaper.stdin.flush()
            except (OSError, ValueError):  # the reaper is gone, or its pipe already closed at shutdown
                pass

    def _schedule_record(self) -> None:
        if not self._record_dirty:
            self._record_dirty = True
            asyncio.get_running_loop().call_soon(self._write_record)

    def _write_record(self) -> None:
        self._record_dirty = False
        me = psutil.Process()
        self.state.write_record({
            "mesh": self.plan.mesh,
            "file": str(self.plan.source),
            "run_id": self.run_id,
            "supervisor": {"pid": me.pid, "create_time": me.create_time()},
            "aliases": [r.ip for r in self.plan.replicas()],
            "processes": [{"key": p.key, "pid": p.pid, "pgid": p.pid, "create_time": p.create_time}
                          for p in self.processes if p.is_alive()],
        })

    # -- queries --------------------------------------------------------------
    def status(self, resources: bool = True) -> dict[str, Any]:
        return {
            "mesh": self.plan.mesh,
            "file": str(self.plan.source),
            "supervisor": {"pid": os.getpid(), "uptime_s": round(time.monotonic() - self.started, 3)},
            "stopping": self._stop.is_set(),
            "publish": [{"host": f"{f.host_ip}:{f.host_port}", "pod_port": f.pod_port,
                         "pod": pod} for pod, f in self._forwarder_pods],
            "pods": self.plan.describe(),
            "hosts_mode": self.plan.hosts_mode,
            # Where the trace collector is: `meshctl trace` asks here, never the topology file.
            "tracing": self.plan.tracing.describe() if self.plan.tracing is not None else None,
            "processes": [{**p.status(resources), "ports": self.plan.process_ports(p.plan),
                           "engine": self.plan.process_engine(p.plan),
                           "hosts_mode": "mount" if p.plan.hosts_file is not None else "env",
                           **self.listening.report(p.key, p.pid if p.is_alive() else None)}
                          for p in self.processes],
        }

    def is_settled(self) -> bool:
        """What `up -d` waits for: every startable process ready (or a finished one-shot job), or one of them
        broken (it will not get ready without help), or the mesh stopping."""
        if self._stop.is_set():
            return True
        procs = [p for p in self.processes if p.key not in self.plan.unstartable]
        if not procs:
            return False
        if any(p.state in BROKEN and not completed(p.state, p.last_exit) for p in procs):
            return True
        return all((p.ready and p.is_alive() and p.state == State.RUNNING) or completed(p.state, p.last_exit)
                   for p in procs)

    async def settled(self, timeout: float) -> None:
        """Returns once ``is_settled()`` holds, or after ``timeout`` seconds (woken at each process change)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.is_settled():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._pulse.wait(), remaining)
            except TimeoutError:
                return

    async def refresh_listening(self) -> None:
        """Rescan what the running processes listen on (a status with resources asks; a thread does it)."""
        await self.listening.refresh([_target(p) for p in self.processes if p.is_alive() and p.pid is not None])

    def hosts(self, name: str) -> dict[str, str]:
        """The hosts file of each replica named by ``name`` (a pod or a replica)."""
        return {r.name: self.plan.hosts_text(r) for r in self.plan.find(name)}

    def find_processes(self, name: str, role: str | None = None) -> list[ManagedProcess]:
        names = {r.name for r in self.plan.find(name)}
        return [p for p in self.processes if p.plan.replica.name in names and (role is None or p.plan.role == role)]

    def exec_target(self, name: str) -> dict[str, Any]:
        """Where `meshctl exec NAME` runs: the service process of a replica (replica 0 of a pod).

        Raises LookupError (unknown name) or RuntimeError (not running) with the user's message.
        """
        replicas = self.plan.find(name)
        if not replicas:
            raise LookupError(f"no pod or replica named {name!r} in mesh '{self.plan.mesh}'")
        replica = replicas[0]
        proc = next(p for p in self.processes if p.plan.replica == replica and p.plan.role == "service")
        if self._stop.is_set() or not proc.is_alive() or proc.pid is None:
            raise RuntimeError(f"{proc.key} is not running (state {proc.state.value}); nothing to exec into")
        return {"replica": replica.name, "pid": proc.pid, "state": proc.state.value, "env": proc.plan.env,
                "cwd": str(proc.plan.cwd), "hosts_mode": self.plan.hosts_mode,
                "user_namespace": self.plan.hosts_mode == "mount" and os.geteuid() != 0}

    async def restart(self, procs: list[ManagedProcess]) -> None:
        if self._stop.is_set():
            raise RuntimeError("the mesh is stopping")
        await asyncio.gather(*(p.restart() for p in procs))

    def certs(self) -> dict[str, Any]:
        """Every identity's live certificate (``GET /v1/certs``)."""
        ident = self.plan.identity
        if ident is None or self.rotation is None:
            return {"mesh": self.plan.mesh, "trust_domain": None, "ca": None, "certs": []}
        issuer = self.rotation.issuer
        certs = []
        for name, r in ident.replicas.items():
            state = issuer.state.get(name)
            certs.append({**(state.describe() if state else {"replica": name, "pod": r.pod,
                                                             "identity": r.identity.spiffe_id}),
                          "mtls": r.identity.ingress, "peers": sorted({i for ids in r.identity.clusters.values()
                                                                       for i in ids}),
                          "rotate_at": issuer.rotate_at(name).isoformat() if state else None,
                          "cert": r.identity.cert, "key": r.identity.key})
        return {"mesh": self.plan.mesh, "trust_domain": ident.trust_domain, "ca": str(ident.ca_cert),
                "ca_subject": issuer.ca.cert.subject.rfc4514_string(), "cert_ttl_s": ident.cert_ttl_s,
                "certs": certs}

    def rotate_certs(self, name: str) -> list[dict[str, Any]]:
        """Rotate the certificates of a pod's replicas or one replica now.

        Raises LookupError (unknown name, or no identity) or RuntimeError (stopping; cannot write).
        """
        if not self.plan.find(name):
            raise LookupError(f"no pod or replica named {name!r} in mesh '{self.plan.mesh}'")
        targets = self.plan.identity.find(name) if self.plan.identity is not None else []
        if not targets or self.rotation is None:
            raise LookupError(f"{name!r} has no mesh identity (its pod has no sidecar, or mtls is off and it "
                              "calls no meshed pod)")
        if self._stop.is_set():
            raise RuntimeError("the mesh is stopping")
        try:
            return [self.rotation.rotate(t.replica).describe() for t in targets]
        except OSError as exc:
            raise RuntimeError(f"cannot write the new certificate: {exc.strerror or exc}") from None

    def _start_identity(self) -> bool:
        """The mesh CA and every replica's first certificate, before any sidecar starts."""
        ident = self.plan.identity
        if ident is None:
            return True
        # Imported only here: cryptography costs a mesh without mTLS nothing.
        from meshctl.identity.ca import CAError, ensure_ca
        from meshctl.identity.issuer import Issuer
        from meshctl.identity.rotation import Rotation

        t0 = time.monotonic()
        try:
            ident.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(ident.dir, 0o700)  # the mesh CA's key lives here
            ca = ensure_ca(ident.dir, self.plan.mesh, ident.supplied_ca)
            self.rotation = Rotation(Issuer(ident, ca), lambda text, error: self._event(text, error=error))
            self.rotation.start()
        except CAError as exc:
            self._event(f"mesh CA: {exc}", error=True)
            return False
        except OSError as exc:
            self._event(f"cannot issue the workload certificates in {ident.dir}: {exc.strerror or exc}", error=True)
            return False
        self._event(f"issued {len(ident.replicas)} workload certificates ({ident.trust_domain}, valid "
                    f"{ident.cert_ttl_s:g}s) in {(time.monotonic() - t0) * 1000:.0f} ms")
        return True

    def request_stop(self, force: bool = False) -> None:
        self._force = self._force or force
        self._stop.set()
        self._pulse.fire()  # `up -d` waiting for the mesh to settle hears it at once

    # -- run --------------------------------------------------------------------
    async def run(self) -> int:
        self.state.create()
        left = reap_record(self.state)
        if left:
            self._event(f"cleaned up {left} processes left by a previous supervisor")
        for d in self.plan.dirs:
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state.root / "admin", 0o700)  # the sidecars' admin sockets: the owner only
        for path, text in self.plan.files.items():
            write_atomic(path, text)
        self._start_reaper()
        self._write_record()
        runner = None
        try:
            if self._start_identity() and await self._start_forwarders():
                # Processes first (their spawns run at the first await), control socket second.
                self._start_processes()
                runner = await serve(self, self.state.control_socket)
                await self._stop.wait()
            else:
                self.exit_code = 1
        finally:
            await self._shutdown()
            if runner is not None:
                await runner.cleanup()
            self.state.control_socket.unlink(missing_ok=True)
        return self.exit_code

    def _start_reaper(self) -> None:
        """Start the reaper and watch it: if it dies, a new one gets the current process groups."""
        self._reaper = subprocess.Popen(
            [sys.executable, "-m", "meshctl.supervisor.reaper", self.run_id], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(self._reaper.pid)
        reaper = self._reaper

        def gone() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            reaper.wait()
            if self._stop.is_set() or self._reaper is not reaper:
                return
            self._event("the reaper died; starting a new one", error=True)
            self._start_reaper()
            for proc in self.processes:
                if self._reported_pgids.get(proc.key) is not None:
                    self._tell_reaper(f"+{self._reported_pgids[proc.key]} {proc.create_time}")

        loop.add_reader(pidfd, gone)

    async def _start_forwarders(self) -> bool:
        for pod in self.plan.pods.values():
            for pub in pod.publish:
                fwd = Forwarder(pub.host_ip, pub.host_port, pub.pod_port, self._targets_of(pod.name))
                try:
                    await fwd.start()
                except OSError as exc:
                    msg = (f"{self.plan.source}:{pub.line}: cannot publish {pub.host_ip}:{pub.host_port} "
                           f"for pod '{pod.name}': {exc.strerror or exc}")
                    self._event(msg, error=True)
                    return False
                self.forwarders.append(fwd)
                self._forwarder_pods.append((pod.name, fwd))
        return True

    def _targets_of(self, pod: str) -> Callable[[], tuple[list[str], list[str]]]:
        def targets() -> tuple[list[str], list[str]]:
            procs = [p for p in self.processes if p.plan.replica.pod == pod]
            ready = sorted({p.plan.replica.ip for p in procs if p.ready}
                           - {p.plan.replica.ip for p in procs if not p.ready})
            return ready, [r.ip for r in self.plan.pods[pod].replicas]
        return targets

    def _start_processes(self) -> None:
        sidecars: dict[str, ManagedProcess] = {}
        for plan in self.plan.processes:
            log = RotatingLog(self.state.log_path(plan.replica.name, plan.role))
            after = sidecars.get(plan.replica.name) if plan.role == "service" else None
            proc = ManagedProcess(plan, log, self._on_line, self._on_event, self._on_change, after=after,
                                  pacer=self.pacer, starts=self.starts)
            if plan.role == "sidecar":
                sidecars[plan.replica.name] = proc
            if self.printer is not None:
                self.printer.register(proc.key)
            self.processes.append(proc)
        # depends_on: a dependent pod's first process waits; every change of any process re-checks.
        depends_on = {name: pod.depends_on for name, pod in self.plan.pods.items() if pod.depends_on}
        by_key = {p.key: p for p in self.processes}
        for key, gate in gates(depends_on, self.processes, self._pulse).items():
            by_key[key].gate = gate
        for proc in self.processes:
            proc.start()

    async def _shutdown(self) -> None:
        self.starts.close()
        if self.rotation is not None:
            self.rotation.stop()
        if self.processes:
            self._event("stopping" + (" (forced)" if self._force else ""))
        for fwd in self.forwarders:
            await fwd.close()
        grace = 0.0 if self._force else None
        stops = [asyncio.ensure_future(p.stop(grace, final=True)) for p in self.processes]
        if stops:
            done, pending = await asyncio.wait(stops, timeout=None if not self._force else 5)
            for t in pending:
                t.cancel()
        # Daemonised descendants are in no process group we know: find them by the run's marker.
        await asyncio.get_running_loop().run_in_executor(None, kill_run, set(), self.run_id, 1.0)
        for p in self.processes:
            p.log.close()
        self._write_record()
        self._tell_reaper("bye")
        if self._reaper is not None:
            if self._reaper.stdin is not None:
                self._reaper.stdin.close()
            try:
                self._reaper.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._reaper.kill()
        rec = self.state.read_record() or {}
        rec.pop("supervisor", None)
        rec["processes"] = []
        self.state.write_record(rec)
        if self.processes:
            self._event(f"stopped {len(self.processes)} processes")

    def force_now(self) -> None:
        """Second Ctrl-C: do not wait for grace periods."""
        self._force = True
        for p in self.processes:
            if p.pid is not None and p.is_alive():
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        self._stop.set()
        self._pulse.fire()
