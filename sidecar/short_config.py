"""Front end for the topology's short ``sidecar:`` form -> ``sidecar.config.Bootstrap``.

The short form exists so the common pod (one ingress to its own service, a few
named egress routes) needs no Envoy YAML. It compiles into exactly what the
equivalent Envoy file would (same listener names, stat prefixes and clusters),
so the data path, stats and access logs cannot tell the two apart. Being our
own schema, it is strict: unknown keys are errors with a suggestion, since a
misspelt ``retry_policy`` silently dropped is a retry that never happens.
"""

from __future__ import annotations

import re
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

from pods.addressing import is_ip
from sidecar.config import (
    AccessLog,
    Admin,
    Bootstrap,
    Cluster,
    CommonTls,
    DownstreamTls,
    Endpoint,
    FaultAbort,
    FaultDelay,
    FaultFilter,
    HeaderMatch,
    HttpConnectionManager,
    HttpFilter,
    Listener,
    LocalRateLimit,
    MirrorPolicy,
    Route,
    RouteConfig,
    RouteMatch,
    RuntimePercent,
    VirtualHost,
    WeightedCluster,
)
from sidecar.config_fields import (
    HEADER_MUTATION_KEYS,
    Ctx,
    as_bool,
    as_dict,
    as_int,
    as_list,
    as_port,
    as_str,
    check_keys,
    circuit_breaker_threshold,
    duration,
    header_mutations,
    health_check,
    lb_policy,
    local_host,
    mirror_policies,
    outlier_detection,
    retry_policy,
    self_routed,
    sub,
)
from sidecar.http_filters import FAULT, JWT_AUTHN, LOCAL_RATELIMIT, RBAC, live_fault_prefix

# JWT and RBAC are imported by the functions that compile them: a sidecar without `auth` never loads them.
if TYPE_CHECKING:
    from sidecar.jwt_authn import JwtAuthnFilter
    from sidecar.rbac import RbacRules, Rule

DEFAULT_ADMIN_PORT = 9901
DEFAULT_ACCESS_LOG = "/dev/stdout"


def compile_short(section: dict, pod_ip: str, public_admin: bool = False, source: str = "sidecar", *,
                  trust_domain: str | None = None) -> Bootstrap:
    """Compile a pod's ``sidecar:`` mapping; raises ConfigError naming the dotted path of the problem.

    ``trust_domain``: the mesh's SPIFFE trust domain (its name), which turns a bare pod name in an ingress
    ``allow``/``deny`` ``from`` into ``spiffe://<trust_domain>/pod/<name>``; None when the mesh has no mTLS.
    """
    ctx = Ctx(source, strict=True, sep=".")
    obj = as_dict(ctx, section, "")
    if "envoy" in obj:
        raise ctx.error("envoy", "an Envoy file cannot be combined with the short form here "
                                 "(sidecar.envoy is compiled by sidecar.envoy_config)")
    check_keys(ctx, obj, "", ("admin", "access_log", "ingress", "egress"))

    logs = _access_logs(ctx, obj.get("access_log", DEFAULT_ACCESS_LOG), "access_log")
    admin = _admin(ctx, obj.get("admin"), "admin", pod_ip, public_admin)
    listeners: list[Listener] = []
    clusters: list[Cluster] = []
    ports: dict[int, str] = {admin.port: "admin.port"}
    targets: dict[str, str] = {}  # cluster name -> the key that names its target, for error messages
    for key, build in (("ingress", partial(_ingress, trust_domain=trust_domain)), ("egress", _egress)):
        if obj.get(key) is None:
            continue
        listener, cl, to_paths = build(ctx, obj[key], key, pod_ip, logs)
        if listener.port in ports:
            raise ctx.error(sub(key, "port"), f"port {listener.port} is already used by {ports[listener.port]}")
        ports[listener.port] = sub(key, "port")
        for c in cl:
            if any(c.name == other.name for other in clusters):
                raise ctx.error(key, f"cluster name {c.name!r} is also used by the ingress; rename the target")
        listeners.append(listener)
        clusters.extend(cl)
        targets.update(to_paths)
    for c, ep, lst in self_routed(listeners, clusters):
        where = "" if ep.host == pod_ip else f"{ep.host}:"
        raise ctx.error(targets[c.name], f"{where}{ep.port} is this sidecar's own {lst.name} listener "
                                                  f"({ports[lst.port]}): every request would loop back into the "
                                                  f"sidecar (point it at the service, not at its sidecar)")
    return Bootstrap(listeners=tuple(listeners), clusters=tuple(clusters), admin=admin, warnings=tuple(ctx.warnings))


def _access_logs(ctx: Ctx, value: Any, path: str) -> tuple[AccessLog, ...]:
    """``access_log: PATH`` (Envoy's default format), or ``{path, format}`` with Envoy's command operators
    (e.g. ``%DOWNSTREAM_PEER_URI_SAN%``, the caller's SPIFFE id under mTLS)."""
    if value is None or value is False:
        return ()
    if isinstance(value, dict):
        check_keys(ctx, value, path, ("path", "format"))
        if "path" not in value:
            raise ctx.error(sub(path, "path"), "required")
        fmt = as_str(ctx, value["format"], sub(path, "format")) if value.get("format") is not None else None
        return (AccessLog(path=as_str(ctx, value["path"], sub(path, "path")), format=fmt),)
    return (AccessLog(path=as_str(ctx, value, path)),)


def _admin(ctx: Ctx, value: Any, path: str, pod_ip: str, public_admin: bool) -> Admin:
    obj = as_dict(ctx, value, path)
    check_keys(ctx, obj, path, ("port", "idle_timeout", "address") if public_admin else ("port", "idle_timeout"),
               errors={} if public_admin else {
                   "address": "the admin interface is always bound to the pod alias (enable public admin to "
                              "choose an address)"})
    port = as_port(ctx, obj.get("port", DEFAULT_ADMIN_PORT), sub(path, "port"))
    address = pod_ip
    if public_admin and "address" in obj:
        written = as_str(ctx, obj["address"], sub(path, "address"))
        address = written if written in ("0.0.0.0", "::") else local_host(written, pod_ip)
    kw = {}
    if obj.get("idle_timeout") is not None:
        kw["idle_timeout_s"] = duration(ctx, obj["idle_timeout"], sub(path, "idle_timeout"))
    return Admin(address=address, port=port, **kw)


def _target(ctx: Ctx, value: Any, path: str, pod_ip: str, default_host: str | None = None) -> tuple[str, int]:
    """``to``: "host:port", or a bare port when the host is implied (the pod's own service)."""
    if default_host is not None and (isinstance(value, int) and not isinstance(value, bool)
                                     or isinstance(value, str) and value.strip().isdigit()):
        # "${PORT}" in a topology interpolates to a string: a quoted port is still a port
        return default_host, as_port(ctx, int(value), path)
    if not isinstance(value, str) or ":" not in value:
        want = "a port or 'host:port'" if default_host is not None else "'host:port'"
        raise ctx.error(path, f"expected {want}, got {value!r}")
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ctx.error(path, f"expected 'host:port', got {value!r}")
    return local_host(host, pod_ip), as_port(ctx, int(port), path)


def _cluster_type(host: str) -> str:
    # Names go through the pod's hosts file at request time, as Envoy's STRICT_DNS re-resolves them.
    return "STATIC" if is_ip(host) else "STRICT_DNS"


def _route_kw(ctx: Ctx, obj: dict[str, Any], path: str) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if obj.get("timeout") is not None:
        kw["timeout_s"] = duration(ctx, obj["timeout"], sub(path, "timeout"))
    if obj.get("retry_policy") is not None:
        kw["retry_policy"] = retry_policy(ctx, obj["retry_policy"], sub(path, "retry_policy"))
    if obj.get("fault") is not None:
        kw["fault"] = _fault(ctx, obj["fault"], sub(path, "fault"))
    return kw


def _percent(ctx: Ctx, value: Any, path: str) -> int:
    """A percentage (0-100, decimals allowed) in ten-thousandths: the live faults' denominator."""
    if isinstance(value, str) and value.strip().endswith("%"):
        value = value.strip()[:-1]
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ctx.error(path, f"expected a percentage from 0 to 100, got {value!r}")
    if not 0 <= value <= 100:
        raise ctx.error(path, f"a percentage must be from 0 to 100, got {value:g}")
    return int(round(value * 100))


def _fault(ctx: Ctx, value: Any, path: str) -> FaultFilter:
    """``fault: {abort: {percent, status}, delay: {fixed, percent}}``: Envoy's per-route fault config.

    Percentages default to 100. Its runtime keys are the live faults' (``fault.http.<egress|ingress>.
    <cluster>.*``, filled in by ``_with_fault_keys``), so ``meshctl fault`` overrides it and ``--clear``
    restores it.
    """
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("abort", "delay"))
    kw: dict[str, Any] = {}
    if obj.get("abort") is not None:
        ap = sub(path, "abort")
        a = as_dict(ctx, obj["abort"], ap, allow_none=False)
        check_keys(ctx, a, ap, ("percent", "status"))
        status = as_int(ctx, a.get("status", 503), sub(ap, "status"), 200, 599)
        kw["abort"] = FaultAbort(http_status=status, percentage=(_percent(ctx, a.get("percent", 100),
                                                                           sub(ap, "percent")), 10000))
    if obj.get("delay") is not None:
        dp = sub(path, "delay")
        d = as_dict(ctx, obj["delay"], dp, allow_none=False)
        check_keys(ctx, d, dp, ("fixed", "percent"))
        if d.get("fixed") is None:
            raise ctx.error(sub(dp, "fixed"), "required (a duration like 100ms)")
        if isinstance(d["fixed"], str) and d["fixed"].strip().startswith("-"):
            raise ctx.error(sub(dp, "fixed"), f"a delay cannot be negative, got {d['fixed']!r}")
        fixed = duration(ctx, d["fixed"], sub(dp, "fixed"))
        if fixed <= 0:
            raise ctx.error(sub(dp, "fixed"), f"a delay must be greater than 0, got {d['fixed']!r}")
        kw["delay"] = FaultDelay(fixed_delay_s=fixed, percentage=(_percent(ctx, d.get("percent", 100),
                                                                            sub(dp, "percent")), 10000))
    if not kw:
        raise ctx.error(path, "abort or delay is required")
    return FaultFilter(**kw)


def _local_ratelimit(ctx: Ctx, value: Any, path: str, stat_prefix: str) -> LocalRateLimit:
    """``local_ratelimit: {max_tokens, tokens_per_fill, fill_interval, status}``: one token bucket for the
    listener, enabled and enforced (runtime keys ``<stat_prefix>.local_ratelimit.enabled|enforced``)."""
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("max_tokens", "tokens_per_fill", "fill_interval", "status"))
    for key in ("max_tokens", "fill_interval"):
        if obj.get(key) is None:
            raise ctx.error(sub(path, key), "required")
    fill = duration(ctx, obj["fill_interval"], sub(path, "fill_interval"))
    if fill <= 0:
        raise ctx.error(sub(path, "fill_interval"), "must be greater than 0")
    key = f"{stat_prefix}.local_ratelimit."
    return LocalRateLimit(stat_prefix=stat_prefix,
                          max_tokens=as_int(ctx, obj["max_tokens"], sub(path, "max_tokens"), 1),
                          tokens_per_fill=as_int(ctx, obj.get("tokens_per_fill", 1), sub(path, "tokens_per_fill"), 1),
                          fill_interval_s=fill,
                          filter_enabled=RuntimePercent(key + "enabled", (100, 100)),
                          filter_enforced=RuntimePercent(key + "enforced", (100, 100)),
                          status=as_int(ctx, obj.get("status", 429), sub(path, "status"), 200, 599))


def _with_filters(ctx: Ctx, listener: Listener, obj: dict[str, Any], path: str,
                  auth: tuple[HttpFilter, ...] = ()) -> Listener:
    """The HTTP filters the short form implies: a fault filter when a route has ``fault`` (its runtime keys
    the live faults'), then ``auth`` (jwt_authn, RBAC deny, RBAC allow: authentication before authorization,
    as Istio), a local rate limit for ``local_ratelimit``."""
    hcm = listener.hcm
    filters: list[HttpFilter] = []
    vhosts = []
    for vh in hcm.route_config.virtual_hosts:
        routes = []
        for r in vh.routes:
            if r.fault is not None:
                cluster = r.cluster or (r.weighted_clusters[0].name if r.weighted_clusters else "")
                prefix = live_fault_prefix(listener, cluster)
                r = replace(r, fault=replace(r.fault, abort_percent_runtime=prefix + "abort.abort_percent",
                                             abort_http_status_runtime=prefix + "abort.http_status",
                                             delay_percent_runtime=prefix + "delay.fixed_delay_percent",
                                             delay_duration_runtime=prefix + "delay.fixed_duration_ms"))
            routes.append(r)
        vhosts.append(replace(vh, routes=tuple(routes)))
    if any(r.fault is not None for vh in vhosts for r in vh.routes):
        filters.append(HttpFilter(FAULT, FaultFilter()))
    filters.extend(auth)
    if obj.get("local_ratelimit") is not None:
        filters.append(HttpFilter(LOCAL_RATELIMIT, _local_ratelimit(ctx, obj["local_ratelimit"],
                                                                   sub(path, "local_ratelimit"), hcm.stat_prefix)))
    if not filters:
        return listener
    rc = replace(hcm.route_config, virtual_hosts=tuple(vhosts))
    return replace(listener, hcm=replace(hcm, route_config=rc, http_filters=tuple(filters)))


def _ingress(ctx: Ctx, value: Any, path: str, pod_ip: str, logs: tuple[AccessLog, ...],
             trust_domain: str | None = None) -> tuple[Listener, list[Cluster], dict[str, str]]:
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("port", "to", "timeout", "retry_policy", "connect_timeout", "circuit_breakers",
                                "outlier_detection", "health_check", "fault", "local_ratelimit", "tls", *AUTH_KEYS))
    for key in ("port", "to"):
        if key not in obj:
            raise ctx.error(sub(path, key), "required")
    port = as_port(ctx, obj["port"], sub(path, "port"))
    host, to_port = _target(ctx, obj["to"], sub(path, "to"), pod_ip, default_host=pod_ip)
    cluster = Cluster(name="local_service", type=_cluster_type(host), endpoints=(Endpoint(host, to_port),),
                      **_cluster_kw(ctx, obj, path))
    route = Route(match=RouteMatch(prefix="/"), cluster=cluster.name, **_route_kw(ctx, obj, path))
    vhost = VirtualHost(name="local_service", domains=("*",), routes=(route,))
    hcm = HttpConnectionManager(stat_prefix="ingress_http", access_logs=logs,
                                route_config=RouteConfig(name="ingress_route", virtual_hosts=(vhost,)))
    listener = Listener(name="ingress", address=pod_ip, port=port, hcm=hcm, original_address="0.0.0.0",
                        tls=_tls_termination(ctx, obj["tls"], sub(path, "tls")) if obj.get("tls") is not None
                        else None)
    listener = _with_filters(ctx, listener, obj, path, _auth_filters(ctx, obj, path, trust_domain))
    return listener, [cluster], {cluster.name: sub(path, "to")}


def _tls_termination(ctx: Ctx, value: Any, path: str) -> DownstreamTls:
    """``tls: {cert: FILE, key: FILE}`` (or ``tls: mesh``: the replica's mesh certificate, filled in from
    ``--mesh-identity``): the ingress terminates TLS (ALPN http/1.1, no client certificate asked for). The
    files are re-read when they change (sidecar.tls)."""
    alpn = ("http/1.1",)
    if value == "mesh":
        return DownstreamTls(CommonTls(alpn=alpn))  # no files: apply_identity gives it the mesh certificate
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("cert", "key"))
    for key in ("cert", "key"):
        if key not in obj:
            raise ctx.error(sub(path, key), "required (or tls: mesh)")
    return DownstreamTls(CommonTls(cert_chain=as_str(ctx, obj["cert"], sub(path, "cert")),
                                   private_key=as_str(ctx, obj["key"], sub(path, "key")), alpn=alpn))


def _cluster_kw(ctx: Ctx, obj: dict[str, Any], path: str) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if obj.get("connect_timeout") is not None:
        kw["connect_timeout_s"] = duration(ctx, obj["connect_timeout"], sub(path, "connect_timeout"))
    if obj.get("lb_policy") is not None:
        kw["lb_policy"] = lb_policy(ctx, obj["lb_policy"], sub(path, "lb_policy"))
    if obj.get("circuit_breakers") is not None:
        kw["circuit_breakers"] = circuit_breaker_threshold(ctx, obj["circuit_breakers"], sub(path, "circuit_breakers"))
    if obj.get("outlier_detection") is not None:
        kw["outlier_detection"] = outlier_detection(ctx, obj["outlier_detection"], sub(path, "outlier_detection"))
    if obj.get("health_check") is not None:
        kw["health_checks"] = (health_check(ctx, obj["health_check"], sub(path, "health_check"), short=True),)
    return kw


def _egress(ctx: Ctx, value: Any, path: str, pod_ip: str,
            logs: tuple[AccessLog, ...]) -> tuple[Listener, list[Cluster], dict[str, str]]:
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("port", "routes", "local_ratelimit"))
    if "port" not in obj:
        raise ctx.error(sub(path, "port"), "required")
    port = as_port(ctx, obj["port"], sub(path, "port"))
    rpath = sub(path, "routes")
    if "routes" not in obj:
        raise ctx.error(rpath, "required")

    parsed = []  # (path, hosts, (host, port), route kw, cluster kw)
    for i, r in enumerate(as_list(ctx, obj["routes"], rpath)):
        p = sub(rpath, i)
        r = as_dict(ctx, r, p, allow_none=False)
        check_keys(ctx, r, p, ("host", "hosts", "to", "timeout", "retry_policy", "connect_timeout", "lb_policy",
                               "circuit_breakers", "outlier_detection", "health_check", "request_mirror_policies",
                               "fault", *HEADER_MUTATION_KEYS))
        route_kw = _route_kw(ctx, r, p)
        route_kw["headers"] = header_mutations(ctx, r, p)
        parsed.append((p, _hosts(ctx, r, p), _targets(ctx, r, p, pod_ip), route_kw, _cluster_kw(ctx, r, p),
                       _mirrors(ctx, r, p, pod_ip)))

    # One cluster per distinct target, named like the pod it reaches ("b"), or "b_80"
    # when the same host is reached on several ports.
    ports_by_host: dict[str, set[int]] = {}
    for _, _, targets, _, _, mirrors in parsed:
        for (host, tport), _ in (*targets, *mirrors):
            ports_by_host.setdefault(host, set()).add(tport)
    clusters: dict[tuple[str, int], Cluster] = {}
    cluster_paths: dict[tuple[str, int], str] = {}
    vhosts: list[VirtualHost] = []
    domains_seen: dict[str, str] = {}

    def cluster_for(target: tuple[str, int], p: str, cluster_kw: dict[str, Any]) -> str:
        host, tport = target
        name = host if len(ports_by_host[host]) == 1 else f"{host}_{tport}"
        cluster = Cluster(name=name, type=_cluster_type(host), endpoints=(Endpoint(host, tport),), **cluster_kw)
        if target in clusters and clusters[target] != cluster:
            raise ctx.error(p, f"routes to {host}:{tport} disagree on connect_timeout, lb_policy, "
                               f"circuit_breakers, outlier_detection or health_check (see {cluster_paths[target]})")
        clusters.setdefault(target, cluster)
        cluster_paths.setdefault(target, p)
        return name

    for p, hosts, targets, route_kw, cluster_kw, mirrors in parsed:
        names = [(cluster_for(t, p, cluster_kw), w) for t, w in targets]
        if len(names) == 1 and names[0][1] is None:
            name = names[0][0]
            route_kw["cluster"] = name
        else:
            name = names[0][0]
            route_kw["weighted_clusters"] = tuple(WeightedCluster(n, w or 0) for n, w in names)
        if mirrors:
            route_kw["mirror_policies"] = tuple(replace(m, cluster=cluster_for(t, p, cluster_kw)) for t, m in mirrors)
        domains: list[str] = []
        for h in hosts:
            for d in (h, f"{h}:*"):
                if d.lower() in domains_seen:
                    raise ctx.error(p, f"host {h!r} is already routed by {domains_seen[d.lower()]}")
                domains_seen[d.lower()] = p
                domains.append(d)
        vname = name if name not in {v.name for v in vhosts} else f"{name}_{len(vhosts)}"
        route = Route(match=RouteMatch(prefix="/"), **route_kw)
        vhosts.append(VirtualHost(name=vname, domains=tuple(domains), routes=(route,)))
    # No catch-all virtual host: a host nobody routed must get Envoy's 404 (NR), not a guess.
    hcm = HttpConnectionManager(stat_prefix="egress_http", access_logs=logs,
                                route_config=RouteConfig(name="egress_route", virtual_hosts=tuple(vhosts)))
    listener = Listener(name="egress", address=pod_ip, port=port, hcm=hcm, original_address="127.0.0.1")
    listener = _with_filters(ctx, listener, obj, path)
    return listener, list(clusters.values()), {c.name: sub(cluster_paths[t], "to") for t, c in clusters.items()}


def _hosts(ctx: Ctx, r: dict[str, Any], path: str) -> list[str]:
    if ("host" in r) == ("hosts" in r):
        raise ctx.error(path, "exactly one of host or hosts is required")
    if "host" in r:
        return [as_str(ctx, r["host"], sub(path, "host"))]
    hpath = sub(path, "hosts")
    hosts = [as_str(ctx, h, sub(hpath, i)) for i, h in enumerate(as_list(ctx, r["hosts"], hpath))]
    if not hosts:
        raise ctx.error(hpath, "at least one host is required")
    return hosts


def _target_required(ctx: Ctx, r: dict[str, Any], path: str, pod_ip: str) -> tuple[str, int]:
    if "to" not in r:
        raise ctx.error(sub(path, "to"), "required")
    return _target(ctx, r["to"], sub(path, "to"), pod_ip)


def _targets(ctx: Ctx, r: dict[str, Any], path: str, pod_ip: str) -> list[tuple[tuple[str, int], int | None]]:
    """``to: HOST:PORT``, or a weighted split (a canary): ``to: [{target: HOST:PORT, weight: N}, ...]``."""
    if not isinstance(r.get("to"), list):
        return [(_target_required(ctx, r, path, pod_ip), None)]
    tpath = sub(path, "to")
    out = []
    for i, item in enumerate(r["to"]):
        ipath = sub(tpath, i)
        item = as_dict(ctx, item, ipath, allow_none=False)
        check_keys(ctx, item, ipath, ("target", "weight"))
        for key in ("target", "weight"):
            if key not in item:
                raise ctx.error(sub(ipath, key), "required")
        out.append((_target(ctx, item["target"], sub(ipath, "target"), pod_ip),
                    as_int(ctx, item["weight"], sub(ipath, "weight"))))
    if not out:
        raise ctx.error(tpath, "at least one target is required")
    if sum(w or 0 for _, w in out) <= 0:
        raise ctx.error(tpath, "the sum of the weights must be greater than 0")
    return out


def _mirrors(ctx: Ctx, r: dict[str, Any], path: str, pod_ip: str) -> list[tuple[tuple[str, int], MirrorPolicy]]:
    """Envoy's request_mirror_policies, with ``cluster`` a HOST:PORT target as in ``to``."""
    if r.get("request_mirror_policies") is None:
        return []
    mpath = sub(path, "request_mirror_policies")
    items = as_list(ctx, r["request_mirror_policies"], mpath)
    targets = []
    for i, m in enumerate(items):
        m = as_dict(ctx, m, sub(mpath, i), allow_none=False)
        if "cluster" not in m:
            raise ctx.error(sub(sub(mpath, i), "cluster"), "required")
        targets.append(_target(ctx, m["cluster"], sub(sub(mpath, i), "cluster"), pod_ip))
    policies = mirror_policies(ctx, [{**m, "cluster": "-"} for m in items], mpath)
    return list(zip(targets, policies, strict=True))



# --- ingress authentication and authorization: jwt, deny, allow ----------------------------------------------------

AUTH_KEYS = ("allow", "deny", "jwt")
#: The methods an ``allow``/``deny`` entry may name (a typo would otherwise never match).
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT")
_POD_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


def _auth_filters(ctx: Ctx, obj: dict[str, Any], path: str, trust_domain: str | None) -> tuple[HttpFilter, ...]:
    out = []
    if obj.get("jwt") is not None:
        out.append(HttpFilter(JWT_AUTHN, _jwt(ctx, obj["jwt"], sub(path, "jwt"))))
    for key, action, stat_prefix in (("deny", "DENY", "deny."), ("allow", "ALLOW", "")):
        if obj.get(key) is not None:
            from sidecar.rbac import RbacFilter

            rules = _rbac_rules(ctx, obj[key], sub(path, key), action, trust_domain)
            out.append(HttpFilter(RBAC, RbacFilter(rules=rules, rules_stat_prefix=stat_prefix)))
    return tuple(out)


def _path_rule(ctx: Ctx, value: Any, path: str) -> Rule:
    """``/x/*`` is the prefix ``/x/``; anything else an exact path."""
    from sidecar.rbac import Rule, StringMatch

    text = as_str(ctx, value, path)
    if not text.startswith("/"):
        raise ctx.error(path, f"a path starts with '/', got {text!r}")
    if text.endswith("/*"):
        text = text[:-1]
        kind = "prefix"
    else:
        kind = "exact"
    if "*" in text:
        raise ctx.error(path, f"'*' is only allowed as a final '/*' (a prefix), got {value!r}")
    return Rule("url_path", StringMatch(**{kind: text}))


def _rbac_rules(ctx: Ctx, value: Any, path: str, action: str, trust_domain: str | None) -> RbacRules:
    """``allow``/``deny: [{from, methods, paths}]``: one policy per entry; an absent key matches anything."""
    from sidecar.rbac import Policy, RbacRules, Rule, StringMatch

    policies = []
    entries = as_list(ctx, value, path)
    if not entries:
        raise ctx.error(path, "at least one entry is required (an empty allow list would refuse everything)")
    width = len(str(len(entries) - 1))
    for i, entry in enumerate(entries):
        p = sub(path, i)
        e = as_dict(ctx, entry, p, allow_none=False)
        check_keys(ctx, e, p, ("from", "methods", "paths"))
        perms: list[Rule] = []
        if e.get("methods") is not None:
            mp = sub(p, "methods")
            methods = []
            for j, m in enumerate(as_list(ctx, e["methods"], mp)):
                name = as_str(ctx, m, sub(mp, j))
                if name not in METHODS:
                    raise ctx.error(sub(mp, j), f"unknown method {name!r} (one of {', '.join(METHODS)})")
                methods.append(Rule("header", HeaderMatch(name=":method", exact=name)))
            if not methods:
                raise ctx.error(mp, "at least one method is required (omit methods for any)")
            perms.append(Rule("or_rules", tuple(methods)))
        if e.get("paths") is not None:
            pp = sub(p, "paths")
            paths = [_path_rule(ctx, x, sub(pp, j)) for j, x in enumerate(as_list(ctx, e["paths"], pp))]
            if not paths:
                raise ctx.error(pp, "at least one path is required (omit paths for any)")
            perms.append(Rule("or_rules", tuple(paths)))
        permission = Rule("and_rules", tuple(perms)) if perms else Rule("any")
        principals: tuple[Rule, ...] = (Rule("any"),)
        if e.get("from") is not None:
            fp = sub(p, "from")
            froms = as_list(ctx, e["from"], fp)
            if not froms:
                raise ctx.error(fp, "at least one peer is required (omit from for any)")
            principals = tuple(Rule("authenticated", StringMatch(exact=_peer_id(ctx, x, sub(fp, j), trust_domain)))
                               for j, x in enumerate(froms))
        policies.append(Policy(name=f"{action.lower()}-{i:0{width}d}", permissions=(permission,),
                               principals=principals))
    return RbacRules(action=action, policies=tuple(policies))


def _peer_id(ctx: Ctx, value: Any, path: str, trust_domain: str | None) -> str:
    """A peer's SPIFFE id: written out, or a pod name of this mesh."""
    text = as_str(ctx, value, path)
    if text.startswith("spiffe://"):
        if len(text) <= len("spiffe://") or "/" not in text[len("spiffe://"):]:
            raise ctx.error(path, f"{text!r} is not a SPIFFE id (spiffe://TRUST_DOMAIN/PATH)")
        return text
    if not _POD_NAME.fullmatch(text):
        raise ctx.error(path, f"expected a pod name or a spiffe:// id, got {text!r}")
    if trust_domain is None:
        raise ctx.error(path, f"the pod name {text!r} needs the mesh's mtls (a peer is known by its certificate); "
                              "enable mtls or write a spiffe:// id")
    return f"spiffe://{trust_domain}/pod/{text}"


def _jwt(ctx: Ctx, value: Any, path: str) -> JwtAuthnFilter:
    """``jwt: {issuer, audiences, jwks: FILE, from_header, forward_payload_header, paths}``: one provider
    (``jwt``), required on ``paths`` (default: every path); the token is not forwarded (Envoy's default)."""
    from sidecar.jwt_authn import HeaderLocation, JwtAuthnFilter, JwtProvider, JwtRule, Requirement, parse_jwks

    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("issuer", "audiences", "jwks", "from_header", "forward_payload_header", "paths",
                                "forward"))
    for key in ("issuer", "jwks"):
        if obj.get(key) is None:
            raise ctx.error(sub(path, key), "required")
    issuer = as_str(ctx, obj["issuer"], sub(path, "issuer"))
    jwks_file = as_str(ctx, obj["jwks"], sub(path, "jwks"))
    try:
        with open(jwks_file) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ctx.error(sub(path, "jwks"), f"cannot read {jwks_file}: "
                                           f"{getattr(exc, 'strerror', None) or exc}") from None
    keys = parse_jwks(ctx, text, sub(path, "jwks"))
    ap = sub(path, "audiences")
    audiences = obj.get("audiences")
    if isinstance(audiences, str):
        audiences = [audiences]
    auds = tuple(as_str(ctx, a, sub(ap, i)) for i, a in enumerate(as_list(ctx, audiences, ap)))
    kw: dict[str, Any] = {}
    if obj.get("from_header") is not None:
        name = as_str(ctx, obj["from_header"], sub(path, "from_header")).lower()
        kw["from_headers"] = (HeaderLocation(name, "Bearer " if name == "authorization" else ""),)
    if obj.get("forward_payload_header") is not None:
        fh = as_str(ctx, obj["forward_payload_header"], sub(path, "forward_payload_header")).lower()
        if not re.fullmatch(r"[a-z0-9-]+", fh) or fh == "host":
            raise ctx.error(sub(path, "forward_payload_header"), f"{fh!r} is not a header name that can be set")
        kw["forward_payload_header"] = fh
    if "forward" in obj:
        kw["forward"] = as_bool(ctx, obj["forward"], sub(path, "forward"))
    provider = JwtProvider(name="jwt", jwks=text, keys=keys, issuer=issuer, audiences=auds, jwks_file=jwks_file,
                           **kw)
    requires = Requirement("provider", provider="jwt")
    if obj.get("paths") is None:
        rules: tuple[JwtRule, ...] = (JwtRule(prefix="/", requires=requires),)
    else:
        pp = sub(path, "paths")
        items = as_list(ctx, obj["paths"], pp)
        if not items:
            raise ctx.error(pp, "at least one path is required (omit paths for every path)")
        out = []
        for i, x in enumerate(items):
            sm = _path_rule(ctx, x, sub(pp, i)).arg
            out.append(JwtRule(prefix=sm.prefix, path=sm.exact, requires=requires))
        rules = tuple(out)
    return JwtAuthnFilter(providers=(provider,), rules=rules)
