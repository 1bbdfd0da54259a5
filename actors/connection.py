"""ConnectionActor: one outbound QUIC connection, the only code that builds or parses its packets.

It owns the aioquic connection (through ``MigratingQuicConnection``), its deadline (one entry on
the node's timer), its streams and, as children, one PathActor per local socket. Datagrams
arrive by direct synchronous call from the paths and are answered in one batch per event-loop
turn. Control messages (connect, add/probe/switch/close a path, close) arrive through the
mailbox; the long ones run as owned tasks answered with :class:`Later`, so the mailbox never
waits on the network.

It is the one owner of its paths' state (the PathStateMachines live here: paths report what
they saw, this actor decides) and of the order of its operations: add, probe, switch and close
run one at a time, FIFO, in this actor's own queue. What the layers above see is the published
:class:`~actors.view.ConnectionView` (see ``actors/view.py``), never this object.

Rules kept here (DESIGN section 4): no probe before the handshake is confirmed; each path sends
with its own peer CID; probes stay outside loss recovery; a switch starts fresh RTT/congestion
state, sends a non-probing packet at once and is confirmed by a non-probing packet from the peer
on the new path within 3 x PTO, or rolled back; the peer's ``disable_active_migration`` forbids
any other local address; its ``preferred_address`` is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration

from actors.errors import (
    ActivePathCloseError,
    ConnectionClosedError,
    DialTimeoutError,
    HandshakeError,
    MigrationNotSupportedError,
    MigrationRolledBackError,
    NoConnectionIdError,
    PathAlreadyExistsError,
    PathClosedError,
    PathLimitError,
    PathNotValidatedError,
)
from actors.flag import Flag
from actors.health import ActiveLiveness, HealthConfig, Liveness, Verdict
from actors.health_groups import MAX_RECHECKS, RECHECK_AFTER, GroupKey, ProbeReason
from actors.messages import (
    ActivePathDead,
    AddPath,
    Close,
    ClosePath,
    Connect,
    ConnectionEnded,
    EmitChallenge,
    PathsBack,
    PathsLost,
    PreferredAddressOffered,
    Probe,
    ProbeReport,
    StartProbe,
    Switch,
    Switched,
)
from actors.node_health import NodeHealth
from actors.path import PathActor, ProbeSchedule
from actors.path_state import PathState, PathStateMachine
from actors.quic_adapter import (
    MigratingQuicConnection,
    PathAddr,
    connection_trace,
    peer_certificate_chain,
)
from actors.runtime import Actor, ActorRef, ChildFailed, Later
from actors.socket_errors import Evidence
from actors.stream_table import StreamTable
from actors.streams import DEFAULT_STREAM_BUFFER, Stream
from actors.view import ConnectionView, PathChange, PathSample, PathView, ViewCell

log = logging.getLogger(__name__)

#: The clock of every time handed to aioquic (and compared with its times). Not loop.time():
#: uvloop's is cached per loop turn at 1 ms resolution, which made sub-millisecond probe RTTs
#: measure 0.0 (and ACK RTT samples coarse). Under plain asyncio the two are the same clock.
_now = time.monotonic

#: Paths per connection, the handshake path included. Each needs its own peer CID and aioquic
#: keeps at most 8 network paths (evicting silently beyond): 7 leaves one spare CID in hand.
MAX_PATHS = 7


@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    """Tunables of a connection actor (defaults suit loopback and LAN paths alike)."""

    stream_buffer: int = DEFAULT_STREAM_BUFFER
    probe_schedule: ProbeSchedule = field(default_factory=ProbeSchedule)
    #: A standby path validated longer ago than this is re-probed before a switch to it.
    stale_after: float = 30.0
    #: Lower bound of the switch confirmation window (3 x PTO can be a few ms on loopback, less
    #: than one scheduling hiccup of a busy Python process).
    min_confirmation_window: float = 0.2
    #: Path health (health-group probes and NAT keep-alives on standby paths, liveness of the
    #: active path); None: off. Set from ``FailoverPolicy`` by the Supervisor.
    health: HealthConfig | None = None
    #: An idle connection sends one PING on its active path a third into its idle period, so
    #: neither side's idle timeout (the smaller of both: 10 s for js-libp2p) ends it and its
    #: NAT binding stays. Merged into aioquic's own deadline, no task; False: let idle ones end.
    idle_keepalive: bool = True

    def __post_init__(self) -> None:
        # NaN or infinite durations reach asyncio's timer heap and delay unrelated timers.
        for name, low in (("stale_after", 0.0), ("min_confirmation_window", 1e-3)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number of seconds, not {type(value)}")
            if not (math.isfinite(value) and low <= value <= 86_400):
                raise ValueError(f"{name} must be seconds in [{low:g}, 86400], got {value!r}")
        buffer = self.stream_buffer
        if isinstance(buffer, bool) or not isinstance(buffer, int) or not 1200 <= buffer <= 1 << 30:
            raise ValueError(f"stream_buffer must be an int of 1200 bytes to 1 GiB, got {buffer!r}")


@dataclass(slots=True)
class _PathFacts:
    """What a connection knows of one of its paths: their state is its to own (the PathActor
    owns the socket, its counters and its keep-alive evidence)."""

    actor: PathActor
    ref: ActorRef
    machine: PathStateMachine
    local: tuple[str, int]
    #: The ``(ip, port)`` asked for (port 0: any), for add_path's duplicate check.
    requested: tuple[str, int]
    device: str | None
    remote: tuple[Any, ...]  # the server address this path sends to
    group: GroupKey  # what it shares fate with: (device or local IP, remote IP)
    rtt: float | None = None
    validated_at: float | None = None
    asymmetric: bool = False  # the latest validation came back on another path
    #: Switched away from, while the switch may still roll back to it: evidence (ICMP, lost
    #: keep-alives) is recorded but the path is not failed until that is settled (a rollback
    #: makes it active again, which a failed path cannot become).
    rollback_target: bool = False
    #: The latest write error on this path (send_failed, unreachable) and when (node
    #: clock): a dead verdict soon after it is reported as that cause, not "silent" (the
    #: network policy budgets eager moves after write errors apart from degradation).
    write_error: tuple[str, float] | None = None


#: How recent a write error must be to be the cause of a dead verdict.
_WRITE_ERROR_RECENT = 2.0


class ConnectionActor(Actor):
    """Owns one client QUIC connection and its paths."""

    #: Mail is control (add, probe, switch, close): a node holds thousands of idle connections,
    #: each without a reader task until a request arrives (datagrams come by direct call).
    parks_when_idle = True

    # Slots, not an instance dict (~40 attributes: a 2.3 KiB table per connection).
    __slots__ = (
        "_asked",
        "_changed",
        "_confirmed",
        "_dead_reported",
        "_dialled",
        "_first_socket",
        "_flush_scheduled",
        "_flush_sends",
        "_groups_on",
        "_handshake_done",
        "_health",
        "_live_at",
        "_loop",
        "_notify",
        "_on_changes",
        "_op",
        "_op_queue",
        "_owns_health",
        "_path_ids",
        "_paths",
        "_pending",
        "_ping_ids",
        "_publish_scheduled",
        "_published_spares",
        "_rechecks",
        "_sockets",
        "_terminated",
        "_timer_at",
        "_timer_key",
        "_version",
        "alpn",
        "app_handler",
        "cell",
        "close_error",
        "close_reason",
        "closed",
        "conn_id",
        "migrations",
        "options",
        "quic",
        "remote",
        "streams",
    )

    def __init__(
        self,
        *,
        conn_id: str,
        configuration: QuicConfiguration,
        remote: tuple[Any, ...],
        first_socket: socket.socket,
        sockets: dict[int, socket.socket],
        on_changes: Callable[[ConnectionView, tuple[PathChange, ...]], None],
        notify: Callable[[object], None],
        options: ConnectionOptions | None = None,
        health: NodeHealth | None = None,
    ) -> None:
        """``on_changes`` receives each publication (the view and the path changes since the
        last one), synchronously; ``notify`` carries ConnectionEnded and ActivePathDead to the
        supervisor's mailbox; ``health`` is the node's (one per supervisor: its timer and
        health groups), a private one when not given."""
        self.conn_id = conn_id
        #: Where new paths send: the dialled address, or the server's preferred one once the
        #: connection moved there.
        self.remote = remote
        self._dialled = remote
        self.options = options or ConnectionOptions()
        self._health = health if health is not None else NodeHealth(self.options.health)
        self._owns_health = health is None  # standalone: no supervisor's node to share
        self._groups_on = self._health.groups is not None and self.options.health is not None
        # A stream's first window must not exceed its buffer either (see StreamCredit).
        configuration.max_stream_data = min(
            configuration.max_stream_data, self.options.stream_buffer
        )
        self.quic = MigratingQuicConnection(configuration=configuration)
        self._first_socket = first_socket
        self._sockets = sockets  # handed-over sockets, by key (see AddPath)
        self._on_changes = on_changes
        self._notify = notify
        self._paths: dict[int, _PathFacts] = {}
        self._path_ids = itertools.count()
        self._ping_ids = itertools.count(1)
        # One table for both directions; it reaches us only through the StreamTransport methods.
        self.streams = StreamTable(self, self.options.stream_buffer)
        self._loop = asyncio.get_running_loop()
        # aioquic's deadline, a deadline of the node's one timer (not a loop TimerHandle per
        # connection: thousands of them re-armed per packet cost heap work in Python).
        self._timer_at: float | None = None
        self._timer_key = ("quic", conn_id)
        self._flush_scheduled = False
        self._flush_sends = False
        self._handshake_done = Flag()
        self._confirmed = Flag()
        self._changed = Flag()  # set after every input batch: wakes condition waiters
        self.closed = False
        self.close_reason: str | None = None
        self.close_error: ConnectionClosedError | None = None
        self._terminated = Flag()
        self.alpn: str | None = None
        self.app_handler: Callable[[qe.QuicEvent], bool] | None = None
        self.migrations = 0
        # The operation queue: add, probe, switch and close-path run one at a time, FIFO. A lock
        # of this actor's own, never shared: a cancelled waiter leaves the queue with no trace.
        self._op_queue = asyncio.Lock()
        self._op: int | None = None  # the ``op`` tag of the operation being served
        self._rechecks = 0  # dead-judgement deferrals for unread datagrams (bounded)
        self._live_at: float | None = None  # the next active-path liveness look (node clock)
        self._asked: dict[int, float] = {}  # active path -> when a group's PING went out
        self._dead_reported: int | None = None  # active path already reported dead
        # Publication (actors/view.py): pending changes, at most one publication per turn.
        local = first_socket.getsockname()
        self._version = 0
        self._pending: list[PathChange] = []
        self._publish_scheduled = False
        self._published_spares = -1
        self.cell = ViewCell(
            ConnectionView(conn_id, (str(remote[0]), int(remote[1])), _addr(local)),
            self._sample,
        )

    # ------------------------------------------------------------------ lifecycle

    async def on_start(self) -> None:
        self._health.register(self.conn_id, self)
        self._start_path(next(self._path_ids), self._first_socket, None)

    async def on_stop(self) -> None:
        if not self.closed:
            self._terminate(ConnectionClosedError(self.conn_id, reason="connection actor stopped"))
        # _terminate left the node's groups and timer (nothing rejoins once closed).
        if self._owns_health:
            self._health.close()
        keylog = self.quic.configuration.secrets_log_file
        if keylog is not None:
            keylog.close()  # SSLKEYLOGFILE, opened for this connection

    def _start_path(
        self,
        path_id: int,
        sock: socket.socket,
        requested: tuple[str, int] | None,
        remote: tuple[Any, ...] | None = None,
    ) -> None:
        remote = remote if remote is not None else self.remote
        path = PathActor(
            path_id=path_id,
            sock=sock,
            remote=remote,
            owner=self,
            conn=self.ref,
            schedule=self.options.probe_schedule,
        )
        local = _addr(path.local)
        device = _bound_device(sock)
        self._paths[path_id] = _PathFacts(
            actor=path,
            ref=self.spawn_child(path, name=f"{self.conn_id}/path{path_id}"),
            machine=PathStateMachine(PathState.NEW),
            local=local,
            requested=requested or local,
            device=device,
            remote=remote,
            group=GroupKey(device or local[0], _ip(remote)),
        )
        self._qlog_path("path_assigned", path_id)  # qlog hook: path added
        self._pending.append(PathChange(path_id, local, None, PathState.NEW, self._op))
        self._publish_soon()

    # ------------------------------------------------------------------ path state (owned here)

    def _move(self, path_id: int, new: PathState) -> None:
        """The one place a path changes state; the change is published with its byte counts."""
        facts = self._paths.get(path_id)
        if facts is None:
            return
        change = facts.machine.move(new)
        if change is None:
            return
        if self._groups_on:
            self._track(path_id, facts)
        grown = facts.actor.stats.deltas()
        self._pending.append(
            PathChange(
                path_id,
                facts.local,
                change[0],
                change[1],
                self._op,
                grown["sent"],
                grown["received"],
                grown["dropped"],
            )
        )
        self._publish_soon()

    def path_state(self, path_id: int) -> PathState:
        facts = self._paths.get(path_id)
        return facts.machine.state if facts is not None else PathState.CLOSED

    def probe_started(self, path_id: int) -> None:
        self._move(path_id, PathState.VALIDATING)

    def probe_answered(self, path_id: int, rtt: float) -> None:
        facts = self._paths.get(path_id)
        if facts is None:
            return
        facts.rtt = rtt
        facts.validated_at = self._loop.time()
        if facts.machine.state is not PathState.STANDBY:  # qlog hook: a validation, not a check
            self._qlog_migration("probing_successful", path_id)
        self._move(path_id, PathState.STANDBY)

    def probe_failed(self, path_id: int, before: PathState, *, timed_out: bool) -> None:
        """A probe timed out (the path failed) or was abandoned (cancelled, no CID, closing:
        back to where it was, no trace)."""
        if self.quic.has_path(path_id):
            self.quic.forget_challenges(path_id)
            if timed_out:
                self.quic.invalidate_path(path_id)
        if self.path_state(path_id) is not PathState.VALIDATING:
            return
        if timed_out:
            self._move(path_id, PathState.FAILED)
        else:
            self._move(path_id, before if before is not PathState.VALIDATING else PathState.NEW)

    # ------------------------------------------------------------------ qlog hooks

    def _qlog(self, event: str, data: dict[str, Any]) -> None:
        """A ``connectivity:`` event in this connection's qlog (telemetry/qlog.py), if any."""
        trace = connection_trace(self.quic)
        if trace is not None:
            trace.log_event(category="connectivity", event=event, data=data)

    def _qlog_addresses(self, path_id: int) -> dict[str, Any]:
        """A path's id, local and remote address and DCID (when it has one yet)."""
        data: dict[str, Any] = {"path_id": path_id}
        facts = self._paths.get(path_id)
        if facts is not None:
            data["path_local"] = _endpoint(facts.local)
            data["path_remote"] = _endpoint(facts.remote)
        dcid = self.quic.path_cids().get(path_id) if self.quic.has_path(path_id) else None
        if dcid is not None:
            data["dcid"] = dcid.hex()
            data["path_remote"] = {**data.get("path_remote", {}), "connection_ids": [dcid.hex()]}
        return data

    def _qlog_path(self, event: str, path_id: int, *, abandoned: bool = False) -> None:
        if connection_trace(self.quic) is None:
            return
        data = self._qlog_addresses(path_id)
        if abandoned:
            data["abandoned"] = True
        self._qlog(event, data)

    def _qlog_migration(self, state: str, path_id: int, *, old: int | None = None) -> None:
        """``migration_state_updated``: ``old`` -> ``path_id`` (its addresses, its DCID)."""
        if connection_trace(self.quic) is None:
            return
        data = {"state": state, **self._qlog_addresses(path_id)}
        if old is not None:
            data["old"] = old
            data["new"] = path_id
            previous = self._paths.get(old)
            if previous is not None:
                data["old_path_local"] = _endpoint(previous.local)
                data["old_path_remote"] = _endpoint(previous.remote)
        self._qlog("migration_state_updated", data)

    # ------------------------------------------------------------------ health (node groups)

    def _track(self, path_id: int, facts: _PathFacts) -> None:
        """Group membership follows the state: standby, failed and active paths are members
        (the active one is asked with a PING); new, validating (a probe on request asks its
        own questions) and closed ones are not."""
        state = facts.machine.state
        if self.closed or state in (PathState.NEW, PathState.VALIDATING, PathState.CLOSED):
            self._health.leave(self.conn_id, path_id)
            return
        carrying = state in (PathState.ACTIVE, PathState.DEGRADED)
        self._health.join(
            self.conn_id,
            path_id,
            facts.group,
            nat=not carrying,  # the active path's NAT binding is kept by the idle PING
            failed=state is PathState.FAILED,
        )

    def health_probe(self, path_id: int, reason: ProbeReason) -> bool:
        """One question from the node's health groups (see NodeHealth): a PATH_CHALLENGE on
        a standby or failed path, a PING on the active one (a PATH_CHALLENGE there would be
        answered too, but a PING also refreshes the peer's idle timer); a NAT keep-alive is a
        small probing packet that asks nothing."""
        facts = self._paths.get(path_id)
        if facts is None or self.closed or not self._confirmed.is_set():
            return False
        now = _now()
        if path_id == self.quic.active_path_id:
            self.quic.send_ping(next(self._ping_ids))
            self._asked[path_id] = now
            self._schedule_flush()
            return True
        if self.quic.peer_disabled_active_migration or not self.quic.reserve_peer_cid(path_id):
            return False
        if reason is ProbeReason.NAT:  # a NAT binding needs outbound bytes, not an answer
            datagrams = self.quic.emit_nat_keepalive(path_id, now)
        else:
            datagrams = self.quic.emit_challenge(path_id, now)
            facts.actor.stats.probes_sent += bool(datagrams)
        for data, _ in datagrams:
            facts.actor.send(data)
        return bool(datagrams)

    def health_verdict(self, path_id: int, verdict: Verdict) -> None:
        """The path's whole group was judged: dead fails a standby path and reports a carrying
        one dead (the failover policy decides); alive again revives a failed path."""
        facts = self._paths.get(path_id)
        if facts is None or self.closed:
            return
        if verdict is Verdict.DEAD:
            if self._health.gone and self._health.is_gone(_addr(facts.remote)):
                return  # the peer's process is gone, not this path: nothing to fail or move
            if path_id == self.quic.active_path_id:
                error = facts.write_error
                recent = error is not None and _now() - error[1] <= _WRITE_ERROR_RECENT
                self._report_dead(path_id, error[0] if error is not None and recent else "silent")
            else:
                self._fail_standby(path_id)
        elif verdict is Verdict.ALIVE:
            self._revive(path_id, facts)

    def _revive(self, path_id: int, facts: _PathFacts) -> None:
        """Failed -> standby on evidence: an answer of its own (which also validated it in
        aioquic) or its group's (then a switch re-probes it first: see ``_stale``)."""
        if facts.machine.state is PathState.FAILED and not facts.rollback_target:
            self._move(path_id, PathState.VALIDATING)
            self._move(path_id, PathState.STANDBY)

    def _answered(self, path_id: int, rtt: float) -> None:
        """A PATH_RESPONSE for a non-active path: it is reachable, and so is its group."""
        facts = self._paths.get(path_id)
        if facts is None:
            return
        facts.rtt = rtt
        facts.validated_at = self._loop.time()
        if facts.machine.state is PathState.VALIDATING:
            return  # a probe on request owns this answer
        self._revive(path_id, facts)
        if self._groups_on:
            self._health.answered(self.conn_id, path_id, rtt)

    def _paths_lost(self, path_ids: tuple[int, ...]) -> None:
        """The link or address under these paths is gone (the kernel said so): no probing
        needed to know it. A standby or failed-over path fails; the active one is degraded
        and marked reported, so our own silence judgement does not start a second move."""
        active = self.quic.active_path_id if self.quic.path_count else None
        for path_id in path_ids:
            facts = self._paths.get(path_id)
            if facts is None or self.closed:
                continue
            if path_id == active:
                self._dead_reported = path_id
                if facts.machine.state is PathState.ACTIVE:
                    self._move(path_id, PathState.DEGRADED)
            else:
                self._fail_standby(path_id)
        self._publish()

    def _paths_back(self, path_ids: tuple[int, ...]) -> None:
        """The kernel says their link or address is back: the active one, degraded by the
        loss and still carrying (nothing else was usable), is active again; its liveness
        (with a failover policy) judges it from what arrives next."""
        active = self.quic.active_path_id if self.quic.path_count else None
        if active in path_ids and not self.closed:
            facts = self._paths.get(active)
            if facts is not None and facts.machine.state is PathState.DEGRADED:
                self._dead_reported = None
                self._move(active, PathState.ACTIVE)
                self._look_soon(_now())
        self._publish()

    def _fail_standby(self, path_id: int) -> None:
        """A standby path's group was judged dead (or ICMP said unreachable): switch() must
        re-validate it first."""
        facts = self._paths.get(path_id)
        if facts is None or facts.rollback_target:
            return
        if facts.machine.state is PathState.STANDBY:
            self._move(path_id, PathState.FAILED)
            if self.quic.has_path(path_id):
                self.quic.invalidate_path(path_id)

    # ------------------------------------------------------------------ publication

    def _publish_soon(self) -> None:
        if not self._publish_scheduled:
            self._publish_scheduled = True
            self._loop.call_soon(self._publish)

    def _publish(self) -> None:
        """Replace the published view and hand it upward with the changes since the last one."""
        self._publish_scheduled = False
        quic = self.quic
        active = quic.active_path_id if quic.path_count and not self.closed else None
        spares = quic.spare_peer_cids
        self._published_spares = spares
        self._version += 1
        view = ConnectionView(
            conn_id=self.conn_id,
            remote=self.cell.view.remote,
            local=self.cell.view.local,
            paths=tuple(
                PathView(
                    pid,
                    f.local,
                    f.machine.state,
                    f.rtt,
                    f.validated_at,
                    f.device,
                    f.requested,
                    f.asymmetric,
                    None if f.remote == self._dialled else _addr(f.remote),
                )
                for pid, f in sorted(self._paths.items())
                if f.machine.state is not PathState.CLOSED
            ),
            active_path_id=active,
            spare_peer_cids=spares,
            peer_disabled_migration=quic.peer_disabled_active_migration,
            migrations=self.migrations,
            closed=self.closed,
            close_reason=self.close_reason,
            alpn=self.alpn,
            preferred_address=quic.preferred_address,
            version=self._version,
        )
        changes = tuple(self._pending)
        self._pending.clear()
        self.cell.offer(view)
        self._on_changes(view, changes)

    def _sample(self) -> dict[int, PathSample]:
        """Per-datagram figures, read when asked (never pushed)."""
        active = self.quic.active_path_id if self.quic.path_count and not self.closed else None
        out = {}
        for pid, f in self._paths.items():
            if f.machine.state is PathState.CLOSED:
                continue
            rtt = f.rtt
            if pid == active and self.quic.smoothed_rtt is not None:
                rtt = self.quic.smoothed_rtt
            stats = f.actor.stats
            verdict = self._health.verdict(self.conn_id, pid) if self._groups_on else None
            out[pid] = PathSample(
                rtt,
                stats.bytes_sent,
                stats.bytes_received,
                _RANK[verdict] if verdict is not None else None,
                stats.datagrams_sent,
                stats.datagrams_received,
                stats.probes_sent,
            )
        return out

    # ------------------------------------------------------------------ data plane

    def datagram_received(self, path_id: int, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.closed:
            return
        quic = self.quic
        quic.receive_datagram(data, PathAddr(addr, path_id), _now())
        sends = quic.receive_needs_send()
        if not sends and self._live_at is not None and quic.outstanding_since() is None:
            # Everything sent was answered (an idle PING's ACK): the look scheduled when it
            # left would find no silence to judge. Judge now, and spare the node's timer.
            self._health.cancel(("live", self.conn_id))
            self._look()
        if self._health.gone:  # a peer said to be gone talks again (a restart, a reset)
            self._health.peer_heard(_addr(addr))
        if self._asked:
            asked = self._asked.pop(path_id, None)
            if asked is not None:  # the active path delivers after a group's PING
                self._health.answered(self.conn_id, path_id, None)
        self._after_input(sends=sends)

    def path_error(self, path_id: int, exc: OSError, evidence: Evidence | None) -> None:
        """A socket error, judged by the path (``actors/socket_errors.py``): an unreachable
        makes the path suspect and its group asks it once now (the group's verdict decides);
        the peer gone is no reason to move (every path leads to the same dead port)."""
        facts = self._paths.get(path_id)
        if evidence is Evidence.PEER_GONE and facts is not None:
            # Node-wide: every connection to that peer learns it, including those that have
            # not sent since (their group's verdict must not move them either).
            self._health.peer_gone(_addr(facts.remote))
        if evidence is not None and self.options.health is not None:
            if facts is not None and evidence is not Evidence.PEER_GONE:
                facts.write_error = (evidence.value, _now())
            self._health.evidence(self.conn_id, path_id, evidence)
        self._changed.set()

    def starved(self, start: float, end: float) -> float:
        """Loop-clock interval -> seconds the loop could not read (node clock lag meter)."""
        offset = _now() - self._loop.time()
        return self._health.lag.starved(start + offset, end + offset)

    def health_queued(self, path_id: int) -> bool:
        facts = self._paths.get(path_id)
        return facts is not None and facts.actor.queued()

    def _after_input(self, *, sends: bool) -> None:
        """Handle what aioquic made of the input; ``sends``: it may have queued something."""
        quic = self.quic
        while (event := quic.next_event()) is not None:
            self._handle_event(event)
        for response in quic.take_path_responses():
            facts = self._paths.get(response.path_id)
            if facts is not None:
                if facts.asymmetric != response.asymmetric:
                    facts.asymmetric = response.asymmetric
                    self._publish_soon()
                facts.actor.path_response(response.rtt)
                self._answered(response.path_id, response.rtt)
        if quic.handshake_confirmed and not self._confirmed.is_set():
            self._confirmed.set()
        if quic.spare_peer_cids != self._published_spares:
            self._publish_soon()  # the CID budget is part of the view
        self._changed.set()
        self._schedule_flush(sends=sends)

    def _handle_event(self, event: qe.QuicEvent) -> None:
        if self.app_handler is not None and self.app_handler(event):
            return
        if self.streams.handle_event(event):
            return
        if isinstance(event, qe.HandshakeCompleted):
            self.alpn = event.alpn_protocol
            self._handshake_done.set()
            self._publish_soon()
        elif isinstance(event, qe.ConnectionTerminated):
            by_peer = event.reason_phrase != "Idle timeout"
            self._terminate(
                ConnectionClosedError(
                    self.conn_id,
                    reason=f"{event.reason_phrase or 'closed'} (error code {event.error_code})",
                ),
                error_code=event.error_code,
                by_peer=by_peer,
            )

    def transmit_soon(self) -> None:
        """Send what aioquic has queued, once, later in this event-loop turn.

        For code that calls ``quic.send_*`` outside the input path (an application protocol such
        as HTTP/3 sending a request): input batches already end with a flush.
        """
        self._schedule_flush()

    def _schedule_flush(self, *, sends: bool = True) -> None:
        """Flush later in this loop turn. ``sends`` False: only aioquic's timer and the
        streams need a look (a received ACK-only datagram that left nothing to send:
        ``receive_needs_send``); any caller in the same turn that may have queued something
        makes it a full flush."""
        if sends:
            self._flush_sends = True
        if not self._flush_scheduled and not self.closed:
            self._flush_scheduled = True
            self._health.flush_soon(self)  # one callback per loop turn for the whole node

    def flush(self) -> None:
        """The node's batch calls this once per loop turn in which the connection had
        something to send (``NodeHealth.flush_soon``)."""
        if self._flush_scheduled:
            self._flush(sends=self._flush_sends)

    def _flush(self, *, sends: bool = True) -> None:
        """Send everything aioquic has for us, each datagram from its path's socket."""
        self._flush_scheduled = self._flush_sends = False
        if self.closed and not self.quic.close_pending:
            return
        now = _now()
        sent = False
        if sends:
            active = self.quic.active_path_id if self.quic.path_count else None
            for data, addr in self.quic.datagrams_to_send(now):
                path_id = getattr(addr, "path_id", active if active is not None else -1)
                facts = self._paths.get(path_id)
                if facts is not None:
                    facts.actor.send(data)
                    sent = True
        if sent and self._live_at is None and self.options.health is not None:
            # Sending again: silence means something from now on; look when it could matter.
            config = self.options.health
            pto = self.quic.probe_timeout()
            self._look_soon(now + max(config.degraded_ptos * pto, config.min_silence / 2))
        self.streams.service()  # wake writers (ACKs arrived), forget streams done both ways
        self._arm_timer()

    def _arm_timer(self) -> None:
        when = None if self.closed else self.quic.get_timer()
        if when is not None and self.options.idle_keepalive and self._confirmed.is_set():
            keepalive = self.quic.idle_keepalive_at()
            if keepalive is not None and keepalive < when:
                when = keepalive
        if when == self._timer_at:
            # Most flushes leave the deadline as it was (bench B3: ~60 %): nothing to move.
            return
        self._timer_at = when
        if when is None:
            self._health.cancel(self._timer_key)
        else:  # aioquic's clock (_now) is the node's
            self._health.schedule(self._timer_key, when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer_at = None
        now = _now()
        if (
            self.options.idle_keepalive
            and self._confirmed.is_set()
            and self.quic.send_idle_keepalive(now, next(self._ping_ids))
        ):
            self._health.count("idle")
        self.quic.handle_timer(now)  # checks each of its deadlines: early is harmless
        self._after_input(sends=True)

    # ------------------------------------------------------------------ streams (data plane)

    def open_stream(self) -> Stream:
        return self.streams.open()

    async def accept_stream(self) -> Stream:
        return await self.streams.accept()

    # StreamTransport (actors/stream_table.py): all the stream table may do to this connection.

    def stream_send(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        self.quic.send_stream_data(stream_id, data, end_stream)
        self._schedule_flush()

    def stream_send_backlog(self, stream_id: int) -> int:
        return self.quic.send_backlog(stream_id)

    def set_receive_backlog(self, stream_id: int, unread: int, limit: int, *, due: bool) -> None:
        if self.quic.set_receive_backlog(stream_id, unread, limit, due=due):
            self._schedule_flush()  # new credit is due

    def next_stream_id(self) -> int:
        return self.quic.get_next_available_stream_id()

    def has_stream(self, stream_id: int) -> bool:
        return self.quic.has_stream(stream_id)

    def check_open(self) -> None:
        if self.closed:
            raise self.close_error or ConnectionClosedError(self.conn_id)

    # ------------------------------------------------------------------ control plane

    async def receive(self, msg: object) -> object:
        if isinstance(msg, EmitChallenge):
            return Later(self.spawn(self._emit_challenge(msg), name="emit-challenge"))
        if isinstance(msg, Connect):
            return Later(self.spawn(self._connect(msg.timeout), name="connect"))
        if isinstance(msg, AddPath):
            return Later(self._queued(msg.op, self._add_path(msg), "add-path"))
        if isinstance(msg, Probe):
            return Later(self._queued(msg.op, self._probe(msg.path_id, msg.timeout), "probe"))
        if isinstance(msg, Switch):
            return Later(self._queued(msg.op, self._switch(msg), "switch"))
        if isinstance(msg, ClosePath):
            return Later(self._queued(msg.op, self._close_path(msg.path_id), "close-path"))
        if isinstance(msg, Close):
            self._close(msg.error_code, msg.reason)
            return None
        if isinstance(msg, PathsLost):
            self._paths_lost(msg.path_ids)
            return None
        if isinstance(msg, PathsBack):
            self._paths_back(msg.path_ids)
            return None
        if isinstance(msg, ChildFailed):
            # A path that crashed is a failed path, never a failed connection.
            for path_id, facts in list(self._paths.items()):
                if facts.ref is msg.ref:
                    log.error("path %s of %s crashed: %s", path_id, self.conn_id, msg.error)
                    self._forget_path(path_id)
            return None
        return await super().receive(msg)

    def _queued(
        self, op: int | None, coro: Coroutine[Any, Any, Any], name: str
    ) -> asyncio.Task[Any]:
        """Run ``coro`` in the operation queue; it publishes before it replies, so whoever
        awaited it reads its effect (read-your-writes)."""

        async def run() -> Any:
            try:
                async with self._op_queue:
                    self._op = op
                    try:
                        return await coro
                    finally:
                        self._op = None
                        self._publish()
            finally:
                coro.close()  # never started (cancelled while queued): no "never awaited"

        return self.spawn(run(), name=name)

    # ------------------------------------------------------------------ active-path liveness

    def _look_soon(self, at: float | None = None) -> None:
        """Judge the active path at ``at`` (now by default) on the node's one timer: no task
        per connection, and none at all while it is idle."""
        if self.options.health is None or self.closed:
            return
        at = _now() if at is None else at
        if self._live_at is not None and self._live_at <= at:
            return
        self._live_at = at
        self._health.schedule(("live", self.conn_id), at, self._look)

    def _look(self) -> None:
        """Judge the active path from what arrived while data was outstanding (no probes).

        Degraded and back is a state change; dead is reported once to the supervisor (whose
        failover policy decides) and to the path's health group, which confirms it for every
        connection that shares its fate. Silence counts only for time the loop could read.
        The next look is at the time the judgement could change; an idle path gets none until
        it sends again (its group and the idle PING watch it meanwhile).
        """
        self._live_at = None
        config = self.options.health
        if config is None or self.closed or not self._confirmed.is_set():
            return
        active = self.quic.active_path_id
        state = self.path_state(active)
        if state is PathState.CLOSED:
            return
        now = _now()
        outstanding = self.quic.outstanding_since()
        if outstanding is None:
            self._dead_reported = None
            if state is PathState.DEGRADED:
                self._move(active, PathState.ACTIVE)
            return
        last = self.quic.last_rx(active)
        pto = self.quic.probe_timeout()
        since = outstanding if last is None else max(last, outstanding)
        heard = since + self._health.lag.discounted_silence(since, now)
        verdict = ActiveLiveness(config).judge(
            now=heard, last_receive=last, outstanding_since=outstanding, pto=pto
        )
        if verdict is not Liveness.ACTIVE and self._rechecks < MAX_RECHECKS:
            facts = self._paths.get(active)
            if facts is not None and facts.actor.queued():
                # The kernel holds datagrams the loop has not read: read them, then judge.
                self._rechecks += 1
                self._look_soon(now + RECHECK_AFTER)
                return
        self._rechecks = 0
        if verdict is Liveness.ACTIVE:
            self._dead_reported = None
            if state is PathState.DEGRADED:
                self._move(active, PathState.ACTIVE)
            next_at = since + max(config.degraded_ptos * pto, config.min_silence / 2)
        elif verdict is Liveness.DEGRADED:
            if state is PathState.ACTIVE:
                self._move(active, PathState.DEGRADED)
            next_at = since + max(config.dead_ptos * pto, config.min_silence)
        else:
            if self._peer_is_gone():
                # The peer's own host said its port is closed: moving would not help. Nothing
                # to watch either: a datagram from it starts the judgement again.
                if state is PathState.ACTIVE:
                    self._move(active, PathState.DEGRADED)
                return
            if self._dead_reported != active and self._groups_on:
                self._health.suspect(self.conn_id, active)
            self._report_dead(active, "silent")
            next_at = now + max(pto, config.min_silence)  # watch for it coming back
        self._look_soon(max(next_at, now + 0.005))

    def _peer_is_gone(self) -> bool:
        """The peer's own host said its port is closed (a port unreachable) and nobody has
        heard from it since: a dead active path is its process, not the path."""
        if not self._health.gone:
            return False
        facts = self._paths.get(self.quic.active_path_id)
        return facts is not None and self._health.is_gone(_addr(facts.remote))

    def _report_dead(self, active: int, reason: str) -> None:
        if self._dead_reported == active or self._peer_is_gone():
            return
        self._dead_reported = active
        if self.path_state(active) is PathState.ACTIVE:
            self._move(active, PathState.DEGRADED)
        self._publish()  # the policy reads the view the report is about
        self._notify(ActivePathDead(self.conn_id, active, reason))

    async def _connect(self, timeout: float) -> tuple[bytes, ...]:
        deadline = self._loop.time() + timeout
        # The path hands its socket to asyncio in its own on_start: an Initial flushed before
        # that is dropped, and the handshake then waits a whole PTO (~200 ms) to resend it.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._paths[0].actor.wait_ready()
        self.quic.connect(PathAddr(self.remote, 0), now=_now())
        self.quic.attach_initial_path(0)
        self._flush()
        done = asyncio.ensure_future(self._handshake_done.wait())
        ended = asyncio.ensure_future(self._terminated.wait())
        try:
            await asyncio.wait(
                {done, ended},
                timeout=max(0.0, deadline - self._loop.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            done.cancel()
            ended.cancel()
        if self._handshake_done.is_set():
            self._paths[0].validated_at = self._loop.time()
            self._move(0, PathState.ACTIVE)
            self._publish()
            offer = self.quic.preferred_address
            if offer is not None:
                self._notify(PreferredAddressOffered(self.conn_id, offer))
            # The dialler checks them when the protocol needs it (libp2p TLS: no CA, own rules).
            return peer_certificate_chain(self.quic)
        if self.closed:
            raise HandshakeError(_fmt(self.remote), self.close_reason or "connection closed")
        self._close(0, "handshake timeout")
        raise DialTimeoutError(_fmt(self.remote), timeout=timeout)

    def _require_migratable(self) -> None:
        if self.quic.peer_disabled_active_migration:
            raise MigrationNotSupportedError("disable_active_migration", conn_id=self.conn_id)

    async def _add_path(self, msg: AddPath) -> int:
        """Adopt the socket as a new path; errors in the contract's order, nothing left open."""
        sock = self._sockets.pop(msg.socket_key)
        try:
            self.check_open()
            self._require_migratable()
            remote = self.remote
            if msg.preferred:
                offer = self.quic.preferred_address
                if offer is None:
                    raise MigrationNotSupportedError("no preferred address", conn_id=self.conn_id)
                remote = offer if len(self.remote) == 2 else (*offer, 0, 0)
            bound = _addr(sock.getsockname())
            asked = msg.requested or bound
            for facts in self._live_paths():
                if _addr(facts.remote) != _addr(remote):
                    continue  # another 4-tuple whatever the local address
                same_port = asked[1] == facts.local[1] or (
                    asked[1] == 0 and facts.requested[1] == 0
                )
                if facts.local == bound or (facts.local[0] == asked[0] and same_port):
                    raise PathAlreadyExistsError(msg.label or _fmt(bound))
            if len(self._live_paths()) >= MAX_PATHS:
                raise PathLimitError(MAX_PATHS, conn_id=self.conn_id)
            path_id = next(self._path_ids)
            self.quic.add_path(path_id, remote)
        except BaseException:
            sock.close()
            raise
        self._start_path(path_id, sock, asked, remote)
        return path_id

    def _stale(self, path_id: int, facts: _PathFacts) -> bool:
        """Validated too long ago to switch to without a re-probe? Its group's answers count:
        paths that share fate are as fresh as the group's latest answer. A path revived by
        its group's verdict (not by an answer of its own) is standby but unvalidated: its
        first use validates this very 4-tuple."""
        if not self.quic.is_path_validated(path_id):
            return True
        fresh = facts.validated_at
        group = self._health.last_answer(self.conn_id, path_id) if self._groups_on else None
        if group is not None:
            # The node's clock is the connections' (_now); validated_at is the loop's.
            group += self._loop.time() - _now()
            fresh = group if fresh is None else max(fresh, group)
        return fresh is None or self._loop.time() - fresh > self.options.stale_after

    def _live_paths(self) -> list[_PathFacts]:
        return [f for f in self._paths.values() if f.machine.state is not PathState.CLOSED]

    def _live(self, path_id: int) -> _PathFacts:
        facts = self._paths.get(path_id)
        if facts is None or facts.machine.state is PathState.CLOSED:
            raise PathClosedError(path_id=path_id, conn_id=self.conn_id)
        return facts

    async def _wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds after some input, at most ``timeout`` seconds."""
        if predicate():
            return True
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._changed.clear()
                    await self._changed.wait()
                    self.check_open()
        except TimeoutError:
            return predicate()
        return True

    async def _wait_heard(
        self, predicate: Callable[[], bool], since: float, window: float, path_id: int
    ) -> bool:
        """``_wait_until`` for a window of the peer's silence (a switch's confirmation): it
        counts only time the loop could read (stalls discounted: ``LagMeter.judge_at``) and
        does not end while the path's socket holds datagrams not read yet. Bounded by
        ``_HEARD_CAP`` windows of wall time: a loop that is never on time still decides."""
        lag = self._health.lag
        cap = since + max(_HEARD_CAP * window, 2.0)
        rechecks = 0
        while True:
            now = _now()
            left = min(lag.judge_at(since, window, now), cap) - now
            if left > 0:
                if await self._wait_until(predicate, left):
                    return True
                continue
            if predicate():
                return True
            facts = self._paths.get(path_id)
            if rechecks < MAX_RECHECKS and now < cap and facts is not None and facts.actor.queued():
                rechecks += 1
                if await self._wait_until(predicate, RECHECK_AFTER):
                    return True
                continue
            return False

    async def _wait_confirmed(self) -> None:
        """Probes wait for the handshake to be confirmed (HANDSHAKE_DONE), RFC 9000 §9."""
        while not self._confirmed.is_set():
            self.check_open()
            ended = asyncio.ensure_future(self._terminated.wait())
            confirmed = asyncio.ensure_future(self._confirmed.wait())
            try:
                await asyncio.wait({ended, confirmed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended.cancel()
                confirmed.cancel()
        self.check_open()

    async def _emit_challenge(self, msg: EmitChallenge) -> list[bytes]:
        await self._wait_confirmed()
        self._require_migratable()
        facts = self._live(msg.path_id)
        if not self.quic.reserve_peer_cid(msg.path_id):
            # A replenishment may be in flight (we retired a CID): wait one RTT for it.
            rtt = self.quic.smoothed_rtt or self.quic.probe_timeout()
            if not await self._wait_until(lambda: self.quic.spare_peer_cids > 0, rtt):
                held = sum(1 for cid in self.quic.path_cids().values() if cid is not None)
                raise NoConnectionIdError(
                    _fmt(facts.local),
                    spare=self.quic.spare_peer_cids,
                    in_use=held,
                    pending_retires=self.quic.pending_retires,
                )
            self.quic.reserve_peer_cid(msg.path_id)
        if msg.nudge and self.quic.ack_now(_now()):
            self._flush()
        datagrams = self.quic.emit_challenge(msg.path_id, _now())
        return [data for data, _ in datagrams]

    async def _probe(self, path_id: int, timeout: float) -> ProbeReport:
        """Validate a path; a failure carries what was tried as ``exc.report``."""
        facts = self._live(path_id)
        if path_id == self.quic.active_path_id:
            # The active path is proven by the traffic it carries; report its RTT instead.
            return ProbeReport(path_id, self.quic.smoothed_rtt or 0.0)
        path = facts.actor
        try:
            rtt = await facts.ref.ask(StartProbe(timeout))
        except BaseException as exc:
            exc.report = ProbeReport(  # type: ignore[attr-defined]
                path_id, None, _ns(path.stats.probe_try_times)
            )
            raise
        assert isinstance(rtt, float)
        return ProbeReport(path_id, rtt, _ns(path.stats.probe_try_times), facts.asymmetric)

    async def _switch(self, msg: Switch) -> Switched:
        """Make ``msg.path_id`` active; confirmed by the peer within 3 x PTO or rolled back.

        A stale target is re-probed first with the caller's ``probe_timeout``. Cancelled, the
        switch rolls back in its own ``finally`` before the cancellation goes on.
        """
        target = self._live(msg.path_id)
        active = self.quic.active_path_id
        if msg.path_id == active:
            return Switched(active, active, target.rtt, 0.0, None, None)
        self._require_migratable()
        if target.machine.state is not PathState.STANDBY:
            raise PathNotValidatedError(_fmt(target.local), state=target.machine.state)
        reprobe = None
        if self._stale(msg.path_id, target):
            reprobe = await self._probe(msg.path_id, msg.probe_timeout)
        old = self._paths[active]
        t0 = _now()
        pto_old = self.quic.probe_timeout()
        failover = msg.old_path_dead
        old_dcid = self.quic.path_cids().get(active)
        token = self.quic.switch_path(
            msg.path_id,
            t0,
            seed_rtt=target.rtt,
            ping_uid=next(self._ping_ids),
            old_path_dead=failover,
        )
        window = max(
            3 * max(pto_old, self.quic.probe_timeout()), self.options.min_confirmation_window
        )
        self._qlog_migration("migration_started", msg.path_id, old=active)  # qlog hook
        self._move(msg.path_id, PathState.ACTIVE)
        old.rollback_target = True
        self._move(active, PathState.STANDBY)
        self._flush()
        confirmed = False
        try:
            confirmed = await self._wait_heard(
                lambda: (self.quic.last_non_probing_rx(msg.path_id) or -1.0) >= t0,
                t0,
                window,
                msg.path_id,
            )
        finally:
            old.rollback_target = False
            if not confirmed and not self.closed:
                # Rolled back (or cancelled): the old path carries the connection again.
                self.quic.rollback_switch(token, _now(), ping_uid=next(self._ping_ids))
                self._qlog_migration("migration_abandoned", msg.path_id, old=active)  # qlog hook
                self._move(active, PathState.ACTIVE)
                self._move(msg.path_id, PathState.STANDBY)
                self._flush()
                if failover:
                    # Back on a path judged dead: judge it afresh, so it is reported (degraded,
                    # ActivePathDead) again if it still is, and the failover keeps looking.
                    self._dead_reported = None
                    self._look_soon()
        if not confirmed:
            self.check_open()
            self._move(msg.path_id, PathState.FAILED)
            self.quic.invalidate_path(msg.path_id)
            raise MigrationRolledBackError(
                _fmt(old.local),
                _fmt(target.local),
                timeout=window,
                reason="the peer did not reach us on the new path",
            )
        self.migrations += 1
        self._qlog_migration("migration_complete", msg.path_id, old=active)  # qlog hook
        new_dcid = self.quic.path_cids().get(msg.path_id)
        if old_dcid is not None and new_dcid is not None and new_dcid != old_dcid:
            self._qlog(
                "connection_id_updated",
                {"owner": "remote", "old": old_dcid.hex(), "new": new_dcid.hex()},
            )
        target.validated_at = self._loop.time()
        self.remote = target.remote  # new paths follow the server where it now is
        if failover:
            # Failed over from: its group tells when (if) it comes back (a failed member is
            # re-tried first in its group's rotation).
            self._move(active, PathState.FAILED)
            self.quic.invalidate_path(active)
            self._dead_reported = None
        return Switched(
            from_path=token.from_path,
            to_path=token.to_path,
            probe_rtt=target.rtt,
            confirmation_time=_now() - t0,
            cid_sequence_before=token.cid_sequence_before,
            cid_sequence_after=token.cid_sequence_after,
            reprobe=reprobe,
        )

    async def _close_path(self, path_id: int) -> bool:
        facts = self._paths.get(path_id)
        if facts is None or facts.machine.state is PathState.CLOSED:
            return False  # idempotent
        if not self.closed and path_id == self.quic.active_path_id:
            raise ActivePathCloseError(_fmt(facts.local))
        if self.quic.has_path(path_id) and not self.closed:
            self.quic.close_path(path_id)
            self._schedule_flush()  # sends RETIRE_CONNECTION_ID on the active path
        self._qlog_path("path_assigned", path_id, abandoned=True)  # qlog hook: path closed
        # Closed once asked, even if the caller gives up while the socket closes.
        await asyncio.shield(facts.ref.stop())
        self._move(path_id, PathState.CLOSED)
        self._paths.pop(path_id, None)
        return True

    def _forget_path(self, path_id: int) -> None:
        if path_id in self._paths:
            self._qlog_path("path_assigned", path_id, abandoned=True)  # qlog hook: path closed
        if self.quic.has_path(path_id) and path_id != self.quic.active_path_id:
            self.quic.close_path(path_id)
        self._move(path_id, PathState.CLOSED)
        self._paths.pop(path_id, None)

    def _close(self, error_code: int, reason: str) -> None:
        if self.closed:
            return
        self.quic.close(error_code=error_code, reason_phrase=reason)
        self._flush()  # CONNECTION_CLOSE leaves on the active path before we stop
        self._terminate(
            ConnectionClosedError(self.conn_id, reason=reason or "closed locally"),
            error_code=error_code,
            by_peer=False,
        )

    def _terminate(
        self, error: ConnectionClosedError, *, error_code: int = 0, by_peer: bool = False
    ) -> None:
        """End everything once: waiters fail, paths close, the supervisor is told."""
        if self.closed:
            return
        self.closed = True
        self.close_error = error
        self.close_reason = str(error)
        self._terminated.set()
        self._changed.set()
        self._timer_at = None
        self._health.cancel(self._timer_key)
        self.streams.fail_all(error)
        for path_id, facts in list(self._paths.items()):
            facts.actor.connection_closed(error)
            self._move(path_id, PathState.CLOSED)
        self._health.unregister(self.conn_id, list(self._paths))
        self._health.cancel(("live", self.conn_id))
        self._publish()
        self._notify(ConnectionEnded(self.conn_id, error_code, error.reason or "", by_peer))
        self.ref.request_stop()


def _addr(sockaddr: tuple[Any, ...]) -> tuple[str, int]:
    return str(sockaddr[0]), int(sockaddr[1])


def _endpoint(addr: tuple[Any, ...]) -> dict[str, Any]:
    """A qlog ``PathEndpointInfo``: ``{ip_v4, port_v4}`` or ``{ip_v6, port_v6}``."""
    host = _ip(addr)
    v = "v6" if ":" in host else "v4"
    return {f"ip_{v}": host, f"port_{v}": int(addr[1])}


def _ip(sockaddr: tuple[Any, ...]) -> str:
    host = str(sockaddr[0])
    return host[7:] if host.startswith("::ffff:") else host


#: Failover order of a path by its group's verdict (PathSample.health_rank). A suspicion is
#: not a verdict: it is often the failing path's own report, its group not yet confirming it.
_RANK = {Verdict.ALIVE: 0, Verdict.SUSPECT: 0, Verdict.DEAD: 1}
#: A confirmation window stretched by a starved loop ends after this many windows of wall time.
_HEARD_CAP = 10


def _ns(times: list[float]) -> tuple[int, ...]:
    return tuple(int(t * 1e9) for t in times)


def _bound_device(sock: socket.socket) -> str | None:
    """The interface a path socket is bound to (SO_BINDTODEVICE), None when unbound.

    Read from the socket itself, so paths given with ``sock=`` report their device too.
    """
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16)
    except OSError:
        return None
    return raw.split(b"\0", 1)[0].decode(errors="replace") or None


def _fmt(addr: tuple[Any, ...]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
