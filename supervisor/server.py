"""The listening side: a stock aioquic server whose connections surface as our handles.

Server-side connections accept the peer's migration (aioquic does it: new path validated, then
promoted) and never initiate one, so they need none of the path machinery: each is an aioquic
``QuicConnectionProtocol`` with our bounded streams on top. When the peer's address changes
under the same CID (a NAT rebinding), the connection moves to a fresh peer CID and challenges
the new address in its first packet there (``InboundQuicConnection`` in the adapter, attached
with the stream credit through ``QuicStreamTransport``: this module imports no adapter).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aioquic.asyncio import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from multiaddr import Multiaddr

from actors.errors import ConnectionClosedError
from actors.path_state import PathState
from actors.stream_table import QuicStreamTransport, StreamTable
from actors.streams import DEFAULT_STREAM_BUFFER, Stream, StreamResetError
from supervisor.addresses import parse_quic_multiaddr, path_socket_error, sockaddr_to_multiaddr
from supervisor.core.handles import (
    Client,
    Connection,
    InboundMigratableConn,
    MigratableConn,
    PathInfo,
)
from supervisor.core.messages import ConnectionSnapshot

log = logging.getLogger(__name__)

StreamHandler = Callable[[Stream], Awaitable[None]]


class InboundProtocol(QuicConnectionProtocol):
    """One accepted connection, its streams in the same table as a dialled connection's."""

    def __init__(self, quic: QuicConnection, *args: Any, listener: Listener, **kwargs: Any) -> None:
        super().__init__(quic, *args, **kwargs)
        self.quic = quic
        self.listener = listener
        self.conn_id = os.urandom(6).hex()
        self.closed = False
        self.error: ConnectionClosedError | None = None
        self.peer_addresses: set[tuple[Any, ...]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # With a handler, each stream the peer opens starts it; without, accept_stream() has it.
        on_accept = self._start_handler if listener.handler is not None else None
        # Also gives the connection the adapter's server-side rules (before any datagram):
        # bounded stream credit, and a fresh peer CID after a NAT rebinding.
        transport = QuicStreamTransport(quic, self.transmit, self.check_open)
        self.streams = StreamTable(transport, DEFAULT_STREAM_BUFFER, on_accept)

    def check_open(self) -> None:
        if self.closed:
            raise self.error or ConnectionClosedError(self.conn_id)

    def peer_address(self) -> tuple[Any, ...] | None:
        peer = self.quic.get_peer_address()
        return tuple(peer) if peer is not None else None

    def open_stream(self) -> Stream:
        return self.streams.open()

    async def accept_stream(self) -> Stream:
        return await self.streams.accept()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        super().datagram_received(data, addr)
        # ACK-only datagrams raise no event, but they free send buffers: wake blocked writers.
        self.streams.service()

    def quic_event_received(self, event: qe.QuicEvent) -> None:
        peer = self.quic.get_peer_address()
        if peer is not None:
            self.peer_addresses.add(tuple(peer))
        if self.streams.handle_event(event):
            pass  # stream data or a reset: the table's
        elif isinstance(event, qe.HandshakeCompleted):
            self.listener._connected(self)
        elif isinstance(event, qe.ConnectionTerminated):
            self.closed = True
            self.error = ConnectionClosedError(self.conn_id, reason=event.reason_phrase)
            self.streams.fail_all(self.error)
            self.listener._ended(self)
        self.streams.service()

    def _start_handler(self, stream: Stream) -> None:
        handler = self.listener.handler
        assert handler is not None  # on_accept only when the listener has one
        task = asyncio.get_running_loop().create_task(self._run_handler(handler, stream))
        self._tasks.add(task)
        self.listener._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self.listener._tasks.discard)

    async def _run_handler(self, handler: StreamHandler, stream: Stream) -> None:
        try:
            await handler(stream)
        except (ConnectionClosedError, StreamResetError):
            pass
        except Exception:
            log.exception("stream handler failed on connection %s", self.conn_id)


class InboundConnection(Connection):
    """A server-side connection handle."""

    def __init__(self, client: Client, proto: InboundProtocol, local: Multiaddr) -> None:
        peer = proto.peer_address()
        snap = ConnectionSnapshot(
            conn_id=proto.conn_id,
            local_addr=str(local),
            remote_addr=str(sockaddr_to_multiaddr(peer)) if peer else str(local),
            inbound=True,
            supports_migration=False,
            closed=False,
        )
        super().__init__(client, snap, cast(Any, proto))
        self._proto = proto

    @property
    def remote_multiaddr(self) -> Multiaddr:
        peer = self._proto.peer_address()
        return sockaddr_to_multiaddr(peer) if peer else Multiaddr(self._snap.remote_addr)

    @property
    def peer_addresses(self) -> set[tuple[Any, ...]]:
        """Every client address this connection has received from (migrations show here)."""
        return set(self._proto.peer_addresses)

    async def close(self) -> None:
        if not self._proto.closed:
            self._proto.close()

    def _path_infos(self) -> list[PathInfo]:
        return [PathInfo(self.local_multiaddr, self.remote_multiaddr, True, None, PathState.ACTIVE)]

    def as_migratable(self) -> MigratableConn:
        if self._migratable is None:
            self._migratable = InboundMigratableConn(self, self._path_infos)
        return self._migratable


class Listener:
    """A bound QUIC server; ``multiaddr`` is the bound address (real port after port 0)."""

    def __init__(self, client: Client, handler: StreamHandler | None) -> None:
        self._client = client
        self.handler = handler
        self._server: QuicServer | None = None
        self.multiaddr: Multiaddr = Multiaddr("/ip4/0.0.0.0/udp/0/quic-v1")
        self.connections: dict[str, InboundConnection] = {}
        self._accepted: asyncio.Queue[InboundConnection] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._keylog: Any = None
        self.started = time.time()

    async def start(self, addr: str | Multiaddr, configuration: QuicConfiguration) -> None:
        # Closed with the listener: the SSLKEYLOGFILE handle, if the caller opened one.
        self._keylog = configuration.secrets_log_file
        # A stream's first window must not exceed its buffer either (see StreamCredit).
        configuration.max_stream_data = min(configuration.max_stream_data, DEFAULT_STREAM_BUFFER)
        try:
            ip, port, _family = parse_quic_multiaddr(addr, what="listen address")
            try:
                # aioquic's serve(), keeping the socket's transport: its address, publicly.
                transport, self._server = await asyncio.get_running_loop().create_datagram_endpoint(
                    lambda: QuicServer(
                        configuration=configuration,
                        create_protocol=lambda *a, **k: InboundProtocol(*a, listener=self, **k),
                    ),
                    local_addr=(ip, port),
                )
            except OSError as exc:  # busy port, an address of another host: typed, named
                typed = path_socket_error(exc, str(addr), what="listen address")
                if typed is exc:
                    raise
                raise typed from exc
        except BaseException:
            self._close_keylog()
            raise
        self.multiaddr = sockaddr_to_multiaddr(tuple(transport.get_extra_info("sockname")))

    def _close_keylog(self) -> None:
        if self._keylog is not None:
            self._keylog.close()
            self._keylog = None

    def _connected(self, proto: InboundProtocol) -> None:
        conn = InboundConnection(self._client, proto, self.multiaddr)
        self.connections[proto.conn_id] = conn
        self._accepted.put_nowait(conn)

    def _ended(self, proto: InboundProtocol) -> None:
        self.connections.pop(proto.conn_id, None)

    async def accept(self) -> InboundConnection:
        """The next connection that completed its handshake."""
        return await self._accepted.get()

    async def close(self) -> None:
        for conn in list(self.connections.values()):
            await conn.close()
        if self._server is not None:
            self._server.close()
            self._server = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._close_keylog()
