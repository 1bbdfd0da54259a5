"""The published read model of a connection: what every layer above the ConnectionActor reads.

The ConnectionActor alone owns its paths' state (DESIGN section 1). It publishes an immutable
:class:`ConnectionView`, replaced when a path's state, the active path, the CID count or
``closed`` changes (at most once per event-loop turn, and at once before an operation
replies, so an awaited call is read-your-writes). Each publication also carries the
:class:`PathChange` records since the previous one: path added, state changed, path removed,
which the supervisor turns into events. Figures that move with every datagram (RTT smoothing,
byte counters, keep-alive evidence) are never pushed: :class:`ViewCell` samples them on read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from actors.path_state import PathState

__all__ = ["ConnectionView", "PathChange", "PathSample", "PathView", "ViewCell"]

Addr = tuple[str, int]


@dataclass(frozen=True, slots=True)
class PathView:
    """One path as its connection last published it."""

    path_id: int
    local: Addr  # the bound (ip, port)
    state: PathState
    #: Seconds of the latest answered probe or keep-alive; None before any.
    rtt: float | None
    #: When the peer last proved this path (a probe or keep-alive answered; a confirmed
    #: switch), on the loop clock; None when it never was.
    validated_at: float | None
    #: The interface the socket is bound to (SO_BINDTODEVICE), if any.
    device: str | None = None
    #: The (ip, port) asked for when it was added (port 0: any); add_path's duplicate check.
    requested: Addr | None = None
    #: Its latest validation came back on another path (RFC 9000 §8.2.3): its RTT crossed
    #: two paths and only a switch confirmation proves its return direction.
    asymmetric: bool = False
    #: The server address this path sends to; None: the connection's (dialled) one. Differs
    #: for a path to the server's preferred address (RFC 9000 §9.6).
    remote: Addr | None = None


@dataclass(frozen=True, slots=True)
class ConnectionView:
    """A connection as published by its ConnectionActor (replace, never mutate)."""

    conn_id: str
    remote: Addr
    local: Addr  # the handshake path's local address; never changes
    paths: tuple[PathView, ...] = ()  # live paths (closed ones are gone), by path id
    active_path_id: int | None = None
    spare_peer_cids: int = 0
    #: The peer sent ``disable_active_migration``: no other local address may be used.
    peer_disabled_migration: bool = False
    migrations: int = 0
    closed: bool = False
    close_reason: str | None = None
    alpn: str | None = None
    #: The server's preferred address (RFC 9000 §9.6) as advertised, whether followed or not.
    preferred_address: Addr | None = None
    #: Grows with every publication: a reader holding two views keeps the newer one.
    version: int = 0

    def path(self, path_id: int) -> PathView | None:
        for p in self.paths:
            if p.path_id == path_id:
                return p
        return None

    @property
    def active(self) -> PathView | None:
        return None if self.active_path_id is None else self.path(self.active_path_id)


@dataclass(frozen=True, slots=True)
class PathChange:
    """A path was added (``old is None``), changed state, or was removed (``new`` closed).

    ``op`` is the operation that caused it (the ``op`` of the request being served), so the
    supervisor can put it on that operation's span; None for changes no request caused
    (keep-alives, liveness, the peer). Byte counts are those since the path's previous change,
    attributed to ``old`` (metrics by state, never per datagram).
    """

    path_id: int
    local: Addr
    old: PathState | None
    new: PathState
    op: int | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    dropped_off_path: int = 0


@dataclass(frozen=True, slots=True)
class PathSample:
    """Figures of one path that change per datagram or per keep-alive, read when asked."""

    rtt: float | None  # the active path: the connection's smoothed RTT; others: the last probe
    bytes_sent: int
    bytes_received: int
    #: Failover order from the path's health group: 0 alive or suspect, 1 dead (None: no
    #: failover policy, or a path outside any group: new, validating).
    health_rank: int | None = None
    datagrams_sent: int = 0
    datagrams_received: int = 0
    #: PATH_CHALLENGEs sent on this path (probes and keep-alives).
    probes_sent: int = 0


@dataclass(slots=True)
class ViewCell:
    """Where a connection's latest view lives; what the layers above hold instead of the actor.

    ``sample`` is installed by the owning ConnectionActor and reads its live counters; it stays
    valid (returning nothing) after the connection ended.
    """

    view: ConnectionView
    sample: Callable[[], dict[int, PathSample]] = field(default=lambda: {})

    def offer(self, view: ConnectionView) -> bool:
        """Keep ``view`` if it is newer than the one held; True when it was kept."""
        if view.version < self.view.version:
            return False
        self.view = view
        return True
