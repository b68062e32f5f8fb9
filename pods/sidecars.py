"""From a pod's ``sidecar:`` section to how its sidecar process is launched.

The sidecar compiles its own configuration (it must stand alone, like Envoy),
but the plan compiles it too, before anything starts: mistakes are reported as
``FILE:LINE`` at ``validate``/``up`` time, and the plan learns the admin port
(readiness), the listeners (port claims, the pod's ingress) and the egress port
(HTTP_PROXY for the service).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pods.replica import SidecarLaunch
from pods.source import Problem
from pods.topology import PodSpec, Topology
from sidecar.config import Bootstrap, ConfigError
from sidecar.envoy_config import load_envoy
from sidecar.short_config import compile_short

#: Compile-time stand-in for a replica's alias; ports and names do not depend on it.
_PROBE_IP = "127.0.0.2"
_META_KEYS = ("envoy", "public_admin")


@dataclass
class CompiledSidecars:
    launches: dict[str, SidecarLaunch] = field(default_factory=dict)
    #: Short-form configurations, written by the supervisor before the sidecars start.
    files: dict[Path, str] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def _compile(pod: PodSpec, topo: Topology) -> tuple[Bootstrap, str | None]:
    section = dict(pod.sidecar or {})
    public = bool(section.get("public_admin", False))
    if "envoy" in section:
        extra = sorted(set(section) - set(_META_KEYS))
        if extra:
            raise ConfigError(f"'envoy' cannot be combined with short-form keys: {', '.join(extra)}")
        path = (topo.path.parent / str(section["envoy"])).resolve()
        if not path.is_file():
            raise ConfigError(f"envoy config {section['envoy']!r} not found (looked at {path})")
        return load_envoy(path, _PROBE_IP, public_admin=public), str(path)
    short = {k: v for k, v in section.items() if k not in _META_KEYS}
    return compile_short(short, _PROBE_IP, public_admin=public, source="sidecar"), None


def compile_sidecars(topo: Topology, config_dir: Path) -> CompiledSidecars:
    """Every pod's sidecar, compiled once: launches, files to write and ``FILE:LINE`` problems."""
    out = CompiledSidecars()
    for pod in topo.pods.values():
        if pod.sidecar is None:
            continue
        path, line = str(topo.path), pod.sidecar_line
        where = f"pod '{pod.name}' sidecar"
        try:
            boot, envoy_path = _compile(pod, topo)
        except ConfigError as exc:
            out.problems.append(Problem(path, line, f"{where}: {exc}"))
            continue
        out.problems.extend(Problem(path, line, f"{where}: {w.replace(' ' + _PROBE_IP, '')}", "warning")
                            for w in boot.warnings)
        claims = {c.port: c for c in pod.port_claims()}
        ports = [(lst.port, f"listener {lst.name}") for lst in boot.listeners]
        if boot.admin is not None:
            ports.append((boot.admin.port, "admin"))
        clash = False
        for port, what in ports:
            if port in claims:
                clash = True
                out.problems.append(Problem(path, line, f"{where}: {what} port {port} clashes with "
                                                        f"{claims[port].owner} (line {claims[port].line})"))
        if clash:
            continue
        if envoy_path is not None:
            args: tuple[str, ...] = ("--envoy", envoy_path)
        else:
            config = config_dir / f"{pod.name}.json"
            out.files[config] = json.dumps({k: v for k, v in pod.sidecar.items() if k not in _META_KEYS}, indent=1)
            args = ("--config", str(config))
        if pod.sidecar.get("public_admin", False):
            args += ("--public-admin",)
        egress = boot.egress_listener
        edges = dict.fromkeys(r.cluster for lst in boot.listeners if lst.is_egress
                              for vh in lst.hcm.route_config.virtual_hosts for r in vh.routes if r.cluster)
        out.launches[pod.name] = SidecarLaunch(
            args=args,
            admin_port=boot.admin.port if boot.admin else None,
            listener_ports=tuple(lst.port for lst in boot.listeners),
            egress_port=egress.port if egress else None,
            ingress_stat_prefixes=tuple(lst.hcm.stat_prefix for lst in boot.listeners if not lst.is_egress),
            egress_clusters=tuple(c for c in edges if c),
        )
    return out
