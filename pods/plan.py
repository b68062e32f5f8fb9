"""The mesh plan: everything a mesh will run, computed before anything starts.

``plan_mesh`` turns a validated topology and a few facts about the host into
one complete, inert ``MeshPlan``: every replica's alias and hosts file, every
process's argv/env/cwd/probe, the compiled sidecar configurations, the
Prometheus scrape config, and the problems found on the way (``FILE:LINE``).
The supervisor executes a plan without re-reading the YAML; every other
command asks the running supervisor, which serves the plan's facts.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pods.identity import IdentityPlan, identity_files, needs_identities, plan_identities, sidecar_args
from pods.prometheus import CONFIG_FILE as PROMETHEUS_CONFIG
from pods.prometheus import POD_NAME as PROMETHEUS_POD
from pods.prometheus import scrape_config, with_prometheus
from pods.replica import PYTHON_ALIASES, ProcessPlan, Replica, ReplicaLayout, SidecarLaunch, assign_replicas
from pods.sidecars import PROBE_IP, compile_sidecars, compile_source, envoy_bootstrap, envoy_sds_files
from pods.source import Problem
from pods.topology import Dependency, MetricsSpec, PodSpec, PrometheusSpec, PublishSpec, Topology, TracingSpec
from pods.tracing import POD_NAME as TRACING_POD
from pods.tracing import TracingPlan, tracing_plan, with_tracing

if TYPE_CHECKING:  # the sidecar's model is imported only where a mesh has sidecars (see pods/sidecars.py)
    from sidecar.config import Bootstrap

#: The seed's and HTTP's default: a pod that declares no port is taken to serve on 80.
DEFAULT_POD_PORT = 80


@dataclass(frozen=True)
class HostFacts:
    """What the plan needs to know about the machine and the caller; read by the CLI, never here."""

    environ: Mapping[str, str]
    #: Aliases each running mesh holds (a mesh's own are free to it again), and loopback addresses
    #: something listens on: new aliases avoid them.
    mesh_aliases: Mapping[str, frozenset[str]] = field(default_factory=dict)
    listening_aliases: frozenset[str] = frozenset()

    def taken_aliases(self, mesh: str) -> set[str]:
        taken = set(self.listening_aliases)
        for other, aliases in self.mesh_aliases.items():
            if other != mesh:
                taken |= aliases
        return taken
    unprivileged_port_start: int = 1024
    can_bind_privileged: bool = True
    #: Why pods cannot have their own /etc/hosts here (a private mount namespace), or None when they can.
    pod_hosts_problem: str | None = None
    #: `up` starts the rest of a mesh when a pod's program is missing (a warning); `validate` refuses it.
    start_despite_missing_commands: bool = False
    #: The real Envoy binary (``pods.sidecars.find_envoy``), for sidecars on engine envoy; None: not installed.
    envoy_bin: str | None = None


@dataclass(frozen=True)
class PodPlan:
    name: str
    replicas: tuple[Replica, ...]
    #: Where the pod takes traffic on its alias: its sidecar's ingress listener, else its service port.
    port: int
    sidecar: SidecarLaunch | None
    metrics: MetricsSpec | None
    publish: tuple[PublishSpec, ...]
    #: Ports the pod's service listens on, as far as the topology says (``*_PORT`` env, probe, metrics).
    service_ports: tuple[int, ...]
    line: int
    #: The pod's effective mTLS mode (``off`` without a sidecar).
    mtls: str = "off"
    #: Pods this one starts after (``depends_on``).
    depends_on: tuple[Dependency, ...] = ()

    def describe(self, admin_sockets: Mapping[str, Path], hosts_mode: str) -> dict[str, Any]:
        """The pod as the control API reports it (``GET /v1/status``)."""
        sidecar = None
        if self.sidecar is not None:
            s = self.sidecar
            sidecar = {"engine": s.engine, "admin_port": s.admin_port, "listener_ports": list(s.listener_ports),
                       "egress_port": s.egress_port, "ingress_stat_prefixes": list(s.ingress_stat_prefixes),
                       "egress_clusters": list(s.egress_clusters)}
        return {
            "pod": self.name,
            "port": self.port,
            "replicas": [{"replica": r.name, "ip": r.ip,
                          "sidecar_admin": (f"{r.ip}:{self.sidecar.admin_port}"
                                            if self.sidecar is not None and self.sidecar.admin_port else None),
                          "admin_socket": str(admin_sockets[r.name]) if r.name in admin_sockets else None}
                         for r in self.replicas],
            "sidecar": sidecar,
            "mtls": self.mtls,
            "hosts_mode": hosts_mode,
            "metrics": None if self.metrics is None else {"port": self.metrics.port, "path": self.metrics.path},
            "publish": [{"host": f"{p.host_ip}:{p.host_port}", "pod_port": p.pod_port} for p in self.publish],
            "depends_on": [{"pod": d.pod, "condition": d.condition} for d in self.depends_on],
        }


@dataclass(frozen=True)
class MeshPlan:
    mesh: str
    source: Path
    state_root: Path
    run_id: str
    pods: dict[str, PodPlan]
    #: Sidecar before service in each replica: the service starts once its sidecar is ready.
    processes: tuple[ProcessPlan, ...]
    #: Written (atomically) before anything starts: hosts files, sidecar configs, the scrape config.
    files: dict[Path, str]
    hosts_files: dict[str, Path]
    admin_sockets: dict[str, Path]
    dirs: tuple[Path, ...]
    #: "mount": each process sees its replica's hosts file as /etc/hosts; "env": only through MESH_HOSTS.
    hosts_mode: str = "mount"
    #: Processes whose program was not found: planned (and reported) but they cannot start.
    unstartable: frozenset[str] = frozenset()
    #: The Prometheus scrape config for this mesh (written for its Prometheus pod when it has one).
    prometheus_config: str = ""
    problems: tuple[Problem, ...] = field(default=())
    #: Who is who in the mesh's mTLS (None: nothing uses it, and no CA is created).
    identity: IdentityPlan | None = None
    #: Where the mesh's trace collector is (None: the mesh is not traced).
    tracing: TracingPlan | None = None

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity != "error"]

    def replicas(self) -> list[Replica]:
        return [r for pod in self.pods.values() for r in pod.replicas]

    def find(self, name: str) -> list[Replica]:
        """Replicas named by ``name``: a pod name (all replicas) or a replica name (b-1)."""
        if name in self.pods:
            return list(self.pods[name].replicas)
        return [r for r in self.replicas() if r.name == name]

    def hosts_text(self, replica: Replica) -> str:
        return self.files[self.hosts_files[replica.name]]

    def process_ports(self, proc: ProcessPlan) -> list[int]:
        """The ports a process listens on, on its replica's alias, as far as the plan knows."""
        pod = self.pods[proc.replica.pod]
        if proc.role == "sidecar":
            assert pod.sidecar is not None
            return sorted({*pod.sidecar.listener_ports, *([pod.sidecar.admin_port] if pod.sidecar.admin_port else [])})
        return list(pod.service_ports)

    def process_engine(self, proc: ProcessPlan) -> str | None:
        """A sidecar's engine ("meshctl" or "envoy"); None for a service."""
        sidecar = self.pods[proc.replica.pod].sidecar
        return sidecar.engine if proc.role == "sidecar" and sidecar is not None else None

    def describe(self) -> list[dict[str, Any]]:
        return [pod.describe(self.admin_sockets, self.hosts_mode) for pod in self.pods.values()]

    def envoy_bootstrap(self, pod: str) -> str:
        """The real Envoy's v3 bootstrap for replica 0 of ``pod``: what engine envoy runs there, whichever
        engine this plan chose (other replicas differ only in their alias and admin socket).

        Raises KeyError (no such pod, or no sidecar) or ConfigError.
        """
        launch = self.pods[pod].sidecar
        if launch is None:
            raise KeyError(pod)
        replica = self.pods[pod].replicas[0]
        ident = self.identity.replicas.get(replica.name) if self.identity is not None else None
        return envoy_bootstrap(launch, replica, self.mesh, self.admin_sockets[replica.name],
                               ident.identity if ident is not None else None,
                               tracing=self.tracing.mesh_tracing(pod) if self.tracing is not None else None)


def plan_mesh(topology: Topology, state_root: Path, facts: HostFacts, prometheus: PrometheusSpec | None = None,
              run_id: str | None = None, sidecar_engine: str | None = None,
              tracing: TracingSpec | None = None) -> MeshPlan:
    """Everything ``topology`` will run, with the problems found; starts nothing, writes nothing.

    ``prometheus`` overrides the topology's own section (``up --prometheus``), ``tracing`` its tracing section
    (``up --tracing``); ``sidecar_engine`` every pod's sidecar engine (``up --sidecar-engine``).
    """
    run_id = run_id or uuid.uuid4().hex
    problems: list[Problem] = list(topology.warnings)
    path = str(topology.path)
    spec = prometheus or topology.prometheus
    topology = replace(topology, prometheus=None)
    dirs: list[Path] = [state_root / "hosts", state_root / "admin"]
    # Without the binary the mesh runs without Prometheus, but its scrape config is still planned
    # (``meshctl prometheus-config`` serves users who run their own server).
    without: set[str] = set()
    if spec is not None:
        found = shutil.which(spec.bin, path=facts.environ.get("PATH"))
        if found is None:
            problems.append(Problem(path, spec.line, f"prometheus: '{spec.bin}' not found; install it "
                                    "(apt-get install prometheus) or pass --prometheus-bin PATH. "
                                    "Starting the mesh without it.", "warning"))
            without.add(PROMETHEUS_POD)
        try:
            topology = with_prometheus(topology, replace(spec, bin=found or spec.bin), state_root / "prometheus")
        except ValueError as exc:
            problems.append(Problem(path, spec.line, f"prometheus: {exc}"))
            without.discard(PROMETHEUS_POD)
        else:
            dirs.append(state_root / "prometheus" / "data")
    tracing_spec = tracing or topology.tracing
    topology = replace(topology, tracing=None)
    if tracing_spec is not None:
        try:
            topology = with_tracing(topology, tracing_spec)
        except ValueError as exc:
            problems.append(Problem(path, tracing_spec.line, f"tracing: {exc}"))
            tracing_spec = None
    compiled = compile_sidecars(topology, state_root / "sidecar", sidecar_engine, facts.envoy_bin)
    problems.extend(compiled.problems)
    layout = ReplicaLayout(topology=topology, replicas=assign_replicas(topology, facts.taken_aliases(topology.name)),
                           hosts_dir=state_root / "hosts", run_id=run_id, base_env=dict(facts.environ),
                           sidecars=compiled.launches, admin_dir=state_root / "admin",
                           sidecar_dir=state_root / "sidecar")
    identity = None
    if needs_identities(layout):  # a mesh without mTLS pays nothing more than this check
        identity = plan_identities(layout, state_root, _probe_boots(layout), problems)
    if identity is not None:
        layout.sidecar_extra_args = {r.replica: sidecar_args(layout.sidecars[r.pod], r)
                                     for r in identity.replicas.values()}
        compiled.files.update(identity_files(identity))
        dirs.extend(r.dir for r in identity.replicas.values())
    traced = None
    if tracing_spec is not None:
        traced = _plan_tracing(layout, tracing_spec, problems)
    envoy_files = _envoy_files(layout, problems, identity, traced)
    compiled.files.update(envoy_files)
    dirs.extend(sorted({p.parent for p in envoy_files} - {state_root / "sidecar"}))  # the SDS directories
    if compiled.files:
        dirs.append(state_root / "sidecar")
    # Planned for every mesh: users who run their own Prometheus ask for it (`meshctl prometheus-config`).
    prometheus_config = scrape_config(layout)
    if without:
        topology = replace(topology, pods={k: v for k, v in topology.pods.items() if k not in without})
        layout = replace(layout, topology=topology,
                         replicas={k: v for k, v in layout.replicas.items() if k not in without})
        dirs.remove(state_root / "prometheus" / "data")
    hosts_mode = "mount" if facts.pod_hosts_problem is None else "env"
    if hosts_mode == "env":
        problems.append(Problem(path, 0, f"pods cannot have their own /etc/hosts here ({facts.pod_hosts_problem}); "
                                "mesh names resolve only through MESH_HOSTS (meshctl's own services and "
                                "sidecars), not for other programs", "warning"))
        for name, launch in compiled.launches.items():
            if launch.engine == "envoy":  # the real Envoy resolves with getaddrinfo: /etc/hosts, never MESH_HOSTS
                problems.append(Problem(path, topology.pods[name].sidecar_line,
                                        f"pod '{name}' sidecar: the real Envoy resolves names through /etc/hosts, "
                                        "which here is the host's: its clusters reach mesh names only by IP",
                                        "warning"))
    severity = "warning" if facts.start_despite_missing_commands else "error"
    missing: set[str] = set()
    processes = [_resolve_command(p, topology, problems, severity, missing) for p in layout.process_plans()]
    if hosts_mode == "mount":
        processes = [replace(p, hosts_file=layout.hosts_path(p.replica)) for p in processes]
    files: dict[Path, str] = {}
    hosts_files: dict[str, Path] = {}
    for replica in layout.all_replicas():
        hosts_files[replica.name] = layout.hosts_path(replica)
        files[layout.hosts_path(replica)] = layout.hosts_text(replica)
    files.update(compiled.files)
    if PROMETHEUS_POD in topology.pods:
        files[state_root / "prometheus" / PROMETHEUS_CONFIG] = prometheus_config
    if not facts.can_bind_privileged:
        problems.extend(_privileged_ports(topology, compiled.launches, facts.unprivileged_port_start))
    pods = {name: PodPlan(name=name, replicas=tuple(layout.replicas[name]),
                          port=pod_port(spec_, compiled.launches.get(name)), sidecar=compiled.launches.get(name),
                          metrics=spec_.metrics, publish=spec_.publish, line=spec_.line,
                          service_ports=service_ports(spec_, compiled.launches.get(name)),
                          mtls=topology.pod_mtls(name), depends_on=spec_.depends_on)
            for name, spec_ in topology.pods.items()}
    admin_sockets = {r.name: layout.admin_socket(r) for r in layout.all_replicas() if r.pod in compiled.launches}
    return MeshPlan(mesh=topology.name, source=topology.path, state_root=state_root, run_id=run_id, pods=pods,
                    processes=tuple(processes), files=files, hosts_files=hosts_files, admin_sockets=admin_sockets,
                    dirs=tuple(dirs), prometheus_config=prometheus_config, hosts_mode=hosts_mode,
                    unstartable=frozenset(missing), identity=identity, tracing=traced,
                    problems=tuple(sorted(problems, key=lambda p: (p.line, p.message))))


def _probe_boots(layout: ReplicaLayout) -> dict[str, Bootstrap]:
    """Each sidecar's model compiled once, for the stand-in alias (compile errors were reported already)."""
    from sidecar.config import ConfigError

    boots = {}
    for name, launch in layout.sidecars.items():
        try:
            mtls = layout.topology.pod_mtls(name)
            boots[name] = compile_source(launch.source, PROBE_IP, launch.public_admin,
                                         layout.mesh if mtls != "off" else None)
        except ConfigError:
            continue
    return boots


def _plan_tracing(layout: ReplicaLayout, spec: TracingSpec, problems: list[Problem]) -> TracingPlan:
    """The collector's address, given to every process (env) and every sidecar (argv, or the real Envoy's
    bootstrap); a sidecar whose configuration cannot take the mesh's tracer is a problem at its line."""
    from sidecar.config import ConfigError
    from sidecar.mesh_tracing import apply_tracing

    traced = tracing_plan(spec, layout.replicas[TRACING_POD][0].ip)
    layout.mesh_env = traced.mesh_env()
    layout.direct_hosts = (traced.ip,)
    topology = layout.topology
    for name, launch in layout.sidecars.items():
        try:
            # Compiled for the stand-in alias: whether apply_tracing takes the model does not depend on it.
            apply_tracing(compile_source(launch.source, PROBE_IP, launch.public_admin), traced.mesh_tracing(name))
        except ConfigError as exc:
            problems.append(Problem(str(topology.path), topology.pods[name].sidecar_line,
                                    f"pod '{name}' sidecar: tracing: {exc}"))
            continue
        if launch.engine != "meshctl":
            continue  # the real Envoy gets it in its exported bootstrap
        for replica in layout.replicas.get(name, []):
            layout.sidecar_extra_args[replica.name] = (*layout.sidecar_extra_args.get(replica.name, ()),
                                                      *traced.sidecar_args(name))
    return traced


def _envoy_files(layout: ReplicaLayout, problems: list[Problem], identity: IdentityPlan | None,
                 tracing: TracingPlan | None = None) -> dict[Path, str]:
    """The bootstrap of every replica whose sidecar is the real Envoy: its alias, its admin socket, its
    mesh identity (certificate files read from ``current``, so a rotation is a symlink swap for it too) and
    the mesh's tracer."""
    files: dict[Path, str] = {}
    topology = layout.topology
    for name, launch in layout.sidecars.items():
        if launch.engine != "envoy":
            continue
        from sidecar.config import ConfigError

        for replica in layout.replicas.get(name, []):
            ident = identity.replicas.get(replica.name) if identity is not None else None
            mesh_ident = ident.identity if ident else None
            # Certificates through SDS files beside the bootstrap: the real Envoy reloads them on rotation.
            sds_dir = layout.sidecar_dir / f"{replica.name}.sds" if layout.sidecar_dir is not None else None
            traced = tracing.mesh_tracing(name) if tracing is not None else None
            try:
                files[layout.envoy_config(replica)] = envoy_bootstrap(launch, replica, layout.mesh,
                                                                      layout.admin_socket(replica), mesh_ident,
                                                                      sds_dir, traced)
                if sds_dir is not None:
                    rotated = ({os.path.dirname(mesh_ident.cert): str(ident.dir)}
                               if ident is not None and mesh_ident is not None else {})
                    files.update(envoy_sds_files(launch, replica, layout.mesh, mesh_ident, sds_dir, rotated,
                                                 traced))
            except ConfigError as exc:
                problems.append(Problem(str(topology.path), topology.pods[name].sidecar_line,
                                        f"pod '{name}' sidecar: {exc}"))
                break
    return files


def _resolve_command(proc: ProcessPlan, topology: Topology, problems: list[Problem], severity: str,
                     missing: set[str]) -> ProcessPlan:
    """argv[0] as the absolute program the process will run, found with the PATH it will have.

    Resolving here makes ``validate`` and the start agree: the program checked is the program run.
    """
    prog = proc.argv[0] if proc.argv else ""
    if not prog or prog in PYTHON_ALIASES or "${" in prog:
        return proc
    if "/" in prog:
        candidate = prog if os.path.isabs(prog) else str(proc.cwd / prog)
        found = candidate if os.access(candidate, os.X_OK) and os.path.isfile(candidate) else None
    else:
        found = shutil.which(prog, path=proc.env.get("PATH", os.defpath))
    if found is None:
        missing.add(proc.key)
        pod = topology.pods[proc.replica.pod]
        line = pod.service.command_line or pod.service.line if proc.role == "service" else proc.line
        message = f"pod '{proc.replica.pod}': command '{prog}' not found" + (
            "" if "/" in prog else f" on PATH={proc.env.get('PATH', os.defpath)}")
        if severity == "warning":
            message += "; the pod will not start, the rest of the mesh will"
        problem = Problem(str(topology.path), line, message, severity)
        if problem not in problems:
            problems.append(problem)
        return proc
    return replace(proc, argv=(found, *proc.argv[1:]))


def _privileged_ports(topology: Topology, launches: Mapping[str, SidecarLaunch], limit: int) -> list[Problem]:
    out = []
    for pod in topology.pods.values():
        ports = set(_pod_ports(pod))
        launch = launches.get(pod.name)
        if launch is not None:
            ports.update((p, pod.sidecar_line) for p in (*launch.listener_ports, launch.admin_port) if p)
        for port, line in sorted(ports):
            if port < limit:
                out.append(Problem(str(topology.path), line,
                                   f"pod '{pod.name}' uses port {port}, which needs root here (unprivileged ports "
                                   f"start at {limit}); run as root or choose ports >= {limit}"))
                break
    return out


def _pod_ports(pod: PodSpec) -> list[tuple[int, int]]:
    """(port, line) pairs the pod listens on or publishes."""
    out = [(c.port, c.line) for c in pod.port_claims()]
    if pod.service.ready is not None and pod.service.ready.port:
        out.append((pod.service.ready.port, pod.service.ready.line))
    for p in pod.publish:
        out.append((p.pod_port, p.line))
        out.append((p.host_port, p.line))
    return out


def declared_ports(spec: PodSpec) -> set[int]:
    """Ports the topology says the pod's service listens on: ``*_PORT`` env, probe, metrics."""
    ports = {c.port for c in spec.port_claims()}
    if spec.service.ready is not None and spec.service.ready.port:
        ports.add(spec.service.ready.port)
    if spec.metrics is not None:
        ports.add(spec.metrics.port)
    return ports


def service_ports(spec: PodSpec, launch: SidecarLaunch | None) -> tuple[int, ...]:
    """``declared_ports``, and the pod's port when no sidecar fronts it (80 when nothing says otherwise:
    where `meshctl traffic` sends requests)."""
    ports = declared_ports(spec)
    if launch is None:
        ports.add(pod_port(spec, None))
    return tuple(sorted(ports))


def pod_port(spec: PodSpec, launch: SidecarLaunch | None) -> int:
    """Where the pod takes traffic: its sidecar's first ingress listener, else its probe's or service port."""
    if launch is not None:
        ingress = [p for p in launch.listener_ports if p != launch.egress_port]
        if ingress:
            return ingress[0]
    if spec.service.ready is not None and spec.service.ready.port:
        return spec.service.ready.port
    try:
        return int(spec.service.env.get("SERVICE_PORT", DEFAULT_POD_PORT) or DEFAULT_POD_PORT)
    except ValueError:
        return DEFAULT_POD_PORT
