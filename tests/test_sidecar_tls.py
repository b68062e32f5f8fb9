"""TLS in our sidecar's data path, with real processes and sockets: strict and permissive listeners, refused
peers (plaintext, no certificate, another CA, expired, a SAN outside the mesh) counted with Envoy's stat names,
the verified peer identity in the access log, upstream TLS with a SAN mismatch (503 UF), certificate rotation
under load, and TLS termination on a short-form ingress (curl --cacert, ALPN http/1.1).

Addresses: 127.0.232.x (server sidecar S and its upstream), 127.0.233.x (client sidecar C, the termination pod).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from meshctl.identity.ca import MeshCA
from pods.identity import spiffe_id
from sidecar.config import ConfigError
from sidecar.envoy_config import compile_envoy
from sidecar.no_tls import needs_tls
from tests.conftest import free_port, wait_until
from tests.test_sidecar_proxy import SidecarProc, request
from tests.upstreams import UpstreamServer

S = "127.0.232.1"  # the server sidecar's pod
UP = "127.0.232.2"  # its service
C = "127.0.233.1"  # the client sidecar's pod (egress clusters originating TLS to S)
T = "127.0.233.2"  # a short-form pod terminating TLS
MESH = "seed"
LOG_FORMAT = ("%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% peer=%DOWNSTREAM_PEER_URI_SAN% "
              "local=%DOWNSTREAM_LOCAL_URI_SAN% ver=%DOWNSTREAM_TLS_VERSION% subject=%DOWNSTREAM_PEER_SUBJECT% "
              "up_peer=%UPSTREAM_PEER_URI_SAN% utfr=%UPSTREAM_TRANSPORT_FAILURE_REASON% "
              "dtfr=%DOWNSTREAM_TRANSPORT_FAILURE_REASON%\n")



# --- certificates -----------------------------------------------------------------------------------------------


class Certs:
    """The mesh CA, workload certificates, and a replica directory rotated by swapping a symlink (as meshctl)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = MeshCA.create(MESH)
        self.ca_pem = self._write("ca.pem", self.ca.cert_pem)
        other = MeshCA.create("evil")
        self.pairs: dict[str, tuple[str, str]] = {}
        self.serials: dict[str, int] = {}
        self._pair("b", self.ca.issue(spiffe_id(MESH, "b")))
        self._pair("evil", other.issue(spiffe_id(MESH, "b")))  # the right name from another CA
        self._pair("foreign", self.ca.issue("spiffe://other/pod/x"))  # the right CA, a SAN outside the mesh
        self._pair("expired", self.ca.issue(spiffe_id(MESH, "b"), lifetime=dt.timedelta(seconds=-30)))
        self._pair("a-client", self.ca.issue(spiffe_id(MESH, "a")))
        self.replica = root / "s-0"  # <replica>/current -> gen-N/{cert,key}.pem
        self.replica.mkdir()
        self.generation = 0
        self.rotate()

    def _write(self, name: str, data: bytes) -> str:
        p = self.root / name
        p.write_bytes(data)
        return str(p)

    def _pair(self, name: str, issued: Any) -> None:
        self.pairs[name] = (self._write(f"{name}.pem", issued.cert_pem), self._write(f"{name}-key.pem", issued.key_pem))
        self.serials[name] = issued.serial

    @property
    def cert(self) -> str:
        return str(self.replica / "current" / "cert.pem")

    @property
    def key(self) -> str:
        return str(self.replica / "current" / "key.pem")

    def rotate(self) -> int:
        """A new generation for the server (SPIFFE id of pod s), swapped in atomically; returns its serial."""
        self.generation += 1
        gen = self.replica / f"gen-{self.generation}"
        gen.mkdir()
        issued = self.ca.issue(spiffe_id(MESH, "s"), dns=("localhost",), ips=("127.0.0.1", S, T))
        (gen / "cert.pem").write_bytes(issued.cert_pem)
        (gen / "key.pem").write_bytes(issued.key_pem)
        tmp = self.replica / "current.tmp"
        os.symlink(gen.name, tmp)
        os.replace(tmp, self.replica / "current")
        return issued.serial


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("tls_certs"))


# --- a TLS client ----------------------------------------------------------------------------------------------


def client_context(certs: Certs, who: str | None = "b", alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(certs.ca_pem)
    if who is not None:
        ctx.load_cert_chain(*certs.pairs[who])
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def tls_get(ip: str, port: int, path: str, ctx: ssl.SSLContext, timeout: float = 5.0
            ) -> tuple[bytes, bytes | None]:
    """(what the server answered, its certificate DER); b"" when it refused us (alert, reset or close)."""
    raw = socket.create_connection((ip, port), timeout=timeout)
    out = bytearray()
    der = None
    try:
        with ctx.wrap_socket(raw) as s:
            der = s.getpeercert(binary_form=True)
            s.sendall(f"GET {path} HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n".encode())
            while chunk := s.recv(65536):
                out += chunk
    except (ssl.SSLError, ConnectionError, TimeoutError):
        pass
    finally:
        raw.close()
    return bytes(out), der


def status(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1]) if resp.startswith(b"HTTP/1.1 ") else 0


def serial_of(der: bytes | None) -> int | None:
    return x509.load_der_x509_certificate(der).serial_number if der else None


def stats(ip: str, admin: int) -> dict[str, int]:
    r = request(ip, admin, "/stats?format=json")
    return {s["name"]: s["value"] for s in json.loads(r.body)["stats"] if "name" in s}


# --- the sidecars ------------------------------------------------------------------------------------------------


def _hcm(prefix: str, cluster: str, log: Path) -> dict[str, Any]:
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                 "HttpConnectionManager",
        "stat_prefix": prefix,
        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(log), "log_format": {"text_format_source": {"inline_string": LOG_FORMAT}}}}],
        "route_config": {"name": "r", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}


def _tls(cert: str, key: str, ca: str | None, sans: list[dict[str, Any]] | None = None,
         downstream: bool = True, require: bool = True) -> dict[str, Any]:
    common: dict[str, Any] = {"tls_certificates": [{"certificate_chain": {"filename": cert},
                                                    "private_key": {"filename": key}}]}
    if ca:
        common["validation_context"] = {"trusted_ca": {"filename": ca}, **(
            {"match_typed_subject_alt_names": sans} if sans else {})}
    kind = "DownstreamTlsContext" if downstream else "UpstreamTlsContext"
    cfg: dict[str, Any] = {"@type": f"type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{kind}",
                           "common_tls_context": common}
    if downstream:
        cfg["require_client_certificate"] = require
    return {"name": "envoy.transport_sockets.tls", "typed_config": cfg}


def _cluster(name: str, ip: str, port: int, tls: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "type": "STATIC", "connect_timeout": "2s", "load_assignment": {
        "cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}}}]}]}}
    if tls:
        out["transport_socket"] = tls
    return out


def _listener(name: str, ip: str, port: int, chains: list[dict[str, Any]], inspector: bool = False
              ) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "address": {"socket_address": {"address": ip, "port_value": port}},
                           "filter_chains": chains}
    if inspector:
        out["listener_filters"] = [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}]
    return out


MESH_SANS = [{"san_type": "URI", "matcher": {"prefix": f"spiffe://{MESH}/"}}]


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return {"up": free_port(UP), "strict": free_port(S), "perm": free_port(S), "admin": free_port(S),
            "egress": free_port(C), "c_admin": free_port(C), "term": free_port(T), "t_admin": free_port(T)}


@pytest.fixture(scope="module")
def upstream(ports: dict[str, int]) -> Iterator[UpstreamServer]:
    server = UpstreamServer([(UP, ports["up"])]).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, certs: Certs, ports: dict[str, int],
           upstream: UpstreamServer) -> Iterator[SidecarProc]:
    """S: a strict mTLS listener (mesh SANs only) and a permissive one, in front of the upstream."""
    work = tmp_path_factory.mktemp("tls_server")
    log = work / "access.log"
    tls = _tls(certs.cert, certs.key, certs.ca_pem, MESH_SANS)
    boot = {"admin": {"address": {"socket_address": {"address": S, "port_value": ports["admin"]}}},
            "static_resources": {
                "listeners": [
                    _listener("strict", S, ports["strict"], [{"filters": [_hcm("strict", "svc", log)],
                                                             "transport_socket": tls}]),
                    _listener("perm", S, ports["perm"], [
                        {"filter_chain_match": {"transport_protocol": "tls"},
                         "filters": [_hcm("perm", "svc", log)], "transport_socket": tls},
                        {"filters": [_hcm("perm", "svc", log)]}], inspector=True)],
                "clusters": [_cluster("svc", UP, ports["up"])]}}
    path = work / "envoy.json"
    path.write_text(json.dumps(boot))
    sc = SidecarProc(work, S, ports["admin"], envoy=str(path))
    sc.log = log  # type: ignore[attr-defined]
    sc.start()
    yield sc
    assert sc.alive(), sc.stderr()[-3000:]
    sc.stop()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, certs: Certs, ports: dict[str, int],
           server: SidecarProc) -> Iterator[SidecarProc]:
    """C: egress routes to S's strict listener over mTLS: one cluster expects S's SPIFFE id, one another."""
    work = tmp_path_factory.mktemp("tls_client")
    log = work / "access.log"
    a_cert, a_key = certs.pairs["a-client"]

    def up_tls(expect: str) -> dict[str, Any]:
        return _tls(a_cert, a_key, certs.ca_pem, [{"san_type": "URI", "matcher": {"exact": expect}}],
                    downstream=False)

    hcm = _hcm("egress", "good", log)
    hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"] = [
        {"match": {"prefix": "/badsan"}, "route": {"cluster": "badsan"}},
        {"match": {"prefix": "/plain"}, "route": {"cluster": "plainup"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "good"}}]
    boot = {"admin": {"address": {"socket_address": {"address": C, "port_value": ports["c_admin"]}}},
            "static_resources": {
                "listeners": [_listener("egress", C, ports["egress"], [{"filters": [hcm]}])],
                "clusters": [_cluster("good", S, ports["strict"], up_tls(spiffe_id(MESH, "s"))),
                             _cluster("badsan", S, ports["strict"], up_tls(spiffe_id(MESH, "nobody"))),
                             _cluster("plainup", UP, ports["up"], up_tls(spiffe_id(MESH, "s")))]}}
    path = work / "envoy.json"
    path.write_text(json.dumps(boot))
    sc = SidecarProc(work, C, ports["c_admin"], envoy=str(path))
    sc.log = log  # type: ignore[attr-defined]
    sc.start()
    yield sc
    assert sc.alive(), sc.stderr()[-3000:]
    sc.stop()


def _log_lines(sc: SidecarProc, needle: str, timeout: float = 5.0) -> list[str]:
    found: list[str] = []

    def seen() -> bool:
        try:
            found[:] = [ln for ln in sc.log.read_text().splitlines() if needle in ln]  # type: ignore[attr-defined]
        except OSError:
            return False
        return bool(found)

    wait_until(seen, f"an access log line with {needle!r}", timeout)
    return found


# --- tests: the server side --------------------------------------------------------------------------------------


def test_strict_listener_serves_mesh_peers_and_logs_their_identity(server, certs, ports):
    resp, der = tls_get(S, ports["strict"], "/status/200?t=strict-ok", client_context(certs, "b"))
    assert status(resp) == 200, resp
    assert serial_of(der) is not None
    line = _log_lines(server, "t=strict-ok")[0]
    assert f"peer={spiffe_id(MESH, 'b')} local={spiffe_id(MESH, 's')} ver=TLSv1.3 subject=CN=b,O=meshctl" in line
    assert line.endswith("dtfr=-")


REFUSALS = [  # (client certificate, the ssl.* stat Envoy 1.40 counts for it)
    (None, "fail_verify_no_cert"),
    ("evil", "fail_verify_error"),
    ("expired", "fail_verify_error"),
    ("foreign", "fail_verify_san"),
]


@pytest.mark.parametrize(("who", "stat"), REFUSALS, ids=[w or "no-cert" for w, _ in REFUSALS])
def test_strict_listener_refuses_bad_peers_with_envoys_stat(server, certs, ports, who, stat):
    p = f"listener.{S}_{ports['strict']}."
    before = stats(S, ports["admin"])
    resp, _ = tls_get(S, ports["strict"], f"/status/200?t=refused-{who}", client_context(certs, who))
    assert resp == b""
    wait_until(lambda: stats(S, ports["admin"]).get(p + "ssl." + stat, 0) == before.get(p + "ssl." + stat, 0) + 1,
          f"ssl.{stat}")
    after = stats(S, ports["admin"])
    # As Envoy: the refused connection was accepted and destroyed by the listener and its connection manager,
    # and it was not a handshake nor a plain connection_error.
    for name, delta in ((p + "downstream_cx_total", 1), (p + "downstream_cx_destroy", 1), (p + "ssl.handshake", 0),
                        ("http.strict.downstream_cx_total", 1), ("http.strict.downstream_cx_ssl_total", 1),
                        ("http.strict.downstream_rq_total", 0)):
        assert after[name] - before[name] == delta, name
    if stat != "connection_error":
        assert after[p + "ssl.connection_error"] == before[p + "ssl.connection_error"]
    assert server.alive()


def test_strict_listener_refuses_plaintext(server, ports):
    p = f"listener.{S}_{ports['strict']}."
    before = stats(S, ports["admin"])
    with socket.create_connection((S, ports["strict"]), timeout=5) as s:
        s.sendall(b"GET /status/200 HTTP/1.1\r\nhost: svc\r\n\r\n")
        got = b""
        try:
            while chunk := s.recv(4096):
                got += chunk
        except ConnectionError:
            pass
    assert not got.startswith(b"HTTP/")
    wait_until(lambda: stats(S, ports["admin"])[p + "ssl.connection_error"] == before[p + "ssl.connection_error"] + 1,
          "ssl.connection_error")
    after = stats(S, ports["admin"])
    assert after[p + "downstream_cx_total"] - before[p + "downstream_cx_total"] == 1
    assert "refused the connection from" in server.stderr()


def test_refusals_are_logged_rate_limited(server, certs, ports):
    for i in range(20):
        tls_get(S, ports["strict"], f"/?t=flood-{i}", client_context(certs, "evil"))
    lines = [ln for ln in server.stderr().splitlines() if "refused the connection" in ln]
    assert 1 <= len(lines) <= 3, lines  # one per 10 s at most, not one per connection


def test_permissive_listener_serves_tls_and_plaintext(server, certs, ports):
    resp, _ = tls_get(S, ports["perm"], "/status/200?t=perm-tls", client_context(certs, "b"))
    assert status(resp) == 200
    r = request(S, ports["perm"], "/status/200?t=perm-plain")
    assert r.status == 200
    assert f"peer={spiffe_id(MESH, 'b')}" in _log_lines(server, "t=perm-tls")[0]
    assert "peer=- local=- ver=- subject=-" in _log_lines(server, "t=perm-plain")[0]
    # permissive does not mean unverified: a TLS client from another CA is still refused
    assert tls_get(S, ports["perm"], "/?t=perm-evil", client_context(certs, "evil"))[0] == b""


def test_openssl_sees_the_spiffe_san(server, ports):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    proc = subprocess.run(["openssl", "s_client", "-connect", f"{S}:{ports['strict']}", "-showcerts"],
                          input=b"", capture_output=True, timeout=20)
    pem = re.search(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", proc.stdout, re.S)
    assert pem, proc.stdout[-2000:]
    text = subprocess.run(["openssl", "x509", "-noout", "-text"], input=pem.group(0), capture_output=True,
                          timeout=20).stdout.decode()
    assert f"URI:{spiffe_id(MESH, 's')}" in text


# --- tests: the client side ---------------------------------------------------------------------------------------


def test_upstream_mtls_and_san_mismatch(client, server, ports):
    r = request(C, ports["egress"], "/status/200?t=up-good")
    assert r.status == 200
    line = _log_lines(client, "t=up-good")[0]
    assert f"up_peer={spiffe_id(MESH, 's')} utfr=-" in line
    # ... and the server saw the client's identity
    assert f"peer={spiffe_id(MESH, 'a')}" in _log_lines(server, "t=up-good")[0]
    r = request(C, ports["egress"], "/badsan?t=up-badsan")
    assert r.status == 503
    assert r.body == (b"upstream connect error or disconnect/reset before headers. reset reason: "
                      b"remote connection failure")
    line = _log_lines(client, "t=up-badsan")[0]
    assert " 503 UF " in line
    assert ("utfr=TLS_error:|268435581:SSL_routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:verify_cert_failed:"
            f"_SAN_matcher,_certificate_SANs_are_[{spiffe_id(MESH, 's')},_localhost,") in line
    # a TLS cluster whose endpoint speaks plaintext (this upstream resets a ClientHello; an HTTP server answering
    # 400 gives WRONG_VERSION_NUMBER, tests/conformance/test_tls_interop.py)
    r = request(C, ports["egress"], "/plain?t=up-plain")
    assert r.status == 503
    assert re.search(r" 503 UF .* utfr=TLS_error:\|\S+:TLS_error_end ", _log_lines(client, "t=up-plain")[0])
    st = stats(C, ports["c_admin"])
    assert st["cluster.good.ssl.handshake"] >= 1
    assert st["cluster.badsan.ssl.fail_verify_san"] >= 1
    assert st["cluster.badsan.upstream_cx_connect_fail"] >= 1
    assert st["cluster.plainup.ssl.connection_error"] >= 1
    assert st["cluster.badsan.upstream_cx_active"] == 0  # a refused peer is never an open connection


def test_pooled_upstream_connections_keep_their_tls_session(client, ports):
    before = stats(C, ports["c_admin"])["cluster.good.ssl.handshake"]
    for i in range(20):
        assert request(C, ports["egress"], f"/status/200?t=pooled-{i}").status == 200
    assert stats(C, ports["c_admin"])["cluster.good.ssl.handshake"] - before <= 1


def test_every_exported_ssl_stat_is_counted(server, client, certs, ports):
    """Every ssl.* stat either engine scope exports moved in this module's scenarios (order: runs after them)."""
    # the one the scenarios above do not need: no_certificate, a TLS client without a certificate where none is
    # required -- the termination listener of test_short_form_tls_termination counts it; here, count what moved
    seen = {**stats(S, ports["admin"]), **stats(C, ports["c_admin"])}
    kinds: dict[str, bool] = {}
    for name, value in seen.items():
        m = re.match(r"^(listener|cluster)\.[^ ]*?\.?ssl\.(\w+)$", name)
        if m:
            kinds[m.group(2)] = kinds.get(m.group(2), False) or value > 0
    assert set(kinds) == {"handshake", "connection_error", "fail_verify_no_cert", "fail_verify_error",
                          "fail_verify_san", "no_certificate"}
    silent = sorted(k for k, moved in kinds.items() if not moved and k != "no_certificate")
    assert silent == [], f"exported but never counted: {silent}"


# --- certificate rotation -----------------------------------------------------------------------------------------


def test_rotation_under_load_loses_no_request(server, certs, ports):
    ctx = client_context(certs, "b")
    old = serial_of(tls_get(S, ports["strict"], "/?t=rot-before", ctx)[1])
    results: list[int] = []
    serials: set[int | None] = set()
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set() and i < 2000:  # bounded even if the main thread dies
            resp, der = tls_get(S, ports["strict"], f"/status/200?t=rot-{i}", ctx)
            results.append(status(resp))
            serials.add(serial_of(der))
            i += 1

    th = threading.Thread(target=load, daemon=True)
    th.start()
    try:
        wait_until(lambda: len(results) >= 5, "requests before the rotation")
        new = certs.rotate()
        wait_until(lambda: new in serials, "a new connection with the rotated certificate")
        n = len(results)
        wait_until(lambda: len(results) >= n + 5, "requests after the rotation")
    finally:
        stop.set()
        th.join(30)
    assert results and all(s == 200 for s in results), results
    assert old in serials and new in serials
    assert "TLS certificate reloaded" in server.stderr()


def test_a_half_written_pair_keeps_the_old_certificate(server, certs, ports):
    ctx = client_context(certs, "b")
    serial = serial_of(tls_get(S, ports["strict"], "/?t=half-before", ctx)[1])
    cur = Path(os.path.realpath(certs.replica / "current"))
    good_key = (cur / "key.pem").read_bytes()
    other_key = Path(certs.pairs["b"][1]).read_bytes()  # a key that is not the certificate's
    (cur / "key.pem").write_bytes(other_key)
    try:
        wait_until(lambda: "keeping the previous certificate" in server.stderr(), "the failed reload to be logged")
        resp, der = tls_get(S, ports["strict"], "/status/200?t=half-during", ctx)
        assert status(resp) == 200 and serial_of(der) == serial
    finally:
        (cur / "key.pem").write_bytes(good_key)
    assert server.alive()


# --- TLS termination on a short-form ingress ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def terminating(tmp_path_factory: pytest.TempPathFactory, certs: Certs, ports: dict[str, int],
                upstream: UpstreamServer) -> Iterator[SidecarProc]:
    work = tmp_path_factory.mktemp("tls_term")
    config = {"admin": {"port": ports["t_admin"]},
              "ingress": {"port": ports["term"], "to": f"{UP}:{ports['up']}",
                          "tls": {"cert": certs.cert, "key": certs.key}}}
    sc = SidecarProc(work, T, ports["t_admin"], config=config)
    sc.start()
    yield sc
    assert sc.alive(), sc.stderr()[-3000:]
    sc.stop()


def test_short_form_tls_termination_with_curl_and_alpn(terminating, certs, ports):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    proc = subprocess.run(["curl", "-sS", "-v", "--http1.1", "--cacert", certs.ca_pem,
                           f"https://{T}:{ports['term']}/status/200?t=curl"], capture_output=True, timeout=20)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    err = proc.stderr.decode()
    assert re.search(r"ALPN.*(server accepted|accepted) .*http/1\.1", err), err
    st = stats(T, ports["t_admin"])
    p = f"listener.{T}_{ports['term']}.ssl."
    assert st[p + "handshake"] >= 1 and st[p + "no_certificate"] >= 1  # no client certificate asked for
    # ALPN from Python too
    resp, _ = tls_get(T, ports["term"], "/status/200?t=alpn", client_context(certs, None, ["http/1.1"]))
    assert status(resp) == 200


# --- configuration -------------------------------------------------------------------------------------------------


def test_needs_tls_rule(tmp_path: Path):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"ingress": {"port": 80, "to": 8080}}))
    tls = tmp_path / "tls.json"
    tls.write_text(json.dumps({"ingress": {"port": 80, "to": 8080, "tls": "mesh"}}))
    envoy = tmp_path / "envoy.yaml"
    envoy.write_text("static_resources:\n  clusters:\n  - name: x\n    transport_socket: {}\n")
    assert not needs_tls(["--config", str(plain)])
    assert needs_tls(["--config", str(tls)])
    assert needs_tls([f"--envoy={envoy}"])
    assert needs_tls(["--config", str(plain), "--mesh-identity", "x.json"])


def test_a_plain_sidecar_does_not_load_openssl(tmp_path: Path):
    script = ("import sys; from sidecar import no_tls; no_tls.install(sys.argv[1:]); import asyncio, sidecar.app; "
              "print(type(sys.modules['ssl'].SSLContext).__name__, hasattr(sys.modules['ssl'], 'OPENSSL_VERSION'))")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"ingress": {"port": 80, "to": 8080}}))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("MESHCTL_SIDECAR_OPENSSL", None)
    out = subprocess.run([sys.executable, "-c", script, "--config", str(cfg)], capture_output=True, env=env,
                         timeout=30, check=True).stdout.decode()
    assert out.split() == ["type", "False"]
    out = subprocess.run([sys.executable, "-c", script, "--config", str(cfg), "--mesh-identity", "x"],
                         capture_output=True, env=env, timeout=30, check=True).stdout.decode()
    assert out.split()[1] == "True"


def _boot_with(common: dict[str, Any]) -> dict[str, Any]:
    return {"static_resources": {"listeners": [], "clusters": [
        _cluster("x", "127.0.0.1", 1, {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": common}})]}}


@pytest.mark.parametrize(("common", "message"), [
    ({"tls_certificates": [{"certificate_chain": {"inline_string": "x"}, "private_key": {"filename": "k"}}]},
     "tls_certificates[0].certificate_chain.inline_string: only files are supported"),
    ({"tls_certificate_sds_secret_configs": [{"name": "a"}]}, "tls_certificate_sds_secret_configs: SDS is not"),
    ({"validation_context": {"trusted_ca": {"filename": "ca"}, "crl": {"filename": "c"}}},
     "validation_context.crl: not supported"),
    ({"validation_context": {"trusted_ca": {"filename": "ca"},
                             "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"regex": "x"}}]}},
     "matcher.regex: not supported"),
    ({"alpn_protocols": ["h2"]}, "alpn_protocols[0]: 'h2' is not supported"),
])
def test_envoy_tls_fields_we_do_not_honour_are_clear_errors(common, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compile_envoy(_boot_with(common), "127.0.0.1", source="e.yaml")


def test_filter_chain_match_other_than_the_permissive_pair_is_an_error(certs):
    tls = _tls(certs.cert, certs.key, certs.ca_pem)
    hcm = _hcm("p", "svc", Path("/dev/null"))
    boot = {"static_resources": {"clusters": [_cluster("svc", "127.0.0.2", 1)], "listeners": [
        _listener("l", "127.0.0.1", 1, [{"filter_chain_match": {"server_names": ["a"]}, "filters": [hcm],
                                         "transport_socket": tls}], inspector=True)]}}
    with pytest.raises(ConfigError, match="filter_chain_match.server_names"):
        compile_envoy(boot, "127.0.0.1", source="e.yaml")
    boot["static_resources"]["listeners"][0]["filter_chains"] = [
        {"filter_chain_match": {"transport_protocol": "tls"}, "filters": [hcm], "transport_socket": tls},
        {"filters": [hcm]}]
    boot["static_resources"]["listeners"][0].pop("listener_filters")
    with pytest.raises(ConfigError, match="needs the envoy.filters.listener.tls_inspector"):
        compile_envoy(boot, "127.0.0.1", source="e.yaml")


def test_mesh_identity_makes_the_short_form_ingress_strict_mtls(tmp_path: Path, certs, upstream, ports):
    """--mesh-identity: the identity's transport sockets on a short-form sidecar (what meshctl runs)."""
    ip = "127.0.233.3"
    port, admin = free_port(ip), free_port(ip)
    ident = tmp_path / "identity.json"
    ident.write_text(json.dumps({"spiffe_id": spiffe_id(MESH, "s"), "trust_domain": MESH, "cert": certs.cert,
                                 "key": certs.key, "ca": certs.ca_pem, "ingress": "strict", "clusters": {}}))
    sc = SidecarProc(tmp_path / "sc", ip, admin,
                     config={"admin": {"port": admin}, "ingress": {"port": port, "to": f"{UP}:{ports['up']}"}})
    sc.args += ["--mesh-identity", str(ident)]
    sc.start()
    try:
        resp, _ = tls_get(ip, port, "/status/200?t=ident", client_context(certs, "b"))
        assert status(resp) == 200
        assert tls_get(ip, port, "/status/200?t=ident-foreign", client_context(certs, "foreign"))[0] == b""
        with pytest.raises(OSError):
            request(ip, port, "/status/200?t=ident-plain", timeout=5)
        st = stats(ip, admin)
        assert st[f"listener.{ip}_{port}.ssl.fail_verify_san"] == 1
        assert st[f"listener.{ip}_{port}.ssl.connection_error"] == 1
    finally:
        sc.stop()
