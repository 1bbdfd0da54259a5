"""The libp2p TLS handshake's certificate (libp2p specs, tls/tls.md; DESIGN §9), sans-I/O: make
ours, and check a peer's chain down to the peer id it proves.

A libp2p certificate is self-signed by a throwaway key; the host key vouches for that key in
extension 1.3.6.1.4.1.53594.1.1, a DER ``SignedKey ::= SEQUENCE { publicKey OCTET STRING,
signature OCTET STRING }`` whose signature covers ``"libp2p-tls-handshake:"`` followed by the
certificate's SubjectPublicKeyInfo. X.509 goes through cryptography; the two small ASN.1 pieces
it has no API for (SignedKey, and the raw SubjectPublicKeyInfo with its curve parameters) go
through pyasn1, strictly: what is decoded must re-encode to the same DER.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import namedtype, univ

from actors.errors import IdentityError, InvalidArgumentError, PeerCertificateError
from supervisor.libp2p.keys import RSA_MAX_BITS, RSA_MIN_BITS, Identity, PublicKey
from supervisor.libp2p.peer_id import PeerId

__all__ = [
    "CERTIFICATE_VALIDITY",
    "CLOCK_SKEW",
    "EXTENSION_CRITICAL",
    "LIBP2P_EXTENSION_OID",
    "SIGNING_PREFIX",
    "make_certificate",
    "verify_certificate_chain",
]

LIBP2P_EXTENSION_OID = x509.ObjectIdentifier("1.3.6.1.4.1.53594.1.1")
SIGNING_PREFIX = b"libp2p-tls-handshake:"
#: NotBefore is backdated this much, so a peer whose clock is behind ours accepts the certificate.
CLOCK_SKEW = datetime.timedelta(hours=1)
#: NotAfter is this far ahead (go-libp2p and py-libp2p use 100 years too). Expiry protects
#: nothing here: the certificate's key is fresh and vouched for by the host key's signature, not
#: by a CA, so a short lifetime would only make long-running listeners present expired
#: certificates and turn clock errors into failed handshakes.
CERTIFICATE_VALIDITY = datetime.timedelta(days=100 * 365)
#: The spec lets the extension be critical; rust-libp2p marks it so and go-libp2p, py-libp2p and
#: rust-libp2p all accept it either way. Critical tells any other verifier that a certificate
#: without the libp2p check applied must not be trusted.
EXTENSION_CRITICAL = True

#: Certificate keys on curves TLS 1.3 has signature schemes for (RFC 8446 section 4.2.3).
_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
_DER_OID_TAG = 0x06


class _SignedKey(univ.Sequence):
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("publicKey", univ.OctetString()),
        namedtype.NamedType("signature", univ.OctetString()),
    )


def make_certificate(
    identity: Identity, *, now: datetime.datetime | None = None
) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) for the libp2p TLS handshake: a fresh P-256 key,
    self-signed with ECDSA-SHA256, carrying the SignedKey of ``identity``."""
    now = _aware(now)
    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signed_key = _SignedKey()
    signed_key["publicKey"] = identity.public_key.to_protobuf()
    signed_key["signature"] = identity.sign(SIGNING_PREFIX + spki)
    # RFC 5280 wants a non-empty issuer; a random serialNumber attribute is what go-libp2p uses.
    name = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, str(x509.random_serial_number()))])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CERTIFICATE_VALIDITY)
        .add_extension(
            x509.UnrecognizedExtension(LIBP2P_EXTENSION_OID, der_encoder.encode(signed_key)),
            critical=EXTENSION_CRITICAL,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def verify_certificate_chain(
    chain: Sequence[bytes], *, now: datetime.datetime | None = None
) -> PeerId:
    """The peer id a peer's certificate chain (DER, as TLS delivers it) proves, after every MUST
    of the libp2p TLS spec, the curve and hash rules of DESIGN §9 and go-libp2p's RSA sizes;
    ``PeerCertificateError`` naming the first rule broken otherwise."""
    now = _aware(now)
    if len(chain) != 1:
        raise PeerCertificateError(
            "one-certificate",
            f"it sent {len(chain)} certificates; the libp2p handshake allows exactly one, "
            "self-signed",
        )
    try:
        cert = x509.load_der_x509_certificate(bytes(chain[0]))
        extensions = cert.extensions
    except (ValueError, x509.DuplicateExtension) as exc:
        raise PeerCertificateError(
            "malformed-certificate", f"it is not a DER X.509 certificate ({exc})"
        ) from None
    _check_validity(cert, now)
    _check_certificate_key(cert)
    _check_signature(cert)
    signed = None
    for ext in extensions:
        if ext.oid == LIBP2P_EXTENSION_OID:
            signed = ext.value
        elif ext.critical:
            raise PeerCertificateError(
                "unknown-critical-extension",
                f"it has critical extension {ext.oid.dotted_string}, which libp2p peers do not "
                "understand and so must refuse",
            )
    if not isinstance(signed, x509.UnrecognizedExtension):
        raise PeerCertificateError(
            "missing-signed-key",
            f"it lacks the libp2p public key extension {LIBP2P_EXTENSION_OID.dotted_string}: "
            "the peer is not speaking the libp2p TLS handshake",
        )
    host_key, signature = _decode_signed_key(signed.value)
    spki = _raw_spki(cert)
    if not host_key.verify(signature, SIGNING_PREFIX + spki):
        raise PeerCertificateError(
            "bad-signed-key-signature",
            f"the host key ({host_key.key_type}) did not sign this certificate's key, so the "
            "certificate does not prove the peer holds that host key",
        )
    return PeerId.from_public_key(host_key)


def _aware(now: datetime.datetime | None) -> datetime.datetime:
    if now is None:
        return datetime.datetime.now(datetime.UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        raise InvalidArgumentError(
            "now", now, "give a timezone-aware datetime, e.g. datetime.now(datetime.UTC)"
        )
    return now


def _check_validity(cert: x509.Certificate, now: datetime.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise PeerCertificateError(
            "not-yet-valid",
            f"it is valid only from {cert.not_valid_before_utc.isoformat()} (now "
            f"{now.isoformat()}): check this host's clock and the peer's",
        )
    if now > cert.not_valid_after_utc:
        raise PeerCertificateError(
            "expired",
            f"it expired at {cert.not_valid_after_utc.isoformat()} (now {now.isoformat()}): "
            "check this host's clock and the peer's",
        )


def _der_elements(der: bytes) -> list[bytes]:
    """The DER encodings of the elements of the SEQUENCE ``der``."""
    elements, rest = der_decoder.decode(der, asn1Spec=univ.SequenceOf(componentType=univ.Any()))
    if rest:
        raise PyAsn1Error("trailing bytes after the SEQUENCE")
    return [bytes(e) for e in elements]


def _raw_spki(cert: x509.Certificate) -> bytes:
    """The SubjectPublicKeyInfo exactly as the certificate carries it (what the peer signed)."""
    tbs = _der_elements(cert.tbs_certificate_bytes)
    has_version = tbs[0][:1] == b"\xa0"  # [0] EXPLICIT version, absent for v1 certificates
    return tbs[6 if has_version else 5]


def _check_certificate_key(cert: x509.Certificate) -> None:
    """The certificate's own key: a named curve (never explicit parameters, the "whose curve
    is it anyway" attack), Ed25519, or RSA of 2048..8192 bits."""
    if cert.public_key_algorithm_oid.dotted_string == _EC_PUBLIC_KEY:
        try:
            algorithm = _der_elements(_der_elements(_raw_spki(cert))[0])
        except (PyAsn1Error, IndexError):
            raise PeerCertificateError(
                "malformed-certificate", "its SubjectPublicKeyInfo is not valid DER"
            ) from None
        if len(algorithm) != 2 or algorithm[1][:1] != bytes([_DER_OID_TAG]):
            raise PeerCertificateError(
                "explicit-curve",
                "its EC key gives explicit curve parameters instead of a named curve; the "
                "libp2p TLS spec requires the NamedCurve encoding",
            )
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PeerCertificateError(
            "unsupported-certificate-key", f"its public key cannot be used ({exc})"
        ) from None
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, _CURVES):
        return
    if isinstance(key, ed25519.Ed25519PublicKey):
        return
    if isinstance(key, rsa.RSAPublicKey):
        _check_rsa_size("certificate", key.key_size)
        return
    what = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
    raise PeerCertificateError(
        "unsupported-certificate-key",
        f"its key is {what}; libp2p peers sign certificates with ECDSA on P-256, P-384 or "
        "P-521, Ed25519 or RSA",
    )


def _check_rsa_size(which: str, bits: int) -> None:
    if not RSA_MIN_BITS <= bits <= RSA_MAX_BITS:
        raise PeerCertificateError(
            "rsa-key-size",
            f"its {which} RSA key has {bits} bits; libp2p accepts {RSA_MIN_BITS} to "
            f"{RSA_MAX_BITS} bits (as go-libp2p does)",
        )


def _check_signature(cert: x509.Certificate) -> None:
    """No hash below 256 bits, then a valid self-signature."""
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        raise PeerCertificateError(
            "weak-hash",
            f"it is signed with algorithm {cert.signature_algorithm_oid.dotted_string}, which "
            "is not one with a hash of at least 256 bits",
        ) from None
    if algorithm is not None and algorithm.digest_size * 8 < 256:
        raise PeerCertificateError(
            "weak-hash",
            f"it is signed with {algorithm.name.upper()}, a {algorithm.digest_size * 8}-bit "
            "hash; hashes below 256 bits (MD5, SHA-1, SHA-224) are refused",
        )
    try:
        cert.verify_directly_issued_by(cert)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        why = "" if isinstance(exc, InvalidSignature) else f" ({exc})"
        raise PeerCertificateError(
            "not-self-signed",
            f"its signature does not verify with its own key{why}; the libp2p handshake "
            "requires a self-signed certificate",
        ) from None


def _decode_signed_key(value: bytes) -> tuple[PublicKey, bytes]:
    """(host key, signature) of the extension's SignedKey."""
    try:
        signed, rest = der_decoder.decode(value, asn1Spec=_SignedKey())
        if rest or der_encoder.encode(signed) != value:
            raise PyAsn1Error("not DER, or trailing bytes")
        public_key = bytes(signed["publicKey"])
        signature = bytes(signed["signature"])
    except PyAsn1Error:
        raise PeerCertificateError(
            "malformed-signed-key",
            "its libp2p extension is not a DER SignedKey SEQUENCE { publicKey OCTET STRING, "
            "signature OCTET STRING }",
        ) from None
    try:
        host_key = PublicKey.from_protobuf(public_key, check_rsa_size=False)
    except IdentityError as exc:
        raise PeerCertificateError(
            "bad-host-key", f"the host key in its libp2p extension is unusable: {exc.reason}"
        ) from None
    crypto_key = host_key.crypto_key
    if isinstance(crypto_key, rsa.RSAPublicKey):
        _check_rsa_size("host", crypto_key.key_size)
    return host_key, signature
