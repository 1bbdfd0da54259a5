"""One identity's TLS side (DESIGN §9): the certificate it presents, and the check of the
certificate a peer presents, put into aioquic configurations.

The certificate carries a fresh P-256 key signed over by the identity; it is made once per
Supervisor and renewed a day before it expires, so a long-lived supervisor never presents an
expired one. The peer's certificate is not checked by aioquic (no CA: ``CERT_NONE``; aioquic
still checks the handshake's CertificateVerify with the certificate's key) but by
`verify_certificate_chain`, every rule of the libp2p TLS spec, before a connection is handed out.
"""

from __future__ import annotations

import datetime
import ssl
import threading
from collections.abc import Sequence

from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from actors.errors import InvalidAddressError, PeerCertificateError, PeerIdMismatchError
from supervisor.libp2p.keys import Identity
from supervisor.libp2p.peer_id import PeerId
from supervisor.libp2p.tls import make_certificate, verify_certificate_chain

__all__ = ["ALPN", "Credentials", "parse_peer_id", "verified_peer"]

#: The ALPN of libp2p over QUIC (the libp2p QUIC and TLS specs).
ALPN = "libp2p"

#: Renew the certificate this long before it expires.
RENEW_BEFORE = datetime.timedelta(days=1)


class Credentials:
    """An identity's certificate for TLS, and the peer check; thread-safe (Ray agents)."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.peer_id: PeerId = identity.peer_id
        self._lock = threading.Lock()
        self._certificate: x509.Certificate | None = None
        self._key: object = None

    def _current(self) -> tuple[x509.Certificate, object]:
        with self._lock:
            now = datetime.datetime.now(datetime.UTC)
            cert = self._certificate
            if cert is None or cert.not_valid_after_utc - RENEW_BEFORE <= now:
                cert_pem, key_pem = make_certificate(self.identity)
                self._certificate = x509.load_pem_x509_certificate(cert_pem)
                self._key = load_pem_private_key(key_pem, password=None)
            assert self._certificate is not None
            return self._certificate, self._key

    def _present(self, config: QuicConfiguration) -> None:
        cert, key = self._current()
        config.certificate = cert
        config.private_key = key
        config.alpn_protocols = [ALPN]
        # Checked by verify(), not against a CA: a libp2p certificate is self-signed.
        config.verify_mode = ssl.CERT_NONE

    def client_configuration(self, config: QuicConfiguration) -> None:
        """Make a dial's configuration libp2p's: ALPN ``libp2p``, no SNI, our certificate."""
        self._present(config)
        config.server_name = None

    def server_configuration(self, config: QuicConfiguration) -> None:
        """Make a listener's configuration libp2p's (the client's certificate is asked for
        per connection: ``actors.tls_peer.ask_client_certificate``)."""
        self._present(config)

    @staticmethod
    def verify(chain: Sequence[bytes]) -> PeerId:
        """The peer id the peer's certificate chain proves (``PeerCertificateError`` if it
        breaks a rule of the spec)."""
        return verify_certificate_chain(chain)


def parse_peer_id(text: str, addr: str) -> PeerId:
    """The ``/p2p/`` component of a dial address, or an error naming the whole address."""
    try:
        return PeerId.parse(text)
    except InvalidAddressError as exc:
        raise InvalidAddressError(
            addr, f"its /p2p/ peer id is not valid: {exc.reason}", what="remote address"
        ) from None


def verified_peer(credentials: Credentials, chain: object, expected: PeerId, addr: str) -> PeerId:
    """The peer id a dialled peer's certificates prove, which must be the one dialled."""
    certificates = tuple(chain) if isinstance(chain, tuple | list) else ()
    try:
        actual = credentials.verify(certificates)
    except PeerCertificateError as exc:
        raise PeerCertificateError(exc.rule, exc.reason, addr=addr) from None
    if actual != expected:
        raise PeerIdMismatchError(str(expected), str(actual), addr=addr)
    return actual
