"""The identity plan: who gets which SPIFFE id, where its files are, which clusters originate mTLS to whom."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from pods.identity import spiffe_id
from pods.plan import HostFacts, plan_mesh
from pods.topology import TopologyError, parse_topology
from sidecar.envoy_export import HCM_TYPE as HCM
from sidecar.mesh_identity import load_identity

MESH = """
name: zt
{mesh_keys}
pods:
  b:
    replicas: 2
{b_extra}
    sidecar:
      ingress: {{port: 8000, to: 8001}}
      admin: {{port: 9901}}
    service:
      command: [python, -m, services.b]
      env: {{SERVICE_PORT: "8001"}}
  a:
{a_extra}
    add_hosts: {{b.local: b}}
    sidecar:
      ingress: {{port: 8000, to: 8001}}
      egress:
        port: 9001
        routes:
          - {{host: b.local, to: "b.local:8000"}}
          - {{host: b-direct, to: "b:8001"}}
          - {{host: plain, to: "d:80"}}
    service:
      command: [python, -m, services.a]
      env: {{SERVICE_PORT: "8001"}}
  d:
{d_extra}
    service:
      command: [python, -m, services.b]
"""


def topo_text(mesh_keys: str = "", a: str = "", b: str = "", d: str = "") -> str:
    return MESH.format(mesh_keys=mesh_keys, a_extra=a, b_extra=b, d_extra=d)


def plan(tmp_path: Path, text: str, **kw):
    topo = parse_topology(textwrap.dedent(text), tmp_path / "t.yaml")
    return plan_mesh(topo, tmp_path / "state", HostFacts(environ={"PATH": "/usr/bin:/bin"}), run_id="r1", **kw)


def sidecar_argv(p, replica: str) -> tuple[str, ...]:
    return next(x.argv for x in p.processes if x.key == f"{replica}/sidecar")


def problems(tmp_path: Path, text: str) -> list[str]:
    try:
        return [str(x) for x in plan(tmp_path, text).problems]
    except TopologyError as err:
        return [str(x) for x in err.problems]


def test_a_mesh_without_mtls_is_planned_as_before(tmp_path):
    p = plan(tmp_path, topo_text())
    assert p.identity is None  # no CA will be created
    assert not any("--mesh-identity" in sidecar_argv(p, r) for r in ("a-0", "b-0", "b-1"))
    assert not any("identity" in path.parts for path in p.files)
    assert {pod["pod"]: pod["mtls"] for pod in p.describe()} == {"a": "off", "b": "off", "d": "off"}


def test_strict_mesh_gives_every_sidecar_replica_its_pod_identity(tmp_path):
    p = plan(tmp_path, topo_text("mtls: strict"))
    ident = p.identity
    assert ident is not None and ident.trust_domain == "zt" and ident.cert_ttl_s == 24 * 3600
    assert set(ident.replicas) == {"a-0", "b-0", "b-1"}  # d has no sidecar
    root = tmp_path / "state" / "identity"
    assert ident.ca_cert == root / "ca.pem" and ident.dir == root
    b1 = ident.replicas["b-1"]
    assert b1.identity.spiffe_id == spiffe_id("zt", "b") == "spiffe://zt/pod/b"
    assert b1.identity.cert == str(root / "b-1" / "current" / "cert.pem")
    assert b1.identity.key == str(root / "b-1" / "current" / "key.pem")
    assert b1.identity.ingress == "strict" and b1.identity.clusters == {}
    b1_ip = p.pods["b"].replicas[1].ip
    assert b1.ips == (b1_ip, "127.0.0.1") and b1.dns == ("localhost", "b", "b-1")
    # The sidecar reads its identity file; the file is planned (written by the supervisor before start).
    argv = sidecar_argv(p, "b-1")
    assert argv[argv.index("--mesh-identity") + 1] == str(b1.file)
    written = tmp_path / "written.json"
    written.write_text(p.files[b1.file])
    assert load_identity(str(written)) == b1.identity


def test_clusters_to_meshed_sidecars_carry_the_peer_ids(tmp_path):
    p = plan(tmp_path, topo_text("mtls: strict"))
    a = p.identity.replicas["a-0"].identity
    # b.local -> b (add_hosts names the pod) on b's sidecar ingress: mTLS, b's id only.
    # b:8001 is b's service port behind the sidecar, d has no sidecar: both stay plaintext.
    assert a.clusters == {"b.local": ("spiffe://zt/pod/b",)}
    assert "local_service" not in a.clusters  # the pod's own service


def test_pod_overrides_and_a_caller_with_mtls_off(tmp_path):
    p = plan(tmp_path, topo_text("mtls: strict", a="    mtls: off", b="    mtls: permissive"))
    ident = p.identity
    assert ident.replicas["b-0"].identity.ingress == "permissive"
    # a takes plaintext itself, but still originates mTLS to b: it needs a certificate all the same.
    a = ident.replicas["a-0"].identity
    assert a.ingress == "off" and a.clusters == {"b.local": ("spiffe://zt/pod/b",)}
    assert {pod["pod"]: pod["mtls"] for pod in p.describe()} == {"a": "off", "b": "permissive", "d": "off"}


def test_a_peer_with_mtls_off_is_reached_in_plaintext(tmp_path):
    p = plan(tmp_path, topo_text("mtls: strict", b="    mtls: off"))
    assert "b-0" not in p.identity.replicas
    assert p.identity.replicas["a-0"].identity.clusters == {}


def test_a_cluster_over_several_pods_gets_every_id_and_mixing_is_a_problem(tmp_path):
    envoy = tmp_path / "a.envoy.yaml"
    envoy.write_text(textwrap.dedent("""
        static_resources:
          listeners:
          - name: egress
            address: {socket_address: {address: 127.0.0.1, port_value: 9001}}
            filter_chains:
            - filters:
              - name: envoy.filters.network.http_connection_manager
                typed_config:
                  "@type": {hcm}
                  stat_prefix: egress
                  route_config:
                    virtual_hosts:
                    - {name: all, domains: ["*"], routes: [{match: {prefix: /x}, route: {cluster: both}},
                                                         {match: {prefix: /}, route: {cluster: mixed}}]}
                  http_filters: [{name: envoy.filters.http.router}]
          clusters:
          - name: both
            type: STRICT_DNS
            load_assignment:
              cluster_name: both
              endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: b, port_value: 8000}}}},
                                          {endpoint: {address: {socket_address: {address: c, port_value: 8000}}}}]}]
          - name: mixed
            type: STRICT_DNS
            load_assignment:
              cluster_name: mixed
              endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: b, port_value: 8000}}}},
                                          {endpoint: {address: {socket_address: {address: d, port_value: 80}}}}]}]
        admin: {address: {socket_address: {address: 0.0.0.0, port_value: 9901}}}
    """).replace("{hcm}", HCM))
    text = """
        name: zt
        mtls: strict
        pods:
          a:
            sidecar: {envoy: a.envoy.yaml}
            service: {command: [python, -m, services.a]}
          b:
            sidecar: {ingress: {port: 8000, to: 8001}}
            service: {command: [python, -m, services.b], env: {SERVICE_PORT: "8001"}}
          c:
            sidecar: {ingress: {port: 8000, to: 8001}}
            service: {command: [python, -m, services.b], env: {SERVICE_PORT: "8001"}}
          d:
            service: {command: [python, -m, services.b]}
    """
    p = plan(tmp_path, text)
    assert p.identity.replicas["a-0"].identity.clusters == {"both": ("spiffe://zt/pod/b", "spiffe://zt/pod/c")}
    mixed = [str(x) for x in p.errors]
    assert mixed == [f"{tmp_path / 't.yaml'}:6: pod 'a' sidecar: cluster 'mixed' mixes meshed endpoints (b) with "
                     "plaintext ones (d:80); one cluster cannot both originate mTLS and not: split the route, or "
                     "give those pods the same mtls mode"], mixed


def test_tls_mesh_alone_asks_for_a_certificate(tmp_path):
    from pods.identity import uses_mesh_tls

    assert uses_mesh_tls({"ingress": {"port": 8443, "to": 8001, "tls": "mesh"}})
    assert not uses_mesh_tls({"ingress": {"port": 8443, "to": 8001, "tls": {"cert": "c.pem", "key": "k.pem"}}})


def test_cert_ttl_and_a_user_ca(tmp_path):
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "ca.key").write_text("x")
    p = plan(tmp_path, topo_text("mtls: permissive\nidentity: {cert_ttl: 90m, ca: {cert: ca.pem, key: ca.key}}"))
    assert p.identity.cert_ttl_s == 5400
    assert p.identity.supplied_ca == (tmp_path / "ca.pem", tmp_path / "ca.key")
    # The user's CA is used where it is: sidecars trust its certificate there, nothing is copied.
    assert p.identity.ca_cert == tmp_path / "ca.pem"
    assert json.loads(p.files[p.identity.replicas["b-0"].file])["ca"] == str(tmp_path / "ca.pem")


@pytest.mark.parametrize(("mesh_keys", "a", "d", "expected"), [
    ("mtls: mutual", "", "", ":3: mtls must be one of strict, permissive, off, got string 'mutual'"),
    ("", "    mtls: strictly", "", ":15: pods.a.mtls must be one of strict, permissive, off, got string 'strictly' "
                                   "(did you mean 'strict'?)"),
    ("", "", "    mtls: strict", ":29: pod 'd' has mtls: strict but no sidecar (mTLS is the sidecar's: add "
                                  "'sidecar:' or set mtls: off)"),
    ("identity: {cert_ttl: 30s}", "", "", ":3: identity.cert_ttl must be at least 1m (certificates rotate at 2/3 "
                                           "of their lifetime), got string '30s'"),
    ("identity: {cert_ttl: soon}", "", "", ":3: identity.cert_ttl must be a duration like 24h, 90m or a number "
                                            "of seconds, got string 'soon'"),
    ("identity: {ca: {cert: nope.pem}}", "", "", ":3: identity.ca needs 'key' (a PEM file)"),
    ("identity: {lifetime: 1h}", "", "", ":3: unknown key 'lifetime' in identity"),
])
def test_bad_zero_trust_keys_are_file_line_problems(tmp_path, mesh_keys, a, d, expected):
    found = problems(tmp_path, topo_text(mesh_keys, a=a, d=d))
    assert any(f.startswith(str(tmp_path / "t.yaml")) and f.endswith(expected) for f in found), found


def test_missing_ca_file_is_named(tmp_path):
    found = problems(tmp_path, topo_text("identity: {ca: {cert: nope.pem, key: nope.key}}"))
    assert any(f"identity.ca.cert: no such file '{tmp_path / 'nope.pem'}'" in f for f in found), found


def test_mesh_wide_mode_warns_once_about_pods_without_a_sidecar(tmp_path):
    p = plan(tmp_path, topo_text("mtls: strict"))
    warnings = [str(w) for w in p.warnings if "mtls" in w.message]
    assert warnings == [f"{tmp_path / 't.yaml'}:3: warning: mtls: strict does not apply to pods without a "
                        "sidecar (d): they talk and are reached in plaintext"]


def test_policy_peers_must_be_pods(tmp_path):
    text = """
        name: zt
        pods:
          b:
            sidecar:
              ingress:
                port: 8000
                to: 8001
                allow: [{from: [a, "spiffe://other/pod/x"], methods: [GET]}, {from: [ghost]}]
                deny: [{from: [c]}]
            service: {command: [python, -m, services.b]}
          a:
            service: {command: [python, -m, services.a]}
    """
    found = problems(tmp_path, text)
    path = tmp_path / "t.yaml"
    assert f"{path}:9: pods.b.sidecar.ingress.allow[1].from: 'ghost' is not a pod of this topology" in found, found
    assert f"{path}:10: pods.b.sidecar.ingress.deny[0].from: 'c' is not a pod of this topology" in found, found
    assert not any("'a' is not a pod" in f or "spiffe://other" in f for f in found), found


def test_real_envoy_gets_the_identity_through_sds_files_watching_the_replica_dir(tmp_path):
    topo = parse_topology(textwrap.dedent(topo_text("mtls: strict")), tmp_path / "t.yaml")
    p = plan_mesh(topo, tmp_path / "state", HostFacts(environ={"PATH": "/usr/bin:/bin"}, envoy_bin="/bin/true"),
                  run_id="r", sidecar_engine="envoy")
    assert not p.errors, p.errors
    assert "--mesh-identity" not in sidecar_argv(p, "b-0")  # the real Envoy has it in its bootstrap
    sds = {path: json.loads(text) for path, text in p.files.items() if path.parent.name == "b-0.sds"}
    assert len(sds) == 1 and next(iter(sds)).parent in p.dirs
    secret = next(iter(sds.values()))["resources"][0]["tls_certificate"]
    ident = p.identity.replicas["b-0"]
    assert secret["certificate_chain"]["filename"] == ident.identity.cert
    # The rotation renames `current` inside the replica's directory: that is where Envoy must watch, though
    # nothing exists on disk yet when the plan is made.
    assert secret["watched_directory"]["path"] == str(ident.dir)
    boot = p.files[tmp_path / "state" / "sidecar" / "b-0.envoy.yaml"]
    assert "DownstreamTlsContext" in boot and str(next(iter(sds))) in boot


def test_short_form_files_are_relative_to_the_topology(tmp_path):
    (tmp_path / "jwks.json").write_text('{"keys": []}')
    from pods.sidecars import _source

    topo = parse_topology(textwrap.dedent("""
        name: zt
        pods:
          web:
            sidecar: {ingress: {port: 8443, to: 8001, tls: {cert: c.pem, key: k.pem},
                                jwt: {issuer: me, jwks: jwks.json}}}
            service: {command: [python, -m, services.b]}
    """), tmp_path / "t.yaml")
    short = json.loads(_source(topo.pods["web"], topo)[1])["ingress"]
    assert short["jwt"]["jwks"] == str(tmp_path / "jwks.json")
    assert short["tls"] == {"cert": str(tmp_path / "c.pem"), "key": str(tmp_path / "k.pem")}
