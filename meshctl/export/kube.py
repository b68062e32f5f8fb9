"""`meshctl export kube`: each pod as a Deployment and a Service, its sidecar as the real Envoy.

Per pod: a Deployment (its replicas; the service container; with a sidecar, the real Envoy as a native
sidecar: an init container with ``restartPolicy: Always``, so it starts first, is ready before the
service starts and stops after it), a Service named after the pod with its ports, the Envoy bootstrap in a
ConfigMap (and the certificate files it names in a Secret), and for ``publish`` a NodePort Service. The
objects are plain dicts: ``render`` writes them as YAML documents.

Kubernetes 1.29 or later (native sidecars); every object passes ``kubernetes-validate`` for the current
release.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from meshctl.export.kube_envoy import APP_READY_PATH, CONFIG_DIR, CONFIG_KEY, FILES_DIR, SIDECAR_READY_PATH
from meshctl.export.workloads import EnvVar, ExportError, ExportPlan, KubePort, Workload
from pods.names import DNS1035_LABEL_RULE, DNS_LABEL_RULE, dns1035_label, dns_label
from pods.topology import ReadyProbe
from sidecar.envoy_export import dump_yaml

__all__ = ["ENVOY_IMAGE", "NODE_PORTS", "check_namespace", "kube_manifests", "labels", "render"]

#: The image of the Envoy release the differential suite checks our sidecar against.
ENVOY_IMAGE = "envoyproxy/envoy:v1.40.0"
NODE_PORTS = range(30000, 32768)
SIDECAR_CONTAINER = "envoy"
CONFIG_VOLUME = "envoy-config"
FILES_VOLUME = "envoy-files"
MANAGED_BY = "meshctl"
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
LABEL_VALUE_RULE = ("at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit")


def check_namespace(namespace: str | None) -> None:
    """Raises ExportError unless ``namespace`` (if given) is a DNS-1123 label."""
    if namespace is not None and not dns_label(namespace):
        raise ExportError([f"--namespace {namespace!r}: a Kubernetes namespace is a DNS-1123 label: "
                           f"{DNS_LABEL_RULE}"])


def labels(plan: ExportPlan, pod: str) -> dict[str, str]:
    """The labels of everything exported for ``pod``; ``app`` too, which Istio's telemetry reads."""
    return {"app": pod, "app.kubernetes.io/name": pod, "app.kubernetes.io/part-of": plan.mesh,
            "app.kubernetes.io/managed-by": MANAGED_BY}


def selector(plan: ExportPlan, pod: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": pod, "app.kubernetes.io/part-of": plan.mesh}


def metadata(plan: ExportPlan, name: str, pod: str, namespace: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name}
    if namespace:
        out["namespace"] = namespace
    out["labels"] = labels(plan, pod)
    return out


def kube_manifests(plan: ExportPlan, envoy_image: str = ENVOY_IMAGE,
                   namespace: str | None = None, sidecars: bool = True) -> dict[str, list[dict[str, Any]]]:
    """{pod: its objects} for every workload of ``plan``; ``sidecars=False`` leaves the sidecars out (Istio
    injects its own). Raises ExportError for names Kubernetes refuses; warns (on ``plan``) about the rest."""
    check_namespace(namespace)
    if not _LABEL_VALUE.fullmatch(plan.mesh):
        raise ExportError([f"{plan.source}: mesh name {plan.mesh!r} cannot be a Kubernetes label value: "
                           f"{LABEL_VALUE_RULE} (rename it with name: or -p)"])
    if sidecars:
        _warn_mtls(plan)
    out: dict[str, list[dict[str, Any]]] = {}
    for name, w in plan.workloads.items():
        docs: list[dict[str, Any]] = []
        sidecar = w.sidecar if sidecars else None
        if sidecar is not None:
            docs.append({"apiVersion": "v1", "kind": "ConfigMap",
                         "metadata": metadata(plan, f"{name}-envoy", name, namespace),
                         "data": {CONFIG_KEY: dump_yaml(sidecar.bootstrap, _bootstrap_header(plan, w))}})
            if sidecar.files:
                docs.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                             "metadata": metadata(plan, f"{name}-envoy-files", name, namespace),
                             "data": {key: _read_base64(path) for key, path in sidecar.files.items()}})
        docs.append(_deployment(plan, w, envoy_image if sidecar is not None else None, namespace))
        if w.ports:
            docs.append(_service(plan, w, name, "ClusterIP", w.ports, namespace))
        elif w.publish:
            plan.warn(w.line, f"pod '{name}' publishes ports but serves none meshctl knows of; add ports:")
        published = _published(plan, w)
        if published:
            docs.append(_service(plan, w, f"{name}-published", "NodePort", published, namespace))
        out[name] = docs
    return out


def _warn_mtls(plan: ExportPlan) -> None:
    """mTLS needs certificates, which plain Kubernetes has no issuer for: one warning per field that asks."""
    topo = plan.topology
    consequence = ("the sidecars talk plaintext there, and rules that name callers (allow/deny from:) match no one; "
                   "`meshctl export istio` maps it to PeerAuthentication")
    if topo.mtls != "off":
        plan.warn(topo.mtls_line, f"mtls: {topo.mtls} is not exported to plain Kubernetes: {consequence}")
    for name in plan.workloads:
        spec = topo.pods[name]
        if spec.mtls not in (None, "off"):
            plan.warn(spec.mtls_line, f"pods.{name}.mtls: {spec.mtls} is not exported to plain Kubernetes: "
                                      f"{consequence}")


def render(docs: Iterable[dict[str, Any]], header: str = "") -> str:
    """YAML documents, ``---`` between them, ``header`` as comment lines on top."""
    texts = [dump_yaml(doc) for doc in docs]
    comment = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
    return comment + "---\n".join(texts)


# --------------------------------------------------------------------------- objects


def _bootstrap_header(plan: ExportPlan, w: Workload) -> str:
    return (f"Envoy v3 bootstrap of pod {w.pod} (mesh {plan.mesh}) in Kubernetes, written by meshctl from "
            f"{plan.source.name}.\nAdmin on 127.0.0.1 only; probes on listener meshctl_probe.")


def _read_base64(path: str) -> str:
    try:
        return base64.b64encode(Path(path).read_bytes()).decode()
    except OSError as exc:
        raise ExportError([f"cannot read {path} for the sidecar's Secret: {exc.strerror or exc}"]) from None


def _deployment(plan: ExportPlan, w: Workload, envoy_image: str | None, namespace: str | None) -> dict[str, Any]:
    container: dict[str, Any] = {"name": w.pod, "image": w.image}
    if w.command:
        container["command"] = list(w.command)
    container["env"] = [_env(e) for e in w.env]
    if w.service_ports:
        container["ports"] = [_container_port(KubePort(p, _protocol(w, p))) for p in w.service_ports]
    handler = _service_probe(w, through_sidecar=envoy_image is not None)
    if handler is not None:
        # Startup first, so a slow start is not taken for a dead process; then readiness and liveness.
        container["startupProbe"] = {**handler, "periodSeconds": 1, "failureThreshold": 120}
        container["readinessProbe"] = {**handler, "periodSeconds": 2, "failureThreshold": 2}
        container["livenessProbe"] = {**handler, "periodSeconds": 10, "failureThreshold": 6}
    pod_spec: dict[str, Any] = {"terminationGracePeriodSeconds": max(1, round(w.stop_grace_s))}
    if min(_listening_ports(w), default=1024) < 1024:
        # The seed's port 80 in a container that does not run as root (the Envoy image drops to uid 101):
        # a namespaced sysctl Kubernetes counts as safe, allowed without any cluster configuration.
        pod_spec["securityContext"] = {"sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]}
    if w.host_aliases:
        pod_spec["hostAliases"] = [{"ip": ip, "hostnames": list(names)} for ip, names in w.host_aliases]
    sidecar = w.sidecar
    if envoy_image is not None and sidecar is not None:
        ready = {"httpGet": {"path": SIDECAR_READY_PATH, "port": sidecar.probe_port}}
        envoy: dict[str, Any] = {
            "name": SIDECAR_CONTAINER, "image": envoy_image,
            # Native sidecar: started before the service (and ready first), stopped after it.
            "restartPolicy": "Always",
            "args": ["-c", f"{CONFIG_DIR}/{CONFIG_KEY}", "--concurrency", str(sidecar.concurrency),
                     "--log-level", "warn"],
            "ports": [_container_port(KubePort(p, "http")) for p in sidecar.ingress_ports],
            "startupProbe": {**ready, "periodSeconds": 1, "failureThreshold": 60},
            "readinessProbe": {**ready, "periodSeconds": 5},
            "volumeMounts": [{"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True}],
        }
        volumes: list[dict[str, Any]] = [{"name": CONFIG_VOLUME, "configMap": {"name": f"{w.pod}-envoy"}}]
        if sidecar.files:
            envoy["volumeMounts"].append({"name": FILES_VOLUME, "mountPath": FILES_DIR, "readOnly": True})
            volumes.append({"name": FILES_VOLUME, "secret": {"secretName": f"{w.pod}-envoy-files"}})
        pod_spec["initContainers"] = [envoy]
        pod_spec["volumes"] = volumes
    pod_spec["containers"] = [container]
    template: dict[str, Any] = {"metadata": {"labels": labels(plan, w.pod)}, "spec": pod_spec}
    if w.metrics is not None:  # the convention Prometheus' kubernetes_sd examples and most charts follow
        template["metadata"]["annotations"] = {"prometheus.io/scrape": "true",
                                               "prometheus.io/port": str(w.metrics.port),
                                               "prometheus.io/path": w.metrics.path}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata(plan, w.pod, w.pod, namespace),
            "spec": {"replicas": w.replicas, "selector": {"matchLabels": selector(plan, w.pod)},
                     "template": template}}


def _listening_ports(w: Workload) -> set[int]:
    ports = {*w.service_ports, *(p.port for p in w.ports)}
    if w.ready is not None and w.ready.port:
        ports.add(w.ready.port)
    if w.sidecar is not None:
        ports.update(lst.port for lst in w.sidecar.model.listeners)
        if w.sidecar.admin_port:
            ports.add(w.sidecar.admin_port)
    return ports


def _protocol(w: Workload, port: int) -> str:
    return next((p.protocol for p in w.ports if p.port == port), "")


def _service_probe(w: Workload, through_sidecar: bool) -> dict[str, Any] | None:
    """The service's probe: through our sidecar's probe listener when the service listens on localhost behind
    it, else the probe as written (the kubelet probes the pod's address; Istio rewrites it to its agent)."""
    ready: ReadyProbe | None = w.ready
    if ready is None:
        return None
    if w.ready_on_localhost and through_sidecar and w.sidecar is not None:
        return {"httpGet": {"path": APP_READY_PATH, "port": w.sidecar.probe_port}}
    if ready.kind == "http":
        return {"httpGet": {"path": ready.path or "/", "port": ready.port}}
    if ready.kind == "tcp":
        return {"tcpSocket": {"port": ready.port}}
    return {"exec": {"command": list(ready.command)}}


def _env(e: EnvVar) -> dict[str, Any]:
    if e.field_path is not None:
        return {"name": e.name, "valueFrom": {"fieldRef": {"fieldPath": e.field_path}}}
    return {"name": e.name, "value": e.value or ""}


def _container_port(p: KubePort) -> dict[str, Any]:
    return {"name": p.name, "containerPort": p.port, "protocol": "TCP"}


def _service_port(p: KubePort, node_port: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": p.name, "port": p.port, "targetPort": p.port, "protocol": "TCP"}
    if p.protocol:
        out["appProtocol"] = p.protocol
    if node_port is not None:
        out["nodePort"] = node_port
    return out


def _service(plan: ExportPlan, w: Workload, name: str, kind: str, ports: Iterable[KubePort | tuple[KubePort, int]],
             namespace: str | None) -> dict[str, Any]:
    if not dns1035_label(name):
        raise ExportError([f"{plan.source}:{w.line}: Service name {name!r} (for pod '{w.pod}') is not a DNS-1035 "
                           f"label: {DNS1035_LABEL_RULE}"])
    rendered = [_service_port(p) if isinstance(p, KubePort) else _service_port(*p) for p in ports]
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata(plan, name, w.pod, namespace),
            "spec": {"type": kind, "selector": selector(plan, w.pod), "ports": rendered}}


def _published(plan: ExportPlan, w: Workload) -> list[tuple[KubePort, int | None]]:
    """``publish`` as NodePort ports: the host port itself when it is in the node-port range, else one that
    Kubernetes assigns (warned: the topology's port is not what clients will use)."""
    out: list[tuple[KubePort, int | None]] = []
    for p in w.publish:
        port = next((k for k in w.ports if k.port == p.pod_port), KubePort(p.pod_port, ""))
        if p.host_port in NODE_PORTS:
            out.append((port, p.host_port))
            continue
        plan.warn(p.line, f"pods.{w.pod}.publish: host port {p.host_port} is outside Kubernetes' node-port range "
                          f"({NODE_PORTS.start}-{NODE_PORTS.stop - 1}); Service {w.pod}-published gets one "
                          f"assigned, or use: kubectl port-forward svc/{w.pod} {p.host_port}:{p.pod_port}")
        out.append((port, None))
    return out
