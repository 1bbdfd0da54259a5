"""``Supervisor``: the entry point, an async context manager over the local actor runtime."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Unpack, cast

from aioquic.quic.configuration import QuicConfiguration
from multiaddr import Multiaddr

from actors.envelope import enveloped
from actors.errors import InvalidArgumentError, SupervisorClosedError
from actors.factory import ConnectionOptions, HealthStatus
from actors.lifecycle import Service
from actors.messages import Close
from actors.runtime import ActorRef, ChildFailed, Runtime
from actors.streams import Stream
from actors.view import PathSample
from supervisor.core import validate
from supervisor.core.config import FailoverPolicy, NetworkPolicy
from supervisor.core.dialing import DialOptions, dial_request
from supervisor.core.events import DEFAULT_RETAIN, Event, EventBus, EvtConnectionMigrationCompleted
from supervisor.core.handles import Connection
from supervisor.core.messages import (
    ConnectionSnapshot,
    HealthStatusRequest,
    MigrationStats,
    StatsRequest,
    expect,
)
from supervisor.libp2p.credentials import Credentials
from supervisor.libp2p.keys import Identity
from supervisor.libp2p.peer_id import PeerId
from supervisor.libp2p.service import Libp2pService
from supervisor.orchestration.client_config import open_key_log
from supervisor.orchestration.drain import DrainReport, drain
from supervisor.orchestration.failover import FailoverController
from supervisor.orchestration.herd import HerdLimits
from supervisor.orchestration.network.monitor import NetworkStatus, NetworkStatusRequest
from supervisor.orchestration.network.netlink import SourceFactory
from supervisor.orchestration.network.netns import Namespace
from supervisor.orchestration.policy import PolicyPort
from supervisor.orchestration.preferred import PreferredAddressMode
from supervisor.orchestration.registry import ConnectionEntry, snapshot_of
from supervisor.orchestration.supervisor_actor import SupervisorActor
from supervisor.server import Libp2pListening, Listener
from telemetry.journal import JournalWriter
from telemetry.metrics import Metrics
from telemetry.plain import plain_dict
from telemetry.propagation import current_trace_fields
from telemetry.qlog import DEFAULT_MAX_EVENTS as DEFAULT_QLOG_MAX_EVENTS
from telemetry.qlog import QlogDirectory, QlogWriter
from telemetry.tracing import Tracing

log = logging.getLogger(__name__)

#: How often ``shutdown`` re-counts open streams: a stream publishes no event when it ends
#: (its table forgets it on the connection's next flush), so the count is read on this period.
SHUTDOWN_CHECK_PERIOD = 0.02
#: The CONNECTION_CLOSE reason phrases: an orderly stop, and ``close()``.
SHUTDOWN_REASON = "shutting down"
CLOSE_REASON = "supervisor closing"


@dataclass(frozen=True, slots=True)
class ShutdownReport:
    """What ``Supervisor.shutdown`` did: what an operator's stop log line (and a pod's
    termination message) needs to say whether anyone was cut off."""

    #: Connections (accepted and dialled) this stop closed with CONNECTION_CLOSE.
    connections: int
    #: Streams still open when the deadline passed (0 when everything ended in time).
    streams_cut: int
    #: Seconds from the call to everything released.
    elapsed: float
    #: The deadline passed with streams still open.
    deadline_hit: bool


def quiet_connections(open_streams: Mapping[str, int]) -> list[str]:
    """The connections an orderly stop may close now: those without an open stream."""
    return [conn_id for conn_id, count in open_streams.items() if count == 0]


class Supervisor(Service):
    """Owns the actors of every connection it dials; closing it closes them all.

    ``enable_experimental_connection_migration`` is go-libp2p's opt-in: without it ``add_path``
    raises ``MigrationNotEnabledError``. All handles belong to this supervisor's event loop.
    """

    def __init__(
        self,
        *,
        enable_experimental_connection_migration: bool = False,
        failover: FailoverPolicy | None = None,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        options: ConnectionOptions | None = None,
        ask_timeout: float | None = None,
        journal: str | os.PathLike[str] | None = None,
        qlog_dir: str | os.PathLike[str] | None = None,
        qlog_max_events: int = DEFAULT_QLOG_MAX_EVENTS,
        preferred_address: str = "ignore",
        herd: HerdLimits | None = None,
        network: NetworkPolicy | Literal[False] | None = None,
        netns: str | None = None,
        netlink: SourceFactory | None = None,
        identity: Identity | None = None,
        event_retention: int = DEFAULT_RETAIN,
    ) -> None:
        """``qlog_dir``: aioquic's qlog of every connection, ``{conn_id}.qlog`` (outbound) or
        ``server-{odcid}.qlog`` (inbound), written when it ends; every path and migration event is
        kept, packet events only in windows around each migration, at most
        ``qlog_max_events`` of each kind in memory (see ``telemetry.qlog``). ``herd``: how many
        migrations may be in flight at once, in all and per remote IP (default 64 each); the
        others wait their turn, FIFO (``supervisor.orchestration.herd``). ``network``:
        reactions to the
        kernel's link, address and route events (``NetworkPolicy``; DESIGN §8); the monitor
        runs whenever ``failover`` or ``network`` is given, ``network=False`` turns it off.
        ``netns``: the network namespace (a name under /run/netns, or a path) where path
        sockets are bound, device names resolved and events heard; default: this process's.
        ``netlink``: an alternative source of rtnetlink events (tests; default pyroute2).
        ``identity``: the libp2p identity (``Identity.generate()`` / ``Identity.load(path)``)
        used to dial ``/p2p/`` addresses and for ``listen(libp2p=True)``, one per Supervisor
        as a libp2p host has one; without it a random Ed25519 one is made when first needed.
        ``event_retention``: how many of the newest events ``sup.events`` keeps for
        ``subscribe(since=...)`` (0: none)."""
        self.migration_enabled = validate.flag(
            "enable_experimental_connection_migration", enable_experimental_connection_migration
        )
        if failover is not None and not isinstance(failover, FailoverPolicy):
            raise TypeError(
                f"failover must be a FailoverPolicy (e.g. FailoverPolicy()) or None, not "
                f"{type(failover).__name__}"
            )
        if options is not None and not isinstance(options, ConnectionOptions):
            raise TypeError(f"options must be ConnectionOptions or None, not {type(options)}")
        ask_timeout = validate.optional_duration("ask_timeout", ask_timeout)
        if preferred_address not in ("ignore", "follow"):
            raise InvalidArgumentError(
                "preferred_address",
                preferred_address,
                'give "ignore" (the default: stay on the dialled address) or "follow" (move to '
                "the server's preferred address, RFC 9000 §9.6, when it is safe)",
            )
        if preferred_address == "follow" and not self.migration_enabled:
            raise InvalidArgumentError(
                "preferred_address",
                preferred_address,
                "following it is a migration: also pass "
                "enable_experimental_connection_migration=True",
            )
        self._preferred_address = cast(PreferredAddressMode, preferred_address)
        qlog_max_events = validate.count("qlog_max_events", qlog_max_events, minimum=1)
        for name, value in (("journal", journal), ("qlog_dir", qlog_dir)):
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise TypeError(f"{name} must be a path or None, not {type(value).__name__}")
        if herd is not None and not isinstance(herd, HerdLimits):
            raise TypeError(
                f"herd must be HerdLimits (e.g. HerdLimits(in_flight=64, per_peer=64)) or None, "
                f"not {type(herd).__name__}"
            )
        self.herd = herd or HerdLimits()
        if network is not None and network is not False and not isinstance(network, NetworkPolicy):
            raise TypeError(
                f"network must be a NetworkPolicy (e.g. NetworkPolicy(paths=PathPolicy("
                f"devices=('eth1',)))), False (no monitor) or None, not {type(network).__name__}"
            )
        if network is None and failover is not None:
            network = NetworkPolicy()
        self.network = network or None
        self._netns = Namespace(netns) if netns is not None else None
        if netlink is not None and not callable(netlink):
            raise TypeError("netlink must be an async factory netns -> NetlinkSource")
        self._netlink = netlink
        if identity is not None and not isinstance(identity, Identity):
            raise TypeError(
                "identity must be a supervisor.libp2p.Identity (Identity.generate() or "
                f"Identity.load(path)) or None, not {type(identity).__name__}"
            )
        self._identity = identity
        self._credentials: Credentials | None = None
        self.libp2p = Libp2pService(lambda: self.identity, self._libp2p_listen_addrs)
        self.failover = failover
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.options = options or ConnectionOptions()
        if failover is not None and self.options.health is None:
            # Failover needs path health: keep-alives on standby paths, active-path liveness.
            self.options = dataclasses.replace(self.options, health=failover.health_config())
        self.events = EventBus(retain=validate.count("event_retention", event_retention))
        self._ask_timeout = ask_timeout
        self._runtime: Runtime | None = None
        self._ref: ActorRef | None = None
        # The supervisor actor's registry: an ActorRef and the published view per connection.
        self._conns: dict[str, ConnectionEntry] = {}
        self._sockets: dict[int, socket.socket] = {}
        self._socket_keys = itertools.count(1)
        self._listeners: list[Listener] = []
        self._crash: ChildFailed | None = None
        self._closed = False
        #: Set once close() began: a second or concurrent close() waits for the first.
        self._released: asyncio.Event | None = None
        #: shutdown() began: no new dial or listener; set when it has ended.
        self._stopping: asyncio.Event | None = None
        self._stop_report: ShutdownReport | None = None
        # Providers are the caller's: the library never sets the global ones.
        self.tracing = Tracing(tracer_provider)
        self.metrics = Metrics(meter_provider)
        self._journal_path = journal
        self.journal: JournalWriter | None = None
        self.qlog = QlogDirectory(qlog_dir, max_events=qlog_max_events) if qlog_dir else None
        self._server_qlogs: list[QlogWriter] = []

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._runtime is not None:
            return
        if self._closed:
            raise SupervisorClosedError("it was closed: a Supervisor runs once")
        if self._netns is not None:
            # First: a namespace gone (or refused) leaves nothing started; a later start()
            # asks again. close() ends its worker thread.
            await self._netns.check()
        if self._journal_path is not None:
            # A refused path (not a journal of ours) leaves nothing started.
            self.journal = JournalWriter(self._journal_path)
        self._runtime = Runtime(on_failure=self._crashed)
        policy: Callable[[PolicyPort], FailoverController] | None = None
        if self.failover is not None or self.network is not None:
            # The network policy moves connections through the failover controller (one
            # mover per connection); without a FailoverPolicy it uses its defaults for that.
            policy = functools.partial(FailoverController, policy=self.failover or FailoverPolicy())

        actor = SupervisorActor(
            migration_enabled=self.migration_enabled,
            events=self.events,
            sockets=self._sockets,
            registry=self._conns,
            options=self.options,
            tracing=self.tracing,
            metrics=self.metrics,
            journal=self.journal,
            qlog=self.qlog,
            policy=policy,
            preferred_address=self._preferred_address,
            herd=self.herd,
            network=self.network,
            netns=self._netns,
            netlink=self._netlink,
            libp2p=self._libp2p_credentials,
        )
        self._ref = self._runtime.start(actor, name="supervisor")
        self.libp2p.watch(self.events.subscribe(EvtConnectionMigrationCompleted))

    def _crashed(self, failure: ChildFailed) -> None:
        """The supervisor actor itself failed (a bug): say so now, and on every later call."""
        log.error("the supervisor actor crashed: %s\n%s", failure.error, failure.traceback)
        self._crash = failure

    async def close(self) -> None:
        """Close every listener and connection at once (CONNECTION_CLOSE, NO_ERROR); no
        socket or task survives this call. Idempotent: after ``shutdown()`` it does nothing."""
        await self._release(CLOSE_REASON)

    async def _release(self, reason: str) -> None:
        if self._released is not None:
            await self._released.wait()  # a close already ran, or runs: it does the work
            return
        self._released = asyncio.Event()
        try:
            await self._close_all(reason)
        finally:
            self._released.set()

    async def _close_all(self, reason: str) -> None:
        self._closed = True
        await self.libp2p.close()
        for listener in self._listeners:
            await listener.close(reason)
        self._listeners.clear()
        for qlog in self._server_qlogs:  # inbound connections cut short by the close
            qlog.close()
        self._server_qlogs.clear()
        if self._runtime is not None:
            for entry in list(self._conns.values()):
                if entry.ref.is_alive:
                    with contextlib.suppress(Exception):
                        await entry.ref.ask(Close(0, reason), timeout=5)
            await self._runtime.stop()
            self._runtime = None
            self._ref = None
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
        self.events.close()
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        if self._netns is not None:
            self._netns.close()  # idempotent (the SupervisorActor closed it when it ran)

    async def shutdown(self, deadline: float = 10.0) -> ShutdownReport:
        """Stop in order, as a server being stopped (SIGTERM, a pod's end) should.

        At once every listener refuses new clients (CONNECTION_CLOSE with
        CONNECTION_REFUSED to their first Initial) and ``dial``/``listen`` raise
        ``SupervisorClosedError``. Connections, accepted and dialled, go on; each is closed
        (CONNECTION_CLOSE, NO_ERROR, "shutting down") as soon as it has no open stream. When
        ``deadline`` seconds pass, the rest are closed with their streams cut (counted).
        Then everything is released as by ``close()``, which is a no-op afterwards.

        Twice (or concurrently) it returns the first call's report; after ``close()``, an
        empty one. Cancelled, it closes everything at once (the caller gave up waiting)."""
        deadline = validate.duration("deadline", deadline, allow_zero=True)
        if self._stopping is not None:
            await self._stopping.wait()
            return self._stop_report or ShutdownReport(0, 0, 0.0, False)
        if self._released is not None:
            return ShutdownReport(0, 0, 0.0, False)
        self._stopping = asyncio.Event()
        try:
            self._stop_report = await self._stop(deadline)
        except BaseException:
            await self._release(CLOSE_REASON)
            raise
        finally:
            self._stopping.set()
        return self._stop_report

    async def _stop(self, deadline: float) -> ShutdownReport:
        loop = asyncio.get_running_loop()
        started = loop.time()
        ends = started + deadline
        for listener in self._listeners:
            listener.stop_accepting()
        closed: set[str] = set()  # closing: aioquic keeps them a moment (draining)
        cut = 0
        while self._released is None:  # a concurrent close() ends the wait
            streams = {c: n for c, n in self._open_streams().items() if c not in closed}
            quiet = quiet_connections(streams)
            await self._close_connections(quiet)
            closed.update(quiet)
            if len(quiet) == len(streams):
                break
            if loop.time() >= ends:
                cut = sum(streams.values())
                break
            await asyncio.sleep(min(SHUTDOWN_CHECK_PERIOD, ends - loop.time()))
        closed.update(self._open_streams())  # the rest: closed below, streams cut
        await self._release(SHUTDOWN_REASON)
        report = ShutdownReport(len(closed), cut, loop.time() - started, cut > 0)
        log.info("shut down: %s", report)
        return report

    def _open_streams(self) -> dict[str, int]:
        """Open streams per open connection, accepted and dialled."""
        counts: dict[str, int] = {}
        for listener in self._listeners:
            counts.update(listener.open_streams())
        for entry in list(self._conns.values()):
            if not entry.view.closed:
                counts[entry.conn_id] = entry.port.open_streams
        return counts

    async def _close_connections(self, conn_ids: list[str]) -> None:
        """Close these connections (NO_ERROR, "shutting down")."""
        for conn_id in conn_ids:
            entry = self._conns.get(conn_id)
            if entry is not None:
                if entry.ref.is_alive:
                    with contextlib.suppress(Exception):
                        await entry.ref.ask(Close(0, SHUTDOWN_REASON), timeout=5)
                continue
            for listener in self._listeners:
                conn = listener.connections.get(conn_id)
                if conn is not None:
                    await conn.close(SHUTDOWN_REASON)

    def _check_not_stopping(self) -> None:
        if self._stopping is not None:
            raise SupervisorClosedError("it is shutting down: shutdown() was called")

    # ------------------------------------------------------------------ Client (handles)

    def _check_running(self) -> None:
        if self._crash is not None:
            raise SupervisorClosedError(f"it crashed: {self._crash.error}; see the log")
        if self._ref is None:
            raise SupervisorClosedError("it was closed" if self._closed else "not started yet")

    async def ask(self, msg: object, timeout: float | None = None) -> object:
        self._check_running()
        assert self._ref is not None
        # The caller's active span travels with the request: it parents the migration span.
        return await self._ref.ask(
            enveloped(msg, current_trace_fields()),
            timeout=timeout if timeout is not None else self._ask_timeout,
        )

    def live_snapshot(self, conn_id: str) -> ConnectionSnapshot | None:
        """From the connection's published view, with RTTs and counters sampled now."""
        entry = self._conns.get(conn_id)
        return snapshot_of(entry, self.migration_enabled) if entry is not None else None

    def path_samples(self, conn_id: str) -> dict[int, PathSample]:
        """Per-path counters of a connection read now (datagrams, bytes, probes, RTT), by
        path id: for benchmarks and diagnostics; empty once the connection is gone."""
        entry = self._conns.get(conn_id)
        return entry.cell.sample() if entry is not None else {}

    def register_socket(self, sock: Any) -> int:
        if not isinstance(sock, socket.socket):
            raise TypeError(f"sock must be a socket.socket, not {type(sock).__name__}")
        key = next(self._socket_keys)
        self._sockets[key] = sock
        return key

    # ------------------------------------------------------------------ API

    async def dial(self, addr: str | Multiaddr, **options: Unpack[DialOptions]) -> Connection:
        """Dial a QUIC server (keywords: :class:`~supervisor.core.dialing.DialOptions`); returns
        once the handshake completed.

        Cancelled, it leaves nothing behind (the half-made connection is closed)."""
        self._check_running()
        self._check_not_stopping()
        sock = options.get("sock")
        request = dial_request(addr, options)
        if sock is not None:
            request = dataclasses.replace(request, socket_key=self.register_socket(sock))
        reply = expect(await self.ask(request), ConnectionSnapshot)
        conn = Connection(self, reply, self._conns[reply.conn_id].port)
        if reply.remote_peer_id is not None:
            self.libp2p.serve(conn)  # the peer's ping, identify and protocol streams
        return conn

    # ------------------------------------------------------------------ libp2p

    @property
    def identity(self) -> Identity:
        """This supervisor's libp2p identity (made, Ed25519, when none was given)."""
        if self._identity is None:
            self._identity = Identity.generate()
            log.info("libp2p identity generated: peer id %s", self._identity.peer_id)
        return self._identity

    @property
    def peer_id(self) -> PeerId:
        return self.identity.peer_id

    def _libp2p_credentials(self) -> Credentials:
        if self._credentials is None:
            self._credentials = Credentials(self.identity)
        return self._credentials

    def _libp2p_listen_addrs(self) -> list[Multiaddr]:
        return [lst.bound for lst in self._listeners if lst.libp2p is not None]

    def set_stream_handler(
        self, protocol: str, handler: Callable[[Stream], Awaitable[None]]
    ) -> None:
        """Run ``handler(stream)`` for every stream a libp2p peer opens with ``protocol``
        (on dialled and accepted connections alike), as go-libp2p's ``SetStreamHandler``."""
        (protocol,) = validate.protocol_ids([protocol], what="protocol")
        if protocol in self.libp2p.protocols()[:3]:
            raise InvalidArgumentError(
                "protocol", protocol, "ping and identify are answered by the library itself"
            )
        if not callable(handler):
            raise TypeError(f"handler must be an async function of a stream, not {handler!r}")
        self.libp2p.handlers[protocol] = handler

    def remove_stream_handler(self, protocol: str) -> None:
        self.libp2p.handlers.pop(protocol, None)

    async def listen(
        self,
        addr: str | Multiaddr,
        *,
        certfile: str | os.PathLike[str] | None = None,
        keyfile: str | os.PathLike[str] | None = None,
        alpn_protocols: list[str] | None = None,
        handler: Callable[[Stream], Awaitable[None]] | None = None,
        libp2p: bool = False,
        handlers: dict[str, Callable[[Stream], Awaitable[None]]] | None = None,
        http3_root: str | os.PathLike[str] | None = None,
    ) -> Listener:
        """Serve QUIC on ``addr``; ``handler(stream)`` runs for every stream a peer opens.

        ``http3_root``: serve the files under that directory over HTTP/3 instead (GET, HEAD,
        and POST whose body is read and dropped; ALPN ``h3`` unless ``alpn_protocols`` says
        otherwise), for HTTP/3-only clients such as ngtcp2's gtlsclient.

        ``libp2p=True``: a libp2p listener (DESIGN §9) with this supervisor's identity: no
        certfile, ALPN ``libp2p``, the client's certificate asked for and checked, streams
        negotiated (ping and identify answered; ``handlers`` by protocol id, then those of
        ``set_stream_handler``); ``listener.multiaddr`` ends in ``/p2p/<peer id>``."""
        self._check_running()
        self._check_not_stopping()
        if libp2p:
            if http3_root is not None:
                raise InvalidArgumentError(
                    "http3_root", str(http3_root), "a libp2p listener serves libp2p protocols"
                )
            return await self._listen_libp2p(
                addr, certfile, keyfile, alpn_protocols, handler, handlers
            )
        if handlers is not None:
            raise InvalidArgumentError(
                "handlers", handlers, "protocol handlers are for libp2p=True listeners"
            )
        if certfile is None:
            raise InvalidArgumentError(
                "certfile", certfile, "give a PEM certificate, or libp2p=True for a libp2p listener"
            )
        certfile = validate.existing_file("certfile", certfile)
        if keyfile is not None:
            keyfile = validate.existing_file("keyfile", keyfile)
        alpn = validate.alpn_list(alpn_protocols)
        if handler is not None and not callable(handler):
            raise TypeError(f"handler must be an async function of a stream, not {handler!r}")
        root = None
        if http3_root is not None:
            if handler is not None:
                raise InvalidArgumentError(
                    "http3_root",
                    str(http3_root),
                    "HTTP/3 owns every stream of the connection: give a handler or an "
                    "http3_root, not both",
                )
            root = Path(os.fspath(http3_root))
            if not root.is_dir():
                raise InvalidArgumentError(
                    "http3_root", str(http3_root), "not a directory: give the document root"
                )
            alpn = alpn or ("h3",)
        config = QuicConfiguration(is_client=False, alpn_protocols=list(alpn) if alpn else None)
        try:
            config.load_cert_chain(certfile, keyfile)
        except (ssl.SSLError, ValueError) as exc:
            raise InvalidArgumentError(
                "certfile",
                certfile,
                f"no certificate and matching key could be loaded from it "
                f"{'and keyfile ' + repr(keyfile) + ' ' if keyfile else ''}({exc}): give a PEM "
                "certificate chain and its private key",
            ) from None
        if self.qlog is not None:
            server_qlog = self.qlog.server_logger()
            config.quic_logger = server_qlog
            self._server_qlogs.append(server_qlog)
        open_key_log(config)  # closed with the listener
        listener = Listener(self, handler, emit=self._emit, http3_root=root)
        await listener.start(addr, config)
        self._listeners.append(listener)
        return listener

    async def _listen_libp2p(
        self,
        addr: str | Multiaddr,
        certfile: object,
        keyfile: object,
        alpn_protocols: object,
        handler: object,
        handlers: dict[str, Callable[[Stream], Awaitable[None]]] | None,
    ) -> Listener:
        for name, value in (
            ("certfile", certfile),
            ("keyfile", keyfile),
            ("alpn_protocols", alpn_protocols),
            ("handler", handler),
        ):
            if value is not None:
                raise InvalidArgumentError(
                    name,
                    value,
                    "a libp2p listener presents the identity's certificate, speaks ALPN libp2p "
                    "and takes protocol handlers (handlers={protocol_id: fn}): leave it out",
                )
        extra: dict[str, Callable[[Stream], Awaitable[None]]] = {}
        for protocol, fn in (handlers or {}).items():
            (checked,) = validate.protocol_ids([protocol], what="handlers")
            if not callable(fn):
                raise TypeError(f"handlers[{protocol!r}] must be an async function of a stream")
            extra[checked] = fn
        credentials = self._libp2p_credentials()
        config = QuicConfiguration(is_client=False)
        credentials.server_configuration(config)
        if self.qlog is not None:
            server_qlog = self.qlog.server_logger()
            config.quic_logger = server_qlog
            self._server_qlogs.append(server_qlog)
        open_key_log(config)  # closed with the listener
        listener = Listener(
            self,
            None,
            libp2p=Libp2pListening(credentials, self.libp2p, extra),
            emit=self._emit,
        )
        await listener.start(addr, config)
        self._listeners.append(listener)
        return listener

    async def health_status(self) -> HealthStatus:
        """The node's health groups at work: groups, members, live timers, keep-alives sent
        by kind (representative, confirm, nat, idle), verdicts, recent loop lag."""
        status = expect(await self.ask(HealthStatusRequest()), HealthStatus)
        return status

    async def network_status(self) -> NetworkStatus:
        """What the NetworkMonitor knows: interfaces, addresses, the routes to the peers of
        the open connections, resyncs after ENOBUFS; ``available`` False with the reason
        when it does not run (no policy, pyroute2 missing, netlink refused)."""
        status = expect(await self.ask(NetworkStatusRequest()), NetworkStatus)
        return status

    async def migration_stats(self) -> MigrationStats:
        """How this supervisor's migrations ended (completed, failed by outcome, rate)."""
        stats = expect(await self.ask(StatsRequest()), MigrationStats)
        return stats

    def connections(self) -> list[ConnectionSnapshot]:
        """The open outbound connections."""
        return [
            snapshot_of(e, self.migration_enabled)
            for e in list(self._conns.values())
            if not e.view.closed
        ]

    def inbound_connections(self) -> list[ConnectionSnapshot]:
        """The open connections every listener accepted (``inbound=True``), each with the
        peer's current address."""
        return [snap for listener in self._listeners for snap in listener.snapshots()]

    def inbound_snapshot(self, conn_id: str) -> ConnectionSnapshot | None:
        """One accepted, open connection by id (None: no listener holds it)."""
        for listener in self._listeners:
            conn = listener.connections.get(conn_id)
            if conn is not None:
                return conn.snapshot()
        return None

    def _emit(self, evt: Event) -> None:
        """A listener's event: on the bus, and in the journal as the actor's events are."""
        published = self.events.publish(evt)
        if published is not None and self.journal is not None:
            self.journal.event(
                type(published).__name__.removeprefix("Evt"),
                plain_dict(published),
                conn=published.conn_id,
            )

    async def drain(
        self,
        *,
        local_addr: str | Multiaddr | None = None,
        device: str | None = None,
        probe_timeout: float = 2.0,
        close_drained: bool = True,
    ) -> DrainReport:
        """Move every connection off ``local_addr`` or ``device`` (maintenance), in parallel.

        See :func:`supervisor.orchestration.drain.drain`; one report entry per connection.
        """
        self._check_running()
        probe_timeout = validate.duration("probe_timeout", probe_timeout)
        close_drained = validate.flag("close_drained", close_drained)
        return await drain(
            self,
            local_addr=local_addr,
            device=device,
            probe_timeout=probe_timeout,
            close_drained=close_drained,
        )
