"""What each pod replica runs: its alias, its hosts file, its process plans.

This is still the model: it says *what* to start (argv, env, probe, policy),
never starts anything. ``pods.plan`` assembles these into the mesh plan that
the supervisor in ``meshctl/`` executes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pods.addressing import allocate
from pods.hosts import HostEntry, render_hosts
from pods.loopback import expand_placeholders, localize
from pods.markers import MARKER_ENV, PROCESS_ENV
from pods.topology import ProcessSpec, ReadyProbe, Topology

#: ``python`` in a command means meshctl's own interpreter, so demo services
#: find the packages meshctl was installed with (no venv activation needed).
PYTHON_ALIASES = ("python", "python3")


@dataclass(frozen=True)
class Replica:
    pod: str
    index: int
    ip: str

    @property
    def name(self) -> str:
        return f"{self.pod}-{self.index}"


@dataclass(frozen=True)
class ProcessPlan:
    replica: Replica
    role: str  # "service" | "sidecar"
    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: Path
    ready: ReadyProbe | None
    restart: str
    stop_grace_s: float
    line: int = 0
    #: Bound over /etc/hosts in the process's own mount namespace (None: the host's /etc/hosts, and
    #: mesh names only through MESH_HOSTS).
    hosts_file: Path | None = None

    @property
    def key(self) -> str:
        return f"{self.replica.name}/{self.role}"


@dataclass(frozen=True)
class SidecarLaunch:
    """How a pod's sidecar starts; compiled by meshctl from the pod's ``sidecar:`` section."""

    args: tuple[str, ...]  # after ``python -m sidecar``
    admin_port: int | None
    listener_ports: tuple[int, ...]
    egress_port: int | None
    #: For ``meshctl stats``: which HTTP stat prefixes measure inbound traffic, which clusters are edges.
    ingress_stat_prefixes: tuple[str, ...] = ()
    egress_clusters: tuple[str, ...] = ()
    #: "meshctl" (``python -m sidecar``) or "envoy" (the real Envoy, ``program``, on an exported bootstrap).
    engine: str = "meshctl"
    program: str = ""
    concurrency: int = 1
    #: What the configuration was written as, to compile it again for each replica's alias (the Envoy
    #: export): ("envoy", absolute path of the file) or ("short", the short form as JSON).
    source: tuple[str, str] = ("", "")
    public_admin: bool = False


@dataclass
class ReplicaLayout:
    """A topology with addresses assigned: every replica's names and processes."""

    topology: Topology
    replicas: dict[str, list[Replica]]
    hosts_dir: Path
    run_id: str = ""
    #: The environment every process starts from (the caller's), under the mesh's and the pod's own.
    base_env: Mapping[str, str] = field(default_factory=dict)
    sidecars: dict[str, SidecarLaunch] = field(default_factory=dict)
    #: Where each replica's sidecar serves its admin's mutating endpoints (a 0600 unix socket).
    admin_dir: Path | None = None
    #: Where each replica's exported Envoy bootstrap is written (pods whose sidecar engine is envoy).
    sidecar_dir: Path | None = None
    #: Extra arguments of each replica's sidecar (ours): ``--mesh-identity FILE`` for a meshed replica.
    sidecar_extra_args: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: Variables the mesh gives every process (the tracing endpoint), under the pod's own ``env``.
    mesh_env: dict[str, str] = field(default_factory=dict)
    #: Addresses a service reaches directly, never through its sidecar's egress (the tracing collector).
    direct_hosts: tuple[str, ...] = ()

    @property
    def mesh(self) -> str:
        return self.topology.name

    def all_replicas(self) -> list[Replica]:
        return [r for reps in self.replicas.values() for r in reps]

    def find(self, name: str) -> list[Replica]:
        """Replicas named by ``name``: a pod name (all replicas) or a replica name (b-1)."""
        if name in self.replicas:
            return list(self.replicas[name])
        return [r for r in self.all_replicas() if r.name == name]

    def hosts_path(self, replica: Replica) -> Path:
        return self.hosts_dir / f"{replica.name}.hosts"

    def hosts_entries(self, replica: Replica) -> list[HostEntry]:
        """The replica's view of names: itself (as localhost too), every pod, its add_hosts."""
        spec = self.topology.pods[replica.pod]
        entries = [HostEntry(replica.ip, ("localhost", replica.name, replica.pod))]
        for reps in self.replicas.values():
            for other in reps:
                if other == replica:
                    continue
                entries.append(HostEntry(other.ip, (other.name, other.pod)))
        for host, value in spec.add_hosts:
            for ip in self.resolve_add_host(value, replica):
                entries.append(HostEntry(ip, (host,)))
        return entries

    def resolve_add_host(self, value: str, replica: Replica) -> list[str]:
        """An add_hosts value as addresses: a pod name means all its replicas."""
        if value in self.replicas:
            return [r.ip for r in self.replicas[value]]
        return [localize(value, replica.ip)]

    def hosts_text(self, replica: Replica) -> str:
        header = (f"meshctl hosts for {replica.name} (mesh {self.mesh}); "
                  "inside the pod, localhost is the pod's alias")
        return render_hosts(self.hosts_entries(replica), header=header)

    def service_plan(self, replica: Replica) -> ProcessPlan:
        spec = self.topology.pods[replica.pod]
        extra: dict[str, str] = {}
        launch = self.sidecars.get(replica.pod)
        if launch is not None and launch.egress_port is not None:
            # Services that honour the standard proxy variables reach the mesh through the egress
            # listener without code changes; pod-local names stay direct.
            proxy = f"http://{replica.ip}:{launch.egress_port}"
            no_proxy = ",".join(("localhost", "127.0.0.1", replica.ip, replica.name, *self.direct_hosts))
            for name in ("HTTP_PROXY", "http_proxy"):
                if name not in spec.service.env:
                    extra[name] = proxy
            for name in ("NO_PROXY", "no_proxy"):
                if name not in spec.service.env:
                    extra[name] = no_proxy
        return self.process_plan(replica, "service", spec.service, extra)

    def sidecar_plan(self, replica: Replica) -> ProcessPlan | None:
        spec = self.topology.pods[replica.pod]
        launch = self.sidecars.get(replica.pod)
        if launch is None:
            return None
        if launch.admin_port is not None:
            ready = ReadyProbe("http", port=launch.admin_port, path="/ready", line=spec.sidecar_line)
        else:
            ready = ReadyProbe("tcp", port=launch.listener_ports[0], line=spec.sidecar_line)
        if launch.engine == "envoy":
            # Hot restart is a restart without a stop, which the supervisor never does: disabling it means no
            # shared memory or abstract sockets (--base-id) that could clash between replicas, meshes, tests.
            command: tuple[str, ...] = (launch.program, "-c", str(self.envoy_config(replica)),
                                        "--concurrency", str(launch.concurrency), "--log-level", "warn",
                                        "--disable-hot-restart")
        else:
            admin = ("--admin-socket", str(self.admin_socket(replica))) if self.admin_dir is not None else ()
            command = ("python", "-m", "sidecar", *launch.args, "--pod-ip", "${POD_IP}", *admin,
                       *self.sidecar_extra_args.get(replica.name, ()))
        proc = ProcessSpec(command=command, env={}, ready=ready, restart="always",
                           stop_grace_s=spec.service.stop_grace_s, workdir=spec.service.workdir, line=spec.sidecar_line)
        return self.process_plan(replica, "sidecar", proc)

    def admin_socket(self, replica: Replica) -> Path:
        assert self.admin_dir is not None
        return self.admin_dir / f"{replica.name}.sock"

    def envoy_config(self, replica: Replica) -> Path:
        assert self.sidecar_dir is not None
        return self.sidecar_dir / f"{replica.name}.envoy.yaml"

    def process_plan(self, replica: Replica, role: str, proc: ProcessSpec,
                     extra_env: Mapping[str, str] | None = None) -> ProcessPlan:
        """Apply pod-local loopback and placeholders to one process of a replica.

        The environment is layered like a shell's: the caller's (PATH, HOME, LANG...), then the
        mesh's (POD_IP, the run marker, the sidecar's proxy), then the pod's own ``env``.
        """
        values = {"POD_IP": replica.ip, "POD_NAME": replica.pod, "REPLICA": str(replica.index),
                  "MESH": self.mesh}

        def render(value: str) -> str:
            return localize(expand_placeholders(value, values), replica.ip)

        argv = [render(a) for a in proc.command]
        if argv and argv[0] in PYTHON_ALIASES:
            argv[0] = sys.executable
        env = dict(self.base_env)
        env.update({
            "POD_NAME": replica.pod,
            "POD_IP": replica.ip,
            "POD_REPLICA": str(replica.index),
            "REPLICA_NAME": replica.name,
            "MESH_NAME": self.mesh,
            "MESH_HOSTS": str(self.hosts_path(replica)),
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.mesh_env)
        env.pop(MARKER_ENV, None)  # a meshctl run from inside a pod must not mark its mesh as ours
        env.pop(PROCESS_ENV, None)
        if self.run_id:
            env[MARKER_ENV] = self.run_id
            env[PROCESS_ENV] = f"{replica.name}/{role}"
        if extra_env:
            env.update(extra_env)
        env.update({k: render(v) for k, v in proc.env.items()})
        return ProcessPlan(replica=replica, role=role, argv=tuple(argv), env=env, cwd=proc.workdir,
                           ready=proc.ready, restart=proc.restart, stop_grace_s=proc.stop_grace_s,
                           line=proc.line)

    def process_plans(self) -> list[ProcessPlan]:
        """Sidecar before service in each replica: the service starts once its sidecar is ready."""
        out = []
        for r in self.all_replicas():
            sidecar = self.sidecar_plan(r)
            if sidecar is not None:
                out.append(sidecar)
            out.append(self.service_plan(r))
        return out



def assign_replicas(topology: Topology, taken: Iterable[str] = ()) -> dict[str, list[Replica]]:
    """Every pod's replicas on aliases that avoid ``taken``."""
    aliases = allocate({name: (pod.ip, pod.replicas) for name, pod in topology.pods.items()}, taken)
    return {name: [Replica(name, i, ip) for i, ip in enumerate(aliases[name])] for name in topology.pods}
