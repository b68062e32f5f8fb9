"""The tracing pod: a Zipkin-compatible collector as one more pod of the mesh, and what tracing adds to the others.

Like the Prometheus pod, the collector is an ordinary pod (its own alias, a
readiness probe, restart always), so ``ps``, ``logs``, ``restart`` and the
scrape config treat it like any other; its ``/metrics`` becomes the
``tracing`` scrape job through the pod's ``metrics:`` declaration.

What the rest of the mesh gets, all decided here and nowhere else:

* each sidecar on our engine: ``--tracing-collector IP:PORT --tracing-sampling PCT --service-cluster POD``;
* each real Envoy: the same settings baked into its exported bootstrap (``sidecar.mesh_tracing.apply_tracing``);
* every process of every pod: ``TRACING_ENDPOINT`` and ``OTEL_EXPORTER_ZIPKIN_ENDPOINT`` (the spans URL), so
  any Zipkin- or OpenTelemetry-instrumented program reports to the mesh's collector, and the collector's
  address in ``NO_PROXY``: a service that honours ``HTTP_PROXY`` would otherwise send its spans through its
  sidecar's egress listener, which has no route to the collector.

The collector's address is an IP, not the pod's name: it works where pods cannot have their own /etc/hosts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pods.topology import MetricsSpec, PodSpec, ProcessSpec, ReadyProbe, Topology, TracingSpec

if TYPE_CHECKING:
    from sidecar.mesh_tracing import MeshTracing

POD_NAME = "tracing"
SPANS_PATH = "/api/v2/spans"
HEALTH_PATH = "/health"
#: The variables every process of a traced mesh gets: the spans URL under the names instrumented apps read.
ENDPOINT_VARS = ("TRACING_ENDPOINT", "OTEL_EXPORTER_ZIPKIN_ENDPOINT")


@dataclass(frozen=True)
class TracingPlan:
    """Where the mesh's collector is and how it was asked to behave: what readers learn from the supervisor."""

    ip: str
    port: int
    sampling: float
    max_traces: int
    max_spans_per_trace: int
    forward: tuple[str, str] | None = None

    @property
    def endpoint(self) -> str:
        """The Zipkin v2 spans URL (``POST``)."""
        return f"http://{self.ip}:{self.port}{SPANS_PATH}"

    @property
    def query_url(self) -> str:
        """The base of Zipkin's query API (``/api/v2/traces``, ``/api/v2/trace/ID``, ``/api/v2/services``)."""
        return f"http://{self.ip}:{self.port}"

    def mesh_env(self) -> dict[str, str]:
        return dict.fromkeys(ENDPOINT_VARS, self.endpoint)

    def mesh_tracing(self, pod: str) -> MeshTracing:
        """A pod's sidecar settings in the vocabulary ``apply_tracing`` takes (the real Envoy's export)."""
        from sidecar.mesh_tracing import MeshTracing

        return MeshTracing(self.ip, self.port, self.sampling, pod)

    def sidecar_args(self, pod: str) -> tuple[str, ...]:
        """Our sidecar's arguments: Envoy's own flag name for the service (``--service-cluster``)."""
        return ("--tracing-collector", f"{self.ip}:{self.port}", "--tracing-sampling", f"{self.sampling:g}",
                "--service-cluster", pod)

    def describe(self) -> dict[str, Any]:
        """The control API's ``tracing`` (``GET /v1/status``)."""
        return {"pod": POD_NAME, "collector": f"{self.ip}:{self.port}", "endpoint": self.endpoint,
                "query_url": self.query_url, "sampling": self.sampling, "max_traces": self.max_traces,
                "max_spans_per_trace": self.max_spans_per_trace,
                "forward": None if self.forward is None else {"kind": self.forward[0], "url": self.forward[1]}}


def collector_command(spec: TracingSpec) -> tuple[str, ...]:
    """The collector's argv; ``${POD_IP}`` is the pod's alias, filled in per replica."""
    command: tuple[str, ...] = ("python", "-m", "meshctl.tracing.collector", "--listen", f"${{POD_IP}}:{spec.port}",
                                "--max-traces", str(spec.max_traces),
                                "--max-spans-per-trace", str(spec.max_spans_per_trace))
    if spec.forward is not None:
        kind, url = spec.forward
        command += (f"--forward-{kind}", url)
    return command


def with_tracing(topo: Topology, spec: TracingSpec) -> Topology:
    """The topology plus the collector pod (raises ValueError when a pod already has its name)."""
    if POD_NAME in topo.pods:
        raise ValueError(f"a pod named '{POD_NAME}' already exists; rename it to use the tracing section")
    service = ProcessSpec(command=collector_command(spec), env={},
                          ready=ReadyProbe("http", port=spec.port, path=HEALTH_PATH, line=spec.line),
                          restart="always", stop_grace_s=5.0, workdir=Path(topo.path).parent, line=spec.line)
    pod = PodSpec(name=POD_NAME, replicas=1, ip=spec.ip, service=service, publish=(), add_hosts=(), sidecar=None,
                  sidecar_line=0, metrics=MetricsSpec(spec.port, "/metrics", spec.line), line=spec.line)
    return replace(topo, pods={**topo.pods, POD_NAME: pod}, tracing=spec)


def tracing_plan(spec: TracingSpec, collector_ip: str) -> TracingPlan:
    return TracingPlan(ip=collector_ip, port=spec.port, sampling=spec.sampling, max_traces=spec.max_traces,
                       max_spans_per_trace=spec.max_spans_per_trace, forward=spec.forward)
