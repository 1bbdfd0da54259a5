"""Self-signed test certificate for "localhost", made with `cryptography` (an aioquic dependency).

One EC P-256 key and certificate serve every peer in the rig (aioquic, gtlsserver): P-256 is the one
key type both TLS stacks accept without extra configuration. The SAN carries DNS:localhost,
IP:127.0.0.1 and IP:::1 plus any extra IPs (namespace addresses), so a client may verify either by
name or by address.
"""

from __future__ import annotations

import datetime
import ipaddress
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["CertPair", "generate_cert", "session_cert"]


@dataclass(frozen=True)
class CertPair:
    """Paths of a PEM certificate and key, and the certificate's PEM text (for `cadata`)."""

    certfile: Path
    keyfile: Path
    cert_pem: bytes

    def __iter__(self) -> Iterator[Path]:
        """Unpack as `(certfile, keyfile)`."""
        return iter((self.certfile, self.keyfile))


def generate_cert(
    directory: Path | str,
    *,
    common_name: str = "localhost",
    extra_ips: Iterable[str] = (),
    extra_dns: Iterable[str] = (),
    days: int = 7,
) -> CertPair:
    """Write `cert.pem` and `key.pem` (unencrypted PKCS#8) into `directory` and return them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ips = ["127.0.0.1", "::1", *extra_ips]
    dns = ["localhost", *extra_dns]
    san = [x509.DNSName(d) for d in dict.fromkeys(dns)] + [
        x509.IPAddress(ipaddress.ip_address(ip)) for ip in dict.fromkeys(ips)
    ]
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    certfile = directory / "cert.pem"
    keyfile = directory / "key.pem"
    certfile.write_bytes(cert_pem)
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    keyfile.chmod(0o600)
    return CertPair(certfile=certfile, keyfile=keyfile, cert_pem=cert_pem)


_session_cache: dict[tuple[str, ...], tuple[tempfile.TemporaryDirectory[str], CertPair]] = {}


def session_cert(extra_ips: Iterable[str] = ()) -> CertPair:
    """Return a process-wide cached pair for `extra_ips` (generated once; removed at exit).

    For callers without pytest's tmp_path_factory; the `rig_cert` fixture uses a pytest tmp dir.
    """
    key = tuple(sorted(extra_ips))
    if key not in _session_cache:
        tmp = tempfile.TemporaryDirectory(prefix="qs-cert-")
        _session_cache[key] = (tmp, generate_cert(tmp.name, extra_ips=key))
    return _session_cache[key][1]
