"""A self-signed TLS certificate for https://localhost, created at first start and reused afterwards.

pyOpenSSL's own key and certificate builders are deprecated in favour of `cryptography` (the library
pyOpenSSL is built on), so the certificate is built with `cryptography.x509`; pyOpenSSL checks a stored
certificate on later starts (readable, not expired) before it is reused.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto

CERT_FILE = "server.crt"
KEY_FILE = "server.key"


def subject_alt_names() -> list[x509.GeneralName]:
    """localhost, 127.0.0.1 and this machine's host name."""
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    host = socket.gethostname()
    if host and host != "localhost":
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def create_self_signed(cert_path: Path, key_path: Path, days: int = 825) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(subject_alt_names()), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _usable(cert_path: Path, key_path: Path) -> bool:
    if not (cert_path.is_file() and key_path.is_file()):
        return False
    try:
        cert = crypto.load_certificate(crypto.FILETYPE_PEM, cert_path.read_bytes())
    except crypto.Error:
        return False
    return not cert.has_expired()


def ensure_certificate(certs_dir: Path) -> tuple[Path, Path]:
    """The certificate and key in `certs_dir`: reused when valid, created otherwise."""
    cert_path, key_path = certs_dir / CERT_FILE, certs_dir / KEY_FILE
    if not _usable(cert_path, key_path):
        create_self_signed(cert_path, key_path)
    return cert_path, key_path


def server_ssl_context(certs_dir: Path) -> ssl.SSLContext:
    cert_path, key_path = ensure_certificate(certs_dir)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context
