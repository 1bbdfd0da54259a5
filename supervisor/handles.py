"""Public handles: Connection, MigratableConn, Path, PathInfo (go-libp2p's API, in Python).

Handles are thin proxies: every operation is a request through an ask transport to the
SupervisorActor, and every reply carries a fresh connection snapshot that the handle keeps, so
``info()``, ``active_path()`` and ``available_paths()`` (synchronous, as in Go) are
read-your-writes. In-process, the handle reads the supervisor's live snapshot instead, so
changes made by others (failover, another task) show at once too.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from aioquic.quic.events import QuicEvent, StreamDataReceived
from multiaddr import Multiaddr

from actors.errors import (
    ConnectionClosedError,
    MigrationNotEnabledError,
    MigrationNotSupportedError,
)
from actors.path_state import PathState
from actors.streams import Stream
from supervisor.messages import (
    AddPathRequest,
    CloseConnectionRequest,
    ClosePathRequest,
    ConnectionSnapshot,
    PathSnapshot,
    ProbeRequest,
    SwitchRequest,
)

if TYPE_CHECKING:
    from actors.connection import ConnectionActor


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


def _info(snap: PathSnapshot) -> PathInfo:
    return PathInfo(
        local_addr=Multiaddr(snap.local_addr),
        remote_addr=Multiaddr(snap.remote_addr),
        active=snap.active,
        rtt=snap.rtt,
        state=snap.state,
    )


class Connection:
    """A QUIC connection: raw bidirectional streams, addresses, close, ``as_migratable()``."""

    def __init__(self, client: Client, snap: ConnectionSnapshot, actor: ConnectionActor) -> None:
        self._client = client
        self._snap = snap
        self._actor = actor
        self._migratable: MigratableConn | None = None

    @property
    def conn_id(self) -> str:
        return self._snap.conn_id

    @property
    def local_multiaddr(self) -> Multiaddr:
        """The dialled local address; after a migration see ``active_path().local_addr``."""
        return Multiaddr(self._snap.local_addr)

    @property
    def remote_multiaddr(self) -> Multiaddr:
        return Multiaddr(self._snap.remote_addr)

    @property
    def is_closed(self) -> bool:
        return self._actor.closed

    async def open_stream(self) -> Stream:
        """A new raw bidirectional stream, whatever the ALPN."""
        return self._actor.open_stream()

    async def accept_stream(self) -> Stream:
        """The next stream the peer opened."""
        return await self._actor.accept_stream()

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
        elif self._actor.closed and not self._snap.closed:
            # The supervisor forgot the connection: every path went with it.
            self._snap = replace(self._snap, closed=True, supports_migration=False, paths=())
        return self._snap

    def _remember(self, snap: ConnectionSnapshot) -> None:
        self._snap = snap
        if self._migratable is not None:
            # Path handles keep their last live snapshot: a closed path's info() shows it closed.
            for p in snap.paths:
                handle = self._migratable._paths.get(p.path_id)
                if handle is not None:
                    handle._last = p

    def _update(self, reply: object) -> ConnectionSnapshot:
        if isinstance(reply, ConnectionSnapshot):
            self._remember(reply)
        return self._snapshot()

    def __repr__(self) -> str:
        return f"<Connection {self.conn_id} {self._snap.local_addr} -> {self._snap.remote_addr}>"

    async def attach_app_protocol(self, handler: Callable[[QuicEvent], bool]) -> ConnectionActor:
        """Route this connection's QUIC events through ``handler`` first (events it returns True
        for are consumed): how HTTP/3 runs on top of it. Returns the actor that owns the aioquic
        connection, for the protocol's sends (``actor.quic``, then ``actor.transmit_soon()``).

        The peer may open streams before this is called (an HTTP/3 server sends SETTINGS right
        after the handshake); their buffered bytes are replayed to ``handler`` first, so it sees
        every stream from its first byte. One protocol per connection.
        """
        if self._snap.inbound:
            raise ValueError("application protocols run on outbound (dialled) connections only")
        actor = self._actor
        actor.check_open()
        if actor.app_handler is not None:
            raise RuntimeError(f"{self!r} already has an application protocol")
        replay: list[QuicEvent] = []
        for stream_id, stream in list(actor.streams.items()):
            if stream_id & 1 and (stream.receive_backlog or stream.at_eof):
                # read() returns at once with bytes buffered: no other event can slip in
                # between this replay and installing the handler.
                data = await stream.read() if stream.receive_backlog else b""
                replay.append(StreamDataReceived(data, stream.at_eof, stream_id))
        actor.app_handler = handler
        for event in replay:
            handler(event)
        return actor


class MigratableConn:
    """go-libp2p's MigratableConn: add, inspect and list the paths of an outbound connection."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        # The handles the caller still holds (mc.paths() returns the same objects while they
        # live); weak, so a thousand paths added and closed leave no handle behind.
        self._paths: weakref.WeakValueDictionary[int, Path] = weakref.WeakValueDictionary()

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
        snap = self._conn._update(reply)
        known = set(self._paths)
        new = [p for p in snap.paths if p.path_id not in known]
        path_id = max(p.path_id for p in new) if new else max(p.path_id for p in snap.paths)
        return self._handle(path_id)

    def _handle(self, path_id: int) -> Path:
        path = self._paths.get(path_id)
        if path is None:
            path = self._paths[path_id] = Path(self, path_id)
            for p in self._conn._snap.paths:
                if p.path_id == path_id:
                    path._last = p
        return path

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
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
        if not timeout > 0 or math.isnan(timeout):
            raise ValueError(f"probe timeout must be > 0 seconds, got {timeout!r}")
        await self._cancellable(ProbeRequest(self._conn.conn_id, self.path_id, float(timeout)))

    async def switch(self) -> None:
        """Make this the active path; returns once the peer is confirmed on it.

        Cancelled, it rolls back before the CancelledError reaches the caller."""
        await self._cancellable(SwitchRequest(self._conn.conn_id, self.path_id))

    async def _cancellable(self, request: object) -> None:
        client = self._conn._client
        try:
            reply = await client.ask(request)
        except asyncio.CancelledError:
            settle = getattr(client, "settle", None)  # in-process: wait for the undo
            if settle is not None:
                await settle(self._conn.conn_id)
            raise
        self._conn._update(reply)

    async def close(self) -> None:
        """Close this (non-active) path and retire its CID. Idempotent."""
        reply = await self._conn._client.ask(ClosePathRequest(self._conn.conn_id, self.path_id))
        self._conn._update(reply)

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
        if local_addr is None and device is None and sock is None:
            raise ValueError("add_path needs local_addr, device= or sock=")
        if not self._conn._client.migration_enabled:
            raise MigrationNotEnabledError()
        raise MigrationNotSupportedError("inbound", conn_id=self._conn.conn_id)

    def active_path(self) -> PathInfo:
        return self._info()[0]

    def available_paths(self) -> list[PathInfo]:
        return self._info()

    def paths(self) -> list[Path]:
        return []
