"""The listening side: a stock aioquic server whose connections surface as our handles.

Server-side connections accept the peer's migration (aioquic does it: new path validated, then
promoted) and never initiate one, so they need none of the path machinery: each is an aioquic
``QuicConnectionProtocol`` with our bounded streams on top. When the peer's address changes
under the same CID (a NAT rebinding), the connection moves to a fresh peer CID and challenges
the new address in its first packet there (``InboundQuicConnection`` in the adapter, attached
with the stream credit through ``QuicStreamTransport``: this module imports no adapter).

The server side is visible: each change of the address a connection sends to (the client
migrated, or a NAT rebound it) is one ``EvtPeerAddressChanged`` on the owning Supervisor's bus,
and ``snapshot()`` gives an inbound connection as ``ConnectionSnapshot(inbound=True)`` with the
peer's current address (what ``quic-supervisor ctl paths`` lists on a server).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from aioquic.asyncio import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode, QuicFrameType
from multiaddr import Multiaddr

from actors.errors import ConnectionClosedError, HandshakeError
from actors.path_state import PathState
from actors.stream_table import QuicStreamTransport, StreamTable
from actors.streams import DEFAULT_STREAM_BUFFER, Stream, StreamResetError
from actors.tls_peer import ask_client_certificate, peer_certificate_chain
from supervisor.addresses import parse_quic_multiaddr, path_socket_error, sockaddr_to_multiaddr
from supervisor.core.events import Event, EvtPeerAddressChanged
from supervisor.core.handles import (
    Client,
    Connection,
    InboundMigratableConn,
    MigratableConn,
    PathInfo,
)
from supervisor.core.messages import ConnectionSnapshot, PathSnapshot
from supervisor.h3 import H3FileServer
from supervisor.libp2p.credentials import Credentials
from supervisor.libp2p.peer_id import PeerId
from supervisor.libp2p.service import Libp2pService
from telemetry.qlog import PeerMoves

log = logging.getLogger(__name__)

StreamHandler = Callable[[Stream], Awaitable[None]]
#: Where a listener's events go: the owning Supervisor's bus (and journal).
EmitEvent = Callable[[Event], None]

#: The reason phrase of the CONNECTION_CLOSE a stopping listener answers new clients with.
REFUSED_REASON = "server shutting down"

#: QUIC CRYPTO_ERROR for TLS alert 42, bad_certificate (RFC 9001 §4.8): a libp2p client whose
#: certificate breaks the spec, or that sent none.
BAD_CERTIFICATE = 0x100 + 42


@dataclass(frozen=True)
class Libp2pListening:
    """What a libp2p listener needs: whose certificate to check clients against, the service
    that answers their streams, and this listener's own protocol handlers."""

    credentials: Credentials
    service: Libp2pService
    handlers: dict[str, StreamHandler]


class InboundProtocol(QuicConnectionProtocol):
    """One accepted connection, its streams in the same table as a dialled connection's."""

    #: The client's moves in this connection's qlog (``Supervisor(qlog_dir=...)``), else None.
    moves: PeerMoves | None = None

    def __init__(self, quic: QuicConnection, *args: Any, listener: Listener, **kwargs: Any) -> None:
        super().__init__(quic, *args, **kwargs)
        self.quic = quic
        self.listener = listener
        self.conn_id = os.urandom(6).hex()
        self.closed = False
        self.error: ConnectionClosedError | None = None
        self.peer_addresses: set[tuple[Any, ...]] = set()
        #: The address datagrams go to, as of the last datagram; and how often it changed
        #: (client migrations and NAT rebindings both count: the server cannot tell them apart).
        self.peer: tuple[Any, ...] | None = None
        self.peer_changes = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.connection: InboundConnection | None = None
        #: libp2p: the peer id the client's certificate proved.
        self.remote_peer_id: PeerId | None = None
        # With a handler, each stream the peer opens starts it; without, accept_stream() has it.
        on_accept: Callable[[Stream], None] | None = None
        if listener.libp2p is not None:
            on_accept = self._negotiate
        elif listener.handler is not None:
            on_accept = self._start_handler
        # Also gives the connection the adapter's server-side rules (before any datagram):
        # bounded stream credit, and a fresh peer CID after a NAT rebinding.
        transport = QuicStreamTransport(quic, self.transmit, self.check_open)
        if listener.libp2p is not None:
            ask_client_certificate(quic)  # libp2p's TLS is mutual
        if listener.refusing:
            # A new connection while the listener stops: closed before its first datagram is
            # answered, so the client's Initial gets CONNECTION_CLOSE (CONNECTION_REFUSED,
            # RFC 9000 §5.2.2) and nothing else: no ServerHello, no handshake.
            quic.close(
                error_code=QuicErrorCode.CONNECTION_REFUSED,
                frame_type=QuicFrameType.PADDING,
                reason_phrase=REFUSED_REASON,
            )
        self.streams = StreamTable(transport, DEFAULT_STREAM_BUFFER, on_accept)
        #: HTTP/3 over the whole connection (``listen(http3_root=...)``), or None.
        self.http3 = (
            H3FileServer(quic, listener.http3_root, self.transmit, transport.stream_send_backlog)
            if listener.http3_root is not None
            else None
        )

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
        # Where aioquic now sends, not where this datagram came from: a probe from a new
        # address changes nothing; the peer's first non-probing packet there moves it (RFC 9000
        # §9.3). One list read and a tuple compare per datagram.
        peer = self.quic.get_peer_address()
        if peer is not None and peer != self.peer:
            self._peer_moved(tuple(peer))
        elif self.moves is not None and self.moves.pending:
            self.moves.check()  # qlog: is the client's new address validated yet?
        # ACK-only datagrams raise no event, but they free send buffers: wake blocked writers.
        self.streams.service()
        if self.http3 is not None:
            self.http3.pump()

    def _peer_moved(self, peer: tuple[Any, ...]) -> None:
        # Here, not per event: after its request an HTTP/3 client sends only ACKs and flow
        # credit, which raise no event, so its move during a download would go unrecorded.
        self.peer_addresses.add(peer)
        old, self.peer = self.peer, peer
        if old is None:  # the first address is not a change
            ip, port, _family = parse_quic_multiaddr(self.listener.bound)
            self.moves = PeerMoves.attach(self.quic, (ip, port), peer)
            return
        self.peer_changes += 1
        if self.moves is not None:
            self.moves.moved(old, peer)
        self.listener._peer_moved(self, old, peer)

    def quic_event_received(self, event: qe.QuicEvent) -> None:
        peer = self.quic.get_peer_address()
        if peer is not None:
            self.peer_addresses.add(tuple(peer))
        if self.http3 is not None and self.http3.handle_event(event):
            pass  # every stream is HTTP/3's
        elif self.streams.handle_event(event):
            pass  # stream data or a reset: the table's
        elif isinstance(event, qe.HandshakeCompleted):
            if self._peer_checked():
                self.listener._connected(self)
        elif isinstance(event, qe.ConnectionTerminated):
            self.closed = True
            self.error = ConnectionClosedError(self.conn_id, reason=event.reason_phrase)
            self.streams.fail_all(self.error)
            if self.http3 is not None:
                self.http3.close()
            self.listener._ended(self)
        self.streams.service()

    def _peer_checked(self) -> bool:
        """libp2p: the client's certificate proves a peer id (DESIGN §9), or the connection
        is closed with bad_certificate and never surfaces."""
        libp2p = self.listener.libp2p
        if libp2p is None:
            return True
        try:
            self.remote_peer_id = libp2p.credentials.verify(peer_certificate_chain(self.quic))
        except HandshakeError as exc:
            self.listener.rejected_peers += 1
            log.warning("libp2p client %s refused: %s", self.peer_address(), exc)
            self.quic.close(error_code=BAD_CERTIFICATE, reason_phrase=str(exc)[:200])
            self.transmit()
            return False
        return True

    def _negotiate(self, stream: Stream) -> None:
        libp2p = self.listener.libp2p
        assert libp2p is not None and self.connection is not None  # after the handshake
        libp2p.service.accept(self.connection, stream, libp2p.handlers)

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
        libp2p = proto.listener.libp2p
        snap = ConnectionSnapshot(
            conn_id=proto.conn_id,
            local_addr=str(local),
            remote_addr=str(sockaddr_to_multiaddr(peer)) if peer else str(local),
            inbound=True,
            supports_migration=False,
            closed=False,
            local_peer_id=str(libp2p.credentials.peer_id) if libp2p is not None else None,
            remote_peer_id=str(proto.remote_peer_id) if proto.remote_peer_id else None,
        )
        super().__init__(client, snap, cast(Any, proto))
        self._proto = proto

    @property
    def remote_multiaddr(self) -> Multiaddr:
        """The client's current address (it moves when the client migrates)."""
        peer = self._proto.peer_address()
        if peer is None:
            return super().remote_multiaddr
        now = sockaddr_to_multiaddr(peer)
        remote_peer = self._snap.remote_peer_id
        return now if remote_peer is None else Multiaddr(f"{now}/p2p/{remote_peer}")

    @property
    def peer_addresses(self) -> set[tuple[Any, ...]]:
        """Every client address this connection has received from (migrations show here)."""
        return set(self._proto.peer_addresses)

    def snapshot(self) -> ConnectionSnapshot:
        """Now: the peer's current address (connection and its one path), ``inbound=True``,
        ``migrations`` = how often the peer's address changed. RTT and byte counts stay
        unset: aioquic keeps them private and this side has no path actors to count them."""
        remote = str(self._current_remote())
        closed = self._proto.closed
        path = PathSnapshot(
            path_id=0,
            local_addr=self._snap.local_addr,
            remote_addr=remote,
            active=not closed,
            rtt=None,
            state=PathState.CLOSED if closed else PathState.ACTIVE,
        )
        return dataclasses.replace(
            self._snap,
            remote_addr=remote,
            closed=closed,
            paths=(path,),
            migrations=self._proto.peer_changes,
        )

    def _current_remote(self) -> Multiaddr:
        peer = self._proto.peer_address()
        return sockaddr_to_multiaddr(peer) if peer else Multiaddr(self._snap.remote_addr)

    @property
    def open_streams(self) -> int:
        """Streams not done yet: open either way, or with sent bytes not yet acknowledged
        (the table forgets a stream once aioquic discarded it); HTTP/3 requests still arriving
        or being answered."""
        if self._proto.closed:
            return 0
        http3 = self._proto.http3
        return len(self._proto.streams) + (http3.open_requests if http3 is not None else 0)

    async def close(self, reason: str = "") -> None:
        """CONNECTION_CLOSE (NO_ERROR) with ``reason`` as its phrase. Idempotent."""
        if not self._proto.closed:
            self._proto.quic.close(reason_phrase=reason)
            self._proto.transmit()

    def _path_infos(self) -> list[PathInfo]:
        local = Multiaddr(self._snap.local_addr)
        return [PathInfo(local, self._current_remote(), True, None, PathState.ACTIVE)]

    def as_migratable(self) -> MigratableConn:
        if self._migratable is None:
            self._migratable = InboundMigratableConn(self, self._path_infos)
        return self._migratable


class Listener:
    """A bound QUIC server; ``multiaddr`` is the bound address (real port after port 0)."""

    def __init__(
        self,
        client: Client,
        handler: StreamHandler | None,
        *,
        libp2p: Libp2pListening | None = None,
        emit: EmitEvent | None = None,
        http3_root: Path | None = None,
    ) -> None:
        """``emit``: where ``EvtPeerAddressChanged`` goes (the Supervisor's bus);
        ``http3_root``: serve the files there over HTTP/3 (``H3FileServer``)."""
        self._client = client
        self.handler = handler
        self.libp2p = libp2p
        self.http3_root = http3_root
        self._emit = emit
        #: libp2p clients refused for their certificate (or for sending none).
        self.rejected_peers = 0
        self._server: QuicServer | None = None
        #: The bound address; ``multiaddr`` adds ``/p2p/<peer id>`` for a libp2p listener.
        self.bound: Multiaddr = Multiaddr("/ip4/0.0.0.0/udp/0/quic-v1")
        self.connections: dict[str, InboundConnection] = {}
        self._accepted: asyncio.Queue[InboundConnection] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._keylog: Any = None
        self.started = time.time()
        #: Set by :meth:`stop_accepting`: new clients are refused, accepted ones go on.
        self.refusing = False

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
        self.bound = sockaddr_to_multiaddr(tuple(transport.get_extra_info("sockname")))

    @property
    def multiaddr(self) -> Multiaddr:
        if self.libp2p is None:
            return self.bound
        return Multiaddr(f"{self.bound}/p2p/{self.libp2p.credentials.peer_id}")

    def _close_keylog(self) -> None:
        if self._keylog is not None:
            self._keylog.close()
            self._keylog = None

    def _connected(self, proto: InboundProtocol) -> None:
        conn = InboundConnection(self._client, proto, self.bound)
        proto.connection = conn
        self.connections[proto.conn_id] = conn
        self._accepted.put_nowait(conn)

    def _ended(self, proto: InboundProtocol) -> None:
        self.connections.pop(proto.conn_id, None)

    def _peer_moved(
        self, proto: InboundProtocol, old: tuple[Any, ...], new: tuple[Any, ...]
    ) -> None:
        conn = proto.connection
        if conn is None:
            return  # not accepted yet (a rebinding mid-handshake): nobody knows this conn id
        old_addr, new_addr = sockaddr_to_multiaddr(old), sockaddr_to_multiaddr(new)
        log.debug("inbound connection %s: peer %s -> %s", proto.conn_id, old_addr, new_addr)
        if self._emit is not None:
            evt = EvtPeerAddressChanged(
                proto.conn_id, conn.remote_multiaddr, time.time(), old_addr, new_addr
            )
            try:
                self._emit(evt)
            except Exception:  # the datagram path must not fail for an observer
                log.exception("emitting %r failed", evt)

    def snapshots(self) -> tuple[ConnectionSnapshot, ...]:
        """Every accepted, open connection of this listener, as of now."""
        return tuple(conn.snapshot() for conn in list(self.connections.values()))

    async def accept(self) -> InboundConnection:
        """The next connection that completed its handshake."""
        return await self._accepted.get()

    def stop_accepting(self) -> None:
        """Refuse every new client from now on (CONNECTION_CLOSE with CONNECTION_REFUSED to
        its first Initial); accepted connections and their new streams go on."""
        self.refusing = True

    def open_streams(self) -> dict[str, int]:
        """Per accepted, open connection: its streams not done yet (see
        ``InboundConnection.open_streams``)."""
        return {cid: conn.open_streams for cid, conn in list(self.connections.items())}

    async def close(self, reason: str = "") -> None:
        """Close every connection (NO_ERROR, ``reason``) and the socket; handlers are
        cancelled."""
        for conn in list(self.connections.values()):
            await conn.close(reason)
        self.connections.clear()  # closing now; their draining needs no handle
        if self._server is not None:
            self._server.close()
            self._server = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._close_keylog()
