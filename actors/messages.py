"""Control messages between the SupervisorActor, ConnectionActors and PathActors.

Frozen dataclasses registered with the envelope codec, so any of them can be journaled or sent
across a process boundary unchanged. Datagrams never travel as messages (DESIGN section 1).
Paths are named by ``path_id`` (an int unique within the connection); addresses travel as
``(ip, port)`` strings and ints so the messages stay plain data.
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.envelope import message


@message("conn.Connect")
@dataclass(frozen=True, slots=True)
class Connect:
    """Start the handshake; answered when it is complete (or failed, or timed out), with the
    peer's certificates (DER, its own first)."""

    timeout: float


# Path operations carry ``op``: a tag chosen by the asker that comes back on the PathChange
# records the operation causes (the supervisor puts them on that operation's span).


@message("conn.AddPath")
@dataclass(frozen=True, slots=True)
class AddPath:
    """Adopt an already bound socket (registered under ``socket_key``) as a new path.

    ``requested``: the ``(ip, port)`` the caller asked for (port 0: any), for the duplicate
    check; None when the socket came from a device or ``sock=``. Answered with the path id.
    """

    socket_key: int
    requested: tuple[str, int] | None = None
    label: str | None = None  # how the caller named it, for PathAlreadyExistsError
    op: int | None = None
    #: Towards the server's preferred address (RFC 9000 §9.6) instead of the current one.
    preferred: bool = False


@message("conn.Probe")
@dataclass(frozen=True, slots=True)
class Probe:
    """Validate a path; answered with a :class:`ProbeReport`."""

    path_id: int
    timeout: float
    op: int | None = None


@message("conn.Switch")
@dataclass(frozen=True, slots=True)
class Switch:
    """Make a path active; answered with :class:`Switched` (or a typed error).

    A stale target (validated longer ago than ``ConnectionOptions.stale_after``) is re-probed
    first, for at most ``probe_timeout`` seconds: the caller's, or the failover policy's.
    """

    path_id: int
    reason: str = "manual"
    probe_timeout: float = 5.0
    #: Failover off a dead path: resend what it had in flight, and mark it failed.
    old_path_dead: bool = False
    op: int | None = None


@message("conn.PathsLost")
@dataclass(frozen=True, slots=True)
class PathsLost:
    """The kernel says these paths' link or address is gone (from the supervisor's network
    policy): standby ones fail at once; the active one is degraded and left to the policy's
    move (no dead report of its own)."""

    path_ids: tuple[int, ...]


@message("conn.PathsBack")
@dataclass(frozen=True, slots=True)
class PathsBack:
    """The link or address under these paths is back: an active path degraded by its loss
    is active again (its own liveness judges it from here)."""

    path_ids: tuple[int, ...]


@message("conn.ClosePath")
@dataclass(frozen=True, slots=True)
class ClosePath:
    """Close a path and retire its CID; answered with True, or False when already closed."""

    path_id: int
    op: int | None = None


@message("conn.Close")
@dataclass(frozen=True, slots=True)
class Close:
    error_code: int = 0
    reason: str = ""


@message("path.EmitChallenge")
@dataclass(frozen=True, slots=True)
class EmitChallenge:
    """A PathActor asks its connection for one PATH_CHALLENGE datagram to send itself.

    ``nudge``: also elicit a packet on the active path, so a peer that registers the CIDs it
    issued lazily (aioquic servers do, on their next datagram) can route this probe.
    """

    path_id: int
    nudge: bool = False


@message("path.StartProbe")
@dataclass(frozen=True, slots=True)
class StartProbe:
    timeout: float


@message("conn.ProbeReport")
@dataclass(frozen=True, slots=True)
class ProbeReport:
    """What one probe did: its RTT (None when it failed) and when each try left (wall clock,
    ns), for the ``quic.path.probe`` span. A failed probe's error carries it as ``.report``."""

    path_id: int
    rtt: float | None
    try_times_ns: tuple[int, ...] = ()
    #: The response arrived on another path than the probed one (RFC 9000 §8.2.3).
    asymmetric: bool = False


@message("conn.Switched")
@dataclass(frozen=True, slots=True)
class Switched:
    """What a switch did: from and to which path, how long the peer took to confirm it."""

    from_path: int
    to_path: int
    probe_rtt: float | None
    confirmation_time: float
    cid_sequence_before: int | None
    cid_sequence_after: int | None
    #: The re-probe of a stale target, when there was one.
    reprobe: ProbeReport | None = None

    @property
    def reprobed(self) -> bool:
        return self.reprobe is not None


@message("conn.ConnectionEnded")
@dataclass(frozen=True, slots=True)
class ConnectionEnded:
    """Told to the supervisor when a connection closed, whoever closed it."""

    conn_id: str
    error_code: int
    reason: str
    by_peer: bool


@message("conn.PreferredAddressOffered")
@dataclass(frozen=True, slots=True)
class PreferredAddressOffered:
    """Told to the supervisor once the handshake completed with a server preferred address
    (RFC 9000 §9.6); the supervisor's policy decides whether to follow it."""

    conn_id: str
    address: tuple[str, int]


@message("conn.ActivePathDead")
@dataclass(frozen=True, slots=True)
class ActivePathDead:
    """Told to the supervisor when the active path's liveness verdict is dead."""

    conn_id: str
    path_id: int
    #: "silent": nothing received while data was outstanding, or its group judged dead;
    #: "send_failed" / "unreachable": its group judged it dead within 2 s of that write
    #: error on it (socket errors reach it through the group: ``HealthGroups.evidence``).
    reason: str
