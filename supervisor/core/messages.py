"""Requests handles send to the SupervisorActor through an ask transport, and its snapshots.

Plain data only (addresses as multiaddr strings), so the same requests can cross a process
boundary (the Ray backend swaps the transport, not the messages).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

from actors.envelope import message
from actors.path_state import PathState


@message("sup.Dial")
@dataclass(frozen=True, slots=True)
class DialRequest:
    remote: str
    alpn_protocols: tuple[str, ...] | None = None
    server_name: str | None = None
    cafile: str | None = None
    verify: bool = True
    local_addr: str | None = None
    device: str | None = None
    socket_key: int | None = None  # a socket handed in with sock=, registered locally
    timeout: float = 10.0
    idle_timeout: float = 30.0


@message("sup.AddPath")
@dataclass(frozen=True, slots=True)
class AddPathRequest:
    conn_id: str
    local_addr: str | None = None
    device: str | None = None
    socket_key: int | None = None
    #: A path to the server's preferred address (RFC 9000 §9.6), from the active path's local
    #: address: what ``Supervisor(preferred_address="follow")`` sends.
    preferred_address: bool = False


@message("sup.Probe")
@dataclass(frozen=True, slots=True)
class ProbeRequest:
    conn_id: str
    path_id: int
    timeout: float = 5.0


@message("sup.Switch")
@dataclass(frozen=True, slots=True)
class SwitchRequest:
    conn_id: str
    path_id: int
    reason: str = "manual"
    #: How long a stale target's re-probe may take (the caller's, or the failover policy's).
    probe_timeout: float = 5.0
    #: Failover off a dead active path: what it had in flight is resent on the new path.
    old_path_dead: bool = False
    #: application | operator | policy; None: implied by the reason (``initiator_of``).
    initiator: str | None = None


@message("sup.PathsLost")
@dataclass(frozen=True, slots=True)
class PathsLostRequest:
    """The network policy: these paths' link or address is gone (fail them now; an active
    one is degraded until the policy's move, and not reported dead again meanwhile)."""

    conn_id: str
    path_ids: tuple[int, ...]


@message("sup.PathsBack")
@dataclass(frozen=True, slots=True)
class PathsBackRequest:
    """The network policy: these paths' link or address is back (an active path it had
    degraded is active again)."""

    conn_id: str
    path_ids: tuple[int, ...]


@message("sup.ClosePath")
@dataclass(frozen=True, slots=True)
class ClosePathRequest:
    conn_id: str
    path_id: int


@message("sup.CloseConnection")
@dataclass(frozen=True, slots=True)
class CloseConnectionRequest:
    conn_id: str
    error_code: int = 0
    reason: str = ""


@message("sup.Snapshot")
@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    conn_id: str | None = None  # None: every connection


@message("sup.InterfaceAddresses")
@dataclass(frozen=True, slots=True)
class InterfaceAddressesRequest:
    """Every interface address of the supervisor's namespace (``Supervisor(netns=...)``),
    answered with ``(device, "ip/prefix")`` pairs: a drain by device asks it, so "on eth1"
    means eth1 of the namespace the paths live in."""


@message("sup.PathSnapshot")
@dataclass(frozen=True, slots=True)
class PathSnapshot:
    path_id: int
    local_addr: str
    remote_addr: str
    active: bool
    rtt: float | None
    state: PathState
    bytes_sent: int = 0
    bytes_received: int = 0
    device: str | None = None  # interface the socket is bound to (SO_BINDTODEVICE), if any
    asymmetric: bool = False  # validated by a response that came back on another path


@message("sup.ConnectionSnapshot")
@dataclass(frozen=True, slots=True)
class ConnectionSnapshot:
    conn_id: str
    local_addr: str  # the dialled (handshake) local address; never changes
    remote_addr: str
    inbound: bool
    supports_migration: bool
    closed: bool
    paths: tuple[PathSnapshot, ...] = ()
    migrations: int = 0
    #: Peer CIDs left for new paths (each path needs its own: RFC 9000 §9.5).
    spare_connection_ids: int = 0
    #: libp2p connections (DESIGN §9): both ends' peer ids (base58btc), checked in the handshake.
    local_peer_id: str | None = None
    remote_peer_id: str | None = None


@message("sup.PathAdded")
@dataclass(frozen=True, slots=True)
class PathAddedReply:
    """The reply to AddPathRequest: which path was made (never guessed from a snapshot)."""

    path_id: int
    snapshot: ConnectionSnapshot


@message("sup.SwitchResult")
@dataclass(frozen=True, slots=True)
class SwitchResult:
    """What a switch did (DESIGN section 3): returned by ``Path.switch()``.

    ``from_addr == to_addr`` when the path was already active (nothing happened);
    ``confirmation_s``: from the first packet on the new path to the peer's answer on it.
    """

    from_addr: str
    to_addr: str
    probe_rtt: float | None
    confirmation_s: float
    reprobed: bool
    trace_id: str | None = None


@message("sup.Switched")
@dataclass(frozen=True, slots=True)
class SwitchReply:
    """The reply to SwitchRequest."""

    result: SwitchResult
    snapshot: ConnectionSnapshot


@message("sup.HealthStatus")
@dataclass(frozen=True, slots=True)
class HealthStatusRequest:
    """Ask for the node's health machinery at work (groups, keep-alives by kind, loop lag):
    answered in process with ``actors.factory.HealthStatus``."""


@message("sup.Stats")
@dataclass(frozen=True, slots=True)
class StatsRequest:
    """Ask for the supervisor's migration outcomes since it started."""


@message("sup.MigrationStats")
@dataclass(frozen=True, slots=True)
class MigrationStats:
    """How this supervisor's migrations ended: completed, and failed by outcome
    (``supervisor.core.events.OUTCOMES``). ``success_rate`` is completed over all that ended
    (None before the first); cancelled ones count as ended, not as failures of the path."""

    completed: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    #: Server preferred addresses (RFC 9000 §9.6) seen: followed, ignored, refused (unsafe:
    #: see ``addresses.preferred_address_refusal``) or unreachable (its probe failed).
    preferred_address: dict[str, int] = field(default_factory=dict)
    #: Failovers whose failed path answered again within ``FailoverPolicy.suspect_window``:
    #: the false-failover indicator (it was probably never dead).
    suspect_failovers: int = 0
    #: Herd control (``supervisor.orchestration.herd``): migrations in flight and waiting
    #: now, how many had to wait since start, the longest wait and the deepest queue.
    in_flight: int = 0
    queued: int = 0
    waited: int = 0
    max_wait_s: float = 0.0
    max_queued: int = 0

    @property
    def ended(self) -> int:
        return self.completed + sum(self.failed.values())

    @property
    def success_rate(self) -> float | None:
        return self.completed / self.ended if self.ended else None

    def summary(self) -> str:
        """One line for people: ``12 migrations, 11 completed (91.7 %); rolled_back 1``."""
        if not self.ended:
            return "no migrations yet"
        rate = self.success_rate or 0.0
        text = f"{self.ended} migrations, {self.completed} completed ({rate:.1%})"
        if self.failed:
            text += "; " + ", ".join(f"{k} {v}" for k, v in sorted(self.failed.items()))
        if self.suspect_failovers:
            text += f"; {self.suspect_failovers} suspect failovers (path back within seconds)"
        if self.in_flight or self.queued:
            text += f"; {self.in_flight} in flight, {self.queued} queued"
        return text


def reply_snapshot(reply: object) -> ConnectionSnapshot:
    """The connection snapshot every path reply carries (remote callers keep it)."""
    if isinstance(reply, ConnectionSnapshot):
        return reply
    if isinstance(reply, (PathAddedReply, SwitchReply)):
        return reply.snapshot
    raise TypeError(f"not a connection reply: {type(reply).__name__}")


_T = TypeVar("_T")


def expect(reply: object, kind: type[_T]) -> _T:
    """``reply`` as the ``kind`` a request promises; a wrong type (a peer of another release)
    is a ``TypeError`` naming both, not an ``assert`` that ``python -O`` drops."""
    if not isinstance(reply, kind):
        raise TypeError(
            f"expected a {kind.__name__} reply, got {type(reply).__name__}: is the other side "
            "another quic-supervisor release?"
        )
    return reply
