"""SupervisorActor: the registry of outbound connections, contract checks, events and spans.

One per process. It checks requests in the contract's order (argument errors, then state
errors, read from each connection's published view), forwards them to the connection, which
alone orders its operations and owns its paths' state, and turns what connections publish
into events, spans, metrics and journal records. It holds an ``ActorRef``, a ``ViewCell`` and
a data-plane port per connection, never a connection object. Policies (failover) hear of
changes through this actor's mailbox and act by sending the same requests a user would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast, get_args

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span

from actors.envelope import Envelope
from actors.errors import (
    ConnectionClosedError,
    InvalidAddressError,
    MigrationError,
    MigrationNotEnabledError,
    MigrationNotSupportedError,
    MigrationRolledBackError,
    NoConnectionIdError,
    PathAlreadyExistsError,
    PathClosedError,
    PathLimitError,
    ProbeTimeoutError,
)
from actors.factory import MAX_PATHS, ConnectionOptions, NodeHealth, new_connection
from actors.messages import (
    ActivePathDead,
    AddPath,
    Close,
    ClosePath,
    Connect,
    ConnectionEnded,
    PathsBack,
    PathsLost,
    PreferredAddressOffered,
    Probe,
    ProbeReport,
    Switch,
    Switched,
)
from actors.path_state import PathState
from actors.runtime import Actor, ActorError, ActorRef, ChildFailed, Later, RestartIntensity
from actors.view import ConnectionView, PathChange
from supervisor.addresses import (
    bind_path_socket,
    check_local_address,
    check_path_ip,
    multiaddr_text,
    parse_quic_multiaddr,
    sockaddr_to_multiaddr,
    split_peer_id,
)
from supervisor.core import validate
from supervisor.core.config import NetworkPolicy
from supervisor.core.events import (
    Event,
    EventBus,
    EvtConnectionMigrationCompleted,
    EvtConnectionMigrationFailed,
    EvtConnectionMigrationStarted,
    EvtNetworkChanged,
    EvtPathAdded,
    EvtPathRemoved,
    EvtPathStateChanged,
    MigrationInitiator,
    MigrationOutcome,
    MigrationReason,
    initiator_of,
)
from supervisor.core.messages import (
    AddPathRequest,
    CloseConnectionRequest,
    ClosePathRequest,
    ConnectionSnapshot,
    DialRequest,
    HealthStatusRequest,
    InterfaceAddressesRequest,
    MigrationStats,
    PathAddedReply,
    PathsBackRequest,
    PathsLostRequest,
    ProbeRequest,
    SnapshotRequest,
    StatsRequest,
    SwitchReply,
    SwitchRequest,
    SwitchResult,
)
from supervisor.interfaces import interface_addresses
from supervisor.libp2p.credentials import Credentials, parse_peer_id, verified_peer
from supervisor.libp2p.peer_id import PeerId
from supervisor.orchestration.client_config import client_configuration, open_key_log
from supervisor.orchestration.failover import FailoverController
from supervisor.orchestration.herd import HerdLimits, MigrationGate
from supervisor.orchestration.network.inventory import Inventory
from supervisor.orchestration.network.monitor import (
    NetworkChanged,
    NetworkMonitor,
    NetworkStatus,
    NetworkStatusRequest,
    WatchPeers,
)
from supervisor.orchestration.network.netlink import SourceFactory, open_pyroute2
from supervisor.orchestration.network.netns import Namespace
from supervisor.orchestration.network.reactions import NetworkController
from supervisor.orchestration.policy import Policy, PolicyPort, SupervisorPort
from supervisor.orchestration.preferred import PreferredAddressMode, PreferredAddressPolicy
from supervisor.orchestration.registry import ConnectionEntry, local_addr_of, snapshot_of
from telemetry.journal import JournalWriter
from telemetry.metrics import Metrics
from telemetry.plain import plain_dict
from telemetry.propagation import context_from_fields
from telemetry.qlog import QlogDirectory
from telemetry.tracing import (
    ATTR_CID_SEQUENCE_AFTER,
    ATTR_CID_SEQUENCE_BEFORE,
    ATTR_CONNECTION_ID,
    ATTR_LIBP2P_PEER_ID,
    ATTR_MIGRATION_INITIATOR,
    ATTR_MIGRATION_OUTCOME,
    ATTR_MIGRATION_QUEUE_WAIT_MS,
    ATTR_NETWORK_ADDRESSES,
    ATTR_NETWORK_CHANGE,
    ATTR_NETWORK_INTERFACE,
    ATTR_NETWORK_MOVED,
    ATTR_PATH_CLOSE_REMOVED,
    ATTR_PATH_LOCAL_ADDRESS,
    ATTR_PATH_TO_LOCAL_ADDRESS,
    ATTR_PROBE_RTT_MS,
    ATTR_PROBE_TRIES,
    ATTR_SWITCH_CONFIRMATION_MS,
    ATTR_SWITCH_ROLLED_BACK,
    ATTR_VALIDATION_ASYMMETRIC,
    EVENT_PATH_ADDED,
    EVENT_PATH_REMOVED,
    EVENT_PATH_STATE_CHANGED,
    EVENT_PROBE_TRY,
    RESULT_CANCELLED,
    RESULT_FAILED,
    RESULT_ROLLED_BACK,
    SPAN_NETWORK_CHANGE,
    SPAN_PATH_CLOSE,
    SPAN_PATH_PROBE,
    SPAN_PATH_SWITCH,
    Tracing,
    path_event,
    set_result,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Restarts of a crashed NetworkMonitor allowed within MONITOR_PERIOD seconds.
MONITOR_RESTARTS = 5
MONITOR_PERIOD = 60.0

#: EvtNetworkChanged's remote_addr when no peer is concerned.
_NO_PEER = sockaddr_to_multiaddr(("0.0.0.0", 0))


@dataclass(frozen=True, slots=True)
class _Changed:
    """Mailbox note to policies: a connection published path changes."""

    conn_id: str
    changes: tuple[PathChange, ...]


def outcome_of(exc: BaseException, *, closed: bool) -> MigrationOutcome:
    """The one outcome of a migration that ended with ``exc`` (DESIGN section 3)."""
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if closed or isinstance(exc, ConnectionClosedError):
        return "connection_closed"
    if isinstance(exc, MigrationRolledBackError):
        return "rolled_back"
    if isinstance(exc, ProbeTimeoutError):
        return "probe_timeout"
    if isinstance(exc, NoConnectionIdError):
        return "no_connection_id"
    if isinstance(exc, MigrationNotSupportedError):
        return "peer_disabled"
    return "rejected"


class SupervisorActor(Actor):
    def __init__(
        self,
        *,
        migration_enabled: bool,
        events: EventBus,
        sockets: dict[int, socket.socket],
        registry: dict[str, ConnectionEntry],
        options: ConnectionOptions | None = None,
        tracing: Tracing | None = None,
        metrics: Metrics | None = None,
        journal: JournalWriter | None = None,
        qlog: QlogDirectory | None = None,
        policy: Callable[[PolicyPort], Policy] | None = None,
        preferred_address: PreferredAddressMode = "ignore",
        herd: HerdLimits | None = None,
        network: NetworkPolicy | None = None,
        netns: Namespace | None = None,
        netlink: SourceFactory | None = None,
        libp2p: Callable[[], Credentials] | None = None,
    ) -> None:
        """``registry`` is shared with the Supervisor front-end, which reads views from it;
        ``policy`` makes the policy (failover) over this actor's port; ``herd`` bounds the
        migrations in flight (every switch takes a slot of ``self.gate`` first);
        ``network``: the NetworkMonitor runs (``netlink`` opens its source) and its changes
        go to a NetworkController (which moves through the failover policy); ``netns``:
        where path sockets are made and the monitor listens."""
        self._make_policy = policy
        self.policy: Policy | None = None
        self._network_policy = network
        self.netns = netns
        self._netlink = netlink
        #: The Supervisor's identity's TLS side, made when first needed (a /p2p/ dial).
        self._libp2p = libp2p
        self.network: NetworkController | None = None
        self.monitor: ActorRef | None = None
        self._monitor_inventory: Inventory | None = None
        self._monitor_restarts = RestartIntensity(MONITOR_RESTARTS, MONITOR_PERIOD)
        self._monitor_gave_up = False
        self._policy_list: tuple[Policy, ...] = ()
        self._preferred_mode = preferred_address
        self._preferred: PreferredAddressPolicy | None = None
        self._preferred_counts: dict[str, int] = {}
        self.tracing = tracing or Tracing(None)
        self.metrics = metrics or Metrics(None)
        self.journal = journal
        self.qlog = qlog
        self.migration_enabled = migration_enabled
        self.events = events
        self.sockets = sockets  # sockets handed in with sock=, by key
        self.options = options or ConnectionOptions()
        #: The node's one health timer and its health groups, shared by every connection.
        self.health = NodeHealth(self.options.health)
        self.conns = registry
        # Operation tags: path changes come back tagged, so their span events land on the
        # span of the operation that caused them (several may wait in a connection's queue).
        self._op_tags = itertools.count(1)
        self._op_spans: dict[int, Span] = {}
        self._socket_keys = itertools.count(1 << 30)
        self._completed = 0
        self._failed: dict[str, int] = {}  # outcome -> migrations that ended so
        self._suspect_failovers = 0
        self.gate = MigrationGate(herd, on_wait=self.metrics.migration_queue_wait)
        self._unregister_node = self.metrics.register_node(self._node_figures)
        self._unregister_cids = self.metrics.register_cid_spare(self._min_spare_cids)

    async def on_start(self) -> None:
        port = SupervisorPort(self.conns, self.ref, self.emit, self.spawn, self.note)
        if self._make_policy is not None:
            self.policy = self._make_policy(port)
        self._preferred = PreferredAddressPolicy(port, self._preferred_mode, self._count_preferred)
        network = self._network_policy
        if network is not None and network.monitor:
            assert isinstance(self.policy, FailoverController), (
                "the network policy moves through it"
            )
            self.network = NetworkController(port, network, self.policy)
            self._start_monitor(None)
        self._policy_list = tuple(p for p in (self.policy, self.network) if p is not None)

    def _start_monitor(self, inventory: Inventory | None) -> None:
        monitor = NetworkMonitor(
            self._netlink or open_pyroute2,
            self._network_changed,
            netns=self.netns.path if self.netns is not None else None,
            inventory=inventory,
        )
        # Kept only to hand it to a successor after a crash (OTP: the child is fully stopped
        # when ChildFailed arrives, so its inventory has one owner at a time).
        self._monitor_inventory = monitor.inventory
        self.monitor = self.spawn_child(monitor, name="network-monitor")

    async def _restart_monitor(self, delay: float) -> None:
        await asyncio.sleep(delay)  # restart backoff (cancelled with this actor)
        self._start_monitor(self._monitor_inventory)

    def _policies(self) -> tuple[Policy, ...]:
        """The policies that hear changes (failover, network), fixed once started."""
        return self._policy_list

    async def _bind(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a bind (or a local-address check) in the supervisor's namespace."""
        if self.netns is None:
            return fn(*args, **kwargs)
        return await self.netns.run(fn, *args, **kwargs)

    # ------------------------------------------------------------------ network events

    def _network_changed(self, msg: NetworkChanged) -> None:
        """From the monitor's reader task: into this actor's mailbox (kept in order)."""
        if self.ref.is_alive:
            self.ref.tell(msg)

    def _on_network(self, msg: NetworkChanged) -> None:
        """Each change: one short ``quic.network.change`` span (the migrations it causes
        are its children), an EvtNetworkChanged, then the reactions."""
        for change in msg.changes:
            with self.tracing.span(
                SPAN_NETWORK_CHANGE,
                parent_context=Context(),
                attributes={
                    ATTR_NETWORK_INTERFACE: change.interface,
                    ATTR_NETWORK_CHANGE: change.change,
                    ATTR_NETWORK_ADDRESSES: list(change.addresses),
                },
            ) as span:
                trace_id = span.get_span_context().trace_id
                remote = sockaddr_to_multiaddr((change.peer, 0)) if change.peer else _NO_PEER
                self.emit(
                    EvtNetworkChanged(
                        "",
                        remote,
                        time.time(),
                        change.interface,
                        change.change,
                        change.addresses,
                        f"{trace_id:032x}" if trace_id else None,
                    )
                )
                self.metrics.network_change(change.change)
                if self.network is not None:
                    moved = self.network.on_network(
                        (change,), msg.facts, trace.set_span_in_context(span)
                    )
                    span.set_attribute(ATTR_NETWORK_MOVED, moved)
                    if moved:
                        log.info(
                            "%s %s: moving %d connection(s)", change.interface, change.change, moved
                        )
        if not msg.changes and self.network is not None:
            self.network.on_network((), msg.facts, None)

    async def _interface_addresses(self) -> tuple[tuple[str, str], ...]:
        found = await self._bind(interface_addresses)
        return tuple((name, str(a)) for name, addrs in sorted(found.items()) for a in addrs)

    def _watch_peers(self) -> None:
        if self.monitor is not None and self.monitor.is_alive:
            peers = {str(e.view.remote[0]) for e in self.conns.values() if not e.view.closed}
            self.monitor.tell(WatchPeers(tuple(sorted(peers))))

    async def _network_status(self) -> NetworkStatus:
        status: object = None
        if self.monitor is not None and self.monitor.is_alive:
            with contextlib.suppress(ActorError):  # it crashed just now: as if not running
                status = await self.monitor.ask(NetworkStatusRequest())
        if not isinstance(status, NetworkStatus):
            if self._network_policy is None:
                why = "no network policy (give FailoverPolicy() or NetworkPolicy())"
            elif not self._network_policy.monitor:
                why = "the monitor is off (NetworkPolicy(monitor=False))"
            elif self._monitor_gave_up:
                why = "the monitor crashed too often and was not restarted (probing only)"
            elif self.monitor is not None:
                why = "the monitor crashed and is restarting"
            else:
                why = "the monitor stopped"
            return NetworkStatus(
                False, why, self.netns.name if self.netns else None, (), (), (), 0, 0
            )
        return dataclasses.replace(
            status,
            netns=self.netns.name if self.netns is not None else None,
            reactions=dict(self.network.reactions) if self.network is not None else {},
        )

    def _count_preferred(self, what: str) -> None:
        self._preferred_counts[what] = self._preferred_counts.get(what, 0) + 1
        self.metrics.preferred_address(what)

    # ------------------------------------------------------------------ events and spans

    @contextlib.contextmanager
    def _op_span(self, span: Span) -> Iterator[int]:
        """A tag for one operation whose path changes become events of ``span``."""
        op = next(self._op_tags)
        self._op_spans[op] = span
        try:
            yield op
        finally:
            del self._op_spans[op]

    def emit(self, evt: Event, span: Span | None = None) -> None:
        """Publish an event: the bus (which numbers it), the operation's span (path events),
        the journal (with its ``seq``)."""
        evt = self.events.publish(evt) or evt
        if span is not None:
            if isinstance(evt, EvtPathStateChanged):
                path_event(
                    span, EVENT_PATH_STATE_CHANGED, evt.local_addr, str(evt.old), str(evt.new)
                )
            elif isinstance(evt, EvtPathAdded):
                path_event(span, EVENT_PATH_ADDED, evt.local_addr)
            elif isinstance(evt, EvtPathRemoved):
                path_event(span, EVENT_PATH_REMOVED, evt.local_addr)
        if self.journal is not None:
            self.journal.event(
                type(evt).__name__.removeprefix("Evt"),
                plain_dict(evt),
                conn=evt.conn_id,
                path=str(getattr(evt, "local_addr", "")) or None,
            )

    def _on_changes(
        self, conn_id: str, view: ConnectionView, changes: tuple[PathChange, ...]
    ) -> None:
        """A connection published (called synchronously at the end of its loop turn or
        operation): record, emit, and leave decisions to the policies' mailbox turn."""
        entry = self.conns.get(conn_id)
        if entry is None or not changes:
            return
        now = time.time()
        for change in changes:
            local = sockaddr_to_multiaddr(change.local)
            span = self._op_spans.get(change.op) if change.op is not None else None
            if change.old is None:
                self.emit(EvtPathAdded(conn_id, entry.peer_multiaddr, now, local), span)
                continue
            state = change.old.value
            self.metrics.path_bytes(change.bytes_sent, state=state, direction="transmit")
            self.metrics.path_bytes(change.bytes_received, state=state, direction="receive")
            if change.dropped_off_path:
                self.metrics.datagrams_dropped_offpath(change.dropped_off_path)
            self.emit(
                EvtPathStateChanged(
                    conn_id, entry.peer_multiaddr, now, local, change.old, change.new
                ),
                span,
            )
            if change.new is PathState.CLOSED:
                self.emit(EvtPathRemoved(conn_id, entry.peer_multiaddr, now, local), span)
        if self._policies() and self.ref.is_alive:
            self.ref.tell(_Changed(conn_id, changes))

    def _notify(self, msg: object) -> None:
        """ConnectionEnded / ActivePathDead from a connection: into the mailbox."""
        if self.ref.is_alive:
            self.ref.tell(msg)

    def _min_spare_cids(self) -> int | None:
        """Runs on the metric reader's thread: reads immutable published views only."""
        spares = [e.view.spare_peer_cids for e in list(self.conns.values()) if not e.view.closed]
        return min(spares) if spares else None

    def _node_figures(self) -> dict[str, Any]:
        """Runs on the metric reader's thread: copies of plain counters (each copy is one
        C call under the GIL, so never torn) and the lag meter's recent stalls."""
        health = self.health
        try:
            lag = health.lag.lag(60.0, health.clock())
        except (IndexError, ValueError):  # the meter changed under the reader: skip it
            lag = None
        return {
            "loop_lag_s": lag,
            "keepalives": dict(health.sent),
            "verdicts": dict(health.verdicts),
            "evidence": dict(health.evidence_seen),
            "groups": health.group_states(),
            "queued": self.gate.queued,
            "in_flight": self.gate.in_flight,
            "suspect_failovers": self._suspect_failovers,
        }

    def note(self, what: str) -> None:
        """A policy's observation worth counting (``PolicyPort.note``)."""
        if what == "suspect_failover":
            self._suspect_failovers += 1

    def _entry(self, conn_id: str) -> ConnectionEntry:
        entry = self.conns.get(conn_id)
        if entry is None or entry.view.closed:
            raise ConnectionClosedError(conn_id)
        return entry

    def snapshot(self, conn_id: str) -> ConnectionSnapshot | None:
        entry = self.conns.get(conn_id)
        return None if entry is None else snapshot_of(entry, self.migration_enabled)

    def _snap(self, conn_id: str) -> ConnectionSnapshot:
        snap = self.snapshot(conn_id)
        if snap is None:
            raise ConnectionClosedError(conn_id)
        return snap

    # ------------------------------------------------------------------ messages

    async def receive(self, msg: object) -> object:
        parent: Context | None = None
        if isinstance(msg, Envelope):
            # The caller's trace context rides in the envelope (in-process or over Ray).
            parent = context_from_fields(
                {
                    "traceparent": msg.traceparent,
                    "tracestate": msg.tracestate,
                    "baggage": msg.baggage,
                }
            )
            msg = msg.body
        if isinstance(msg, SwitchRequest) and msg.initiator is None:
            # Who asked, made explicit before it is recorded: the journal's request record
            # says what the span and the events will say.
            msg = dataclasses.replace(msg, initiator=initiator_of(msg.reason))
        if self.journal is not None and not isinstance(msg, _Changed):
            self.journal.msg(
                type(msg).__name__,
                plain_dict(msg),
                conn=getattr(msg, "conn_id", None),
                # The caller's span (invalid without one), not this actor task's context.
                span_context=trace.get_current_span(parent or Context()).get_span_context(),
            )
        try:
            validate.request(msg)  # argument errors first, however the request arrived
        except BaseException:
            self._close_handed_socket(getattr(msg, "socket_key", None))
            raise
        if isinstance(msg, DialRequest):
            return Later(self.spawn(self._dial(msg), name="dial"))
        if isinstance(msg, AddPathRequest):
            return Later(self.spawn(self._add_path(msg), name="add-path"))
        if isinstance(msg, ProbeRequest):
            return Later(self.spawn(self._probe(msg, parent), name="probe"))
        if isinstance(msg, SwitchRequest):
            return Later(self.spawn(self._switch(msg, parent), name="switch"))
        if isinstance(msg, ClosePathRequest):
            return Later(self.spawn(self._close_path(msg, parent), name="close-path"))
        if isinstance(msg, CloseConnectionRequest):
            return Later(self.spawn(self._close(msg), name="close"))
        if isinstance(msg, HealthStatusRequest):
            return self.health.status()
        if isinstance(msg, StatsRequest):
            gate = self.gate
            return MigrationStats(
                self._completed,
                dict(self._failed),
                dict(self._preferred_counts),
                suspect_failovers=self._suspect_failovers,
                in_flight=gate.in_flight,
                queued=gate.queued,
                waited=gate.waited,
                max_wait_s=round(gate.max_wait_s, 6),
                max_queued=gate.max_queued,
            )
        if isinstance(msg, PreferredAddressOffered):
            if self._preferred is not None:
                self._preferred.on_offer(msg.conn_id, msg.address)
            return None
        if isinstance(msg, SnapshotRequest):
            if msg.conn_id is None:  # the open ones (a closed one is forgotten once stopped)
                return tuple(
                    snapshot_of(e, self.migration_enabled)
                    for e in list(self.conns.values())
                    if not e.view.closed
                )
            return self._snap(msg.conn_id)
        if isinstance(msg, _Changed):
            for policy in self._policies():
                policy.on_changes(msg.conn_id, msg.changes)
            return None
        if isinstance(msg, ActivePathDead):
            for policy in self._policies():
                policy.on_active_dead(msg.conn_id, msg.path_id, msg.reason)
            return None
        if isinstance(msg, NetworkChanged):
            self._on_network(msg)
            return None
        if isinstance(msg, NetworkStatusRequest):
            return Later(self.spawn(self._network_status(), name="network-status"))
        if isinstance(msg, InterfaceAddressesRequest):
            return Later(self.spawn(self._interface_addresses(), name="interfaces"))
        if isinstance(msg, PathsLostRequest):
            self._entry(msg.conn_id).ref.tell(PathsLost(msg.path_ids))
            return None
        if isinstance(msg, PathsBackRequest):
            self._entry(msg.conn_id).ref.tell(PathsBack(msg.path_ids))
            return None
        if isinstance(msg, ConnectionEnded):
            for policy in self._policies():
                policy.on_connection_end(msg.conn_id)
            entry = self.conns.get(msg.conn_id)
            if entry is not None:
                self.spawn(self._forget_when_stopped(entry), name=f"forget:{msg.conn_id}")
            return None
        if isinstance(msg, ChildFailed):
            if msg.ref is self.monitor:
                # A bug, not the kernel (netlink errors are handled inside). Erlang/OTP's
                # rule: restart it, with backoff, at most MONITOR_RESTARTS times in
                # MONITOR_PERIOD seconds; beyond that keep to probing, as without netlink.
                delay = self._monitor_restarts.next_delay(time.monotonic())
                if delay is None:
                    log.error(
                        "the network monitor crashed again (%s): not restarted; probing only\n%s",
                        msg.error,
                        msg.traceback,
                    )
                    self.monitor = None
                    self._monitor_gave_up = True
                    return None
                log.error(
                    "the network monitor crashed (%s): restarting in %.1f s\n%s",
                    msg.error,
                    delay,
                    msg.traceback,
                )
                self.spawn(self._restart_monitor(delay), name="restart-monitor")
                return None
            for conn_id, entry in list(self.conns.items()):
                if entry.ref is msg.ref:
                    log.error("connection %s crashed: %s", conn_id, msg.error)
                    self._forget(conn_id)
            return None
        return await super().receive(msg)

    # ------------------------------------------------------------------ dial

    def _take_socket(self, key: int | None) -> socket.socket | None:
        if key is None:
            return None
        try:
            return self.sockets.pop(key)
        except KeyError:
            raise ValueError(f"unknown socket key {key}") from None

    def _close_handed_socket(self, key: int | None) -> None:
        if key is not None:
            sock = self.sockets.pop(key, None)
            if sock is not None:
                sock.close()

    async def _dial(self, req: DialRequest) -> ConnectionSnapshot:
        remote, peer_text = split_peer_id(req.remote, what="remote address")
        ip, port, family = parse_quic_multiaddr(remote, what="remote address")
        if port == 0:
            raise InvalidAddressError(req.remote, "port 0 cannot be dialled", what="remote address")
        config = client_configuration(req)
        expected: PeerId | None = None
        credentials: Credentials | None = None
        if peer_text is not None:
            # libp2p mode (DESIGN §9): our identity's certificate, ALPN libp2p, no SNI.
            expected = parse_peer_id(peer_text, req.remote)
            if self._libp2p is None:
                raise InvalidAddressError(
                    req.remote, "this supervisor has no libp2p identity", what="remote address"
                )
            credentials = self._libp2p()
            credentials.client_configuration(config)
        sock = await self._bind(
            bind_path_socket,
            req.local_addr,
            req.device,
            self._take_socket(req.socket_key),
            family,
            ip,
            what="local address",
        )
        open_key_log(config)  # closed by the ConnectionActor when it stops
        conn_id = os.urandom(6).hex()
        qlog = None
        if self.qlog is not None:
            # Named by our conn id; written when the connection is forgotten (see _forget).
            qlog = self.qlog.connection_logger(conn_id)
            config.quic_logger = qlog
        remote_sockaddr: tuple[Any, ...] = (
            (ip, port) if family == socket.AF_INET else (ip, port, 0, 0)
        )
        made = new_connection(
            conn_id=conn_id,
            configuration=config,
            remote=remote_sockaddr,
            first_socket=sock,
            sockets=self.sockets,
            on_changes=functools.partial(self._on_changes, conn_id),
            notify=self._notify,
            options=self.options,
            health=self.health,
        )
        entry = ConnectionEntry(
            conn_id=conn_id,
            ref=self.spawn_child(made.actor, name=f"conn:{conn_id}"),
            cell=made.view,
            port=made.port,
            remote=sockaddr_to_multiaddr((ip, port)),
            local=sockaddr_to_multiaddr(sock.getsockname()),
            family=family,
            qlog=qlog,
        )
        self.conns[conn_id] = entry
        try:
            chain = await entry.ref.ask(Connect(req.timeout))
            if credentials is not None and expected is not None:
                entry.remote_peer_id = str(
                    verified_peer(credentials, chain, expected, multiaddr_text(entry.remote))
                )
                entry.local_peer_id = str(credentials.peer_id)
        except BaseException:
            # Nothing of a failed or cancelled dial remains: not the actor, not the entry.
            await asyncio.shield(self._discard(entry))
            raise
        self._watch_peers()
        if self.network is not None:
            self.network.on_connection_ready(conn_id)
        return self._snap(conn_id)

    async def _discard(self, entry: ConnectionEntry) -> None:
        await entry.ref.stop()
        self._forget(entry.conn_id)

    async def _forget_when_stopped(self, entry: ConnectionEntry) -> None:
        await entry.ref.wait_stopped()
        self._forget(entry.conn_id)

    def _forget(self, conn_id: str) -> None:
        entry = self.conns.pop(conn_id, None)
        if entry is not None:
            self._watch_peers()
        if entry is not None and entry.qlog is not None:
            try:
                entry.qlog.close()  # aioquic writes it only after a closing period we skip
            except OSError as exc:
                log.warning("qlog of connection %s not written: %s", conn_id, exc)

    # ------------------------------------------------------------------ paths

    def _check_add_path(self, req: AddPathRequest, asked: tuple[str, int] | None) -> None:
        """State errors in the contract's order, from the view (the connection checks again
        when it adopts the socket: concurrent calls are decided there)."""
        if not self.migration_enabled:
            raise MigrationNotEnabledError()
        view = self._entry(req.conn_id).view
        if view.peer_disabled_migration:
            raise MigrationNotSupportedError("disable_active_migration", conn_id=req.conn_id)
        if asked is not None:
            ip, port = asked
            for p in view.paths:
                was_any = p.requested is not None and p.requested[1] == 0
                if p.local[0] == ip and (port == p.local[1] or (port == 0 and was_any)):
                    raise PathAlreadyExistsError(req.local_addr)
        if len(view.paths) >= MAX_PATHS:
            raise PathLimitError(MAX_PATHS, conn_id=req.conn_id)

    async def _add_path(self, req: AddPathRequest) -> PathAddedReply:
        # Argument errors first (DESIGN §3), then state errors in the contract's order.
        if req.preferred_address:
            # From the active path's local address, to the server's preferred one: another
            # 4-tuple, so no duplicate of any path (the connection checks per remote).
            active = self._entry(req.conn_id).view.active
            if active is None:
                raise ConnectionClosedError(req.conn_id)
            local = multiaddr_text(sockaddr_to_multiaddr((active.local[0], 0)))
            req = dataclasses.replace(req, local_addr=local, device=None, socket_key=None)
        try:
            if req.local_addr is None and req.device is None and req.socket_key is None:
                raise ValueError("add_path needs a local address, a device or a socket (sock=)")
            asked = None
            if req.local_addr is not None:
                ip, port, fam = parse_quic_multiaddr(req.local_addr, what="local address")
                asked = (ip, port)
            entry = self.conns.get(req.conn_id)
            if entry is None:
                raise ConnectionClosedError(req.conn_id)
            if req.local_addr is not None:
                if fam != entry.family:
                    raise InvalidAddressError(
                        req.local_addr,
                        "its IP family differs from the peer's: use a local address of the "
                        "same family as the remote address",
                        what="local address",
                    )
                if req.socket_key is None:  # else: the socket's namespace decides (bind_path)
                    await self._bind(check_local_address, ip, fam)
                else:
                    check_path_ip(ip)
            self._check_add_path(req, None if req.preferred_address else asked)
            sock = await self._bind(
                bind_path_socket,
                req.local_addr,
                req.device,
                self._take_socket(req.socket_key),
                entry.family,
                str(entry.view.remote[0]),
                what="local address",
            )
        except BaseException:
            self._close_handed_socket(req.socket_key)
            raise
        key = next(self._socket_keys)
        self.sockets[key] = sock
        try:
            added = await entry.ask(
                AddPath(
                    socket_key=key,
                    requested=asked,
                    label=req.local_addr or req.device,
                    preferred=req.preferred_address,
                )
            )
        finally:
            stray = self.sockets.pop(key, None)  # not adopted (refused, cancelled while queued)
            if stray is not None:
                stray.close()
        assert isinstance(added, int)
        return PathAddedReply(added, self._snap(req.conn_id))

    async def _probe(self, req: ProbeRequest, parent: Context | None = None) -> ConnectionSnapshot:
        entry = self._entry(req.conn_id)
        with (
            self.tracing.span(SPAN_PATH_PROBE, parent_context=parent) as span,
            self._op_span(span) as op,
        ):
            span.set_attribute(ATTR_CONNECTION_ID, entry.conn_id)
            span.set_attribute(ATTR_PATH_TO_LOCAL_ADDRESS, str(local_addr_of(entry, req.path_id)))
            if entry.remote_peer_id is not None:
                span.set_attribute(ATTR_LIBP2P_PEER_ID, entry.remote_peer_id)
            try:
                report = await entry.ask(Probe(req.path_id, req.timeout, op))
            except BaseException as exc:
                self._probe_outcome(span, getattr(exc, "report", None), exc)
                raise
            assert isinstance(report, ProbeReport)
            self._probe_outcome(span, report, None)
        return self._snap(req.conn_id)

    def _probe_outcome(
        self, span: Span, report: ProbeReport | None, exc: BaseException | None
    ) -> None:
        """Tries as span events at the time each challenge left; RTT; failure metric."""
        if exc is not None and not isinstance(exc, asyncio.CancelledError):
            self.metrics.probe_failure(type(exc).__name__)
        if report is None:
            return
        span.set_attribute(ATTR_PROBE_TRIES, len(report.try_times_ns))
        for n, sent in enumerate(report.try_times_ns, start=1):
            span.add_event(EVENT_PROBE_TRY, {"quic.probe.try": n}, timestamp=sent)
        if report.rtt is not None:
            span.set_attribute(ATTR_PROBE_RTT_MS, report.rtt * 1000)
            span.set_attribute(ATTR_VALIDATION_ASYMMETRIC, report.asymmetric)
            self.metrics.probe_rtt(report.rtt)

    def _reprobe_span(
        self, entry: ConnectionEntry, report: ProbeReport, end_ns: int, exc: BaseException | None
    ) -> None:
        """The re-probe the connection ran inside a switch, as the migration's child span."""
        start = report.try_times_ns[0] if report.try_times_ns else end_ns
        span = self.tracing.past_span(
            SPAN_PATH_PROBE,
            start,
            end_ns,
            attributes={
                ATTR_CONNECTION_ID: entry.conn_id,
                ATTR_PATH_TO_LOCAL_ADDRESS: str(local_addr_of(entry, report.path_id)),
            },
            error=exc,
        )
        self._probe_outcome(span, report, exc)

    async def _switch(self, req: SwitchRequest, parent: Context | None = None) -> SwitchReply:
        if req.reason not in get_args(MigrationReason):
            raise ValueError(
                f"migration reason must be one of {get_args(MigrationReason)}, got {req.reason!r}"
            )
        reason = cast(MigrationReason, req.reason)
        initiator = cast(MigrationInitiator, req.initiator or initiator_of(reason))
        if initiator not in get_args(MigrationInitiator):
            raise ValueError(
                f"migration initiator must be one of {get_args(MigrationInitiator)}, "
                f"got {req.initiator!r}"
            )
        entry = self._entry(req.conn_id)
        view = entry.view
        if view.path(req.path_id) is None:
            # Before anything is emitted.
            raise PathClosedError(path_id=req.path_id, conn_id=req.conn_id)
        to_addr = local_addr_of(entry, req.path_id)
        if req.path_id == view.active_path_id and not entry.inflight:
            here = multiaddr_text(to_addr)
            return SwitchReply(SwitchResult(here, here, None, 0.0, False), self._snap(req.conn_id))
        from_addr = local_addr_of(entry, view.active_path_id)
        # Herd control: a slot first (FIFO); the migration, its events and span start then.
        async with self.gate.slot(str(view.remote[0])) as waited:
            with self.tracing.migration_span(
                req.conn_id,
                reason,
                multiaddr_text(from_addr),
                multiaddr_text(to_addr),
                multiaddr_text(entry.remote),
                entry.family,
                parent_context=parent,
            ) as span:
                span.set_attribute(ATTR_MIGRATION_INITIATOR, initiator)
                if entry.remote_peer_id is not None:
                    span.set_attribute(ATTR_LIBP2P_PEER_ID, entry.remote_peer_id)
                if waited:
                    span.set_attribute(ATTR_MIGRATION_QUEUE_WAIT_MS, waited * 1000)
                # Published inside the span: the journal records carry the migration's trace.
                self.emit(
                    EvtConnectionMigrationStarted(
                        req.conn_id,
                        entry.peer_multiaddr,
                        time.time(),
                        from_addr,
                        to_addr,
                        reason,
                        initiator,
                    )
                )
                try:
                    with (
                        self.tracing.child_span(SPAN_PATH_SWITCH) as switch_span,
                        self._op_span(span) as op,
                    ):
                        try:
                            done = await entry.ask(
                                Switch(
                                    req.path_id,
                                    reason,
                                    probe_timeout=req.probe_timeout,
                                    old_path_dead=req.old_path_dead,
                                    op=op,
                                )
                            )
                        except BaseException as exc:
                            report = getattr(exc, "report", None)
                            if isinstance(report, ProbeReport):
                                self._reprobe_span(entry, report, time.time_ns(), exc)
                            if isinstance(exc, MigrationRolledBackError):
                                switch_span.set_attribute(ATTR_SWITCH_ROLLED_BACK, True)
                                self.metrics.rollback(reason)
                            raise
                        assert isinstance(done, Switched)
                        if done.reprobe is not None:
                            self._reprobe_span(
                                entry,
                                done.reprobe,
                                time.time_ns() - int(done.confirmation_time * 1e9),
                                None,
                            )
                        for key, value in (
                            (ATTR_CID_SEQUENCE_BEFORE, done.cid_sequence_before),
                            (ATTR_CID_SEQUENCE_AFTER, done.cid_sequence_after),
                        ):
                            if value is not None:
                                switch_span.set_attribute(key, value)
                        switch_span.set_attribute(
                            ATTR_SWITCH_CONFIRMATION_MS, done.confirmation_time * 1000
                        )
                        switch_span.set_attribute(ATTR_SWITCH_ROLLED_BACK, False)
                except BaseException as exc:
                    error = str(exc) or type(exc).__name__
                    if isinstance(exc, asyncio.CancelledError):
                        error = "cancelled by the caller (rolled back)"
                    outcome = outcome_of(exc, closed=entry.view.closed)
                    ended = {"cancelled": RESULT_CANCELLED, "rolled_back": RESULT_ROLLED_BACK}.get(
                        outcome, RESULT_FAILED
                    )
                    set_result(span, ended)
                    span.set_attribute(ATTR_MIGRATION_OUTCOME, outcome)
                    self.metrics.migration(reason, ended, outcome)
                    self._failed[outcome] = self._failed.get(outcome, 0) + 1
                    self.emit(
                        EvtConnectionMigrationFailed(
                            req.conn_id,
                            entry.peer_multiaddr,
                            time.time(),
                            from_addr,
                            to_addr,
                            reason,
                            error,
                            entry.view.closed,
                            outcome,
                            initiator,
                        )
                    )
                    raise
                from_addr = local_addr_of(entry, done.from_path)
                self.metrics.migration(reason, "completed")
                self._completed += 1
                self.metrics.active_path_change(reason)
                self.emit(
                    EvtConnectionMigrationCompleted(
                        req.conn_id,
                        entry.peer_multiaddr,
                        time.time(),
                        from_addr,
                        to_addr,
                        reason,
                        done.probe_rtt,
                        initiator,
                    )
                )
                target = entry.view.path(req.path_id)
                span.set_attribute(
                    ATTR_VALIDATION_ASYMMETRIC, bool(target is not None and target.asymmetric)
                )
                trace_id = span.get_span_context().trace_id
        result = SwitchResult(
            from_addr=multiaddr_text(from_addr),
            to_addr=multiaddr_text(to_addr),
            probe_rtt=done.probe_rtt,
            confirmation_s=done.confirmation_time,
            reprobed=done.reprobed,
            trace_id=f"{trace_id:032x}" if trace_id else None,
        )
        return SwitchReply(result, self._snap(req.conn_id))

    async def _close_path(
        self, req: ClosePathRequest, parent: Context | None = None
    ) -> ConnectionSnapshot | None:
        """Close a path inside its own short ``quic.path.close`` span (the caller's child)."""
        entry = self.conns.get(req.conn_id)
        if entry is None:
            return None  # the connection (and with it every path) is already closed
        attrs = {ATTR_CONNECTION_ID: req.conn_id}
        if entry.view.path(req.path_id) is not None:
            attrs[ATTR_PATH_LOCAL_ADDRESS] = str(local_addr_of(entry, req.path_id))
        with (
            self.tracing.span(SPAN_PATH_CLOSE, parent_context=parent, attributes=attrs) as span,
            self._op_span(span) as op,
        ):
            try:
                removed = await entry.ask(ClosePath(req.path_id, op))
            except MigrationError:
                raise
            except Exception:
                if entry.ref.is_alive:
                    raise
                removed = False  # the connection ended meanwhile: its paths went with it
            span.set_attribute(ATTR_PATH_CLOSE_REMOVED, bool(removed))
        return self.snapshot(req.conn_id)

    async def _close(self, req: CloseConnectionRequest) -> None:
        entry = self.conns.get(req.conn_id)
        if entry is None:
            return
        if entry.ref.is_alive:
            with contextlib.suppress(MigrationError):
                await entry.ref.ask(Close(req.error_code, req.reason))
        await entry.ref.wait_stopped()
        self._forget(req.conn_id)

    async def on_stop(self) -> None:
        self._unregister_cids()
        self._unregister_node()
        for policy in self._policies():
            await policy.close()
        for conn_id in list(self.conns):
            self._forget(conn_id)
        self.health.close()
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()
        if self.netns is not None:
            self.netns.close()
