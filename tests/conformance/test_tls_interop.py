"""Our sidecar and the real Envoy 1.40 speaking mTLS to each other with mesh certificates, both directions, each
seeing the other's SPIFFE id; the same ssl.* / connection stats on both engines for the same refused and
accepted clients; and the exported bootstrap's SDS files letting the real Envoy pick up a rotated certificate.

Addresses: 127.0.234.1 the real Envoy, 127.0.234.2 our sidecar, 127.0.234.3 the upstream both serve.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshctl.identity.ca import MeshCA
from pods.identity import spiffe_id
from sidecar.envoy_config import compile_envoy
from sidecar.envoy_export import export_envoy, sds_files
from tests.conformance.harness import ROOT, envoy_binary
from tests.conftest import free_port, wait_until
from tests.test_sidecar_proxy import request
from tests.test_sidecar_tls import (
    MESH,
    MESH_SANS,
    _cluster,
    _hcm,
    _listener,
    _tls,
    serial_of,
    stats,
    status,
    tls_get,
)
from tests.upstreams import UpstreamServer

E, O, UP = "127.0.234.1", "127.0.234.2", "127.0.234.3"  # noqa: E741 - E(nvoy), O(urs)
ENVOY_ID, OURS_ID = spiffe_id(MESH, "e"), spiffe_id(MESH, "o")



class Proc:
    """One engine: the real Envoy or our sidecar, on an Envoy bootstrap file."""

    def __init__(self, kind: str, ip: str, admin: int, config: Path, workdir: Path) -> None:
        self.kind, self.ip, self.admin, self.workdir = kind, ip, admin, workdir
        envoy = envoy_binary()
        assert envoy is not None
        if kind == "envoy":
            cmd = [envoy, "-c", str(config), "--concurrency", "1", "--disable-hot-restart", "--log-level", "warn",
                   "--file-flush-interval-msec", "10"]
        else:
            cmd = [sys.executable, "-m", "sidecar", "--envoy", str(config), "--pod-ip", ip]
        env = {k: v for k, v in os.environ.items() if k not in ("MESH_HOSTS", "POD_IP")}
        env["PYTHONPATH"] = str(ROOT)
        self.err = workdir / f"{kind}.stderr"
        with open(workdir / f"{kind}.stdout", "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, env=env)

    def ready(self) -> Proc:
        def live() -> bool:
            assert self.proc.poll() is None, f"{self.kind} exited: {self.err.read_text()[-2000:]}"
            try:
                r = request(self.ip, self.admin, "/ready", timeout=1)
                return r.status == 200 and r.body.strip() == b"LIVE"
            except OSError:
                return False
        wait_until(live, f"{self.kind} to be ready", 20)
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _pair(d: Path, name: str, issued: Any) -> tuple[str, str]:
    cert, key = d / f"{name}.pem", d / f"{name}-key.pem"
    cert.write_bytes(issued.cert_pem)
    key.write_bytes(issued.key_pem)
    return str(cert), str(key)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("tls_interop")
    ca = MeshCA.create(MESH)
    ca_pem = work / "ca.pem"
    ca_pem.write_bytes(ca.cert_pem)
    other = MeshCA.create("evil")
    certs = {"e": _pair(work, "e", ca.issue(ENVOY_ID)), "o": _pair(work, "o", ca.issue(OURS_ID)),
             "b": _pair(work, "b", ca.issue(spiffe_id(MESH, "b"))),
             "evil": _pair(work, "evil", other.issue(spiffe_id(MESH, "b"))),
             "foreign": _pair(work, "foreign", ca.issue("spiffe://other/pod/x"))}
    ports = {"up": free_port(UP)}
    for ip in (E, O):
        ports.update({f"{ip}.strict": free_port(ip), f"{ip}.egress": free_port(ip), f"{ip}.admin": free_port(ip)})
    upstream = UpstreamServer([(UP, ports["up"])]).start()
    procs: list[Proc] = []
    try:
        for kind, ip, me, peer_ip, peer_id in (("envoy", E, "e", O, OURS_ID), ("sidecar", O, "o", E, ENVOY_ID)):
            log = work / f"{kind}.log"
            cert, key = certs[me]
            out_tls = _tls(cert, key, str(ca_pem), [{"san_type": "URI", "matcher": {"exact": peer_id}}],
                           downstream=False)
            boot = {"admin": {"address": {"socket_address": {"address": ip, "port_value": ports[f"{ip}.admin"]}}},
                    "static_resources": {
                        "listeners": [
                            _listener("strict", ip, ports[f"{ip}.strict"], [{
                                "filters": [_hcm("strict", "svc", log)],
                                "transport_socket": _tls(cert, key, str(ca_pem), MESH_SANS)}]),
                            _listener("egress", ip, ports[f"{ip}.egress"],
                                      [{"filters": [_hcm("egress", "peer", log)]}])],
                        "clusters": [_cluster("svc", UP, ports["up"]),
                                     _cluster("peer", peer_ip, ports[f"{peer_ip}.strict"], out_tls)]}}
            path = work / f"{kind}.json"
            path.write_text(json.dumps(boot))
            procs.append(Proc(kind, ip, ports[f"{ip}.admin"], path, work))
        for p in procs:
            p.ready()
        yield {"work": work, "ca": str(ca_pem), "certs": certs, "ports": ports, "ca_obj": ca,
               "envoy": procs[0], "sidecar": procs[1]}
    finally:
        for p in procs:
            p.stop()
        upstream.stop()


def _log(world: dict[str, Any], kind: str, tag: str) -> str:
    path = world["work"] / f"{kind}.log"
    found: list[str] = []

    def seen() -> bool:
        found[:] = [ln for ln in (path.read_text().splitlines() if path.exists() else []) if tag in ln]
        return bool(found)

    wait_until(seen, f"{kind}'s access log line for {tag}", 5)
    return found[0]


@pytest.mark.parametrize("caller", ["sidecar", "envoy"])
def test_mtls_between_our_sidecar_and_the_real_envoy(world, caller):
    """The caller's egress originates mTLS to the other engine's strict ingress; each logs the other's id."""
    callee = "envoy" if caller == "sidecar" else "sidecar"
    ip = O if caller == "sidecar" else E
    tag = f"t=interop-{caller}"
    r = request(ip, world["ports"][f"{ip}.egress"], f"/status/200?{tag}")
    assert r.status == 200, r.body
    caller_id, callee_id = (OURS_ID, ENVOY_ID) if caller == "sidecar" else (ENVOY_ID, OURS_ID)
    assert f"up_peer={callee_id} utfr=-" in _log(world, caller, tag)
    line = _log(world, callee, tag)
    assert f"peer={caller_id} local={callee_id} ver=TLSv1.2 subject=CN={caller_id.rsplit('/', 1)[1]},O=meshctl" \
        in line, line  # TLS 1.2: the client side's default maximum in Envoy, and ours


SSL = ("handshake", "connection_error", "fail_verify_no_cert", "fail_verify_error", "fail_verify_san",
       "no_certificate")


def _connection_stats(world: dict[str, Any], kind: str) -> dict[str, int]:
    ip = E if kind == "envoy" else O
    st = stats(ip, world["ports"][f"{ip}.admin"])
    p = f"listener.{ip}_{world['ports'][f'{ip}.strict']}."
    out = {f"ssl.{n}": st.get(p + "ssl." + n, 0) for n in SSL}
    for n in ("downstream_cx_total", "downstream_cx_destroy"):
        out[f"listener.{n}"] = st.get(p + n, 0)
    for n in ("downstream_cx_total", "downstream_cx_destroy", "downstream_cx_ssl_total", "downstream_rq_total"):
        out[f"http.{n}"] = st.get("http.strict." + n, 0)
    return out


def _clients(world: dict[str, Any], kind: str) -> list[int]:
    import ssl

    ip = E if kind == "envoy" else O
    port = world["ports"][f"{ip}.strict"]
    got = []
    for who in ("b", None, "evil", "foreign"):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(world["ca"])
        if who:
            ctx.load_cert_chain(*world["certs"][who])
        got.append(status(tls_get(ip, port, f"/status/200?t=cmp-{who}", ctx)[0]))
    with socket.create_connection((ip, port), timeout=5) as s:  # plaintext on a strict listener
        s.sendall(b"GET /status/200 HTTP/1.1\r\nhost: svc\r\n\r\n")
        try:
            got.append(status(s.recv(4096)))
        except ConnectionError:
            got.append(0)
    return got


def test_same_connection_stats_on_both_engines(world):
    deltas = {}
    for kind in ("envoy", "sidecar"):
        before = _connection_stats(world, kind)
        assert _clients(world, kind) == [200, 0, 0, 0, 0]

        def settled(kind: str = kind, before: dict[str, int] = before) -> bool:
            now = _connection_stats(world, kind)
            return now["listener.downstream_cx_destroy"] - before["listener.downstream_cx_destroy"] == 5

        wait_until(settled, f"{kind}'s five connections to close", 15)
        after = _connection_stats(world, kind)
        deltas[kind] = {k: after[k] - before[k] for k in after}
    assert deltas["sidecar"] == deltas["envoy"], deltas
    assert deltas["envoy"]["ssl.handshake"] == 1 and deltas["envoy"]["ssl.connection_error"] == 1


def test_exported_sds_lets_the_real_envoy_reload_a_rotated_certificate(world, tmp_path: Path):
    ca: MeshCA = world["ca_obj"]
    replica = tmp_path / "r-0"
    replica.mkdir()

    def generation(n: int) -> int:
        gen = replica / f"gen-{n}"
        gen.mkdir()
        issued = ca.issue(spiffe_id(MESH, "r"))
        (gen / "cert.pem").write_bytes(issued.cert_pem)
        (gen / "key.pem").write_bytes(issued.key_pem)
        os.symlink(gen.name, replica / "current.tmp")
        os.replace(replica / "current.tmp", replica / "current")
        return issued.serial

    first = generation(1)
    ip, port, admin = E, free_port(E), free_port(E)
    cert, key = str(replica / "current" / "cert.pem"), str(replica / "current" / "key.pem")
    src = {"admin": {"address": {"socket_address": {"address": ip, "port_value": admin}}},
           "static_resources": {"listeners": [_listener("tls", ip, port, [{
               "filters": [_hcm("tls", "svc", tmp_path / "access.log")],
               "transport_socket": _tls(cert, key, None, downstream=True, require=False)}])],
               "clusters": [_cluster("svc", UP, world["ports"]["up"])]}}
    boot = compile_envoy(src, ip, source="rot.yaml")
    sds_dir = tmp_path / "sds"
    sds_dir.mkdir()
    files = sds_files(boot, str(sds_dir))
    assert len(files) == 1
    for path, text in files.items():
        Path(path).write_text(text)
        assert json.loads(text)["resources"][0]["tls_certificate"]["watched_directory"] == {"path": str(replica)}
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(export_envoy(boot, sds_dir=str(sds_dir))))
    check = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config)], capture_output=True,
                           timeout=60)
    assert check.returncode == 0, check.stderr.decode()[-2000:]
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(world["ca"])
    proc = Proc("envoy", ip, admin, config, tmp_path).ready()
    try:
        assert serial_of(tls_get(ip, port, "/status/200?t=rot1", ctx)[1]) == first
        second = generation(2)
        wait_until(lambda: serial_of(tls_get(ip, port, "/status/200?t=rot2", ctx)[1]) == second,
                   "the real Envoy to serve the rotated certificate", 10)
    finally:
        proc.stop()
