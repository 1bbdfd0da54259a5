"""One stream table serves dialled and accepted connections alike (actors/stream_table.py).

The same tests run on the streams of an outbound connection (a Supervisor dialling a listener)
and on those of the inbound one (the listener's side of that connection), over real sockets:
what a user relies on must hold whichever side dialled. Then the table alone, sans I/O.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from aioquic.quic import events as qe

from actors.connection import ConnectionOptions
from actors.errors import ConnectionClosedError
from actors.stream_table import StreamTable
from actors.streams import Stream, StreamResetError
from supervisor import Supervisor
from supervisor.core.handles import Connection
from tests.rig.certs import CertPair
from tests.rig.waiting import poll_until
from tests.support import connection_actor

#: The dialling side's stream buffer; the listener's is DEFAULT_STREAM_BUFFER (1 MiB), so the
#: two sides differ and the tests go by each table's own ``limit``.
CLIENT_LIMIT = 256 * 1024
TIMEOUT = 20


@dataclass
class Side:
    """One end of the connection: its handle, its stream table, and how it resets a stream."""

    conn: Connection
    table: StreamTable
    reset: Callable[[int, int], None]  # (stream id, error code): RESET_STREAM, sent now


@dataclass
class Ends:
    """``ours``: the side under test; ``peer``: the other end of the same connection."""

    ours: Side
    peer: Side


def _outbound(conn: Connection) -> Side:
    actor = connection_actor(conn)

    def reset(stream_id: int, code: int) -> None:
        actor.quic.reset_stream(stream_id, code)
        actor.transmit_soon()

    return Side(conn, actor.streams, reset)


def _inbound(conn: Connection) -> Side:
    proto: Any = conn._port  # the InboundProtocol behind an InboundConnection

    def reset(stream_id: int, code: int) -> None:
        proto.quic.reset_stream(stream_id, code)
        proto.transmit()

    return Side(conn, proto.streams, reset)


@pytest_asyncio.fixture(params=["outbound", "inbound"])
async def ends(request: pytest.FixtureRequest, cert: CertPair) -> AsyncIterator[Ends]:
    """One connection between two Supervisors; the parameter picks the side under test."""
    async with (
        Supervisor() as server_sup,
        Supervisor(options=ConnectionOptions(stream_buffer=CLIENT_LIMIT)) as client_sup,
    ):
        listener = await server_sup.listen(
            "/ip4/127.0.0.1/udp/0/quic-v1",
            certfile=cert.certfile,
            keyfile=cert.keyfile,
            alpn_protocols=["echo"],
        )
        client = await client_sup.dial(
            str(listener.multiaddr), alpn_protocols=["echo"], verify=False
        )
        async with asyncio.timeout(5):
            inbound = await listener.accept()
        outbound_side, inbound_side = _outbound(client), _inbound(inbound)
        # Both sides really are the one table (not two copies of the bookkeeping).
        assert type(outbound_side.table) is type(inbound_side.table) is StreamTable
        assert outbound_side.table.limit == CLIENT_LIMIT
        if request.param == "outbound":
            yield Ends(ours=outbound_side, peer=inbound_side)
        else:
            yield Ends(ours=inbound_side, peer=outbound_side)


async def _round_trip(ends: Ends) -> None:
    """A request on a fresh stream and its answer: a barrier of one round trip each way."""
    async with asyncio.timeout(TIMEOUT):
        ask = await ends.ours.conn.open_stream()
        await ask.write(b"ping")
        await ask.close()
        answer = await ends.peer.conn.accept_stream()
        assert await _read_all(answer) == b"ping"
        await answer.write(b"pong")
        await answer.close()
        assert await _read_all(ask) == b"pong"


async def _read_all(stream: Stream, bound: int | None = None) -> bytes:
    """Everything up to the peer's FIN; with ``bound``, check the unread buffer never exceeds it."""
    out = bytearray()
    while chunk := await stream.read(65536):
        if bound is not None:
            assert stream.receive_backlog <= bound
        out += chunk
    return bytes(out)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------- over real connections


async def test_write_waits_while_the_peer_does_not_read(ends: Ends) -> None:
    ours = await ends.ours.conn.open_stream()
    assert ends.ours.table.get(ours.stream_id) is ours
    peer_limit = ends.peer.table.limit
    payload = os.urandom(peer_limit + 3 * ours.limit)  # more than the peer's window + our buffer
    writer = asyncio.create_task(ours.write(payload))
    try:
        async with asyncio.timeout(TIMEOUT):
            theirs = await ends.peer.conn.accept_stream()

        def blocked() -> bool:
            # The peer holds all the credit it granted, unread; we hold a full send buffer.
            return theirs.receive_backlog == peer_limit and ours.send_backlog == ours.limit

        await poll_until(blocked, TIMEOUT, what="peer window and our send buffer full")
        for _ in range(2):  # round trips happen, acknowledgements arrive: no room appears
            await _round_trip(ends)
        assert not writer.done(), "write() returned while the send buffer was full"
        assert blocked()

        async with asyncio.timeout(TIMEOUT):  # the peer reads: the write resumes and completes
            reader = asyncio.create_task(_read_all(theirs, bound=peer_limit))
            await writer
            await ours.close()
            assert _digest(await reader) == _digest(payload)
    finally:
        writer.cancel()


async def test_credit_is_withheld_while_we_do_not_read(ends: Ends) -> None:
    theirs = await ends.peer.conn.open_stream()
    payload = os.urandom(3 * ends.ours.table.limit + theirs.limit)
    writer = asyncio.create_task(theirs.write(payload))
    try:
        async with asyncio.timeout(TIMEOUT):
            ours = await ends.ours.conn.accept_stream()  # a stream the peer opened
        assert ends.ours.table.get(ours.stream_id) is ours

        def stalled() -> bool:
            return ours.receive_backlog == ours.limit and theirs.send_backlog == theirs.limit

        await poll_until(stalled, TIMEOUT, what="our buffer full, the peer's writes stalled")
        for _ in range(2):  # time passes, round trips happen: no credit is granted meanwhile
            await _round_trip(ends)
        assert ours.receive_backlog == ours.limit
        assert not writer.done(), "the peer's write() completed past our receive buffer"

        async with asyncio.timeout(TIMEOUT):  # reading releases credit, a window at a time
            reader = asyncio.create_task(_read_all(ours, bound=ours.limit))
            await writer
            await theirs.close()
            assert _digest(await reader) == _digest(payload)
    finally:
        writer.cancel()


async def test_transfers_larger_than_the_buffers_complete_intact(ends: Ends) -> None:
    ours = await ends.ours.conn.open_stream()
    limit = max(ends.ours.table.limit, ends.peer.table.limit)
    up, down = os.urandom(4 * limit), os.urandom(4 * limit + 12345)

    async def our_side() -> bytes:
        await ours.write(up)
        await ours.close()
        return await _read_all(ours, bound=ours.limit)

    async def peer_side() -> bytes:
        theirs = await ends.peer.conn.accept_stream()
        received = asyncio.create_task(_read_all(theirs, bound=theirs.limit))
        await theirs.write(down)
        await theirs.close()
        return await received

    async with asyncio.timeout(60):
        got_down, got_up = await asyncio.gather(our_side(), peer_side())
    assert len(got_up) == len(up) and _digest(got_up) == _digest(up)
    assert len(got_down) == len(down) and _digest(got_down) == _digest(down)


async def test_close_ends_our_side_and_reading_goes_on_until_the_peers_fin(ends: Ends) -> None:
    ours = await ends.ours.conn.open_stream()
    async with asyncio.timeout(TIMEOUT):
        await ours.write(b"request")
        await ours.close()
        with pytest.raises(ValueError, match="closed for writing"):
            await ours.write(b"more")
        theirs = await ends.peer.conn.accept_stream()
        assert await _read_all(theirs) == b"request"  # the data, then b"" for our FIN
        assert theirs.at_eof

        await theirs.write(b"reply, ")  # our side is closed; theirs is not
        assert await ours.readexactly(7) == b"reply, "
        await theirs.write(b"in two parts")
        await theirs.close()
        assert await _read_all(ours) == b"in two parts"
        assert await ours.read() == b""
    assert ours.finished

    # Done both ways: the table forgets the stream once the QUIC layer does (FIN acknowledged).
    async with asyncio.timeout(TIMEOUT):
        while ends.ours.table.get(ours.stream_id) is not None:
            await _round_trip(ends)


async def test_a_reset_by_the_peer_fails_our_reads_with_its_code(ends: Ends) -> None:
    ours = await ends.ours.conn.open_stream()
    async with asyncio.timeout(TIMEOUT):
        await ours.write(b"x")
        theirs = await ends.peer.conn.accept_stream()
        assert await theirs.read() == b"x"
        ends.peer.reset(theirs.stream_id, 0x42)
        with pytest.raises(StreamResetError) as caught:
            while True:
                await ours.read()
    assert caught.value.error_code == 0x42
    assert caught.value.stream_id == ours.stream_id


async def test_peer_opened_streams_are_accepted_in_order(ends: Ends) -> None:
    opened = [await ends.peer.conn.open_stream() for _ in range(3)]
    async with asyncio.timeout(TIMEOUT):
        for n, theirs in enumerate(opened):
            await theirs.write(b"stream %d" % n)
        for n, theirs in enumerate(opened):
            ours = await ends.ours.conn.accept_stream()
            assert ours.stream_id == theirs.stream_id
            assert await ours.readexactly(8) == b"stream %d" % n
            assert ends.ours.table.get(ours.stream_id) is ours


async def test_streams_fail_when_the_connection_closes(ends: Ends) -> None:
    ours = await ends.ours.conn.open_stream()
    async with asyncio.timeout(TIMEOUT):
        await ours.write(b"x")
        await ends.peer.conn.accept_stream()
        waiting = asyncio.ensure_future(ends.ours.conn.accept_stream())
        await ends.peer.conn.close()
        with pytest.raises(ConnectionClosedError):
            await waiting  # not a wait for ever
        with pytest.raises(ConnectionClosedError):
            while True:
                await ours.read()
    with pytest.raises(ConnectionClosedError):
        await ours.write(b"y")
    with pytest.raises(ConnectionClosedError):
        await ends.ours.conn.open_stream()


# ---------------------------------------------------------------------- the table alone


class FakeTransport:
    """A StreamTransport that records what the table asks of it (no connection, no I/O)."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.alive: set[int] = set()  # streams the "QUIC layer" still has
        self.backlog: dict[int, int] = {}  # unacknowledged bytes per stream
        self.sent: list[tuple[int, bytes, bool]] = []
        self.credit: list[tuple[int, int, int, bool]] = []
        self.sent_once = asyncio.Event()

    def check_open(self) -> None:
        if self.error is not None:
            raise self.error

    def stream_send(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        self.alive.add(stream_id)
        self.sent.append((stream_id, data, end_stream))
        self.backlog[stream_id] = self.backlog.get(stream_id, 0) + len(data)
        self.sent_once.set()

    def stream_send_backlog(self, stream_id: int) -> int:
        return self.backlog.get(stream_id, 0)

    def set_receive_backlog(self, stream_id: int, unread: int, limit: int, *, due: bool) -> None:
        self.credit.append((stream_id, unread, limit, due))

    def next_stream_id(self) -> int:
        """Like aioquic: the lowest client bidi id it has no stream for (it makes one on send)."""
        stream_id = 0
        while stream_id in self.alive:
            stream_id += 4
        return stream_id

    def has_stream(self, stream_id: int) -> bool:
        return stream_id in self.alive


def _data(stream_id: int, data: bytes, fin: bool = False) -> qe.StreamDataReceived:
    return qe.StreamDataReceived(data=data, end_stream=fin, stream_id=stream_id)


async def test_table_queues_peer_streams_for_accept_when_no_on_accept() -> None:
    fake = FakeTransport()
    table = StreamTable(fake, limit=1000)
    table.open()
    assert table._incoming is None  # the accept queue (~2.5 KiB) only once needed
    assert table.handle_event(_data(1, b"a"))
    assert table.handle_event(_data(5, b"b"))
    assert table.handle_event(_data(1, b"c"))  # a known stream: fed, not announced again
    async with asyncio.timeout(1):
        first, second = await table.accept(), await table.accept()
    assert (first.stream_id, second.stream_id) == (1, 5)
    assert first.receive_backlog == 2 and table.get(1) is first
    # Receipt records the backlog without asking for credit; reading asks.
    assert fake.credit[-1] == (1, 2, 1000, False)
    assert await first.read() == b"ac"
    assert fake.credit[-1] == (1, 0, 1000, True)


async def test_streams_opened_before_any_write_get_their_own_ids() -> None:
    fake = FakeTransport()
    table = StreamTable(fake, limit=1000)
    first, second = table.open(), table.open()  # the QUIC layer knows neither yet
    assert (first.stream_id, second.stream_id) == (0, 4)
    await second.write(b"2")
    await first.write(b"1")
    assert fake.sent == [(4, b"2", False), (0, b"1", False)]
    assert table.open().stream_id == 8


async def test_table_hands_peer_streams_to_on_accept_instead() -> None:
    announced: list[Stream] = []
    table = StreamTable(FakeTransport(), limit=1000, on_accept=announced.append)
    table.handle_event(_data(1, b"hello", fin=True))
    table.handle_event(_data(1, b""))
    [stream] = announced
    assert stream.stream_id == 1 and len(table) == 1
    assert table._incoming is None
    assert await stream.read() == b"hello"


async def test_table_consumes_only_stream_events() -> None:
    table = StreamTable(FakeTransport(), limit=1000)
    assert not table.handle_event(qe.PingAcknowledged(uid=1))
    assert not table.handle_event(
        qe.ConnectionTerminated(error_code=0, frame_type=None, reason_phrase="")
    )
    assert table.handle_event(qe.StreamReset(error_code=7, stream_id=9))  # unknown: no stream
    assert len(table) == 0
    stream = table.open()
    assert table.handle_event(qe.StreamReset(error_code=7, stream_id=stream.stream_id))
    with pytest.raises(StreamResetError) as caught:
        await stream.read()
    assert caught.value.error_code == 7


async def test_service_wakes_writers_and_drops_streams_done_both_ways() -> None:
    fake = FakeTransport()
    table = StreamTable(fake, limit=100)
    stream = table.open()
    writer = asyncio.create_task(stream.write(b"x" * 150))
    async with asyncio.timeout(1):
        await fake.sent_once.wait()  # the writer ran until its buffer was full
    assert not writer.done()
    assert [len(data) for _, data, _ in fake.sent] == [100]
    fake.backlog[stream.stream_id] = 0  # acknowledged
    table.service()
    async with asyncio.timeout(1):
        await writer
    assert sum(len(data) for _, data, _ in fake.sent) == 150

    done = table.open()
    half = table.open()
    for s in (stream, done, half):
        table.handle_event(_data(s.stream_id, b"", fin=True))
    await stream.close()
    await done.close()  # ``half``: the peer's FIN came, ours did not go
    assert fake.sent[-1] == (done.stream_id, b"", True)
    table.service()
    assert len(table) == 3  # finished, but the QUIC layer still has them
    fake.alive.clear()
    table.service()
    assert table.get(stream.stream_id) is None and table.get(done.stream_id) is None
    assert table.get(half.stream_id) is half
    assert await done.read() == b""  # a dropped stream's handle still reads


async def test_fail_all_fails_every_reader_and_writer() -> None:
    fake = FakeTransport()
    table = StreamTable(fake, limit=100)
    a, b = table.open(), table.open()
    reading = asyncio.Event()

    async def read_a() -> bytes:
        reading.set()
        return await a.read()  # no data: waits until something happens

    reader = asyncio.create_task(read_a())
    async with asyncio.timeout(1):
        await reading.wait()  # the reader ran until it blocked in read()
    assert not reader.done()
    fake.error = ConnectionClosedError("c1")
    error = ConnectionClosedError("c1", reason="gone")
    table.fail_all(error)
    async with asyncio.timeout(1):
        with pytest.raises(ConnectionClosedError) as caught:
            await reader
    assert caught.value is error
    with pytest.raises(ConnectionClosedError):
        await b.write(b"y")
    with pytest.raises(ConnectionClosedError):
        table.open()
    with pytest.raises(ConnectionClosedError):
        await table.accept()
