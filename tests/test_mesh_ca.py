"""The mesh CA, the certificates it issues, their generations on disk, and what `up` says when the CA is unusable."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
import textwrap
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshctl.identity.ca import CAError, MeshCA, describe_cert, ensure_ca
from meshctl.identity.issuer import Issuer, generations
from meshctl.lifecycle import MeshError, ensure_mesh_ca
from pods.identity import spiffe_id
from pods.plan import HostFacts, plan_mesh
from pods.topology import parse_topology

TOPOLOGY = """
name: ca
mtls: strict
{identity}
pods:
  b:
    sidecar: {{ingress: {{port: 8000, to: 8001}}}}
    service: {{command: [python, -m, services.b], env: {{SERVICE_PORT: "8001"}}}}
"""


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_ca(directory: Path, ca: MeshCA, name: str = "user") -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert.write_bytes(ca.cert_pem)
    key.write_bytes(ca.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    key.chmod(0o600)
    return cert, key


def make_plan(tmp_path: Path, identity: str = ""):
    topo = parse_topology(textwrap.dedent(TOPOLOGY.format(identity=identity)), tmp_path / "t.yaml")
    return plan_mesh(topo, tmp_path / "state", HostFacts(environ={"PATH": "/usr/bin:/bin"}), run_id="r")


def test_spiffe_form_is_one_across_plan_and_ca():
    assert spiffe_id("m", "b") == "spiffe://m/pod/b"


def test_created_ca_key_is_private_and_reloaded(tmp_path):
    d = tmp_path / "identity"
    ca = ensure_ca(d, "m")
    assert mode(d / "ca-key.pem") == 0o600 and mode(d / "ca.pem") == 0o644 and mode(d) == 0o700
    again = ensure_ca(d, "m")
    assert again.cert == ca.cert  # the second `up` uses the same CA: peers of the last run still verify


def test_issued_certificate_sans_lifetime_and_signature(tmp_path):
    ca = ensure_ca(tmp_path, "m")
    issued = ca.issue("spiffe://m/pod/b", dns=("localhost", "b"), ips=("127.0.3.1", "127.0.0.1"),
                      lifetime=dt.timedelta(minutes=10))
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://m/pod/b"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "b"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.3.1"),
                                                       ipaddress.ip_address("127.0.0.1")]
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(minutes=10) <= life <= dt.timedelta(minutes=11.1)  # backdated a minute for clock skew
    cert.verify_directly_issued_by(ca.cert)
    assert describe_cert(issued.cert_pem)["identity"] == "spiffe://m/pod/b"


def test_user_ca_is_used_where_it_is(tmp_path):
    user = MeshCA.create("corp")
    cert, key = write_ca(tmp_path, user)
    d = tmp_path / "state" / "identity"
    ca = ensure_ca(d, "m", (cert, key))
    assert ca.cert == user.cert
    assert not d.exists()  # nothing copied, the key least of all


def test_wrong_key_and_corrupt_key_are_one_line_errors(tmp_path):
    cert, _ = write_ca(tmp_path, MeshCA.create("one"), "one")
    _, other_key = write_ca(tmp_path, MeshCA.create("two"), "two")
    with pytest.raises(CAError) as err:
        ensure_ca(tmp_path / "x", "m", (cert, other_key))
    assert str(err.value) == f"{other_key} is not the key of {cert}"
    corrupt = tmp_path / "corrupt.pem"
    corrupt.write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    with pytest.raises(CAError) as err:
        ensure_ca(tmp_path / "x", "m", (cert, corrupt))
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{corrupt} is not an unencrypted PEM")


def test_ca_key_that_cannot_be_read_is_one_line(tmp_path):
    """The read error path as root too (root reads any file, but not a directory where the key should be)."""
    d = tmp_path / "identity"
    ensure_ca(d, "m")
    (d / "ca-key.pem").unlink()
    (d / "ca-key.pem").mkdir()
    with pytest.raises(CAError, match=r"^cannot read the CA key .*ca-key.pem: Is a directory$"):
        ensure_ca(d, "m")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file: an unreadable key needs a normal user")
def test_unreadable_ca_key(tmp_path):
    d = tmp_path / "identity"
    ensure_ca(d, "m")
    (d / "ca-key.pem").chmod(0)
    with pytest.raises(CAError, match=r"^cannot read the CA key .*: Permission denied$"):
        ensure_ca(d, "m")


def test_issuer_generations_and_atomic_current(tmp_path):
    plan = make_plan(tmp_path, "identity: {cert_ttl: 2m}").identity
    ca = ensure_ca(plan.dir, "ca")
    issuer = Issuer(plan, ca)
    ident = plan.replicas["b-0"]
    first = issuer.issue("b-0")
    current = ident.dir / "current"
    assert os.readlink(current) == "gen-1" and first.generation == 1 and first.rotations == 0
    key = Path(ident.identity.key)
    assert key.resolve() == ident.dir / "gen-1" / "key.pem" and mode(key) == 0o600 and mode(key.parent) == 0o700
    assert describe_cert(Path(ident.identity.cert).read_bytes())["serial"] == format(first.serial, "x")
    lifetime = first.not_after - first.issued_at
    assert abs((issuer.rotate_at("b-0") - first.issued_at) - lifetime * 2 / 3) < dt.timedelta(seconds=1)
    second = issuer.issue("b-0")
    third = issuer.issue("b-0")
    assert (second.rotations, third.rotations, third.generation) == (1, 2, 3)
    assert second.serial != first.serial != third.serial
    # The previous generation stays (a sidecar may still read it); older ones go.
    assert generations(ident.dir) == [2, 3] and os.readlink(current) == "gen-3"
    assert not [p for p in ident.dir.iterdir() if p.name.startswith(".")]  # no temp symlink left
    # A new supervisor continues the numbering: `current` may still point at the last run's generation.
    again = Issuer(plan, ca).issue("b-0")
    assert again.generation == 4 and generations(ident.dir) == [3, 4]


def test_up_reports_an_unusable_ca_in_one_line(tmp_path):
    cert, _ = write_ca(tmp_path, MeshCA.create("corp"))
    bad = tmp_path / "bad-key.pem"
    bad.write_text("garbage\n")
    plan = make_plan(tmp_path, f"identity: {{ca: {{cert: {cert}, key: {bad}}}}}")
    with pytest.raises(MeshError) as err:
        ensure_mesh_ca(plan)
    assert err.value.code == 1 and "\n" not in str(err.value)
    assert str(err.value).startswith(f"mesh 'ca': {bad} is not an unencrypted PEM private key")


def test_up_cli_exits_1_on_a_corrupt_ca_key(meshctl, tmp_path):
    cert, _ = write_ca(meshctl.workdir, MeshCA.create("corp"))
    bad = meshctl.workdir / "bad-key.pem"
    bad.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())[:60])
    path = meshctl.write("t.yaml", TOPOLOGY.format(identity=f"identity: {{ca: {{cert: {cert}, key: {bad}}}}}"))
    out = meshctl("up", str(path), "-d", "-p", "cabad", check=False)
    assert out.returncode == 1, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"meshctl: mesh 'cabad': {bad} is not an unencrypted PEM"), out
    assert not (meshctl.home / "cabad" / "control.sock").exists()


def test_rotation_timers_are_due_at_two_thirds_of_the_lifetime(tmp_path):
    import asyncio

    from meshctl.identity.rotation import Rotation

    plan = make_plan(tmp_path, "identity: {cert_ttl: 90s}").identity
    events: list[tuple[str, bool]] = []

    async def scenario() -> tuple[float, int, int]:
        loop = asyncio.get_running_loop()
        rotation = Rotation(Issuer(plan, ensure_ca(plan.dir, "ca")), lambda text, error: events.append((text, error)))
        rotation.start()
        due = rotation._timers["b-0"].when() - loop.time()
        forced = rotation.rotate("b-0")
        rotation.stop()
        return due, forced.rotations, len(rotation._timers)

    due, rotations, timers = asyncio.run(scenario())
    assert 59 <= due <= 60.1 and rotations == 1 and timers == 0
    assert events and events[0][0].startswith("b-0 certificate rotated: serial ") and not events[0][1]
