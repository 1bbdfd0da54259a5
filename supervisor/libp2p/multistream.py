"""multistream-select 1.0.0: agree on one protocol per stream (libp2p specs, connections/README.md).

Every message is a uvarint length, then UTF-8 text, then "\\n" (the length counts the newline).
The codec is sans-I/O: ``FrameReader`` and ``MessageReader`` take bytes and give back messages,
and say through ``wants`` how many bytes they need next, so the async roles read exactly the
negotiation and leave whatever the peer sent after it (a pipelined request, an identify reply)
in the stream for the protocol that follows.

The errors here are ``ConnectionError`` subclasses, not ``MigrationError`` ones: they are the
peer breaking a stream protocol (as ``actors.streams.StreamResetError`` is), not a failure of
migration, and the library's error list travels over the remote wire by name; whether they join
it is the integrator's call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

__all__ = [
    "LS",
    "MAX_MESSAGE",
    "MAX_PROPOSALS",
    "MULTISTREAM",
    "NA",
    "NEGOTIATION_TIMEOUT",
    "ByteStream",
    "FrameError",
    "FrameReader",
    "MessageReader",
    "NoCommonProtocolError",
    "ProtocolNegotiationError",
    "ProtocolTimeoutError",
    "deadline",
    "encode_frame",
    "encode_message",
    "encode_uvarint",
    "negotiate",
    "select",
]

MULTISTREAM = "/multistream/1.0.0"
NA = "na"
LS = "ls"
# Bytes after the length prefix, newline included: go-multistream and js-libp2p refuse longer
# messages, so a protocol id is at most 1023 bytes of UTF-8.
MAX_MESSAGE = 1024
# Proposals the responder answers on one stream before it gives up on the initiator.
MAX_PROPOSALS = 32
# go-libp2p's basic host allows 10 s for a negotiation; so do we, both ways.
NEGOTIATION_TIMEOUT = 10.0


class ByteStream(Protocol):
    """What the protocols here run over: ``actors.streams.Stream``, or any duplex byte stream."""

    async def read(self, n: int = -1) -> bytes: ...  # b"" at the end of the stream

    async def readexactly(self, n: int) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...  # half-close: FIN; reading goes on


class FrameError(ValueError):
    """Bytes that are not a uvarint-length-prefixed frame within the reader's bound."""


class ProtocolNegotiationError(ConnectionError):
    """The peer broke multistream-select (bad framing, wrong header, an unexpected answer,
    too many proposals) or the stream ended before a protocol was agreed."""


class NoCommonProtocolError(ProtocolNegotiationError):
    """The peer answered "na" to every protocol offered."""

    def __init__(self, offered: Sequence[str]) -> None:
        self.offered = list(offered)
        super().__init__(
            f"the peer supports none of the protocols offered: {', '.join(self.offered)}; "
            "offer one the peer handles (its identify reply lists them)"
        )


class ProtocolTimeoutError(ConnectionError, TimeoutError):
    """A libp2p stream protocol did not finish in time (``protocol`` names which)."""

    def __init__(self, protocol: str, timeout: float, doing: str) -> None:
        self.protocol = protocol
        self.timeout = timeout
        super().__init__(
            f"{protocol}: {doing} took longer than {timeout:g} s; the peer is slow or stuck "
            "(raise the timeout argument if the path is known to be slow)"
        )


def encode_uvarint(value: int) -> bytes:
    """The multiformats unsigned varint (7 bits a byte, low group first)."""
    if value < 0:
        raise ValueError(f"a uvarint cannot encode the negative number {value}")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_frame(payload: bytes) -> bytes:
    """``payload`` behind its uvarint length."""
    return encode_uvarint(len(payload)) + payload


def encode_message(text: str) -> bytes:
    """One multistream-select message: length, ``text`` in UTF-8, newline."""
    if "\n" in text:
        raise ValueError(f"a multistream-select message cannot contain a newline: {text!r}")
    body = text.encode("utf-8") + b"\n"
    if len(body) > MAX_MESSAGE:
        raise ValueError(
            f"multistream-select message of {len(body)} bytes (newline included) is longer "
            f"than the {MAX_MESSAGE} bytes peers accept: shorten {text[:40]!r}..."
        )
    return encode_frame(body)


class FrameReader:
    """Incremental uvarint-length-prefixed frame decoder, bounded by ``max_length``.

    Refuses non-minimal length prefixes (the multiformats varint spec forbids them) and
    lengths above ``max_length``, raising ``FrameError``.
    """

    def __init__(self, max_length: int) -> None:
        if max_length < 0:
            raise ValueError(f"max_length must be >= 0, got {max_length}")
        self.max_length = max_length
        self._max_prefix = len(encode_uvarint(max_length))
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held of a frame not complete yet (0 between frames)."""
        return len(self._buf)

    @property
    def wants(self) -> int:
        """How many bytes to read next to make progress without reading past the frame."""
        header = self._header()
        if header is None:
            return 1
        prefix, length = header
        return prefix + length - len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the frames it completed (bytes after them are kept)."""
        self._buf += data
        frames: list[bytes] = []
        while (header := self._header()) is not None:
            prefix, length = header
            end = prefix + length
            if len(self._buf) < end:
                break
            frames.append(bytes(self._buf[prefix:end]))
            del self._buf[:end]
        return frames

    def _header(self) -> tuple[int, int] | None:
        """(prefix length, frame length) once the prefix is complete, else None."""
        value = 0
        for i, byte in enumerate(self._buf[: self._max_prefix]):
            value |= (byte & 0x7F) << (7 * i)
            if byte & 0x80:
                continue
            if byte == 0 and i > 0:
                raise FrameError(f"non-minimal uvarint length prefix {self._buf[: i + 1].hex()}")
            if value > self.max_length:
                raise FrameError(
                    f"frame length {value} is above the limit of {self.max_length} bytes"
                )
            return i + 1, value
        if len(self._buf) >= self._max_prefix:
            raise FrameError(
                f"length prefix {self._buf[: self._max_prefix].hex()}... announces more than "
                f"the limit of {self.max_length} bytes"
            )
        return None


class MessageReader:
    """Incremental multistream-select decoder: bytes in, complete messages (newline stripped) out.

    Raises ``ProtocolNegotiationError`` for a length above ``MAX_MESSAGE``, a message that does
    not end in a newline, or one that is not UTF-8.
    """

    def __init__(self) -> None:
        self._frames = FrameReader(MAX_MESSAGE)

    @property
    def wants(self) -> int:
        """How many bytes to read next without reading past the current message."""
        return self._frames.wants

    @property
    def pending(self) -> int:
        return self._frames.pending

    def feed(self, data: bytes) -> list[str]:
        try:
            frames = self._frames.feed(data)
        except FrameError as exc:
            raise ProtocolNegotiationError(f"bad multistream-select message: {exc}") from exc
        return [_text(frame) for frame in frames]


def _text(frame: bytes) -> str:
    if not frame.endswith(b"\n"):
        raise ProtocolNegotiationError(
            f"multistream-select message {frame[:60]!r} does not end in a newline"
        )
    try:
        return frame[:-1].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolNegotiationError(
            f"multistream-select message {frame[:60]!r} is not UTF-8"
        ) from exc


async def _read_message(stream: ByteStream, reader: MessageReader) -> str:
    while True:
        chunk = await stream.read(reader.wants)
        if not chunk:
            raise ProtocolNegotiationError(
                "the stream ended during multistream-select negotiation"
                + (f" ({reader.pending} bytes into a message)" if reader.pending else "")
            )
        messages = reader.feed(chunk)
        if messages:
            return messages[0]


@asynccontextmanager
async def deadline(protocol: str, timeout: float | None, doing: str) -> AsyncIterator[None]:
    """``asyncio.timeout`` raising ``ProtocolTimeoutError`` (None: no deadline)."""
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds or None, got {timeout}")
    scope = asyncio.timeout(timeout)
    try:
        async with scope:
            yield
    except TimeoutError as exc:
        if not scope.expired() or isinstance(exc, ProtocolTimeoutError):
            raise  # someone else's timeout, or an inner deadline already named itself
        raise ProtocolTimeoutError(protocol, timeout or 0.0, doing) from exc


def _check_protocol_id(protocol: str) -> None:
    if not isinstance(protocol, str) or not protocol:
        raise ValueError(f"a protocol id must be a non-empty string, got {protocol!r}")
    if protocol in (MULTISTREAM, NA, LS):
        raise ValueError(f"{protocol!r} is reserved by multistream-select, not a protocol id")
    encode_message(protocol)  # the newline and length checks


async def select(
    stream: ByteStream, protocols: Sequence[str], *, timeout: float | None = NEGOTIATION_TIMEOUT
) -> str:
    """Initiator: propose ``protocols`` in order; return the first the peer accepts.

    Pipelined: the header and the first proposal go out in one write, so a peer that accepts
    it costs one round trip. Raises ``NoCommonProtocolError`` when all are refused.
    The stream stays the caller's to use or to reset, also on failure.
    """
    if isinstance(protocols, str):
        raise TypeError(f"protocols must be a list of protocol ids, not the string {protocols!r}")
    offered = list(protocols)
    if not offered:
        raise ValueError("select() needs at least one protocol to propose")
    for protocol in offered:
        _check_protocol_id(protocol)
    reader = MessageReader()
    async with deadline(MULTISTREAM, timeout, "selecting a protocol"):
        await stream.write(encode_message(MULTISTREAM) + encode_message(offered[0]))
        header = await _read_message(stream, reader)
        if header != MULTISTREAM:
            raise ProtocolNegotiationError(
                f"the peer answered {header[:60]!r} instead of the {MULTISTREAM} header: "
                "it does not speak multistream-select on this stream"
            )
        for i, protocol in enumerate(offered):
            if i:
                await stream.write(encode_message(protocol))
            answer = await _read_message(stream, reader)
            if answer == protocol:
                return protocol
            if answer != NA:
                raise ProtocolNegotiationError(
                    f"the peer answered {answer[:60]!r} to the proposal {protocol!r} "
                    f'(expected the same id or "{NA}")'
                )
    raise NoCommonProtocolError(offered)


def _ls_reply(supported: Iterable[str]) -> bytes | None:
    """The "ls" answer as go and js send it: one message holding each protocol as a message
    of its own, then a newline. None when it would not fit in one message."""
    body = b"".join(encode_message(p) for p in sorted(supported)) + b"\n"
    return encode_frame(body) if len(body) <= MAX_MESSAGE else None


async def negotiate(
    stream: ByteStream,
    supported: Iterable[str],
    *,
    timeout: float | None = NEGOTIATION_TIMEOUT,
    max_proposals: int = MAX_PROPOSALS,
) -> str:
    """Responder: answer the initiator's proposals until one is in ``supported``; return it.

    Unknown proposals get "na"; "ls" gets the supported list (or "na" when it would not fit in
    one message). After ``max_proposals`` answers without agreement, or past ``timeout``,
    it gives up (the caller resets the stream).
    """
    if isinstance(supported, str):
        raise TypeError(f"supported must be a collection of protocol ids, not {supported!r}")
    known = frozenset(supported)
    for protocol in known:
        _check_protocol_id(protocol)
    if max_proposals < 1:
        raise ValueError(f"max_proposals must be >= 1, got {max_proposals}")
    reader = MessageReader()
    async with deadline(MULTISTREAM, timeout, "answering a protocol negotiation"):
        header = await _read_message(stream, reader)
        if header != MULTISTREAM:
            raise ProtocolNegotiationError(
                f"the initiator opened with {header[:60]!r}, not the {MULTISTREAM} header"
            )
        await stream.write(encode_message(MULTISTREAM))
        for _ in range(max_proposals):
            proposal = await _read_message(stream, reader)
            if proposal in known:
                await stream.write(encode_message(proposal))
                return proposal
            listing = _ls_reply(known) if proposal == LS else None
            await stream.write(listing or encode_message(NA))
    raise ProtocolNegotiationError(
        f"the initiator made {max_proposals} proposals without one we support "
        f"({', '.join(sorted(known)) or 'none registered'})"
    )
