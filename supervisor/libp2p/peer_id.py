"""libp2p peer ids (peer-ids spec): the multihash of a protobuf public key, identity-hashed when
the key encodes to at most 42 bytes, else sha2-256; written as bare base58btc or as a CIDv1 with
the libp2p-key multicodec, both of which parse.

A peer id is checked when it is made, so holding one means it is well formed: a sha2-256
multihash of 32 bytes, or an identity multihash of at most 42 bytes that decodes as a key.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import base58
import multibase
import multihash
import varint

from actors.errors import IdentityError, InvalidAddressError
from supervisor.libp2p.keys import PublicKey

__all__ = ["PeerId"]

#: Keys whose protobuf is at most this long are inlined (identity multihash), not hashed.
MAX_INLINE_KEY_LENGTH = 42
_IDENTITY = 0x00
_SHA2_256 = 0x12
#: The libp2p-key multicodec of a peer id written as a CID.
_LIBP2P_KEY = 0x72
_FORMS = (
    "give a base58btc peer id (Qm..., 12D3KooW..., 16Uiu2...) or a CIDv1 with the libp2p-key "
    "codec (bafz...)"
)


def _read_varint(buf: io.BytesIO) -> int | None:
    """The next minimally encoded varint of ``buf``, None if there is none."""
    start = buf.tell()
    try:
        value = varint.decode_stream(buf)
    except (EOFError, TypeError):
        return None
    if varint.encode(value) != buf.getvalue()[start : buf.tell()]:
        return None
    return int(value)


@dataclass(frozen=True)
class PeerId:
    """A libp2p peer id: its multihash bytes (the form inside ``/p2p/`` and identify)."""

    multihash: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "multihash", bytes(self.multihash))
        problem = _problem(self.multihash)
        if problem is not None:
            raise InvalidAddressError(self.multihash.hex(), problem, what="peer id multihash")

    @classmethod
    def from_bytes(cls, data: bytes) -> PeerId:
        """A peer id from its multihash bytes."""
        return cls(data)

    @classmethod
    def from_public_key(cls, public_key: PublicKey) -> PeerId:
        encoded = public_key.to_protobuf()
        if len(encoded) <= MAX_INLINE_KEY_LENGTH:
            return cls(multihash.encode(encoded, _IDENTITY))
        return cls(multihash.digest(encoded, "sha2-256").encode())

    @classmethod
    def parse(cls, text: str) -> PeerId:
        """Parse either text form. Per the spec: bare base58btc when it starts with ``1`` or
        ``Qm``, else a multibase CIDv1 whose codec must be libp2p-key."""
        if not isinstance(text, str):
            raise InvalidAddressError(
                text, f"a peer id is text, not {type(text).__name__}: {_FORMS}", what="peer id"
            )
        if text.startswith(("1", "Qm")):
            try:
                raw = base58.b58decode(text)
            except ValueError:
                raise InvalidAddressError(
                    text, f"it is not valid base58btc: {_FORMS}", what="peer id"
                ) from None
        else:
            raw = _from_cid(text)
        try:
            return cls(raw)
        except InvalidAddressError as exc:
            raise InvalidAddressError(text, exc.reason, what="peer id") from None

    def to_bytes(self) -> bytes:
        return self.multihash

    def to_base58(self) -> str:
        return base58.b58encode(self.multihash).decode("ascii")

    def to_cid(self) -> str:
        """The CIDv1 form (libp2p-key codec, base32 multibase), e.g. ``bafz...``."""
        cid = varint.encode(1) + varint.encode(_LIBP2P_KEY) + self.multihash
        return bytes(multibase.encode("base32", cid)).decode("ascii")

    @property
    def public_key(self) -> PublicKey | None:
        """The key when it is inlined (identity multihash: Ed25519, secp256k1), else None."""
        code, digest = _split(self.multihash)
        return PublicKey.from_protobuf(digest) if code == _IDENTITY else None

    def matches(self, public_key: PublicKey) -> bool:
        """Whether ``public_key`` is the key this peer id names."""
        return PeerId.from_public_key(public_key) == self

    def __str__(self) -> str:
        return self.to_base58()

    def __repr__(self) -> str:
        return f"PeerId('{self}')"


def _split(mh: bytes) -> tuple[int, bytes]:
    decoded = multihash.decode(mh)
    return int(decoded.code), bytes(decoded.digest)


def _problem(mh: bytes) -> str | None:
    """Why ``mh`` is not a peer id multihash, or None when it is one."""
    try:
        code, digest = _split(mh)
    except (ValueError, TypeError):
        return f"it is not a multihash: {_FORMS}"
    if multihash.encode(digest, code) != mh:
        return "its multihash is not minimally encoded"
    if code == _SHA2_256:
        if len(digest) != 32:
            return f"its sha2-256 digest is {len(digest)} bytes, not 32"
        return None
    if code != _IDENTITY:
        return (
            f"it is a multihash with code 0x{code:x}; libp2p peer ids are sha2-256 (0x12) or "
            "identity (0x00) multihashes"
        )
    if len(digest) > MAX_INLINE_KEY_LENGTH:
        return (
            f"it inlines {len(digest)} bytes of key; keys over {MAX_INLINE_KEY_LENGTH} bytes are "
            "named by their sha2-256 hash"
        )
    try:
        PublicKey.from_protobuf(digest)
    except IdentityError as exc:
        return f"the key it inlines is not usable: {exc.reason}"
    return None


def _from_cid(text: str) -> bytes:
    """The multihash of a multibase CIDv1 with the libp2p-key codec."""
    try:
        raw = bytes(multibase.decode(text))
    except ValueError:
        raise InvalidAddressError(
            text, f"it is neither base58btc nor a multibase CID: {_FORMS}", what="peer id"
        ) from None
    buf = io.BytesIO(raw)
    version = _read_varint(buf)
    if version != 1:
        raise InvalidAddressError(
            text, f"it is not a CIDv1 (version {version}): {_FORMS}", what="peer id"
        )
    codec = _read_varint(buf)
    if codec != _LIBP2P_KEY:
        shown = "unreadable" if codec is None else f"0x{codec:x}"
        raise InvalidAddressError(
            text,
            f"its CID codec is {shown}, not libp2p-key (0x72): it names content, not a peer",
            what="peer id",
        )
    return buf.read()
