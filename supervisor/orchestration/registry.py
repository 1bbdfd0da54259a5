"""The supervisor's registry: per connection an ActorRef, its published view and its port.

What the SupervisorActor and the ``Supervisor`` front-end share (the front-end reads views
from it; only the actor adds and removes entries), and the one place a view becomes the
plain-data ``ConnectionSnapshot`` that handles keep and that crosses processes.
"""

from __future__ import annotations

from dataclasses import dataclass

from multiaddr import Multiaddr

from actors.ports import ConnectionPort
from actors.runtime import ActorRef
from actors.view import ConnectionView, ViewCell
from supervisor.addresses import multiaddr_text, sockaddr_to_multiaddr
from supervisor.core.messages import ConnectionSnapshot, PathSnapshot
from telemetry.qlog import QlogWriter


@dataclass(slots=True)
class ConnectionEntry:
    """What the supervisor holds of one outbound connection: a reference, a view, a port."""

    conn_id: str
    ref: ActorRef
    cell: ViewCell
    port: ConnectionPort
    remote: Multiaddr
    local: Multiaddr  # the dialled (handshake) local address
    family: int
    qlog: QlogWriter | None = None
    #: libp2p connections: our peer id and the one the handshake proved (base58btc).
    local_peer_id: str | None = None
    remote_peer_id: str | None = None
    #: Requests forwarded to the connection and not answered yet: while any is queued there,
    #: only the connection's queue can say what "already active" will mean.
    inflight: int = 0

    async def ask(self, msg: object) -> object:
        self.inflight += 1
        try:
            return await self.ref.ask(msg)
        finally:
            self.inflight -= 1

    @property
    def peer_multiaddr(self) -> Multiaddr:
        """The peer's address as events name it: with ``/p2p/<peer id>`` on libp2p ones."""
        if self.remote_peer_id is None:
            return self.remote
        return Multiaddr(f"{multiaddr_text(self.remote)}/p2p/{self.remote_peer_id}")

    @property
    def view(self) -> ConnectionView:
        return self.cell.view


def local_addr_of(entry: ConnectionEntry, path_id: int | None) -> Multiaddr:
    """A path's local multiaddr from the view; the dialled one for an unknown path."""
    view = entry.view.path(path_id) if path_id is not None else None
    return sockaddr_to_multiaddr(view.local) if view is not None else entry.local


def snapshot_of(entry: ConnectionEntry, migration_enabled: bool) -> ConnectionSnapshot:
    """The plain-data snapshot of a view, with RTTs and byte counters sampled now."""
    view = entry.view
    samples = entry.cell.sample() if not view.closed else {}
    paths = []
    for p in view.paths:
        sample = samples.get(p.path_id)
        paths.append(
            PathSnapshot(
                path_id=p.path_id,
                local_addr=multiaddr_text(sockaddr_to_multiaddr(p.local)),
                remote_addr=multiaddr_text(
                    sockaddr_to_multiaddr(p.remote) if p.remote is not None else entry.remote
                ),
                active=p.path_id == view.active_path_id,
                rtt=sample.rtt if sample is not None else p.rtt,
                state=p.state,
                bytes_sent=sample.bytes_sent if sample is not None else 0,
                bytes_received=sample.bytes_received if sample is not None else 0,
                device=p.device,
                asymmetric=p.asymmetric,
            )
        )
    return ConnectionSnapshot(
        conn_id=entry.conn_id,
        local_addr=multiaddr_text(entry.local),
        remote_addr=multiaddr_text(entry.remote),
        inbound=False,
        supports_migration=migration_enabled
        and not view.peer_disabled_migration
        and not view.closed,
        closed=view.closed,
        paths=tuple(paths),
        migrations=view.migrations,
        spare_connection_ids=view.spare_peer_cids,
        local_peer_id=entry.local_peer_id,
        remote_peer_id=entry.remote_peer_id,
    )
