"""The internal model (``sidecar.config.Bootstrap``) as a real Envoy v3 static bootstrap.

The reverse of ``sidecar.envoy_config``: whatever a pod's sidecar section was
written as (the seed's v2 file, a v3 file, the short form), it compiled into
one model, and this renders that model in the only form Envoy 1.40 accepts.
``meshctl export envoy`` prints it; ``engine: envoy`` runs exactly it.

Every field of the model is written out, defaults included, so the bootstrap
says what our sidecar does rather than relying on both programs having the same
defaults. Two things are added that the model does not say, both so the real
Envoy behaves like our sidecar in a pod:

* names in STRICT_DNS/LOGICAL_DNS clusters resolve with getaddrinfo, i.e. the
  pod's /etc/hosts (its own hosts file, bound over /etc/hosts in the pod's
  mount namespace), IPv4 only like our resolver;
* with an admin socket, Envoy's admin listens only on that Unix socket (mode
  0600) and the admin TCP port is an ordinary listener (``admin_readonly``)
  that forwards GETs of the read-only pages to it and refuses the rest with
  403, as our sidecar's TCP admin does.

TLS: a listener's ``tls`` is its filter chain's DownstreamTlsContext (permissive: a
second, plaintext chain chosen by tls_inspector); a cluster's is its
UpstreamTlsContext. Certificate rotation with the real Envoy needs SDS from
files (``sds_dir``): the control plane writes ``sds_files(boot, sds_dir)``
(one small JSON file per certificate pair, ``<sds_dir>/cert-<hash>.yaml``)
before Envoy starts and never needs to touch them again; each names the
certificate's files and the directory Envoy watches for the rotation's rename
(``watched_directory``: the parent of a symlinked ``<replica>/current``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from typing import Any

from sidecar.config import (
    AccessLog,
    Admin,
    Bootstrap,
    CircuitBreakers,
    Cluster,
    CommonTls,
    ConfigError,
    DirectResponse,
    HeaderMatch,
    HeaderMutations,
    HeaderValueOption,
    HealthCheck,
    HttpConnectionManager,
    Listener,
    OutlierDetection,
    RetryPolicy,
    Route,
    RouteMatch,
    Tracing,
    UpstreamTls,
    VirtualHost,
)
from sidecar.config_fields import PREVIOUS_HOSTS
from sidecar.http_filters import FAULT, LAYERED_RUNTIME, export_fault, export_http_filter

HCM = "envoy.filters.network.http_connection_manager"
ZIPKIN = "envoy.tracers.zipkin"
ZIPKIN_TYPE = "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "envoy.filters.http.router"
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
FILE_LOG = "envoy.access_loggers.file"
FILE_LOG_TYPE = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
DNS_CLUSTER = "envoy.cluster.dns"
DNS_CLUSTER_TYPE = "type.googleapis.com/envoy.extensions.clusters.dns.v3.DnsCluster"
GETADDRINFO = {
    "name": "envoy.network.dns_resolver.getaddrinfo",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.getaddrinfo.v3."
                              "GetAddrInfoDnsResolverConfig"},
}
TLS_SOCKET = "envoy.transport_sockets.tls"
DOWNSTREAM_TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UPSTREAM_TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"
TLS_INSPECTOR_TYPE = "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
#: The node Envoy needs for SDS from files (it names nothing here).
SDS_NODE = "meshctl"
#: The listener on the admin TCP port and the cluster that reaches the admin socket.
ADMIN_LISTENER = "admin_readonly"
ADMIN_CLUSTER = "admin_socket"
#: What the admin TCP port serves (GET only), as our sidecar's: Prometheus, readiness probes, meshctl stats.
READ_ONLY_PATHS = ("/ready", "/stats", "/stats/prometheus", "/server_info", "/clusters")
#: Envoy's admin socket mode: 0600, only the mesh's user can quit, drain or dump the config.
SOCKET_MODE = 0o600
_DEFAULT_BACKOFF_BASE_S = RetryPolicy().backoff_base_s


def seconds(value: float) -> str:
    """A protobuf Duration as Envoy's YAML reads it: ``0.25s``, ``15s``."""
    text = f"{value:.9f}".rstrip("0").rstrip(".")
    return f"{text}s"


def export_envoy(boot: Bootstrap, admin_socket: str | None = None, sds_dir: str | None = None) -> dict[str, Any]:
    """The Envoy v3 bootstrap (a plain dict) that runs ``boot``.

    ``admin_socket``: serve the whole admin on this Unix socket (0600) and only the read-only pages on the
    model's admin TCP address (see the module's doc); None: Envoy's admin on the model's TCP address, as is.
    ``sds_dir``: deliver every TLS certificate through SDS files in this directory, so the real Envoy reloads
    it when it is rotated (write ``sds_files(boot, sds_dir)`` there before Envoy starts); None: the files are
    named directly in the bootstrap, which Envoy reads once.
    Raises ConfigError when the model cannot be expressed (a name the admin plumbing needs is taken).
    """
    listeners = [_listener(lst, sds_dir) for lst in boot.listeners]
    clusters = [_cluster(c, sds_dir) for c in boot.clusters]
    runtime = LAYERED_RUNTIME  # /runtime_modify needs the admin layer
    if boot.runtime:  # the static layer's keys we read (the Zipkin reporter's flush)
        runtime = {"layers": [{"name": "static", "static_layer": {k: int(v) for k, v in boot.runtime}},
                              *LAYERED_RUNTIME["layers"][1:]]}
    doc: dict[str, Any] = {"static_resources": {"listeners": listeners, "clusters": clusters},
                           "layered_runtime": runtime}
    if boot.node_id or boot.node_cluster:  # the spans' node_id tag and localEndpoint.serviceName
        doc["node"] = {"id": boot.node_id or boot.node_cluster, "cluster": boot.node_cluster or boot.node_id}
    elif sds_dir is not None and sds_files(boot, sds_dir):
        doc["node"] = {"id": SDS_NODE, "cluster": SDS_NODE}  # Envoy refuses file-based SDS without a node
    if admin_socket is not None:
        taken = [name for name, used in ((ADMIN_LISTENER, [lst.name for lst in boot.listeners]),
                                         (ADMIN_CLUSTER, [c.name for c in boot.clusters])) if name in used]
        if taken:
            raise ConfigError(f"'{taken[0]}' is reserved for the real Envoy's admin plumbing; rename your "
                              "listener or cluster")
        doc["admin"] = _admin(boot.admin, {"pipe": {"path": admin_socket, "mode": SOCKET_MODE}})
        if boot.admin is not None:
            listeners.append(_admin_listener(boot.admin))
            clusters.append(_admin_cluster(admin_socket))
    elif boot.admin is not None:
        doc["admin"] = _admin(boot.admin, _address(boot.admin.address, boot.admin.port))
    return doc


def export_envoy_yaml(boot: Bootstrap, admin_socket: str | None = None, header: str = "",
                      sds_dir: str | None = None) -> str:
    """``export_envoy`` as YAML, with ``header`` as leading comment lines."""
    return dump_yaml(export_envoy(boot, admin_socket, sds_dir), header)


def dump_yaml(doc: Any, header: str = "") -> str:
    """``doc`` as block YAML in the order written, no anchors, multi-line strings as literal blocks, and
    ``header`` as leading comment lines."""
    import yaml

    comment = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
    return comment + yaml.dump(doc, Dumper=_dumper(), sort_keys=False, default_flow_style=False, width=120)


def _dumper() -> type:
    import yaml

    class Dumper(yaml.SafeDumper):
        """No anchors: shared dicts (the resolver, the GET matcher) are written out where they are used."""

        def ignore_aliases(self, data: Any) -> bool:
            return True

    def text(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
        style = "|" if "\n" in data and not any(c in data for c in "\t\r") and " \n" not in data else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    Dumper.add_representer(str, text)
    return Dumper


# --- listeners and the HTTP connection manager -----------------------------------------------------

def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _listener(lst: Listener, sds_dir: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": lst.name, "address": _address(lst.address, lst.port)}
    tracing = lst.hcm.tracing
    if tracing is not None and tracing.traffic_direction:  # Envoy reads the span's kind from the listener
        out["traffic_direction"] = tracing.traffic_direction
    if lst.tls is None:
        out["filter_chains"] = [{"filters": [_hcm(lst.hcm)]}]
        return out
    chain: dict[str, Any] = {"filters": [_hcm(lst.hcm)], "transport_socket": _downstream_tls(lst, sds_dir)}
    if not lst.plaintext_allowed:
        out["filter_chains"] = [chain]
        return out
    # Permissive: tls_inspector picks the TLS chain for a ClientHello, the plaintext one for anything else.
    out["listener_filters"] = [{"name": TLS_INSPECTOR, "typed_config": {"@type": TLS_INSPECTOR_TYPE}}]
    out["filter_chains"] = [{"filter_chain_match": {"transport_protocol": "tls"}, **chain},
                            {"filters": [_hcm(lst.hcm)]}]
    return out


# --- TLS ---------------------------------------------------------------------------------------------

def _downstream_tls(lst: Listener, sds_dir: str | None) -> dict[str, Any]:
    tls = lst.tls
    assert tls is not None
    if not tls.common.cert_chain:
        raise ConfigError(f"listener {lst.name}: TLS without a certificate (tls: mesh needs the mesh identity)")
    return {"name": TLS_SOCKET, "typed_config": {
        "@type": DOWNSTREAM_TLS_TYPE, "common_tls_context": _common_tls(tls.common, sds_dir),
        "require_client_certificate": tls.require_client_certificate}}


def _upstream_tls(tls: UpstreamTls, sds_dir: str | None) -> dict[str, Any]:
    cfg: dict[str, Any] = {"@type": UPSTREAM_TLS_TYPE, "common_tls_context": _common_tls(tls.common, sds_dir)}
    if tls.sni:
        cfg["sni"] = tls.sni
    return {"name": TLS_SOCKET, "typed_config": cfg}


def _common_tls(c: CommonTls, sds_dir: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if c.cert_chain and c.private_key:
        if sds_dir is None:
            out["tls_certificates"] = [{"certificate_chain": {"filename": c.cert_chain},
                                        "private_key": {"filename": c.private_key}}]
        else:
            name = sds_secret_name(c.cert_chain, c.private_key)
            out["tls_certificate_sds_secret_configs"] = [{"name": name, "sds_config": {
                "path_config_source": {"path": _sds_path(sds_dir, name)}, "resource_api_version": "V3"}}]
    if c.trusted_ca:
        vc: dict[str, Any] = {"trusted_ca": {"filename": c.trusted_ca}}
        if c.match_sans:
            vc["match_typed_subject_alt_names"] = [
                {"san_type": m.san_type, "matcher": {"exact": m.exact} if m.exact is not None
                 else {"prefix": m.prefix}} for m in c.match_sans]
        out["validation_context"] = vc
    if c.alpn:
        out["alpn_protocols"] = list(c.alpn)
    return out


def sds_secret_name(cert: str, key: str) -> str:
    """The SDS secret (and file) name of one certificate pair: stable, so re-exports name the same file."""
    return "cert-" + hashlib.sha256(f"{cert}\0{key}".encode()).hexdigest()[:12]


def _sds_path(sds_dir: str, name: str) -> str:
    return os.path.join(sds_dir, f"{name}.yaml")


def watched_directory(cert: str) -> str:
    """Where Envoy must watch for the rename that rotates ``cert``.

    Envoy reloads a file-based certificate delivered by SDS on a *move* event in its watched_directory
    (checked with Envoy 1.40: a plain static bootstrap and a static secret are never reloaded, and without
    watched_directory Envoy watches the files' own directory, which a directory swap replaces instead of
    writing into). meshctl rotates by renaming a symlink ``<replica>/current`` -> ``gen-N`` in ``<replica>``:
    when the certificate's directory is a symlink, its parent is watched; otherwise the directory itself
    (files renamed into place there).
    """
    d = os.path.dirname(os.path.abspath(cert))
    return os.path.dirname(d) if os.path.islink(d) else d


def sds_files(boot: Bootstrap, sds_dir: str) -> dict[str, str]:
    """The SDS files ``export_envoy(boot, ..., sds_dir)`` refers to: {path: YAML text}. Each names the
    certificate files (Envoy re-reads them, cert and key together, on a move in ``watched_directory``)."""
    pairs = {(t.common.cert_chain, t.common.private_key)
             for t in [*(lst.tls for lst in boot.listeners), *(c.tls for c in boot.clusters)]
             if t is not None and t.common.cert_chain and t.common.private_key}
    out = {}
    for cert, key in sorted(pairs):  # type: ignore[arg-type]
        name = sds_secret_name(cert, key)  # type: ignore[arg-type]
        secret = {"@type": SECRET_TYPE, "name": name, "tls_certificate": {
            "certificate_chain": {"filename": cert}, "private_key": {"filename": key},
            "watched_directory": {"path": watched_directory(cert)}}}  # type: ignore[arg-type]
        out[_sds_path(sds_dir, name)] = json.dumps({"resources": [secret]}, indent=1) + "\n"
    return out


def _hcm(hcm: HttpConnectionManager, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    rc = hcm.route_config
    cfg: dict[str, Any] = {
        "@type": HCM_TYPE,
        "stat_prefix": hcm.stat_prefix,
        "codec_type": hcm.codec_type,
        "use_remote_address": hcm.use_remote_address,
        "max_request_headers_kb": hcm.max_request_headers_kb,
        "stream_idle_timeout": seconds(hcm.stream_idle_timeout_s),
        **(extra or {}),
        "route_config": {"name": rc.name, "virtual_hosts": [_virtual_host(vh) for vh in rc.virtual_hosts],
                         **_header_mutations(rc.headers)},
        "http_filters": [*(export_http_filter(f, _header) for f in hcm.http_filters),
                         {"name": ROUTER, "typed_config": {"@type": ROUTER_TYPE}}],
    }
    if hcm.access_logs:
        cfg["access_log"] = [_access_log(a) for a in hcm.access_logs]
    if hcm.tracing is not None:
        cfg["tracing"] = _tracing(hcm.tracing)
    return {"name": HCM, "typed_config": cfg}


def _tracing(t: Tracing) -> dict[str, Any]:
    return {
        "random_sampling": {"value": t.random_sampling},
        "client_sampling": {"value": t.client_sampling},
        "overall_sampling": {"value": t.overall_sampling},
        "spawn_upstream_span": t.spawn_upstream_span,
        "max_path_tag_length": t.max_path_tag_length,
        "provider": {"name": ZIPKIN, "typed_config": {
            "@type": ZIPKIN_TYPE,
            "collector_cluster": t.collector_cluster,
            "collector_endpoint": t.collector_endpoint,
            "collector_endpoint_version": "HTTP_JSON",
            "trace_id_128bit": t.trace_id_128bit,
            "shared_span_context": t.shared_span_context,
            "trace_context_option": t.trace_context_option,
        }},
    }


def _access_log(log: AccessLog) -> dict[str, Any]:
    cfg: dict[str, Any] = {"@type": FILE_LOG_TYPE, "path": log.path}
    if log.format is not None:  # None: Envoy's default format, which is ours too
        cfg["log_format"] = {"text_format_source": {"inline_string": log.format}}
    return {"name": FILE_LOG, "typed_config": cfg}


# --- routes ------------------------------------------------------------------------------------------

def _virtual_host(vh: VirtualHost) -> dict[str, Any]:
    out: dict[str, Any] = {"name": vh.name, "domains": list(vh.domains)}
    if vh.retry_policy is not None:
        out["retry_policy"] = _retry_policy(vh.retry_policy)
    if vh.include_request_attempt_count:
        out["include_request_attempt_count"] = True
    out["routes"] = [_route(r) for r in vh.routes]
    out.update(_header_mutations(vh.headers))
    return out


def _header_mutations(m: HeaderMutations) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if m.request_add:
        out["request_headers_to_add"] = [_header_value_option(h) for h in m.request_add]
    if m.request_remove:
        out["request_headers_to_remove"] = list(m.request_remove)
    if m.response_add:
        out["response_headers_to_add"] = [_header_value_option(h) for h in m.response_add]
    if m.response_remove:
        out["response_headers_to_remove"] = list(m.response_remove)
    return out


def _header_value_option(h: HeaderValueOption) -> dict[str, Any]:
    out: dict[str, Any] = {"header": {"key": h.name, "value": h.value.replace("%", "%%")},
                           "append_action": h.append_action}
    if h.keep_empty_value:
        out["keep_empty_value"] = True
    return out


def _route(route: Route) -> dict[str, Any]:
    out: dict[str, Any] = {"name": route.name} if route.name else {}
    out["match"] = _match(route.match)
    out.update(_header_mutations(route.headers))
    if route.direct_response is not None:
        out["direct_response"] = _direct(route.direct_response)
        return out
    action: dict[str, Any] = {"timeout": seconds(route.timeout_s)}
    if route.weighted_clusters:
        action["weighted_clusters"] = {"clusters": [
            {"name": w.name, "weight": w.weight,
             **({"typed_per_filter_config": {FAULT: export_fault(w.fault, _header)}} if w.fault else {})}
            for w in route.weighted_clusters]}
    else:
        action["cluster"] = route.cluster
    if route.retry_policy is not None:
        action["retry_policy"] = _retry_policy(route.retry_policy)
    if route.prefix_rewrite is not None:
        action["prefix_rewrite"] = route.prefix_rewrite
    if route.regex_rewrite is not None:
        action["regex_rewrite"] = {"pattern": _regex(route.regex_rewrite.pattern),
                                   "substitution": route.regex_rewrite.substitution}
    if route.host_rewrite_literal is not None:
        action["host_rewrite_literal"] = route.host_rewrite_literal
    if route.mirror_policies:
        action["request_mirror_policies"] = [
            {"cluster": m.cluster, "runtime_fraction": {"default_value": {
                "numerator": m.numerator, "denominator": _DENOMINATORS[m.denominator]}}}
            for m in route.mirror_policies]
    out["route"] = action
    if route.fault is not None:
        out["typed_per_filter_config"] = {FAULT: export_fault(route.fault, _header)}
    return out


_DENOMINATORS = {100: "HUNDRED", 10_000: "TEN_THOUSAND", 1_000_000: "MILLION"}


def _regex(rx: Any) -> dict[str, Any]:
    """An RE2 pattern object as Envoy's safe_regex; options set at compile time become inline flags."""
    flags = ""
    options = getattr(rx, "options", None)
    if options is not None:
        flags += "" if options.case_sensitive else "i"
        flags += "s" if options.dot_nl else ""
    return {"regex": (f"(?{flags})" if flags else "") + rx.pattern}


def _match(m: RouteMatch) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if m.prefix is not None:
        out["prefix"] = m.prefix
    elif m.path is not None:
        out["path"] = m.path
    elif m.regex is not None:
        out["safe_regex"] = _regex(m.regex)
    if not m.case_sensitive:
        out["case_sensitive"] = False
    if m.headers:
        out["headers"] = [_header(h) for h in m.headers]
    return out


def _header(h: HeaderMatch) -> dict[str, Any]:
    out: dict[str, Any] = {"name": h.name}
    if h.present is not None:
        out["present_match"] = h.present
    elif h.regex is not None:
        out["string_match"] = {"safe_regex": _regex(h.regex)}
    else:
        kind, value = next((k, v) for k, v in (("exact", h.exact), ("prefix", h.prefix), ("suffix", h.suffix))
                           if v is not None)
        out["string_match"] = {kind: value}
    if h.invert:
        out["invert_match"] = True
    return out


def _direct(d: DirectResponse) -> dict[str, Any]:
    out: dict[str, Any] = {"status": d.status}
    if d.body:
        try:
            out["body"] = {"inline_string": d.body.decode("utf-8")}
        except UnicodeDecodeError:
            out["body"] = {"inline_bytes": base64.b64encode(d.body).decode("ascii")}
    return out


def _retry_policy(p: RetryPolicy) -> dict[str, Any]:
    out: dict[str, Any] = {"retry_on": ",".join(sorted(p.retry_on)), "num_retries": p.num_retries}
    if p.per_try_timeout_s is not None:
        out["per_try_timeout"] = seconds(p.per_try_timeout_s)
    if p.retriable_status_codes:
        out["retriable_status_codes"] = sorted(p.retriable_status_codes)
    if p.backoff_base_s != _DEFAULT_BACKOFF_BASE_S or p.backoff_max_s is not None:
        back = {"base_interval": seconds(p.backoff_base_s)}
        if p.backoff_max_s is not None:
            back["max_interval"] = seconds(p.backoff_max_s)
        out["retry_back_off"] = back
    if p.previous_hosts:
        out["retry_host_predicate"] = [{"name": PREVIOUS_HOSTS, "typed_config": {"@type": PREVIOUS_HOSTS_TYPE}}]
    if p.host_selection_retry_max_attempts != 1:
        out["host_selection_retry_max_attempts"] = p.host_selection_retry_max_attempts
    return out


PREVIOUS_HOSTS_TYPE = "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"


# --- clusters ------------------------------------------------------------------------------------

def _cluster(c: Cluster, sds_dir: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "connect_timeout": seconds(c.connect_timeout_s),
        "lb_policy": c.lb_policy,
        "per_connection_buffer_limit_bytes": c.per_connection_buffer_limit_bytes,
        "circuit_breakers": {"thresholds": [_thresholds(c.circuit_breakers)]},
    }
    if c.outlier_detection is not None:
        out["outlier_detection"] = _outlier_detection(c.outlier_detection)
    if c.health_checks:
        out["health_checks"] = [_health_check(h) for h in c.health_checks]
    if c.type == "STATIC":
        out = {"name": c.name, "type": "STATIC", **out}
    else:
        # Envoy 1.40 deprecates the DNS fields on the cluster itself: the DNS cluster extension carries them.
        # Our sidecar resolves names in the pod's hosts file; getaddrinfo reads /etc/hosts, which in a pod
        # is that file. IPv4 only: pod aliases are, and an AAAA miss must not fall through to real DNS.
        dns: dict[str, Any] = {"@type": DNS_CLUSTER_TYPE, "dns_refresh_rate": seconds(c.dns_refresh_rate_s),
                               "dns_lookup_family": "V4_ONLY", "typed_dns_resolver_config": GETADDRINFO}
        if c.type == "LOGICAL_DNS":
            dns["all_addresses_in_single_endpoint"] = True  # what LOGICAL_DNS means in the extension
        out = {"name": c.name, "cluster_type": {"name": DNS_CLUSTER, "typed_config": dns}, **out}
    out["load_assignment"] = {"cluster_name": c.name, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": _address(ep.host, ep.port)}} for ep in c.endpoints]}]}
    if c.tls is not None:
        out["transport_socket"] = _upstream_tls(c.tls, sds_dir)
    return out


def _thresholds(cb: CircuitBreakers) -> dict[str, Any]:
    out: dict[str, Any] = {"priority": "DEFAULT", "max_connections": cb.max_connections,
                           "max_pending_requests": cb.max_pending_requests, "max_requests": cb.max_requests,
                           "max_retries": cb.max_retries}
    if cb.retry_budget_percent is not None:
        out["retry_budget"] = {"budget_percent": {"value": cb.retry_budget_percent},
                               "min_retry_concurrency": cb.min_retry_concurrency}
    return out


def _outlier_detection(od: OutlierDetection) -> dict[str, Any]:
    return {
        "consecutive_5xx": od.consecutive_5xx, "consecutive_gateway_failure": od.consecutive_gateway_failure,
        "consecutive_local_origin_failure": od.consecutive_local_origin_failure,
        "split_external_local_origin_errors": od.split_external_local_origin_errors,
        "interval": seconds(od.interval_s), "base_ejection_time": seconds(od.base_ejection_time_s),
        "max_ejection_time": seconds(od.max_ejection_time_s), "max_ejection_percent": od.max_ejection_percent,
        "enforcing_consecutive_5xx": od.enforcing_consecutive_5xx,
        "enforcing_consecutive_gateway_failure": od.enforcing_consecutive_gateway_failure,
        "enforcing_consecutive_local_origin_failure": od.enforcing_consecutive_local_origin_failure,
        "enforcing_success_rate": od.enforcing_success_rate,
        "success_rate_minimum_hosts": od.success_rate_minimum_hosts,
        "success_rate_request_volume": od.success_rate_request_volume,
        "success_rate_stdev_factor": od.success_rate_stdev_factor,
    }


def _health_check(hc: HealthCheck) -> dict[str, Any]:
    http: dict[str, Any] = {"path": hc.path,
                            "expected_statuses": [{"start": lo, "end": hi} for lo, hi in hc.expected_statuses]}
    if hc.host is not None:
        http["host"] = hc.host
    return {"timeout": seconds(hc.timeout_s), "interval": seconds(hc.interval_s),
            "unhealthy_threshold": hc.unhealthy_threshold, "healthy_threshold": hc.healthy_threshold,
            "no_traffic_interval": seconds(hc.no_traffic_interval_s), "http_health_check": http}


# --- admin ---------------------------------------------------------------------------------------

def _admin(admin: Admin | None, address: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"address": address}
    if admin is not None and admin.access_log_path:
        out["access_log"] = [_access_log(AccessLog(path=admin.access_log_path))]
    return out


def _admin_listener(admin: Admin) -> dict[str, Any]:
    """The admin TCP port as a listener: GET of a read-only page goes to the admin socket; the rest is 403."""
    get = [{"name": ":method", "string_match": {"exact": "GET"}}]
    routes: list[dict[str, Any]] = [
        {"match": {"path": p, "headers": get}, "route": {"cluster": ADMIN_CLUSTER, "timeout": "0s"}}
        for p in READ_ONLY_PATHS]
    routes.append({"match": {"prefix": "/"}, "direct_response": {"status": 403, "body": {
        "inline_string": "only GET of /ready, /stats, /stats/prometheus, /server_info and /clusters is served on "
                         "this port; the rest of the admin is on the admin socket (meshctl admin NAME PATH)\n"}}})
    hcm = {
        "name": HCM,
        "typed_config": {
            "@type": HCM_TYPE,
            "stat_prefix": ADMIN_LISTENER,
            "codec_type": "HTTP1",
            # Our admin closes connections silent this long, as a listener does.
            "common_http_protocol_options": {"idle_timeout": seconds(admin.idle_timeout_s)},
            "route_config": {"name": ADMIN_LISTENER, "virtual_hosts": [
                {"name": ADMIN_LISTENER, "domains": ["*"], "routes": routes}]},
            "http_filters": [{"name": ROUTER, "typed_config": {"@type": ROUTER_TYPE}}],
        },
    }
    return {"name": ADMIN_LISTENER, "address": _address(admin.address, admin.port), "filter_chains": [
        {"filters": [hcm]}]}


def _admin_cluster(path: str) -> dict[str, Any]:
    return {"name": ADMIN_CLUSTER, "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
        "cluster_name": ADMIN_CLUSTER, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"pipe": {"path": path}}}}]}]}}
