"""A pod's sidecar model as the real Envoy runs it in a Kubernetes pod (a native sidecar container).

The same compiled model ``meshctl export envoy`` and ``engine: envoy`` render, with the addresses a
Kubernetes pod has instead of a meshctl pod's alias:

* ingress listeners on 0.0.0.0 (the pod's address), egress listeners (written as localhost: the service's
  own outbound calls) on 127.0.0.1, the admin on 127.0.0.1 only;
* cluster endpoints: the pod itself is 127.0.0.1; a host that means another pod is its Service's DNS name
  (a STATIC cluster with such a name becomes STRICT_DNS, resolved through the cluster DNS);
* files: the JWKS is inlined; certificate files a listener or cluster names are carried in a Secret mounted
  at ``FILES_DIR``; a ``tls: mesh`` listener (a mesh CA certificate, which Kubernetes has no issuer for)
  is exported in plaintext, with a warning;
* one listener of its own, ``meshctl_probe`` on ``PROBE_PORT`` (or the next free port): kubelet probes the
  pod's address, so a service that listens on localhost behind its sidecar cannot be probed directly.
  Envoy health-checks it from inside the pod every second, and ``GET /app/ready`` answers 200 while it
  is healthy, 503 otherwise (Envoy's health_check filter); ``GET /sidecar/ready`` answers 200 once
  Envoy serves, the sidecar container's own startup and readiness probe. Istio's pilot-agent does the
  same for the same reason (its app-health rewrite on port 15020/15021).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from pods.addressing import is_ip
from pods.topology import ReadyProbe
from sidecar.config import Bootstrap, CommonTls, Endpoint, HttpFilter
from sidecar.envoy_export import HCM, HCM_TYPE, ROUTER, ROUTER_TYPE, export_envoy, seconds
from sidecar.jwt_authn import JwtAuthnFilter

__all__ = ["CONFIG_DIR", "CONFIG_KEY", "FILES_DIR", "PROBE_PORT", "KubeSidecar", "sidecar_for_kubernetes"]

CONFIG_DIR = "/etc/envoy"
CONFIG_KEY = "envoy.yaml"
FILES_DIR = "/etc/envoy-files"
#: Istio's health port; ours when the pod does not use it.
PROBE_PORT = 15021
PROBE_LISTENER = PROBE_CLUSTER = "meshctl_probe"
APP_READY_PATH = "/app/ready"
SIDECAR_READY_PATH = "/sidecar/ready"
HEALTH_CHECK = "envoy.filters.http.health_check"
HEALTH_CHECK_TYPE = "type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck"
#: How often Envoy checks the service for its probe (kubelet's own default period is 10 s).
PROBE_INTERVAL_S = 1.0


@dataclass(frozen=True)
class KubeSidecar:
    #: The rewritten model (what the Istio export reads routes and clusters from) and its Envoy bootstrap.
    model: Bootstrap
    bootstrap: dict[str, Any]
    concurrency: int
    ingress_ports: tuple[int, ...]
    egress_port: int | None
    admin_port: int | None
    probe_port: int
    #: The service probe the sidecar performs from inside the pod (None: none needed).
    probe: ReadyProbe | None
    #: {key in the Secret: file on this machine}, mounted at FILES_DIR.
    files: dict[str, str]
    #: (Service name, port) of every cluster endpoint that is another pod.
    upstreams: tuple[tuple[str, int], ...]


def sidecar_for_kubernetes(boot: Bootstrap, services: Mapping[str, str], own_ip: str, concurrency: int,
                           warn: Callable[[str], None], pod: str, probe: ReadyProbe | None) -> KubeSidecar:
    """``boot`` (compiled for the stand-in alias ``own_ip``) as it runs in a Kubernetes pod.

    ``services``: {host name or address: Service name} for everything that means another pod.
    ``probe``: the service's readiness when only the pod itself can reach it. ``warn`` is told about every
    feature that does not carry over.
    """
    files: dict[str, str] = {}

    def carried(path: str | None) -> str | None:
        if path is None:
            return None
        for key, known in files.items():
            if known == path:
                return f"{FILES_DIR}/{key}"
        key = _file_key(os.path.basename(path), files)
        files[key] = path
        return f"{FILES_DIR}/{key}"

    def common(c: CommonTls) -> CommonTls:
        return replace(c, cert_chain=carried(c.cert_chain), private_key=carried(c.private_key),
                       trusted_ca=carried(c.trusted_ca))

    listeners = []
    for lst in boot.listeners:
        address = "127.0.0.1" if lst.is_egress else "0.0.0.0"
        tls = lst.tls
        if tls is not None and tls.common.cert_chain is None:
            warn(f"pod '{pod}' sidecar: listener '{lst.name}' tls: mesh is exported in plaintext (no mesh CA in "
                 "Kubernetes); give it tls: {cert, key} or terminate TLS at an Ingress or Gateway")
            tls = None
        elif tls is not None:
            tls = replace(tls, common=common(tls.common))
        hcm = replace(lst.hcm, http_filters=tuple(_inline_jwks(f) for f in lst.hcm.http_filters))
        listeners.append(replace(lst, address=address, tls=tls, hcm=hcm,
                                 plaintext_allowed=lst.plaintext_allowed and tls is not None))
    clusters = []
    upstreams: list[tuple[str, int]] = []
    for cluster in boot.clusters:
        endpoints = []
        for ep in cluster.endpoints:
            host = "127.0.0.1" if ep.host == own_ip else services.get(ep.host, ep.host)
            if ep.host in services:
                upstreams.append((host, ep.port))
            endpoints.append(Endpoint(host=host, port=ep.port))
        kind = cluster.type
        if kind == "STATIC" and not all(is_ip(ep.host) for ep in endpoints):
            kind = "STRICT_DNS"
        tls = replace(cluster.tls, common=common(cluster.tls.common)) if cluster.tls is not None else None
        clusters.append(replace(cluster, type=kind, endpoints=tuple(endpoints), tls=tls))
    admin = replace(boot.admin, address="127.0.0.1") if boot.admin is not None else None
    model = replace(boot, listeners=tuple(listeners), clusters=tuple(clusters), admin=admin)
    taken = {lst.port for lst in model.listeners} | ({admin.port} if admin is not None else set())
    probe_port = next(p for p in range(PROBE_PORT, 65536) if p not in taken)
    doc = export_envoy(model)
    doc["static_resources"]["listeners"].append(_probe_listener(probe_port, probe is not None))
    if probe is not None:
        doc["static_resources"]["clusters"].append(_probe_cluster(probe))
    return KubeSidecar(model=model, bootstrap=doc, concurrency=concurrency,
                       ingress_ports=tuple(lst.port for lst in model.listeners if not lst.is_egress),
                       egress_port=model.egress_listener.port if model.egress_listener is not None else None,
                       admin_port=admin.port if admin is not None else None, probe_port=probe_port, probe=probe,
                       files=files, upstreams=tuple(dict.fromkeys(upstreams)))


def _file_key(name: str, taken: Mapping[str, str]) -> str:
    """A Secret key for a file: its name, made of the characters a key allows, unique."""
    base = re.sub(r"[^-._a-zA-Z0-9]", "_", name).lstrip(".") or "file"
    key, n = base, 1
    while key in taken:
        n += 1
        key = f"{n}-{base}"
    return key


def _inline_jwks(f: HttpFilter) -> HttpFilter:
    """A JWT filter's JWKS files inlined: public keys, small, and one file fewer to carry into the pod."""
    if not isinstance(f.config, JwtAuthnFilter):
        return f
    providers = tuple(replace(p, jwks_file=None) for p in f.config.providers)
    return replace(f, config=replace(f.config, providers=providers))


def _probe_listener(port: int, with_app: bool) -> dict[str, Any]:
    routes: list[dict[str, Any]] = [{"match": {"path": SIDECAR_READY_PATH},
                                     "direct_response": {"status": 200, "body": {"inline_string": "ready\n"}}}]
    routes.append({"match": {"prefix": "/"}, "direct_response": {"status": 404}})
    filters: list[dict[str, Any]] = []
    if with_app:
        filters.append({"name": HEALTH_CHECK, "typed_config": {
            "@type": HEALTH_CHECK_TYPE, "pass_through_mode": False,
            "headers": [{"name": ":path", "string_match": {"exact": APP_READY_PATH}}],
            "cluster_min_healthy_percentages": {PROBE_CLUSTER: {"value": 100}}}})
    filters.append({"name": ROUTER, "typed_config": {"@type": ROUTER_TYPE}})
    hcm = {"@type": HCM_TYPE, "stat_prefix": PROBE_LISTENER, "codec_type": "AUTO",
           "route_config": {"name": PROBE_LISTENER,
                            "virtual_hosts": [{"name": PROBE_LISTENER, "domains": ["*"], "routes": routes}]},
           "http_filters": filters}
    return {"name": PROBE_LISTENER,
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
            "filter_chains": [{"filters": [{"name": HCM, "typed_config": hcm}]}]}


def _probe_cluster(probe: ReadyProbe) -> dict[str, Any]:
    check: dict[str, Any] = {"timeout": seconds(PROBE_INTERVAL_S), "interval": seconds(PROBE_INTERVAL_S),
                             # The probe cluster never carries traffic: without this Envoy checks it once a minute.
                             "no_traffic_interval": seconds(PROBE_INTERVAL_S),
                             "unhealthy_threshold": 1, "healthy_threshold": 1}
    if probe.kind == "http":
        check["http_health_check"] = {"path": probe.path or "/"}
    else:
        check["tcp_health_check"] = {}  # connect only: what a tcp probe checks
    assert probe.port is not None
    return {"name": PROBE_CLUSTER, "type": "STATIC", "connect_timeout": seconds(PROBE_INTERVAL_S),
            "load_assignment": {"cluster_name": PROBE_CLUSTER, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                              "port_value": probe.port}}}}]}]},
            "health_checks": [check]}
