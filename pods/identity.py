"""The mesh identity plan: which replica gets which SPIFFE identity, where its files live, which of its
sidecar's clusters reach meshed peers (and so originate mTLS, accepting only those peers' ids).

Pure, like the rest of the plan: it reads the compiled sidecar models and the replicas' names, and
writes nothing. The supervisor issues the certificates into the paths laid out here
(``meshctl.identity.issuer``); each sidecar reads its identity file (``--mesh-identity``).

Layout under the mesh's state dir::

    identity/ca.pem, ca-key.pem          the mesh CA meshctl created (the key 0600, the dir 0700)
    identity/<replica>/identity.json     what the sidecar reads (sidecar.mesh_identity)
    identity/<replica>/current -> gen-N  swapped atomically on rotation
    identity/<replica>/gen-N/cert.pem, key.pem

A replica needs an identity when its pod's effective ``mtls`` is not off, when one of its clusters
reaches a meshed peer (a pod with ``mtls: off`` may still call a strict one), or when its sidecar
terminates TLS with ``tls: mesh``. A mesh where none does gets no CA at all.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pods.addressing import is_ip
from pods.replica import Replica, ReplicaLayout, SidecarLaunch
from pods.sidecars import PROBE_IP
from pods.source import Problem

if TYPE_CHECKING:  # the sidecar's model: imported only when a mesh has identities (see pods/sidecars.py)
    from sidecar.config import Bootstrap
    from sidecar.mesh_identity import MeshIdentity

IDENTITY_DIR = "identity"
IDENTITY_FILE = "identity.json"
CURRENT = "current"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
CA_FILE = "ca.pem"  # the mesh's own CA certificate (meshctl.identity.ca.ensure_ca writes it)


def spiffe_id(mesh: str, pod: str) -> str:
    """The identity of every replica of ``pod``: ``spiffe://<mesh>/pod/<pod>`` (trust domain = mesh name)."""
    return f"spiffe://{mesh}/pod/{pod}"


@dataclass(frozen=True)
class ReplicaIdentity:
    replica: str
    pod: str
    #: What the sidecar gets: the file paths are the ``current`` ones, so a rotation is a symlink swap.
    identity: MeshIdentity
    dir: Path
    #: The SANs besides the SPIFFE id: what ``curl --cacert`` to a ``tls: mesh`` listener checks.
    dns: tuple[str, ...]
    ips: tuple[str, ...]

    @property
    def file(self) -> Path:
        return self.dir / IDENTITY_FILE


@dataclass(frozen=True)
class IdentityPlan:
    trust_domain: str
    dir: Path
    #: The CA certificate every sidecar trusts: ``<state>/identity/ca.pem``, or the user's own.
    ca_cert: Path
    #: The user's CA (cert, key), used where it is; None: meshctl's own in ``dir``.
    supplied_ca: tuple[Path, Path] | None
    cert_ttl_s: float
    replicas: dict[str, ReplicaIdentity]

    def find(self, name: str) -> list[ReplicaIdentity]:
        """The identities of a pod's replicas or of one replica."""
        return [r for r in self.replicas.values() if name in (r.pod, r.replica)]


def uses_mesh_tls(section: Any) -> bool:
    """Whether a sidecar section asks for a certificate from the mesh CA anywhere (``tls: mesh``)."""
    if isinstance(section, Mapping):
        return any((k == "tls" and v == "mesh") or uses_mesh_tls(v) for k, v in section.items())
    if isinstance(section, list):
        return any(uses_mesh_tls(v) for v in section)
    return False


def needs_identities(layout: ReplicaLayout) -> bool:
    """Cheap first check, so a mesh without mTLS pays nothing (no compile, no CA)."""
    topo = layout.topology
    return any(topo.pod_mtls(name) != "off" or uses_mesh_tls(topo.pods[name].sidecar)
               for name in layout.sidecars)


def plan_identities(layout: ReplicaLayout, state_root: Path, boots: Mapping[str, Bootstrap],
                    problems: list[Problem]) -> IdentityPlan | None:
    """Every replica's identity, or None when nothing in the mesh uses mTLS or the mesh CA.

    ``boots``: each sidecar pod's compiled model (compiled for ``probe_ip``, see ``plan_mesh``), so the
    clusters are read as the sidecar will run them. Problems (a cluster mixing meshed and plaintext
    endpoints) are appended as ``FILE:LINE``.
    """
    if not needs_identities(layout):
        return None
    from sidecar.mesh_identity import MeshIdentity

    topo = layout.topology
    root = state_root / IDENTITY_DIR
    supplied = topo.identity.ca
    ca_cert = supplied[0] if supplied else root / CA_FILE
    owners = {r.ip: r for r in layout.all_replicas()}
    meshed_ports = {name: _meshed_ports(boot) for name, boot in boots.items() if topo.pod_mtls(name) != "off"}
    out: dict[str, ReplicaIdentity] = {}
    for pod in layout.sidecars:
        boot = boots.get(pod)
        if boot is None:
            continue
        spec = topo.pods[pod]
        mode = topo.pod_mtls(pod)
        for replica in layout.replicas.get(pod, []):
            clusters, mixed = _peer_clusters(layout, replica, boot, owners, meshed_ports, topo.name)
            for cluster, meshed, plain in mixed:
                message = (f"pod '{pod}' sidecar: cluster '{cluster}' mixes meshed endpoints ({', '.join(meshed)}) "
                           f"with plaintext ones ({', '.join(plain)}); one cluster cannot both originate mTLS "
                           "and not: split the route, or give those pods the same mtls mode")
                problem = Problem(str(topo.path), spec.sidecar_line, message)
                if problem not in problems:
                    problems.append(problem)
            if mode == "off" and not clusters and not uses_mesh_tls(spec.sidecar):
                continue
            rdir = root / replica.name
            current = rdir / CURRENT
            ident = MeshIdentity(spiffe_id=spiffe_id(topo.name, pod), trust_domain=topo.name,
                                 cert=str(current / CERT_FILE), key=str(current / KEY_FILE), ca=str(ca_cert),
                                 ingress=mode, clusters=clusters)
            out[replica.name] = ReplicaIdentity(
                replica=replica.name, pod=pod, identity=ident, dir=rdir,
                dns=tuple(dict.fromkeys(("localhost", pod, replica.name))),
                ips=tuple(dict.fromkeys((replica.ip, "127.0.0.1"))))
    if not out:
        return None
    return IdentityPlan(trust_domain=topo.name, dir=root, ca_cert=ca_cert, supplied_ca=supplied,
                        cert_ttl_s=topo.identity.cert_ttl_s, replicas=out)


def identity_files(plan: IdentityPlan) -> dict[Path, str]:
    """The identity file of every replica (JSON, no secrets: paths and ids), written before anything starts."""
    from sidecar.mesh_identity import dump_identity

    return {r.file: dump_identity(r.identity) for r in plan.replicas.values()}


# --------------------------------------------------------------------------- clusters to peers


def _meshed_ports(boot: Bootstrap) -> frozenset[int]:
    """A pod's sidecar ports that take mesh traffic: its ingress listeners, unless one terminates TLS of its
    own (``tls: {cert, key}`` for outside clients: no peer certificate to verify there)."""
    return frozenset(lst.port for lst in boot.listeners if not lst.is_egress and lst.tls is None)


def _names(layout: ReplicaLayout, replica: Replica) -> dict[str, list[str]]:
    """What the replica's hosts file says each name is (the sidecar resolves through that very file)."""
    out: dict[str, list[str]] = {}
    for entry in layout.hosts_entries(replica):
        for name in entry.names:
            out.setdefault(name, []).append(entry.ip)
    return out


def _endpoints(boot: Bootstrap, cluster: str) -> Iterator[tuple[str, int]]:
    found = boot.cluster(cluster)
    for ep in found.endpoints if found is not None else ():
        yield ep.host, ep.port


def _peer_clusters(layout: ReplicaLayout, replica: Replica, boot: Bootstrap, owners: Mapping[str, Replica],
                   meshed_ports: Mapping[str, frozenset[int]], mesh: str
                   ) -> tuple[dict[str, tuple[str, ...]], list[tuple[str, list[str], list[str]]]]:
    """({cluster: peer ids} for clusters whose endpoints are meshed sidecars, [(cluster, meshed, plain)] for
    clusters mixing both)."""
    names = _names(layout, replica)
    clusters: dict[str, tuple[str, ...]] = {}
    mixed = []
    for cluster in boot.clusters:
        peers: list[str] = []
        plain: list[str] = []
        for host, port in _endpoints(boot, cluster.name):
            host = replica.ip if host == PROBE_IP else host
            ips = [host] if is_ip(host) else names.get(host, [])
            for ip in ips or [host]:
                owner = owners.get(ip)
                if owner is not None and owner.pod != replica.pod and port in meshed_ports.get(owner.pod, ()):
                    peers.append(owner.pod)
                else:
                    plain.append(f"{host}:{port}")
        if peers and plain:
            mixed.append((cluster.name, sorted(set(peers)), sorted(set(plain))))
        elif peers:
            clusters[cluster.name] = tuple(spiffe_id(mesh, p) for p in dict.fromkeys(sorted(peers)))
    return clusters, mixed


def sidecar_args(launch: SidecarLaunch, ident: ReplicaIdentity | None) -> tuple[str, ...]:
    """The sidecar's extra arguments for its identity (ours reads the file; the real Envoy has it baked into
    its exported bootstrap)."""
    if ident is None or launch.engine != "meshctl":
        return ()
    return ("--mesh-identity", str(ident.file))
