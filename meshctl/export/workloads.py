"""What each pod of a topology becomes on Kubernetes: the facts both exports (kube, istio) render.

Pure, like the mesh plan: it reads the validated topology and the compiled sidecar models, and writes,
starts and resolves nothing. Translating meshctl's pod semantics to a Kubernetes pod's:

* a pod is a Deployment (its replicas) behind a Service named after it; the Service name is what other pods
  call it by, so a host name that means a pod here (the pod's name, an ``add_hosts`` entry naming it, the
  fixed ``ip:`` of a pod) becomes that Service name in env values, arguments and sidecar cluster addresses;
* ``add_hosts`` entries with an address become ``hostAliases`` (podman's ``--add-host`` and Kubernetes'
  field are the same idea); pod-local ``localhost`` stays what it is, since a Kubernetes pod has its own
  loopback, which is exactly what meshctl's pod alias emulates;
* the per-replica placeholders: ``${POD_IP}`` is the downward API's ``status.podIP``, ``${POD_NAME}`` the pod
  (Service) name, ``${MESH}`` the mesh name and ``${REPLICA}`` (an index, which a Deployment has not) the
  Kubernetes pod's own name, with a warning.

Everything the topology says that Kubernetes cannot is one warning naming the field (``FILE:LINE``); a
topology that cannot be exported at all (no image, names Kubernetes refuses) is an ``ExportError``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from meshctl.export.kube_envoy import KubeSidecar, sidecar_for_kubernetes
from pods.addressing import is_ip, replica_aliases
from pods.loopback import expand_placeholders
from pods.names import DNS1035_LABEL_RULE, DNS_SUBDOMAIN_RULE, dns1035_label, dns_subdomain
from pods.plan import declared_ports
from pods.sidecars import PROBE_IP, compile_sidecars, compile_source
from pods.source import Problem
from pods.topology import MetricsSpec, PodSpec, PublishSpec, ReadyProbe, Topology
from sidecar.config import ConfigError
from sidecar.routing import RouteTable

__all__ = ["ISTIO", "KUBE", "EnvVar", "ExportError", "ExportPlan", "KubePort", "Workload", "plan_export"]

#: What Kubernetes calls the replica-index placeholder's stand-in (a Deployment's pods have names, no index).
REPLICA_NAME_VAR = "REPLICA_NAME"
KUBE, ISTIO = "kube", "istio"


class ExportError(Exception):
    """The topology cannot be exported: every reason, one line each."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class KubePort:
    """A port of the pod's Service (port = targetPort: the pod listens where meshctl's pod did)."""

    port: int
    #: "http", "grpc", "tcp" or "" (unknown: no appProtocol, Istio sniffs the protocol).
    protocol: str

    @property
    def name(self) -> str:
        """An IANA service name (at most 15 characters); Istio reads the protocol from its prefix."""
        return f"{self.protocol or 'port'}-{self.port}"


@dataclass(frozen=True)
class EnvVar:
    """One container env entry: a value (with Kubernetes' ``$(VAR)`` references) or a downward-API field."""

    name: str
    value: str | None = None
    field_path: str | None = None


@dataclass(frozen=True)
class Workload:
    pod: str
    image: str
    replicas: int
    command: tuple[str, ...]
    env: tuple[EnvVar, ...]
    #: The Service's ports, and which of them the service container (not the sidecar) listens on.
    ports: tuple[KubePort, ...]
    service_ports: tuple[int, ...]
    #: The service's readiness as written (host names already renamed); None: no probe.
    ready: ReadyProbe | None
    #: True when ``ready`` names a port only the pod itself reaches (the service listens on localhost behind its
    #: sidecar): the kubelet cannot probe it; our sidecar's probe listener does, or Istio's agent told to.
    ready_on_localhost: bool
    host_aliases: tuple[tuple[str, tuple[str, ...]], ...]
    publish: tuple[PublishSpec, ...]
    metrics: MetricsSpec | None
    stop_grace_s: float
    sidecar: KubeSidecar | None
    line: int
    #: Istio: {"host:port" the service called its sidecar's egress by: "service:port" it calls instead}.
    egress_calls: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportPlan:
    mesh: str
    source: Path
    topology: Topology
    workloads: dict[str, Workload]
    #: Topology fields Kubernetes has no equivalent for, one warning each (``FILE:LINE: warning: ...``).
    warnings: list[Problem] = field(default_factory=list)

    def warn(self, line: int, message: str) -> None:
        problem = Problem(str(self.source), line, message, "warning")
        if problem not in self.warnings:
            self.warnings.append(problem)


def plan_export(topology: Topology, images: Mapping[str, str], pods: Sequence[str] = (),
                platform: str = KUBE) -> ExportPlan:
    """Every chosen pod (default: all) as a Workload; raises ExportError when the topology cannot be exported.

    ``images``: ``--image POD=IMAGE`` (wins over the pod's ``image:``). ``platform``: KUBE (our sidecars become
    the real Envoy in each pod) or ISTIO (Istio's sidecar intercepts calls itself: a service that called its
    sidecar's egress listener calls the Service that listener routed to, and no proxy variables are set).
    """
    chosen = list(dict.fromkeys(pods)) or list(topology.pods)
    errors: list[str] = []
    path = str(topology.path)
    for name in chosen:
        if not dns1035_label(name):
            errors.append(f"{path}:{topology.pods[name].line}: pod '{name}' cannot be a Kubernetes Service "
                          f"name: a DNS-1035 label is {DNS1035_LABEL_RULE}")
    missing = [name for name in chosen if not (images.get(name) or topology.pods[name].image)]
    if missing:
        errors.append(f"{path}: no container image for pod{'s' if len(missing) > 1 else ''} {', '.join(missing)}: "
                      "add 'image:' to the pod or pass --image POD=IMAGE")
    for name in chosen:
        for host, _ in topology.pods[name].add_hosts:
            if not dns_subdomain(host):
                errors.append(f"{path}:{topology.pods[name].line}: pod '{name}' add_hosts '{host}' cannot be a "
                              f"Kubernetes hostAliases name: a DNS-1123 subdomain is {DNS_SUBDOMAIN_RULE}")
    compiled = compile_sidecars(topology, Path("/nonexistent"))  # only its models are read: nothing is written
    errors.extend(str(p) for p in compiled.problems if p.severity == "error")
    if errors:
        raise ExportError(errors)
    plan = ExportPlan(mesh=topology.name, source=topology.path, topology=topology, workloads={})
    _warn_mesh_fields(plan)
    fixed = _fixed_addresses(topology)
    boots = {}
    for name in chosen:
        launch = compiled.launches.get(name)
        if launch is None:
            continue
        try:
            # As the sidecar compiles it: a meshed pod's short-form `from: [a]` means a's SPIFFE id.
            trust_domain = topology.name if topology.pod_mtls(name) != "off" else None
            boots[name] = compile_source(launch.source, PROBE_IP, launch.public_admin, trust_domain,
                                         live_faults=False)
        except ConfigError as exc:  # compile_sidecars compiled it already: only a file changed in between
            raise ExportError([f"{path}:{topology.pods[name].sidecar_line}: pod '{name}' sidecar: {exc}"]) from None
    sidecars: dict[str, KubeSidecar] = {}
    for name, boot in boots.items():
        spec = topology.pods[name]
        sidecars[name] = sidecar_for_kubernetes(boot, _service_names(spec, topology, fixed), PROBE_IP,
                                                compiled.launches[name].concurrency,
                                                lambda message, line=spec.sidecar_line: plan.warn(line, message),
                                                pod=name, probe=_probe_target(spec, boot))
    # Ports other pods' sidecars call a pod on carry HTTP (our sidecar proxies nothing else).
    http_targets = {(host, port) for s in sidecars.values() for host, port in s.upstreams}
    for name in chosen:
        spec = topology.pods[name]
        plan.workloads[name] = _workload(plan, spec, images.get(name) or spec.image or "", sidecars.get(name),
                                         fixed, http_targets, platform)
    return plan


def _warn_mesh_fields(plan: ExportPlan) -> None:
    topo = plan.topology
    if topo.prometheus is not None:
        plan.warn(topo.prometheus.line, "prometheus: not exported (run Prometheus in the cluster; the pods carry "
                                        "prometheus.io/scrape annotations for their metrics ports)")
    if topo.tracing is not None:
        plan.warn(topo.tracing.line, "tracing: the trace collector pod is not exported (run Zipkin or an "
                                     "OpenTelemetry collector in the cluster)")
    if topo.identity.line:
        plan.warn(topo.identity.line, "identity: the mesh CA and workload certificates are not exported "
                                      "(Kubernetes has no issuer of its own: cert-manager, SPIRE or Istio)")


def _fixed_addresses(topology: Topology) -> dict[str, str]:
    """{alias: pod} for pods with a fixed ``ip:``: an address that means that pod in env values."""
    out = {}
    for name, spec in topology.pods.items():
        if spec.ip is not None:
            for alias in replica_aliases(spec.ip, spec.replicas):
                out[alias] = name
    return out


def _service_names(spec: PodSpec, topology: Topology, fixed: Mapping[str, str]) -> dict[str, str]:
    """{host name or address: Service name} for everything that means another pod, as this pod sees it."""
    names = {name: name for name in topology.pods}
    names.update(fixed)
    for host, value in spec.add_hosts:
        target = value if value in topology.pods else fixed.get(value)
        if target is not None:
            names[host] = target
    return names


def _egress_calls(spec: PodSpec, sidecar: KubeSidecar | None, services: set[str]) -> dict[str, str]:
    """{"host:port": "service:port"} for every way the service reached its sidecar's egress listeners (a
    pod-local name, or localhost itself, with the listener's port) whose virtual host routes to a Service: what
    the service calls when Istio, not a listener of ours, intercepts its calls. The route's first cluster
    decides (a weighted split is Istio's to apply, on the first cluster's host)."""
    if sidecar is None:
        return {}
    local = {"localhost", "127.0.0.1"} | {host for host, value in spec.add_hosts
                                          if value in ("localhost", "127.0.0.1", "0.0.0.0")}
    out: dict[str, str] = {}
    for lst in sidecar.model.listeners:
        if not lst.is_egress:
            continue
        table = RouteTable(lst.hcm.route_config)
        for host in sorted(local):
            vh = table.virtual_host(f"{host}:{lst.port}")
            first = next((r for r in vh.routes if r.cluster or r.weighted_clusters), None) if vh else None
            if first is None:
                continue
            cluster = sidecar.model.cluster(first.cluster or first.weighted_clusters[0].name)
            ep = cluster.endpoints[0] if cluster is not None and cluster.endpoints else None
            if ep is not None and ep.host in services:
                out[f"{host}:{lst.port}"] = f"{ep.host}:{ep.port}"
    return out


def _rename_hosts(value: str, names: Mapping[str, str]) -> str:
    """``value`` with every host that names a pod replaced by its Service name: as a whole value, as the host
    of host:port, or as the host of a URL (the same places meshctl's pod-local rewrite looks)."""
    if not names or not any(n in value for n in names):
        return value
    hosts = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    pattern = re.compile(rf"(?:^|(?<=://)|(?<=@)|(?<==)|(?<=[\s,;]))({hosts})(?=$|:\d|/|[\s,;])")
    return pattern.sub(lambda m: names[m.group(1)], value)


def _probe_target(spec: PodSpec, boot: object) -> ReadyProbe | None:
    """The service's probe when it is only reachable inside the pod: its port is where the sidecar's
    ingress sends traffic on localhost (the service listens there, behind its sidecar)."""
    ready = spec.service.ready
    if ready is None or ready.kind == "exec" or ready.port is None:
        return None
    local_ports = {ep.port for c in getattr(boot, "clusters", ()) for ep in c.endpoints if ep.host == PROBE_IP}
    return ready if ready.port in local_ports else None


def _workload(plan: ExportPlan, spec: PodSpec, image: str, sidecar: KubeSidecar | None,
              fixed: Mapping[str, str], http_targets: set[tuple[str, int]], platform: str) -> Workload:
    names = _service_names(spec, plan.topology, fixed)
    egress_calls = _egress_calls(spec, sidecar, set(names.values())) if platform == ISTIO else {}
    renames = {**names, **egress_calls}
    values = {"POD_IP": "$(POD_IP)", "POD_NAME": spec.name, "REPLICA": f"$({REPLICA_NAME_VAR})",
              "MESH": plan.mesh}

    def render(text: str, line: int) -> str:
        if "${REPLICA}" in text:
            plan.warn(line, f"pod '{spec.name}': ${{REPLICA}} (a replica index) has no equivalent in a Deployment; "
                            f"exported as $({REPLICA_NAME_VAR}), the Kubernetes pod's name")
        # Kubernetes expands $(VAR) in env values and arguments: a literal one is written $$(VAR).
        return _rename_hosts(expand_placeholders(text.replace("$(", "$$("), values), renames)

    service = spec.service
    command = tuple(render(word, service.command_line or service.line) for word in service.command)
    env = [EnvVar("POD_NAME", spec.name), EnvVar("POD_IP", field_path="status.podIP"),
           EnvVar(REPLICA_NAME_VAR, field_path="metadata.name"), EnvVar("MESH_NAME", plan.mesh)]
    if sidecar is not None and sidecar.egress_port is not None and platform == KUBE:
        # As in a meshctl pod: clients that honour the proxy variables go through the sidecar's egress.
        proxy = f"http://127.0.0.1:{sidecar.egress_port}"
        env += [EnvVar(n, proxy) for n in ("HTTP_PROXY", "http_proxy")]
        env += [EnvVar(n, "localhost,127.0.0.1") for n in ("NO_PROXY", "no_proxy")]
    own = {k: render(v, service.env_lines.get(k, service.line)) for k, v in service.env.items()}
    env = [e for e in env if e.name not in own] + [EnvVar(k, v) for k, v in own.items()]
    ready = service.ready
    if ready is not None and ready.kind == "exec":
        ready = ReadyProbe("exec", command=tuple(render(w, ready.line) for w in ready.command), line=ready.line)
    if service.restart != "always":
        plan.warn(service.restart_line, f"pods.{spec.name}.service.restart: {service.restart} has no equivalent in a "
                                "Deployment (its pods always restart); run it as a Job instead")
    if spec.ip is not None:
        plan.warn(spec.line, f"pods.{spec.name}.ip: a fixed loopback alias has no meaning in Kubernetes (pods get "
                             "their own addresses); other pods reach it by its Service name")
    aliases: dict[str, list[str]] = {}
    for host, value in spec.add_hosts:
        if host in names:
            continue  # a name for a pod: renamed to its Service wherever it is used
        ip = "127.0.0.1" if value in ("localhost", "0.0.0.0") else value
        if is_ip(ip):
            aliases.setdefault(ip, []).append(host)
    ports, own_ports = _ports(spec, sidecar, http_targets)
    return Workload(pod=spec.name, image=image, replicas=spec.replicas, command=command, env=tuple(env),
                    ports=ports, service_ports=own_ports, ready=ready,
                    ready_on_localhost=sidecar is not None and sidecar.probe is not None,
                    host_aliases=tuple((ip, tuple(hosts)) for ip, hosts in aliases.items()),
                    publish=spec.publish, metrics=spec.metrics, stop_grace_s=service.stop_grace_s,
                    sidecar=sidecar, line=spec.line, egress_calls=egress_calls)


def _ports(spec: PodSpec, sidecar: KubeSidecar | None,
           http_targets: set[tuple[str, int]]) -> tuple[tuple[KubePort, ...], tuple[int, ...]]:
    """(the Service's ports, the ones the service container listens on).

    With a sidecar, the pod is reached through its ingress listeners (the service listens behind it);
    without, on every port the topology says the service listens on. Both add the metrics port, published
    ports and the declared ``ports:``. A port is HTTP when meshctl knows it is (a sidecar listener, a metrics
    or http probe port, a port other pods' sidecars call); otherwise its protocol is left unsaid.
    """
    ready = spec.service.ready
    http_ports = {p for host, p in http_targets if host == spec.name}
    if ready is not None and ready.kind == "http" and ready.port:
        http_ports.add(ready.port)
    if spec.metrics is not None:
        http_ports.add(spec.metrics.port)
    protocols: dict[int, str] = {}
    own: set[int] = set()
    if sidecar is not None:
        protocols.update((port, "http") for port in sidecar.ingress_ports)
    else:
        own.update(declared_ports(spec))  # not meshctl's default port 80: a job may listen on nothing
    if spec.metrics is not None:
        own.add(spec.metrics.port)
    for port in (*own, *(p.pod_port for p in spec.publish)):
        protocols.setdefault(port, "http" if port in http_ports or sidecar is not None else "")
    for declared in spec.ports:
        protocols[declared.port] = declared.protocol
        own.add(declared.port)
    return tuple(KubePort(port, protocols[port]) for port in sorted(protocols)), tuple(sorted(own))
