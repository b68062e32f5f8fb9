"""The sidecar's one internal configuration model, in Envoy's vocabulary.

Both front ends compile into it: ``sidecar.envoy_config`` (Envoy static
bootstrap YAML, v2 and v3) and ``sidecar.short_config`` (the topology's short
form). The data path only ever sees these objects, so a behaviour is
implemented once whichever way it was configured.

Addresses here are already pod-local: 0.0.0.0 / 127.0.0.1 / localhost were
rewritten to the pod's alias by the front end (``original_address`` keeps
what the user wrote, e.g. to tell an egress listener from an ingress one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

#: Envoy's retry_on conditions that we implement.
RETRY_ON = frozenset({"5xx", "gateway-error", "reset", "connect-failure", "retriable-4xx",
                      "retriable-status-codes", "refused-stream"})


class ConfigError(Exception):
    """A configuration we cannot run faithfully (message names the field)."""


@dataclass(frozen=True)
class RetryPolicy:
    retry_on: frozenset[str] = frozenset()
    num_retries: int = 1  # Envoy's default when a policy exists
    per_try_timeout_s: float | None = None
    retriable_status_codes: frozenset[int] = frozenset()
    backoff_base_s: float = 0.025
    backoff_max_s: float | None = None  # None: 10 x base, as in Envoy
    previous_hosts: bool = False  # retry_host_predicate envoy.retry_host_predicates.previous_hosts
    host_selection_retry_max_attempts: int = 1


@dataclass(frozen=True)
class HeaderMatch:
    name: str  # lower-case
    exact: str | None = None
    prefix: str | None = None
    suffix: str | None = None
    regex: re.Pattern[str] | None = None
    present: bool | None = None
    invert: bool = False


@dataclass(frozen=True)
class RouteMatch:
    prefix: str | None = None
    path: str | None = None
    regex: re.Pattern[str] | None = None
    headers: tuple[HeaderMatch, ...] = ()
    case_sensitive: bool = True


@dataclass(frozen=True)
class DirectResponse:
    status: int
    body: bytes = b""


#: Envoy's HeaderValueOption.append_action values.
APPEND_ACTIONS = ("APPEND_IF_EXISTS_OR_ADD", "ADD_IF_ABSENT", "OVERWRITE_IF_EXISTS_OR_ADD", "OVERWRITE_IF_EXISTS")


@dataclass(frozen=True)
class HeaderValueOption:
    name: str  # lower-case
    value: str
    append_action: str = "APPEND_IF_EXISTS_OR_ADD"
    keep_empty_value: bool = False


@dataclass(frozen=True)
class HeaderMutations:
    """request/response_headers_to_add/_to_remove of one level (route, virtual host or route configuration)."""

    request_add: tuple[HeaderValueOption, ...] = ()
    request_remove: tuple[str, ...] = ()  # lower-case
    response_add: tuple[HeaderValueOption, ...] = ()
    response_remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.request_add or self.request_remove or self.response_add or self.response_remove)


@dataclass(frozen=True)
class WeightedCluster:
    name: str
    weight: int
    fault: FaultFilter | None = None  # its typed_per_filter_config (fault filter): wins over the route's


@dataclass(frozen=True)
class MirrorPolicy:
    """request_mirror_policies[]: a copy of each request (a ``fraction`` of them) goes to ``cluster``."""

    cluster: str
    numerator: int = 100  # runtime_fraction.default_value, as a fraction of ``denominator``
    denominator: int = 100  # HUNDRED 100 | TEN_THOUSAND 10000 | MILLION 1000000


@dataclass(frozen=True)
class RegexRewrite:
    pattern: Any  # a compiled RE2 pattern (sidecar.safe_regex)
    substitution: str


@dataclass(frozen=True)
class Route:
    match: RouteMatch
    cluster: str | None = None
    direct_response: DirectResponse | None = None
    timeout_s: float = 15.0  # Envoy's default route timeout; 0 disables
    retry_policy: RetryPolicy | None = None  # None: inherit the virtual host's
    prefix_rewrite: str | None = None
    name: str = ""
    fault: FaultFilter | None = None  # typed_per_filter_config of envoy.filters.http.fault
    weighted_clusters: tuple[WeightedCluster, ...] = ()  # instead of ``cluster``
    mirror_policies: tuple[MirrorPolicy, ...] = ()  # Envoy: request_mirror_policies
    headers: HeaderMutations = field(default_factory=HeaderMutations)
    regex_rewrite: RegexRewrite | None = None
    host_rewrite_literal: str | None = None


@dataclass(frozen=True)
class VirtualHost:
    name: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...]
    retry_policy: RetryPolicy | None = None
    include_request_attempt_count: bool = False  # Envoy: x-envoy-attempt-count goes upstream only then
    headers: HeaderMutations = field(default_factory=HeaderMutations)


@dataclass(frozen=True)
class RouteConfig:
    name: str
    virtual_hosts: tuple[VirtualHost, ...]
    headers: HeaderMutations = field(default_factory=HeaderMutations)


@dataclass(frozen=True)
class AccessLog:
    path: str  # a file path, /dev/stdout or /dev/stderr
    format: str | None = None  # None: Envoy's default format


@dataclass(frozen=True)
class FaultAbort:
    """Envoy's FaultAbort: a fixed ``http_status`` or ``header_abort`` (x-envoy-fault-abort-request)."""
    http_status: int | None = None
    header_abort: bool = False
    percentage: tuple[int, int] = (0, 100)  # FractionalPercent: numerator, denominator (100, 10000, 1000000)


@dataclass(frozen=True)
class FaultDelay:
    """Envoy's FaultDelay: a ``fixed_delay`` or ``header_delay`` (x-envoy-fault-delay-request, ms)."""
    fixed_delay_s: float | None = None
    header_delay: bool = False
    percentage: tuple[int, int] = (0, 100)


@dataclass(frozen=True)
class FaultFilter:
    """``envoy.filters.http.fault`` (HTTPFault); also a route's ``typed_per_filter_config`` override."""
    abort: FaultAbort | None = None
    delay: FaultDelay | None = None
    max_active_faults: int | None = None
    upstream_cluster: str | None = None
    headers: tuple[HeaderMatch, ...] = ()
    abort_percent_runtime: str = "fault.http.abort.abort_percent"
    abort_http_status_runtime: str = "fault.http.abort.http_status"
    delay_percent_runtime: str = "fault.http.delay.fixed_delay_percent"
    delay_duration_runtime: str = "fault.http.delay.fixed_duration_ms"


@dataclass(frozen=True)
class RuntimePercent:
    """RuntimeFractionalPercent: a default that the runtime key may override (an integer numerator)."""
    runtime_key: str
    percentage: tuple[int, int] = (0, 100)


@dataclass(frozen=True)
class LocalRateLimit:
    """``envoy.filters.http.local_ratelimit``: one token bucket per filter, refilled continuously."""
    stat_prefix: str
    max_tokens: int
    tokens_per_fill: int = 1
    fill_interval_s: float = 1.0
    filter_enabled: RuntimePercent | None = None  # None: 0 % enabled (Envoy's default)
    filter_enforced: RuntimePercent | None = None  # None: 0 % enforced
    status: int = 429


@dataclass(frozen=True)
class HttpFilter:
    """One HTTP filter before the router: ``name`` is Envoy's (envoy.filters.http.fault / local_ratelimit /
    rbac / jwt_authn); ``config`` is that filter's own model (the RBAC and JWT models live in their modules)."""
    name: str
    config: Any


@dataclass(frozen=True)
class Tracing:
    """HttpConnectionManager.tracing with the Zipkin provider (``envoy.tracers.zipkin``, Zipkin v2 JSON).

    Sampling percentages are Envoy's: ``random_sampling`` decides for requests that arrive without a sampling
    decision, ``client_sampling`` honours a client's ``x-client-trace-id``, ``overall_sampling`` caps both.
    """
    collector_cluster: str
    collector_endpoint: str = "/api/v2/spans"
    random_sampling: float = 100.0
    client_sampling: float = 100.0
    overall_sampling: float = 100.0
    #: One CLIENT span per upstream attempt (the router's), children of the request's span: retries visible.
    spawn_upstream_span: bool = False
    trace_id_128bit: bool = False
    shared_span_context: bool = True
    #: Envoy's zipkin trace_context_option: "USE_B3" (default) or "USE_B3_WITH_W3C_PROPAGATION" (also read and
    #: write W3C traceparent).
    trace_context_option: str = "USE_B3"
    #: The HCM's traffic direction for the span kind and name: "INBOUND" (SERVER span, ingress) or
    #: "OUTBOUND" (CLIENT span, egress); "" = UNSPECIFIED (Envoy: the listener's traffic_direction).
    traffic_direction: str = ""
    max_path_tag_length: int = 256


@dataclass(frozen=True)
class HttpConnectionManager:
    stat_prefix: str
    route_config: RouteConfig
    access_logs: tuple[AccessLog, ...] = ()
    codec_type: str = "AUTO"
    use_remote_address: bool = False
    max_request_headers_kb: int = 60
    stream_idle_timeout_s: float = 300.0
    http_filters: tuple[HttpFilter, ...] = ()  # before the router, in order
    tracing: Tracing | None = None


# --- TLS: Envoy's envoy.transport_sockets.tls, the subset a mesh uses ----------------------------------------------

@dataclass(frozen=True)
class SanMatcher:
    """One of CertificateValidationContext.match_typed_subject_alt_names: a SAN of ``san_type`` whose value
    matches (``exact`` or ``prefix``). A mesh peer is matched by its SPIFFE id: URI, exact."""
    san_type: str = "URI"  # URI | DNS | IP_ADDRESS | EMAIL
    exact: str | None = None
    prefix: str | None = None


@dataclass(frozen=True)
class CommonTls:
    """CommonTlsContext: our certificate (file paths, read at start and re-read when the files change),
    the CA that validates the peer, which peer SANs are accepted, ALPN."""
    cert_chain: str | None = None  # tls_certificates[0].certificate_chain.filename
    private_key: str | None = None  # tls_certificates[0].private_key.filename
    trusted_ca: str | None = None  # validation_context.trusted_ca.filename (None: the peer is not verified)
    match_sans: tuple[SanMatcher, ...] = ()  # empty: any certificate the CA signed
    alpn: tuple[str, ...] = ()


@dataclass(frozen=True)
class DownstreamTls:
    """DownstreamTlsContext of a listener's filter chain."""
    common: CommonTls
    require_client_certificate: bool = False


@dataclass(frozen=True)
class UpstreamTls:
    """UpstreamTlsContext of a cluster's transport_socket."""
    common: CommonTls
    sni: str | None = None


@dataclass(frozen=True)
class Listener:
    name: str
    address: str
    port: int
    hcm: HttpConnectionManager
    original_address: str = ""
    tls: DownstreamTls | None = None
    #: With ``tls``: a second, plaintext filter chain is chosen when the first bytes are not a TLS
    #: ClientHello (Envoy: listener_filters tls_inspector + filter_chain_match.transport_protocol), i.e. the
    #: mesh's ``mtls: permissive``. Without: a plaintext client is refused (``strict``).
    plaintext_allowed: bool = False

    @property
    def is_egress(self) -> bool:
        """Pod-local listeners (written as 127.0.0.1/localhost) carry the service's outbound calls."""
        return self.original_address in ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Endpoint:
    host: str  # an IP or a name (strict_dns / logical_dns)
    port: int


@dataclass(frozen=True)
class CircuitBreakers:
    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3
    # retry_budget (Envoy): when set, it replaces max_retries: retries in flight may reach budget_percent of the
    # active + pending requests, and at least min_retry_concurrency.
    retry_budget_percent: float | None = None  # None: no retry_budget
    min_retry_concurrency: int = 3


@dataclass(frozen=True)
class OutlierDetection:
    """Envoy's cluster.outlier_detection (consecutive and success-rate detectors)."""
    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5
    consecutive_local_origin_failure: int = 5
    split_external_local_origin_errors: bool = False
    interval_s: float = 10.0
    base_ejection_time_s: float = 30.0
    max_ejection_time_s: float = 300.0
    max_ejection_percent: int = 10
    enforcing_consecutive_5xx: int = 100
    enforcing_consecutive_gateway_failure: int = 0
    enforcing_consecutive_local_origin_failure: int = 100
    enforcing_success_rate: int = 100
    success_rate_minimum_hosts: int = 5
    success_rate_request_volume: int = 100
    success_rate_stdev_factor: int = 1900  # divided by 1000


@dataclass(frozen=True)
class HealthCheck:
    """Envoy's active HTTP health check (cluster.health_checks[0] with http_health_check)."""
    timeout_s: float
    interval_s: float
    unhealthy_threshold: int
    healthy_threshold: int
    path: str
    expected_statuses: tuple[tuple[int, int], ...] = ((200, 201),)  # [start, end) ranges, Envoy's default 200
    no_traffic_interval_s: float = 60.0
    host: str | None = None


@dataclass(frozen=True)
class Cluster:
    name: str
    type: str  # STATIC | STRICT_DNS | LOGICAL_DNS
    endpoints: tuple[Endpoint, ...]
    connect_timeout_s: float = 5.0
    lb_policy: str = "ROUND_ROBIN"  # ROUND_ROBIN | LEAST_REQUEST | RANDOM
    circuit_breakers: CircuitBreakers = field(default_factory=CircuitBreakers)
    outlier_detection: OutlierDetection | None = None
    health_checks: tuple[HealthCheck, ...] = ()
    dns_refresh_rate_s: float = 5.0
    per_connection_buffer_limit_bytes: int = 1024 * 1024
    tls: UpstreamTls | None = None  # transport_socket envoy.transport_sockets.tls


@dataclass(frozen=True)
class Admin:
    address: str
    port: int
    access_log_path: str | None = None
    idle_timeout_s: float = 300.0  # admin connections silent this long are closed, like the listeners' (Envoy's 5 min)


@dataclass(frozen=True)
class Bootstrap:
    listeners: tuple[Listener, ...]
    clusters: tuple[Cluster, ...]
    admin: Admin | None = None
    warnings: tuple[str, ...] = ()
    #: Envoy's node.id / node.cluster (--service-node / --service-cluster): the Zipkin spans' localEndpoint
    #: serviceName is node.cluster (meshctl sets the pod's name).
    node_id: str = ""
    node_cluster: str = ""
    #: Envoy's layered_runtime static layer, the keys we read: (key, value) pairs, e.g. the Zipkin reporter's
    #: tracing.zipkin.flush_interval_ms / tracing.zipkin.min_flush_spans.
    runtime: tuple[tuple[str, str], ...] = ()

    def runtime_int(self, key: str, default: int) -> int:
        value = dict(self.runtime).get(key)
        return int(value) if value is not None and str(value).isdigit() else default

    def cluster(self, name: str) -> Cluster | None:
        return next((c for c in self.clusters if c.name == name), None)

    @property
    def egress_listener(self) -> Listener | None:
        return next((lst for lst in self.listeners if lst.is_egress), None)
