"""SupervisorActor: the registry of outbound connections and the orchestration of their paths.

One per process. It checks requests in the contract's order, serialises the path operations of
each connection (two concurrent switches end with exactly one active path, the last one asked),
turns what connections report into events, and cleans up after connections that end. The
protocol work itself (probe, switch, confirmation, rollback) happens in the ConnectionActor.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import itertools
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast, get_args

from aioquic.quic.configuration import QuicConfiguration
from multiaddr import Multiaddr
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span

from actors.connection import MAX_PATHS, ConnectionActor, ConnectionOptions
from actors.envelope import Envelope
from actors.errors import (
    ConnectionClosedError,
    InvalidAddressError,
    MigrationError,
    MigrationNotEnabledError,
    MigrationNotSupportedError,
    MigrationRolledBackError,
    PathAlreadyExistsError,
    PathLimitError,
)
from actors.messages import (
    ActivePathDead,
    AddPath,
    Close,
    ClosePath,
    Connect,
    ConnectionEnded,
    PathStateReport,
    Probe,
    Switch,
    SwitchResult,
)
from actors.path_state import PathState
from actors.runtime import Actor, ActorRef, ChildFailed, Later
from supervisor.addresses import (
    adopt_udp_socket,
    bind_udp_socket,
    check_local_address,
    multiaddr_text,
    parse_quic_multiaddr,
    sockaddr_to_multiaddr,
)
from supervisor.config import FailoverPolicy
from supervisor.events import (
    Event,
    EventBus,
    EvtConnectionMigrationCompleted,
    EvtConnectionMigrationFailed,
    EvtConnectionMigrationStarted,
    EvtPathAdded,
    EvtPathRemoved,
    EvtPathStateChanged,
    MigrationReason,
)
from supervisor.failover import FailoverController
from supervisor.messages import (
    AddPathRequest,
    CloseConnectionRequest,
    ClosePathRequest,
    ConnectionSnapshot,
    DialRequest,
    PathSnapshot,
    ProbeRequest,
    SnapshotRequest,
    SwitchRequest,
)
from telemetry.journal import JournalWriter
from telemetry.metrics import Metrics
from telemetry.propagation import context_from_fields
from telemetry.qlog import QlogDirectory, QlogWriter
from telemetry.tracing import (
    ATTR_CID_SEQUENCE_AFTER,
    ATTR_CID_SEQUENCE_BEFORE,
    ATTR_CONNECTION_ID,
    ATTR_PATH_CLOSE_REMOVED,
    ATTR_PATH_LOCAL_ADDRESS,
    ATTR_PATH_TO_LOCAL_ADDRESS,
    ATTR_PROBE_RTT_MS,
    ATTR_PROBE_TRIES,
    ATTR_SWITCH_CONFIRMATION_MS,
    ATTR_SWITCH_ROLLED_BACK,
    EVENT_PATH_ADDED,
    EVENT_PATH_REMOVED,
    EVENT_PATH_STATE_CHANGED,
    EVENT_PROBE_TRY,
    RESULT_ROLLED_BACK,
    SPAN_PATH_CLOSE,
    SPAN_PATH_PROBE,
    SPAN_PATH_SWITCH,
    Tracing,
    path_event,
    set_result,
)

log = logging.getLogger(__name__)


def _plain_dict(obj: object) -> dict[str, Any]:
    plain = _plain(obj)
    return plain if isinstance(plain, dict) else {"value": plain}


def _plain(obj: object) -> object:
    """A message or event as plain msgpack-able data for the journal."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if isinstance(obj, enum.Enum):
        return obj.value
    return str(obj)


def _bound_device(sock: socket.socket) -> str | None:
    """The interface a path socket is bound to (SO_BINDTODEVICE), None when unbound or closed.

    Read from the socket itself, so paths given with ``sock=`` report their device too.
    """
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16)
    except OSError:
        return None
    return raw.split(b"\0", 1)[0].decode(errors="replace") or None


@dataclass(slots=True)
class _Entry:
    """What the supervisor knows of one outbound connection."""

    conn_id: str
    actor: ConnectionActor
    ref: ActorRef
    remote: Multiaddr
    local: Multiaddr
    family: int
    ops: asyncio.Lock = field(default_factory=asyncio.Lock)
    requested: dict[int, tuple[str, int]] = field(default_factory=dict)  # path -> (ip, port asked)


class SupervisorActor(Actor):
    def __init__(
        self,
        *,
        migration_enabled: bool,
        events: EventBus,
        sockets: dict[int, socket.socket],
        options: ConnectionOptions | None = None,
        on_event: Callable[[Event], None] | None = None,
        tracing: Tracing | None = None,
        metrics: Metrics | None = None,
        journal: JournalWriter | None = None,
        qlog: QlogDirectory | None = None,
        failover: FailoverPolicy | None = None,
    ) -> None:
        self.failover = FailoverController(self, failover) if failover is not None else None
        self.tracing = tracing or Tracing(None)
        self.metrics = metrics or Metrics(None)
        self.journal = journal
        self.qlog = qlog
        # The open migration (or standalone probe, or close) span per connection: path events
        # become its span events. Operations on one connection hold entry.ops: at most one.
        self._op_spans: dict[str, Span] = {}
        self.migration_enabled = migration_enabled
        self.events = events
        self.sockets = sockets  # sockets handed in with sock=, by key
        self.options = options or ConnectionOptions()
        self._on_event = on_event
        self.conns: dict[str, _Entry] = {}
        self._unregister_cids = self.metrics.register_cid_spare(self._min_spare_cids)
        self._socket_keys = itertools.count(1 << 30)

    # ------------------------------------------------------------------ plumbing

    @contextlib.contextmanager
    def _op_span(self, conn_id: str, span: Span) -> Iterator[Span]:
        """Path events of ``conn_id`` are recorded on ``span`` while the ``with`` body runs
        (nested: a close inside a migration; the outer span gets them back afterwards)."""
        outer = self._op_spans.get(conn_id)
        self._op_spans[conn_id] = span
        try:
            yield span
        finally:
            if self._op_spans.get(conn_id) is span:
                if outer is None:
                    del self._op_spans[conn_id]
                else:
                    self._op_spans[conn_id] = outer

    def _span_event(self, evt: Event) -> None:
        span = self._op_spans.get(evt.conn_id)
        if span is None:
            return
        if isinstance(evt, EvtPathStateChanged):
            path_event(span, EVENT_PATH_STATE_CHANGED, evt.local_addr, str(evt.old), str(evt.new))
        elif isinstance(evt, EvtPathAdded):
            path_event(span, EVENT_PATH_ADDED, evt.local_addr)
        elif isinstance(evt, EvtPathRemoved):
            path_event(span, EVENT_PATH_REMOVED, evt.local_addr)

    def _publish(self, evt: Event) -> None:
        self.events.publish(evt)
        self._span_event(evt)
        if self.journal is not None:
            self.journal.event(
                type(evt).__name__.removeprefix("Evt"),
                _plain_dict(evt),
                conn=evt.conn_id,
                path=str(getattr(evt, "local_addr", "")) or None,
            )
        if self._on_event is not None:
            self._on_event(evt)

    def _entry(self, conn_id: str) -> _Entry:
        entry = self.conns.get(conn_id)
        if entry is None or entry.actor.closed:
            raise ConnectionClosedError(conn_id)
        return entry

    def _local_of(self, entry: _Entry, path_id: int) -> Multiaddr:
        path = entry.actor.paths.get(path_id)
        if path is None:
            return entry.local
        return sockaddr_to_multiaddr(path.local)

    def snapshot(self, conn_id: str) -> ConnectionSnapshot | None:
        """Built from the owners' current state: read-your-writes for every handle."""
        entry = self.conns.get(conn_id)
        if entry is None:
            return None
        actor = entry.actor
        active = actor.quic.active_path_id if actor.quic.path_count else None
        paths = []
        for path_id, path in sorted(actor.paths.items()):
            if path.state is PathState.CLOSED:
                continue
            is_active = path_id == active and not actor.closed
            rtt = path.rtt
            if is_active and actor.quic.smoothed_rtt is not None:
                rtt = actor.quic.smoothed_rtt
            paths.append(
                PathSnapshot(
                    path_id=path_id,
                    local_addr=multiaddr_text(sockaddr_to_multiaddr(path.local)),
                    remote_addr=multiaddr_text(entry.remote),
                    active=is_active,
                    rtt=rtt,
                    state=path.state,
                    bytes_sent=path.stats.bytes_sent,
                    bytes_received=path.stats.bytes_received,
                    device=_bound_device(path.sock),
                )
            )
        return ConnectionSnapshot(
            conn_id=conn_id,
            local_addr=multiaddr_text(entry.local),
            remote_addr=multiaddr_text(entry.remote),
            inbound=False,
            supports_migration=self.migration_enabled
            and not actor.quic.peer_disabled_active_migration
            and not actor.closed,
            closed=actor.closed,
            paths=tuple(paths),
            migrations=actor.migrations,
        )

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
        if self.journal is not None:
            self.journal.msg(
                type(msg).__name__,
                _plain_dict(msg),
                conn=getattr(msg, "conn_id", None),
                # The caller's span (invalid without one), not this actor task's context.
                span_context=trace.get_current_span(parent or Context()).get_span_context(),
            )
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
        if isinstance(msg, SnapshotRequest):
            if msg.conn_id is None:
                return tuple(s for c in list(self.conns) if (s := self.snapshot(c)) is not None)
            return self._snap(msg.conn_id)
        if isinstance(msg, ConnectionEnded):
            if self.failover is not None:
                self.failover.on_connection_end(msg.conn_id)
            entry = self.conns.get(msg.conn_id)
            if entry is not None:
                # Forget it once its actor stopped: its paths' last events (closed) come first.
                self.spawn(self._forget_when_stopped(entry), name=f"forget:{msg.conn_id}")
            return None
        if isinstance(msg, ChildFailed):
            for conn_id, entry in list(self.conns.items()):
                if entry.ref is msg.ref:
                    log.error("connection %s crashed: %s", conn_id, msg.error)
                    self._forget(conn_id)
            return None
        return await super().receive(msg)

    # ------------------------------------------------------------------ dial

    def _take_socket(self, key: int) -> socket.socket:
        try:
            return self.sockets.pop(key)
        except KeyError:
            raise ValueError(f"unknown socket key {key}") from None

    def _bind(
        self,
        local_addr: str | None,
        device: str | None,
        socket_key: int | None,
        family: int,
        remote_ip: str,
        *,
        what: str,
    ) -> socket.socket:
        """A bound path socket; argument errors name the input (nothing is left open)."""
        if socket_key is not None:
            sock = adopt_udp_socket(self._take_socket(socket_key))
            if sock.family != family:
                sock.close()
                raise InvalidAddressError(
                    "sock", f"socket family differs from the peer's ({remote_ip})", what=what
                )
            return sock
        if local_addr is None:
            ip = "::" if family == socket.AF_INET6 else "0.0.0.0"
            sock = bind_udp_socket(ip, 0, family, device=device)
            try:
                # Learn the routed source address so snapshots never show a wildcard.
                sock.connect((remote_ip, 9))
                routed = sock.getsockname()[0]
            finally:
                sock.close()
            return bind_udp_socket(routed, 0, family, device=device)
        ip, port, fam = parse_quic_multiaddr(local_addr, what=what)
        if fam != family:
            raise InvalidAddressError(
                local_addr,
                f"its IP family differs from the peer's ({remote_ip}): use an "
                f"{'/ip6' if family == socket.AF_INET6 else '/ip4'} local address",
                what=what,
            )
        return bind_udp_socket(ip, port, family, device=device)

    async def _dial(self, req: DialRequest) -> ConnectionSnapshot:
        ip, port, family = parse_quic_multiaddr(req.remote, what="remote address")
        if port == 0:
            raise InvalidAddressError(req.remote, "port 0 cannot be dialled", what="remote address")
        config = QuicConfiguration(
            is_client=True,
            alpn_protocols=list(req.alpn_protocols) if req.alpn_protocols else None,
            server_name=req.server_name,
            idle_timeout=req.idle_timeout,
        )
        if not req.verify:
            config.verify_mode = ssl.CERT_NONE
        if req.cafile:
            config.load_verify_locations(req.cafile)
        sock = self._bind(
            req.local_addr, req.device, req.socket_key, family, ip, what="local address"
        )
        keylog = os.environ.get("SSLKEYLOGFILE")
        if keylog:
            # Closed by the ConnectionActor when it stops. Unwritable: no key log (as curl).
            try:
                config.secrets_log_file = open(keylog, "a")  # noqa: SIM115 - lives with the conn
            except OSError as exc:
                log.warning("SSLKEYLOGFILE %r cannot be opened: %s", keylog, exc)
        conn_id = os.urandom(6).hex()
        if self.qlog is not None:
            # Named by our conn id; written when the connection is forgotten (see _forget).
            config.quic_logger = self.qlog.connection_logger(conn_id)
        remote_sockaddr: tuple[Any, ...] = (
            (ip, port) if family == socket.AF_INET else (ip, port, 0, 0)
        )
        actor = ConnectionActor(
            conn_id=conn_id,
            configuration=config,
            remote=remote_sockaddr,
            first_socket=sock,
            sockets=self.sockets,
            notify=functools.partial(self._notice, conn_id),
            options=self.options,
        )
        ref = self.spawn_child(actor, name=f"conn:{conn_id}")
        entry = _Entry(
            conn_id=conn_id,
            actor=actor,
            ref=ref,
            remote=sockaddr_to_multiaddr((ip, port)),
            local=sockaddr_to_multiaddr(sock.getsockname()),
            family=family,
        )
        entry.requested[0] = (sock.getsockname()[0], sock.getsockname()[1])
        self.conns[conn_id] = entry
        # The handshake path is added before its first state change (new -> active).
        self._publish(EvtPathAdded(conn_id, entry.remote, time.time(), entry.local))
        try:
            await ref.ask(Connect(req.timeout))
        except BaseException:
            await ref.stop()
            self._forget(conn_id)
            raise
        return self._snap(conn_id)

    def _notice(self, conn_id: str, msg: object) -> None:
        """Reports from a connection (called synchronously, on the same loop)."""
        entry = self.conns.get(conn_id)
        if entry is None:
            return
        if isinstance(msg, PathStateReport):
            path = entry.actor.paths.get(msg.path_id)
            if path is not None:
                self._report_traffic(path, msg.old)
            self._publish(
                EvtPathStateChanged(
                    conn_id,
                    entry.remote,
                    time.time(),
                    self._local_of(entry, msg.path_id),
                    msg.old,
                    msg.new,
                )
            )
            if self.failover is not None:
                self.failover.on_path_state(conn_id, msg.path_id, msg.new)
        elif isinstance(msg, ActivePathDead):
            if self.failover is not None:
                self.failover.on_active_dead(conn_id, msg.path_id, msg.reason)
        elif isinstance(msg, ConnectionEnded) and self.ref.is_alive:
            # Cleanup is actor work: it goes through the mailbox.
            self.ref.tell(msg)

    async def _forget_when_stopped(self, entry: _Entry) -> None:
        await entry.ref.wait_stopped()
        self._forget(entry.conn_id)

    def _report_traffic(self, path: Any, state: PathState) -> None:
        """Bytes and off-path drops since the last report, attributed to ``state``."""
        grown = path.stats.deltas()
        self.metrics.path_bytes(grown["sent"], state=state.value, direction="transmit")
        self.metrics.path_bytes(grown["received"], state=state.value, direction="receive")
        if grown["dropped"]:
            self.metrics.datagrams_dropped_offpath(grown["dropped"])

    def _min_spare_cids(self) -> int | None:
        """Runs on the metric reader's thread: copy the registry (atomic under the GIL), read
        plain ints, and give up quietly on a race rather than fail the export."""
        try:
            spares = [
                e.actor.quic.spare_peer_cids
                for e in list(self.conns.values())
                if not e.actor.closed
            ]
        except RuntimeError:
            return None
        return min(spares) if spares else None

    def _forget(self, conn_id: str) -> None:
        entry = self.conns.pop(conn_id, None)
        if entry is None:
            return
        for path in list(entry.actor.paths.values()):
            self._report_traffic(path, path.state)
        qlog = entry.actor.quic.configuration.quic_logger
        if isinstance(qlog, QlogWriter):
            try:
                qlog.close()  # aioquic writes it only after a closing period we do not wait for
            except OSError as exc:
                log.warning("qlog of connection %s not written: %s", conn_id, exc)
        for path in list(entry.actor.paths.values()):
            self._publish(
                EvtPathRemoved(
                    conn_id, entry.remote, time.time(), sockaddr_to_multiaddr(path.local)
                )
            )

    # ------------------------------------------------------------------ paths

    async def _add_path(self, req: AddPathRequest) -> ConnectionSnapshot:
        # Argument errors first (DESIGN §3), then state errors in the contract's order.
        if req.local_addr is None and req.device is None and req.socket_key is None:
            raise ValueError("add_path needs a local address, a device or a socket (sock=)")
        if req.local_addr is not None:
            ip, port, fam = parse_quic_multiaddr(req.local_addr, what="local address")
        entry = self.conns.get(req.conn_id)
        if entry is None:
            self._close_handed_socket(req.socket_key)
            raise ConnectionClosedError(req.conn_id)
        if req.local_addr is not None:
            if fam != entry.family:
                self._close_handed_socket(req.socket_key)
                raise InvalidAddressError(
                    req.local_addr,
                    "its IP family differs from the peer's: use a local address of the "
                    "same family as the remote address",
                    what="local address",
                )
            try:
                check_local_address(ip, fam)
            except BaseException:
                self._close_handed_socket(req.socket_key)
                raise
        try:
            if not self.migration_enabled:
                raise MigrationNotEnabledError()
            entry = self._entry(req.conn_id)
            if entry.actor.quic.peer_disabled_active_migration:
                raise MigrationNotSupportedError("disable_active_migration", conn_id=req.conn_id)
            if req.local_addr is not None:
                for path_id, path in entry.actor.paths.items():
                    if path.state is PathState.CLOSED:
                        continue
                    bound_ip, bound_port = path.local[0], path.local[1]
                    asked = entry.requested.get(path_id)
                    if bound_ip == ip and (
                        port == bound_port or (port == 0 and asked is not None and asked[1] == 0)
                    ):
                        raise PathAlreadyExistsError(req.local_addr)
            live = [p for p in entry.actor.paths.values() if p.state is not PathState.CLOSED]
            if len(live) >= MAX_PATHS:
                raise PathLimitError(MAX_PATHS, conn_id=req.conn_id)
        except BaseException:
            self._close_handed_socket(req.socket_key)
            raise
        async with entry.ops:
            sock = self._bind(
                req.local_addr,
                req.device,
                req.socket_key,
                entry.family,
                entry.actor.remote[0],
                what="local address",
            )
            if req.socket_key is None:
                for path in entry.actor.paths.values():
                    if (
                        path.state is not PathState.CLOSED
                        and path.local[:2] == sock.getsockname()[:2]
                    ):
                        sock.close()
                        raise PathAlreadyExistsError(req.local_addr or req.device)
            key = next(self._socket_keys)
            self.sockets[key] = sock
            try:
                added = await entry.ref.ask(AddPath(socket_key=key))
            finally:
                stray = self.sockets.pop(key, None)
                if stray is not None:
                    stray.close()
            assert isinstance(added, int)
            path_id = added
            entry.requested[path_id] = (
                (ip, port) if req.local_addr is not None else sock.getsockname()[:2]
            )
            self._publish(
                EvtPathAdded(req.conn_id, entry.remote, time.time(), self._local_of(entry, path_id))
            )
        return self._snap(req.conn_id)

    def _close_handed_socket(self, key: int | None) -> None:
        if key is not None:
            sock = self.sockets.pop(key, None)
            if sock is not None:
                sock.close()

    async def _probe(self, req: ProbeRequest, parent: Context | None = None) -> ConnectionSnapshot:
        if not req.timeout > 0:
            raise ValueError(f"probe timeout must be > 0 seconds, got {req.timeout!r}")
        entry = self._entry(req.conn_id)
        async with entry.ops:
            with (
                self.tracing.span(SPAN_PATH_PROBE, parent_context=parent) as span,
                self._op_span(req.conn_id, span),
            ):
                await self._probe_in_span(entry, req.path_id, req.timeout, span)
        return self._snap(req.conn_id)

    async def _probe_in_span(
        self, entry: _Entry, path_id: int, timeout: float, span: Span
    ) -> float:
        """Probe a path inside the current ``quic.path.probe`` span; records tries and RTT."""
        path = entry.actor.path(path_id)
        span.set_attribute(ATTR_CONNECTION_ID, entry.conn_id)
        span.set_attribute(ATTR_PATH_TO_LOCAL_ADDRESS, str(sockaddr_to_multiaddr(path.local)))
        tries_before = path.stats.probes_sent
        try:
            rtt = await entry.ref.ask(Probe(path_id, timeout))
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self.metrics.probe_failure(type(exc).__name__)
            raise
        finally:
            span.set_attribute(ATTR_PROBE_TRIES, path.stats.probes_sent - tries_before)
            # Each try as a span event at the time its challenge left (loop clock -> wall).
            offset = time.time_ns() - int(asyncio.get_running_loop().time() * 1e9)
            for n, sent in enumerate(path.stats.probe_try_times, start=1):
                span.add_event(
                    EVENT_PROBE_TRY, {"quic.probe.try": n}, timestamp=offset + int(sent * 1e9)
                )
        assert isinstance(rtt, float)
        span.set_attribute(ATTR_PROBE_RTT_MS, rtt * 1000)
        self.metrics.probe_rtt(rtt)
        return rtt

    async def _switch(
        self, req: SwitchRequest, parent: Context | None = None, *, old_path_dead: bool = False
    ) -> ConnectionSnapshot:
        if req.reason not in get_args(MigrationReason):
            raise ValueError(
                f"migration reason must be one of {get_args(MigrationReason)}, got {req.reason!r}"
            )
        reason = cast(MigrationReason, req.reason)
        entry = self._entry(req.conn_id)
        async with entry.ops:
            actor = entry.actor
            target = actor.path(req.path_id)  # PathClosedError before anything is emitted
            active = actor.quic.active_path_id
            if req.path_id == active:
                return self._snap(req.conn_id)
            from_addr = self._local_of(entry, active)
            to_addr = self._local_of(entry, req.path_id)
            with (
                self.tracing.migration_span(
                    req.conn_id,
                    reason,
                    multiaddr_text(from_addr),
                    multiaddr_text(to_addr),
                    multiaddr_text(entry.remote),
                    entry.family,
                    parent_context=parent,
                ) as span,
                self._op_span(req.conn_id, span),
            ):
                # Published inside the span: the journal records carry the migration's trace.
                self._publish(
                    EvtConnectionMigrationStarted(
                        req.conn_id, entry.remote, time.time(), from_addr, to_addr, reason
                    )
                )
                try:
                    stale = target.validated_at is None or (
                        asyncio.get_running_loop().time() - target.validated_at
                        > self.options.stale_after
                    )
                    if target.state is PathState.STANDBY and stale:
                        # Re-probe inside the migration's trace, then switch.
                        with self.tracing.child_span(SPAN_PATH_PROBE) as probe_span:
                            await self._probe_in_span(entry, req.path_id, 5.0, probe_span)
                    with self.tracing.child_span(SPAN_PATH_SWITCH) as switch_span:
                        try:
                            result = await entry.ref.ask(
                                Switch(req.path_id, reason, old_path_dead=old_path_dead)
                            )
                        except MigrationRolledBackError:
                            switch_span.set_attribute(ATTR_SWITCH_ROLLED_BACK, True)
                            set_result(span, RESULT_ROLLED_BACK)
                            self.metrics.rollback(reason)
                            raise
                        assert isinstance(result, SwitchResult)
                        for key, value in (
                            (ATTR_CID_SEQUENCE_BEFORE, result.cid_sequence_before),
                            (ATTR_CID_SEQUENCE_AFTER, result.cid_sequence_after),
                        ):
                            if value is not None:
                                switch_span.set_attribute(key, value)
                        switch_span.set_attribute(
                            ATTR_SWITCH_CONFIRMATION_MS, result.confirmation_time * 1000
                        )
                        switch_span.set_attribute(ATTR_SWITCH_ROLLED_BACK, False)
                except BaseException as exc:
                    error = str(exc) or type(exc).__name__
                    outcome = "failed"
                    if isinstance(exc, asyncio.CancelledError):
                        error = "cancelled by the caller (rolled back)"
                        outcome = "cancelled"
                    elif isinstance(exc, MigrationRolledBackError):
                        outcome = "rolled_back"
                    self.metrics.migration(reason, outcome)
                    self._publish(
                        EvtConnectionMigrationFailed(
                            req.conn_id,
                            entry.remote,
                            time.time(),
                            from_addr,
                            to_addr,
                            reason,
                            error,
                            actor.closed,
                        )
                    )
                    raise
                self.metrics.migration(reason, "completed")
                self.metrics.active_path_change(reason)
                self._publish(
                    EvtConnectionMigrationCompleted(
                        req.conn_id,
                        entry.remote,
                        time.time(),
                        from_addr,
                        to_addr,
                        reason,
                        result.probe_rtt,
                    )
                )
        return self._snap(req.conn_id)

    async def _close_path(
        self, req: ClosePathRequest, parent: Context | None = None
    ) -> ConnectionSnapshot | None:
        """Close a path inside its own short ``quic.path.close`` span: the caller's child, or
        (``parent=None``: called from inside the supervisor, e.g. within an open migration)
        the current span's."""
        entry = self.conns.get(req.conn_id)
        if entry is None:
            return None  # the connection (and with it every path) is already closed
        async with entry.ops:
            local = self._local_of(entry, req.path_id)
            attrs = {ATTR_CONNECTION_ID: req.conn_id}
            if req.path_id in entry.actor.paths:  # else _local_of gave the handshake address
                attrs[ATTR_PATH_LOCAL_ADDRESS] = str(local)
            with (
                self.tracing.span(SPAN_PATH_CLOSE, parent_context=parent, attributes=attrs) as span,
                self._op_span(req.conn_id, span),
            ):
                removed = await entry.ref.ask(ClosePath(req.path_id))
                span.set_attribute(ATTR_PATH_CLOSE_REMOVED, bool(removed))
                if removed:
                    entry.requested.pop(req.path_id, None)
                    self._publish(EvtPathRemoved(req.conn_id, entry.remote, time.time(), local))
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
        if self.failover is not None:
            await self.failover.close()
        for conn_id in list(self.conns):
            self._forget(conn_id)
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()
