"""From a pod's ``sidecar:`` section to how its sidecar process is launched.

The sidecar compiles its own configuration (it must stand alone, like Envoy),
but meshctl compiles it too, before starting anything: mistakes are reported
as ``FILE:LINE`` at ``validate``/``up`` time, and the supervisor learns the
admin port (readiness) and the egress port (HTTP_PROXY for the service).
"""

from __future__ import annotations

import json
from pathlib import Path

from pods.replica import SidecarLaunch
from pods.topology import PodSpec, Topology
from sidecar.config import Bootstrap, ConfigError
from sidecar.envoy_config import load_envoy
from sidecar.short_config import compile_short

#: Compile-time stand-in for a replica's alias; ports and names do not depend on it.
_PROBE_IP = "127.0.0.2"
_META_KEYS = ("envoy", "public_admin")


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


def check_sidecars(topo: Topology) -> tuple[list[str], list[str]]:
    """(errors, warnings) as ``FILE:LINE: ...`` lines."""
    errors: list[str] = []
    warnings: list[str] = []
    for pod in topo.pods.values():
        if pod.sidecar is None:
            continue
        where = f"{topo.path}:{pod.sidecar_line}: pod '{pod.name}' sidecar"
        try:
            boot, _ = _compile(pod, topo)
        except ConfigError as exc:
            errors.append(f"{where}: {exc}")
            continue
        warnings.extend(f"{where}: warning: {w.replace(' ' + _PROBE_IP, '')}" for w in boot.warnings)
        claims = {c.port: c for c in pod.port_claims()}
        ports = [(lst.port, f"listener {lst.name}") for lst in boot.listeners]
        if boot.admin is not None:
            ports.append((boot.admin.port, "admin"))
        for port, what in ports:
            if port in claims:
                errors.append(f"{where}: {what} port {port} clashes with {claims[port].owner} "
                              f"(line {claims[port].line})")
    return errors, warnings


def sidecar_launches(topo: Topology, config_dir: Path | None = None) -> dict[str, SidecarLaunch]:
    """How to start each pod's sidecar; short-form sections are written to ``config_dir``.

    Without ``config_dir`` nothing is written: readers (validate, traffic, stats) only need the ports.
    """
    out: dict[str, SidecarLaunch] = {}
    for pod in topo.pods.values():
        if pod.sidecar is None:
            continue
        boot, envoy_path = _compile(pod, topo)
        public = bool(pod.sidecar.get("public_admin", False))
        if envoy_path is not None:
            args: tuple[str, ...] = ("--envoy", envoy_path)
        elif config_dir is None:
            args = ("--config", f"{pod.name}.json")
        else:
            config_dir.mkdir(parents=True, exist_ok=True)
            path = config_dir / f"{pod.name}.json"
            short = {k: v for k, v in pod.sidecar.items() if k not in _META_KEYS}
            path.write_text(json.dumps(short, indent=1))
            args = ("--config", str(path))
        if public:
            args += ("--public-admin",)
        egress = boot.egress_listener
        edges = dict.fromkeys(r.cluster for lst in boot.listeners if lst.is_egress
                              for vh in lst.hcm.route_config.virtual_hosts for r in vh.routes if r.cluster)
        out[pod.name] = SidecarLaunch(
            args=args,
            admin_port=boot.admin.port if boot.admin else None,
            listener_ports=tuple(lst.port for lst in boot.listeners),
            egress_port=egress.port if egress else None,
            ingress_stat_prefixes=tuple(lst.hcm.stat_prefix for lst in boot.listeners if not lst.is_egress),
            egress_clusters=tuple(c for c in edges if c),
        )
    return out
