"""Control messages between the SupervisorActor, ConnectionActors and PathActors.

Frozen dataclasses registered with the envelope codec, so any of them can be journaled or sent
across a process boundary unchanged. Datagrams never travel as messages (DESIGN section 1).
Paths are named by ``path_id`` (an int unique within the connection); addresses travel as
``(ip, port)`` strings and ints so the messages stay plain data.
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.envelope import message
from actors.path_state import PathState


@message("conn.Connect")
@dataclass(frozen=True, slots=True)
class Connect:
    """Start the handshake; answered when it is complete (or failed, or timed out)."""

    timeout: float


@message("conn.AddPath")
@dataclass(frozen=True, slots=True)
class AddPath:
    """Adopt an already bound socket (registered under ``socket_key``) as a new path."""

    socket_key: int


@message("conn.Probe")
@dataclass(frozen=True, slots=True)
class Probe:
    path_id: int
    timeout: float


@message("conn.Switch")
@dataclass(frozen=True, slots=True)
class Switch:
    path_id: int
    reason: str = "manual"
    probe_timeout: float = 5.0
    #: Failover off a dead path: resend what it had in flight, and mark it failed.
    old_path_dead: bool = False


@message("conn.ClosePath")
@dataclass(frozen=True, slots=True)
class ClosePath:
    path_id: int


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


@message("conn.SwitchResult")
@dataclass(frozen=True, slots=True)
class SwitchResult:
    from_path: int
    to_path: int
    probe_rtt: float | None
    confirmation_time: float
    cid_sequence_before: int | None
    cid_sequence_after: int | None
    reprobed: bool


@message("conn.PathStateReport")
@dataclass(frozen=True, slots=True)
class PathStateReport:
    """Told upwards whenever a path changes state (becomes EvtPathStateChanged)."""

    path_id: int
    old: PathState
    new: PathState


@message("conn.ConnectionEnded")
@dataclass(frozen=True, slots=True)
class ConnectionEnded:
    """Told to the supervisor when a connection closed, whoever closed it."""

    conn_id: str
    error_code: int
    reason: str
    by_peer: bool


@message("conn.ActivePathDead")
@dataclass(frozen=True, slots=True)
class ActivePathDead:
    """Told to the supervisor when the active path's liveness verdict is dead."""

    conn_id: str
    path_id: int
    reason: str  # "silent" (nothing received while data was outstanding) | "unreachable"
