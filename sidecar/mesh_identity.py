"""A replica's mesh identity, as meshctl hands it to the sidecar (``--mesh-identity FILE``), and what it adds.

The file is JSON written by the supervisor beside the replica's certificate::

    {"spiffe_id": "spiffe://seed/pod/a", "trust_domain": "seed",
     "cert": ".../cert.pem", "key": ".../key.pem", "ca": ".../ca.pem",
     "ingress": "strict" | "permissive" | "off",
     "clusters": {"b": ["spiffe://seed/pod/b"]}}

``apply_identity`` turns it into Envoy's own vocabulary on the compiled model, the way Istio's control
plane writes transport sockets into each proxy's configuration: every ingress listener without a TLS
context of its own gets a DownstreamTlsContext that requires a client certificate from the mesh CA
(``permissive`` also keeps a plaintext filter chain), and every cluster whose endpoints are meshed
sidecars originates TLS with the replica's certificate and accepts only those peers' SPIFFE ids. The
same transformed model drives our data path and the real Envoy's exported bootstrap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

from sidecar.config import Bootstrap, CommonTls, ConfigError, DownstreamTls, SanMatcher, UpstreamTls

MODES = ("strict", "permissive", "off")


@dataclass(frozen=True)
class MeshIdentity:
    spiffe_id: str
    trust_domain: str
    cert: str
    key: str
    ca: str
    ingress: str = "strict"
    clusters: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def common(self, match_sans: tuple[SanMatcher, ...] = ()) -> CommonTls:
        return CommonTls(cert_chain=self.cert, private_key=self.key, trusted_ca=self.ca, match_sans=match_sans)


def load_identity(path: str) -> MeshIdentity:
    """Read ``--mesh-identity`` (raises ConfigError naming the file and the field)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the mesh identity: {exc}") from None
    try:
        ident = MeshIdentity(spiffe_id=str(data["spiffe_id"]), trust_domain=str(data["trust_domain"]),
                             cert=str(data["cert"]), key=str(data["key"]), ca=str(data["ca"]),
                             ingress=str(data.get("ingress", "strict")),
                             clusters={str(k): tuple(str(i) for i in v)
                                       for k, v in (data.get("clusters") or {}).items()})
    except (KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: not a mesh identity file (missing or malformed {exc})") from None
    if ident.ingress not in MODES:
        raise ConfigError(f"{path}: ingress must be one of {', '.join(MODES)}, got {ident.ingress!r}")
    return ident


def dump_identity(ident: MeshIdentity) -> str:
    return json.dumps({"spiffe_id": ident.spiffe_id, "trust_domain": ident.trust_domain, "cert": ident.cert,
                       "key": ident.key, "ca": ident.ca, "ingress": ident.ingress,
                       "clusters": {k: list(v) for k, v in ident.clusters.items()}}, indent=1)


def apply_identity(boot: Bootstrap, ident: MeshIdentity) -> Bootstrap:
    """The model with the mesh's transport sockets added (what the user configured for TLS is kept)."""
    # ``tls: mesh`` (short form): a TLS-terminating listener without files of its own serves the mesh certificate.
    listeners = tuple(replace(lst, tls=replace(lst.tls, common=replace(lst.tls.common, cert_chain=ident.cert,
                                                                      private_key=ident.key)))
                      if lst.tls is not None and lst.tls.common.cert_chain is None else lst
                      for lst in boot.listeners)
    if ident.ingress != "off":
        # Any workload of this mesh may connect; which ones may do what is the RBAC filter's business.
        downstream = DownstreamTls(ident.common((SanMatcher(prefix=f"spiffe://{ident.trust_domain}/"),)),
                                   require_client_certificate=True)
        listeners = tuple(lst if lst.is_egress or lst.tls is not None
                          else replace(lst, tls=downstream, plaintext_allowed=ident.ingress == "permissive")
                          for lst in listeners)
    clusters = tuple(
        replace(c, tls=UpstreamTls(ident.common(tuple(SanMatcher(exact=i) for i in ident.clusters[c.name]))))
        if c.name in ident.clusters and c.tls is None else c
        for c in boot.clusters)
    return replace(boot, listeners=listeners, clusters=clusters)
