"""libp2p identify (/ipfs/id/1.0.0) and identify push (/ipfs/id/push/1.0.0), libp2p specs
identify/README.md: the sender writes one Identify protobuf and closes the stream.

On the wire, as py-libp2p 0.8.1, js-libp2p (@libp2p/identify 3) and go-libp2p send it: the
message behind a uvarint length. go-libp2p splits a large message in two (the signed peer record
alone in the second), so the reader merges up to ``MAX_MESSAGES`` of them, as go does. A bare
message without the length (what py-libp2p writes when set to its legacy format) is accepted
when the bytes are not a valid length-prefixed sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message
from multiaddr import Multiaddr

from supervisor.libp2p.multistream import (
    ByteStream,
    FrameError,
    FrameReader,
    deadline,
    encode_frame,
    encode_uvarint,
)

__all__ = [
    "IDENTIFY_TIMEOUT",
    "MAX_MESSAGES",
    "MAX_MESSAGE_SIZE",
    "PROTOCOL",
    "PUSH_PROTOCOL",
    "IdentifyError",
    "IdentifyInfo",
    "decode_response",
    "encode_response",
    "read_identify",
    "send_identify",
]

PROTOCOL = "/ipfs/id/1.0.0"
PUSH_PROTOCOL = "/ipfs/id/push/1.0.0"
# One message's bound: go-libp2p reads at most 8 KiB a message and js-libp2p's default
# maxMessageSize is the same, so we neither send nor accept more.
MAX_MESSAGE_SIZE = 8 * 1024
MAX_MESSAGES = 10  # go-libp2p's bound on the parts of one identify reply
_MAX_REPLY = MAX_MESSAGES * (len(encode_uvarint(MAX_MESSAGE_SIZE)) + MAX_MESSAGE_SIZE)
IDENTIFY_TIMEOUT = 10.0

_F = descriptor_pb2.FieldDescriptorProto
# The spec's proto2 message, plus signedPeerRecord (8) that peers send and we keep.
_FIELDS = (
    ("publicKey", 1, _F.TYPE_BYTES, _F.LABEL_OPTIONAL),
    ("listenAddrs", 2, _F.TYPE_BYTES, _F.LABEL_REPEATED),
    ("protocols", 3, _F.TYPE_STRING, _F.LABEL_REPEATED),
    ("observedAddr", 4, _F.TYPE_BYTES, _F.LABEL_OPTIONAL),
    ("protocolVersion", 5, _F.TYPE_STRING, _F.LABEL_OPTIONAL),
    ("agentVersion", 6, _F.TYPE_STRING, _F.LABEL_OPTIONAL),
    ("signedPeerRecord", 8, _F.TYPE_BYTES, _F.LABEL_OPTIONAL),
)


def _identify_class() -> Any:
    """The Identify message class, built from a descriptor (no protoc step), in a pool of its
    own so it cannot clash with another copy of identify.proto in the process."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="supervisor/libp2p/identify.proto", package="supervisor.libp2p", syntax="proto2"
    )
    message = proto.message_type.add(name="Identify")
    for name, number, kind, label in _FIELDS:
        message.field.add(name=name, number=number, type=kind, label=label)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("supervisor.libp2p.Identify"))


Identify = _identify_class()


class IdentifyError(ConnectionError):
    """The peer's identify reply is not an Identify message within the size bounds."""


def _multiaddr(raw: bytes) -> Multiaddr | None:
    """``raw`` as a Multiaddr, or None when it is not a canonical binary multiaddr.

    multiaddr parses bytes lazily and pads short fields, so the bytes count only when they
    print and re-encode to themselves.
    """
    try:
        parsed = Multiaddr(str(Multiaddr(raw)))
    except ValueError:  # multiaddr's parse errors all derive from it
        return None
    return parsed if parsed.to_bytes() == raw else None


@dataclass(frozen=True)
class IdentifyInfo:
    """One Identify message. Absent and empty fields are the same thing here.

    ``skipped_addrs`` counts the addresses the peer sent that did not parse: peers advertise
    transports our multiaddr package may not know (webtransport certhashes, webrtc, ...), and
    one of those must not cost us the key, protocols and other addresses (go-libp2p skips them
    too). It is not sent.
    """

    protocol_version: str = ""
    agent_version: str = ""
    public_key: bytes = b""
    listen_addrs: Sequence[Multiaddr] = ()
    observed_addr: Multiaddr | None = None
    protocols: Sequence[str] = ()
    signed_peer_record: bytes = b""
    skipped_addrs: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        # Tuples keep the frozen value immutable and hashable whatever sequence was passed.
        object.__setattr__(self, "listen_addrs", tuple(self.listen_addrs))
        object.__setattr__(self, "protocols", tuple(self.protocols))

    def encode(self) -> bytes:
        """The protobuf message (no length prefix)."""
        message = Identify(
            listenAddrs=[addr.to_bytes() for addr in self.listen_addrs],
            protocols=list(self.protocols),
        )
        if self.protocol_version:
            message.protocolVersion = self.protocol_version
        if self.agent_version:
            message.agentVersion = self.agent_version
        if self.public_key:
            message.publicKey = self.public_key
        if self.observed_addr is not None:
            message.observedAddr = self.observed_addr.to_bytes()
        if self.signed_peer_record:
            message.signedPeerRecord = self.signed_peer_record
        data: bytes = message.SerializeToString()
        if len(data) > MAX_MESSAGE_SIZE:
            raise ValueError(
                f"identify message of {len(data)} bytes is above the {MAX_MESSAGE_SIZE} bytes "
                "go- and js-libp2p accept: advertise fewer listen addresses or protocols"
            )
        return data

    @classmethod
    def decode(cls, data: bytes) -> IdentifyInfo:
        """Parse one protobuf message (no length prefix)."""
        return cls._from_message(_parse(data))

    @classmethod
    def _from_message(cls, message: Any) -> IdentifyInfo:
        addrs = [_multiaddr(raw) for raw in message.listenAddrs]
        observed = _multiaddr(message.observedAddr) if message.observedAddr else None
        skipped = addrs.count(None) + int(bool(message.observedAddr) and observed is None)
        return cls(
            protocol_version=_text(message.protocolVersion),
            agent_version=_text(message.agentVersion),
            public_key=message.publicKey,
            listen_addrs=[addr for addr in addrs if addr is not None],
            observed_addr=observed,
            # Not UTF-8, a protocol id could never be negotiated: drop it.
            protocols=[p for p in message.protocols if isinstance(p, str)],
            signed_peer_record=message.signedPeerRecord,
            skipped_addrs=skipped,
        )


def _text(value: str | bytes) -> str:
    """A proto2 string field: protobuf hands back bytes when they are not UTF-8; the version
    strings are free-form and only informative, so they keep what can be read."""
    return value if isinstance(value, str) else value.decode("utf-8", errors="replace")


def _parse(data: bytes) -> Any:
    if len(data) > MAX_MESSAGE_SIZE:
        raise IdentifyError(
            f"identify message of {len(data)} bytes is above the {MAX_MESSAGE_SIZE} bytes allowed"
        )
    message = Identify()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise IdentifyError(f"not an Identify protobuf message: {exc}") from exc
    return message


def encode_response(info: IdentifyInfo) -> bytes:
    """What the identify sender writes: the message behind its uvarint length."""
    return encode_frame(info.encode())


def _merged_frames(data: bytes) -> Message:
    reader = FrameReader(MAX_MESSAGE_SIZE)
    frames = reader.feed(data)
    if reader.pending:
        raise FrameError(f"the reply ends {reader.pending} bytes into a length-prefixed message")
    if len(frames) > MAX_MESSAGES:
        raise FrameError(f"{len(frames)} messages, above the {MAX_MESSAGES} allowed")
    merged = Identify()
    for frame in frames:
        merged.MergeFrom(_parse(frame))
    return merged


def decode_response(data: bytes) -> IdentifyInfo:
    """Everything the identify sender wrote before closing, as one ``IdentifyInfo``."""
    if not data:
        raise IdentifyError("the peer closed the identify stream without sending a message")
    try:
        return IdentifyInfo._from_message(_merged_frames(data))
    except (FrameError, IdentifyError) as exc:
        framed_error = exc
    try:  # the legacy bare message; it carries the peer's key, unlike bytes that merely parse
        bare = _parse(data)
    except IdentifyError:
        bare = None
    if bare is not None and bare.publicKey:
        return IdentifyInfo._from_message(bare)
    raise IdentifyError(
        f"the identify reply ({len(data)} bytes) is neither length-prefixed Identify messages "
        f"({framed_error}) nor one bare Identify message with a public key"
    ) from framed_error


async def send_identify(stream: ByteStream, info: IdentifyInfo) -> None:
    """Answer an identify request (or push): write the message, then close our side."""
    await stream.write(encode_response(info))
    await stream.close()


async def read_identify(
    stream: ByteStream, *, timeout: float | None = IDENTIFY_TIMEOUT
) -> IdentifyInfo:
    """Read the peer's identify message: everything until it closes its side."""
    data = bytearray()
    async with deadline(PROTOCOL, timeout, "reading the identify reply"):
        while chunk := await stream.read(_MAX_REPLY + 1 - len(data)):
            data += chunk
            if len(data) > _MAX_REPLY:
                raise IdentifyError(
                    f"the identify reply goes on past {_MAX_REPLY} bytes "
                    f"({MAX_MESSAGES} messages of {MAX_MESSAGE_SIZE} bytes)"
                )
    return decode_response(bytes(data))
