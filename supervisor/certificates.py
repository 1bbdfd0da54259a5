"""A self-signed "localhost" certificate for development servers (``serve``, the demo, a Ray
agent's ``listen`` without files): one builder, so every one of them is what clients expect."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
from pathlib import Path

__all__ = ["self_signed_cert"]


def self_signed_cert(directory: str | Path, *, valid_days: int = 7) -> tuple[Path, Path]:
    """Write a self-signed "localhost" certificate (SAN localhost, 127.0.0.1, ::1) and its key.

    EC P-256: the one key type aioquic and ngtcp2/GnuTLS both take without configuration.
    Returns ``(certfile, keyfile)``; the certificate doubles as its own CA file for clients.
    The key file is created with mode 0600 (never readable by others, not even for a moment).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with contextlib.suppress(FileNotFoundError):
        keyfile.chmod(0o600)  # an old key file: never widen, tighten before writing
    fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    keyfile.chmod(0o600)
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return certfile, keyfile
