"""Public handles: Connection, MigratableConn, Path, PathInfo (go-libp2p's API, in Python).

Handles are thin proxies: every operation is a request through an ask transport to the
SupervisorActor, and every reply carries a fresh connection snapshot that the handle keeps, so
``info()``, ``active_path()`` and ``available_paths()`` (synchronous, as in Go) are
read-your-writes. In-process, the handle reads the supervisor's live snapshot instead, so
changes made by others (failover, another task) show at once too.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from aioquic.quic.events import QuicEvent
from multiaddr import Multiaddr

from actors.errors import (
    ConnectionClosedError,
    MigrationNotEnabledError,
    MigrationNotSupportedError,
    PathClosedError,
)
from actors.path_state import PathState
from actors.ports import AppProtocolPort, ConnectionPort
from actors.streams import Stream
from supervisor.addresses import parse_quic_multiaddr
from supervisor.core import validate
from supervisor.core.messages import (
    AddPathRequest,
    CloseConnectionRequest,
    ClosePathRequest,
    ConnectionSnapshot,
    PathAddedReply,
    PathSnapshot,
    ProbeRequest,
    SwitchReply,
    SwitchRequest,
    SwitchResult,
    reply_snapshot,
)
from supervisor.libp2p import multistream
from supervisor.libp2p.peer_id import PeerId


class Client(Protocol):
    """How handles reach a supervisor: an ask transport plus a live snapshot when local."""

    async def ask(self, msg: object, timeout: float | None = None) -> object: ...

    def live_snapshot(self, conn_id: str) -> ConnectionSnapshot | None: ...

    def register_socket(self, sock: Any) -> int: ...

    @property
    def migration_enabled(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class PathInfo:
    """A snapshot of one path (go-libp2p's PathInfo, plus its state)."""

    local_addr: Multiaddr
    remote_addr: Multiaddr
    active: bool
    rtt: float | None  # seconds; None before any successful probe
    state: PathState
    #: Validated by a PATH_RESPONSE that came back on another path (RFC 9000 §8.2.3, e.g.
    #: msquic answers on its active path): ``rtt`` crossed two paths, and only ``switch()``
    #: (its confirmation) proves this path's return direction.
    asymmetric: bool = False


def _info(snap: PathSnapshot) -> PathInfo:
    return PathInfo(
        local_addr=Multiaddr(snap.local_addr),
        remote_addr=Multiaddr(snap.remote_addr),
        active=snap.active,
        rtt=snap.rtt,
        state=snap.state,
        asymmetric=snap.asymmetric,
    )


def _with_peer(addr: str, peer_id: str | None) -> Multiaddr:
    return Multiaddr(addr if peer_id is None else f"{addr}/p2p/{peer_id}")


class Connection:
    """A QUIC connection: raw bidirectional streams, addresses, close, ``as_migratable()``."""

    def __init__(self, client: Client, snap: ConnectionSnapshot, port: ConnectionPort) -> None:
        self._client = client
        self._snap = snap
        self._port = port  # the connection's data plane (streams); control goes by request
        self._migratable: MigratableConn | None = None

    @property
    def conn_id(self) -> str:
        return self._snap.conn_id

    @property
    def local_multiaddr(self) -> Multiaddr:
        """The dialled local address; after a migration see ``active_path().local_addr``.
        A libp2p connection's ends with ``/p2p/<our peer id>``."""
        return _with_peer(self._snap.local_addr, self._snap.local_peer_id)

    @property
    def remote_multiaddr(self) -> Multiaddr:
        """The peer's address; a libp2p connection's ends with ``/p2p/<its peer id>``."""
        return _with_peer(self._snap.remote_addr, self._snap.remote_peer_id)

    @property
    def local_peer_id(self) -> PeerId | None:
        """Our libp2p peer id (the Supervisor's identity); None for plain QUIC."""
        peer = self._snap.local_peer_id
        return PeerId.parse(peer) if peer is not None else None

    @property
    def remote_peer_id(self) -> PeerId | None:
        """The peer id its certificate proved (libp2p TLS, checked before ``dial()``
        returned); None for plain QUIC."""
        peer = self._snap.remote_peer_id
        return PeerId.parse(peer) if peer is not None else None

    @property
    def is_closed(self) -> bool:
        return self._port.closed

    async def open_stream(self) -> Stream:
        """A new raw bidirectional stream, whatever the ALPN."""
        return self._port.open_stream()

    async def new_stream(self, protocols: Sequence[str], *, timeout: float = 10.0) -> Stream:
        """A new stream speaking the first of ``protocols`` the peer accepts (libp2p's
        multistream-select 1.0.0); ``stream.protocol`` says which. Raises
        ``NoCommonProtocolError`` (the stream closed) when the peer accepts none."""
        offered = validate.protocol_ids(protocols)
        stream = self._port.open_stream()
        try:
            async with asyncio.timeout(timeout):
                stream.protocol = await multistream.select(stream, offered)
        except BaseException:
            with contextlib.suppress(Exception):
                await stream.close()  # our FIN: the peer's side of it ends too
            raise
        return stream

    async def accept_stream(self) -> Stream:
        """The next stream the peer opened. Not on libp2p connections: there the peer's
        streams go to the handler of the protocol they negotiate
        (``Supervisor.set_stream_handler``), as in every libp2p host."""
        if self._snap.remote_peer_id is not None:
            raise ValueError(
                "accept_stream() is for plain QUIC connections: on a libp2p connection the "
                "peer's streams go to protocol handlers; register one with "
                "sup.set_stream_handler(protocol_id, handler)"
            )
        return await self._port.accept_stream()

    async def _accept_any_stream(self) -> Stream:
        """The next stream the peer opened, for the libp2p service that negotiates it."""
        return await self._port.accept_stream()

    async def close(self) -> None:
        """Close the connection: every path, socket and task is released. Idempotent."""
        await self._client.ask(CloseConnectionRequest(self.conn_id))

    def as_migratable(self) -> MigratableConn:
        if self._migratable is None:
            self._migratable = MigratableConn(self)
        return self._migratable

    def _snapshot(self) -> ConnectionSnapshot:
        live = self._client.live_snapshot(self.conn_id)
        if live is not None:
            self._remember(live)
        elif self._port.closed and not self._snap.closed:
            # The supervisor forgot the connection: every path went with it.
            self._snap = replace(self._snap, closed=True, supports_migration=False, paths=())
        return self._snap

    def _remember(self, snap: ConnectionSnapshot) -> None:
        self._snap = snap
        handles = self._migratable._paths if self._migratable is not None else None
        if handles:
            # Path handles keep their last live snapshot: a closed path's info() shows it closed.
            for p in snap.paths:
                handle = handles.get(p.path_id)
                if handle is not None:
                    handle._last = p

    def _update(self, reply: object) -> ConnectionSnapshot:
        if reply is not None:
            self._remember(reply_snapshot(reply))
        return self._snapshot()

    def __repr__(self) -> str:
        return f"<Connection {self.conn_id} {self._snap.local_addr} -> {self._snap.remote_addr}>"

    async def attach_app_protocol(self, handler: Callable[[QuicEvent], bool]) -> AppProtocolPort:
        """Route this connection's QUIC events through ``handler`` first (events it returns True
        for are consumed): how HTTP/3 runs on top of it. Returns the connection's port for the
        protocol's sends. Streams the peer opened earlier are replayed to ``handler`` first.
        One protocol per connection."""
        if self._snap.inbound:
            raise ValueError("application protocols run on outbound (dialled) connections only")
        return await self._port.attach_app_protocol(handler)


class MigratableConn:
    """go-libp2p's MigratableConn: add, inspect and list the paths of an outbound connection."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        # The handles the caller still holds (mc.paths() returns the same objects while they
        # live); weak, so a thousand paths added and closed leave no handle behind. Made on
        # first use: a WeakValueDictionary costs ~0.5 KiB and a node holds thousands.
        self._paths: weakref.WeakValueDictionary[int, Path] | None = None

    @property
    def connection(self) -> Connection:
        return self._conn

    def supports_migration(self) -> bool:
        """True only for outbound connections with migration enabled and allowed by the peer."""
        return self._conn._snapshot().supports_migration

    async def add_path(
        self,
        local_addr: str | Multiaddr | None = None,
        *,
        device: str | None = None,
        sock: Any = None,
    ) -> Path:
        """Bind a new local path (nothing is sent until ``probe()``)."""
        if local_addr is not None and not isinstance(local_addr, (str, Multiaddr)):
            raise TypeError(
                f"local_addr must be a multiaddr string or Multiaddr, not "
                f"{type(local_addr).__name__}"
            )
        if local_addr is None and device is None and sock is None:
            raise ValueError("add_path needs local_addr, device= or sock=")
        key = self._conn._client.register_socket(sock) if sock is not None else None
        reply = await self._conn._client.ask(
            AddPathRequest(
                self._conn.conn_id,
                str(local_addr) if local_addr is not None else None,
                device,
                key,
            )
        )
        assert isinstance(reply, PathAddedReply)
        self._conn._update(reply)
        return self._handle(reply.path_id)

    def _handle(self, path_id: int) -> Path:
        if self._paths is None:
            self._paths = weakref.WeakValueDictionary()
        path = self._paths.get(path_id)
        if path is None:
            path = self._paths[path_id] = Path(self, path_id)
            for p in self._conn._snap.paths:
                if p.path_id == path_id:
                    path._last = p
        return path

    def spare_connection_ids(self) -> int:
        """Peer connection IDs left for new paths (the CID budget: each path uses its own,
        RFC 9000 §9.5; a closed path's ID is retired and the peer issues a replacement)."""
        return self._conn._snapshot().spare_connection_ids

    def active_path(self) -> PathInfo:
        for p in self._conn._snapshot().paths:
            if p.active:
                return _info(p)
        raise ConnectionClosedError(self._conn.conn_id)

    def available_paths(self) -> list[PathInfo]:
        return [_info(p) for p in self._conn._snapshot().paths]

    def paths(self) -> list[Path]:
        return [self._handle(p.path_id) for p in self._conn._snapshot().paths]


class Path:
    """One local path of a connection: probe it, switch to it, close it."""

    def __init__(self, owner: MigratableConn, path_id: int) -> None:
        self._owner = owner
        self.path_id = path_id
        self._last: PathSnapshot | None = None

    @property
    def _conn(self) -> Connection:
        return self._owner._conn

    def info(self) -> PathInfo:
        snap = self._conn._snapshot()
        for p in snap.paths:
            if p.path_id == self.path_id:
                self._last = p
                return _info(p)
        last = self._last
        if last is None:
            raise ConnectionClosedError(self._conn.conn_id)
        # Closed (by close() or with its connection): the last known addresses, marked closed.
        return PathInfo(
            Multiaddr(last.local_addr),
            Multiaddr(last.remote_addr),
            False,
            last.rtt,
            PathState.CLOSED,
        )

    @property
    def local_addr(self) -> Multiaddr:
        return self.info().local_addr

    async def probe(self, timeout: float = 5.0) -> None:
        """Validate the path (PATH_CHALLENGE answered on this socket); cancellation-safe."""
        timeout = validate.duration("timeout", timeout)
        reply = await self._ask(ProbeRequest(self._conn.conn_id, self.path_id, timeout))
        self._conn._update(reply)

    async def switch(self, *, probe_timeout: float = 5.0) -> SwitchResult:
        """Make this the active path; returns once the peer is confirmed on it.

        A stale target is re-probed first, for at most ``probe_timeout`` seconds. Cancelled,
        it has rolled back by the time the CancelledError reaches the caller."""
        probe_timeout = validate.duration("probe_timeout", probe_timeout)
        reply = await self._ask(
            SwitchRequest(self._conn.conn_id, self.path_id, probe_timeout=probe_timeout)
        )
        assert isinstance(reply, SwitchReply)
        self._conn._update(reply)
        return reply.result

    async def close(self) -> None:
        """Close this (non-active) path and retire its CID. Idempotent."""
        reply = await self._ask(ClosePathRequest(self._conn.conn_id, self.path_id))
        self._conn._update(reply)

    async def _ask(self, request: object) -> object:
        try:
            return await self._conn._client.ask(request)
        except PathClosedError as exc:
            if exc.local_addr is not None or self._last is None:
                raise
            # The connection forgets a closed path; this handle still knows its address.
            raise PathClosedError(
                self._last.local_addr, path_id=self.path_id, conn_id=self._conn.conn_id
            ) from None

    def __repr__(self) -> str:
        return f"<Path {self.path_id} of {self._conn.conn_id}>"


class InboundMigratableConn(MigratableConn):
    """Server-side connections never initiate migration (RFC 9000 §9); they accept the peer's."""

    def __init__(self, conn: Connection, info: Callable[[], list[PathInfo]]) -> None:
        super().__init__(conn)
        self._info = info

    def supports_migration(self) -> bool:
        return False

    async def add_path(
        self,
        local_addr: str | Multiaddr | None = None,
        *,
        device: str | None = None,
        sock: Any = None,
    ) -> Path:
        # Argument errors first, as on outbound connections (DESIGN section 3).
        if local_addr is None and device is None and sock is None:
            raise ValueError("add_path needs local_addr, device= or sock=")
        if local_addr is not None:
            parse_quic_multiaddr(local_addr, what="local address")
        if device is not None and not isinstance(device, str):
            raise TypeError(f"device must be an interface name (str), not {type(device)}")
        if not self._conn._client.migration_enabled:
            raise MigrationNotEnabledError()
        raise MigrationNotSupportedError("inbound", conn_id=self._conn.conn_id)

    def active_path(self) -> PathInfo:
        return self._info()[0]

    def available_paths(self) -> list[PathInfo]:
        return self._info()

    def paths(self) -> list[Path]:
        return []
