"""The mesh's tracing, as meshctl hands it to a sidecar, added to its compiled model.

``meshctl up`` with tracing starts a Zipkin-compatible collector on a mesh address and runs every sidecar with
``--tracing-collector IP:PORT --tracing-sampling PCT --service-cluster POD`` (Envoy's own flag names where it
has them). ``apply_tracing`` turns that into Envoy's vocabulary, the way a mesh's control plane configures its
proxies: a STATIC cluster for the collector, and on every HTTP connection manager that has no tracing of its own
a Zipkin tracer (128-bit trace ids, B3 and W3C ``traceparent`` both read and written, one span per upstream
attempt so retries show) with the mesh's sampling. The same transformed model drives our data path and the
real Envoy's exported bootstrap, so both engines report the same spans to the same collector.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sidecar.config import Bootstrap, Cluster, ConfigError, Endpoint, Tracing

#: The collector's cluster in every traced sidecar (a name users are unlikely to pick).
COLLECTOR_CLUSTER = "meshctl_tracing"
#: How often the sidecars report (Envoy's runtime key, default 5 s): ``meshctl trace`` shows a request within
#: a second of its end. The same static-layer key reaches the real Envoy through the exported bootstrap.
FLUSH_INTERVAL_KEY = "tracing.zipkin.flush_interval_ms"
MESH_FLUSH_INTERVAL_MS = 500


@dataclass(frozen=True)
class MeshTracing:
    collector_ip: str
    collector_port: int
    sampling: float = 100.0  # percent of requests without a sampling decision that start a sampled trace
    service: str = ""  # node.cluster: the spans' localEndpoint.serviceName (the pod)


def parse_collector(value: str) -> tuple[str, int]:
    """``IP:PORT`` of ``--tracing-collector`` (raises ConfigError)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--tracing-collector must be IP:PORT, got {value!r}")
    return host, int(port)


def apply_tracing(boot: Bootstrap, mesh: MeshTracing) -> Bootstrap:
    """The model with the mesh's tracer on every connection manager that has none of its own."""
    if not 0.0 <= mesh.sampling <= 100.0:
        raise ConfigError(f"tracing sampling must be a percentage from 0 to 100, got {mesh.sampling:g}")
    if boot.cluster(COLLECTOR_CLUSTER) is not None:
        raise ConfigError(f"a cluster named {COLLECTOR_CLUSTER!r} already exists: the mesh's tracing uses that name")
    listeners = tuple(
        lst if lst.hcm.tracing is not None else replace(lst, hcm=replace(lst.hcm, tracing=Tracing(
            collector_cluster=COLLECTOR_CLUSTER, random_sampling=mesh.sampling, spawn_upstream_span=True,
            trace_id_128bit=True, trace_context_option="USE_B3_WITH_W3C_PROPAGATION",
            traffic_direction="OUTBOUND" if lst.is_egress else "INBOUND")))
        for lst in boot.listeners)
    collector = Cluster(name=COLLECTOR_CLUSTER, type="STATIC",
                        endpoints=(Endpoint(mesh.collector_ip, mesh.collector_port),), connect_timeout_s=1.0)
    runtime = boot.runtime if any(k == FLUSH_INTERVAL_KEY for k, _ in boot.runtime) else (
        *boot.runtime, (FLUSH_INTERVAL_KEY, str(MESH_FLUSH_INTERVAL_MS)))
    return replace(boot, listeners=listeners, clusters=(*boot.clusters, collector), runtime=runtime,
                   node_cluster=mesh.service or boot.node_cluster, node_id=boot.node_id or mesh.service)
