"""``Supervisor``: the entry point, an async context manager over the local actor runtime."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from aioquic.quic.configuration import QuicConfiguration
from multiaddr import Multiaddr

from actors.envelope import CODEC_VERSION, Envelope, type_name
from actors.errors import ConnectionClosedError
from actors.factory import ConnectionOptions
from actors.messages import Close
from actors.runtime import ActorRef, ChildFailed, Runtime
from actors.streams import Stream
from actors.view import PathSample
from supervisor.config import FailoverPolicy
from supervisor.drain import DrainReport, drain
from supervisor.events import EventBus
from supervisor.failover import FailoverController
from supervisor.handles import Connection
from supervisor.messages import ConnectionSnapshot, DialRequest
from supervisor.policy import PolicyPort
from supervisor.registry import ConnectionEntry, snapshot_of
from supervisor.server import Listener
from supervisor.supervisor_actor import SupervisorActor
from telemetry.journal import JournalWriter
from telemetry.metrics import Metrics
from telemetry.propagation import current_trace_fields
from telemetry.qlog import DEFAULT_MAX_EVENTS as DEFAULT_QLOG_MAX_EVENTS
from telemetry.qlog import QlogDirectory, QlogWriter
from telemetry.tracing import Tracing

log = logging.getLogger(__name__)


class Supervisor:
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
    ) -> None:
        """``qlog_dir``: aioquic's qlog of every connection, ``{conn_id}.qlog`` (outbound) or
        ``server-{odcid}.qlog`` (inbound), written when it ends; at most ``qlog_max_events``
        of its newest events are kept in memory (see ``telemetry.qlog``)."""
        self.migration_enabled = bool(enable_experimental_connection_migration)
        self.failover = failover
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.options = options or ConnectionOptions()
        if failover is not None and self.options.health is None:
            # Failover needs path health: keep-alives on standby paths, active-path liveness.
            self.options = dataclasses.replace(self.options, health=failover.health_config())
        self.events = EventBus()
        self._ask_timeout = ask_timeout
        self._runtime: Runtime | None = None
        self._ref: ActorRef | None = None
        # The supervisor actor's registry: an ActorRef and the published view per connection.
        self._conns: dict[str, ConnectionEntry] = {}
        self._sockets: dict[int, socket.socket] = {}
        self._socket_keys = itertools.count(1)
        self._listeners: list[Listener] = []
        self._crash: ChildFailed | None = None
        # Providers are the caller's: the library never sets the global ones.
        self.tracing = Tracing(tracer_provider)
        self.metrics = Metrics(meter_provider)
        self._journal_path = journal
        self.journal: JournalWriter | None = None
        self.qlog = QlogDirectory(qlog_dir, max_events=qlog_max_events) if qlog_dir else None
        self._server_qlogs: list[QlogWriter] = []

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Supervisor:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        if self._runtime is not None:
            return
        self._runtime = Runtime(on_failure=self._crashed)
        if self._journal_path is not None:
            self.journal = JournalWriter(self._journal_path)
        policy: Callable[[PolicyPort], FailoverController] | None = None
        if self.failover is not None:
            policy = functools.partial(FailoverController, policy=self.failover)

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
        )
        self._ref = self._runtime.start(actor, name="supervisor")

    def _crashed(self, failure: ChildFailed) -> None:
        """The supervisor actor itself failed (a bug): say so now, and on every later call."""
        log.error("the supervisor actor crashed: %s\n%s", failure.error, failure.traceback)
        self._crash = failure

    async def close(self) -> None:
        """Close every listener and connection; no socket or task survives this call."""
        for listener in self._listeners:
            await listener.close()
        self._listeners.clear()
        for qlog in self._server_qlogs:  # inbound connections cut short by the close
            qlog.close()
        self._server_qlogs.clear()
        if self._runtime is not None:
            for entry in list(self._conns.values()):
                if entry.ref.is_alive:
                    with contextlib.suppress(Exception):
                        await entry.ref.ask(Close(0, "supervisor closing"), timeout=5)
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

    # ------------------------------------------------------------------ Client (handles)

    async def ask(self, msg: object, timeout: float | None = None) -> object:
        if self._crash is not None:
            raise ConnectionClosedError(
                reason=f"the supervisor crashed ({self._crash.error}); see the log, then "
                "open a new Supervisor"
            )
        if self._ref is None:
            raise ConnectionClosedError(reason="the supervisor is not running")
        # The caller's active span travels with the request: it parents the migration span.
        fields = current_trace_fields()
        envelope = Envelope(
            v=CODEC_VERSION,
            type=type_name(msg),
            body=msg,
            traceparent=fields.get("traceparent"),
            tracestate=fields.get("tracestate"),
            baggage=fields.get("baggage"),
        )
        return await self._ref.ask(
            envelope, timeout=timeout if timeout is not None else self._ask_timeout
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

    async def dial(
        self,
        addr: str | Multiaddr,
        *,
        alpn_protocols: list[str] | None = None,
        server_name: str | None = "localhost",
        cafile: str | None = None,
        verify: bool = True,
        local_addr: str | Multiaddr | None = None,
        device: str | None = None,
        sock: socket.socket | None = None,
        timeout: float = 10.0,
        idle_timeout: float = 30.0,
    ) -> Connection:
        """Dial a QUIC server; returns once the handshake completed."""
        key = self.register_socket(sock) if sock is not None else None
        reply = await self.ask(
            DialRequest(
                remote=str(addr),
                alpn_protocols=tuple(alpn_protocols) if alpn_protocols else None,
                server_name=server_name,
                cafile=cafile,
                verify=verify,
                local_addr=str(local_addr) if local_addr is not None else None,
                device=device,
                socket_key=key,
                timeout=timeout,
                idle_timeout=idle_timeout,
            )
        )
        assert isinstance(reply, ConnectionSnapshot)
        return Connection(self, reply, self._conns[reply.conn_id].port)

    async def listen(
        self,
        addr: str | Multiaddr,
        *,
        certfile: str | os.PathLike[str],
        keyfile: str | os.PathLike[str] | None = None,
        alpn_protocols: list[str] | None = None,
        handler: Callable[[Stream], Awaitable[None]] | None = None,
    ) -> Listener:
        """Serve QUIC on ``addr``; ``handler(stream)`` runs for every stream a peer opens."""
        config = QuicConfiguration(is_client=False, alpn_protocols=alpn_protocols)
        config.load_cert_chain(certfile, keyfile)
        if self.qlog is not None:
            server_qlog = self.qlog.server_logger()
            config.quic_logger = server_qlog
            self._server_qlogs.append(server_qlog)
        keylog = os.environ.get("SSLKEYLOGFILE")
        if keylog:
            config.secrets_log_file = open(keylog, "a")  # noqa: SIM115 - lives with the server
        listener = Listener(self, handler)
        await listener.start(addr, config)
        self._listeners.append(listener)
        return listener

    def connections(self) -> list[ConnectionSnapshot]:
        """The open outbound connections."""
        return [
            snapshot_of(e, self.migration_enabled)
            for e in list(self._conns.values())
            if not e.view.closed
        ]

    async def drain(
        self,
        *,
        local_addr: str | Multiaddr | None = None,
        device: str | None = None,
        probe_timeout: float = 2.0,
        close_drained: bool = True,
    ) -> DrainReport:
        """Move every connection off ``local_addr`` or ``device`` (maintenance), in parallel.

        See :func:`supervisor.drain.drain`; one report entry per connection.
        """
        return await drain(
            self,
            local_addr=local_addr,
            device=device,
            probe_timeout=probe_timeout,
            close_drained=close_drained,
        )
