"""The mesh CA: one root per mesh, and the short-lived workload certificates it signs.

Each replica's sidecar gets an X.509-SVID in the SPIFFE sense: the identity is the one URI SAN
``spiffe://<mesh>/pod/<pod>`` (trust domain = the mesh name; every replica of a pod shares the pod's
identity, as every Kubernetes pod of a service account does in Istio). The certificate also names the
pod's alias (IP SAN), ``127.0.0.1``, ``localhost`` and the pod name (DNS SANs), so a browser or
``curl --cacert`` reaching a published port that terminates TLS with ``tls: mesh`` can verify it.

Keys are ECDSA P-256: a handshake costs a fraction of RSA-2048's, on both ends.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pods.atomic_file import write_atomic
from pods.identity import CA_FILE

#: The root's lifetime when meshctl creates it; workload certificates are what rotates.
CA_LIFETIME = dt.timedelta(days=3650)
#: Certificates start this far in the past: a peer whose clock is a little behind still accepts them.
BACKDATE = dt.timedelta(minutes=1)
CA_CERT = CA_FILE
CA_KEY = "ca-key.pem"


class CAError(Exception):
    """The CA cannot be created or used (one line, for ``up`` to print and exit 1)."""


@dataclass(frozen=True)
class IssuedCert:
    cert_pem: bytes
    key_pem: bytes
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class MeshCA:
    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create(cls, mesh: str) -> MeshCA:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshctl"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"meshctl CA for mesh {mesh}")])
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - BACKDATE).not_valid_after(now + CA_LIFETIME)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(ski, critical=False)
                .sign(key, hashes.SHA256()))
        return cls(cert, key)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> MeshCA:
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except OSError as exc:
            raise CAError(f"cannot read the CA certificate {cert_path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise CAError(f"{cert_path} is not a PEM certificate: {exc}") from None
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except OSError as exc:
            raise CAError(f"cannot read the CA key {key_path}: {exc.strerror or exc}") from None
        except (ValueError, TypeError) as exc:
            raise CAError(f"{key_path} is not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | _rsa_key_type()):
            raise CAError(f"{key_path}: the CA key must be ECDSA or RSA")
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise CAError(f"{key_path} is not the key of {cert_path}")
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise CAError(f"{cert_path} is not a CA certificate (basicConstraints CA:TRUE missing)")
        return cls(cert, key)  # type: ignore[arg-type]

    def issue(self, identity: str, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (),
              lifetime: dt.timedelta = dt.timedelta(hours=24)) -> IssuedCert:
        """A workload certificate for ``identity`` (a SPIFFE URI) with a fresh P-256 key."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        not_before, not_after = now - BACKDATE, min(now + lifetime, self.cert.not_valid_after_utc)
        serial = x509.random_serial_number()
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity)]
        sans += [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        pod = identity.rsplit("/", 1)[-1]
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshctl"),
                                         x509.NameAttribute(NameOID.COMMON_NAME, pod)]))
                .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(serial)
                .not_valid_before(not_before).not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                             crl_sign=False, content_commitment=False, data_encipherment=False,
                                             key_agreement=False, encipher_only=False, decipher_only=False),
                               critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.SubjectAlternativeName(sans), critical=True)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return IssuedCert(cert.public_bytes(serialization.Encoding.PEM), key_pem, serial, not_before, not_after)


def _rsa_key_type() -> type:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.RSAPrivateKey


def ensure_ca(directory: Path, mesh: str, supplied: tuple[Path, Path] | None = None) -> MeshCA:
    """The mesh's CA: the user's (``supplied`` = cert, key), else the one in ``directory``, created at first use.

    A created key is written mode 0600 from birth; ``ca.pem`` (public) 0644. Raises CAError.
    """
    if supplied is not None:
        return MeshCA.load(*supplied)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if cert_path.exists() or key_path.exists():
        return MeshCA.load(cert_path, key_path)
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        ca = MeshCA.create(mesh)
        key_pem = ca.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
        write_atomic(key_path, key_pem.decode(), mode=0o600, durable=True)
        write_atomic(cert_path, ca.cert_pem.decode(), mode=0o644, durable=True)
    except OSError as exc:
        raise CAError(f"cannot create the mesh CA in {directory}: {exc.strerror or exc}") from None
    return ca


def describe_cert(pem: bytes) -> dict[str, Any]:
    """What ``meshctl certs`` shows of one certificate."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return {"identity": uris[0] if uris else None,
            "serial": format(cert.serial_number, "x"),
            "not_before": cert.not_valid_before_utc.isoformat(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "dns": san.get_values_for_type(x509.DNSName),
            "ips": [str(i) for i in san.get_values_for_type(x509.IPAddress)],
            "issuer": cert.issuer.rfc4514_string()}
