"""One table of a connection's streams, whichever side dialled.

The client's ConnectionActor and the server's InboundProtocol need the same bookkeeping: streams
by id, peer-opened streams announced, writers woken as acknowledgements free their buffer,
credit recorded as bytes arrive and are read, streams forgotten once done both ways, all failed
when the connection ends. :class:`StreamTable` is that bookkeeping, once; it reaches its
connection only through the narrow :class:`StreamTransport` port, so the two sides differ only
in how they send and grant credit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, ItemsView
from typing import Protocol

from aioquic.quic import events as qe
from aioquic.quic.connection import QuicConnection

from actors.quic_adapter import (
    StreamCredit,
    follow_rebindings,
    has_stream,
    stream_send_backlog,
)
from actors.streams import DEFAULT_STREAM_BUFFER, Stream, StreamResetError

__all__ = ["QuicStreamTransport", "StreamTable", "StreamTransport"]


class StreamTransport(Protocol):
    """What a StreamTable needs of its connection, and nothing more."""

    def check_open(self) -> None:
        """Raise the connection's error once it is closed."""
        ...

    def stream_send(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        """Queue stream data (and FIN) and schedule its transmission."""
        ...

    def stream_send_backlog(self, stream_id: int) -> int:
        """Bytes written to the stream and not yet acknowledged."""
        ...

    def set_receive_backlog(self, stream_id: int, unread: int, limit: int, *, due: bool) -> None:
        """Record the stream's unread bytes (its credit is bounded by them); schedule a
        transmission when ``due`` and new credit is due."""
        ...

    def next_stream_id(self) -> int:
        """The id of the next locally-initiated bidirectional stream."""
        ...

    def has_stream(self, stream_id: int) -> bool:
        """False once the QUIC layer discarded the stream (both directions finished)."""
        ...


class StreamTable:
    """A connection's streams by id, and the owner (``StreamOwner``) of each of them."""

    # A table per connection (bench B4 counts RSS per connection): slots, and the accept queue
    # (~2.5 KiB) only once someone accepts or the peer opens a stream without ``on_accept``.
    __slots__ = ("_incoming", "_on_accept", "_streams", "_transport", "limit")

    def __init__(
        self,
        transport: StreamTransport,
        limit: int = DEFAULT_STREAM_BUFFER,
        on_accept: Callable[[Stream], None] | None = None,
    ) -> None:
        """``limit`` bounds each stream's buffers both ways; ``on_accept`` is given each stream
        the peer opens (a server starting its handler), else they queue for :meth:`accept`."""
        self._transport = transport
        self.limit = limit
        self._on_accept = on_accept
        self._streams: dict[int, Stream] = {}
        self._incoming: asyncio.Queue[Stream | None] | None = None

    # -- lookups -------------------------------------------------------------------------------

    def get(self, stream_id: int) -> Stream | None:
        return self._streams.get(stream_id)

    def items(self) -> ItemsView[int, Stream]:
        return self._streams.items()

    def __len__(self) -> int:
        return len(self._streams)

    # -- the connection's side -----------------------------------------------------------------

    def open(self) -> Stream:
        """A new locally-initiated bidirectional stream."""
        self._transport.check_open()
        stream_id = self._transport.next_stream_id()
        # The QUIC layer learns of a stream when it first sends on it: streams opened and not
        # written yet would otherwise all get the same id.
        while stream_id in self._streams:
            stream_id += 4
        return self._add(stream_id)

    async def accept(self) -> Stream:
        """The next stream the peer opened (when there is no ``on_accept``); once the
        connection ends, the streams it had opened first, then its error."""
        queue = self._queue()
        if queue.empty():
            self._transport.check_open()
        stream = await queue.get()
        if stream is None:  # fail_all's mark: left for every other waiter
            queue.put_nowait(None)
            self._transport.check_open()
            raise ConnectionError("the connection ended")  # a transport that never raised
        return stream

    def handle_event(self, event: qe.QuicEvent) -> bool:
        """Feed stream data and resets to their streams; False for any other event."""
        if isinstance(event, qe.StreamDataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is None:
                stream = self._add(event.stream_id)
                if self._on_accept is not None:
                    self._on_accept(stream)
                else:
                    self._queue().put_nowait(stream)
            stream.feed(event.data, event.end_stream)
            # Received bytes grow the backlog and the received offset alike: no credit is due.
            self._transport.set_receive_backlog(
                event.stream_id, stream.receive_backlog, self.limit, due=False
            )
            return True
        if isinstance(event, qe.StreamReset):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.fail(StreamResetError(event.stream_id, event.error_code))
            return True
        return False

    def service(self) -> None:
        """Wake writers whose send buffer has room again (acknowledgements arrived) and forget
        the streams done both ways that the QUIC layer dropped (a long-lived connection would
        otherwise grow, and this walks the table on every flush); their handles still read."""
        for stream_id, stream in list(self._streams.items()):
            stream.poke_writable()
            if stream.finished and not self._transport.has_stream(stream_id):
                del self._streams[stream_id]

    def fail_all(self, exc: BaseException) -> None:
        """The connection ended: every stream's readers and writers raise ``exc``, and so does
        ``accept()`` (a waiter would otherwise wait for ever)."""
        for stream in self._streams.values():
            stream.fail(exc)
        if self._incoming is not None:
            self._incoming.put_nowait(None)

    def _add(self, stream_id: int) -> Stream:
        stream = self._streams[stream_id] = Stream(self, stream_id, self.limit)
        return stream

    def _queue(self) -> asyncio.Queue[Stream | None]:
        if self._incoming is None:
            self._incoming = asyncio.Queue()
        return self._incoming

    # -- StreamOwner (for the streams) ---------------------------------------------------------

    def stream_send(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        self._transport.check_open()
        self._transport.stream_send(stream_id, data, end_stream)

    def stream_send_backlog(self, stream_id: int) -> int:
        return self._transport.stream_send_backlog(stream_id)

    def stream_consumed(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        backlog = stream.receive_backlog if stream is not None else 0
        self._transport.set_receive_backlog(stream_id, backlog, self.limit, due=True)

    def check_open(self) -> None:
        self._transport.check_open()


class QuicStreamTransport:
    """The StreamTransport of a stock aioquic connection (the server side's).

    aioquic grants stream credit as bytes arrive; attaching :class:`StreamCredit` bounds it by
    what the application read. The connection also follows NAT rebindings with a fresh peer
    CID (``InboundQuicConnection``). ``transmit`` sends what aioquic queued; ``check_open``
    raises the connection's error once it is closed.
    """

    __slots__ = ("_check_open", "_credit", "_quic", "_transmit")

    def __init__(
        self,
        quic: QuicConnection,
        transmit: Callable[[], None],
        check_open: Callable[[], None],
    ) -> None:
        self._quic = quic
        # The server side's rules, before the connection receives anything: the listener may
        # not import the adapter, and this port is where an inbound connection meets it.
        follow_rebindings(quic)  # a fresh peer CID and a challenge first after a NAT rebinding
        self._credit = StreamCredit.attach(quic)
        self._transmit = transmit
        self._check_open = check_open

    def check_open(self) -> None:
        self._check_open()

    def stream_send(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        self._quic.send_stream_data(stream_id, data, end_stream)
        self._transmit()

    def stream_send_backlog(self, stream_id: int) -> int:
        return stream_send_backlog(self._quic, stream_id)

    def set_receive_backlog(self, stream_id: int, unread: int, limit: int, *, due: bool) -> None:
        if self._credit.set_backlog(stream_id, unread, limit, due=due):
            self._transmit()  # new credit is due

    def next_stream_id(self) -> int:
        return self._quic.get_next_available_stream_id()

    def has_stream(self, stream_id: int) -> bool:
        return has_stream(self._quic, stream_id)
