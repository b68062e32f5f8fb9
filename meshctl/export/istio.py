"""`meshctl export istio`: the topology as Kubernetes workloads in an Istio mesh.

The workloads are the kube export's (``kube_manifests(sidecars=False)``: Istio injects its own sidecar), each
with a ServiceAccount of its own, because an Istio identity is a ServiceAccount. What the pod's sidecar does
becomes Istio's resources, read from the compiled sidecar model (``KubeSidecar.model``, cluster endpoints
already Service names), so the Envoy-file and short-form sidecars export alike:

============================================  =================================================================
meshctl (sidecar model)                       Istio
============================================  =================================================================
pod with a sidecar / without                  pod label ``sidecar.istio.io/inject: "true"`` / ``"false"``
ingress listener port P -> local port X       ``Sidecar`` ingress port P, ``defaultEndpoint: 127.0.0.1:X``
ingress cluster circuit breakers              ``Sidecar`` ingress ``connectionPool``
egress route of caller C to Service H         ``VirtualService`` H, an ``http`` route matching
                                              ``sourceLabels`` of C (retries, timeout, fault, split, headers,
                                              rewrite, mirror), then a catch-all route to H
ingress route options (fault, timeout, ...)   the same ``VirtualService`` H, for every caller
egress cluster (outlier detection, circuit    ``DestinationRule`` H ``trafficPolicy`` (per port when H is
breakers, lb_policy, connect_timeout)         called on several)
``mtls:`` of the mesh / of a pod              ``PeerAuthentication`` ``default`` (mesh.yaml) / per pod
RBAC (``allow``/``deny``, Envoy RBAC)         ``AuthorizationPolicy`` ALLOW/DENY on the listener's port;
                                              ``spiffe://MESH/pod/P`` = ``cluster.local/ns/NS/sa/P``
RBAC ``shadow_rules``                         the same, annotated ``istio.io/dry-run``
``jwt`` (jwt_authn)                           ``RequestAuthentication`` + a DENY ``AuthorizationPolicy``
                                              on ``notRequestPrincipals`` where a token is required
============================================  =================================================================

Istio applies a VirtualService or DestinationRule to every caller of its host, and two VirtualServices for
one host conflict, so each host gets one of each: callers' routes are scoped with ``sourceLabels``; a
DestinationRule cannot be, so callers that configure one host differently are one warning. Only settings that
differ from meshctl's defaults are written. Everything Istio has no field for is one warning naming it
(``plan.warn``), never silently dropped. docs/export-istio.md has the full table and the default differences.
"""

from __future__ import annotations

import http
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from meshctl.export.kube import MANAGED_BY, kube_manifests, metadata, selector
from meshctl.export.kube_envoy import KubeSidecar
from meshctl.export.workloads import ExportPlan, Workload
from sidecar.config import (
    Cluster,
    FaultFilter,
    HeaderMatch,
    HeaderMutations,
    Listener,
    LocalRateLimit,
    OutlierDetection,
    RetryPolicy,
    Route,
    RouteMatch,
    VirtualHost,
)
from sidecar.envoy_export import seconds
from sidecar.jwt_authn import CLOCK_SKEW_S, JwtAuthnFilter, JwtProvider, JwtRule, Requirement
from sidecar.rbac import Policy, RbacFilter, RbacRules, Rule, StringMatch

__all__ = ["DEFAULT_NAMESPACE", "INJECT_LABEL", "NETWORKING", "SECURITY", "istio_manifests", "principal"]

NETWORKING = "networking.istio.io/v1"
SECURITY = "security.istio.io/v1"
INJECT_LABEL = "sidecar.istio.io/inject"
#: The pod annotation that sets the Istio proxy's ProxyConfig, and the agent variable that makes it probe a
#: rewritten probe's port on localhost (Istio's documented switch for applications bound to localhost).
PROXY_CONFIG = "proxy.istio.io/config"
LOCALHOST_PROBES = "REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION"
DRY_RUN = "istio.io/dry-run"
#: Where principals say the pods run when no --namespace is given (kubectl's usual current namespace).
DEFAULT_NAMESPACE = "default"
#: Istio's own name for the local trust domain in principals (it rewrites it to the mesh's trust domain).
TRUST_DOMAIN = "cluster.local"
#: The model's defaults (Envoy's, as meshctl's sidecar implements them): only differences are written.
DEFAULT_TIMEOUT_S = 15.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_BACKOFF_S = 0.025
DEFAULT_BREAKERS = {"max_connections": 1024, "max_pending_requests": 1024, "max_requests": 1024, "max_retries": 3}
DEFAULT_MAX_EJECTION_TIME_S = 300.0
#: Envoy append actions Istio's ``headers`` can say: add appends, set overwrites.
_HEADER_ACTIONS = {"APPEND_IF_EXISTS_OR_ADD": "add", "OVERWRITE_IF_EXISTS_OR_ADD": "set"}
#: Pseudo headers an Istio match has fields of its own for.
_MATCH_FIELDS = {":method": "method", ":authority": "authority", "host": "authority", ":scheme": "scheme"}

Doc = dict[str, Any]


def principal(namespace: str, pod: str) -> str:
    """Istio's principal of a pod: its ServiceAccount (named after the pod) in ``namespace``."""
    return f"{TRUST_DOMAIN}/ns/{namespace}/sa/{pod}"


def istio_manifests(plan: ExportPlan, namespace: str | None = None) -> tuple[dict[str, list[Doc]], list[Doc]]:
    """({pod: its objects}, mesh-wide objects) for every workload of ``plan``; warns (on ``plan``) about every
    setting Istio cannot carry. Raises ExportError for names Kubernetes refuses (as the kube export)."""
    per_pod = kube_manifests(plan, namespace=namespace, sidecars=False)
    for pod, docs in per_pod.items():
        _join_mesh(docs, plan.workloads[pod])
        docs.insert(0, {"apiVersion": "v1", "kind": "ServiceAccount",
                        "metadata": metadata(plan, pod, pod, namespace),
                        # The service never calls the Kubernetes API; Istio mounts its own token for istio-proxy.
                        "automountServiceAccountToken": False})
    export = _Export(plan, namespace)
    mesh_wide = export.peer_authentications(per_pod)
    for pod, w in plan.workloads.items():
        if w.sidecar is not None:
            export.sidecar(pod, w.sidecar, per_pod[pod])
    for host, docs in export.host_objects().items():
        (per_pod[host] if host in per_pod else mesh_wide).extend(docs)
    return per_pod, mesh_wide


def _join_mesh(docs: list[Doc], w: Workload) -> None:
    """The Deployment's pods run as the pod's ServiceAccount and are injected exactly when meshctl gives the
    pod a sidecar (a pod without one is outside the mesh there too). A service that listens on localhost
    behind its sidecar is probed there by Istio's agent only when told to (since Istio 1.10 it probes the
    pod's address, where such a service does not listen)."""
    for doc in docs:
        if doc["kind"] == "Deployment":
            template = doc["spec"]["template"]
            template["metadata"]["labels"][INJECT_LABEL] = "true" if w.sidecar is not None else "false"
            template["spec"]["serviceAccountName"] = w.pod
            if w.ready_on_localhost:
                config = {"proxyMetadata": {LOCALHOST_PROBES: "true"}}
                template["metadata"].setdefault("annotations", {})[PROXY_CONFIG] = json.dumps(config)


# --------------------------------------------------------------------------- the export's state


@dataclass
class _Host:
    """What the mesh says about calls to one Service host."""

    #: (caller pod, HTTPRoute): the callers' egress routes, scoped to them with sourceLabels.
    scoped: list[tuple[str, Doc]] = field(default_factory=list)
    #: HTTPRoutes from the host's own ingress: every caller's.
    own: list[Doc] = field(default_factory=list)
    #: {port: {caller pod: trafficPolicy}} of the callers' clusters.
    policies: dict[int, dict[str, Doc]] = field(default_factory=dict)


class _Export:
    def __init__(self, plan: ExportPlan, namespace: str | None) -> None:
        self.plan = plan
        self.namespace = namespace
        self.hosts: dict[str, _Host] = {}

    # ----------------------------------------------------------------- helpers

    def warn(self, pod: str, message: str) -> None:
        spec = self.plan.topology.pods[pod]
        self.plan.warn(spec.sidecar_line or spec.line, f"pod '{pod}' sidecar: {message}")

    def meta(self, name: str, pod: str) -> Doc:
        return metadata(self.plan, name, pod, self.namespace)

    def principal_namespace(self, pod: str) -> str:
        if self.namespace is None:
            self.warn(pod, f"principals name namespace '{DEFAULT_NAMESPACE}' (Istio's identity is namespace/"
                           "ServiceAccount): pass -n NAMESPACE when the pods run elsewhere")
        return self.namespace or DEFAULT_NAMESPACE

    def host(self, name: str) -> _Host:
        return self.hosts.setdefault(name, _Host())

    # ----------------------------------------------------------------- mTLS

    def peer_authentications(self, per_pod: dict[str, list[Doc]]) -> list[Doc]:
        """The mesh's mtls as the namespace's default PeerAuthentication, pods that differ as their own.

        ``off`` writes nothing mesh-wide: Istio's default (PERMISSIVE, with auto mTLS between sidecars) is
        what a plaintext meshctl mesh can rely on; a pod that turns it off in a meshed mesh is DISABLE."""
        topo = self.plan.topology
        out = []
        if topo.mtls != "off":
            meta = {"name": "default", **({"namespace": self.namespace} if self.namespace else {}),
                    "labels": {"app.kubernetes.io/part-of": self.plan.mesh,
                               "app.kubernetes.io/managed-by": MANAGED_BY}}
            out.append({"apiVersion": SECURITY, "kind": "PeerAuthentication", "metadata": meta,
                        "spec": {"mtls": {"mode": _mtls_mode(topo.mtls)}}})
        for pod, w in self.plan.workloads.items():
            mode = topo.pod_mtls(pod)
            if w.sidecar is None or mode == topo.mtls:
                continue
            per_pod[pod].append({"apiVersion": SECURITY, "kind": "PeerAuthentication", "metadata": self.meta(pod, pod),
                                 "spec": {"selector": {"matchLabels": selector(self.plan, pod)},
                                          "mtls": {"mode": _mtls_mode(mode)}}})
        return out

    # ----------------------------------------------------------------- one pod's sidecar

    def sidecar(self, pod: str, sidecar: KubeSidecar, docs: list[Doc]) -> None:
        model = sidecar.model
        clusters = {c.name: c for c in model.clusters}
        services = set(sidecar.upstreams)
        ingress = [lst for lst in model.listeners if not lst.is_egress]
        if any(lst.hcm.access_logs for lst in model.listeners):
            self.warn(pod, "access_log is not exported (Istio: meshConfig.accessLogFile or a Telemetry resource)")
        if self.plan.topology.tracing is None and any(lst.hcm.tracing for lst in model.listeners):
            # (the mesh's tracing: is one warning of the plan's)
            self.warn(pod, "tracing is not exported (Istio: meshConfig tracing or a Telemetry resource)")
        for lst in ingress:
            if lst.tls is not None:
                self.warn(pod, f"listener '{lst.name}' tls (its own certificate) is not exported: Istio's sidecar "
                               "terminates only its mesh mTLS; terminate TLS at an Istio Gateway")
        self.sidecar_resource(pod, ingress, clusters, docs)
        allow_ports: list[int] = []
        auth: list[Doc] = []
        names: set[str] = set()
        for lst in ingress:
            self.ingress_routes(pod, lst, clusters)
            auth.extend(self.listener_auth(pod, lst, allow_ports, names))
        if allow_ports:
            # An ALLOW policy refuses what it does not match on every port of the workload; meshctl's applied
            # to its listener only (the metrics port, say, is not behind it).
            first = next(d for d in auth if d["spec"].get("action") == "ALLOW" and DRY_RUN not in
                         d["metadata"].get("annotations", {}))
            first["spec"].setdefault("rules", []).append(
                {"to": [{"operation": {"notPorts": [str(p) for p in allow_ports]}}]})
        docs.extend(auth)
        for lst in model.listeners:
            if lst.is_egress:
                self.egress(pod, lst, clusters, services)

    def sidecar_resource(self, pod: str, ingress: list[Listener], clusters: dict[str, Cluster],
                         docs: list[Doc]) -> None:
        """A ``Sidecar`` whose ingress ports forward to where meshctl's ingress listeners did: the service
        listens on the pod's loopback behind its sidecar, and Istio delivers to the pod's address unless told."""
        entries = []
        for lst in ingress:
            local = [c for c in _route_clusters(lst) if c in clusters]
            targets = {(ep.host, ep.port) for name in local for ep in clusters[name].endpoints}
            loopback = sorted(t for t in targets if t[0] == "127.0.0.1")
            if targets - set(loopback):
                self.warn(pod, f"ingress listener '{lst.name}' forwards to another pod "
                               f"({', '.join(f'{h}:{p}' for h, p in sorted(targets - set(loopback)))}): Istio's "
                               "sidecar delivers inbound traffic to its own workload only (run a gateway)")
            if not loopback:
                continue
            if len(loopback) > 1:
                self.warn(pod, f"ingress listener '{lst.name}' routes to several local ports "
                               f"({', '.join(str(p) for _, p in loopback)}): Istio forwards port {lst.port} to one "
                               f"(127.0.0.1:{loopback[0][1]})")
            entry: Doc = {"port": {"number": lst.port, "protocol": "HTTP", "name": f"http-{lst.port}"},
                          "defaultEndpoint": f"127.0.0.1:{loopback[0][1]}"}
            cluster = next(clusters[n] for n in local if (clusters[n].endpoints[0].host, clusters[n].endpoints[0].port)
                           == loopback[0])
            pool = _connection_pool(cluster)
            if pool:
                entry["connectionPool"] = pool
            for what in _cluster_unsupported(cluster, inbound=True):
                self.warn(pod, f"ingress cluster '{cluster.name}' {what}")
            entries.append(entry)
        if entries:
            docs.append({"apiVersion": NETWORKING, "kind": "Sidecar", "metadata": self.meta(pod, pod),
                         "spec": {"workloadSelector": {"labels": selector(self.plan, pod)}, "ingress": entries,
                                  # Istio requires egress; this is its default (every Service it knows of).
                                  "egress": [{"hosts": ["*/*"]}]}})

    def ingress_routes(self, pod: str, lst: Listener, clusters: dict[str, Cluster]) -> None:
        """Route options of the pod's own ingress (fault, timeout, retries, headers) apply to every caller:
        the pod's VirtualService, unscoped. Plain forwarding needs nothing."""
        fault = self.listener_filters(pod, lst)
        local = {name for name, c in clusters.items() if all(ep.host == "127.0.0.1" for ep in c.endpoints)}
        for vh in lst.hcm.route_config.virtual_hosts:
            for r in vh.routes:
                if any(c not in local for c in _clusters_of(r)):
                    continue  # it forwards to another pod: warned with the Sidecar
                route, significant = self.http_route(pod, lst, vh, r, fault,
                                                     lambda c: (pod, lst.port) if c in local else None, own=True)
                if route is not None and significant:
                    self.host(pod).own.append(route)

    def egress(self, pod: str, lst: Listener, clusters: dict[str, Cluster], services: set[tuple[str, int]]) -> None:
        fault = self.listener_filters(pod, lst)
        destinations: dict[str, tuple[str, int] | None] = {}
        for name in _route_clusters(lst):
            destinations[name] = self.destination(pod, clusters.get(name), name, services)
        # What the service calls instead: each route's host (a weighted split's other hosts are Istio's choice).
        called = sorted({f"{d[0]}:{d[1]}" for vh in lst.hcm.route_config.virtual_hosts for r in vh.routes
                         for d in [destinations.get(next(iter(_clusters_of(r)), ""))] if d is not None})
        rewritten = sorted(f"{old} -> {new}" for old, new in self.plan.workloads[pod].egress_calls.items()
                           if old.endswith(f":{lst.port}"))
        self.warn(pod, f"egress listener '{lst.name}' (127.0.0.1:{lst.port}) is not exported: Istio intercepts "
                       f"outbound calls itself, so the service calls {', '.join(called) or 'the Services'} "
                       "directly" + (f" (env values and arguments rewritten: {', '.join(rewritten)})" if rewritten
                                     else "") + f"; anything else calling 127.0.0.1:{lst.port} reaches nothing. "
                       "Its routes are the VirtualServices and DestinationRules of those hosts")
        for vh in lst.hcm.route_config.virtual_hosts:
            for r in vh.routes:
                names = _clusters_of(r)
                if not names:
                    self.warn(pod, f"egress route '{r.name or vh.name}' answers directly: not exported (Istio routes "
                                   "by the called Service, which a direct response has not)")
                    continue
                if any(destinations.get(n) is None for n in names):
                    continue  # warned by destination()
                route, significant = self.http_route(pod, lst, vh, r, fault, lambda c: destinations[c], own=False)
                host = destinations[names[0]]
                assert host is not None
                if route is not None and significant:
                    self.host(host[0]).scoped.append((pod, route))
        for name, dest in destinations.items():
            cluster = clusters.get(name)
            if dest is None or cluster is None:
                continue
            policy, unsupported = _traffic_policy(cluster)
            for what in unsupported:
                self.warn(pod, f"cluster '{name}' {what}")
            self.host(dest[0]).policies.setdefault(dest[1], {}).setdefault(pod, policy)

    def destination(self, pod: str, cluster: Cluster | None, name: str,
                    services: set[tuple[str, int]]) -> tuple[str, int] | None:
        """The (Service, port) a cluster reaches, or None (warned): Istio routes to Services of the mesh."""
        if cluster is None:
            return None
        targets = {(ep.host, ep.port) for ep in cluster.endpoints}
        if len(targets) == 1 and targets <= services:
            return next(iter(targets))
        where = ", ".join(f"{h}:{p}" for h, p in sorted(targets))
        if targets <= services:
            self.warn(pod, f"cluster '{name}' balances over several Services ({where}): not exported (an Istio "
                           "route names one host; use weighted routes)")
        else:
            self.warn(pod, f"cluster '{name}' ({where}) is not a pod of the mesh: not exported (Istio reaches it "
                           "through a ServiceEntry)")
        return None

    def listener_filters(self, pod: str, lst: Listener) -> FaultFilter | None:
        """Warns about the listener's filters Istio cannot carry; returns its fault filter's own fault (the
        default of routes without one), if it has one."""
        fault = None
        for f in lst.hcm.http_filters:
            if isinstance(f.config, LocalRateLimit):
                self.warn(pod, f"listener '{lst.name}' local_ratelimit ({f.name}) is not exported: Istio has no "
                               "resource for a local rate limit (an EnvoyFilter can add the same filter)")
            elif isinstance(f.config, FaultFilter):
                if f.config.abort is not None or f.config.delay is not None:
                    fault = f.config
            elif lst.is_egress and isinstance(f.config, (RbacFilter, JwtAuthnFilter)):
                self.warn(pod, f"listener '{lst.name}' {f.name} on outbound calls is not exported: Istio's "
                               "AuthorizationPolicy and RequestAuthentication apply to inbound requests")
        return fault

    # ----------------------------------------------------------------- routes

    def http_route(self, pod: str, lst: Listener, vh: VirtualHost, r: Route, listener_fault: FaultFilter | None,
                   destination: Callable[[str], tuple[str, int] | None], own: bool) -> tuple[Doc | None, bool]:
        """(HTTPRoute, whether it says anything Istio's default route would not) of one route."""
        what = f"route '{r.name or vh.name}' of listener '{lst.name}'"
        out: Doc = {}
        significant = False
        match, unsupported = _match(r.match)
        if match:
            out["match"] = [match]
            significant = True
        if r.direct_response is not None:
            if not own:
                return None, False
            body = r.direct_response.body
            out["directResponse"] = {"status": r.direct_response.status}
            if body:
                out["directResponse"]["body"] = {"string": body.decode("utf-8", "replace")}
            significant = True
        elif r.weighted_clusters:
            weights, exact = _percentages([w.weight for w in r.weighted_clusters])
            if not exact:
                self.warn(pod, f"{what}: weights {[w.weight for w in r.weighted_clusters]} are rounded to "
                               f"percentages {weights}")
            out["route"] = [{"destination": _destination(destination(w.name)), "weight": weight}
                            for w, weight in zip(r.weighted_clusters, weights, strict=True)]
            if any(w.fault is not None for w in r.weighted_clusters):
                unsupported.append("per-cluster fault of a weighted route (Istio's fault is the route's)")
            significant = significant or len(r.weighted_clusters) > 1
        elif r.cluster is not None:
            out["route"] = [{"destination": _destination(destination(r.cluster))}]
        fault = r.fault or _fault_for(listener_fault, _clusters_of(r))
        if fault is not None:
            istio_fault, fault_unsupported = _fault(fault)
            unsupported += fault_unsupported
            if istio_fault:
                out["fault"] = istio_fault
                significant = True
        if r.timeout_s != DEFAULT_TIMEOUT_S and r.timeout_s > 0:
            out["timeout"] = seconds(r.timeout_s)
            significant = True
        policy = r.retry_policy or vh.retry_policy
        if policy is not None:
            significant = True
        if r.direct_response is None:
            out["retries"], retry_unsupported = _retries(policy)
            unsupported += retry_unsupported
        headers, header_unsupported = _headers((r.headers, vh.headers, lst.hcm.route_config.headers))
        unsupported += header_unsupported
        if headers:
            out["headers"] = headers
            significant = True
        rewrite = _rewrite(r)
        if rewrite:
            out["rewrite"] = rewrite
            significant = True
        mirrors = [m for m in r.mirror_policies if destination(m.cluster) is not None]
        if own and len(mirrors) < len(r.mirror_policies):
            unsupported.append("request_mirror_policies to another pod")
        if mirrors:
            out["mirrors"] = [{"destination": _destination(destination(m.cluster)),
                               "percentage": {"value": 100 * m.numerator / m.denominator}} for m in mirrors]
            significant = True
        if vh.include_request_attempt_count:
            unsupported.append("include_request_attempt_count (Istio does not send x-envoy-attempt-count)")
        for item in unsupported:
            self.warn(pod, f"{what}: {item} is not exported")
        return out, significant

    # ----------------------------------------------------------------- authorization

    def listener_auth(self, pod: str, lst: Listener, allow_ports: list[int], taken: set[str]) -> list[Doc]:
        """AuthorizationPolicies (and a RequestAuthentication) for the ingress listener's RBAC and JWT filters,
        each scoped to the listener's port; ``taken``: the pod's policy names so far."""
        out: list[Doc] = []

        def name(base: str) -> str:
            n, i = base, 1
            while n in taken:
                i += 1
                n = f"{base}-{i}"
            taken.add(n)
            return n

        for f in lst.hcm.http_filters:
            if isinstance(f.config, RbacFilter):
                for rules, dry_run in ((f.config.rules, False), (f.config.shadow_rules, True)):
                    if rules is None:
                        continue
                    if rules.action == "LOG":
                        self.warn(pod, f"listener '{lst.name}' RBAC action LOG is not exported (Istio has no "
                                       "log-only action)")
                        continue
                    base = f"{pod}-{rules.action.lower()}" + ("-dry-run" if dry_run else "")
                    doc = self.authorization(pod, name(base), rules, lst.port, dry_run)
                    out.append(doc)
                    if rules.action == "ALLOW" and not dry_run:
                        if lst.port in allow_ports:
                            self.warn(pod, f"listener '{lst.name}' has several ALLOW RBAC filters: Istio allows what "
                                           "any ALLOW policy allows, Envoy what all of them do")
                        allow_ports.append(lst.port)
            elif isinstance(f.config, JwtAuthnFilter):
                out.extend(self.jwt(pod, name(f"{pod}-jwt"), f.config, lst.port))
        return out

    def authorization(self, pod: str, name: str, rules: RbacRules, port: int, dry_run: bool) -> Doc:
        ns = None
        istio_rules = []
        for policy in rules.policies:
            if any(p.kind == "authenticated" for p in _walk(policy.principals)) and ns is None:
                ns = self.principal_namespace(pod)
            rule, problem = _authorization_rule(policy, port, self.plan, ns or DEFAULT_NAMESPACE)
            if rule is None:
                effect = "refused" if rules.action == "ALLOW" else "let through"
                self.warn(pod, f"RBAC policy '{policy.name}' ({rules.action}) uses {problem}, which an "
                               f"AuthorizationPolicy cannot say: not exported (its requests are {effect})")
                continue
            istio_rules.append(rule)
        meta = self.meta(name, pod)
        if dry_run:
            meta["annotations"] = {DRY_RUN: "true"}
        spec: Doc = {"selector": {"matchLabels": selector(self.plan, pod)}, "action": rules.action}
        if istio_rules:
            spec["rules"] = istio_rules
        elif rules.action == "DENY":
            # A DENY policy without rules denies nothing; an ALLOW one without rules refuses everything, as
            # an Envoy ALLOW with no policy does.
            spec["rules"] = []
        return {"apiVersion": SECURITY, "kind": "AuthorizationPolicy", "metadata": meta, "spec": spec}

    def jwt(self, pod: str, name: str, config: JwtAuthnFilter, port: int) -> list[Doc]:
        """A RequestAuthentication (it validates any token it finds, but lets requests without one through) and,
        where the filter requires a token, a DENY policy for requests without a valid one."""
        rules = []
        for p in config.providers:
            rule, unsupported = _jwt_rule(p)
            for item in unsupported:
                self.warn(pod, f"jwt provider '{p.name}': {item}")
            if rule is not None:
                rules.append(rule)
        out: list[Doc] = []
        if rules:
            out.append({"apiVersion": SECURITY, "kind": "RequestAuthentication", "metadata": self.meta(name, pod),
                        "spec": {"selector": {"matchLabels": selector(self.plan, pod)}, "jwtRules": rules}})
        deny, unsupported = _jwt_requirements(config, port)
        for item in unsupported:
            self.warn(pod, f"jwt: {item}")
        if deny:
            out.append({"apiVersion": SECURITY, "kind": "AuthorizationPolicy", "metadata": self.meta(name, pod),
                        "spec": {"selector": {"matchLabels": selector(self.plan, pod)}, "action": "DENY",
                                 "rules": deny}})
        return out

    # ----------------------------------------------------------------- per host

    def host_objects(self) -> dict[str, list[Doc]]:
        """{host: its VirtualService and DestinationRule}, for the hosts the mesh says anything about."""
        out: dict[str, list[Doc]] = {}
        for name, host in self.hosts.items():
            docs = []
            if host.scoped or host.own:
                docs.append({"apiVersion": NETWORKING, "kind": "VirtualService", "metadata": self.meta(name, name),
                             "spec": {"hosts": [name], "http": self.http_routes(name, host)}})
            rule = self.destination_rule(name, host)
            if rule is not None:
                docs.append(rule)
            if docs:
                out[name] = docs
        return out

    def http_routes(self, name: str, host: _Host) -> list[Doc]:
        """The callers' routes (theirs only, by sourceLabels), then the host's own, then a catch-all: a
        VirtualService refuses (404) what none of its routes match, and meshctl routed it."""
        fallback = next((r for r in host.own if "match" not in r), None)
        routes = []
        counts: dict[str, int] = {}
        for caller, route in host.scoped:
            counts[caller] = counts.get(caller, 0) + 1
            route = _inherit(dict(route), fallback)
            source = {"sourceLabels": selector(self.plan, caller)}
            match = [{**m, **source} for m in route.pop("match", [{}])]
            routes.append({"name": f"from-{caller}" + (f"-{counts[caller]}" if counts[caller] > 1 else ""),
                           "match": match, **route})
        for i, route in enumerate(host.own):
            routes.append({"name": "ingress" + (f"-{i + 1}" if i else ""), **route})
        if fallback is None:
            routes.append({"name": "default", "route": [{"destination": {"host": name}}]})
        return routes

    def destination_rule(self, name: str, host: _Host) -> Doc | None:
        """One DestinationRule per host: it applies to every caller, so callers that configure the host
        differently get the first one's, with a warning."""
        per_port: dict[int, Doc] = {}
        for port, by_caller in sorted(host.policies.items()):
            chosen = next(((c, p) for c, p in by_caller.items() if p), None)
            if chosen is None:
                continue
            differ = sorted({k for p in by_caller.values() for k in {*p, *chosen[1]}
                             if json.dumps(p.get(k), sort_keys=True) != json.dumps(chosen[1].get(k), sort_keys=True)})
            if differ:
                self.warn(chosen[0], f"pods {', '.join(sorted(by_caller))} call {name}:{port} with different "
                                     f"{', '.join(differ)}; a DestinationRule applies to every caller: exported "
                                     f"the settings of pod '{chosen[0]}'")
            per_port[port] = chosen[1]
        if not per_port:
            return None
        spec: Doc = {"host": name}
        if len(host.policies) == 1:
            spec["trafficPolicy"] = next(iter(per_port.values()))
        else:
            spec["trafficPolicy"] = {"portLevelSettings": [{"port": {"number": port}, **policy}
                                                           for port, policy in per_port.items()]}
        return {"apiVersion": NETWORKING, "kind": "DestinationRule", "metadata": self.meta(name, name), "spec": spec}


# --------------------------------------------------------------------------- pure translations


def _mtls_mode(mode: str) -> str:
    return {"strict": "STRICT", "permissive": "PERMISSIVE"}.get(mode, "DISABLE")


def _route_clusters(lst: Listener) -> list[str]:
    """Every cluster the listener's routes name (mirrors included), in order, once."""
    names: dict[str, None] = {}
    for vh in lst.hcm.route_config.virtual_hosts:
        for r in vh.routes:
            names.update(dict.fromkeys(_clusters_of(r)))
            names.update(dict.fromkeys(m.cluster for m in r.mirror_policies))
    return list(names)


def _clusters_of(r: Route) -> list[str]:
    if r.weighted_clusters:
        return [w.name for w in r.weighted_clusters]
    return [r.cluster] if r.cluster else []


def _destination(dest: tuple[str, int] | None) -> Doc:
    assert dest is not None
    return {"host": dest[0], "port": {"number": dest[1]}}


def _percentages(weights: list[int]) -> tuple[list[int], bool]:
    """Weights as whole percentages summing to 100 (largest remainder), and whether that is exact."""
    total = sum(weights)
    raw = [w * 100 / total for w in weights]
    out = [int(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - out[i], reverse=True)[:100 - sum(out)]:
        out[i] += 1
    return out, all(x == o for x, o in zip(raw, out, strict=True))


def _match(m: RouteMatch) -> tuple[Doc, list[str]]:
    """An HTTPMatchRequest ({} for everything); Istio's regex is RE2, as ours."""
    out: Doc = {}
    unsupported: list[str] = []
    if m.path is not None:
        out["uri"] = {"exact": m.path}
    elif m.regex is not None:
        out["uri"] = {"regex": _pattern(m.regex)}
    elif m.prefix not in (None, "/"):
        out["uri"] = {"prefix": m.prefix}
    if "uri" in out and not m.case_sensitive:
        out["ignoreUriCase"] = True
    for h in m.headers:
        value = _string_match(h)
        if value is None:
            unsupported.append(f"header match on {h.name!r}")
            continue
        field_name = _MATCH_FIELDS.get(h.name)
        if h.invert or h.present is False:
            if field_name is not None:
                unsupported.append(f"inverted match on {h.name!r}")
                continue
            out.setdefault("withoutHeaders", {})[h.name] = value
        elif field_name is not None and value:
            out[field_name] = value
        elif h.name == ":path" or field_name is not None:
            unsupported.append(f"header match on {h.name!r}")
        else:
            out.setdefault("headers", {})[h.name] = value
    return out, unsupported


def _string_match(h: HeaderMatch) -> Doc | None:
    """Istio's StringMatch of a header matcher ({}: present), None when Istio has none."""
    if h.exact is not None:
        return {"exact": h.exact}
    if h.prefix is not None:
        return {"prefix": h.prefix}
    if h.suffix is not None:
        return {"regex": f".*{re.escape(h.suffix)}"}
    if h.regex is not None:
        return {"regex": _pattern(h.regex)}
    if h.present is not None:
        return {}
    return None


def _pattern(regex: Any) -> str:
    return str(getattr(regex, "pattern", regex))


def _fault_for(fault: FaultFilter | None, clusters: list[str]) -> FaultFilter | None:
    """The listener fault filter's own fault, for a route to ``clusters`` (its upstream_cluster narrows it)."""
    if fault is None or (fault.upstream_cluster is not None and fault.upstream_cluster not in clusters):
        return None
    return fault


def _fault(f: FaultFilter) -> tuple[Doc, list[str]]:
    out: Doc = {}
    unsupported = []
    if f.abort is not None:
        if f.abort.header_abort or f.abort.http_status is None:
            unsupported.append("fault abort header_abort (x-envoy-fault-abort-request)")
        else:
            out["abort"] = {"httpStatus": f.abort.http_status, "percentage": {"value": _percent(f.abort.percentage)}}
    if f.delay is not None:
        if f.delay.header_delay or f.delay.fixed_delay_s is None:
            unsupported.append("fault delay header_delay (x-envoy-fault-delay-request)")
        else:
            out["delay"] = {"fixedDelay": seconds(f.delay.fixed_delay_s),
                            "percentage": {"value": _percent(f.delay.percentage)}}
    if f.max_active_faults is not None:
        unsupported.append("fault max_active_faults")
    if f.headers:
        unsupported.append("fault headers (the requests it applies to)")
    return out, unsupported


def _percent(fraction: tuple[int, int]) -> float:
    numerator, denominator = fraction
    return round(100 * numerator / denominator, 6)


def _retries(policy: RetryPolicy | None) -> tuple[Doc, list[str]]:
    """HTTPRetry: Istio retries twice on connection failures when a route says nothing, meshctl does not
    retry without a policy, hence ``attempts: 0`` then."""
    if policy is None:
        return {"attempts": 0}, []
    out: Doc = {"attempts": policy.num_retries}
    unsupported = []
    codes = sorted(policy.retriable_status_codes) if "retriable-status-codes" in policy.retry_on else []
    bad = [c for c in codes if not _registered_status(c)]
    if bad:
        # Istio accepts a status code in retryOn only when it is a registered one.
        unsupported.append(f"retriable_status_codes {bad}")
    on = sorted(policy.retry_on - {"retriable-status-codes"}) + [str(c) for c in codes if c not in bad]
    if on:
        out["retryOn"] = ",".join(on)
    if policy.per_try_timeout_s:
        out["perTryTimeout"] = seconds(policy.per_try_timeout_s)
    if policy.backoff_base_s != DEFAULT_BACKOFF_S:
        out["backoff"] = seconds(policy.backoff_base_s)
    if policy.backoff_max_s is not None and policy.backoff_max_s != 10 * policy.backoff_base_s:
        unsupported.append("retry_back_off max_interval (Istio's is 10 times the base, as Envoy's default)")
    # Istio skips previously tried hosts unless told otherwise; Envoy (and meshctl) only with the predicate.
    out["retryIgnorePreviousHosts"] = policy.previous_hosts
    return out, unsupported


def _registered_status(code: int) -> bool:
    try:
        http.HTTPStatus(code)
    except ValueError:
        return False
    return True


def _headers(levels: Iterable[HeaderMutations]) -> tuple[Doc, list[str]]:
    """Istio's Headers of a route: the route's mutations, then its virtual host's and route configuration's
    (Envoy applies all three; the most specific wins a conflict)."""
    out: Doc = {}
    unsupported = []
    for level in levels:
        for direction, add, remove in (("request", level.request_add, level.request_remove),
                                       ("response", level.response_add, level.response_remove)):
            for h in add:
                action = _HEADER_ACTIONS.get(h.append_action)
                if action is None:
                    unsupported.append(f"{direction} header {h.name!r} with append_action {h.append_action}")
                    continue
                out.setdefault(direction, {}).setdefault(action, {}).setdefault(h.name, h.value)
            for name in remove:
                removed = out.setdefault(direction, {}).setdefault("remove", [])
                if name not in removed:
                    removed.append(name)
    return out, unsupported


def _rewrite(r: Route) -> Doc:
    out: Doc = {}
    if r.prefix_rewrite is not None:
        out["uri"] = r.prefix_rewrite
    if r.regex_rewrite is not None:
        out["uriRegexRewrite"] = {"match": _pattern(r.regex_rewrite.pattern), "rewrite": r.regex_rewrite.substitution}
    if r.host_rewrite_literal is not None:
        out["authority"] = r.host_rewrite_literal
    return out


def _inherit(route: Doc, own: Doc | None) -> Doc:
    """A caller's route with the destination's own ingress fault and timeout: meshctl applied both sidecars'
    (the caller's first), Istio applies one route, the caller's."""
    if own is None:
        return route
    if "fault" in own and "fault" not in route:
        route["fault"] = own["fault"]
    if "timeout" in own and ("timeout" not in route or _secs(own["timeout"]) < _secs(route["timeout"])):
        route["timeout"] = own["timeout"]
    return route


def _secs(text: str) -> float:
    return float(text.rstrip("s"))


def _connection_pool(c: Cluster) -> Doc:
    """ConnectionPoolSettings of the cluster's circuit breakers and connect timeout (those not meshctl's
    defaults; Istio's own are unlimited and 10 s)."""
    cb = c.circuit_breakers
    tcp: Doc = {}
    httpd: Doc = {}
    if cb.max_connections != DEFAULT_BREAKERS["max_connections"]:
        tcp["maxConnections"] = cb.max_connections
    if c.connect_timeout_s != DEFAULT_CONNECT_TIMEOUT_S:
        tcp["connectTimeout"] = seconds(c.connect_timeout_s)
    if cb.max_pending_requests != DEFAULT_BREAKERS["max_pending_requests"]:
        httpd["http1MaxPendingRequests"] = cb.max_pending_requests
    if cb.max_requests != DEFAULT_BREAKERS["max_requests"]:
        httpd["http2MaxRequests"] = cb.max_requests
    if cb.retry_budget_percent is None and cb.max_retries != DEFAULT_BREAKERS["max_retries"]:
        httpd["maxRetries"] = cb.max_retries
    out: Doc = {}
    if tcp:
        out["tcp"] = tcp
    if httpd:
        out["http"] = httpd
    return out


def _outlier(o: OutlierDetection) -> tuple[Doc, list[str]]:
    """OutlierDetection; Istio enforces a detector fully (100 %) when it is on, and exposes no success-rate
    detector settings."""
    out: Doc = {"consecutive5xxErrors": o.consecutive_5xx if o.enforcing_consecutive_5xx else 0}
    unsupported = []
    if o.enforcing_consecutive_5xx not in (0, 100):
        unsupported.append(f"outlier_detection enforcing_consecutive_5xx {o.enforcing_consecutive_5xx} (Istio: 100)")
    if o.enforcing_consecutive_gateway_failure:
        out["consecutiveGatewayErrors"] = o.consecutive_gateway_failure
        if o.enforcing_consecutive_gateway_failure != 100:
            unsupported.append("outlier_detection enforcing_consecutive_gateway_failure "
                               f"{o.enforcing_consecutive_gateway_failure} (Istio: 100)")
    out["interval"] = seconds(o.interval_s)
    out["baseEjectionTime"] = seconds(o.base_ejection_time_s)
    out["maxEjectionPercent"] = o.max_ejection_percent
    if o.split_external_local_origin_errors:
        out["splitExternalLocalOriginErrors"] = True
        out["consecutiveLocalOriginFailures"] = o.consecutive_local_origin_failure
    if o.max_ejection_time_s != DEFAULT_MAX_EJECTION_TIME_S:
        unsupported.append("outlier_detection max_ejection_time")
    defaults = OutlierDetection()
    if any(getattr(o, f) != getattr(defaults, f) for f in ("enforcing_success_rate", "success_rate_minimum_hosts",
                                                             "success_rate_request_volume",
                                                             "success_rate_stdev_factor")):
        unsupported.append("outlier_detection success-rate settings")
    return out, unsupported


def _cluster_unsupported(c: Cluster, inbound: bool) -> list[str]:
    out = []
    if c.health_checks:
        out.append("health_check is not exported (Istio has no active health checks; Kubernetes readiness "
                   "probes decide the endpoints)")
    if c.tls is not None:
        out.append("tls is not exported (Istio originates its own mTLS between sidecars)")
    if inbound and c.outlier_detection is not None:
        out.append("outlier_detection is not exported (the pod's own service has one endpoint)")
    if inbound and c.lb_policy != "ROUND_ROBIN":
        out.append("lb_policy is not exported (the pod's own service has one endpoint)")
    return out


def _traffic_policy(c: Cluster) -> tuple[Doc, list[str]]:
    """A DestinationRule's TrafficPolicy for calls through the cluster ({}: nothing differs)."""
    out: Doc = {}
    unsupported: list[str] = []
    pool = _connection_pool(c)
    if pool:
        out["connectionPool"] = pool
    if c.lb_policy != "ROUND_ROBIN":
        out["loadBalancer"] = {"simple": c.lb_policy}
    if c.outlier_detection is not None:
        out["outlierDetection"], more = _outlier(c.outlier_detection)
        unsupported += [f"{m} is not exported" for m in more]
    if c.circuit_breakers.retry_budget_percent is not None:
        out["retryBudget"] = {"percent": c.circuit_breakers.retry_budget_percent,
                              "minRetryConcurrency": c.circuit_breakers.min_retry_concurrency}
    unsupported += _cluster_unsupported(c, inbound=False)
    return out, unsupported


# --------------------------------------------------------------------------- RBAC and JWT


def _walk(rules: Iterable[Rule]) -> Iterable[Rule]:
    for rule in rules:
        yield rule
        if isinstance(rule.arg, tuple):
            yield from _walk(rule.arg)
        elif isinstance(rule.arg, Rule):
            yield from _walk((rule.arg,))


class _Unsupported(Exception):
    """A matcher an AuthorizationPolicy cannot say (the message names it)."""


def _authorization_rule(policy: Policy, port: int, plan: ExportPlan, namespace: str) -> tuple[Doc | None, str]:
    """One AuthorizationPolicy rule: (any principal) and (any permission), on ``port``; (None, why) when a
    matcher has no Istio form. Sources and operations are OR-ed lists, their fields AND-ed, as Envoy's
    or_ids/or_rules of and_ids/and_rules."""
    try:
        sources = _merge([s for p in policy.principals for s in _source(p, plan, namespace)])
        operations = _merge([o for p in policy.permissions for o in _operation(p)])
        when = _conditions(sources) + _conditions(operations)
    except _Unsupported as exc:
        return None, str(exc)
    rule: Doc = {}
    if sources != [{}]:
        rule["from"] = [{"source": s} for s in sources]
    ports = [str(port)]
    rule["to"] = [{"operation": {**o, "ports": ports} if "ports" not in o else o} for o in operations]
    if when:
        rule["when"] = when
    return rule, ""


def _conditions(items: list[Doc]) -> list[Doc]:
    """Takes the header conditions out of ``items``: a rule's ``when`` is AND-ed with all of it, so a
    condition can only come from the one alternative there is."""
    if not any("when" in i for i in items):
        return []
    if len(items) != 1:
        raise _Unsupported("a header condition OR-ed with other conditions")
    return list(items[0].pop("when"))


def _merge(items: list[Doc]) -> list[Doc]:
    """OR-ed single-field items of one field as one item ({methods: [GET]}, {methods: [POST]} -> one)."""
    if any(not i for i in items):
        return [{}]  # one alternative matches anything: so does the OR
    keys = {k for i in items for k in i}
    if len(keys) == 1 and all(len(i) == 1 for i in items) and keys != {"when"}:
        key = keys.pop()
        return [{key: [v for i in items for v in i[key]]}]
    return items


def _and(parts: list[list[Doc]]) -> list[Doc]:
    """AND of terms, each one item: their fields together (a field twice cannot be AND-ed in Istio)."""
    out: Doc = {}
    for part in parts:
        if len(part) != 1:
            raise _Unsupported("an OR of different fields inside an AND")
        for key, value in part[0].items():
            if key == "when":  # conditions are AND-ed
                out[key] = out.get(key, []) + value
            elif key in out:
                raise _Unsupported(f"two {key} conditions AND-ed")
            else:
                out[key] = value
    return [out]


def _operation(rule: Rule) -> list[Doc]:
    """Istio Operations (OR-ed) of an Envoy RBAC permission."""
    kind, arg = rule.kind, rule.arg
    if kind == "any":
        return [{}]
    if kind == "or_rules":
        return _merge([o for r in arg for o in _operation(r)])
    if kind == "and_rules":
        return _and([_operation(r) for r in arg])
    if kind == "not_rule":
        inner = _operation(arg)
        if len(inner) != 1 or len(inner[0]) != 1:
            raise _Unsupported("a not_rule of more than one condition")
        key, value = next(iter(inner[0].items()))
        if key.startswith("not"):
            raise _Unsupported("a double negation")
        return [{f"not{key[0].upper()}{key[1:]}": value}]
    if kind == "destination_port":
        return [{"ports": [str(arg)]}]
    if kind == "url_path":
        return [{"paths": [_path_value(arg)]}]
    if kind == "header" and arg.name == ":method" and arg.exact is not None and not arg.invert:
        return [{"methods": [arg.exact]}]
    if kind == "header" and arg.name in (":authority", "host") and arg.exact is not None and not arg.invert:
        return [{"hosts": [arg.exact]}]
    if kind == "header" and arg.name == ":path" and not arg.invert and (arg.exact or arg.prefix):
        return [{"paths": [arg.exact or f"{arg.prefix}*"]}]
    if kind == "header" and not arg.name.startswith(":"):
        return [{"when": [_header_condition(arg)]}]
    raise _Unsupported(f"a {kind} permission" + (f" on {arg.name!r}" if kind == "header" else ""))


def _header_condition(h: HeaderMatch) -> Doc:
    """A ``when`` condition on a request header (Istio's values: exact, ``prefix*``, ``*suffix``, ``*``)."""
    if h.exact is not None:
        value = h.exact
    elif h.prefix is not None:
        value = f"{h.prefix}*"
    elif h.suffix is not None:
        value = f"*{h.suffix}"
    elif h.present:
        value = "*"
    else:
        raise _Unsupported(f"a header match on {h.name!r} by regex or absence")
    return {"key": f"request.headers[{h.name}]", "notValues" if h.invert else "values": [value]}


def _path_value(m: StringMatch) -> str:
    """Istio's path forms: exact, ``prefix*``, ``*suffix``."""
    if m.ignore_case or m.regex is not None or m.contains is not None:
        raise _Unsupported("a url_path regex, contains or ignore_case match")
    if m.exact is not None:
        return m.exact
    return f"{m.prefix}*" if m.prefix is not None else f"*{m.suffix}"


def _source(rule: Rule, plan: ExportPlan, namespace: str) -> list[Doc]:
    """Istio Sources (OR-ed) of an Envoy RBAC principal."""
    kind, arg = rule.kind, rule.arg
    if kind == "any":
        return [{}]
    if kind == "or_ids":
        return _merge([s for r in arg for s in _source(r, plan, namespace)])
    if kind == "and_ids":
        return _and([_source(r, plan, namespace) for r in arg])
    if kind == "not_id":
        inner = _source(arg, plan, namespace)
        if len(inner) != 1 or len(inner[0]) != 1 or next(iter(inner[0])).startswith("not"):
            raise _Unsupported("a not_id of more than one condition")
        key, value = next(iter(inner[0].items()))
        return [{f"not{key[0].upper()}{key[1:]}": value}]
    if kind == "authenticated":
        return [{"principals": [_principal(arg, plan, namespace)]}]
    if kind in ("direct_remote_ip", "remote_ip"):
        return [{"ipBlocks" if kind == "direct_remote_ip" else "remoteIpBlocks": [str(arg)]}]
    if kind == "header" and not arg.name.startswith(":"):
        return [{"when": [_header_condition(arg)]}]
    raise _Unsupported(f"a {kind} principal")


def _principal(m: StringMatch | None, plan: ExportPlan, namespace: str) -> str:
    """A peer's SPIFFE id as Istio's principal: ``spiffe://MESH/pod/P`` is pod P's ServiceAccount; other ids
    keep their path (Istio's principal is the SPIFFE id without ``spiffe://``)."""
    if m is None:
        return "*"  # any authenticated peer
    if m.ignore_case or m.regex is not None or m.contains is not None:
        raise _Unsupported("a principal_name regex, contains or ignore_case match")
    own = f"spiffe://{plan.mesh}/pod/"
    if m.exact is not None and m.exact.startswith(own) and m.exact[len(own):] in plan.topology.pods:
        return principal(namespace, m.exact[len(own):])
    value = _path_value(m)
    return value.replace("spiffe://", "", 1)


def _jwt_rule(p: JwtProvider) -> tuple[Doc | None, list[str]]:
    if not p.issuer:
        return None, ["no issuer: not exported (Istio's jwtRules require one)"]
    rule: Doc = {"issuer": p.issuer}
    if p.audiences:
        rule["audiences"] = list(p.audiences)
    rule["jwks"] = p.jwks
    if p.from_headers:
        rule["fromHeaders"] = [{"name": h.name, **({"prefix": h.value_prefix} if h.value_prefix else {})}
                               for h in p.from_headers]
    if p.from_params:
        rule["fromParams"] = list(p.from_params)
    if p.forward:
        rule["forwardOriginalToken"] = True
    if p.forward_payload_header:
        rule["outputPayloadToHeader"] = p.forward_payload_header
    if p.claim_to_headers:
        rule["outputClaimToHeaders"] = [{"header": h, "claim": c} for h, c in p.claim_to_headers]
    unsupported = []
    if p.clock_skew_s != CLOCK_SKEW_S:
        unsupported.append(f"clock_skew_seconds {p.clock_skew_s} is not exported (Istio uses {CLOCK_SKEW_S})")
    return rule, unsupported


def _jwt_requirements(config: JwtAuthnFilter, port: int) -> tuple[list[Doc], list[str]]:
    """DENY rules for requests without a valid token where a rule requires one. Envoy takes the first rule
    that matches a request, so each rule excludes the paths of the rules before it."""
    issuers = {p.name: p.issuer for p in config.providers}
    rules: list[Doc] = []
    unsupported: list[str] = []
    earlier: list[str] = []  # paths of earlier rules
    for jr in config.rules:
        paths = _jwt_paths(jr)
        if paths is None:
            unsupported.append("a rule matching by regex, headers or case-insensitively is not exported")
            continue
        required = _required(jr.requires, issuers, unsupported)
        if required:
            operation: Doc = {"ports": [str(port)]}
            if paths:
                operation["paths"] = paths
            if earlier:
                operation["notPaths"] = list(earlier)
            rules.append({"from": [{"source": {"notRequestPrincipals": [f"{i}/*" for i in required]}}],
                          "to": [{"operation": operation}]})
        if not paths:
            break  # this rule matched every path: no later rule is reached
        earlier.extend(paths)
    return rules, unsupported


def _jwt_paths(jr: JwtRule) -> list[str] | None:
    """The rule's paths in Istio's forms ([]: every path), None when Istio cannot match like it."""
    if jr.regex is not None or jr.headers or not jr.case_sensitive:
        return None
    if jr.path is not None:
        return [jr.path]
    if jr.prefix in (None, "/"):
        return []
    return [f"{jr.prefix}*"]


def _required(req: Requirement | None, issuers: dict[str, str], unsupported: list[str]) -> list[str]:
    """The issuers one of whose tokens the requirement needs ([]: none needed, Istio's default)."""
    if req is None or req.kind in ("allow_missing", "allow_missing_or_failed"):
        if req is not None and req.kind == "allow_missing_or_failed":
            unsupported.append("allow_missing_or_failed is exported as allow_missing (Istio refuses an invalid "
                               "token)")
        return []
    if req.kind == "provider":
        if req.audiences:
            unsupported.append(f"provider_and_audiences of '{req.provider}' is exported without its audiences")
        return [issuers[req.provider]] if issuers.get(req.provider) else []
    children = [_required(c, issuers, unsupported) for c in req.children]
    if req.kind == "all":
        unsupported.append("requires_all is exported as requires_any")
    if any(not c for c in children):
        return []  # one alternative needs no token
    return sorted({i for c in children for i in c})
