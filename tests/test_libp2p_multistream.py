"""multistream-select 1.0.0: the codec (byte vectors from the spec, hypothesis round trips and
garbage) and the initiator against the responder over an in-memory stream pair."""

from __future__ import annotations

import asyncio
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.libp2p.multistream import (
    MAX_MESSAGE,
    MAX_PROPOSALS,
    MULTISTREAM,
    FrameError,
    FrameReader,
    MessageReader,
    NoCommonProtocolError,
    ProtocolNegotiationError,
    ProtocolTimeoutError,
    encode_message,
    encode_uvarint,
    negotiate,
    select,
)

PING = "/ipfs/ping/1.0.0"


class _Half:
    """One direction of the pipe: bytes in flight and whether the writer sent FIN."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.fin = False
        self.changed = asyncio.Event()


class MemoryStream:
    """One end of an in-memory duplex stream with half-close, as ``ByteStream`` wants.
    ``writes`` records each write call, to check what went out together."""

    def __init__(self, rx: _Half, tx: _Half) -> None:
        self._rx, self._tx = rx, tx
        self.writes: list[bytes] = []

    async def read(self, n: int = -1) -> bytes:
        while not self._rx.buf and not self._rx.fin:
            self._rx.changed.clear()
            await self._rx.changed.wait()
        size = len(self._rx.buf) if n < 0 else min(n, len(self._rx.buf))
        data = bytes(self._rx.buf[:size])
        del self._rx.buf[:size]
        return data

    async def readexactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = await self.read(n - len(data))
            if not chunk:
                raise asyncio.IncompleteReadError(data, n)
            data += chunk
        return data

    async def write(self, data: bytes) -> None:
        assert not self._tx.fin, "write after close"
        self.writes.append(bytes(data))
        self._tx.buf += data
        self._tx.changed.set()

    async def close(self) -> None:
        self._tx.fin = True
        self._tx.changed.set()


def stream_pair() -> tuple[MemoryStream, MemoryStream]:
    a_to_b, b_to_a = _Half(), _Half()
    return MemoryStream(b_to_a, a_to_b), MemoryStream(a_to_b, b_to_a)


async def read_all(stream: MemoryStream) -> bytes:
    out = b""
    while chunk := await stream.read():
        out += chunk
    return out


def decode_all(data: bytes) -> list[str]:
    reader = MessageReader()
    messages = reader.feed(data)
    assert reader.pending == 0
    return messages


# -- codec ------------------------------------------------------------------------------------


def test_message_vectors_from_the_spec() -> None:
    assert encode_message("na") == bytes.fromhex("036e610a")
    assert encode_message(MULTISTREAM) == b"\x13/multistream/1.0.0\n"


@pytest.mark.parametrize(
    ("value", "encoded"),
    [(0, "00"), (1, "01"), (127, "7f"), (128, "8001"), (255, "ff01"), (300, "ac02"),
     (16384, "808001")],
)  # fmt: skip
def test_uvarint_vectors_from_the_multiformats_spec(value: int, encoded: str) -> None:
    assert encode_uvarint(value).hex() == encoded


protocol_texts = st.text(
    alphabet=st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=300
).filter(lambda t: len(t.encode()) < MAX_MESSAGE)


@given(st.lists(protocol_texts, max_size=8), st.data())
def test_messages_survive_any_chunking(texts: list[str], data: st.DataObject) -> None:
    wire = b"".join(encode_message(t) for t in texts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    reader = MessageReader()
    got: list[str] = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        got += reader.feed(wire[start:end])
    assert got == texts
    assert reader.pending == 0


@given(st.lists(protocol_texts, min_size=1, max_size=5))
def test_reading_what_the_reader_wants_stops_at_each_message(texts: list[str]) -> None:
    wire = b"".join(encode_message(t) for t in texts)
    reader = MessageReader()
    offset, boundaries = 0, []
    while offset < len(wire):
        want = reader.wants
        assert want >= 1
        if reader.feed(wire[offset : offset + want]):
            boundaries.append(offset + want)
        offset += want
    expected, end = [], 0
    for text in texts:
        end += len(encode_message(text))
        expected.append(end)
    assert boundaries == expected


@given(st.binary(max_size=2048))
def test_garbage_gives_messages_or_a_negotiation_error(data: bytes) -> None:
    reader = MessageReader()
    try:
        messages = reader.feed(data)
    except ProtocolNegotiationError:
        return
    consumed = b"".join(encode_message(m) for m in messages)
    assert data.startswith(consumed)
    assert reader.pending == len(data) - len(consumed)


@pytest.mark.parametrize(
    ("wire", "complaint"),
    [
        (b"\x81\x08", "above the limit"),  # 1025 announced: refused before the body arrives
        (b"\xff\xff\xff", "announces more"),
        (b"\x83\x00", "non-minimal"),
        (b"\x03abc", "newline"),
        (b"\x00", "newline"),
        (b"\x03\xff\xfe\n", "not UTF-8"),
    ],
)
def test_the_reader_refuses_bad_messages(wire: bytes, complaint: str) -> None:
    with pytest.raises(ProtocolNegotiationError, match=complaint):
        MessageReader().feed(wire)


def test_the_longest_message_is_accepted() -> None:
    text = "/" + "x" * (MAX_MESSAGE - 2)
    assert decode_all(encode_message(text)) == [text]


@pytest.mark.parametrize(
    ("text", "complaint"), [("a\nb", "newline"), ("/" + "x" * (MAX_MESSAGE - 1), "longer than")]
)
def test_encode_refuses_what_peers_cannot_read(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        encode_message(text)


def test_frame_reader_holds_bytes_after_a_frame() -> None:
    reader = FrameReader(16)
    assert reader.feed(b"\x02ab\x03c") == [b"ab"]
    assert reader.pending == 2 and reader.wants == 2
    assert reader.feed(b"de") == [b"cde"]
    with pytest.raises(FrameError):
        FrameReader(16).feed(b"\x11")


# -- initiator against responder ----------------------------------------------------------------


async def test_agreement_then_the_stream_carries_the_protocol() -> None:
    init, resp = stream_pair()
    chosen = await asyncio.gather(select(init, [PING]), negotiate(resp, {PING, "/other/1"}))
    assert chosen == [PING, PING]
    await init.write(b"payload")
    assert await resp.read() == b"payload"
    # Pipelined: the header and the proposal left in one write.
    assert init.writes[0] == b"\x13/multistream/1.0.0\n\x11/ipfs/ping/1.0.0\n"


async def test_na_then_the_next_proposal_is_agreed() -> None:
    init, resp = stream_pair()
    chosen = await asyncio.gather(select(init, ["/unknown/1.0.0", PING]), negotiate(resp, {PING}))
    assert chosen == [PING, PING]
    assert decode_all(b"".join(resp.writes)) == [MULTISTREAM, "na", PING]


async def test_no_common_protocol_names_what_was_offered() -> None:
    init, resp = stream_pair()
    responder = asyncio.create_task(negotiate(resp, {PING}))
    with pytest.raises(NoCommonProtocolError, match="/a/1, /b/1") as caught:
        await select(init, ["/a/1", "/b/1"])
    assert caught.value.offered == ["/a/1", "/b/1"]
    await init.close()  # the initiator gives up: the responder sees the stream end
    with pytest.raises(ProtocolNegotiationError, match="ended"):
        await responder


async def test_the_responder_answers_a_bounded_number_of_proposals() -> None:
    init, resp = stream_pair()
    wire = encode_message(MULTISTREAM)
    wire += b"".join(encode_message(f"/unknown/{i}") for i in range(MAX_PROPOSALS + 8))
    await init.write(wire)
    with pytest.raises(ProtocolNegotiationError, match=f"{MAX_PROPOSALS} proposals"):
        await negotiate(resp, {PING})
    assert decode_all(b"".join(resp.writes)) == [MULTISTREAM] + ["na"] * MAX_PROPOSALS


async def test_the_responder_refuses_an_overlong_line_unanswered() -> None:
    init, resp = stream_pair()
    await init.write(encode_message(MULTISTREAM) + b"\x81\x08" + b"x" * 1025)
    with pytest.raises(ProtocolNegotiationError, match="above the limit"):
        await negotiate(resp, {PING})
    assert decode_all(b"".join(resp.writes)) == [MULTISTREAM]


async def test_the_initiator_refuses_an_overlong_answer() -> None:
    init, resp = stream_pair()
    await resp.write(encode_message(MULTISTREAM) + b"\x81\x08")
    with pytest.raises(ProtocolNegotiationError, match="above the limit"):
        await select(init, [PING])


async def test_end_of_stream_mid_message_fails_the_responder() -> None:
    init, resp = stream_pair()
    await init.write(encode_message(MULTISTREAM) + encode_message(PING)[:5])
    await init.close()
    with pytest.raises(ProtocolNegotiationError, match=r"ended .*\(5 bytes into a message\)"):
        await negotiate(resp, {PING})


async def test_end_of_stream_after_the_header_fails_the_initiator() -> None:
    init, resp = stream_pair()
    await resp.write(encode_message(MULTISTREAM))
    await resp.close()
    with pytest.raises(ProtocolNegotiationError, match="ended"):
        await select(init, [PING])


async def test_a_wrong_header_is_refused_both_ways() -> None:
    init, resp = stream_pair()
    await init.write(encode_message("/multistream/2.0.0") + encode_message(PING))
    with pytest.raises(
        ProtocolNegotiationError, match=re.escape("not the /multistream/1.0.0 header")
    ):
        await negotiate(resp, {PING})
    assert resp.writes == []

    init, resp = stream_pair()
    await resp.write(encode_message(PING))
    with pytest.raises(
        ProtocolNegotiationError, match=re.escape("instead of the /multistream/1.0.0")
    ):
        await select(init, [PING])


async def test_the_initiator_refuses_an_answer_that_is_neither_echo_nor_na() -> None:
    init, resp = stream_pair()
    await resp.write(encode_message(MULTISTREAM) + encode_message("/something/else"))
    with pytest.raises(ProtocolNegotiationError, match="expected the same id"):
        await select(init, [PING])


async def test_pipelined_bytes_in_one_write_leave_the_protocol_data_in_the_stream() -> None:
    """A peer that sends header, proposal and its first protocol bytes at once (js-libp2p's
    optimistic select): negotiation reads only its own messages."""
    init, resp = stream_pair()
    await init.write(encode_message(MULTISTREAM) + encode_message(PING) + b"\x00" * 32)
    assert await negotiate(resp, {PING}) == PING
    assert await resp.read() == b"\x00" * 32

    # And the other way: the echo and the reply's first bytes arrive together.
    init, resp = stream_pair()
    await resp.write(encode_message(MULTISTREAM) + encode_message(PING) + b"reply")
    assert await select(init, [PING]) == PING
    assert await init.read() == b"reply"


async def test_ls_lists_the_supported_protocols() -> None:
    init, resp = stream_pair()
    responder = asyncio.create_task(negotiate(resp, {PING, "/ipfs/id/1.0.0"}))
    await init.write(encode_message(MULTISTREAM) + encode_message("ls"))
    reader = MessageReader()
    header = await init.readexactly(len(encode_message(MULTISTREAM)))
    assert reader.feed(header) == [MULTISTREAM]
    frames = FrameReader(MAX_MESSAGE)
    listing: list[bytes] = []
    while not listing:
        listing = frames.feed(await init.read(frames.wants))
    assert listing[0].endswith(b"\n")
    assert decode_all(listing[0][:-1]) == ["/ipfs/id/1.0.0", PING]
    await init.write(encode_message(PING))
    assert await responder == PING


async def test_a_silent_initiator_times_the_responder_out() -> None:
    _, resp = stream_pair()
    with pytest.raises(ProtocolTimeoutError, match=re.escape(MULTISTREAM)) as caught:
        await negotiate(resp, {PING}, timeout=0.05)
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.timeout == 0.05


@pytest.mark.parametrize(
    ("protocols", "error"),
    [([], ValueError), ("/ipfs/ping/1.0.0", TypeError), (["na"], ValueError), ([""], ValueError),
     (["/a\n"], ValueError)],
)  # fmt: skip
async def test_select_refuses_bad_arguments_before_writing(
    protocols: list[str], error: type[Exception]
) -> None:
    init, _ = stream_pair()
    with pytest.raises(error):
        await select(init, protocols)
    assert init.writes == []
