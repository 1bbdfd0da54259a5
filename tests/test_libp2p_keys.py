"""libp2p host keys and peer ids: the peer-ids spec's vectors verbatim, signatures per key type,
the protobuf's deterministic encoding, key files kept private, and peer id text forms.

Vectors: ``libp2p/specs`` peer-ids/peer-ids.md (commit 7740c07), the "Test vectors" table and
the three peer id examples. The spec gives no peer id for its key vectors; the RSA one below is
the id rust-libp2p's ``keypair_from_protobuf_encoding`` test expects for that same key, and the
Ed25519 pair with its id is that test's other vector. Peer ids of Ed25519, secp256k1 and ECDSA
keys are also checked against the TLS spec's vectors in ``test_libp2p_tls.py``.
"""

from __future__ import annotations

import base64
import contextlib
import os
import pickle
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.errors import IdentityError, InvalidAddressError, MigrationError
from supervisor.libp2p.keys import Identity, KeyType, PublicKey
from supervisor.libp2p.peer_id import PeerId

# -- the spec's vectors, verbatim ------------------------------------------------------------------

ECDSA_PRIVATE = "08031279307702010104203E5B1FE9712E6C314942A750BD67485DE3C1EFE85B1BFB520AE8F9AE3DFA4A4CA00A06082A8648CE3D030107A14403420004DE3D300FA36AE0E8F5D530899D83ABAB44ABF3161F162A4BC901D8E6ECDA020E8B6D5F8DA30525E71D6851510C098E5C47C646A597FB4DCEC034E9F77C409E62"  # noqa: E501
ECDSA_PUBLIC = "0803125b3059301306072a8648ce3d020106082a8648ce3d03010703420004de3d300fa36ae0e8f5d530899d83abab44abf3161f162a4bc901d8e6ecda020e8b6d5f8da30525e71d6851510c098e5c47c646a597fb4dcec034e9f77c409e62"  # noqa: E501
ED25519_PRIVATE = "080112407e0830617c4a7de83925dfb2694556b12936c477a0e1feb2e148ec9da60fee7d1ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"  # noqa: E501
ED25519_PUBLIC = "080112201ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
SECP256K1_PRIVATE = "0802122053DADF1D5A164D6B4ACDB15E24AA4C5B1D3461BDBD42ABEDB0A4404D56CED8FB"
SECP256K1_PUBLIC = "08021221037777e994e452c21604f91de093ce415f5432f701dd8cd1a7a6fea0e630bfca99"
RSA_PRIVATE = "080012ae123082092a0201000282020100e1beab071d08200bde24eef00d049449b07770ff9910257b2d7d5dda242ce8f0e2f12e1af4b32d9efd2c090f66b0f29986dbb645dae9880089704a94e5066d594162ae6ee8892e6ec70701db0a6c445c04778eb3de1293aa1a23c3825b85c6620a2bc3f82f9b0c309bc0ab3aeb1873282bebd3da03c33e76c21e9beb172fd44c9e43be32e2c99827033cf8d0f0c606f4579326c930eb4e854395ad941256542c793902185153c474bed109d6ff5141ebf9cd256cf58893a37f83729f97e7cb435ec679d2e33901d27bb35aa0d7e20561da08885ef0abbf8e2fb48d6a5487047a9ecb1ad41fa7ed84f6e3e8ecd5d98b3982d2a901b4454991766da295ab78822add5612a2df83bcee814cf50973e80d7ef38111b1bd87da2ae92438a2c8cbcc70b31ee319939a3b9c761dbc13b5c086d6b64bf7ae7dacc14622375d92a8ff9af7eb962162bbddebf90acb32adb5e4e4029f1c96019949ecfbfeffd7ac1e3fbcc6b6168c34be3d5a2e5999fcbb39bba7adbca78eab09b9bc39f7fa4b93411f4cc175e70c0a083e96bfaefb04a9580b4753c1738a6a760ae1afd851a1a4bdad231cf56e9284d832483df215a46c1c21bdf0c6cfe951c18f1ee4078c79c13d63edb6e14feaeffabc90ad317e4875fe648101b0864097e998f0ca3025ef9638cd2b0caecd3770ab54a1d9c6ca959b0f5dcbc90caeefc4135baca6fd475224269bbe1b02030100010282020100a472ffa858efd8588ce59ee264b957452f3673acdf5631d7bfd5ba0ef59779c231b0bc838a8b14cae367b6d9ef572c03c7883b0a3c652f5c24c316b1ccfd979f13d0cd7da20c7d34d9ec32dfdc81ee7292167e706d705efde5b8f3edfcba41409e642f8897357df5d320d21c43b33600a7ae4e505db957c1afbc189d73f0b5d972d9aaaeeb232ca20eebd5de6fe7f29d01470354413cc9a0af1154b7af7c1029adcd67c74b4798afeb69e09f2cb387305e73a1b5f450202d54f0ef096fe1bde340219a1194d1ac9026e90b366cce0c59b239d10e4888f52ca1780824d39ae01a6b9f4dd6059191a7f12b2a3d8db3c2868cd4e5a5862b8b625a4197d52c6ac77710116ebd3ced81c4d91ad5fdfbed68312ebce7eea45c1833ca3acf7da2052820eacf5c6b07d086dabeb893391c71417fd8a4b1829ae2cf60d1749d0e25da19530d889461c21da3492a8dc6ccac7de83ac1c2185262c7473c8cc42f547cc9864b02a8073b6aa54a037d8c0de3914784e6205e83d97918b944f11b877b12084c0dd1d36592f8a4f8b8da5bb404c3d2c079b22b6ceabfbcb637c0dbe0201f0909d533f8bf308ada47aee641a012a494d31b54c974e58b87f140258258bb82f31692659db7aa07e17a5b2a0832c24e122d3a8babcc9ee74cbb07d3058bb85b15f6f6b2674aba9fd34367be9782d444335fbed31e3c4086c652597c27104938b47fa10282010100e9fdf843c1550070ca711cb8ff28411466198f0e212511c3186623890c0071bf6561219682fe7dbdfd81176eba7c4faba21614a20721e0fcd63768e6d925688ecc90992059ac89256e0524de90bf3d8a052ce6a9f6adafa712f3107a016e20c80255c9e37d8206d1bc327e06e66eb24288da866b55904fd8b59e6b2ab31bc5eab47e597093c63fab7872102d57b4c589c66077f534a61f5f65127459a33c91f6db61fc431b1ae90be92b4149a3255291baf94304e3efb77b1107b5a3bda911359c40a53c347ff9100baf8f36dc5cd991066b5bdc28b39ed644f404afe9213f4d31c9d4e40f3a5f5e3c39bebeb244e84137544e1a1839c1c8aaebf0c78a7fad590282010100f6fa1f1e6b803742d5490b7441152f500970f46feb0b73a6e4baba2aaf3c0e245ed852fc31d86a8e46eb48e90fac409989dfee45238f97e8f1f8e83a136488c1b04b8a7fb695f37b8616307ff8a8d63e8cfa0b4fb9b9167ffaebabf111aa5a4344afbabd002ae8961c38c02da76a9149abdde93eb389eb32595c29ba30d8283a7885218a5a9d33f7f01dbdf85f3aad016c071395491338ec318d39220e1c7bd69d3d6b520a13a30d745c102b827ad9984b0dd6aed73916ffa82a06c1c111e7047dcd2668f988a0570a71474992eecf416e068f029ec323d5d635fd24694fc9bf96973c255d26c772a95bf8b7f876547a5beabf86f06cd21b67994f944e7a5493028201010095b02fd30069e547426a8bea58e8a2816f33688dac6c6f6974415af8402244a22133baedf34ce499d7036f3f19b38eb00897c18949b0c5a25953c71aeeccfc8f6594173157cc854bd98f16dffe8f28ca13b77eb43a2730585c49fc3f608cd811bb54b03b84bddaa8ef910988567f783012266199667a546a18fd88271fbf63a45ae4fd4884706da8befb9117c0a4d73de5172f8640b1091ed8a4aea3ed4641463f5ff6a5e3401ad7d0c92811f87956d1fd5f9a1d15c7f3839a08698d9f35f9d966e5000f7cb2655d7b6c4adcd8a9d950ea5f61bb7c9a33c17508f9baa313eecfee4ae493249ebe05a5d7770bbd3551b2eeb752e3649e0636de08e3d672e66cb90282010100ad93e4c31072b063fc5ab5fe22afacece775c795d0efdf7c704cfc027bde0d626a7646fc905bb5a80117e3ca49059af14e0160089f9190065be9bfecf12c3b2145b211c8e89e42dd91c38e9aa23ca73697063564f6f6aa6590088a738722df056004d18d7bccac62b3bafef6172fc2a4b071ea37f31eff7a076bcab7dd144e51a9da8754219352aef2c73478971539fa41de4759285ea626fa3c72e7085be47d554d915bbb5149cb6ef835351f231043049cd941506a034bf2f8767f3e1e42ead92f91cb3d75549b57ef7d56ac39c2d80d67f6a2b4ca192974bfc5060e2dd171217971002193dba12e7e4133ab201f07500a90495a38610279b13a48d54f0c99028201003e3a1ac0c2b67d54ed5c4bbe04a7db99103659d33a4f9d35809e1f60c282e5988dddc964527f3b05e6cc890eab3dcb571d66debf3a5527704c87264b3954d7265f4e8d2c637dd89b491b9cf23f264801f804b90454d65af0c4c830d1aef76f597ef61b26ca857ecce9cb78d4f6c2218c00d2975d46c2b013fbf59b750c3b92d8d3ed9e6d1fd0ef1ec091a5c286a3fe2dead292f40f380065731e2079ebb9f2a7ef2c415ecbb488da98f3a12609ca1b6ec8c734032c8bd513292ff842c375d4acd1b02dfb206b24cd815f8e2f9d4af8e7dea0370b19c1b23cc531d78b40e06e1119ee2e08f6f31c6e2e8444c568d13c5d451a291ae0c9f1d4f27d23b3a00d60ad"  # noqa: E501
RSA_PUBLIC = "080012a60430820222300d06092a864886f70d01010105000382020f003082020a0282020100e1beab071d08200bde24eef00d049449b07770ff9910257b2d7d5dda242ce8f0e2f12e1af4b32d9efd2c090f66b0f29986dbb645dae9880089704a94e5066d594162ae6ee8892e6ec70701db0a6c445c04778eb3de1293aa1a23c3825b85c6620a2bc3f82f9b0c309bc0ab3aeb1873282bebd3da03c33e76c21e9beb172fd44c9e43be32e2c99827033cf8d0f0c606f4579326c930eb4e854395ad941256542c793902185153c474bed109d6ff5141ebf9cd256cf58893a37f83729f97e7cb435ec679d2e33901d27bb35aa0d7e20561da08885ef0abbf8e2fb48d6a5487047a9ecb1ad41fa7ed84f6e3e8ecd5d98b3982d2a901b4454991766da295ab78822add5612a2df83bcee814cf50973e80d7ef38111b1bd87da2ae92438a2c8cbcc70b31ee319939a3b9c761dbc13b5c086d6b64bf7ae7dacc14622375d92a8ff9af7eb962162bbddebf90acb32adb5e4e4029f1c96019949ecfbfeffd7ac1e3fbcc6b6168c34be3d5a2e5999fcbb39bba7adbca78eab09b9bc39f7fa4b93411f4cc175e70c0a083e96bfaefb04a9580b4753c1738a6a760ae1afd851a1a4bdad231cf56e9284d832483df215a46c1c21bdf0c6cfe951c18f1ee4078c79c13d63edb6e14feaeffabc90ad317e4875fe648101b0864097e998f0ca3025ef9638cd2b0caecd3770ab54a1d9c6ca959b0f5dcbc90caeefc4135baca6fd475224269bbe1b0203010001"  # noqa: E501
#: The spec's peer id examples: one sha256 peer id in both text forms, one Ed25519 (identity).
SPEC_CID = "bafzbeie5745rpv2m6tjyuugywy4d5ewrqgqqhfnf445he3omzpjbx5xqxe"
SPEC_BASE58 = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
SPEC_ED25519_ID = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
#: rust-libp2p identity/src/keypair.rs, keypair_from_protobuf_encoding: the RSA key above, and an
#: Ed25519 keypair (base64 protobuf) with the peer id it expects.
RSA_PEER_ID = "QmaeANgBs1DTSxWSrPPtobgQuxW8XTfsS4ydbK4rCHzqxG"
RUST_ED25519_KEYPAIR = (
    "CAESQL6vdKQuznQosTrW7FWI9At+XX7EBf0BnZLhb6w+N+XSQSdfInl6c7U4NuxXJlhKcRBlBw9d0tj2dfBIVf6mcPA="
)
RUST_ED25519_ID = "12D3KooWEChVMMMzV8acJ53mJHrw1pQ27UAGkCxWXLJutbeUMvVu"

SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@pytest.mark.parametrize(
    ("private", "public", "key_type"),
    [
        (ED25519_PRIVATE, ED25519_PUBLIC, KeyType.ED25519),
        (SECP256K1_PRIVATE, SECP256K1_PUBLIC, KeyType.SECP256K1),
        (RSA_PRIVATE, RSA_PUBLIC, KeyType.RSA),
    ],
    ids=["ed25519", "secp256k1", "rsa"],
)
def test_spec_private_key_vectors_load_and_give_the_spec_public_key(
    private: str, public: str, key_type: KeyType
) -> None:
    identity = Identity.from_protobuf(bytes.fromhex(private))
    assert identity.key_type is key_type
    assert identity.public_key.to_protobuf() == bytes.fromhex(public)
    # Saving writes back exactly the bytes libp2p wrote.
    assert identity.to_protobuf() == bytes.fromhex(private)
    assert PublicKey.from_protobuf(bytes.fromhex(public)) == identity.public_key


def test_peer_ids_of_vector_keys_match_rust_libp2p() -> None:
    assert str(Identity.from_protobuf(bytes.fromhex(RSA_PRIVATE)).peer_id) == RSA_PEER_ID
    rust = Identity.from_protobuf(base64.b64decode(RUST_ED25519_KEYPAIR))
    assert str(rust.peer_id) == RUST_ED25519_ID
    # Small keys are inlined (identity multihash), so the id gives the key back.
    assert PeerId.parse(RUST_ED25519_ID).public_key == rust.public_key
    assert PeerId.parse(RSA_PEER_ID).public_key is None


def test_spec_ecdsa_public_key_vector_is_usable_but_its_private_key_is_refused() -> None:
    public = PublicKey.from_protobuf(bytes.fromhex(ECDSA_PUBLIC))
    assert public.key_type is KeyType.ECDSA
    assert public.to_protobuf() == bytes.fromhex(ECDSA_PUBLIC)
    assert str(public.peer_id).startswith("Qm")  # 95 bytes of protobuf: hashed, not inlined
    with pytest.raises(IdentityError, match="ECDSA host keys are not supported") as info:
        Identity.from_protobuf(bytes.fromhex(ECDSA_PRIVATE))
    assert "py-libp2p" in str(info.value) and "@chainsafe/libp2p-quic" in str(info.value)


def test_spec_peer_id_examples_parse_in_both_forms() -> None:
    sha256_id = PeerId.parse(SPEC_BASE58)
    assert PeerId.parse(SPEC_CID) == sha256_id
    assert str(sha256_id) == SPEC_BASE58 and sha256_id.to_cid() == SPEC_CID
    assert sha256_id.public_key is None
    ed = PeerId.parse(SPEC_ED25519_ID)
    assert str(ed) == SPEC_ED25519_ID
    assert ed.public_key is not None and ed.public_key.key_type is KeyType.ED25519
    assert ed.matches(ed.public_key)
    assert PeerId.parse(ed.to_cid()) == ed and ed.to_cid().startswith("bafz")


def test_any_multibase_cid_parses() -> None:
    sha256_id = PeerId.parse(SPEC_BASE58)
    cid = bytes.fromhex("0172") + sha256_id.to_bytes()
    for prefix, text in [
        ("z", __import__("base58").b58encode(cid).decode()),
        ("f", cid.hex()),
        ("B", base64.b32encode(cid).decode().rstrip("=")),
    ]:
        assert PeerId.parse(prefix + text) == sha256_id


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "neither base58btc nor a multibase CID"),
        ("hello", "neither base58btc nor a multibase CID"),
        ("12D3KooW0OIl", "not valid base58btc"),
        ("Qm", "not a multihash"),
        # a content CID (dag-pb), not a peer
        ("bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi", "not libp2p-key"),
        # CIDv0 wrapped in multibase is not a CIDv1
        ("f" + "00" * 4, "not a CIDv1"),
        # a CIDv1 of libp2p-key holding a sha1 multihash (code 0x11)
        ("f0172" + "1114" + "00" * 20, "code 0x11"),
    ],
)
def test_bad_peer_id_text_is_refused_naming_it(text: str, why: str) -> None:
    with pytest.raises(InvalidAddressError) as info:
        PeerId.parse(text)
    assert repr(text) in str(info.value)
    assert info.value.what == "peer id"
    assert why in str(info.value)


def test_peer_id_multihash_rules() -> None:
    digest = bytes(32)
    PeerId.from_bytes(b"\x12\x20" + digest)  # sha2-256 of 32 bytes
    with pytest.raises(InvalidAddressError, match="digest is 31 bytes"):
        PeerId.from_bytes(b"\x12\x1f" + digest[:31])
    with pytest.raises(InvalidAddressError, match="code 0x11"):
        PeerId.from_bytes(b"\x11\x14" + bytes(20))
    with pytest.raises(InvalidAddressError, match="not minimally encoded"):
        PeerId.from_bytes(b"\x92\x00\x20" + digest)
    with pytest.raises(InvalidAddressError, match="inlines 43 bytes"):
        PeerId.from_bytes(b"\x00\x2b" + bytes(43))
    with pytest.raises(InvalidAddressError, match="key it inlines is not usable"):
        PeerId.from_bytes(b"\x00\x04" + b"\x08\x01\x12\x00")


def test_peer_ids_are_identity_up_to_42_bytes_of_key_else_sha256() -> None:
    for key_type, prefix, code in [
        ("ed25519", "12D3KooW", 0x00),
        ("secp256k1", "16Uiu2", 0x00),
        ("rsa", "Qm", 0x12),
    ]:
        identity = Identity.generate(key_type)
        pid = identity.peer_id
        assert str(pid).startswith(prefix)
        assert pid.to_bytes()[0] == code
        assert pid.matches(identity.public_key)
        assert not pid.matches(Identity.generate(key_type).public_key)
        assert PeerId.parse(str(pid)) == pid == PeerId.parse(pid.to_cid())
        assert {pid: 1}[PeerId.parse(str(pid))] == 1  # hashable, equal by value


# -- signatures ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["ed25519", "secp256k1", "rsa"])
def test_signatures_verify_and_tampering_is_caught(key_type: str) -> None:
    identity = Identity.generate(key_type)
    public = PublicKey.from_protobuf(identity.public_key.to_protobuf())  # as a peer sees it
    sig = identity.sign(b"libp2p")
    assert public.verify(sig, b"libp2p")
    assert not public.verify(sig, b"libp2q")
    assert not public.verify(sig[:-1] + bytes([sig[-1] ^ 1]), b"libp2p")
    assert not public.verify(b"", b"libp2p")
    assert not public.verify(b"\x30\x00garbage", b"libp2p")
    assert not Identity.generate(key_type).public_key.verify(sig, b"libp2p")


def test_each_scheme_is_the_one_the_spec_names() -> None:
    """secp256k1/ECDSA: ECDSA-SHA256 with a DER signature; RSA: PKCS#1 v1.5 SHA-256."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    secp = Identity.generate("secp256k1")
    key = secp.crypto_key
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    key.public_key().verify(secp.sign(b"m"), b"m", ec.ECDSA(hashes.SHA256()))
    rsa_id = Identity.generate("rsa")
    rsa_key = rsa_id.crypto_key
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    rsa_key.public_key().verify(rsa_id.sign(b"m"), b"m", padding.PKCS1v15(), hashes.SHA256())


def test_secp256k1_signatures_are_low_s() -> None:
    """libsecp256k1 verifiers (py-libp2p's coincurve) refuse high-S signatures."""
    identity = Identity.generate("secp256k1")
    for i in range(64):
        _, s = decode_dss_signature(identity.sign(b"%d" % i))
        assert s <= SECP256K1_ORDER // 2


# -- the protobuf: deterministic and nothing else --------------------------------------------------


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x12\x20" + bytes(32) + b"\x08\x01", "not deterministically encoded"),  # out of order
        (b"\x08\x81\x00\x12\x20" + bytes(32), "not deterministically encoded"),  # long varint
        (b"\x08\x01\x12\x20" + bytes(32) + b"\x18\x01", "fields [3] the spec does not define"),
        (b"\x08\x01", "lacks required field Data"),
        (b"\x12\x20" + bytes(32), "lacks required field Type"),
        (b"\x08\x07\x12\x20" + bytes(32), "unknown key type 7"),
        (b"\xff\xff", "not a libp2p PublicKey protobuf"),
        (b"\x08\x01\x12\x1f" + bytes(31), "Ed25519 public key is 31 bytes, not 32"),
        (b"\x08\x02\x12\x20" + bytes(32), "33-byte compressed point"),
        (b"\x08\x00\x12\x03abc", "RSA public key is not a DER SubjectPublicKeyInfo"),
    ],
)
def test_bad_public_key_bytes_are_typed_errors(data: bytes, why: str) -> None:
    with pytest.raises(IdentityError, match=why.replace("[", r"\[").replace("]", r"\]")):
        PublicKey.from_protobuf(data)


def test_rsa_sizes_outside_2048_to_8192_are_refused() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    spki = small.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = PublicKey(KeyType.RSA, spki).to_protobuf()
    with pytest.raises(IdentityError, match="RSA key of 1024 bits"):
        PublicKey.from_protobuf(encoded)
    unchecked = PublicKey.from_protobuf(encoded, check_rsa_size=False).crypto_key
    assert isinstance(unchecked, rsa.RSAPublicKey) and unchecked.key_size == 1024
    with pytest.raises(IdentityError, match="2048 to 8192"):
        Identity(small)
    for bits in (1024, 8200):  # refused before any key is generated
        with pytest.raises(IdentityError, match=f"RSA key of {bits} bits"):
            Identity.generate("rsa", rsa_bits=bits)


def test_unsupported_key_types_are_refused_with_the_reason() -> None:
    with pytest.raises(IdentityError, match="ECDSA host keys are not supported"):
        Identity.generate("ecdsa")
    with pytest.raises(IdentityError, match="ECDSA host keys are not supported"):
        Identity(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(IdentityError, match=r"unknown key type 'dsa'.*'ed25519'"):
        Identity.generate("dsa")
    assert Identity.generate(KeyType.SECP256K1).key_type is KeyType.SECP256K1
    assert Identity.generate().key_type is KeyType.ED25519


def test_private_key_data_is_checked_per_type() -> None:
    ed = bytes.fromhex(ED25519_PRIVATE)[4:]
    legacy = b"\x08\x01\x12\x60" + ed + ed[32:]  # seed || public || public (older libp2p)
    assert Identity.from_protobuf(legacy).public_key.to_protobuf() == bytes.fromhex(ED25519_PUBLIC)
    bad_legacy = b"\x08\x01\x12\x60" + ed + bytes(32)
    with pytest.raises(IdentityError, match="two public key copies differ"):
        Identity.from_protobuf(bad_legacy)
    with pytest.raises(IdentityError, match="does not match its seed"):
        Identity.from_protobuf(b"\x08\x01\x12\x40" + ed[:32] + bytes(32))
    with pytest.raises(IdentityError, match="Ed25519 private key is 32 bytes"):
        Identity.from_protobuf(b"\x08\x01\x12\x20" + ed[:32])
    with pytest.raises(IdentityError, match="secp256k1 private key is 31 bytes"):
        Identity.from_protobuf(b"\x08\x02\x12\x1f" + bytes(31))
    with pytest.raises(IdentityError, match="scalar is out of range"):
        Identity.from_protobuf(b"\x08\x02\x12\x20" + bytes(32))
    with pytest.raises(IdentityError, match="not PKCS#1 DER"):
        Identity.from_protobuf(b"\x08\x00\x12\x02\x30\x00")


# -- key files -------------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("key_type", ["ed25519", "secp256k1", "rsa"])
def test_save_writes_0600_and_load_gives_the_same_identity(tmp_path: Path, key_type: str) -> None:
    identity = Identity.generate(key_type)
    path = tmp_path / "host.key"
    identity.save(path)
    assert _mode(path) == 0o600
    assert path.read_bytes() == identity.to_protobuf()
    loaded = Identity.load(path)
    assert loaded.peer_id == identity.peer_id
    assert loaded.public_key.verify(identity.sign(b"x"), b"x")


def test_save_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        Identity.generate().save(tmp_path / "k")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "k") == 0o600


def test_spec_key_file_loads(tmp_path: Path) -> None:
    """A key file as another libp2p implementation writes it: the protobuf, nothing else."""
    path = tmp_path / "spec.key"
    path.write_bytes(bytes.fromhex(SECP256K1_PRIVATE))
    path.chmod(0o600)
    assert Identity.load(path).public_key.to_protobuf() == bytes.fromhex(SECP256K1_PUBLIC)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_key_file_others_can_read_is_refused_with_the_chmod_fix(
    tmp_path: Path, mode: int
) -> None:
    path = tmp_path / "host.key"
    Identity.generate().save(path)
    path.chmod(mode)
    with pytest.raises(IdentityError) as info:
        Identity.load(path)
    assert f"chmod 600 {path}" in str(info.value)
    assert f"{mode:04o}" in str(info.value)
    assert info.value.source == str(path)


def test_an_existing_file_is_neither_overwritten_nor_widened(tmp_path: Path) -> None:
    path = tmp_path / "host.key"
    path.write_bytes(b"precious")
    path.chmod(0o400)
    with pytest.raises(IdentityError, match="already exists: pass overwrite=True"):
        Identity.generate().save(path)
    assert path.read_bytes() == b"precious" and _mode(path) == 0o400
    identity = Identity.generate()
    identity.save(path, overwrite=True)
    assert _mode(path) == 0o400  # replaced, never widened
    assert Identity.load(path).peer_id == identity.peer_id
    assert [p.name for p in tmp_path.iterdir()] == ["host.key"]  # no temp file left


def test_overwriting_a_too_open_file_narrows_it(tmp_path: Path) -> None:
    path = tmp_path / "host.key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    Identity.generate().save(path, overwrite=True)
    assert _mode(path) == 0o600


def test_bad_key_files_are_typed_errors_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.key"
    with pytest.raises(IdentityError, match="no such file: create one with") as info:
        Identity.load(missing)
    assert str(missing) in str(info.value)
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
    garbage.chmod(0o600)
    with pytest.raises(IdentityError, match="not a libp2p PrivateKey protobuf") as info:
        Identity.load(garbage)
    assert str(garbage) in str(info.value)
    wrong_length = tmp_path / "short.key"
    wrong_length.write_bytes(b"\x08\x01\x12\x20" + bytes(32))
    wrong_length.chmod(0o600)
    with pytest.raises(IdentityError, match="Ed25519 private key is 32 bytes, not 64") as info:
        Identity.load(wrong_length)
    assert str(wrong_length) in str(info.value)
    ecdsa_file = tmp_path / "ecdsa.key"
    ecdsa_file.write_bytes(bytes.fromhex(ECDSA_PRIVATE))
    ecdsa_file.chmod(0o600)
    with pytest.raises(IdentityError, match="ECDSA host keys are not supported") as info:
        Identity.load(ecdsa_file)
    assert str(ecdsa_file) in str(info.value)
    with pytest.raises(IdentityError, match="not a regular file"):
        (tmp_path / "dir").mkdir(mode=0o700)
        Identity.load(tmp_path / "dir")


def test_a_symlinked_key_file_is_not_followed(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    Identity.generate().save(real)
    link = tmp_path / "link.key"
    link.symlink_to(real)
    with pytest.raises(IdentityError, match="cannot be opened"):
        Identity.load(link)


# -- errors ----------------------------------------------------------------------------------------


def test_identity_error_is_a_value_error_and_pickles() -> None:
    err = IdentityError("is readable by others: run chmod 600 /k", source="/k")
    assert isinstance(err, MigrationError) and isinstance(err, ValueError)
    out = pickle.loads(pickle.dumps(err))
    assert type(out) is IdentityError and str(out) == str(err)
    assert (out.source, out.reason) == ("/k", err.reason)


# -- hypothesis: arbitrary input raises only the typed errors --------------------------------------


@given(st.binary(max_size=200))
def test_random_public_key_bytes_raise_only_identity_error(data: bytes) -> None:
    try:
        key = PublicKey.from_protobuf(data)
    except IdentityError:
        return
    assert key.to_protobuf() == data


@given(st.binary(max_size=200))
def test_random_private_key_bytes_raise_only_identity_error(data: bytes) -> None:
    with contextlib.suppress(IdentityError):
        Identity.from_protobuf(data)


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


@given(
    st.one_of(
        st.text(max_size=80),
        st.text(_B58, max_size=60).map(lambda s: "1" + s),
        st.text(_B58, max_size=60).map(lambda s: "Qm" + s),
        st.text("abcdefghijklmnopqrstuvwxyz234567", max_size=70).map(lambda s: "b" + s),
        st.binary(max_size=50).map(lambda b: "f" + b.hex()),
        st.binary(max_size=50).map(lambda b: "f0172" + b.hex()),
    )
)
def test_random_peer_id_text_raises_only_invalid_address_error(text: str) -> None:
    try:
        pid = PeerId.parse(text)
    except InvalidAddressError as exc:
        assert exc.what == "peer id"
        return
    assert PeerId.parse(str(pid)) == pid == PeerId.parse(pid.to_cid())


@given(st.binary(max_size=60))
def test_random_multihash_bytes_raise_only_invalid_address_error(data: bytes) -> None:
    with contextlib.suppress(InvalidAddressError):
        PeerId.from_bytes(data)


@settings(max_examples=50)
@given(st.binary(min_size=32, max_size=32))
def test_ed25519_peer_ids_round_trip_through_text(seed: bytes) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    identity = Identity(ed25519.Ed25519PrivateKey.from_private_bytes(seed))
    pid = identity.peer_id
    assert PeerId.parse(str(pid)) == pid == PeerId.parse(pid.to_cid())
    assert pid.public_key == identity.public_key
