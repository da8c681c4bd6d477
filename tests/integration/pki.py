"""Throwaway certificates for TLS tests: a CA, a server certificate for 127.0.0.1, and
client certificates, written as `NAME.pem` / `NAME.key` (PEM, unencrypted)."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    ip: str | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ip is not None:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def make_pki(root: Path, clients: Iterable[str] = ()) -> Path:
    """Write `ca`, `server` (for IP 127.0.0.1) and one certificate per client name."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("iotmesh test CA", ca_key, "iotmesh test CA", ca_key, ca=True)
    _write(root / "ca", ca, ca_key)
    names = [("server", "127.0.0.1"), *((name, None) for name in clients)]
    for name, ip in names:
        key = ec.generate_private_key(ec.SECP256R1())
        _write(root / name, _certificate(name, key, "iotmesh test CA", ca_key, ip=ip), key)
    return root
