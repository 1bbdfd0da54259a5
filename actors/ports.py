"""The data-plane port a connection hands to the code above it: streams and app protocols.

Streams never go through a mailbox (a hop per write would cost a share of a core at line
rate), so handles need a synchronous way in. This port is that way, and all of it: what a
handle or an application protocol (HTTP/3) may do to a connection, with the ConnectionActor
and its aioquic connection kept behind it. Control (paths, close) goes through the actor's
mailbox instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import QuicEvent, StreamDataReceived

from actors.errors import ConnectionClosedError
from actors.streams import Stream

if TYPE_CHECKING:
    from actors.connection import ConnectionActor

__all__ = ["AppProtocolPort", "ConnectionPort"]

T = TypeVar("T")


class ConnectionPort:
    """Streams of one connection, and the attachment point of one application protocol."""

    __slots__ = ("_conn",)

    def __init__(self, conn: ConnectionActor) -> None:
        self._conn = conn

    @property
    def closed(self) -> bool:
        return self._conn.closed

    @property
    def open_streams(self) -> int:
        """Streams not done yet: open either way, or with sent bytes not yet acknowledged (the
        table forgets a stream once aioquic discarded it). An orderly shutdown waits for 0."""
        return len(self._conn.streams)

    def open_stream(self) -> Stream:
        return self._conn.open_stream()

    async def accept_stream(self) -> Stream:
        return await self._conn.accept_stream()

    async def attach_app_protocol(self, handler: Callable[[QuicEvent], bool]) -> AppProtocolPort:
        """Route the connection's QUIC events through ``handler`` first (events it returns
        True for are consumed). Streams the peer opened before (an HTTP/3 server sends
        SETTINGS right after the handshake) are replayed to it first, so it sees every stream
        from its first byte. One protocol per connection."""
        conn = self._conn
        conn.check_open()
        if conn.app_handler is not None:
            raise RuntimeError(f"connection {conn.conn_id} already has an application protocol")
        replay: list[QuicEvent] = []
        for stream_id, stream in list(conn.streams.items()):
            if stream_id & 1 and (stream.receive_backlog or stream.at_eof):
                # read() returns at once with bytes buffered: no other event can slip in
                # between this replay and installing the handler.
                data = await stream.read() if stream.receive_backlog else b""
                replay.append(StreamDataReceived(data, stream.at_eof, stream_id))
        conn.app_handler = handler
        for event in replay:
            handler(event)
        return AppProtocolPort(conn)


class AppProtocolPort:
    """What an attached application protocol may do: build its layer on the QUIC connection
    (aioquic's public API, e.g. ``H3Connection(quic)``), send, and manage stream credit."""

    __slots__ = ("_conn",)

    def __init__(self, conn: ConnectionActor) -> None:
        self._conn = conn

    @property
    def conn_id(self) -> str:
        return self._conn.conn_id

    @property
    def alpn(self) -> str | None:
        return self._conn.alpn

    @property
    def closed(self) -> bool:
        return self._conn.closed

    @property
    def close_error(self) -> ConnectionClosedError:
        return self._conn.close_error or ConnectionClosedError(self._conn.conn_id)

    def build(self, factory: Callable[[QuicConnection], T]) -> T:
        """The protocol layer over the QUIC connection (it calls ``send_*`` on it)."""
        return factory(self._conn.quic)

    def detach(self) -> None:
        self._conn.app_handler = None

    def check_open(self) -> None:
        self._conn.check_open()

    def next_stream_id(self) -> int:
        return self._conn.quic.get_next_available_stream_id()

    def stop_stream(self, stream_id: int, error_code: int) -> None:
        self._conn.quic.stop_stream(stream_id, error_code)

    def set_receive_backlog(self, stream_id: int, buffered: int, limit: int) -> None:
        """Withhold or release the stream's credit; sends when credit may flow again."""
        if self._conn.quic.set_receive_backlog(stream_id, buffered, limit):
            self._conn.transmit_soon()

    def transmit_soon(self) -> None:
        self._conn.transmit_soon()

    async def wait_closed(self) -> None:
        await self._conn.ref.wait_stopped()

    def __repr__(self) -> str:
        return f"<AppProtocolPort {self._conn.conn_id}>"
