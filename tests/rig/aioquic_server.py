"""Stock aioquic servers for tests: a raw-stream echo server and an HTTP/3 file server.

Both run in the caller's event loop on a UDP socket they bind (``host``/``port``) or on one the
caller made (``sock=``, e.g. a socket created inside a test network namespace).
`aioquic.asyncio.serve` only takes a host and port, so the rig starts aioquic's `QuicServer`
protocol (a public class of `aioquic.asyncio.server`, though not in its ``__all__``) with
`loop.create_datagram_endpoint`, which is exactly what `serve` does, plus ``sock=``.

Each connection gets a `ConnectionInfo` recording every client address the server received a
datagram from and the address it currently sends to (`QuicConnection.get_peer_address()`), so a
test can assert "the server now talks to the new client address" with `RigServer.wait_for`.

``SSLKEYLOGFILE``: when set, the servers append their TLS secrets there (for tshark decryption).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicConnectionId
from aioquic.quic.packet import (
    QuicPreferredAddress,
    QuicTransportParameters,
    push_quic_transport_parameters,
)

from .waiting import Notifier

__all__ = [
    "Addr",
    "ConnectionInfo",
    "RigServer",
    "echo_server",
    "h3_file_server",
    "keylog_file",
    "normalize_addr",
]

Addr = tuple[str, int]


def normalize_addr(addr: Sequence[Any]) -> Addr:
    """(host, port) of a socket address; drops IPv6 flowinfo/scope so addresses compare simply."""
    return (str(addr[0]), int(addr[1]))


def keylog_file() -> TextIO | None:
    """Open ``$SSLKEYLOGFILE`` for appending (the caller closes it), or None when unset."""
    path = os.environ.get("SSLKEYLOGFILE")
    if not path:
        return None
    return open(path, "a", encoding="ascii")


@dataclass
class ConnectionInfo:
    """What the server saw of one connection; addresses are normalised (host, port)."""

    protocol: QuicConnectionProtocol
    quic: QuicConnection
    peer_addresses: set[Addr] = field(default_factory=set)
    datagrams_from: Counter[Addr] = field(default_factory=Counter)
    closed: bool = False

    def current_peer(self) -> Addr | None:
        """The address the server sends to now (changes when the client migrates)."""
        addr = self.quic.get_peer_address()
        return None if addr is None else normalize_addr(addr)


class _TrackingProtocol(QuicConnectionProtocol):
    """Records client addresses per connection; subclasses answer streams."""

    def __init__(
        self, quic: QuicConnection, *, info_sink: Callable[[_TrackingProtocol], ConnectionInfo],
        notifier: Notifier, **kwargs: Any,
    ) -> None:
        super().__init__(quic, **kwargs)
        self.quic = quic
        self.info = info_sink(self)
        self._notifier = notifier

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        peer = normalize_addr(addr)
        self.info.peer_addresses.add(peer)
        self.info.datagrams_from[peer] += 1
        super().datagram_received(data, addr)
        self._notifier.changed()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        # The base class would buffer stream data in StreamReaders nobody reads: not called.
        if isinstance(event, events.ConnectionTerminated):
            self.info.closed = True
            self._notifier.changed()
        self.handle_event(event)

    def handle_event(self, event: events.QuicEvent) -> None:
        """Answer application events (overridden)."""


class _EchoProtocol(_TrackingProtocol):
    """Echoes each bidirectional stream's bytes, and its FIN, on the same stream."""

    def handle_event(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived) and not event.stream_id & 2:
            self.quic.send_stream_data(event.stream_id, event.data, event.end_stream)


class _H3FileProtocol(_TrackingProtocol):
    """Serves `files` (path -> bytes) over HTTP/3 GET; anything else is a 404."""

    def __init__(self, quic: QuicConnection, *, files: dict[str, bytes], **kwargs: Any) -> None:
        super().__init__(quic, **kwargs)
        self._files = files
        self._h3: H3Connection | None = None

    def handle_event(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ProtocolNegotiated) and event.alpn_protocol in H3_ALPN:
            self._h3 = H3Connection(self.quic)
        if self._h3 is not None:
            for h3_event in self._h3.handle_event(event):
                self._handle_h3(self._h3, h3_event)

    def _handle_h3(self, h3: H3Connection, event: H3Event) -> None:
        if isinstance(event, DataReceived) or not isinstance(event, HeadersReceived):
            return
        headers = dict(event.headers)
        body = self._files.get(headers.get(b":path", b"").decode(errors="replace"))
        if body is None or headers.get(b":method") not in (b"GET", b"HEAD"):
            h3.send_headers(event.stream_id, [(b":status", b"404")], end_stream=True)
            return
        h3.send_headers(
            event.stream_id,
            [(b":status", b"200"), (b"content-length", str(len(body)).encode())],
            end_stream=headers[b":method"] == b"HEAD",
        )
        if headers[b":method"] == b"GET":
            h3.send_data(event.stream_id, body, end_stream=True)


# --------------------------------------------------------------------------------------------
# THE ONE PLACE where the rig reaches into aioquic internals (`_serialize_transport_parameters`,
# `_host_cids`, `_host_cid_seq`, `_events`). aioquic 1.7.2 has no server configuration for
# `disable_active_migration` or `preferred_address`; the rig needs a server that sends them to
# emulate such peers. Transport parameters are a list of (id, length, value) entries, so appending
# the extra entries to what aioquic serialises changes nothing else.
# --------------------------------------------------------------------------------------------
def _emulate_peer_transport_parameters(
    quic: QuicConnection,
    *,
    disable_active_migration: bool,
    preferred_address: Addr | None,
) -> None:
    if not disable_active_migration and preferred_address is None:
        return
    serialize = quic._serialize_transport_parameters
    extra_cid: list[QuicConnectionId] = []

    def serialize_with_extras() -> bytes:
        extras = QuicTransportParameters(disable_active_migration=disable_active_migration)
        if preferred_address is not None:
            if not extra_cid:
                # RFC 9000 18.2: the preferred address carries the CID of sequence number 1,
                # which the server must route to this connection like any other it issued.
                cid = QuicConnectionId(
                    cid=os.urandom(quic.configuration.connection_id_length),
                    sequence_number=quic._host_cid_seq,
                    stateless_reset_token=os.urandom(16),
                    was_sent=True,
                )
                quic._host_cids.append(cid)
                quic._host_cid_seq += 1
                quic._events.append(events.ConnectionIdIssued(connection_id=cid.cid))
                extra_cid.append(cid)
            host, port = preferred_address
            v6 = ":" in host
            extras.preferred_address = QuicPreferredAddress(
                ipv4_address=None if v6 else (host, port),
                ipv6_address=(host, port) if v6 else None,
                connection_id=extra_cid[0].cid,
                stateless_reset_token=extra_cid[0].stateless_reset_token,
            )
        buf = Buffer(capacity=1024)
        push_quic_transport_parameters(buf, extras)
        return serialize() + buf.data

    quic._serialize_transport_parameters = serialize_with_extras  # type: ignore[method-assign]
# --------------------------------------------------------------------------------------------


class _PreferredAddressSink(asyncio.DatagramProtocol):
    """Counts datagrams sent to the advertised preferred address; never answers."""

    def __init__(self, server: RigServer) -> None:
        self._server = server

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._server.preferred_address_datagrams.append((normalize_addr(addr), len(data)))
        self._server._notifier.changed()


class RigServer:
    """Handle on a running rig server: its address, its connections and a way to wait on them."""

    def __init__(self, alpn: Sequence[str]) -> None:
        self.alpn = tuple(alpn)
        self.host = ""
        self.port = 0
        self.connections: list[ConnectionInfo] = []
        #: The advertised preferred address (bound port), if any.
        self.preferred_address: Addr | None = None
        #: (source, length) of every datagram sent to the preferred address.
        self.preferred_address_datagrams: list[tuple[Addr, int]] = []
        #: Files served by the HTTP/3 server: path -> bytes, and path -> sha256 hex.
        self.files: dict[str, bytes] = {}
        self.sha256: dict[str, str] = {}
        self._notifier = Notifier()

    @property
    def addr(self) -> Addr:
        return (self.host, self.port)

    def peer_addresses(self) -> set[Addr]:
        """Every client address seen, over all connections."""
        return set().union(*(c.peer_addresses for c in self.connections))

    async def wait_for(
        self, predicate: Callable[[], object], timeout: float = 5.0, what: str = ""
    ) -> None:
        """Return once `predicate()` holds; re-checked after every received datagram."""
        await self._notifier.wait_for(predicate, timeout, what)

    async def wait_connection(self, index: int = 0, timeout: float = 5.0) -> ConnectionInfo:
        """The `index`-th connection, once it exists."""
        await self.wait_for(lambda: len(self.connections) > index, timeout, "connection")
        return self.connections[index]

    def _register(self, protocol: _TrackingProtocol) -> ConnectionInfo:
        info = ConnectionInfo(protocol=protocol, quic=protocol.quic)
        self.connections.append(info)
        return info


def _bind_udp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.asynccontextmanager
async def _serve(
    protocol_class: type[_TrackingProtocol],
    server: RigServer,
    *,
    host: str,
    port: int,
    sock: socket.socket | None,
    certfile: str | Path,
    keyfile: str | Path,
    disable_active_migration: bool,
    preferred_address: Addr | None,
    idle_timeout: float,
    protocol_kwargs: dict[str, Any],
    preferred_sink: bool = True,
) -> AsyncIterator[RigServer]:
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        keylog = keylog_file()
        if keylog is not None:
            stack.callback(keylog.close)
        configuration = QuicConfiguration(
            is_client=False,
            alpn_protocols=list(server.alpn),
            idle_timeout=idle_timeout,
            secrets_log_file=keylog,
        )
        configuration.load_cert_chain(str(certfile), str(keyfile))

        if preferred_address is not None and not preferred_sink:
            # Advertised as given, nothing listens: for addresses a client must refuse (never
            # sent to; a test that sends there is wrong).
            server.preferred_address = preferred_address
        elif preferred_address is not None:
            sink_sock = _bind_udp(*preferred_address)
            sink_transport, _ = await loop.create_datagram_endpoint(
                lambda: _PreferredAddressSink(server), sock=sink_sock
            )
            stack.callback(sink_transport.close)
            server.preferred_address = normalize_addr(sink_sock.getsockname())

        def create_protocol(quic: QuicConnection, **kwargs: Any) -> _TrackingProtocol:
            _emulate_peer_transport_parameters(
                quic,
                disable_active_migration=disable_active_migration,
                preferred_address=server.preferred_address,
            )
            return protocol_class(
                quic, info_sink=server._register, notifier=server._notifier,
                **protocol_kwargs, **kwargs,
            )

        if sock is None:
            sock = _bind_udp(host, port)
        _, quic_server = await loop.create_datagram_endpoint(
            lambda: QuicServer(configuration=configuration, create_protocol=create_protocol),
            sock=sock,
        )
        server.host, server.port = normalize_addr(sock.getsockname())
        try:
            yield server
        finally:
            quic_server.close()  # closes every connection (CONNECTION_CLOSE) and the socket


@contextlib.asynccontextmanager
async def echo_server(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    certfile: str | Path,
    keyfile: str | Path,
    alpn: Sequence[str] = ("echo",),
    disable_active_migration: bool = False,
    preferred_address: Addr | None = None,
    sock: socket.socket | None = None,
    idle_timeout: float = 30.0,
    preferred_sink: bool = True,
) -> AsyncIterator[RigServer]:
    """Run an aioquic echo server in this loop until the block exits.

    `preferred_address` (host, port; port 0 picks one) is advertised with a real CID, but only a
    counting sink listens there (`RigServer.preferred_address_datagrams`): the rig checks whether a
    client goes there, it does not serve on it. `sock` (bound, e.g. in a namespace) replaces
    `host`/`port`; the server takes ownership of it.
    """
    async with _serve(
        _EchoProtocol, RigServer(alpn), host=host, port=port, sock=sock,
        certfile=certfile, keyfile=keyfile, disable_active_migration=disable_active_migration,
        preferred_address=preferred_address, idle_timeout=idle_timeout, protocol_kwargs={},
        preferred_sink=preferred_sink,
    ) as server:
        yield server


def make_payload(size: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-random bytes (incompressible, reproducible by seed)."""
    return random.Random(seed).randbytes(size)


@contextlib.asynccontextmanager
async def h3_file_server(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    certfile: str | Path,
    keyfile: str | Path,
    size_mb: float = 4,
    files: dict[str, bytes] | None = None,
    disable_active_migration: bool = False,
    preferred_address: Addr | None = None,
    sock: socket.socket | None = None,
    alpn: Iterable[str] = H3_ALPN,
    idle_timeout: float = 30.0,
) -> AsyncIterator[RigServer]:
    """Run an aioquic HTTP/3 server serving `/file` (`size_mb` MiB, from memory) and `files`.

    `server.sha256["/file"]` is the digest a download must match.
    """
    server = RigServer(tuple(alpn))
    server.files = {"/file": make_payload(int(size_mb * 1024 * 1024)), **(files or {})}
    server.sha256 = {p: hashlib.sha256(b).hexdigest() for p, b in server.files.items()}
    async with _serve(
        _H3FileProtocol, server, host=host, port=port, sock=sock,
        certfile=certfile, keyfile=keyfile, disable_active_migration=disable_active_migration,
        preferred_address=preferred_address, idle_timeout=idle_timeout,
        protocol_kwargs={"files": server.files},
    ) as running:
        yield running
