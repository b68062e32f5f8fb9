"""The topology file: which pods exist, what they run, how they are reached.

This is the contract between the user and meshctl, so it is validated up front
and completely: every problem is reported at once as ``FILE:LINE: message``,
because a supervisor that fails on the third pod after starting two is much
harder to reason about than a file that is rejected before anything starts.
Nothing here starts processes or touches the network.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from pods.addressing import LOOPBACK, alias_problem, is_ip, replica_aliases
from pods.durations import parse_duration
from pods.names import DNS_LABEL_RULE, dns_label, valid_mesh_name
from pods.source import Entry, Map, Node, Problem, Report, Scalar, Seq, describe, report_duplicates, to_python
from pods.source import build as build_tree
from pods.source import compose as compose_yaml

__all__ = [
    "DEPENDENCY_CONDITIONS", "MTLS_MODES", "PORT_PROTOCOLS", "RESTART_POLICIES", "Dependency", "IdentitySpec",
    "MetricsSpec", "PodSpec", "PortClaim", "PortSpec", "Problem", "ProcessSpec", "PublishSpec", "ReadyProbe",
    "Topology", "TopologyError", "TracingSpec", "dependency_cycles", "load_topology", "parse_topology",
]

RESTART_POLICIES = ("always", "on-failure", "never")
MAX_REPLICAS = 200
DEFAULT_STOP_GRACE_S = 10.0
DEFAULT_METRICS_PATH = "/metrics"

TOP_KEYS = ("name", "pods", "prometheus", "mtls", "identity", "tracing")
POD_KEYS = ("replicas", "ip", "service", "publish", "add_hosts", "sidecar", "metrics", "mtls", "image", "ports",
            "depends_on")
#: What a pod waits for before it starts (compose's service_started / service_healthy /
#: service_completed_successfully): every replica of the other pod's service started, ready, or exited 0.
DEPENDENCY_CONDITIONS = ("started", "ready", "completed")
#: Protocols a declared port may carry (``ports: ["5432/tcp"]``); what `meshctl export` names the port after.
PORT_PROTOCOLS = ("http", "tcp", "grpc")
SERVICE_KEYS = ("command", "env", "ready", "restart", "stop_grace_period", "workdir")
READY_KEYS = ("tcp", "http", "port", "exec")
METRICS_KEYS = ("port", "path")
PROMETHEUS_KEYS = ("port", "publish", "bin", "scrape_interval", "ip")
IDENTITY_KEYS = ("cert_ttl", "ca")
TRACING_KEYS = ("sampling", "port", "ip", "max_traces", "max_spans_per_trace", "forward")
FORWARD_KINDS = ("zipkin", "otlp")
#: Beyond these a trace store is no longer "the last few traces of a lab" but a database; use forward: for that.
MAX_TRACES = 100_000
MAX_SPANS_PER_TRACE = 100_000
CA_KEYS = ("cert", "key")
MTLS_MODES = ("strict", "permissive", "off")
DEFAULT_CERT_TTL_S = 24 * 3600.0
#: Shorter lifetimes would rotate faster than a sidecar can sensibly reload (rotation is at 2/3 of it).
MIN_CERT_TTL_S = 60.0

_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LOCALHOST_VALUES = ("localhost", "127.0.0.1")


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ReadyProbe:
    kind: str  # "tcp" | "http" | "exec"
    port: int | None = None
    path: str | None = None
    command: tuple[str, ...] = ()
    line: int = 0


@dataclass(frozen=True)
class ProcessSpec:
    command: tuple[str, ...]
    env: dict[str, str]
    ready: ReadyProbe | None
    restart: str
    stop_grace_s: float
    workdir: Path
    line: int
    #: Line of every env entry, so that relational errors (port clashes) can
    #: point at the right line of a block-style env mapping.
    env_lines: dict[str, int] = field(default_factory=dict, compare=False)
    #: Line of the command, for "not found on PATH" errors found at start time.
    command_line: int = field(default=0, compare=False)
    #: Line of ``restart:`` (0: not written), for `meshctl export`'s warning about it.
    restart_line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class PublishSpec:
    host_ip: str
    host_port: int
    pod_port: int
    line: int


@dataclass(frozen=True)
class PortSpec:
    """A port the pod serves that meshctl cannot infer (``ports:``), for `meshctl export`'s Services."""

    port: int
    protocol: str  # one of PORT_PROTOCOLS
    line: int


@dataclass(frozen=True)
class Dependency:
    """``depends_on: {b: ready}``: this pod starts once every replica of ``pod`` meets ``condition``."""

    pod: str
    condition: str  # one of DEPENDENCY_CONDITIONS
    line: int


@dataclass(frozen=True)
class MetricsSpec:
    port: int
    path: str
    line: int


@dataclass(frozen=True)
class PortClaim:
    port: int
    owner: str
    line: int


@dataclass(frozen=True)
class PodSpec:
    name: str
    replicas: int
    ip: str | None
    service: ProcessSpec
    publish: tuple[PublishSpec, ...]
    add_hosts: tuple[tuple[str, str], ...]
    sidecar: dict | None
    sidecar_line: int
    metrics: MetricsSpec | None
    line: int
    #: The pod's own ``mtls:`` (None: the mesh's), and where it is written.
    mtls: str | None = None
    mtls_line: int = 0
    #: The container image `meshctl export` runs the service in (None: only from ``--image``), and its line.
    image: str | None = None
    image_line: int = 0
    ports: tuple[PortSpec, ...] = ()
    depends_on: tuple[Dependency, ...] = ()

    def port_claims(self) -> list[PortClaim]:
        """Ports the pod's processes will bind on its alias.

        All processes of a pod share one address, so two of them wanting the
        same port is a certain bind failure at start-up. Services learn their
        ports through ``*_PORT`` env variables (the containers convention), so
        those are the claims; the sidecar adds its listeners here later.
        """
        claims = []
        for key, value in self.service.env.items():
            port = _port_value(value) if key.endswith("_PORT") else None
            if port is not None:
                claims.append(PortClaim(port, key, self.service.env_lines.get(key, self.service.line)))
        return claims


@dataclass(frozen=True)
class PrometheusSpec:
    """The optional Prometheus pod: the real server, scraping every sidecar and declared metrics endpoint."""

    port: int = 9090  # on its own alias
    publish: int | None = 9090  # host 127.0.0.1 port; None: not published
    bin: str = "prometheus"
    scrape_interval_s: float = 1.0
    ip: str | None = None
    line: int = 0


@dataclass(frozen=True)
class TracingSpec:
    """The optional tracing pod: a Zipkin-compatible collector every sidecar (and any app) reports spans to."""

    #: Percent of requests without a sampling decision that start a sampled trace (a lab samples all).
    sampling: float = 100.0
    port: int = 9411  # Zipkin's port, on the collector's own alias
    ip: str | None = None
    max_traces: int = 1000
    max_spans_per_trace: int = 1000
    #: ("zipkin", URL) or ("otlp", URL): also send every span there, in batches; None: keep them here only.
    forward: tuple[str, str] | None = None
    line: int = 0


@dataclass(frozen=True)
class IdentitySpec:
    """The mesh's ``identity:`` section: workload certificate lifetime, and the user's own CA if any."""

    cert_ttl_s: float = DEFAULT_CERT_TTL_S
    #: (cert, key), absolute; None: meshctl creates and keeps the mesh's CA in its state dir.
    ca: tuple[Path, Path] | None = None
    line: int = 0


@dataclass(frozen=True)
class Topology:
    name: str
    path: Path
    pods: dict[str, PodSpec]
    warnings: list[Problem]
    prometheus: PrometheusSpec | None = None
    #: The mesh-wide mTLS mode (each pod may override it) and where it is written.
    mtls: str = "off"
    mtls_line: int = 0
    identity: IdentitySpec = field(default_factory=IdentitySpec)
    tracing: TracingSpec | None = None

    def pod_mtls(self, pod: str) -> str:
        """A pod's effective mTLS mode: its own, else the mesh's; always off without a sidecar."""
        spec = self.pods[pod]
        if spec.sidecar is None:
            return "off"
        return spec.mtls or self.mtls


class TopologyError(Exception):
    """The file is not a usable topology; ``problems`` lists every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(map(str, problems)))
        self.problems = problems


# --------------------------------------------------------------------------- entry points


def load_topology(path: str | Path, environ: Mapping[str, str] | None = None) -> Topology:
    """Read and validate the topology file at ``path``."""
    shown = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TopologyError([Problem(shown, 0, "no such file")]) from None
    except IsADirectoryError:
        raise TopologyError([Problem(shown, 0, "is a directory, not a topology file")]) from None
    except UnicodeDecodeError as exc:
        message = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise TopologyError([Problem(shown, 0, message)]) from None
    except OSError as exc:
        raise TopologyError([Problem(shown, 0, f"cannot read: {exc.strerror or exc}")]) from None
    return parse_topology(text, path, environ)


def parse_topology(text: str, path: str | Path, environ: Mapping[str, str] | None = None) -> Topology:
    """Validate topology ``text``; ``path`` names it in messages and anchors relative workdirs."""
    report = Report(str(path))
    env = os.environ if environ is None else environ
    root = compose_yaml(text, report)
    topology = None
    if root is None and not report.problems:
        report.error(1, "topology file is empty (expected a mapping with a 'pods' key)")
    elif root is not None:
        tree = build_tree(root, report, env, skip_top_level=lambda key: key.startswith("x-"))
        topology = _Validator(report, Path(path)).topology(tree)
    if report.errors or topology is None:
        raise TopologyError(report.sorted())
    return topology


# --------------------------------------------------------------------------- validation


class _Validator:
    """Walks the located tree; each ``_check_*``/``_parse_*`` handles one part of the schema."""

    def __init__(self, report: Report, path: Path) -> None:
        self.report = report
        self.path = path
        self.base = Path(os.path.abspath(path)).parent

    # ---- generic helpers

    def error(self, node: Node | int, message: str) -> None:
        """Report against a value, unless interpolation already failed on it."""
        if isinstance(node, int):
            self.report.error(node, message)
        elif not (isinstance(node, Scalar) and node.broken):
            self.report.error(node.line, message)

    def keys(self, mapping: Map, allowed: Iterable[str], where: str, noun: str = "key") -> None:
        """Unknown and duplicate keys, pointed at the key's own line."""
        allowed = tuple(allowed)
        for key, line, first in mapping.duplicates:
            self.report.error(line, f"duplicate {noun} {key!r}{where} (first defined at line {first})")
        for key, entry in mapping.entries.items():
            if key not in allowed:
                self.report.error(entry.key_line, f"unknown key {key!r}{where}{_did_you_mean(key, allowed)}")

    def mapping(self, node: Node, where: str) -> Map | None:
        if isinstance(node, Map):
            return node
        self.error(node, f"{where} must be a mapping, got {describe(node)}")
        return None

    def integer(self, node: Node, where: str, low: int, high: int) -> int | None:
        value = _int_value(node)
        if value is None:
            self.error(node, f"{where} must be an integer, got {describe(node)}")
        elif value < low:
            self.error(node, f"{where} must be at least {low}, got {value}")
        elif value > high:
            self.error(node, f"{where} must be at most {high}, got {value}")
        else:
            return value
        return None

    def port(self, node: Node, where: str) -> int | None:
        value = _int_value(node)
        if value is None or not 1 <= value <= 65535:
            shown = describe(node) if value is None else str(value)
            self.error(node, f"{where} must be a port number (1..65535), got {shown}")
            return None
        return value

    def string(self, node: Node, where: str) -> str | None:
        if isinstance(node, Scalar) and isinstance(node.value, str):
            return node.value
        self.error(node, f"{where} must be a string, got {describe(node)}")
        return None

    def command(self, node: Node, where: str) -> tuple[str, ...] | None:
        """A list of words, or one string split like a shell would (but never run by one)."""
        if isinstance(node, Scalar) and isinstance(node.value, str):
            try:
                words = tuple(shlex.split(node.value))
            except ValueError as exc:
                self.error(node, f"{where} cannot be split into words: {exc}")
                return None
        elif isinstance(node, Seq):
            words = ()
            for item in node.items:
                if not isinstance(item, Scalar) or item.value is None:
                    self.error(item, f"{where} items must be strings, got {describe(item)}")
                    return None
                words += (_env_text(item.value),)
        else:
            self.error(node, f"{where} must be a list of strings or a string, got {describe(node)}")
            return None
        if not words or not words[0]:
            self.error(node, f"{where} is empty")
            return None
        return words

    # ---- top level

    def topology(self, tree: Node) -> Topology | None:
        if not isinstance(tree, Map):
            self.error(tree, f"top level must be a mapping with a 'pods' key, got {describe(tree)}")
            return None
        self.keys(tree, TOP_KEYS, " at top level")
        name = self._mesh_name(tree)
        prometheus = self._prometheus(tree.entries.get("prometheus"))
        mtls, mtls_line = self._mtls(tree.entries.get("mtls"), "mtls")
        identity = self._identity(tree.entries.get("identity"))
        tracing = self._tracing(tree.entries.get("tracing"))
        pods = self._pods(tree)
        if pods is None:
            return None
        self._check_aliases(pods.values())
        self._check_port_claims(pods.values())
        self._check_publish_clashes(pods.values())
        self._check_mtls(pods.values(), mtls or "off", mtls_line)
        self._check_dependencies(pods)
        return Topology(name, Path(os.path.abspath(self.path)), pods, self.report.warnings, prometheus,
                        mtls=mtls or "off", mtls_line=mtls_line, identity=identity, tracing=tracing)

    # ---- zero trust

    def _mtls(self, entry: Entry | None, where: str) -> tuple[str | None, int]:
        """An ``mtls:`` value (None when absent or wrong) and the line of its key."""
        if entry is None:
            return None, 0
        value = entry.value.value if isinstance(entry.value, Scalar) else None
        if value is False:  # YAML 1.1 reads a bare `off` as false
            value = "off"
        if value in MTLS_MODES:
            return value, entry.key_line
        hint = _did_you_mean(value, MTLS_MODES) if isinstance(value, str) else ""
        self.error(entry.value, f"{where} must be one of {', '.join(MTLS_MODES)}, got {describe(entry.value)}{hint}")
        return None, entry.key_line

    def _identity(self, entry: Entry | None) -> IdentitySpec:
        if entry is None:
            return IdentitySpec()
        node = self.mapping(entry.value, "identity")
        if node is None:
            return IdentitySpec(line=entry.key_line)
        self.keys(node, IDENTITY_KEYS, " in identity")
        ttl = DEFAULT_CERT_TTL_S
        if (n := node.get("cert_ttl")) is not None:
            seconds = _duration_value(n)
            if seconds is None:
                self.error(n, f"identity.cert_ttl must be a duration like 24h, 90m or a number of seconds, "
                              f"got {describe(n)}")
            elif seconds < MIN_CERT_TTL_S:
                self.error(n, f"identity.cert_ttl must be at least 1m (certificates rotate at 2/3 of their "
                              f"lifetime), got {describe(n)}")
            else:
                ttl = seconds
        ca = None
        if (ca_entry := node.entries.get("ca")) is not None and (ca_node := self.mapping(ca_entry.value,
                                                                                         "identity.ca")):
            self.keys(ca_node, CA_KEYS, " in identity.ca")
            paths = []
            for key in CA_KEYS:
                if (n := ca_node.get(key)) is None:
                    self.report.error(ca_entry.key_line, f"identity.ca needs '{key}' (a PEM file)")
                elif (text := self.string(n, f"identity.ca.{key}")):
                    path = Path(os.path.abspath(self.base / os.path.expanduser(text)))
                    if not path.is_file():
                        self.error(n, f"identity.ca.{key}: no such file {str(path)!r}")
                    else:
                        paths.append(path)
            if len(paths) == 2:
                ca = (paths[0], paths[1])
        return IdentitySpec(cert_ttl_s=ttl, ca=ca, line=entry.key_line)

    def _check_mtls(self, pods: Iterable[PodSpec], mesh_mode: str, mesh_line: int) -> None:
        """A pod that asks for mTLS itself needs a sidecar; a mesh-wide mode just skips pods without one."""
        bare = []
        for pod in pods:
            if pod.sidecar is None:
                if pod.mtls in ("strict", "permissive"):
                    self.report.error(pod.mtls_line, f"pod {pod.name!r} has mtls: {pod.mtls} but no sidecar "
                                                     "(mTLS is the sidecar's: add 'sidecar:' or set mtls: off)")
                elif pod.mtls is None:
                    bare.append(pod.name)
        if mesh_mode != "off" and bare:
            self.report.warning(mesh_line, f"mtls: {mesh_mode} does not apply to pods without a sidecar "
                                           f"({', '.join(bare)}): they talk and are reached in plaintext")

    def _check_policy_peers(self, side: Node, where: str, pod_names: tuple[str, ...]) -> None:
        """``allow:``/``deny:`` rules of a short-form ingress name their callers: each must be a pod here."""
        ingress = side.get("ingress") if isinstance(side, Map) else None
        if not isinstance(ingress, Map):
            return
        for key in ("allow", "deny"):
            rules = ingress.get(key)
            if not isinstance(rules, Seq):
                continue
            for i, rule in enumerate(rules.items):
                peers = rule.get("from") if isinstance(rule, Map) else None
                for peer in (peers.items if isinstance(peers, Seq) else [peers] if peers is not None else []):
                    name = peer.value if isinstance(peer, Scalar) else None
                    if not isinstance(name, str) or name == "*" or name.startswith("spiffe://"):
                        continue
                    if name not in pod_names:
                        self.error(peer, f"{where}.sidecar.ingress.{key}[{i}].from: {name!r} is not a pod of "
                                         f"this topology{_did_you_mean(name, pod_names)}")

    def _prometheus(self, entry: Entry | None) -> PrometheusSpec | None:
        if entry is None:
            return None
        if isinstance(entry.value, Scalar) and entry.value.value in (True, None):
            return PrometheusSpec(line=entry.key_line)  # `prometheus: true` / `prometheus:` take the defaults
        node = self.mapping(entry.value, "prometheus")
        if node is None:
            return None
        self.keys(node, PROMETHEUS_KEYS, " in prometheus")
        spec = PrometheusSpec(line=entry.key_line)
        if (n := node.get("port")) is not None and (port := self.port(n, "prometheus.port")):
            spec = replace(spec, port=port)
        if (n := node.get("publish")) is not None:
            if isinstance(n, Scalar) and n.value is False:
                spec = replace(spec, publish=None)
            elif (port := self.port(n, "prometheus.publish")) is not None:
                spec = replace(spec, publish=port)
        if (n := node.get("bin")) is not None and (text := self.string(n, "prometheus.bin")):
            spec = replace(spec, bin=text)
        if (n := node.get("scrape_interval")) is not None:
            seconds = _duration_value(n)
            if not seconds:
                self.error(n, f"prometheus.scrape_interval must be a positive duration like 1s, got {describe(n)}")
            else:
                spec = replace(spec, scrape_interval_s=seconds)
        if (n := node.get("ip")) is not None and (ip := self.string(n, "prometheus.ip")):
            if (problem := alias_problem(ip)) is not None:
                self.error(n, f"prometheus.{problem}")
            else:
                spec = replace(spec, ip=ip)
        return spec

    def _tracing(self, entry: Entry | None) -> TracingSpec | None:
        if entry is None:
            return None
        if isinstance(entry.value, Scalar) and entry.value.value in (True, None):
            return TracingSpec(line=entry.key_line)  # `tracing: true` / `tracing:` take the defaults
        if isinstance(entry.value, Scalar) and entry.value.value is False:
            return None
        node = self.mapping(entry.value, "tracing")
        if node is None:
            return None
        self.keys(node, TRACING_KEYS, " in tracing")
        spec = TracingSpec(line=entry.key_line)
        if (n := node.get("sampling")) is not None:
            value = _percent_value(n)
            if value is None:
                self.error(n, f"tracing.sampling must be a percentage from 0 to 100 (e.g. 100, 12.5 or \"1%\"), "
                              f"got {describe(n)}")
            else:
                spec = replace(spec, sampling=value)
        if (n := node.get("port")) is not None and (port := self.port(n, "tracing.port")):
            spec = replace(spec, port=port)
        if (n := node.get("ip")) is not None and (ip := self.string(n, "tracing.ip")):
            if (problem := alias_problem(ip)) is not None:
                self.error(n, f"tracing.{problem}")
            else:
                spec = replace(spec, ip=ip)
        if (n := node.get("max_traces")) is not None and (
                value := self.integer(n, "tracing.max_traces", 1, MAX_TRACES)) is not None:
            spec = replace(spec, max_traces=value)
        if (n := node.get("max_spans_per_trace")) is not None and (
                value := self.integer(n, "tracing.max_spans_per_trace", 1, MAX_SPANS_PER_TRACE)) is not None:
            spec = replace(spec, max_spans_per_trace=value)
        if (fwd := node.entries.get("forward")) is not None:
            spec = replace(spec, forward=self._forward(fwd))
        return spec

    def _forward(self, entry: Entry) -> tuple[str, str] | None:
        """``{zipkin: URL}`` or ``{otlp: URL}``: exactly one, an http(s) URL with a host."""
        from urllib.parse import urlsplit

        node = self.mapping(entry.value, "tracing.forward")
        if node is None:
            return None
        self.keys(node, FORWARD_KINDS, " in tracing.forward")
        kinds = [k for k in FORWARD_KINDS if k in node.entries]
        if len(kinds) != 1:
            found = ", ".join(kinds) if kinds else "none"
            self.report.error(entry.key_line, "tracing.forward needs exactly one of zipkin (e.g. "
                                              "http://host:9411/api/v2/spans) or otlp (e.g. "
                                              f"http://host:4318/v1/traces) (found {found})")
            return None
        kind = kinds[0]
        value = node.get(kind)
        url = self.string(value, f"tracing.forward.{kind}")
        if url is None:
            return None
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            self.error(value, f"tracing.forward.{kind}: {url!r} is not a URL ({exc})")
            return None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.error(value, f"tracing.forward.{kind} must be an http:// or https:// URL with a host, got {url!r}")
            return None
        return kind, url

    def _mesh_name(self, tree: Map) -> str:
        entry = tree.entries.get("name")
        if entry is None:
            return _default_mesh_name(self.path)
        name = self.string(entry.value, "name")
        if name is not None and not valid_mesh_name(name):
            self.error(entry.value, f"name {name!r} is not a valid mesh name (lowercase letters, digits, "
                                    "'_', '.', '-', starting with a letter or digit, at most 63 chars)")
        return name or _default_mesh_name(self.path)

    def _pods(self, tree: Map) -> dict[str, PodSpec] | None:
        entry = tree.entries.get("pods")
        if entry is None:
            self.report.error(tree.line, "missing required key 'pods'")
            return None
        pods_map = self.mapping(entry.value, "pods")
        if pods_map is None:
            return None
        if not pods_map.entries:
            self.error(entry.key_line, "pods must not be empty")
            return None
        for key, line, first in pods_map.duplicates:
            self.report.error(line, f"duplicate pod {key!r} (first defined at line {first})")
        names = tuple(pods_map.entries)
        pods = {}
        for name, pod_entry in pods_map.entries.items():
            pod = self._pod(pod_entry, names)
            if pod is not None:
                pods[name] = pod
        return pods

    # ---- pods

    def _pod(self, entry: Entry, pod_names: tuple[str, ...]) -> PodSpec | None:
        name = entry.key
        if not dns_label(name):
            self.report.error(entry.key_line, f"pod name {name!r} is not a DNS label ({DNS_LABEL_RULE})")
        node = self.mapping(entry.value, f"pod {name!r}")
        if node is None:
            return None
        self.keys(node, POD_KEYS, f" in pod {name!r}")
        where = f"pods.{name}"
        replicas = 1
        if (value := node.get("replicas")) is not None:
            replicas = self.integer(value, f"{where}.replicas", 1, MAX_REPLICAS) or 1
        ip = self._ip(node.get("ip"), where, replicas)
        service = self._service(node.entries.get("service"), entry, where)
        sidecar, sidecar_line = None, 0
        if (side := node.entries.get("sidecar")) is not None:
            sidecar_line = side.key_line
            report_duplicates(side.value, self.report, f"{where}.sidecar")
            if self.mapping(side.value, f"{where}.sidecar") is not None:
                sidecar = to_python(side.value)
                self._check_policy_peers(side.value, where, pod_names)
        mtls, mtls_line = self._mtls(node.entries.get("mtls"), f"{where}.mtls")
        return PodSpec(
            name=name,
            replicas=replicas,
            ip=ip,
            service=service,
            publish=self._publish(node.get("publish"), name),
            add_hosts=self._add_hosts(node.get("add_hosts"), name, pod_names),
            sidecar=sidecar,
            sidecar_line=sidecar_line,
            metrics=self._metrics(node.entries.get("metrics"), where),
            line=entry.key_line,
            mtls=mtls,
            mtls_line=mtls_line,
            image=self._image(node.entries.get("image"), where),
            image_line=node.entries["image"].key_line if "image" in node.entries else 0,
            ports=self._ports(node.get("ports"), where),
            depends_on=self._depends_on(node.get("depends_on"), name, pod_names),
        )

    def _depends_on(self, node: Node | None, own: str, pod_names: tuple[str, ...]) -> tuple[Dependency, ...]:
        """``depends_on: [b]`` (started) or ``{b: ready, migrate: completed}``, as in a compose file."""
        if node is None:
            return ()
        where = f"pods.{own}.depends_on"
        pairs: list[tuple[str, int, Node | None]] = []  # (pod, line, condition node)
        if isinstance(node, Seq):
            for item in node.items:
                if isinstance(item, Scalar) and isinstance(item.value, str):
                    pairs.append((item.value, item.line, None))
                else:
                    self.error(item, f"{where} items must be pod names, got {describe(item)}")
        elif isinstance(node, Map):
            for key, line, first in node.duplicates:
                self.report.error(line, f"{where}: pod {key!r} is listed twice (first at line {first})")
            pairs = [(key, entry.key_line, entry.value) for key, entry in node.entries.items()]
        else:
            self.error(node, f"{where} must be a list of pods or a mapping pod: condition "
                             f"({', '.join(DEPENDENCY_CONDITIONS)}), got {describe(node)}")
            return ()
        out: list[Dependency] = []
        for pod, line, cond_node in pairs:
            if pod not in pod_names:
                self.report.error(line, f"{where}: no pod named {pod!r}{_did_you_mean(pod, pod_names)}")
                continue
            if pod == own:
                self.report.error(line, f"{where}: pod {pod!r} cannot depend on itself")
                continue
            condition = "started"
            if cond_node is not None:
                value = cond_node.value if isinstance(cond_node, Scalar) else None
                if isinstance(cond_node, Map) and "condition" in cond_node.entries:  # compose's long form
                    self.error(cond_node, f"{where}.{pod}: write the condition itself ({pod}: ready), one of "
                                          f"{', '.join(DEPENDENCY_CONDITIONS)}")
                    continue
                if value not in DEPENDENCY_CONDITIONS:
                    hint = _did_you_mean(value, DEPENDENCY_CONDITIONS) if isinstance(value, str) else ""
                    self.error(cond_node, f"{where}.{pod} must be one of {', '.join(DEPENDENCY_CONDITIONS)}, "
                                          f"got {describe(cond_node)}{hint}")
                    continue
                condition = value
            out.append(Dependency(pod, condition, line))
        return tuple(out)

    def _image(self, entry: Entry | None, where: str) -> str | None:
        if entry is None:
            return None
        image = self.string(entry.value, f"{where}.image")
        if image is not None and (not image.strip() or any(c.isspace() for c in image)):
            self.error(entry.value, f"{where}.image must be an image reference like registry/name:tag, "
                                    f"got {image!r}")
            return None
        return image

    def _ports(self, node: Node | None, where: str) -> tuple[PortSpec, ...]:
        """``ports: [8080, "5432/tcp"]``: ports the service serves besides the ones meshctl infers."""
        if node is None:
            return ()
        if not isinstance(node, Seq):
            self.error(node, f"{where}.ports must be a list of ports like 8080 or \"5432/tcp\", got {describe(node)}")
            return ()
        out: list[PortSpec] = []
        for item in node.items:
            text = str(item.value) if isinstance(item, Scalar) and item.value is not None else ""
            number, _, protocol = text.partition("/")
            protocol = protocol or "http"
            port = _port_value(number)
            if port is None or protocol not in PORT_PROTOCOLS:
                self.error(item, f"{where}.ports: {describe(item)} is not a port like 8080 or "
                                 f"\"5432/tcp\" (protocols: {', '.join(PORT_PROTOCOLS)})")
                continue
            if any(p.port == port for p in out):
                self.error(item, f"{where}.ports: port {port} is listed twice")
                continue
            out.append(PortSpec(port, protocol, item.line))
        return tuple(out)

    def _ip(self, node: Node | None, where: str, replicas: int) -> str | None:
        if node is None:
            return None
        ip = self.string(node, f"{where}.ip")
        if ip is None:
            return None
        if (problem := alias_problem(ip)) is not None:
            self.error(node, f"{where}.ip: {problem}")
            return None
        try:
            replica_aliases(ip, replicas)
        except ValueError as exc:
            self.error(node, f"{where}.ip: {exc}")
            return None
        return ip

    def _service(self, entry: Entry | None, pod: Entry, where: str) -> ProcessSpec:
        """The pod's main process; a broken one still yields a spec so relational checks can run."""
        placeholder = ProcessSpec((), {}, None, "always", DEFAULT_STOP_GRACE_S, self.base, pod.key_line)
        if entry is None:
            self.report.error(pod.key_line, f"pod {pod.key!r} has no service "
                                            "(add 'service:' with at least a 'command')")
            return placeholder
        where = f"{where}.service"
        node = self.mapping(entry.value, where)
        if node is None:
            return placeholder
        self.keys(node, SERVICE_KEYS, f" in {where}")
        command: tuple[str, ...] = ()
        if (value := node.get("command")) is None:
            self.report.error(entry.key_line, f"{where} has no command")
        else:
            command = self.command(value, f"{where}.command") or ()
        env, env_lines = self._env(node.get("env"), f"{where}.env")
        return ProcessSpec(
            command=command,
            env=env,
            ready=self._ready(node.entries.get("ready"), f"{where}.ready"),
            restart=self._restart(node.get("restart"), f"{where}.restart"),
            stop_grace_s=self._duration(node.get("stop_grace_period"), f"{where}.stop_grace_period"),
            workdir=self._workdir(node.get("workdir"), f"{where}.workdir"),
            line=entry.key_line,
            env_lines=env_lines,
            command_line=node.entries["command"].key_line if "command" in node.entries else entry.key_line,
            restart_line=node.entries["restart"].key_line if "restart" in node.entries else 0,
        )

    def _env(self, node: Node | None, where: str) -> tuple[dict[str, str], dict[str, int]]:
        env: dict[str, str] = {}
        lines: dict[str, int] = {}
        if node is None or (mapping := self.mapping(node, where)) is None:
            return env, lines
        for key, line, first in mapping.duplicates:
            self.report.error(line, f"duplicate key {key!r} in {where} (first defined at line {first})")
        for key, entry in mapping.entries.items():
            if not _ENV_NAME.fullmatch(key):
                self.report.error(entry.key_line, f"{where}: {key!r} is not a valid variable name")
                continue
            if not isinstance(entry.value, Scalar):
                self.error(entry.value, f"{where}.{key} must be a string, number or boolean, "
                                        f"got {describe(entry.value)}")
                continue
            env[key] = _env_text(entry.value.value)
            lines[key] = entry.value.line
        return env, lines

    def _ready(self, entry: Entry | None, where: str) -> ReadyProbe | None:
        if entry is None or (node := self.mapping(entry.value, where)) is None:
            return None
        self.keys(node, READY_KEYS, f" in {where}")
        kinds = [k for k in ("tcp", "http", "exec") if k in node.entries]
        if len(kinds) != 1:
            found = ", ".join(kinds) if kinds else "none"
            self.report.error(entry.key_line, f"{where} needs exactly one of tcp, http, exec (found {found})")
            return None
        kind = kinds[0]
        value = node.get(kind)
        port_node = node.get("port")
        line = entry.key_line
        if kind != "http" and port_node is not None:
            self.report.error(node.entries["port"].key_line, f"{where}: 'port' only goes with 'http'")
        if kind == "tcp":
            port = self.port(value, f"{where}.tcp")
            return ReadyProbe("tcp", port=port, line=line) if port else None
        if kind == "exec":
            command = self.command(value, f"{where}.exec")
            return ReadyProbe("exec", command=command, line=line) if command else None
        path = self.string(value, f"{where}.http")
        if path is not None and not path.startswith("/"):
            self.error(value, f"{where}.http must be a URL path starting with '/', got {path!r}")
            path = None
        if port_node is None:
            self.report.error(line, f"{where}: an http probe needs 'port'")
            return None
        port = self.port(port_node, f"{where}.port")
        return ReadyProbe("http", port=port, path=path, line=line) if port and path else None

    def _restart(self, node: Node | None, where: str) -> str:
        if node is None:
            return "always"
        value = node.value if isinstance(node, Scalar) else None
        if value in RESTART_POLICIES:
            return value
        hint = _did_you_mean(value, RESTART_POLICIES) if isinstance(value, str) else ""
        self.error(node, f"{where} must be one of {', '.join(RESTART_POLICIES)}, got {describe(node)}{hint}")
        return "always"

    def _duration(self, node: Node | None, where: str) -> float:
        if node is None:
            return DEFAULT_STOP_GRACE_S
        seconds = _duration_value(node)
        if seconds is None:
            self.error(node, f"{where} must be a duration like 10s, 500ms, 1.5s, 2m or a number of seconds, "
                             f"got {describe(node)}")
            return DEFAULT_STOP_GRACE_S
        return seconds

    def _workdir(self, node: Node | None, where: str) -> Path:
        if node is None:
            return self.base
        text = self.string(node, where)
        if not text:
            if text == "":
                self.error(node, f"{where} must not be empty")
            return self.base
        return Path(os.path.abspath(self.base / os.path.expanduser(text)))

    def _metrics(self, entry: Entry | None, where: str) -> MetricsSpec | None:
        where = f"{where}.metrics"
        if entry is None or (node := self.mapping(entry.value, where)) is None:
            return None
        self.keys(node, METRICS_KEYS, f" in {where}")
        port = None
        if (port_node := node.get("port")) is None:
            self.report.error(entry.key_line, f"{where} needs 'port'")
        else:
            port = self.port(port_node, f"{where}.port")
        path: str | None = DEFAULT_METRICS_PATH
        if (path_node := node.get("path")) is not None:
            path = self.string(path_node, f"{where}.path")
            if path is not None and not path.startswith("/"):
                self.error(path_node, f"{where}.path must start with '/', got {path!r}")
                path = None
        return MetricsSpec(port, path, entry.key_line) if port and path else None

    # ---- publish / add_hosts

    def _publish(self, node: Node | None, pod: str) -> tuple[PublishSpec, ...]:
        if node is None:
            return ()
        if not isinstance(node, Seq):
            self.error(node, f"pods.{pod}.publish must be a list, got {describe(node)}")
            return ()
        out = []
        for item in node.items:
            if not isinstance(item, Scalar) or not isinstance(item.value, str):
                self.error(item, f"bad publish {describe(item)} in pod {pod!r}: expected a string "
                                 "HOST_PORT:POD_PORT or IP:HOST_PORT:POD_PORT")
                continue
            try:
                host_ip, host_port, pod_port = _parse_publish(item.value)
            except ValueError as exc:
                self.error(item, f"bad publish {item.value!r} in pod {pod!r}: {exc}")
                continue
            out.append(PublishSpec(host_ip, host_port, pod_port, item.line))
        return tuple(out)

    def _add_hosts(
        self, node: Node | None, pod: str, pod_names: tuple[str, ...]
    ) -> tuple[tuple[str, str], ...]:
        """Extra /etc/hosts entries, in either of podman's spellings."""
        if node is None:
            return ()
        where = f"add_hosts in pod {pod!r}"
        pairs: list[tuple[str, Node, int]] = []  # (host, value node, host line)
        if isinstance(node, Map):
            for key, line, first in node.duplicates:
                self.report.error(line, f"{where}: host {key!r} is listed twice (first at line {first})")
            pairs = [(key, entry.value, entry.key_line) for key, entry in node.entries.items()]
        elif isinstance(node, Seq):
            seen: dict[str, int] = {}
            for item in node.items:
                text = item.value if isinstance(item, Scalar) else None
                if not isinstance(text, str) or ":" not in text:
                    self.error(item, f"{where}: expected 'name:value', got {describe(item)}")
                    continue
                host, value = text.split(":", 1)
                if host in seen:
                    self.error(item, f"{where}: host {host!r} is listed twice (first at line {seen[host]})")
                    continue
                seen[host] = item.line
                pairs.append((host, Scalar(value.strip(), item.line, item.broken), item.line))
        else:
            self.error(node, f"pods.{pod}.add_hosts must be a mapping or a list of 'name:value', "
                             f"got {describe(node)}")
            return ()
        out = []
        for host, value_node, line in pairs:
            if not _is_host_name(host):
                self.report.error(line, f"{where}: {host!r} is not a valid host name")
                continue
            value = self.string(value_node, f"pods.{pod}.add_hosts.{host}")
            if value is None:
                continue
            if not (is_ip(value) or value in pod_names or value in _LOCALHOST_VALUES):
                self.error(value_node, f"{where}: {value!r} is neither an IP address nor a pod of this "
                                       f"topology{_did_you_mean(value, pod_names)}")
                continue
            out.append((host, value))
        return tuple(out)

    # ---- relations between pods

    def _check_aliases(self, pods: Iterable[PodSpec]) -> None:
        """Explicit addresses are honoured as written, so two ranges that overlap are a real clash."""
        owners: dict[str, str] = {}
        for pod in pods:
            if pod.ip is None:
                continue
            for alias in replica_aliases(pod.ip, pod.replicas):
                if alias in owners and owners[alias] != pod.name:
                    self.report.error(pod.line, f"pod {pod.name!r} alias {alias} clashes with pod "
                                                f"{owners[alias]!r}")
                    break
            for alias in replica_aliases(pod.ip, pod.replicas):
                owners.setdefault(alias, pod.name)

    def _check_dependencies(self, pods: Mapping[str, PodSpec]) -> None:
        """No cycles (nothing in one would ever start); ``completed`` only of a pod that can complete."""
        for pod in pods.values():
            for dep in pod.depends_on:
                target = pods.get(dep.pod)
                if dep.condition == "completed" and target is not None and target.service.restart == "always":
                    self.report.error(dep.line, f"pods.{pod.name}.depends_on: {dep.pod} has restart: always, so it "
                                                "never completes; give it restart: never or on-failure, or wait "
                                                "for it to be ready")
        for cycle in dependency_cycles(pods):
            first = pods[cycle[0]]
            line = next(d.line for d in first.depends_on if d.pod == cycle[1])
            self.report.error(line, f"depends_on cycle: {' -> '.join(cycle)} (none of them would ever start)")

    def _check_port_claims(self, pods: Iterable[PodSpec]) -> None:
        for pod in pods:
            first: dict[int, PortClaim] = {}
            for claim in pod.port_claims():
                earlier = first.setdefault(claim.port, claim)
                if earlier is not claim and earlier.owner != claim.owner:
                    self.report.error(claim.line, f"port {claim.port} is claimed twice in pod {pod.name!r}: "
                                                  f"{earlier.owner} (line {earlier.line}) and "
                                                  f"{claim.owner} (line {claim.line})")

    def _check_publish_clashes(self, pods: Iterable[PodSpec]) -> None:
        """One host address can be bound once; publishing it twice would fail at start."""
        seen: dict[tuple[str, int], tuple[str, int]] = {}
        for pod in pods:
            for pub in pod.publish:
                key = (pub.host_ip, pub.host_port)
                if key in seen:
                    other, line = seen[key]
                    self.report.error(pub.line, f"host port {pub.host_ip}:{pub.host_port} is published "
                                                f"twice: by pod {other!r} (line {line}) and pod {pod.name!r}")
                else:
                    seen[key] = (pod.name, pub.line)


# --------------------------------------------------------------------------- value helpers


def dependency_cycles(pods: Mapping[str, PodSpec]) -> list[list[str]]:
    """Each cycle of ``depends_on`` once, as [a, b, ..., a], starting at its first pod in file order."""
    order = {name: i for i, name in enumerate(pods)}
    cycles: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for dep in pods[name].depends_on:
            if dep.pod not in pods:
                continue
            if state.get(dep.pod) == 1:
                cycle = path[path.index(dep.pod):]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    start = min(range(len(cycle)), key=lambda i: order[cycle[i]])
                    ring = cycle[start:] + cycle[:start]
                    cycles.append([*ring, ring[0]])
            elif dep.pod not in state:
                visit(dep.pod)
        path.pop()
        state[name] = 2

    for name in pods:
        if name not in state:
            visit(name)
    return cycles


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    import difflib  # only for a typo's suggestion

    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _int_value(node: Node) -> int | None:
    """An int, or a string of digits: interpolated values (``"${PORT:-80}"``) are always strings."""
    if not isinstance(node, Scalar):
        return None
    value = node.value
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit() and value.strip().isascii():
        return int(value.strip())
    return None


def _port_value(text: str) -> int | None:
    text = text.strip()
    if text.isdigit() and text.isascii() and 1 <= int(text) <= 65535:
        return int(text)
    return None


def _env_text(value: object) -> str:
    """Env values are strings in the end; spell YAML scalars the way a shell user would expect."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _duration_value(node: Node) -> float | None:
    if not isinstance(node, Scalar) or isinstance(node.value, bool):
        return None
    value = node.value
    if isinstance(value, int | float):
        return float(value) if value >= 0 and value == value and value != float("inf") else None
    if not isinstance(value, str):
        return None
    return parse_duration(value)


def _percent_value(node: Node) -> float | None:
    """0..100 from a number or a string like ``"12.5"`` / ``"12.5%"`` (interpolated values are strings)."""
    if not isinstance(node, Scalar) or isinstance(node.value, bool):
        return None
    value = node.value
    if isinstance(value, str):
        text = value.strip().removesuffix("%").strip()
        try:
            value = float(text)
        except ValueError:
            return None
    if not isinstance(value, int | float) or value != value or not 0 <= value <= 100:
        return None
    return float(value)


def _parse_publish(text: str) -> tuple[str, int, int]:
    """``[IP:]HOST_PORT:POD_PORT[/tcp]`` -> (host ip, host port, pod port); ValueError says what is wrong."""
    spec, _, proto = text.strip().partition("/")
    if proto and proto != "tcp":
        raise ValueError(f"only tcp can be published, got {proto!r}")
    parts = spec.split(":")
    if len(parts) == 2:
        host_ip, host_port, pod_port = "127.0.0.1", parts[0], parts[1]
    elif len(parts) == 3:
        host_ip, host_port, pod_port = parts
    else:
        raise ValueError("expected HOST_PORT:POD_PORT or IP:HOST_PORT:POD_PORT")
    if not (host_port.isdigit() and pod_port.isdigit()):
        raise ValueError("expected HOST_PORT:POD_PORT or IP:HOST_PORT:POD_PORT")
    for port in (host_port, pod_port):
        if not 1 <= int(port) <= 65535:
            raise ValueError(f"port {int(port)} is out of range 1..65535")
    try:
        addr = ipaddress.IPv4Address(host_ip)
    except ValueError:
        raise ValueError(f"host IP {host_ip!r} is not an IPv4 address") from None
    if addr not in LOOPBACK:
        raise ValueError(f"host IP {host_ip} is not in 127.0.0.0/8 (meshctl publishes on loopback only)")
    return str(addr), int(host_port), int(pod_port)



def _is_host_name(host: str) -> bool:
    return 0 < len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in host.split("."))


def _default_mesh_name(path: Path) -> str:
    """The file stem, made into a valid mesh name, so ``Seed Direct.yaml`` still works without ``name:``."""
    name = re.sub(r"[^a-z0-9_.-]+", "-", path.stem.lower()).lstrip("_.-")[:63]
    return name or "mesh"
