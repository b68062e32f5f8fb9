"""examples/zero-trust end to end: identities, strict mTLS, the policy on B, TLS termination with a mesh
certificate, a JWT-protected route, rotation under load, and the same a -> b over the real Envoy."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys

import pytest

from pods.sidecars import find_envoy
from tests.conftest import POD_ALIAS_PROBE, ROOT, free_port, free_ports, wait_for

EXAMPLE = ROOT / "examples/zero-trust"
sys.path.insert(0, str(EXAMPLE))
from mint import mint  # noqa: E402  (the example's own token minting, as its README runs it)

PORT_VARS = ("B_PORT", "B_SERVICE_PORT", "B_METRICS_PORT", "A_PORT", "C_PORT", "CLIENT_SERVICE_PORT",
             "CLIENT_METRICS_PORT", "EGRESS_PORT", "WEB_PORT", "WEB_SERVICE_PORT", "WEB_METRICS_PORT", "ADMIN_PORT")


def example_env() -> dict[str, str]:
    env = dict(zip(PORT_VARS, map(str, free_ports(len(PORT_VARS), POD_ALIAS_PROBE)), strict=True))
    env["WEB_PUBLISH_PORT"] = str(free_port())
    return env


def certs(meshctl, project: str) -> dict:
    return json.loads(meshctl("certs", "-p", project, "-o", "json").stdout)


def ips(meshctl, project: str) -> dict[str, str]:
    return {p["replica"]: p["ip"] for p in meshctl.ps(project)["processes"]}


def egress_get(ip: str, port: str, host: str = "b.local") -> tuple[int, str]:
    """A request on a client pod's egress listener, as its service makes it (HTTP_PROXY style)."""
    conn = http.client.HTTPConnection(ip, int(port), timeout=10)
    try:
        conn.request("GET", "/", headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def plaintext_refused(ip: str, port: str) -> bool:
    """A plaintext HTTP client gets no HTTP answer from a strict ingress: the connection is closed or reset."""
    with socket.create_connection((ip, int(port)), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
        try:
            data = s.recv(4096)
        except (ConnectionResetError, TimeoutError):
            return True
    return not data.startswith(b"HTTP/")


def tls_get(port: str, ca: str, token: str | None = None) -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=ca)
    conn = http.client.HTTPSConnection("127.0.0.1", int(port), context=ctx, timeout=10)
    try:
        conn.request("GET", "/", headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def served_cert(ip: str, port: str, ca: str, cert: str, key: str) -> str:
    """What ``openssl s_client`` sees: the peer certificate, as ``openssl x509 -text``."""
    hello = subprocess.run(["openssl", "s_client", "-connect", f"{ip}:{port}", "-CAfile", ca, "-cert", cert,
                            "-key", key, "-verify_return_error"], input="", capture_output=True, text=True,
                           timeout=20)
    pem = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", hello.stdout, re.S)
    assert pem, hello.stdout + hello.stderr
    return subprocess.run(["openssl", "x509", "-noout", "-text", "-serial"], input=pem.group(0),
                          capture_output=True, text=True, timeout=10).stdout


def by_replica(answer: dict) -> dict[str, dict]:
    return {c["replica"]: c for c in answer["certs"]}


def test_zero_trust_example(meshctl):
    env = example_env()
    meshctl.up(EXAMPLE / "zero-trust.yaml", "ztx", env=env)
    home = meshctl.home / "ztx"
    ca = str(home / "identity" / "ca.pem")
    addr = ips(meshctl, "ztx")

    # Identities: one per replica of a pod with a sidecar, from the mesh CA.
    answer = certs(meshctl, "ztx")
    assert answer["trust_domain"] == "ztx" and answer["ca"] == ca
    ids = by_replica(answer)
    assert {r: c["identity"] for r, c in ids.items()} == {
        "a-0": "spiffe://ztx/pod/a", "b-0": "spiffe://ztx/pod/b", "c-0": "spiffe://ztx/pod/c",
        "web-0": "spiffe://ztx/pod/web"}
    # b strict; a and c are the edge (permissive: `meshctl traffic a` is a plaintext client); web terminates TLS.
    assert {r: c["mtls"] for r, c in ids.items()} == {"a-0": "permissive", "b-0": "strict", "c-0": "permissive",
                                                      "web-0": "strict"}
    assert all(c["rotations"] == 0 and c["serial"] for c in ids.values())
    assert ids["a-0"]["peers"] == ["spiffe://ztx/pod/b"] and ids["b-0"]["peers"] == []
    assert (home / "identity" / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    table = meshctl("certs", "-p", "ztx").stdout
    assert "spiffe://ztx/pod/b" in table and ids["b-0"]["serial"] in table

    # a -> b: mTLS, allowed by b's policy; b's access log names a's SPIFFE id.
    report = json.loads(meshctl("traffic", "a", "--n", "50", "-c", "2", "--json", "-p", "ztx").stdout)
    assert report["status"] == {"200": 50} and not report["errors"], report
    b_log = home / "logs"
    assert wait_for(lambda: "peer=spiffe://ztx/pod/a" in meshctl("logs", "b", "--role", "sidecar", "-p",
                                                                  "ztx").stdout, 10), list(b_log.iterdir())

    # c -> b: a valid identity, but no policy names c: 403 from b's sidecar.
    status, body = egress_get(addr["c-0"], env["EGRESS_PORT"])
    assert (status, body) == (403, "RBAC: access denied"), (status, body)
    assert egress_get(addr["a-0"], env["EGRESS_PORT"])[0] == 200

    # Plaintext straight to b's sidecar: refused.
    assert plaintext_refused(addr["b-0"], env["B_PORT"])

    # The published TLS port: a mesh certificate curl can verify with the mesh CA, and a JWT.
    publish = env["WEB_PUBLISH_PORT"]
    assert tls_get(publish, ca)[0] == 401
    status, body = tls_get(publish, ca, mint())
    assert status == 200 and body.startswith("Service B: Yay!"), (status, body)
    assert tls_get(publish, ca, mint(ttl_s=-120))[0] == 401
    assert tls_get(publish, ca, mint(issuer="https://someone.else"))[0] == 401
    if shutil.which("curl"):
        out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", ca,
                              "-H", f"Authorization: Bearer {mint()}", f"https://localhost:{publish}/"],
                             capture_output=True, text=True, timeout=20)
        assert out.stdout == "200", out


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command line")
def test_openssl_sees_the_spiffe_san_and_rotation_under_load_loses_nothing(meshctl):
    env = example_env()
    meshctl.up(EXAMPLE / "zero-trust.yaml", "ztr", env=env)
    home = meshctl.home / "ztr" / "identity"
    ca, a_cert, a_key = str(home / "ca.pem"), str(home / "a-0/current/cert.pem"), str(home / "a-0/current/key.pem")
    addr = ips(meshctl, "ztr")
    text = served_cert(addr["b-0"], env["B_PORT"], ca, a_cert, a_key)
    assert "URI:spiffe://ztr/pod/b" in text, text
    before = by_replica(certs(meshctl, "ztr"))

    load = subprocess.Popen([sys.executable, "-m", "meshctl", "traffic", "a", "--duration", "4s", "-c", "4",
                             "--json", "-p", "ztr"], stdout=subprocess.PIPE, text=True, env=meshctl.env, cwd=ROOT)
    try:
        rotated = 0
        # Rotate both ends of the a -> b edge while the load runs, as many times as it lasts.
        while load.poll() is None and rotated < 6:
            meshctl("certs", "--rotate", "b" if rotated % 2 else "a", "-p", "ztr")
            rotated += 1
            wait_for(lambda: load.poll() is not None, 0.4)  # pacing, ended early when the load ends
        out, _ = load.communicate(timeout=60)
    finally:
        if load.poll() is None:
            load.kill()
    report = json.loads(out)
    assert rotated >= 4, rotated
    assert report["requests"] > 100 and set(report["status"]) == {"200"} and not report["errors"], report

    after = by_replica(certs(meshctl, "ztr"))
    # a is rotated on the even turns, b on the odd ones: an odd count of turns rotated a once more than b.
    for replica, times in (("a-0", (rotated + 1) // 2), ("b-0", rotated // 2)):
        assert after[replica]["serial"] != before[replica]["serial"]
        assert after[replica]["rotations"] == times
    # b's sidecar now serves the new certificate (it reloads when `current` is swapped).
    serial = after["b-0"]["serial"].upper()
    assert wait_for(lambda: f"serial={serial.zfill(len(serial) + len(serial) % 2)}" in served_cert(
        addr["b-0"], env["B_PORT"], ca, a_cert, a_key), 10)
    gens = sorted(p.name for p in (home / "b-0").iterdir() if p.name.startswith("gen-"))
    assert len(gens) == 2  # current and the previous one; older generations are deleted


@pytest.mark.skipif(find_envoy(os.environ) is None, reason="the real Envoy is not installed (meshctl[envoy])")
def test_a_to_b_over_the_real_envoy(meshctl):
    env = example_env()
    meshctl.started.append("zte")
    meshctl("up", str(EXAMPLE / "zero-trust.yaml"), "-d", "-p", "zte", "--sidecar-engine", "envoy", env=env,
            timeout=120)
    addr = ips(meshctl, "zte")
    assert all(p["engine"] == "envoy" for p in meshctl.ps("zte")["processes"] if p["role"] == "sidecar")
    report = json.loads(meshctl("traffic", "a", "--n", "50", "-c", "2", "--json", "-p", "zte").stdout)
    assert report["status"] == {"200": 50} and not report["errors"], report
    assert egress_get(addr["c-0"], env["EGRESS_PORT"]) == (403, "RBAC: access denied")
    assert plaintext_refused(addr["b-0"], env["B_PORT"])
    assert wait_for(lambda: "peer=spiffe://zte/pod/a" in meshctl("logs", "b", "--role", "sidecar", "-p",
                                                                  "zte").stdout, 10)
    if shutil.which("openssl") is None:
        return
    # A rotation reaches the real Envoy too: its SDS files watch the replica's directory, where `current` is
    # renamed (planned before the first certificate existed, so the plan says which directory, not the disk).
    home = meshctl.home / "zte" / "identity"
    ca, a_cert, a_key = str(home / "ca.pem"), str(home / "a-0/current/cert.pem"), str(home / "a-0/current/key.pem")
    serial = json.loads(meshctl("certs", "--rotate", "b", "-o", "json", "-p", "zte").stdout)["rotated"][0]["serial"]
    serial = serial.upper().zfill(len(serial) + len(serial) % 2)
    assert wait_for(lambda: f"serial={serial}" in served_cert(addr["b-0"], env["B_PORT"], ca, a_cert, a_key), 10)
    report = json.loads(meshctl("traffic", "a", "--n", "50", "-c", "2", "--json", "-p", "zte").stdout)
    assert report["status"] == {"200": 50}, report
