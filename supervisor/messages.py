"""Requests handles send to the SupervisorActor through an ask transport, and its snapshots.

Plain data only (addresses as multiaddr strings), so the same requests can cross a process
boundary (the Ray backend swaps the transport, not the messages).
"""

from __future__ import annotations

from dataclasses import dataclass

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
