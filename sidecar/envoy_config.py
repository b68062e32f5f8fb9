"""Front end for Envoy static bootstrap files (v2 and v3) -> ``sidecar.config.Bootstrap``.

We run a subset of Envoy. The contract with users is that a file either runs
the way Envoy would run it, or we say exactly which field we did not honour:
fields whose absence only loses a feature (stats, tracing, outlier detection)
become one warning each naming the field path; fields whose absence would make
traffic behave differently (TLS, other HTTP filters, dynamic config, match
conditions we cannot evaluate) are errors.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from pods.addressing import is_ip
from sidecar.config import (
    AccessLog,
    Admin,
    Bootstrap,
    CircuitBreakers,
    Cluster,
    CommonTls,
    ConfigError,
    DirectResponse,
    DownstreamTls,
    Endpoint,
    HeaderMatch,
    HttpConnectionManager,
    HttpFilter,
    Listener,
    RegexRewrite,
    Route,
    RouteConfig,
    RouteMatch,
    SanMatcher,
    Tracing,
    UpstreamTls,
    VirtualHost,
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
    weighted_clusters,
)
from sidecar.http_filters import FILTER_NAMES, parse_http_filter, parse_per_filter
from sidecar.safe_regex import RegexError, compile_regex

HCM_NAMES = ("envoy.filters.network.http_connection_manager", "envoy.http_connection_manager")
HCM_TYPES = (
    "type.googleapis.com/envoy.config.filter.network.http_connection_manager.v2.HttpConnectionManager",
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
)
ROUTER_NAMES = ("envoy.filters.http.router", "envoy.router")
FILE_LOGGERS = ("envoy.access_loggers.file", "envoy.file_access_log")
STD_LOGGERS = {"envoy.access_loggers.stdout": "/dev/stdout", "envoy.access_loggers.stderr": "/dev/stderr"}
CLUSTER_TYPES = ("STATIC", "STRICT_DNS", "LOGICAL_DNS")
#: Envoy 1.40's DNS cluster extension: where the deprecated cluster-level DNS fields now live.
DNS_CLUSTER_NAMES = ("envoy.cluster.dns", "envoy.cluster.strict_dns", "envoy.cluster.logical_dns")
DNS_CLUSTER_TYPE = "type.googleapis.com/envoy.extensions.clusters.dns.v3.DnsCluster"

_V2_TLS = "the v2 tls_context is not supported; use transport_socket (envoy.transport_sockets.tls)"
TLS_SOCKET_NAMES = ("envoy.transport_sockets.tls", "tls")
DOWNSTREAM_TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UPSTREAM_TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
TLS_INSPECTOR_NAMES = ("envoy.filters.listener.tls_inspector", "envoy.listener.tls_inspector")
_SDS = "SDS is not supported; give the certificate files (tls_certificates, validation_context)"
_SAN_TYPES = ("URI", "DNS", "IP_ADDRESS", "EMAIL")
_DYNAMIC = "dynamic configuration (xDS) is not supported; use static_resources"
ZIPKIN_NAMES = ("envoy.tracers.zipkin", "envoy.zipkin")
ZIPKIN_TYPE = "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig"
TRACE_CONTEXT_OPTIONS = ("USE_B3", "USE_B3_WITH_W3C_PROPAGATION")
TRAFFIC_DIRECTIONS = ("UNSPECIFIED", "INBOUND", "OUTBOUND")
#: The layered_runtime static-layer keys we read (the Zipkin reporter's flush); others are Envoy feature flags.
RUNTIME_KEYS = ("tracing.zipkin.flush_interval_ms", "tracing.zipkin.min_flush_spans")


def load_envoy(path: str | Path, pod_ip: str, public_admin: bool = False) -> Bootstrap:
    """Read an Envoy bootstrap file (YAML, or JSON by extension) and compile it."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    if source.endswith(".json"):
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{source}: not valid JSON: {exc}") from None
    else:
        import yaml  # only for YAML files: a JSON bootstrap starts faster without it

        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    return compile_envoy(doc, pod_ip, public_admin=public_admin, source=source)


def compile_envoy(doc: dict, pod_ip: str, public_admin: bool = False, source: str = "envoy.yaml") -> Bootstrap:
    """Compile a parsed Envoy bootstrap; raises ConfigError naming the first field we cannot honour."""
    ctx = Ctx(source)
    if not isinstance(doc, dict):
        raise ctx.error("", f"expected an Envoy bootstrap mapping at the top level, got {type(doc).__name__}")
    check_keys(ctx, doc, "", ("static_resources", "admin", "dynamic_resources", "node", "layered_runtime"))
    if doc.get("dynamic_resources"):
        raise ctx.error("dynamic_resources", _DYNAMIC)
    if "dynamic_resources" in doc:
        ctx.warn("dynamic_resources", "empty, ignored")

    static = as_dict(ctx, doc.get("static_resources"), "static_resources")
    check_keys(ctx, static, "static_resources", ("listeners", "clusters"))
    clusters = [_cluster(ctx, c, f"static_resources.clusters[{i}]", pod_ip)
                for i, c in enumerate(as_list(ctx, static.get("clusters"), "static_resources.clusters"))]
    ctx.clusters = {c.name for c in clusters}
    listeners = [_listener(ctx, lst, f"static_resources.listeners[{i}]", i, pod_ip)
                 for i, lst in enumerate(as_list(ctx, static.get("listeners"), "static_resources.listeners"))]
    admin = _admin(ctx, doc["admin"], "admin", pod_ip, public_admin) if doc.get("admin") is not None else None

    _cross_check(ctx, listeners, clusters, admin)
    node_id, node_cluster = _node(ctx, doc.get("node"), "node")
    runtime = _layered_runtime(ctx, doc.get("layered_runtime"), "layered_runtime")
    return Bootstrap(listeners=tuple(listeners), clusters=tuple(clusters), admin=admin,
                     warnings=tuple(ctx.warnings), node_id=node_id, node_cluster=node_cluster, runtime=runtime)


def _node(ctx: Ctx, value: Any, path: str) -> tuple[str, str]:
    """node.id and node.cluster (Envoy's --service-node / --service-cluster): the spans' node_id and service."""
    obj = as_dict(ctx, value, path)
    check_keys(ctx, obj, path, ("id", "cluster"))
    return (as_str(ctx, obj["id"], sub(path, "id")) if obj.get("id") else "",
            as_str(ctx, obj["cluster"], sub(path, "cluster")) if obj.get("cluster") else "")


def _layered_runtime(ctx: Ctx, value: Any, path: str) -> tuple[tuple[str, str], ...]:
    """The static layers' values of ``RUNTIME_KEYS``. The rest of the runtime is /runtime_modify's admin layer
    (its layers and other keys are Envoy's own and change nothing we run), so they pass silently."""
    obj = as_dict(ctx, value, path)
    out: dict[str, str] = {}
    for i, layer in enumerate(as_list(ctx, obj.get("layers"), sub(path, "layers"))):
        lpath = sub(sub(path, "layers"), i)
        static = as_dict(ctx, as_dict(ctx, layer, lpath).get("static_layer"), sub(lpath, "static_layer"))
        for key in RUNTIME_KEYS:
            if key in static:
                out[key] = str(as_int(ctx, static[key], sub(sub(lpath, "static_layer"), key), 1))
    return tuple(out.items())


# --- addresses ------------------------------------------------------------------------

def _socket_address(ctx: Ctx, value: Any, path: str) -> tuple[str, int]:
    """(address, port) as written; pipes and UDP cannot carry our HTTP."""
    addr = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, addr, path, ("socket_address",),
               errors={"pipe": "unix domain sockets are not supported",
                       "envoy_internal_address": "internal addresses are not supported"})
    spath = sub(path, "socket_address")
    sock = as_dict(ctx, addr.get("socket_address"), spath, allow_none=False)
    check_keys(ctx, sock, spath, ("address", "port_value", "protocol"),
               errors={"named_port": "named ports are not supported; use port_value"})
    if str(sock.get("protocol", "TCP")).upper() != "TCP":
        raise ctx.error(sub(spath, "protocol"), "only TCP is supported")
    if "address" not in sock:
        raise ctx.error(sub(spath, "address"), "required")
    if "port_value" not in sock:
        raise ctx.error(sub(spath, "port_value"), "required")
    host = as_str(ctx, sock["address"], sub(spath, "address"))
    return host, as_port(ctx, sock["port_value"], sub(spath, "port_value"))


# --- listeners ----------------------------------------------------------------------------

def _listener(ctx: Ctx, value: Any, path: str, index: int, pod_ip: str) -> Listener:
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("name", "address", "filter_chains", "listener_filters", "traffic_direction"),
               errors={"use_original_dst": "original-destination listeners are not supported",
                       "transparent": "transparent listeners are not supported",
                       "default_filter_chain": "filter chain matching is not supported",
                       "udp_listener_config": "UDP listeners are not supported",
                       "api_listener": "API listeners are not supported"})
    inspector = _listener_filters(ctx, obj.get("listener_filters"), sub(path, "listener_filters"))
    direction = str(obj.get("traffic_direction", "UNSPECIFIED")).upper()
    if direction not in TRAFFIC_DIRECTIONS:
        raise ctx.error(sub(path, "traffic_direction"), f"expected one of {', '.join(TRAFFIC_DIRECTIONS)}")
    lst = _listener_body(ctx, obj, path, index, pod_ip, inspector)
    tracing = lst.hcm.tracing
    if tracing is not None and direction != "UNSPECIFIED":  # the span's kind and name follow the listener's
        lst = replace(lst, hcm=replace(lst.hcm, tracing=replace(tracing, traffic_direction=direction)))
    return lst


def _listener_body(ctx: Ctx, obj: dict[str, Any], path: str, index: int, pod_ip: str, inspector: bool) -> Listener:
    if "address" not in obj:
        raise ctx.error(sub(path, "address"), "required")
    written, port = _socket_address(ctx, obj["address"], sub(path, "address"))
    name = as_str(ctx, obj["name"], sub(path, "name")) if "name" in obj else f"{written}_{port}"

    fpath = sub(path, "filter_chains")
    chains = as_list(ctx, obj.get("filter_chains"), fpath)
    if len(chains) == 1:
        hcm, tls, match = _filter_chain(ctx, chains[0], sub(fpath, 0))
        if match is not None:
            raise ctx.error(sub(sub(fpath, 0), "filter_chain_match"),
                            "filter chain matching is only supported as the permissive pair: one chain with "
                            "transport_protocol: tls (and a transport_socket), one without filter_chain_match")
        return Listener(name=name, address=local_host(written, pod_ip), port=port, hcm=hcm,
                        original_address=written, tls=tls)
    if len(chains) != 2:
        raise ctx.error(fpath, f"one filter chain (or a TLS and a plaintext one) is supported, got {len(chains)}")
    # The permissive pair (Istio's PERMISSIVE mTLS): tls_inspector sends a ClientHello to the TLS chain and
    # anything else to the plaintext one; both must serve the same HTTP connection manager.
    parsed = [_filter_chain(ctx, c, sub(fpath, i)) for i, c in enumerate(chains)]
    tls_i = [i for i, (_, _, m) in enumerate(parsed) if m == "tls"]
    plain_i = [i for i, (_, t, m) in enumerate(parsed) if m is None and t is None]
    if len(tls_i) != 1 or len(plain_i) != 1 or parsed[tls_i[0]][1] is None:
        raise ctx.error(fpath, "two filter chains are supported only as the permissive pair: one with "
                               "filter_chain_match.transport_protocol: tls and a TLS transport_socket, one "
                               "without filter_chain_match nor transport_socket")
    if not inspector:
        raise ctx.error(sub(path, "listener_filters"), "matching transport_protocol: tls needs the "
                                                       "envoy.filters.listener.tls_inspector listener filter")
    hcm, tls, _ = parsed[tls_i[0]]
    if parsed[plain_i[0]][0] != hcm:
        raise ctx.error(sub(fpath, plain_i[0]), "the plaintext filter chain must have the same "
                                                "http_connection_manager as the TLS one")
    return Listener(name=name, address=local_host(written, pod_ip), port=port, hcm=hcm, original_address=written,
                    tls=tls, plaintext_allowed=True)


def _listener_filters(ctx: Ctx, value: Any, path: str) -> bool:
    """Only tls_inspector (True when present): any other listener filter changes how connections are handled."""
    found = False
    for i, f in enumerate(as_list(ctx, value, path)):
        fp = sub(path, i)
        f = as_dict(ctx, f, fp, allow_none=False)
        if f.get("name") not in TLS_INSPECTOR_NAMES:
            raise ctx.error(sub(fp, "name"), f"listener filter {f.get('name')!r} is not supported (only "
                                             f"{TLS_INSPECTOR_NAMES[0]}); without it connections would be "
                                             "handled differently")
        check_keys(ctx, f, fp, ("typed_config",), silent=("name",))
        cfg = as_dict(ctx, f.get("typed_config"), sub(fp, "typed_config"))
        check_keys(ctx, cfg, sub(fp, "typed_config"), ())
        found = True
    return found


def _filter_chain(ctx: Ctx, value: Any, path: str) -> tuple[HttpConnectionManager, DownstreamTls | None,
                                                              str | None]:
    """(the connection manager, the chain's TLS context, its filter_chain_match transport_protocol)."""
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("filters", "transport_socket", "filter_chain_match"), silent=("name",),
               errors={"tls_context": _V2_TLS,
                       "use_proxy_proto": "the PROXY protocol is not supported"})
    match = None
    if obj.get("filter_chain_match") is not None:
        mpath = sub(path, "filter_chain_match")
        m = as_dict(ctx, obj["filter_chain_match"], mpath)
        check_keys(ctx, m, mpath, ("transport_protocol",),
                   errors={k: "filter chain matching is not supported (only transport_protocol: tls)"
                           for k in m if k != "transport_protocol"})
        if m.get("transport_protocol", "tls") != "tls":
            raise ctx.error(sub(mpath, "transport_protocol"), "only 'tls' is supported")
        match = "tls"
    tls = None
    if obj.get("transport_socket") is not None:
        tls = _transport_socket(ctx, obj["transport_socket"], sub(path, "transport_socket"), downstream=True)
    return _chain_hcm(ctx, obj, path), tls, match  # type: ignore[return-value]


def _chain_hcm(ctx: Ctx, obj: dict[str, Any], path: str) -> HttpConnectionManager:
    fpath = sub(path, "filters")
    filters = as_list(ctx, obj.get("filters"), fpath)
    if len(filters) != 1:
        raise ctx.error(fpath, f"exactly one network filter (the http_connection_manager) is supported, "
                               f"got {len(filters)}")
    f = as_dict(ctx, filters[0], sub(fpath, 0), allow_none=False)
    name = f.get("name")
    if name not in HCM_NAMES:
        raise ctx.error(sub(sub(fpath, 0), "name"),
                        f"network filter {name!r} is not supported; only the http_connection_manager is")
    check_keys(ctx, f, sub(fpath, 0), ("typed_config", "config"), silent=("name",))
    key = "typed_config" if "typed_config" in f else "config"
    cpath = sub(sub(fpath, 0), key)
    cfg = as_dict(ctx, f.get(key), cpath, allow_none=False)
    if key == "typed_config" and cfg.get("@type") not in HCM_TYPES:
        raise ctx.error(sub(cpath, "@type"), f"unsupported type {cfg.get('@type')!r}; expected the v2 or v3 "
                                             "HttpConnectionManager")
    return _hcm(ctx, cfg, cpath)


def _hcm(ctx: Ctx, cfg: dict[str, Any], path: str) -> HttpConnectionManager:
    check_keys(ctx, cfg, path, ("codec_type", "stat_prefix", "access_log", "route_config", "http_filters",
                                "use_remote_address", "max_request_headers_kb", "stream_idle_timeout", "tracing"),
               errors={"rds": _DYNAMIC, "scoped_routes": _DYNAMIC,
                       "http2_protocol_options": "HTTP/2 is not supported; we speak HTTP/1.1",
                       "http3_protocol_options": "HTTP/3 is not supported; we speak HTTP/1.1"})
    codec = str(cfg.get("codec_type", "AUTO")).upper()
    if codec not in ("AUTO", "HTTP1"):
        raise ctx.error(sub(path, "codec_type"), f"{cfg['codec_type']} is not supported; we speak HTTP/1.1 "
                                                 "(use AUTO or HTTP1)")
    if "stat_prefix" not in cfg:
        raise ctx.error(sub(path, "stat_prefix"), "required")
    stat_prefix = as_str(ctx, cfg["stat_prefix"], sub(path, "stat_prefix"))
    if "route_config" not in cfg:
        raise ctx.error(sub(path, "route_config"), "required (rds is not supported)")
    route_config = _route_config(ctx, cfg["route_config"], sub(path, "route_config"))
    http_filters = _http_filters(ctx, cfg.get("http_filters"), sub(path, "http_filters"))
    logs = [log for i, a in enumerate(as_list(ctx, cfg.get("access_log"), sub(path, "access_log")))
            if (log := _access_log(ctx, a, sub(sub(path, "access_log"), i))) is not None]
    kw: dict[str, Any] = {}
    if "use_remote_address" in cfg:
        kw["use_remote_address"] = as_bool(ctx, cfg["use_remote_address"], sub(path, "use_remote_address"))
    if "max_request_headers_kb" in cfg:
        kw["max_request_headers_kb"] = as_int(ctx, cfg["max_request_headers_kb"], sub(path, "max_request_headers_kb"),
                                              1, 8192)
    if "stream_idle_timeout" in cfg:
        kw["stream_idle_timeout_s"] = duration(ctx, cfg["stream_idle_timeout"], sub(path, "stream_idle_timeout"))
    if cfg.get("tracing") is not None:
        kw["tracing"] = _tracing(ctx, cfg["tracing"], sub(path, "tracing"))
    return HttpConnectionManager(stat_prefix=stat_prefix, route_config=route_config, access_logs=tuple(logs),
                                 codec_type=codec, http_filters=http_filters, **kw)


def _percent(ctx: Ctx, value: Any, path: str) -> float:
    """type.v3.Percent: ``{value: 12.5}`` (or the number alone), 0 to 100."""
    if isinstance(value, dict):
        check_keys(ctx, value, path, ("value",))
        value = value.get("value", 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise ctx.error(path, f"expected a percentage from 0 to 100, got {value!r}")
    return float(value)


def _tracing(ctx: Ctx, value: Any, path: str) -> Tracing | None:
    """HttpConnectionManager.tracing with the Zipkin provider; another provider is a warning (no tracing)."""
    obj = as_dict(ctx, value, path)
    check_keys(ctx, obj, path, ("provider", "random_sampling", "client_sampling", "overall_sampling",
                                "spawn_upstream_span", "max_path_tag_length"))
    ppath = sub(path, "provider")
    provider = as_dict(ctx, obj.get("provider"), ppath)
    if not provider:
        ctx.warn(ppath, "no tracing provider: nothing is traced")
        return None
    name = provider.get("name")
    if name not in ZIPKIN_NAMES:
        ctx.warn(sub(ppath, "name"), f"tracer {name!r} not implemented, ignored (supported: {ZIPKIN_NAMES[0]})")
        return None
    check_keys(ctx, provider, ppath, ("typed_config",), silent=("name",))
    tpath = sub(ppath, "typed_config")
    zc = as_dict(ctx, provider.get("typed_config"), tpath, allow_none=False)
    if zc.get("@type", ZIPKIN_TYPE) != ZIPKIN_TYPE:
        raise ctx.error(sub(tpath, "@type"), f"unsupported type {zc.get('@type')!r}; expected {ZIPKIN_TYPE}")
    check_keys(ctx, zc, tpath, ("collector_cluster", "collector_endpoint", "collector_endpoint_version",
                                "trace_id_128bit", "shared_span_context", "trace_context_option"),
               silent=("collector_hostname",),  # the Host of our reports is the cluster's name, Envoy's default
               errors={"split_spans_for_request": "not supported: it changes which spans are reported",
                       "collector_service": "not supported; use collector_cluster and collector_endpoint"})
    if "collector_cluster" not in zc:
        raise ctx.error(sub(tpath, "collector_cluster"), "required")
    cluster = as_str(ctx, zc["collector_cluster"], sub(tpath, "collector_cluster"))
    if ctx.clusters is not None and cluster not in ctx.clusters:  # Envoy refuses it at start-up too
        raise ctx.error(sub(tpath, "collector_cluster"), f"unknown cluster {cluster!r}")
    if "collector_endpoint" not in zc:
        raise ctx.error(sub(tpath, "collector_endpoint"), "required")
    endpoint = as_str(ctx, zc["collector_endpoint"], sub(tpath, "collector_endpoint"))
    if not endpoint.startswith("/"):
        raise ctx.error(sub(tpath, "collector_endpoint"), f"expected a path starting with '/', got {endpoint!r}")
    version = str(zc.get("collector_endpoint_version", "HTTP_JSON")).upper()
    if version != "HTTP_JSON":
        raise ctx.error(sub(tpath, "collector_endpoint_version"), f"{version} is not supported; use HTTP_JSON")
    option = str(zc.get("trace_context_option", "USE_B3")).upper()
    if option not in TRACE_CONTEXT_OPTIONS:
        raise ctx.error(sub(tpath, "trace_context_option"), f"expected one of {', '.join(TRACE_CONTEXT_OPTIONS)}")
    kw: dict[str, Any] = {}
    for key in ("random_sampling", "client_sampling", "overall_sampling"):
        if key in obj:
            kw[key] = _percent(ctx, obj[key], sub(path, key))
    if "spawn_upstream_span" in obj:
        kw["spawn_upstream_span"] = as_bool(ctx, obj["spawn_upstream_span"], sub(path, "spawn_upstream_span"))
    if "max_path_tag_length" in obj:
        mp = obj["max_path_tag_length"]
        mp = mp.get("value") if isinstance(mp, dict) else mp
        kw["max_path_tag_length"] = as_int(ctx, mp, sub(path, "max_path_tag_length"), 1)
    for key in ("trace_id_128bit", "shared_span_context"):
        if key in zc:
            kw[key] = as_bool(ctx, zc[key], sub(tpath, key))
    return Tracing(collector_cluster=cluster, collector_endpoint=endpoint, trace_context_option=option, **kw)


def _http_filters(ctx: Ctx, value: Any, path: str) -> tuple[HttpFilter, ...]:
    """The fault, local rate limit, RBAC and JWT authentication filters, then the router: any other HTTP
    filter would transform traffic in ways we would silently skip."""
    out: list[HttpFilter] = []
    for i, f in enumerate(as_list(ctx, value, path)):
        fpath = sub(path, i)
        f = as_dict(ctx, f, fpath, allow_none=False)
        name = f.get("name")
        if name in FILTER_NAMES:
            check_keys(ctx, f, fpath, ("typed_config", "config"), silent=("name",))
            out.append(parse_http_filter(ctx, f, fpath, _header))
            continue
        if name not in ROUTER_NAMES:
            raise ctx.error(sub(fpath, "name"), f"http filter {name!r} is not supported; running without it "
                                                "would change behaviour (supported: "
                                                f"{', '.join(FILTER_NAMES)}, envoy.filters.http.router)")
        check_keys(ctx, f, fpath, ("typed_config", "config"), silent=("name",))
        for key in ("typed_config", "config"):
            cfg = as_dict(ctx, f.get(key), sub(fpath, key))
            check_keys(ctx, cfg, sub(fpath, key), ())
    return tuple(out)


def _access_log(ctx: Ctx, value: Any, path: str) -> AccessLog | None:
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("typed_config", "config", "filter"), silent=("name",))
    name = obj.get("name")
    if "filter" in obj:
        ctx.warn(sub(path, "filter"), "not implemented, ignored (every request is logged)")
    key = "typed_config" if "typed_config" in obj else "config"
    cpath = sub(path, key)
    cfg = as_dict(ctx, obj.get(key), cpath)
    if name in STD_LOGGERS:
        check_keys(ctx, cfg, cpath, ("log_format",))
        return AccessLog(path=STD_LOGGERS[name], format=_log_format(ctx, cfg, cpath))
    if name not in FILE_LOGGERS:
        ctx.warn(sub(path, "name"), f"access logger {name!r} not implemented, ignored")
        return None
    check_keys(ctx, cfg, cpath, ("path", "log_format", "format"))
    if "path" not in cfg:
        raise ctx.error(sub(cpath, "path"), "required")
    return AccessLog(path=as_str(ctx, cfg["path"], sub(cpath, "path")), format=_log_format(ctx, cfg, cpath))


def _log_format(ctx: Ctx, cfg: dict[str, Any], path: str) -> str | None:
    if "format" in cfg:  # v2 FileAccessLog.format
        return as_str(ctx, cfg["format"], sub(path, "format"))
    if "log_format" not in cfg:
        return None
    lpath = sub(path, "log_format")
    lf = as_dict(ctx, cfg["log_format"], lpath)
    check_keys(ctx, lf, lpath, ("text_format", "text_format_source"),
               errors={"json_format": "JSON access log format is not supported",
                       "typed_json_format": "JSON access log format is not supported"})
    if "text_format" in lf:
        return as_str(ctx, lf["text_format"], sub(lpath, "text_format"))
    if "text_format_source" in lf:
        spath = sub(lpath, "text_format_source")
        src = as_dict(ctx, lf["text_format_source"], spath)
        check_keys(ctx, src, spath, ("inline_string",),
                   errors={"filename": "only inline_string is supported", "inline_bytes": "only inline_string is "
                           "supported"})
        return as_str(ctx, src.get("inline_string"), sub(spath, "inline_string"))
    return None


# --- routes ----------------------------------------------------------------------------------

def _route_config(ctx: Ctx, value: Any, path: str) -> RouteConfig:
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("name", "virtual_hosts", *HEADER_MUTATION_KEYS), errors={"vhds": _DYNAMIC})
    vpath = sub(path, "virtual_hosts")
    vhosts = [_virtual_host(ctx, v, sub(vpath, i)) for i, v in enumerate(as_list(ctx, obj.get("virtual_hosts"), vpath))]
    seen: dict[str, str] = {}
    for i, vh in enumerate(vhosts):
        for d in vh.domains:
            if d.lower() in seen:
                raise ctx.error(sub(sub(vpath, i), "domains"),
                                f"domain {d!r} is already used by virtual host {seen[d.lower()]!r}")
            seen[d.lower()] = vh.name
    name = as_str(ctx, obj["name"], sub(path, "name")) if "name" in obj else ""
    return RouteConfig(name=name, virtual_hosts=tuple(vhosts), headers=header_mutations(ctx, obj, path))


def _virtual_host(ctx: Ctx, value: Any, path: str) -> VirtualHost:
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("name", "domains", "routes", "retry_policy", "require_tls",
                                "include_request_attempt_count", *HEADER_MUTATION_KEYS))
    if str(obj.get("require_tls", "NONE")).upper() != "NONE":
        raise ctx.error(sub(path, "require_tls"), "require_tls (a redirect to https) is not supported")
    if "name" not in obj:
        raise ctx.error(sub(path, "name"), "required")
    dpath = sub(path, "domains")
    domains = tuple(as_str(ctx, d, sub(dpath, i)) for i, d in enumerate(as_list(ctx, obj.get("domains"), dpath)))
    if not domains:
        raise ctx.error(dpath, "at least one domain is required")
    rpath = sub(path, "routes")
    routes = tuple(_route(ctx, r, sub(rpath, i)) for i, r in enumerate(as_list(ctx, obj.get("routes"), rpath)))
    policy = retry_policy(ctx, obj["retry_policy"], sub(path, "retry_policy")) if "retry_policy" in obj else None
    count = obj.get("include_request_attempt_count")
    return VirtualHost(name=as_str(ctx, obj["name"], sub(path, "name")), domains=domains, routes=routes,
                       retry_policy=policy, headers=header_mutations(ctx, obj, path),
                       include_request_attempt_count=as_bool(ctx, count, sub(path, "include_request_attempt_count"))
                       if count is not None else False)


def _route(ctx: Ctx, value: Any, path: str) -> Route:
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("name", "match", "route", "direct_response", "typed_per_filter_config",
                                *HEADER_MUTATION_KEYS),
               errors={"redirect": "redirect routes are not supported",
                       "filter_action": "filter_action routes are not supported"})
    actions = [k for k in ("route", "direct_response") if k in obj]
    if len(actions) != 1:
        raise ctx.error(path, "exactly one of route or direct_response is required")
    if "match" not in obj:
        raise ctx.error(sub(path, "match"), "required")
    match = _match(ctx, obj["match"], sub(path, "match"))
    name = as_str(ctx, obj["name"], sub(path, "name")) if "name" in obj else ""
    mutations = header_mutations(ctx, obj, path)
    if "direct_response" in obj:
        return Route(match=match, direct_response=_direct(ctx, obj["direct_response"], sub(path, "direct_response")),
                     name=name, headers=mutations)
    apath = sub(path, "route")
    act = as_dict(ctx, obj["route"], apath, allow_none=False)
    check_keys(ctx, act, apath, ("cluster", "timeout", "retry_policy", "prefix_rewrite", "weighted_clusters",
                                 "request_mirror_policies", "regex_rewrite", "host_rewrite_literal"),
               errors={"cluster_header": "cluster_header is not supported; use a fixed cluster",
                       "cluster_specifier_plugin": "cluster_specifier_plugin is not supported",
                       "request_mirror_policy": "use request_mirror_policies (Envoy v3)",
                       "host_rewrite_header": "host_rewrite_header is not supported; use host_rewrite_literal",
                       "auto_host_rewrite": "auto_host_rewrite is not supported; use host_rewrite_literal"})
    kw: dict[str, Any] = {"headers": mutations}
    if obj.get("typed_per_filter_config") is not None:
        kw["fault"] = parse_per_filter(ctx, obj["typed_per_filter_config"], sub(path, "typed_per_filter_config"),
                                       _header)
    if ("cluster" in act) == ("weighted_clusters" in act):
        raise ctx.error(apath, "exactly one of cluster or weighted_clusters is required")
    cluster = None
    if "weighted_clusters" in act:
        kw["weighted_clusters"] = weighted_clusters(ctx, act["weighted_clusters"], sub(apath, "weighted_clusters"),
                                                    lambda c, v, p: parse_per_filter(c, v, p, _header))
    else:
        cluster = as_str(ctx, act["cluster"], sub(apath, "cluster"))
        if ctx.clusters is not None and cluster not in ctx.clusters:
            raise ctx.error(sub(apath, "cluster"), f"unknown cluster {cluster!r} (not in static_resources.clusters)")
    if act.get("request_mirror_policies") is not None:
        kw["mirror_policies"] = mirror_policies(ctx, act["request_mirror_policies"],
                                                sub(apath, "request_mirror_policies"))
    if act.get("regex_rewrite") is not None:
        kw["regex_rewrite"] = _regex_rewrite(ctx, act["regex_rewrite"], sub(apath, "regex_rewrite"))
    if act.get("host_rewrite_literal") is not None:
        kw["host_rewrite_literal"] = as_str(ctx, act["host_rewrite_literal"], sub(apath, "host_rewrite_literal"))
    if "timeout" in act:
        kw["timeout_s"] = duration(ctx, act["timeout"], sub(apath, "timeout"))
    if "retry_policy" in act:
        kw["retry_policy"] = retry_policy(ctx, act["retry_policy"], sub(apath, "retry_policy"))
    if "prefix_rewrite" in act:
        if not isinstance(act["prefix_rewrite"], str):
            raise ctx.error(sub(apath, "prefix_rewrite"), "expected a string")
        kw["prefix_rewrite"] = act["prefix_rewrite"]
    if "prefix_rewrite" in kw and "regex_rewrite" in kw:
        raise ctx.error(apath, "prefix_rewrite and regex_rewrite are exclusive (Envoy)")
    return Route(match=match, cluster=cluster, name=name, **kw)


def _regex_rewrite(ctx: Ctx, value: Any, path: str) -> RegexRewrite:
    """Envoy's RegexMatchAndSubstitute: {pattern: {regex}, substitution} (\\1 back-references)."""
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("pattern", "substitution"))
    if "pattern" not in obj:
        raise ctx.error(sub(path, "pattern"), "required")
    sub_text = as_str(ctx, obj.get("substitution", ""), sub(path, "substitution"))
    return RegexRewrite(pattern=_regex(ctx, obj["pattern"], sub(path, "pattern")), substitution=sub_text)


def _regex(ctx: Ctx, value: Any, path: str) -> Any:
    """Envoy's safe_regex {google_re2, regex}, or a bare legacy regex string."""
    if isinstance(value, dict):
        check_keys(ctx, value, path, ("regex",), silent=("google_re2",))
        value, path = value.get("regex"), sub(path, "regex")
    pattern = as_str(ctx, value, path)
    try:
        return compile_regex(pattern)
    except RegexError as exc:
        raise ctx.error(path, f"invalid regex {pattern!r}: {exc}") from None


def _match(ctx: Ctx, value: Any, path: str) -> RouteMatch:
    obj = as_dict(ctx, value, path, allow_none=False)
    unsupported = "match condition not supported; ignoring it would route requests it should not"
    check_keys(ctx, obj, path, ("prefix", "path", "safe_regex", "regex", "headers", "case_sensitive"),
               errors={k: unsupported for k in ("query_parameters", "grpc", "runtime_fraction", "tls_context",
                                                "dynamic_metadata", "connect_matcher", "path_separated_prefix",
                                                "path_match_policy", "filter_state")})
    specs = [k for k in ("prefix", "path", "safe_regex", "regex") if k in obj]
    if len(specs) != 1:
        raise ctx.error(path, "exactly one of prefix, path or safe_regex is required")
    kw: dict[str, Any] = {}
    spec = specs[0]
    if spec in ("prefix", "path"):
        if not isinstance(obj[spec], str):
            raise ctx.error(sub(path, spec), "expected a string")
        kw[spec] = obj[spec]
    else:
        kw["regex"] = _regex(ctx, obj[spec], sub(path, spec))
    if "case_sensitive" in obj:
        kw["case_sensitive"] = as_bool(ctx, obj["case_sensitive"], sub(path, "case_sensitive"))
    hpath = sub(path, "headers")
    kw["headers"] = tuple(_header(ctx, h, sub(hpath, i)) for i, h in enumerate(as_list(ctx, obj.get("headers"), hpath)))
    return RouteMatch(**kw)


def _header(ctx: Ctx, value: Any, path: str) -> HeaderMatch:
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("name", "exact_match", "string_match", "prefix_match", "suffix_match",
                                "safe_regex_match", "regex_match", "present_match", "invert_match"),
               errors={"range_match": "range_match is not supported", "contains_match": "contains_match is not "
                       "supported; use string_match.contains"})
    if "name" not in obj:
        raise ctx.error(sub(path, "name"), "required")
    name = as_str(ctx, obj["name"], sub(path, "name")).lower()
    invert = as_bool(ctx, obj["invert_match"], sub(path, "invert_match")) if "invert_match" in obj else False
    specs = [k for k in ("exact_match", "string_match", "prefix_match", "suffix_match", "safe_regex_match",
                         "regex_match", "present_match") if k in obj]
    if len(specs) > 1:
        raise ctx.error(path, f"only one match specifier is allowed, got {', '.join(specs)}")
    if not specs:  # Envoy: a header matcher without a specifier matches on presence
        return HeaderMatch(name=name, present=True, invert=invert)
    spec = specs[0]
    spath = sub(path, spec)
    if spec == "present_match":
        return HeaderMatch(name=name, present=as_bool(ctx, obj[spec], spath), invert=invert)
    if spec in ("safe_regex_match", "regex_match"):
        return HeaderMatch(name=name, regex=_regex(ctx, obj[spec], spath), invert=invert)
    if spec != "string_match":
        if not isinstance(obj[spec], str):
            raise ctx.error(spath, "expected a string")
        kind = {"exact_match": "exact", "prefix_match": "prefix", "suffix_match": "suffix"}[spec]
        return HeaderMatch(name=name, invert=invert, **{kind: obj[spec]})
    sm = as_dict(ctx, obj[spec], spath, allow_none=False)
    check_keys(ctx, sm, spath, ("exact", "prefix", "suffix", "safe_regex", "contains", "ignore_case"))
    kinds = [k for k in ("exact", "prefix", "suffix", "safe_regex", "contains") if k in sm]
    if len(kinds) != 1:
        raise ctx.error(spath, "exactly one of exact, prefix, suffix, contains or safe_regex is required")
    kind = kinds[0]
    if kind == "safe_regex":
        return HeaderMatch(name=name, regex=_regex(ctx, sm[kind], sub(spath, kind)), invert=invert)
    text = sm[kind]
    if not isinstance(text, str):
        raise ctx.error(sub(spath, kind), "expected a string")
    ignore_case = as_bool(ctx, sm["ignore_case"], sub(spath, "ignore_case")) if "ignore_case" in sm else False
    if kind == "contains" or ignore_case:
        # The model has no case-insensitive or contains matchers; a full-match regex
        # (Envoy's regex semantics) expresses both exactly.
        esc = re.escape(text)
        pattern = {"exact": esc, "prefix": esc + ".*", "suffix": ".*" + esc, "contains": ".*" + esc + ".*"}[kind]
        return HeaderMatch(name=name, regex=compile_regex(pattern, ignore_case=ignore_case, dot_nl=True),
                           invert=invert)
    return HeaderMatch(name=name, invert=invert, **{kind: text})


def _direct(ctx: Ctx, value: Any, path: str) -> DirectResponse:
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("status", "body"))
    if "status" not in obj:
        raise ctx.error(sub(path, "status"), "required")
    status = as_int(ctx, obj["status"], sub(path, "status"), 200, 599)
    body = b""
    if obj.get("body") is not None:
        bpath = sub(path, "body")
        b = as_dict(ctx, obj["body"], bpath)
        check_keys(ctx, b, bpath, ("inline_string", "inline_bytes"),
                   errors={"filename": "body from a file is not supported; use inline_string"})
        if "inline_string" in b:
            if not isinstance(b["inline_string"], str):
                raise ctx.error(sub(bpath, "inline_string"), "expected a string")
            body = b["inline_string"].encode()
        elif "inline_bytes" in b:
            try:
                body = base64.b64decode(str(b["inline_bytes"]), validate=True)
            except (binascii.Error, ValueError):
                raise ctx.error(sub(bpath, "inline_bytes"), "expected base64") from None
    return DirectResponse(status=status, body=body)


# --- TLS (envoy.transport_sockets.tls) ----------------------------------------------------------------

def _transport_socket(ctx: Ctx, value: Any, path: str, downstream: bool) -> DownstreamTls | UpstreamTls:
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("name", "typed_config"))
    if obj.get("name") not in TLS_SOCKET_NAMES:
        raise ctx.error(sub(path, "name"), f"transport socket {obj.get('name')!r} is not supported (only "
                                           f"{TLS_SOCKET_NAMES[0]})")
    cpath = sub(path, "typed_config")
    cfg = as_dict(ctx, obj.get("typed_config"), cpath, allow_none=False)
    want = DOWNSTREAM_TLS_TYPE if downstream else UPSTREAM_TLS_TYPE
    if cfg.get("@type") != want:
        raise ctx.error(sub(cpath, "@type"), f"expected {want}, got {cfg.get('@type')!r}")
    known = ("common_tls_context", "require_client_certificate") if downstream else ("common_tls_context", "sni")
    check_keys(ctx, cfg, cpath, known,
               errors={k: "not supported" for k in cfg if k not in known and k != "@type"})
    common = _common_tls(ctx, cfg.get("common_tls_context"), sub(cpath, "common_tls_context"))
    if downstream:
        if not common.cert_chain:
            raise ctx.error(sub(cpath, "common_tls_context.tls_certificates"), "a listener needs its certificate")
        require = False
        if "require_client_certificate" in cfg:
            require = as_bool(ctx, cfg["require_client_certificate"], sub(cpath, "require_client_certificate"))
        if require and not common.trusted_ca:
            raise ctx.error(sub(cpath, "require_client_certificate"),
                            "needs common_tls_context.validation_context.trusted_ca")
        return DownstreamTls(common, require_client_certificate=require)
    sni = as_str(ctx, cfg["sni"], sub(cpath, "sni")) if "sni" in cfg else None
    return UpstreamTls(common, sni=sni)


def _common_tls(ctx: Ctx, value: Any, path: str) -> CommonTls:
    obj = as_dict(ctx, value, path)
    known = ("tls_certificates", "validation_context", "alpn_protocols")
    sds = ("tls_certificate_sds_secret_configs", "validation_context_sds_secret_config",
           "combined_validation_context")
    check_keys(ctx, obj, path, known,
               errors={k: _SDS if k in sds else "not supported" for k in obj if k not in known and k != "@type"})
    cert = key = None
    tpath = sub(path, "tls_certificates")
    certs = as_list(ctx, obj.get("tls_certificates"), tpath)
    if len(certs) > 1:
        raise ctx.error(tpath, f"one certificate is supported, got {len(certs)}")
    if certs:
        cp = sub(tpath, 0)
        c = as_dict(ctx, certs[0], cp, allow_none=False)
        # watched_directory: our sidecar re-reads the files when they change in any case.
        check_keys(ctx, c, cp, ("certificate_chain", "private_key"), silent=("watched_directory",),
                   errors={k: "not supported" for k in c
                           if k not in ("certificate_chain", "private_key", "watched_directory")})
        for k in ("certificate_chain", "private_key"):
            if k not in c:
                raise ctx.error(sub(cp, k), "required")
        cert = _data_source_file(ctx, c["certificate_chain"], sub(cp, "certificate_chain"))
        key = _data_source_file(ctx, c["private_key"], sub(cp, "private_key"))
    ca = None
    sans: list[SanMatcher] = []
    if obj.get("validation_context") is not None:
        vpath = sub(path, "validation_context")
        v = as_dict(ctx, obj["validation_context"], vpath)
        vknown = ("trusted_ca", "match_typed_subject_alt_names")
        check_keys(ctx, v, vpath, vknown, silent=("watched_directory",),
                   errors={k: ("use match_typed_subject_alt_names" if k == "match_subject_alt_names"
                               else "not supported") for k in v if k not in vknown and k != "watched_directory"})
        if "trusted_ca" in v:
            ca = _data_source_file(ctx, v["trusted_ca"], sub(vpath, "trusted_ca"))
        mpath = sub(vpath, "match_typed_subject_alt_names")
        for i, m in enumerate(as_list(ctx, v.get("match_typed_subject_alt_names"), mpath)):
            sans.append(_san_matcher(ctx, m, sub(mpath, i)))
        if sans and ca is None:
            raise ctx.error(mpath, "needs trusted_ca (SANs are matched on a verified certificate)")
    alpn = tuple(as_str(ctx, a, sub(sub(path, "alpn_protocols"), i))
                 for i, a in enumerate(as_list(ctx, obj.get("alpn_protocols"), sub(path, "alpn_protocols"))))
    for i, a in enumerate(alpn):
        if a != "http/1.1":
            raise ctx.error(sub(sub(path, "alpn_protocols"), i), f"{a!r} is not supported; we speak http/1.1")
    return CommonTls(cert_chain=cert, private_key=key, trusted_ca=ca, match_sans=tuple(sans), alpn=alpn)


def _data_source_file(ctx: Ctx, value: Any, path: str) -> str:
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("filename",),
               errors={k: "only files are supported (filename): the sidecar re-reads them when they change"
                       for k in obj if k != "filename"})
    if "filename" not in obj:
        raise ctx.error(sub(path, "filename"), "required")
    return as_str(ctx, obj["filename"], sub(path, "filename"))


def _san_matcher(ctx: Ctx, value: Any, path: str) -> SanMatcher:
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("san_type", "matcher"), errors={"oid": "not supported"})
    san_type = str(obj.get("san_type", ""))
    if san_type not in _SAN_TYPES:
        raise ctx.error(sub(path, "san_type"), f"expected one of {', '.join(_SAN_TYPES)}, got {san_type!r}")
    mpath = sub(path, "matcher")
    m = as_dict(ctx, obj.get("matcher"), mpath, allow_none=False)
    check_keys(ctx, m, mpath, ("exact", "prefix"),
               errors={k: "not supported (exact or prefix)" for k in m if k not in ("exact", "prefix")})
    if len([k for k in ("exact", "prefix") if k in m]) != 1:
        raise ctx.error(mpath, "exactly one of exact, prefix")
    if "exact" in m:
        return SanMatcher(san_type, exact=as_str(ctx, m["exact"], sub(mpath, "exact")))
    return SanMatcher(san_type, prefix=as_str(ctx, m["prefix"], sub(mpath, "prefix")))


# --- clusters ---------------------------------------------------------------------------------

def _cluster(ctx: Ctx, value: Any, path: str, pod_ip: str) -> Cluster:
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("name", "type", "connect_timeout", "lb_policy", "load_assignment", "hosts",
                                "circuit_breakers", "dns_refresh_rate", "per_connection_buffer_limit_bytes",
                                "http2_protocol_options", "dns_lookup_family", "cluster_type",
                                "outlier_detection", "health_checks", "transport_socket"),
               silent=("typed_dns_resolver_config",),  # any resolver: names resolve in the pod's hosts file
               errors={"tls_context": _V2_TLS, "eds_cluster_config": _DYNAMIC,
                       "transport_socket_matches": "transport_socket_matches is not supported; use one "
                                                   "transport_socket"})
    if "name" not in obj:
        raise ctx.error(sub(path, "name"), "required")
    name = as_str(ctx, obj["name"], sub(path, "name"))
    if obj.get("cluster_type") is not None:
        if "type" in obj:
            raise ctx.error(sub(path, "cluster_type"), "type and cluster_type are exclusive")
        obj = {**obj, **_dns_cluster(ctx, obj["cluster_type"], sub(path, "cluster_type"))}
    ctype = as_str(ctx, obj.get("type", "STATIC"), sub(path, "type")).upper()
    if ctype in ("EDS", "ORIGINAL_DST"):
        raise ctx.error(sub(path, "type"), f"{ctype} clusters are not supported"
                        + (f" ({_DYNAMIC})" if ctype == "EDS" else ""))
    if ctype not in CLUSTER_TYPES:
        raise ctx.error(sub(path, "type"), f"unknown cluster type {obj['type']!r} (one of {', '.join(CLUSTER_TYPES)})")
    if "http2_protocol_options" in obj:
        ctx.warn(sub(path, "http2_protocol_options"), "not implemented, ignored (we speak HTTP/1.1 upstream)")
    family = str(obj.get("dns_lookup_family", "AUTO")).upper()
    if family not in ("AUTO", "V4_ONLY", "V4_PREFERRED", "ALL"):
        ctx.warn(sub(path, "dns_lookup_family"), f"{family} not implemented, ignored (IPv4 is used)")

    endpoints = _endpoints(ctx, obj, path, pod_ip)
    if ctype == "STATIC":
        for ep, where in endpoints:
            if not is_ip(ep.host):
                raise ctx.error(where, f"STATIC clusters need IP addresses, got {ep.host!r} (use type STRICT_DNS)")
    kw: dict[str, Any] = {}
    if "connect_timeout" in obj:
        kw["connect_timeout_s"] = duration(ctx, obj["connect_timeout"], sub(path, "connect_timeout"))
    if "lb_policy" in obj:
        kw["lb_policy"] = lb_policy(ctx, obj["lb_policy"], sub(path, "lb_policy"))
    if "dns_refresh_rate" in obj:
        kw["dns_refresh_rate_s"] = duration(ctx, obj["dns_refresh_rate"], sub(path, "dns_refresh_rate"))
    if "per_connection_buffer_limit_bytes" in obj:
        kw["per_connection_buffer_limit_bytes"] = as_int(ctx, obj["per_connection_buffer_limit_bytes"],
                                                         sub(path, "per_connection_buffer_limit_bytes"), 1)
    if obj.get("circuit_breakers") is not None:
        kw["circuit_breakers"] = _circuit_breakers(ctx, obj["circuit_breakers"], sub(path, "circuit_breakers"))
    if obj.get("outlier_detection") is not None:
        kw["outlier_detection"] = outlier_detection(ctx, obj["outlier_detection"], sub(path, "outlier_detection"))
    if obj.get("health_checks") is not None:
        hpath = sub(path, "health_checks")
        checks = as_list(ctx, obj["health_checks"], hpath)
        if len(checks) > 1:
            raise ctx.error(hpath, "one health check per cluster is supported")
        kw["health_checks"] = tuple(health_check(ctx, h, sub(hpath, i)) for i, h in enumerate(checks))
    if obj.get("transport_socket") is not None:
        kw["tls"] = _transport_socket(ctx, obj["transport_socket"], sub(path, "transport_socket"), downstream=False)
    return Cluster(name=name, type=ctype, endpoints=tuple(ep for ep, _ in endpoints), **kw)


def _dns_cluster(ctx: Ctx, value: Any, path: str) -> dict[str, Any]:
    """The DNS cluster extension as the cluster-level fields it replaces (``type``, ``dns_refresh_rate``...)."""
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("name", "typed_config"))
    if obj.get("name") not in DNS_CLUSTER_NAMES:
        raise ctx.error(sub(path, "name"), f"custom cluster type {obj.get('name')!r} is not supported (only "
                                           f"{DNS_CLUSTER_NAMES[0]})")
    cpath = sub(path, "typed_config")
    cfg = as_dict(ctx, obj.get("typed_config"), cpath)
    if cfg.get("@type", DNS_CLUSTER_TYPE) != DNS_CLUSTER_TYPE:
        raise ctx.error(sub(cpath, "@type"), f"unsupported type {cfg['@type']!r}; expected {DNS_CLUSTER_TYPE}")
    check_keys(ctx, cfg, cpath, ("dns_refresh_rate", "dns_lookup_family", "all_addresses_in_single_endpoint"),
               silent=("typed_dns_resolver_config",))
    logical = (obj["name"] == "envoy.cluster.logical_dns"
               or as_bool(ctx, cfg.get("all_addresses_in_single_endpoint", False),
                          sub(cpath, "all_addresses_in_single_endpoint")))
    out = {"type": "LOGICAL_DNS" if logical else "STRICT_DNS"}
    out.update({k: cfg[k] for k in ("dns_refresh_rate", "dns_lookup_family") if k in cfg})
    return out


def _endpoints(ctx: Ctx, obj: dict[str, Any], path: str, pod_ip: str) -> list[tuple[Endpoint, str]]:
    found: list[tuple[Endpoint, str]] = []

    def add(addr: Any, apath: str) -> None:
        host, port = _socket_address(ctx, addr, apath)
        found.append((Endpoint(host=local_host(host, pod_ip), port=port), sub(apath, "socket_address.address")))

    hpath = sub(path, "hosts")
    for i, h in enumerate(as_list(ctx, obj.get("hosts"), hpath)):  # v2 legacy: hosts[] are Address messages
        add(h, sub(hpath, i))
    if obj.get("load_assignment") is None:
        return found
    lpath = sub(path, "load_assignment")
    la = as_dict(ctx, obj["load_assignment"], lpath)
    check_keys(ctx, la, lpath, ("endpoints",), silent=("cluster_name",))
    epath = sub(lpath, "endpoints")
    for i, group in enumerate(as_list(ctx, la.get("endpoints"), epath)):
        gpath = sub(epath, i)
        group = as_dict(ctx, group, gpath)
        check_keys(ctx, group, gpath, ("lb_endpoints",))
        lbpath = sub(gpath, "lb_endpoints")
        for j, lbe in enumerate(as_list(ctx, group.get("lb_endpoints"), lbpath)):
            bpath = sub(lbpath, j)
            lbe = as_dict(ctx, lbe, bpath, allow_none=False)
            check_keys(ctx, lbe, bpath, ("endpoint",))
            ep = as_dict(ctx, lbe.get("endpoint"), sub(bpath, "endpoint"), allow_none=False)
            check_keys(ctx, ep, sub(bpath, "endpoint"), ("address",), silent=("hostname",))
            add(ep.get("address"), sub(sub(bpath, "endpoint"), "address"))
    return found


def _circuit_breakers(ctx: Ctx, value: Any, path: str) -> CircuitBreakers:
    """The DEFAULT-priority thresholds; HIGH ones only apply to HIGH-priority routes, which we have none of."""
    obj = as_dict(ctx, value, path)
    check_keys(ctx, obj, path, ("thresholds",))
    tpath = sub(path, "thresholds")
    entries = as_list(ctx, obj.get("thresholds"), tpath)
    for i, t in enumerate(entries):
        if isinstance(t, dict) and str(t.get("priority", "DEFAULT")).upper() == "DEFAULT":
            return circuit_breaker_threshold(ctx, t, sub(tpath, i))
    return circuit_breaker_threshold(ctx, {}, tpath)


# --- admin and cross-checks ---------------------------------------------------------------------

def _admin(ctx: Ctx, value: Any, path: str, pod_ip: str, public_admin: bool) -> Admin:
    obj = as_dict(ctx, value, path)
    check_keys(ctx, obj, path, ("address", "access_log_path", "access_log"))
    if "address" not in obj:
        raise ctx.error(sub(path, "address"), "required")
    written, port = _socket_address(ctx, obj["address"], sub(path, "address"))
    if public_admin:
        address = written if written in ("0.0.0.0", "::") else local_host(written, pod_ip)
    else:
        address = local_host(written, pod_ip)
        if address != pod_ip:
            address = pod_ip
            ctx.warn(sub(path, "address.socket_address.address"),
                     f"{written} not used; the admin interface is bound to the pod alias {pod_ip} "
                     "(pass public_admin to expose it)")
        elif written in ("0.0.0.0", "::"):
            ctx.warn(sub(path, "address.socket_address.address"),
                     f"{written} would expose the admin interface; bound to the pod alias {pod_ip} instead")
    log_path = None
    if obj.get("access_log_path") is not None:
        log_path = as_str(ctx, obj["access_log_path"], sub(path, "access_log_path"))
    logs = [log for i, a in enumerate(as_list(ctx, obj.get("access_log"), sub(path, "access_log")))
            if (log := _access_log(ctx, a, sub(sub(path, "access_log"), i))) is not None]
    if log_path is None and logs:
        log_path = logs[0].path
    return Admin(address=address, port=port, access_log_path=log_path)


def _cross_check(ctx: Ctx, listeners: list[Listener], clusters: list[Cluster], admin: Admin | None) -> None:
    """Whole-file checks Envoy also makes at startup, so a bad file fails before any process starts."""
    seen: set[str] = set()
    for i, c in enumerate(clusters):
        if c.name in seen:
            raise ctx.error(f"static_resources.clusters[{i}].name", f"duplicate cluster name {c.name!r}")
        seen.add(c.name)
    names: set[str] = set()
    bound: dict[tuple[str, int], str] = {}
    if admin is not None:
        bound[(admin.address, admin.port)] = "the admin interface"
    for i, lst in enumerate(listeners):
        lpath = f"static_resources.listeners[{i}]"
        if lst.name in names:
            raise ctx.error(sub(lpath, "name"), f"duplicate listener name {lst.name!r}")
        names.add(lst.name)
        for key in ((lst.address, lst.port), ("0.0.0.0", lst.port)):
            if key in bound:
                raise ctx.error(sub(lpath, "address"), f"{lst.original_address}:{lst.port} is already used by "
                                                       f"{bound[key]}")
        bound[(lst.address, lst.port)] = f"listener {lst.name!r}"
    for c, ep, lst in self_routed(listeners, clusters):
        i = clusters.index(c)
        raise ctx.error(f"static_resources.clusters[{i}].load_assignment",
                        f"endpoint {ep.host}:{ep.port} of cluster {c.name!r} is this sidecar's own listener "
                        f"{lst.name!r} ({lst.original_address}:{lst.port}): every request would loop back into "
                        "the sidecar")
