"""The libp2p TLS certificate: the spec's vectors verbatim, our certificates round-tripping for
every key type, and one certificate per rule carrying exactly that defect, rejected by name.

Vectors: ``libp2p/specs`` tls/tls.md (commit 7740c07), "Test vectors" 1-4. Their validity runs
from 1975-01-01 to 4096-01-01, so they are checked at a fixed ``now`` inside that window.

Defective certificates come from ``build`` below: cryptography's X.509 builder plus a few lines
of DER written here (not the library's encoder), so each test changes one thing and the rest
stays valid.
"""

from __future__ import annotations

import datetime
import pickle
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.errors import (
    HandshakeError,
    InvalidArgumentError,
    MigrationError,
    PeerCertificateError,
    PeerIdMismatchError,
)
from supervisor.libp2p.keys import Identity, KeyType, PublicKey
from supervisor.libp2p.peer_id import PeerId
from supervisor.libp2p.tls import (
    CERTIFICATE_VALIDITY,
    CLOCK_SKEW,
    LIBP2P_EXTENSION_OID,
    make_certificate,
    verify_certificate_chain,
)

UTC = datetime.UTC
NOW = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=UTC)

# -- the spec's vectors, verbatim ------------------------------------------------------------------

ED25519_CERT = "308201ae30820156a0030201020204499602d2300a06082a8648ce3d040302302031123010060355040a13096c69627032702e696f310a300806035504051301313020170d3735303130313133303030305a180f34303936303130313133303030305a302031123010060355040a13096c69627032702e696f310a300806035504051301313059301306072a8648ce3d020106082a8648ce3d030107034200040c901d423c831ca85e27c73c263ba132721bb9d7a84c4f0380b2a6756fd601331c8870234dec878504c174144fa4b14b66a651691606d8173e55bd37e381569ea37c307a3078060a2b0601040183a25a0101046a3068042408011220a77f1d92fedb59dddaea5a1c4abd1ac2fbde7d7b879ed364501809923d7c11b90440d90d2769db992d5e6195dbb08e706b6651e024fda6cfb8846694a435519941cac215a8207792e42849cccc6cd8136c6e4bde92a58c5e08cfd4206eb5fe0bf909300a06082a8648ce3d0403020346003043021f50f6b6c52711a881778718238f650c9fb48943ae6ee6d28427dc6071ae55e702203625f116a7a454db9c56986c82a25682f7248ea1cb764d322ea983ed36a31b77"  # noqa: E501
ED25519_PEER = "12D3KooWM6CgA9iBFZmcYAHA6A2qvbAxqfkmrYiRQuz3XEsk4Ksv"
ECDSA_CERT = "308201f63082019da0030201020204499602d2300a06082a8648ce3d040302302031123010060355040a13096c69627032702e696f310a300806035504051301313020170d3735303130313133303030305a180f34303936303130313133303030305a302031123010060355040a13096c69627032702e696f310a300806035504051301313059301306072a8648ce3d020106082a8648ce3d030107034200040c901d423c831ca85e27c73c263ba132721bb9d7a84c4f0380b2a6756fd601331c8870234dec878504c174144fa4b14b66a651691606d8173e55bd37e381569ea381c23081bf3081bc060a2b0601040183a25a01010481ad3081aa045f0803125b3059301306072a8648ce3d020106082a8648ce3d03010703420004bf30511f909414ebdd3242178fd290f093a551cf75c973155de0bb5a96fedf6cb5d52da7563e794b512f66e60c7f55ba8a3acf3dd72a801980d205e8a1ad29f2044730450220064ea8124774caf8f50e57f436aa62350ce652418c019df5d98a3ac666c9386a022100aa59d704a931b5f72fb9222cb6cc51f954d04a4e2e5450f8805fe8918f71eaae300a06082a8648ce3d04030203470030440220799395b0b6c1e940a7e4484705f610ab51ed376f19ff9d7c16757cfbf61b8d4302206205c03fbb0f95205c779be86581d3e31c01871ad5d1f3435bcf375cb0e5088a"  # noqa: E501
ECDSA_PEER = "QmfXbAwNjJLXfesgztEHe8HwgVDCMMpZ9Eax1HYq6hn9uE"
SECP256K1_CERT = "308201ba3082015fa0030201020204499602d2300a06082a8648ce3d040302302031123010060355040a13096c69627032702e696f310a300806035504051301313020170d3735303130313133303030305a180f34303936303130313133303030305a302031123010060355040a13096c69627032702e696f310a300806035504051301313059301306072a8648ce3d020106082a8648ce3d030107034200040c901d423c831ca85e27c73c263ba132721bb9d7a84c4f0380b2a6756fd601331c8870234dec878504c174144fa4b14b66a651691606d8173e55bd37e381569ea38184308181307f060a2b0601040183a25a01010471306f0425080212210206dc6968726765b820f050263ececf7f71e4955892776c0970542efd689d2382044630440220145e15a991961f0d08cd15425bb95ec93f6ffa03c5a385eedc34ecf464c7a8ab022026b3109b8a3f40ef833169777eb2aa337cfb6282f188de0666d1bcec2a4690dd300a06082a8648ce3d0403020349003046022100e1a217eeef9ec9204b3f774a08b70849646b6a1e6b8b27f93dc00ed58545d9fe022100b00dafa549d0f03547878338c7b15e7502888f6d45db387e5ae6b5d46899cef0"  # noqa: E501
SECP256K1_PEER = "16Uiu2HAkutTMoTzDw1tCvSRtu6YoixJwS46S1ZFxW8hSx9fWHiPs"
#: Vector 4: the host key's signature does not cover this certificate's key.
INVALID_CERT = "308201f73082019da0030201020204499602d2300a06082a8648ce3d040302302031123010060355040a13096c69627032702e696f310a300806035504051301313020170d3735303130313133303030305a180f34303936303130313133303030305a302031123010060355040a13096c69627032702e696f310a300806035504051301313059301306072a8648ce3d020106082a8648ce3d030107034200040c901d423c831ca85e27c73c263ba132721bb9d7a84c4f0380b2a6756fd601331c8870234dec878504c174144fa4b14b66a651691606d8173e55bd37e381569ea381c23081bf3081bc060a2b0601040183a25a01010481ad3081aa045f0803125b3059301306072a8648ce3d020106082a8648ce3d03010703420004bf30511f909414ebdd3242178fd290f093a551cf75c973155de0bb5a96fedf6cb5d52da7563e794b512f66e60c7f55ba8a3acf3dd72a801980d205e8a1ad29f204473045022100bb6e03577b7cc7a3cd1558df0da2b117dfdcc0399bc2504ebe7de6f65cade72802206de96e2a5be9b6202adba24ee0362e490641ac45c240db71fe955f2c5cf8df6e300a06082a8648ce3d0403020348003045022100e847f267f43717358f850355bdcabbefb2cfbf8a3c043b203a14788a092fe8db022027c1d04a2d41fd6b57a7e8b3989e470325de4406e52e084e34a3fd56eef0d0df"  # noqa: E501


@pytest.mark.parametrize(
    ("cert", "peer", "key_type"),
    [
        (ED25519_CERT, ED25519_PEER, KeyType.ED25519),
        (ECDSA_CERT, ECDSA_PEER, KeyType.ECDSA),
        (SECP256K1_CERT, SECP256K1_PEER, KeyType.SECP256K1),
    ],
    ids=["ed25519", "ecdsa", "secp256k1"],
)
def test_spec_valid_vectors_prove_their_peer_ids(cert: str, peer: str, key_type: KeyType) -> None:
    peer_id = verify_certificate_chain([bytes.fromhex(cert)], now=NOW)
    assert str(peer_id) == peer
    assert peer_id == PeerId.parse(peer)
    if peer_id.public_key is not None:
        assert peer_id.public_key.key_type is key_type


def test_spec_invalid_vector_is_rejected_for_its_signature() -> None:
    with pytest.raises(PeerCertificateError) as info:
        verify_certificate_chain([bytes.fromhex(INVALID_CERT)], now=NOW)
    assert info.value.rule == "bad-signed-key-signature"


def test_spec_vectors_are_rejected_outside_their_fixed_validity() -> None:
    before = datetime.datetime(1970, 1, 1, tzinfo=UTC)
    with pytest.raises(PeerCertificateError) as info:
        verify_certificate_chain([bytes.fromhex(ED25519_CERT)], now=before)
    assert info.value.rule == "not-yet-valid"


# -- a builder with knobs --------------------------------------------------------------------------


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(raw)]) + raw + content


def _der_int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _elements(seq: bytes) -> list[bytes]:
    """The TLVs inside the DER SEQUENCE ``seq``."""
    assert seq[0] == 0x30
    pos, length = 2, seq[1]
    if length & 0x80:
        size = length & 0x7F
        length, pos = int.from_bytes(seq[2 : 2 + size], "big"), 2 + size
    body, out = seq[pos : pos + length], []
    i = 0
    while i < len(body):
        start, n = i, body[i + 1]
        i += 2
        if n & 0x80:
            size = n & 0x7F
            n, i = int.from_bytes(body[i : i + size], "big"), i + size
        i += n
        out.append(body[start:i])
    return out


def signed_key(public_key: bytes, signature: bytes) -> bytes:
    """SignedKey ::= SEQUENCE { publicKey OCTET STRING, signature OCTET STRING }."""
    return _der(0x30, _der(0x04, public_key) + _der(0x04, signature))


def _spki(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | dsa.DSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _p256_explicit_spki(named_spki: bytes) -> bytes:
    """The same P-256 point with the curve spelt out (SEC 1 ECParameters), not named."""
    p = 2**256 - 2**224 + 2**192 + 2**96 - 1
    gx = 0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296
    gy = 0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5
    b = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    prime_field = bytes.fromhex("06072a8648ce3d0101")
    params = _der(
        0x30,
        _der_int(1)
        + _der(0x30, prime_field + _der_int(p))
        + _der(0x30, _der(0x04, (p - 3).to_bytes(32, "big")) + _der(0x04, b.to_bytes(32, "big")))
        + _der(0x04, b"\x04" + gx.to_bytes(32, "big") + gy.to_bytes(32, "big"))
        + _der_int(n)
        + _der_int(1),
    )
    ec_public_key = bytes.fromhex("06072a8648ce3d0201")
    point = _elements(named_spki)[1]
    return _der(0x30, _der(0x30, ec_public_key + params) + point)


Signer = Callable[[bytes], bytes]


def build(
    *,
    host: Identity | None = None,
    host_public: bytes | None = None,
    host_sign: Signer | None = None,
    cert_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | dsa.DSAPrivateKey | None = None,
    signer: ec.EllipticCurvePrivateKey | None = None,
    hash_alg: hashes.SHA224 | hashes.SHA256 | None = None,
    not_before: datetime.datetime = NOW - CLOCK_SKEW,
    not_after: datetime.datetime = NOW + datetime.timedelta(days=1),
    extension: bytes | bool | None = True,
    critical: bool = True,
    extra: tuple[tuple[x509.ExtensionType, bool], ...] = (),
    explicit_curve: bool = False,
    sign_spki: bytes | None = None,
) -> bytes:
    """A DER certificate that is valid for libp2p at NOW unless a knob says otherwise.

    ``extension``: True = the correct SignedKey, bytes = that extension value, None = no
    extension. ``sign_spki``: what the host key signs instead of the certificate's key.
    """
    host = host or Identity.generate()
    key = cert_key or ec.generate_private_key(ec.SECP256R1())
    spki = _spki(key)
    if explicit_curve:
        spki = _p256_explicit_spki(spki)
    sign = host_sign or host.sign
    value = (
        signed_key(
            host_public or host.public_key.to_protobuf(),
            sign(b"libp2p-tls-handshake:" + (sign_spki or spki)),
        )
        if extension is True
        else extension
    )
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.SERIAL_NUMBER, "1")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if isinstance(value, bytes):
        builder = builder.add_extension(
            x509.UnrecognizedExtension(LIBP2P_EXTENSION_OID, value), critical=critical
        )
    for ext, is_critical in extra:
        builder = builder.add_extension(ext, critical=is_critical)
    signing_key = signer or key
    cert = builder.sign(signing_key, hash_alg or hashes.SHA256())
    der = cert.public_bytes(serialization.Encoding.DER)
    if not explicit_curve:
        return der
    # Splice the explicit SubjectPublicKeyInfo into the TBS and sign it again.
    assert isinstance(signing_key, ec.EllipticCurvePrivateKey)
    tbs, algorithm, _ = _elements(der)
    fields = _elements(tbs)
    tbs = _der(0x30, b"".join(fields[:6]) + spki + b"".join(fields[7:]))
    signature = signing_key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return _der(0x30, tbs + algorithm + _der(0x03, b"\x00" + signature))


def reject(chain: list[bytes], rule: str) -> PeerCertificateError:
    with pytest.raises(PeerCertificateError) as info:
        verify_certificate_chain(chain, now=NOW)
    assert info.value.rule == rule, str(info.value)
    assert repr(rule) in str(info.value)
    return info.value


def test_the_builder_makes_valid_certificates() -> None:
    """Every defect test below changes one knob of a certificate that passes."""
    host = Identity.generate()
    assert verify_certificate_chain([build(host=host)], now=NOW) == host.peer_id
    rsa_cert = build(host=host, cert_key=rsa.generate_private_key(65537, 2048))
    assert verify_certificate_chain([rsa_cert], now=NOW) == host.peer_id


# -- one defect each -------------------------------------------------------------------------------


def test_rule_one_certificate() -> None:
    cert = build()
    reject([], "one-certificate")
    err = reject([cert, cert], "one-certificate")
    assert "2 certificates" in str(err)


def test_rule_malformed_certificate() -> None:
    reject([b"\x30\x03\x02\x01\x00"], "malformed-certificate")


def test_rule_not_yet_valid() -> None:
    reject([build(not_before=NOW + datetime.timedelta(minutes=1))], "not-yet-valid")


def test_rule_expired() -> None:
    err = reject([build(not_after=NOW - datetime.timedelta(seconds=1))], "expired")
    assert "clock" in str(err)


def test_validity_bounds_are_inclusive() -> None:
    host = Identity.generate()
    assert verify_certificate_chain([build(host=host, not_before=NOW)], now=NOW) == host.peer_id
    assert verify_certificate_chain([build(host=host, not_after=NOW)], now=NOW) == host.peer_id


def test_rule_explicit_curve() -> None:
    err = reject([build(explicit_curve=True)], "explicit-curve")
    assert "named curve" in str(err)


def test_rule_unsupported_certificate_key() -> None:
    reject([build(cert_key=dsa.generate_private_key(2048))], "unsupported-certificate-key")
    reject([build(cert_key=ec.generate_private_key(ec.SECP256K1()))], "unsupported-certificate-key")


def test_rule_weak_hash() -> None:
    err = reject([build(hash_alg=hashes.SHA224())], "weak-hash")
    assert "SHA224" in str(err) and "224-bit" in str(err)


def test_rule_not_self_signed() -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    reject([build(signer=other)], "not-self-signed")


def test_rule_unknown_critical_extension() -> None:
    unknown = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
    err = reject([build(extra=((unknown, True),))], "unknown-critical-extension")
    assert "1.3.6.1.4.1.99999.1" in str(err)
    # The spec: non-critical extensions with unknown OIDs MUST be ignored.
    host = Identity.generate()
    assert verify_certificate_chain([build(host=host, extra=((unknown, False),))], now=NOW) == (
        host.peer_id
    )


def test_the_libp2p_extension_may_be_critical_or_not() -> None:
    host = Identity.generate()
    for critical in (True, False):
        cert = build(host=host, critical=critical)
        assert verify_certificate_chain([cert], now=NOW) == host.peer_id


def test_rule_missing_signed_key() -> None:
    reject([build(extension=None)], "missing-signed-key")


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"\x04\x00",  # an OCTET STRING, not a SEQUENCE
        _der(0x30, _der(0x04, b"k")),  # one field
        _der(0x30, _der(0x04, b"k") + _der(0x04, b"s") + _der(0x04, b"cookie")),  # three
        _der(0x30, _der(0x04, b"k") + _der(0x03, b"\x00s")),  # BIT STRING signature
        b"\x30\x80\x04\x01k\x04\x01s\x00\x00",  # BER indefinite length, not DER
        signed_key(b"k", b"s") + b"\x00",  # trailing byte
    ],
    ids=["empty", "octet-string", "one", "three", "bit-string", "ber", "trailing"],
)
def test_rule_malformed_signed_key(value: bytes) -> None:
    reject([build(extension=value)], "malformed-signed-key")


def test_rule_bad_host_key() -> None:
    err = reject([build(host_public=b"\x08\x09\x12\x01k")], "bad-host-key")
    assert "unknown key type 9" in str(err)


def test_rule_bad_signed_key_signature() -> None:
    other_key = _spki(ec.generate_private_key(ec.SECP256R1()))
    reject([build(sign_spki=other_key)], "bad-signed-key-signature")
    # Signed by another host key than the one the extension names.
    reject([build(host_sign=Identity.generate().sign)], "bad-signed-key-signature")


def _rsa_host(bits: int) -> tuple[bytes, Signer]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    public = PublicKey(KeyType.RSA, _spki(key)).to_protobuf()

    def sign(data: bytes) -> bytes:
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())

    return public, sign


def test_rule_rsa_key_size() -> None:
    public, sign = _rsa_host(1024)
    err = reject([build(host_public=public, host_sign=sign)], "rsa-key-size")
    assert "host RSA key has 1024 bits" in str(err)
    err = reject([build(cert_key=rsa.generate_private_key(65537, 1024))], "rsa-key-size")
    assert "certificate RSA key has 1024 bits" in str(err)
    public, sign = _rsa_host(2048)
    assert verify_certificate_chain([build(host_public=public, host_sign=sign)], now=NOW)


# -- our certificates ------------------------------------------------------------------------------


def _der_of(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("key_type", ["ed25519", "secp256k1", "rsa"])
def test_make_certificate_round_trips_to_the_identitys_peer_id(key_type: str) -> None:
    identity = Identity.generate(key_type)
    cert_pem, _ = make_certificate(identity)
    assert verify_certificate_chain([_der_of(cert_pem)]) == identity.peer_id


def test_make_certificate_follows_the_spec_and_design() -> None:
    identity = Identity.generate()
    cert_pem, key_pem = make_certificate(identity, now=NOW)
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    # A fresh P-256 key, the one the certificate carries, and nothing to do with the host key.
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    assert cert.public_key() == key.public_key()
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    cert.verify_directly_issued_by(cert)
    assert cert.not_valid_before_utc == NOW - datetime.timedelta(hours=1)
    assert cert.not_valid_after_utc == NOW + CERTIFICATE_VALIDITY
    ext = cert.extensions.get_extension_for_oid(LIBP2P_EXTENSION_OID)
    assert ext.critical
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert isinstance(ext.value, x509.UnrecognizedExtension)
    public_key, signature = _elements(ext.value.value)
    assert public_key == _der(0x04, identity.public_key.to_protobuf())
    assert signature[0] == 0x04 and signature[1] < 0x80  # OCTET STRING, short form (64 bytes)
    assert identity.public_key.verify(signature[2:], b"libp2p-tls-handshake:" + spki)
    # Valid for a peer whose clock is up to an hour behind.
    behind = NOW - datetime.timedelta(minutes=59)
    assert verify_certificate_chain([_der_of(cert_pem)], now=behind) == identity.peer_id


def test_every_certificate_has_a_fresh_key() -> None:
    identity = Identity.generate()
    first = x509.load_pem_x509_certificate(make_certificate(identity)[0])
    second = x509.load_pem_x509_certificate(make_certificate(identity)[0])
    assert first.public_key() != second.public_key()


def test_a_certificate_for_another_identity_names_that_identity() -> None:
    ours, theirs = Identity.generate(), Identity.generate("secp256k1")
    proved = verify_certificate_chain([_der_of(make_certificate(theirs)[0])])
    assert proved == theirs.peer_id and proved != ours.peer_id


def test_now_must_be_timezone_aware() -> None:
    with pytest.raises(InvalidArgumentError, match="timezone-aware"):
        verify_certificate_chain([build()], now=datetime.datetime(2026, 1, 1))
    with pytest.raises(InvalidArgumentError, match="timezone-aware"):
        make_certificate(Identity.generate(), now=datetime.datetime(2026, 1, 1))


# -- errors ----------------------------------------------------------------------------------------


def test_peer_certificate_error_is_a_handshake_error_with_a_stable_rule() -> None:
    err = PeerCertificateError("expired", "it expired", addr="/ip4/127.0.0.1/udp/1/quic-v1")
    assert isinstance(err, HandshakeError) and isinstance(err, MigrationError)
    assert (err.rule, err.reason, err.addr, err.error_code) == (
        "expired",
        "it expired",
        "/ip4/127.0.0.1/udp/1/quic-v1",
        None,
    )
    assert "/ip4/127.0.0.1/udp/1/quic-v1" in str(err) and "'expired'" in str(err)
    out = pickle.loads(pickle.dumps(err))
    assert type(out) is PeerCertificateError and out.__dict__ == err.__dict__


def test_peer_id_mismatch_error_names_both_and_the_fix() -> None:
    expected, actual = str(Identity.generate().peer_id), str(Identity.generate().peer_id)
    err = PeerIdMismatchError(expected, actual, addr="/ip4/10.0.0.1/udp/4001/quic-v1")
    assert isinstance(err, HandshakeError)
    assert (err.expected, err.actual) == (expected, actual)
    text = str(err)
    assert expected in text and actual in text and "/p2p/" in text
    assert "different node" in text and "/ip4/10.0.0.1/udp/4001/quic-v1" in text
    out = pickle.loads(pickle.dumps(err))
    assert type(out) is PeerIdMismatchError and out.__dict__ == err.__dict__


# -- hypothesis ------------------------------------------------------------------------------------


_HOST = Identity.generate()
_CERT_KEY = ec.generate_private_key(ec.SECP256R1())


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=120))
def test_random_extension_content_raises_only_peer_certificate_error(value: bytes) -> None:
    cert = build(host=_HOST, cert_key=_CERT_KEY, extension=value)
    with pytest.raises(PeerCertificateError):
        verify_certificate_chain([cert], now=NOW)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=2))
def test_random_chains_raise_only_peer_certificate_error(chain: list[bytes]) -> None:
    with pytest.raises(PeerCertificateError):
        verify_certificate_chain(chain, now=NOW)


def test_ed25519_certificate_keys_are_accepted() -> None:
    host = Identity.generate()
    cert_key = ed25519.Ed25519PrivateKey.generate()
    spki = cert_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.SERIAL_NUMBER, "1")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(cert_key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - CLOCK_SKEW)
        .not_valid_after(NOW + CLOCK_SKEW)
        .add_extension(
            x509.UnrecognizedExtension(
                LIBP2P_EXTENSION_OID,
                signed_key(
                    host.public_key.to_protobuf(), host.sign(b"libp2p-tls-handshake:" + spki)
                ),
            ),
            critical=True,
        )
        .sign(cert_key, None)
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    assert verify_certificate_chain([der], now=NOW) == host.peer_id
