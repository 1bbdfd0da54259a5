"""libp2p host keys: the PublicKey/PrivateKey protobufs of the peer-ids spec, signatures as the
specs define them per key type, and key files kept private.

The two messages are built with protobuf at runtime from the spec's own proto2 schema (no protoc,
no generated file): the library does the wire parsing, and the spec's rule that the encoding be
deterministic (fields in tag order, minimal varints, both present, nothing else) is enforced by
re-serialising what was parsed and refusing any difference, so one key has one encoding and hence
one peer id.
"""

from __future__ import annotations

import enum
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, unknown_fields
from google.protobuf.message import DecodeError, Message

from actors.errors import IdentityError

if TYPE_CHECKING:
    from supervisor.libp2p.peer_id import PeerId

__all__ = [
    "RSA_MAX_BITS",
    "RSA_MIN_BITS",
    "Identity",
    "KeyType",
    "PublicKey",
]

#: go-libp2p's bounds (MinRsaKeyBits, maxRsaKeyBits); rust-libp2p's verifier uses the same range.
RSA_MIN_BITS = 2048
RSA_MAX_BITS = 8192
#: The order n of secp256k1's group (SEC 2, section 2.4.1), for low-S signatures.
_SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
#: Key files are a few KiB at most (an 8192-bit PKCS#1 key is under 5 KiB).
_MAX_KEY_FILE = 64 * 1024

_ECDSA_REFUSED = (
    "ECDSA host keys are not supported: py-libp2p has no ECDSA public-key decoder, and rust-libp2p "
    "decodes them only when built with its 'ecdsa' feature, which js-libp2p's QUIC transport "
    "(@chainsafe/libp2p-quic) is built without, so those peers abort the handshake (go-libp2p "
    "would accept one); use an ed25519 (default), secp256k1 or rsa identity"
)


class KeyType(enum.IntEnum):
    """The protobuf KeyType enum; ``str()`` gives the name ``Identity.generate`` takes."""

    RSA = 0
    ED25519 = 1
    SECP256K1 = 2
    ECDSA = 3

    def __str__(self) -> str:
        return self.name.lower()


def _message_classes() -> tuple[type[Message], type[Message]]:
    """PublicKey and PrivateKey message classes from the spec's schema, in a private pool."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name="quic_supervisor/libp2p/keys.proto", package="quic_supervisor.libp2p", syntax="proto2"
    )
    enum_type = fdp.enum_type.add(name="KeyType")
    for member in KeyType:
        enum_type.value.add(name=member.name, number=member.value)
    fd = descriptor_pb2.FieldDescriptorProto
    for name in ("PublicKey", "PrivateKey"):
        msg = fdp.message_type.add(name=name)
        msg.field.add(
            name="Type",
            number=1,
            label=fd.LABEL_REQUIRED,
            type=fd.TYPE_ENUM,
            type_name=".quic_supervisor.libp2p.KeyType",
        )
        msg.field.add(name="Data", number=2, label=fd.LABEL_REQUIRED, type=fd.TYPE_BYTES)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    public, private = (
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"quic_supervisor.libp2p.{n}"))
        for n in ("PublicKey", "PrivateKey")
    )
    return public, private


_PublicKeyPB, _PrivateKeyPB = _message_classes()


def _encode(cls: type[Message], key_type: KeyType, data: bytes) -> bytes:
    return cls(Type=int(key_type), Data=data).SerializeToString(deterministic=True)


def _decode(cls: type[Message], data: bytes, source: str) -> tuple[KeyType, bytes]:
    """(type, data) of a deterministically encoded key message, else an IdentityError."""
    what = cls.DESCRIPTOR.name
    msg = cls()
    try:
        msg.ParseFromString(bytes(data))
    except DecodeError:
        raise IdentityError(f"is not a libp2p {what} protobuf", source=source) from None
    unknown = list(unknown_fields.UnknownFieldSet(msg))
    for item in unknown:
        if item.field_number == 1 and isinstance(item.data, int):
            known = ", ".join(f"{m.value} ({m})" for m in KeyType)
            raise IdentityError(
                f"has unknown key type {item.data}: libp2p defines {known}", source=source
            )
    if unknown:
        numbers = sorted({item.field_number for item in unknown})
        raise IdentityError(
            f"{what} has fields {numbers} the spec does not define (only Type = 1, Data = 2)",
            source=source,
        )
    missing = [name for name in ("Type", "Data") if not msg.HasField(name)]
    if missing:
        raise IdentityError(f"{what} lacks required field {' and '.join(missing)}", source=source)
    if msg.SerializeToString(deterministic=True) != bytes(data):
        raise IdentityError(
            f"{what} is not deterministically encoded (fields in tag order, minimal varints, "
            "each once), as the peer-ids spec requires",
            source=source,
        )
    return KeyType(msg.Type), bytes(msg.Data)


def _check_rsa_bits(bits: int, source: str | None) -> None:
    if not RSA_MIN_BITS <= bits <= RSA_MAX_BITS:
        raise IdentityError(
            f"RSA key of {bits} bits: libp2p peers accept {RSA_MIN_BITS} to {RSA_MAX_BITS} bits "
            "(go-libp2p refuses others); use a 2048- to 8192-bit key, or ed25519",
            source=source,
        )


_PublicCryptoKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey
_PrivateCryptoKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _load_public(key_type: KeyType, data: bytes, source: str | None) -> _PublicCryptoKey:
    """The key ``data`` encodes for ``key_type`` (peer-ids spec, Key Types), else IdentityError."""
    if key_type is KeyType.ED25519:
        if len(data) != 32:
            raise IdentityError(f"Ed25519 public key is {len(data)} bytes, not 32", source=source)
        return ed25519.Ed25519PublicKey.from_public_bytes(data)
    if key_type is KeyType.SECP256K1:
        if len(data) != 33 or data[0] not in (2, 3):
            raise IdentityError(
                f"secp256k1 public key must be the 33-byte compressed point, got {len(data)} bytes",
                source=source,
            )
        try:
            return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), data)
        except ValueError:
            raise IdentityError(
                "secp256k1 public key is not a point on the curve", source=source
            ) from None
    try:
        loaded = serialization.load_der_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise IdentityError(
            f"{key_type.name} public key is not a DER SubjectPublicKeyInfo", source=source
        ) from None
    if key_type is KeyType.RSA and isinstance(loaded, rsa.RSAPublicKey):
        return loaded
    if key_type is KeyType.ECDSA and isinstance(loaded, ec.EllipticCurvePublicKey):
        return loaded
    raise IdentityError(
        f"{key_type.name} public key holds a {type(loaded).__name__} instead", source=source
    )


def _raw_public(key: _PublicCryptoKey) -> tuple[KeyType, bytes]:
    """(type, Data) of a cryptography public key, as the spec encodes it."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        return KeyType.ED25519, key.public_bytes_raw()
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256K1):
        point = key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
        )
        return KeyType.SECP256K1, point
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return (KeyType.RSA if isinstance(key, rsa.RSAPublicKey) else KeyType.ECDSA), spki


@dataclass(frozen=True)
class PublicKey:
    """A libp2p public key: its type and the Data bytes of its protobuf (kept as received, since
    the peer id is derived from exactly these bytes). Construction checks the bytes."""

    key_type: KeyType
    data: bytes
    _key: _PublicCryptoKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_type", KeyType(self.key_type))
        object.__setattr__(self, "data", bytes(self.data))
        object.__setattr__(self, "_key", _load_public(self.key_type, self.data, None))

    @classmethod
    def from_protobuf(cls, data: bytes, *, check_rsa_size: bool = True) -> PublicKey:
        """Decode a protobuf PublicKey. RSA keys outside 2048..8192 bits are refused unless
        ``check_rsa_size`` is False (for callers that report that rule themselves)."""
        key_type, raw = _decode(_PublicKeyPB, data, "public key")
        key = cls.__new__(cls)
        object.__setattr__(key, "key_type", key_type)
        object.__setattr__(key, "data", raw)
        object.__setattr__(key, "_key", _load_public(key_type, raw, "public key"))
        if check_rsa_size and isinstance(key._key, rsa.RSAPublicKey):
            _check_rsa_bits(key._key.key_size, "public key")
        return key

    @classmethod
    def from_crypto_key(cls, key: _PublicCryptoKey) -> PublicKey:
        """The libp2p form of a cryptography public key."""
        key_type, data = _raw_public(key)
        return cls(key_type, data)

    def to_protobuf(self) -> bytes:
        """The deterministic protobuf encoding (what peer ids and SignedKey carry)."""
        return _encode(_PublicKeyPB, self.key_type, self.data)

    @property
    def crypto_key(self) -> _PublicCryptoKey:
        """The key as a cryptography object."""
        return self._key

    def verify(self, signature: bytes, data: bytes) -> bool:
        """Whether ``signature`` over ``data`` is valid with the spec's scheme for this key type:
        Ed25519 as is; secp256k1 and ECDSA: ECDSA over SHA-256 with a DER signature; RSA:
        PKCS#1 v1.5 with SHA-256. Never raises for a bad signature."""
        key = self._key
        try:
            if isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(signature, data)
            elif isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
            else:
                key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        except (InvalidSignature, ValueError):
            return False
        return True

    @property
    def peer_id(self) -> PeerId:
        from supervisor.libp2p.peer_id import PeerId  # peer_id imports this module

        return PeerId.from_public_key(self)


def _load_private(key_type: KeyType, data: bytes, source: str) -> _PrivateCryptoKey:
    """The private key a PrivateKey protobuf's Data holds, else IdentityError naming ``source``."""
    if key_type is KeyType.ECDSA:
        raise IdentityError(_ECDSA_REFUSED, source=source)
    if key_type is KeyType.ED25519:
        if len(data) == 96 and data[32:64] != data[64:]:
            raise IdentityError(
                "96-byte (legacy) Ed25519 private key whose two public key copies differ",
                source=source,
            )
        if len(data) not in (64, 96):
            raise IdentityError(
                f"Ed25519 private key is {len(data)} bytes, not 64 (seed || public key)",
                source=source,
            )
        private = ed25519.Ed25519PrivateKey.from_private_bytes(data[:32])
        if private.public_key().public_bytes_raw() != data[32:64]:
            raise IdentityError(
                "Ed25519 private key's public half does not match its seed", source=source
            )
        return private
    if key_type is KeyType.SECP256K1:
        if len(data) != 32:
            raise IdentityError(
                f"secp256k1 private key is {len(data)} bytes, not a 32-byte scalar", source=source
            )
        try:
            return ec.derive_private_key(int.from_bytes(data, "big"), ec.SECP256K1())
        except ValueError:
            raise IdentityError("secp256k1 private scalar is out of range", source=source) from None
    try:
        loaded = serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise IdentityError("RSA private key is not PKCS#1 DER", source=source) from None
    if not isinstance(loaded, rsa.RSAPrivateKey):
        raise IdentityError(
            f"RSA private key holds a {type(loaded).__name__} instead", source=source
        )
    _check_rsa_bits(loaded.key_size, source)
    return loaded


class Identity:
    """A libp2p host key (one per Supervisor, as a libp2p Host has): signs, names the peer id,
    and is stored as the protobuf PrivateKey libp2p implementations write."""

    def __init__(self, private_key: _PrivateCryptoKey) -> None:
        if isinstance(private_key, ec.EllipticCurvePrivateKey):
            if not isinstance(private_key.curve, ec.SECP256K1):
                raise IdentityError(_ECDSA_REFUSED)
        elif isinstance(private_key, rsa.RSAPrivateKey):
            _check_rsa_bits(private_key.key_size, None)
        elif not isinstance(private_key, ed25519.Ed25519PrivateKey):
            raise IdentityError(
                f"{type(private_key).__name__} is not a libp2p host key type: use ed25519, "
                "secp256k1 or rsa"
            )
        self._private = private_key
        self._public = PublicKey.from_crypto_key(private_key.public_key())

    @classmethod
    def generate(cls, key_type: str | KeyType = "ed25519", *, rsa_bits: int = 2048) -> Identity:
        """A fresh identity: ``"ed25519"`` (default), ``"secp256k1"`` or ``"rsa"``."""
        name = str(key_type).lower()
        if name == "ed25519":
            return cls(ed25519.Ed25519PrivateKey.generate())
        if name == "secp256k1":
            return cls(ec.generate_private_key(ec.SECP256K1()))
        if name == "rsa":
            if isinstance(rsa_bits, bool) or not isinstance(rsa_bits, int):
                raise IdentityError(f"rsa_bits must be an int, got {rsa_bits!r}")
            _check_rsa_bits(rsa_bits, None)
            return cls(rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits))
        if name == "ecdsa":
            raise IdentityError(_ECDSA_REFUSED)
        raise IdentityError(
            f"unknown key type {key_type!r}: use 'ed25519' (default), 'secp256k1' or 'rsa'"
        )

    @classmethod
    def from_protobuf(cls, data: bytes, *, source: str = "private key") -> Identity:
        """Decode a protobuf PrivateKey; errors name ``source`` (a file name, say)."""
        key_type, raw = _decode(_PrivateKeyPB, data, source)
        return cls(_load_private(key_type, raw, source))

    def to_protobuf(self) -> bytes:
        """The protobuf PrivateKey: Ed25519 Data = seed || public key (64 bytes); secp256k1 =
        the 32-byte scalar; RSA = PKCS#1 DER."""
        key = self._private
        if isinstance(key, ed25519.Ed25519PrivateKey):
            data = key.private_bytes_raw() + key.public_key().public_bytes_raw()
        elif isinstance(key, ec.EllipticCurvePrivateKey):
            data = key.private_numbers().private_value.to_bytes(32, "big")
        else:
            data = key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        return _encode(_PrivateKeyPB, self.key_type, data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Read a key file, refusing one that group or others can access (as ssh does): anyone
        who reads it can impersonate this node."""
        source = os.fspath(path)
        try:
            fd = os.open(source, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise IdentityError(
                "no such file: create one with Identity.generate().save(path)", source=source
            ) from None
        except OSError as exc:
            raise IdentityError(f"cannot be opened ({exc.strerror})", source=source) from None
        try:
            st = os.fstat(fd)  # of the file opened, so it cannot change between check and read
            if not stat.S_ISREG(st.st_mode):
                raise IdentityError("is not a regular file", source=source)
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise IdentityError(
                    f"is accessible by group or others (mode {mode:04o}); a host key must be "
                    f"private to its owner: run chmod 600 {source}",
                    source=source,
                )
            data = b""
            while len(data) <= _MAX_KEY_FILE and (chunk := os.read(fd, _MAX_KEY_FILE)):
                data += chunk
        finally:
            os.close(fd)
        if len(data) > _MAX_KEY_FILE:
            raise IdentityError(
                f"is larger than {_MAX_KEY_FILE} bytes, too large for a libp2p key file",
                source=source,
            )
        return cls.from_protobuf(data, source=source)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the key file with mode 0600 (the umask can only narrow it). An existing file is
        refused unless ``overwrite``; then it is replaced atomically and its mode is never
        widened (the new file gets the old mode, narrowed to at most 0600)."""
        target = Path(path)
        data = self.to_protobuf()
        if not overwrite:
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                raise IdentityError(
                    "already exists: pass overwrite=True to replace it (the identity it holds is "
                    "lost), or save to another path",
                    source=str(target),
                ) from None
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except BaseException:
                target.unlink(missing_ok=True)
                raise
            return
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode) & 0o600
        except FileNotFoundError:
            mode = 0o600
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @property
    def key_type(self) -> KeyType:
        return self._public.key_type

    @property
    def public_key(self) -> PublicKey:
        return self._public

    @property
    def peer_id(self) -> PeerId:
        return self._public.peer_id

    @property
    def crypto_key(self) -> _PrivateCryptoKey:
        """The private key as a cryptography object."""
        return self._private

    def sign(self, data: bytes) -> bytes:
        """Sign with the spec's scheme for the key type (see ``PublicKey.verify``). secp256k1
        signatures are normalised to low S (BIP 62), which libsecp256k1-based verifiers such
        as py-libp2p's (coincurve) require."""
        key = self._private
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(data)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
            if s > _SECP256K1_ORDER // 2:
                s = _SECP256K1_ORDER - s
            return encode_dss_signature(r, s)
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())

    def __repr__(self) -> str:
        return f"Identity({self.key_type}, {self.peer_id})"
