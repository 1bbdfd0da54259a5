"""The Ray agent: one Supervisor per node inside a Ray async actor, driven by msgpack envelopes.

Why an envelope and not Ray's pickling: the same request messages the local handles send cross
the process boundary unchanged, carry the caller's W3C trace context (so a migration asked for
from a driver is one trace: caller -> Ray -> supervisor -> socket), and fail with a clear
:class:`~actors.envelope.EnvelopeError` when the two sides run different releases.

Only the control plane crosses Ray: the connections, their sockets and every datagram stay in
the agent's process (``num_cpus=0``; a Ray call costs ~1 ms, a datagram must not).

Desired state (each connection's dial request, its configured paths and which one is active)
is written to Ray's internal key-value store (GCS), outside the actor, so an agent that Ray
restarts (``max_restarts``) re-dials and re-adds its paths; a ``fleet.Restored`` record per
connection says what came back and what did not.

Beyond ``ask``: ``events_stream`` is a Ray streaming generator (``num_returns="streaming"``)
that pushes event batches as they happen, and ``listen`` starts a QUIC server in the agent whose
stream handler is built in (``"echo"``), because a Python callable cannot cross processes.

Health and an orderly stop: ``remote.Health`` answers readiness (started, desired state
restored, not stopping) and liveness (a heartbeat on the agent's loop, with its lag);
``remote.Stop`` marks the agent not ready, runs ``Supervisor.shutdown(deadline)`` and keeps the
desired state. Both travel through Ray and through the Unix control socket the agent serves
when given one (``control_socket=``, ``agent --control-socket PATH``): kubelet's probes and
preStop then cost a ``quic-supervisor ctl`` process and a local socket, not a Ray client. A
SIGTERM to the worker process runs the same stop (see :func:`_stop_at_exit`).

This module imports ``ray`` only inside functions: the messages are usable without Ray.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import logging
import os
import socket
import tempfile
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import msgpack

from actors import errors as _errors
from actors.envelope import encode, message
from actors.streams import Stream
from supervisor.certificates import self_signed_cert
from supervisor.core.config import NetworkPolicy
from supervisor.core.dialing import dial_options
from supervisor.core.handles import Connection
from supervisor.core.messages import (
    AddPathRequest,
    CloseConnectionRequest,
    ClosePathRequest,
    ConnectionSnapshot,
    DialRequest,
    MigrationStats,
    PathAddedReply,
    ProbeRequest,
    SnapshotRequest,
    StatsRequest,
    SwitchReply,
    SwitchRequest,
)
from supervisor.core.validate import duration
from supervisor.orchestration.drain import DrainReport, drain
from supervisor.orchestration.network.monitor import NetworkStatus, NetworkStatusRequest
from supervisor.orchestration.supervisor import Supervisor
from supervisor.remote.control import ControlServer
from supervisor.remote.protocol import (
    Dispatcher,
    DrainRequest,
    Health,
    HealthRequest,
    StopReport,
    StopRequest,
    encode_error,
)
from supervisor.server import Listener

log = logging.getLogger(__name__)

__all__ = [
    "AGENT_NAME_PREFIX",
    "DEFAULT_EXIT_DEADLINE",
    "DEFAULT_NAMESPACE",
    "EXIT_DEADLINE_ENV",
    "AgentInfo",
    "AgentMetrics",
    "CloseListenerRequest",
    "EchoReport",
    "EchoStart",
    "EchoWait",
    "EventBatch",
    "EventsRequest",
    "InfoRequest",
    "ListenRequest",
    "ListenerInfo",
    "Listeners",
    "ListenersRequest",
    "MetricsRequest",
    "PathMetrics",
    "Restored",
    "RttSummary",
    "SupervisorAgent",
    "agent_name",
    "echo_handler",
    "kv_prefix",
]

DEFAULT_NAMESPACE = "quic-supervisor"
AGENT_NAME_PREFIX = "quic-supervisor:"
KV_NAMESPACE = "quic-supervisor"
_EVENT_LOG_SIZE = 4096
LISTEN_HANDLERS = ("echo",)  # built-in stream handlers a remote listen() may name

#: Seconds the stop a SIGTERM starts may take (the worker exits right after): below the pod's
#: terminationGracePeriodSeconds, which also covers ``ray stop``.
EXIT_DEADLINE_ENV = "QUIC_SUPERVISOR_EXIT_DEADLINE"
DEFAULT_EXIT_DEADLINE = 5.0
_TICK = 0.5  # heartbeat period, seconds
_LAG_WINDOW = 20  # ticks whose lateness loop_lag reports (10 s)
_LIVE_TICK_AGE = 10.0  # a heartbeat older than this: the loop is stuck, not live
_STATE_FLUSH_TIMEOUT = 2.0  # seconds a stop waits for desired-state writes in flight


#: Supervisor requests the agent passes on as they are (conn ids made live): a path's
#: add, probe, switch and close, and the migration outcomes. The agent's own requests (dial,
#: snapshot, close, listen, events, metrics ...) have handlers.
AGENT_FORWARDED = (AddPathRequest, ProbeRequest, SwitchRequest, ClosePathRequest, StatsRequest)


def agent_name(label: str) -> str:
    """The Ray actor name of the agent for ``label`` (a node id, or any label in tests)."""
    return f"{AGENT_NAME_PREFIX}{label}"


def kv_prefix(namespace: str, label: str) -> str:
    """Where an agent's desired state lives in the internal KV store (per namespace and label)."""
    return f"{namespace}/{label}/conn/"


# -- messages only the fleet uses -----------------------------------------------------------------


@message("fleet.Info")
@dataclass(frozen=True, slots=True)
class InfoRequest:
    """Ask an agent who it is (and wait until it has restored its connections)."""


@message("fleet.Restored")
@dataclass(frozen=True, slots=True)
class Restored:
    """What a restarted agent did with one recorded connection."""

    conn_id: str  # the stable id the client knows
    ok: bool
    paths: int = 0  # paths re-added (the handshake path included)
    active: str | None = None  # local address active again
    error: str | None = None
    time: float = 0.0


@message("fleet.AgentInfo")
@dataclass(frozen=True, slots=True)
class AgentInfo:
    label: str
    node_id: str
    hostname: str
    pid: int
    migration_enabled: bool
    connections: int
    started: float  # wall clock of this incarnation's start (changes on restart)
    restored: tuple[Restored, ...] = ()
    listeners: int = 0
    event_streams: int = 0  # events_stream generators running (a cancelled one is gone)


@message("fleet.Events")
@dataclass(frozen=True, slots=True)
class EventsRequest:
    cursor: int = 0
    limit: int = 1000


@message("fleet.EventBatch")
@dataclass(frozen=True, slots=True)
class EventBatch:
    """Events with sequence numbers ``cursor - len(events)`` .. ``cursor - 1``; ``lost`` counts
    events that fell out of the agent's bounded log before they were read."""

    cursor: int
    events: tuple[Any, ...] = ()
    lost: int = 0


@message("fleet.EchoStart")
@dataclass(frozen=True, slots=True)
class EchoStart:
    """Diagnostics: stream ``nbytes`` through the connection's echo peer, checksummed."""

    conn_id: str
    nbytes: int
    chunk: int = 16384
    pace: float = 0.0  # seconds to sleep between chunks (spreads the transfer over a migration)


@message("fleet.EchoWait")
@dataclass(frozen=True, slots=True)
class EchoWait:
    job: int
    timeout: float = 60.0


@message("fleet.EchoReport")
@dataclass(frozen=True, slots=True)
class EchoReport:
    job: int
    sent: int
    received: int
    intact: bool  # the echoed bytes are exactly the sent ones (sha256)
    done: bool


@message("fleet.Listen")
@dataclass(frozen=True, slots=True)
class ListenRequest:
    """Serve QUIC from the agent. Files are paths on the agent's node (no ``certfile``: a
    self-signed "localhost" certificate made by the agent); ``handler`` names a built-in stream
    handler (``"echo"``) or is None (streams are accepted and left unread)."""

    addr: str
    certfile: str | None = None
    keyfile: str | None = None
    alpn_protocols: tuple[str, ...] | None = None
    handler: str | None = "echo"


@message("fleet.ListenerInfo")
@dataclass(frozen=True, slots=True)
class ListenerInfo:
    listener_id: int
    multiaddr: str  # the bound address (the real port after port 0)
    handler: str | None
    connections: int  # live inbound connections
    peer_addresses: tuple[str, ...] = ()  # every client address seen (a migration adds one)


@message("fleet.ListListeners")
@dataclass(frozen=True, slots=True)
class ListenersRequest:
    """Ask for every listener of the agent."""


@message("fleet.Listeners")
@dataclass(frozen=True, slots=True)
class Listeners:
    listeners: tuple[ListenerInfo, ...] = ()


@message("fleet.CloseListener")
@dataclass(frozen=True, slots=True)
class CloseListenerRequest:
    listener_id: int


@message("fleet.Metrics")
@dataclass(frozen=True, slots=True)
class MetricsRequest:
    """Ask for the agent's counters (:class:`AgentMetrics`)."""


@message("fleet.RttSummary")
@dataclass(frozen=True, slots=True)
class RttSummary:
    """Successful probe RTTs, seconds. ``p50``/``p99`` are the upper bounds of the histogram
    buckets holding those quantiles (clamped to ``max``): bucket estimates, not exact values."""

    count: int = 0
    min: float | None = None
    mean: float | None = None
    max: float | None = None
    p50: float | None = None
    p99: float | None = None


@message("fleet.PathMetrics")
@dataclass(frozen=True, slots=True)
class PathMetrics:
    conn_id: str
    path_id: int
    local_addr: str
    state: str
    active: bool
    rtt: float | None
    bytes_sent: int
    bytes_received: int


@message("fleet.AgentMetrics")
@dataclass(frozen=True, slots=True)
class AgentMetrics:
    """One agent's counters. Counts from telemetry (migrations, rollbacks, probes) start with
    this incarnation (``since``); connections, paths and bytes come from live snapshots."""

    label: str
    since: float
    connections: int  # open
    paths_by_state: dict[str, int] = field(default_factory=dict)  # paths of open connections
    migrations: dict[str, dict[str, int]] = field(default_factory=dict)  # reason -> result -> n
    rollbacks: dict[str, int] = field(default_factory=dict)  # reason -> n
    probe_failures: dict[str, int] = field(default_factory=dict)  # error type -> n
    probe_rtt: RttSummary = field(default_factory=RttSummary)
    paths: tuple[PathMetrics, ...] = ()  # every path of every connection, bytes per path
    #: How this incarnation's migrations ended: completed, failed by outcome, success rate.
    migration_stats: MigrationStats = field(default_factory=MigrationStats)


# -- desired state --------------------------------------------------------------------------------


class DesiredState:
    """Connections and their configured paths, in Ray's internal KV store (GCS).

    Why there: it survives the actor's process, it is in every Ray cluster (no volume to mount),
    and the records are tiny. One key per connection, msgpack values.

    Written behind the replies (B5: one Ray call per operation, nothing else on the way):
    :meth:`put` and :meth:`delete` only note the change; a writer task this object owns sends
    the newest record of each changed key on the loop's next turn, one batch at a time, so a
    key's writes stay in order and a burst of changes costs one write per key. A request that
    arrives after a reply therefore runs after its change was sent (``unsaved`` says how many
    are not yet acknowledged by the GCS); :meth:`close` flushes, bounded.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._dirty: dict[str, bytes | None] = {}  # conn id -> record to write, None: delete
        self._sending = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._writer: asyncio.Task[None] | None = None
        self.failures = 0

    @property
    def unsaved(self) -> int:
        """Changes noted or sent but not yet acknowledged by the GCS."""
        return len(self._dirty) + self._sending

    @staticmethod
    def _gcs() -> Any:
        """Ray's GCS client in this worker (``internal_kv``'s own; tests/test_ray_backend.py
        checks the members used, so a Ray upgrade that renames them fails loudly)."""
        from ray.experimental import internal_kv

        return internal_kv.global_gcs_client

    def put(self, conn_id: str, record: dict[str, Any]) -> None:
        self._note(conn_id, msgpack.packb(record, use_bin_type=True))

    def delete(self, conn_id: str) -> None:
        self._note(conn_id, None)

    def _note(self, conn_id: str, data: bytes | None) -> None:
        self._dirty[conn_id] = data
        self._idle.clear()
        self._wake.set()
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write())

    def _send(self, conn_id: str, data: bytes | None) -> Awaitable[Any]:
        """One write to the GCS, issued now (Ray's async KV call)."""
        gcs, key, namespace = self._gcs(), (self.prefix + conn_id).encode(), KV_NAMESPACE.encode()
        if data is None:
            sent = gcs.async_internal_kv_del(key, False, namespace, timeout=None)
        else:
            sent = gcs.async_internal_kv_put(key, data, True, namespace, timeout=None)
        return cast(Awaitable[Any], sent)

    async def _write(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._dirty = self._dirty, {}
            self._sending = len(batch)

            async def one(conn_id: str, data: bytes | None) -> None:
                try:
                    await self._send(conn_id, data)
                except Exception as exc:  # the GCS is away: the connection itself still works
                    self.failures += 1
                    log.error("desired state: cannot write %s: %s", conn_id, exc)

            await asyncio.gather(*(one(c, d) for c, d in batch.items()))
            self._sending = 0
            if not self._dirty:
                self._idle.set()

    async def close(self, timeout: float = 5.0) -> int:
        """Flush what is noted (at most ``timeout`` seconds), then stop the writer; returns how
        many changes were left unsaved."""
        if self._writer is None:
            return 0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        left = self.unsaved
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        self._writer = None
        return left

    async def load(self) -> dict[str, dict[str, Any]]:
        from ray.experimental import internal_kv as kv

        def read() -> dict[str, dict[str, Any]]:
            out: dict[str, dict[str, Any]] = {}
            for key in kv._internal_kv_list(self.prefix, namespace=KV_NAMESPACE):
                raw = kv._internal_kv_get(key, namespace=KV_NAMESPACE)
                if raw is not None:
                    name = key.decode() if isinstance(key, bytes) else str(key)
                    out[name.removeprefix(self.prefix)] = msgpack.unpackb(raw, raw=False)
            return out

        return await asyncio.to_thread(read)


# -- built-ins the remote API needs ---------------------------------------------------------------


async def echo_handler(stream: Stream) -> None:
    """The built-in stream handler of ``listen(handler="echo")``: every byte back, then FIN."""
    while data := await stream.read(65536):
        await stream.write(data)
    await stream.close()


def _self_signed_cert() -> tuple[str, str]:
    """A self-signed "localhost" certificate and its key in a fresh private directory (0700):
    for a remote ``listen`` without files."""
    certfile, keyfile = self_signed_cert(tempfile.mkdtemp(prefix="quic-supervisor-cert-"))
    return str(certfile), str(keyfile)


@dataclass(slots=True)
class _Counters:
    migrations: dict[str, dict[str, int]] = field(default_factory=dict)
    rollbacks: dict[str, int] = field(default_factory=dict)
    probe_failures: dict[str, int] = field(default_factory=dict)
    probe_rtt: RttSummary = field(default_factory=RttSummary)


def _bucket_quantile(
    q: float, counts: Sequence[int], bounds: Sequence[float], top: float | None
) -> float | None:
    """Upper bound of the histogram bucket holding quantile ``q`` (``top`` for the last one)."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        seen += n
        if seen >= rank and n:
            bound = bounds[i] if i < len(bounds) else top
            return min(bound, top) if top is not None and bound is not None else bound
    return top


def _read_counters(reader: Any) -> _Counters:
    """The project's instruments (``telemetry.metrics``) as read by an in-memory reader."""
    from telemetry.tracing import ATTR_MIGRATION_REASON, ATTR_MIGRATION_RESULT

    out = _Counters()
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data is not None else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                points = list(metric.data.data_points)
                if metric.name == "quic.migrations":
                    for pt in points:
                        reason = str((pt.attributes or {}).get(ATTR_MIGRATION_REASON, "other"))
                        result = str((pt.attributes or {}).get(ATTR_MIGRATION_RESULT, "other"))
                        per = out.migrations.setdefault(reason, {})
                        per[result] = per.get(result, 0) + int(pt.value)
                elif metric.name == "quic.migration.rollbacks":
                    for pt in points:
                        reason = str((pt.attributes or {}).get(ATTR_MIGRATION_REASON, "other"))
                        out.rollbacks[reason] = out.rollbacks.get(reason, 0) + int(pt.value)
                elif metric.name == "quic.probe.failures":
                    for pt in points:
                        kind = str((pt.attributes or {}).get("error.type", "other"))
                        out.probe_failures[kind] = out.probe_failures.get(kind, 0) + int(pt.value)
                elif metric.name == "quic.probe.rtt" and points and points[0].count:
                    pt = points[0]  # no attributes: one series
                    out.probe_rtt = RttSummary(
                        count=int(pt.count),
                        min=float(pt.min),
                        mean=float(pt.sum) / pt.count,
                        max=float(pt.max),
                        p50=_bucket_quantile(0.5, pt.bucket_counts, pt.explicit_bounds, pt.max),
                        p99=_bucket_quantile(0.99, pt.bucket_counts, pt.explicit_bounds, pt.max),
                    )
    return out


# -- the agent ------------------------------------------------------------------------------------


class _Echo:
    sent: int = 0
    received: int = 0
    intact: bool = False
    task: asyncio.Task[None] | None = None


class SupervisorAgent:
    """One node's Supervisor in a Ray async actor (started by ``Fleet.start_agent``).

    Every public method takes and returns envelope bytes; :meth:`ask` is the only one the
    handles need. Failures never raise through Ray: they come back as an ``ErrorReply`` that the
    client turns into the same typed exception.
    """

    def __init__(
        self,
        label: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        enable_migration: bool = True,
        capture_spans: bool = False,
        persist: bool = True,
        network: bool = False,
        control_socket: str | None = None,
        exit_deadline: float | None = None,
    ) -> None:
        """``network``: run the NetworkMonitor with ``NetworkPolicy()``'s reactions (off by
        default: it moves connections on its own when an interface or route changes).
        ``control_socket``: also serve the Unix control socket there (a restarted incarnation
        gets the same arguments, so it serves it again); ``exit_deadline``: seconds the stop run
        at process exit (SIGTERM) may take (default ``$QUIC_SUPERVISOR_EXIT_DEADLINE``, else
        5)."""
        from telemetry.providers import build_providers_from_env

        if exit_deadline is None:
            exit_deadline = float(os.environ.get(EXIT_DEADLINE_ENV, DEFAULT_EXIT_DEADLINE))
        self.exit_deadline = duration("exit_deadline", exit_deadline, allow_zero=True)
        self.control_socket = control_socket
        self.label = label
        self.started = time.time()
        self._extra: list[Any] = []
        self._memory: Any = None
        if capture_spans:  # tests: keep finished spans in memory, readable via finished_spans()
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
                InMemorySpanExporter,
            )

            self._memory = InMemorySpanExporter()
            self._extra.append(SimpleSpanProcessor(self._memory))
        # metrics() reads the agent's own counters through an in-memory reader: the same
        # instruments an OTLP exporter sees, without a collector.
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        self._reader = InMemoryMetricReader()
        # Each worker process builds its own providers from OTEL_* (never the global ones).
        self.providers = build_providers_from_env(
            extra_span_processors=self._extra, extra_metric_readers=[self._reader]
        )
        if network:
            with contextlib.suppress(RuntimeError):
                loop = type(asyncio.get_running_loop())
                if loop.__module__.startswith("uvloop"):
                    log.error(
                        "agent %s: the network monitor cannot open netlink on uvloop (pyroute2 "
                        "needs asyncio's own loop): start the agent with RAY_USE_UVLOOP=0, as "
                        "Fleet.start_agent(network=True) does",
                        label,
                    )
        self.sup = Supervisor(
            enable_experimental_connection_migration=enable_migration,
            tracer_provider=self.providers.tracer_provider,
            meter_provider=self.providers.meter_provider,
            network=NetworkPolicy() if network else None,
        )
        self.state = DesiredState(kv_prefix(namespace, label)) if persist else None
        self._records: dict[str, dict[str, Any]] = {}
        self._live: dict[str, str] = {}  # stable conn id (what clients hold) -> live conn id
        self._stable: dict[str, str] = {}  # live -> stable
        self._conns: dict[str, Connection] = {}  # live id -> handle (for streams)
        self._restored: list[Restored] = []
        self._log: deque[tuple[int, Any]] = deque(maxlen=_EVENT_LOG_SIZE)
        self._seq = itertools.count()
        self._next_seq = 0
        self._appended = asyncio.Event()  # set and replaced on every append: wakes streams
        self._streams = 0
        self._closing = False
        self._listeners: dict[int, Listener] = {}
        self._listener_ids = itertools.count(1)
        self._echo: dict[int, _Echo] = {}
        self._echo_ids = itertools.count(1)
        self._ready_task: asyncio.Task[None] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._phase = "starting the supervisor"  # what readiness waits for
        self._stop_task: asyncio.Task[StopReport] | None = None
        self._control: ControlServer | None = None
        self._control_error: str | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._last_tick = 0.0
        self._lags: deque[float] = deque(maxlen=_LAG_WINDOW)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dispatcher = Dispatcher(
            handlers=self._handlers(),
            forwarded=AGENT_FORWARDED,
            forward=self._forward,
            prepare=self._ready,
            name="Ray agent",
        )
        with contextlib.suppress(RuntimeError):  # an async actor's __init__ runs on its loop
            self._loop = asyncio.get_running_loop()
            self._ready_task = self._loop.create_task(self._start())
            # Weakly: an agent built in a test process must not be kept alive by the hook.
            self._exit_hook = functools.partial(_exit_hook, weakref.ref(self))
            atexit.register(self._exit_hook)

    # ------------------------------------------------------------------ lifecycle

    async def _ready(self) -> None:
        if self._ready_task is None:
            self._ready_task = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(self._ready_task)

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._last_tick = loop.time()
        self._heartbeat = loop.create_task(self._beat())
        if self.control_socket is not None:  # first: liveness answers during a long restore
            await self._serve_control(self.control_socket)
        await self.sup.start()
        self._pump = loop.create_task(self._pump_events())
        if self.state is not None:
            self._phase = "restoring the desired state"
            await self._restore()
        self._phase = "ready"

    async def _serve_control(self, path: str) -> None:
        """The control socket, answered by this agent's dispatcher (the same requests as Ray
        calls, stable conn ids). A failure leaves the agent running and not ready, saying why."""
        server = ControlServer(self.sup, path, dispatcher=self._dispatcher)
        try:
            await server.start()
        except (OSError, ValueError) as exc:
            self._control_error = f"control socket {path}: {exc}"
            log.error("agent %s: %s", self.label, self._control_error)
            return
        self._control = server

    async def _beat(self) -> None:
        """The liveness heartbeat: how late the loop runs a timer is how busy it is."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + _TICK
            await asyncio.sleep(_TICK)
            now = loop.time()
            self._lags.append(max(0.0, now - due))
            self._last_tick = now

    async def _pump_events(self) -> None:
        async for evt in self.sup.events.subscribe():
            self._append(
                dataclasses.replace(evt, conn_id=self._stable.get(evt.conn_id, evt.conn_id))
            )

    def _append(self, evt: object) -> None:
        self._log.append((next(self._seq), evt))
        self._next_seq += 1
        self._wake_streams()

    def _wake_streams(self) -> None:
        woken, self._appended = self._appended, asyncio.Event()
        woken.set()

    async def _restore(self) -> None:
        """Re-dial every recorded connection and re-add its paths (a restarted incarnation)."""
        assert self.state is not None
        try:
            records = await self.state.load()
        except Exception as exc:  # the KV store is gone: run, but say so
            log.error("agent %s: cannot read desired state: %s", self.label, exc)
            return
        for stable, record in records.items():
            self._records[stable] = record
            report = await self._restore_one(stable, record)
            self._restored.append(report)
            self._append(report)

    async def _restore_one(self, stable: str, record: dict[str, Any]) -> Restored:
        try:
            dial = DialRequest(**record["dial"])
            conn = await self.sup.dial(dial.remote, **dial_options(dial))
        except Exception as exc:
            return Restored(stable, False, error=f"re-dial failed: {exc}", time=time.time())
        self._bind(stable, conn)
        dialled = {"path_id": 0, "index": 0, "local_addr": dial.local_addr, "device": dial.device}
        # A drain (or a close) may have closed the handshake path: dialling makes it again,
        # and it is closed once the recorded active path carries the connection.
        dialled_closed = not any(p.get("index", 0) == 0 for p in record.get("paths", []))
        paths = [dialled]
        for path in record.get("paths", []):
            if path.get("index", 0) == 0:
                continue
            try:
                added = await self.sup.ask(
                    AddPathRequest(conn.conn_id, path.get("local_addr"), path.get("device"))
                )
                assert isinstance(added, PathAddedReply)
                paths.append({**path, "path_id": added.path_id})  # this incarnation's path id
            except Exception as exc:
                log.warning("agent %s: re-adding path %s failed: %s", self.label, path, exc)
        record["paths"] = paths
        active = record.get("active", 0)
        active_addr: str | None = None
        try:
            target = next((p for p in record["paths"] if p.get("index") == active), None)
            if target is not None and target["path_id"] != 0:
                await self.sup.ask(ProbeRequest(conn.conn_id, target["path_id"]))
                await self.sup.ask(SwitchRequest(conn.conn_id, target["path_id"], "failover"))
                if dialled_closed:
                    await self.sup.ask(ClosePathRequest(conn.conn_id, 0))
                    record["paths"] = [p for p in record["paths"] if p.get("index", 0) != 0]
            snap = await self._snapshot(conn.conn_id)
            active_addr = next((p.local_addr for p in snap.paths if p.active), None)
        except Exception as exc:
            log.warning("agent %s: re-activating a path of %s failed: %s", self.label, stable, exc)
        self._save(stable)
        return Restored(
            stable, True, paths=len(record["paths"]), active=active_addr, time=time.time()
        )

    def _bind(self, stable: str, conn: Connection) -> None:
        self._live[stable] = conn.conn_id
        self._stable[conn.conn_id] = stable
        self._conns[conn.conn_id] = conn

    def _save(self, stable: str) -> None:
        if self.state is not None and stable in self._records:
            self.state.put(stable, self._records[stable])  # written behind the reply

    def _forget(self, stable: str) -> None:
        self._records.pop(stable, None)
        live = self._live.pop(stable, None)
        if live is not None:
            self._stable.pop(live, None)
            self._conns.pop(live, None)
        if self.state is not None:
            self.state.delete(stable)

    # ------------------------------------------------------------------ Ray methods

    async def ask(self, data: bytes) -> bytes:
        """Handle one request envelope; reply with a result envelope or an ``ErrorReply``."""
        return await self._dispatcher.answer_bytes(data)

    async def events_stream(self, cursor: int = 0, limit: int = 1000) -> AsyncIterator[bytes]:
        """Ray streaming generator: an ``EventBatch`` envelope whenever events follow ``cursor``.

        Call with ``.options(num_returns="streaming")``. Batches coalesce what piled up while
        the consumer was slow, and Ray's generator backpressure pauses this loop, so a slow
        reader costs the bounded log (``lost`` counts what fell out), never agent memory. Ends
        when the caller cancels the generator (``ray.cancel``) or the agent shuts down.
        """
        self._streams += 1
        try:
            await self._ready()
            while not self._closing:
                wake = self._appended  # taken before reading: an append after it sets it
                batch = await self._events(EventsRequest(cursor, limit))
                if batch.events or batch.lost:
                    cursor = batch.cursor
                    yield encode(batch)
                    continue
                await wake.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the consumer gets the typed error, not a Ray traceback
            yield encode_error(exc)
        finally:
            self._streams -= 1

    async def finished_spans(self) -> list[dict[str, Any]]:
        """Test hook (``capture_spans=True``): the spans this agent finished, as plain dicts."""
        if self._memory is None:
            return []
        out = []
        for span in self._memory.get_finished_spans():
            ctx = span.get_span_context()
            out.append(
                {
                    "name": span.name,
                    "trace_id": f"{ctx.trace_id:032x}",
                    "span_id": f"{ctx.span_id:016x}",
                    "parent_span_id": f"{span.parent.span_id:016x}" if span.parent else None,
                    "attributes": {k: v for k, v in (span.attributes or {}).items()},
                }
            )
        return out

    async def shutdown(self) -> None:
        """Close every listener and connection, end event streams and flush telemetry; the
        recorded state is kept."""
        if self._stop_task is None:
            self._stopping_now()
            await self.sup.close()
            self.providers.shutdown()
        else:  # an orderly stop ran (or runs): it closed everything
            with contextlib.suppress(Exception):
                await asyncio.shield(self._stop_task)
        await self._close_own()

    def _stopping_now(self) -> None:
        self._phase = "stopping"
        self._closing = True
        self._wake_streams()
        self._listeners.clear()  # the supervisor closes them

    async def _close_own(self) -> None:
        """What the agent itself runs: control socket, heartbeat, the desired state's writer,
        the exit hook."""
        control, self._control = self._control, None
        if control is not None:
            await control.close()
        if self.state is not None:
            left = await self.state.close(timeout=_STATE_FLUSH_TIMEOUT)
            if left:
                log.error("agent %s: %d desired-state change(s) not saved", self.label, left)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        hook = getattr(self, "_exit_hook", None)
        if hook is not None:
            atexit.unregister(hook)

    # ------------------------------------------------------------------ health and stop

    async def _health(self, _req: HealthRequest) -> Health:
        loop = asyncio.get_running_loop()
        tick_age = loop.time() - self._last_tick
        lag = max(self._lags, default=0.0)
        live = self._heartbeat is not None and not self._heartbeat.done()
        live = live and tick_age < _LIVE_TICK_AGE
        task = self._ready_task
        why = self._phase
        if self._stop_task is not None:
            why = "stopped" if self._stop_task.done() else "stopping"
        elif task is not None and task.done() and not task.cancelled() and task.exception():
            why = f"start failed: {task.exception()}"
        elif self._control_error is not None:
            why = self._control_error
        return Health(
            ready=why == "ready",
            live=live,
            why=why,
            loop_lag=lag,
            tick_age=tick_age,
            connections=len(self.sup.connections()) if why != "stopped" else 0,
            stopping=self._stop_task is not None,
        )

    async def _stop(self, req: StopRequest) -> StopReport:
        """The orderly stop (one per incarnation: a second request gets the first report,
        ``already=True``)."""
        deadline = duration("deadline", req.deadline, allow_zero=True)
        if self._stop_task is not None:
            report = await asyncio.shield(self._stop_task)
            return dataclasses.replace(report, already=True)
        self._stopping_now()  # not ready before anything else
        self._stop_task = asyncio.get_running_loop().create_task(self._stop_once(deadline))
        return await asyncio.shield(self._stop_task)

    async def _stop_once(self, deadline: float) -> StopReport:
        started = time.monotonic()
        if self._ready_task is not None and not self._ready_task.done():
            # A restore in progress finishes first (or the deadline runs out): shutting the
            # supervisor down under it would only fail its dials.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._ready_task), deadline)
        remaining = max(0.0, deadline - (time.monotonic() - started))
        report = await _shutdown(self.sup, remaining)
        self.providers.shutdown()
        report = dataclasses.replace(report, elapsed=time.monotonic() - started)
        log.warning(
            "agent %s stopped: %d connection(s) closed, %d stream(s) cut, %.3f s%s",
            self.label,
            report.connections,
            report.streams_cut,
            report.elapsed,
            " (deadline hit)" if report.deadline_hit else "",
        )
        return report

    async def _exit_stop(self) -> StopReport:
        try:
            return await self._stop(StopRequest(self.exit_deadline))
        finally:
            await self._close_own()

    # ------------------------------------------------------------------ dispatch

    async def _forward(self, msg: object) -> object:
        """A supervisor request, its conn id the live one behind the stable id clients hold."""
        conn_id = getattr(msg, "conn_id", None)
        if isinstance(conn_id, str):
            live = self._live.get(conn_id, conn_id)
            if live != conn_id:
                msg = dataclasses.replace(msg, conn_id=live)  # type: ignore[type-var]
        if isinstance(msg, AddPathRequest) and msg.socket_key is not None:
            raise ValueError("sock= cannot cross processes: pass local_addr or device instead")
        if isinstance(conn_id, str) and self.sup.inbound_snapshot(conn_id) is not None:
            raise _errors.MigrationNotSupportedError("inbound", conn_id=conn_id)
        reply = await self.sup.ask(msg)
        self._record(msg, reply)
        return self._outward(reply)

    def _handlers(self) -> dict[type, Callable[[Any], Any]]:
        return {
            DialRequest: self._dial,
            SnapshotRequest: self._snapshot_request,
            CloseConnectionRequest: self._close,
            InfoRequest: self._info,
            DrainRequest: self._drain,
            EventsRequest: self._events,
            EchoStart: self._echo_start,
            EchoWait: self._echo_wait,
            ListenRequest: self._listen,
            ListenersRequest: self._listeners_request,
            CloseListenerRequest: self._close_listener,
            MetricsRequest: self._metrics,
            NetworkStatusRequest: self._network_status,
            HealthRequest: self._health,
            StopRequest: self._stop,
        }

    def _outward(self, reply: object) -> object:
        """Conn ids as clients know them (stable across the agent's restarts)."""
        if isinstance(reply, ConnectionSnapshot):
            return dataclasses.replace(
                reply, conn_id=self._stable.get(reply.conn_id, reply.conn_id)
            )
        if isinstance(reply, (PathAddedReply, SwitchReply)):
            outward = self._outward(reply.snapshot)
            assert isinstance(outward, ConnectionSnapshot)
            return dataclasses.replace(reply, snapshot=outward)
        if isinstance(reply, tuple):
            return tuple(self._outward(s) for s in reply)
        return reply

    async def _snapshot(self, live: str) -> ConnectionSnapshot:
        snap = await self.sup.ask(SnapshotRequest(live))
        assert isinstance(snap, ConnectionSnapshot)
        return snap

    def _record(self, msg: object, reply: object) -> None:
        """Keep the desired state in step with a request that succeeded."""
        conn_id = getattr(msg, "conn_id", None)
        stable = self._stable.get(conn_id) if isinstance(conn_id, str) else None
        if stable is None or stable not in self._records:
            return
        record = self._records[stable]
        if isinstance(msg, AddPathRequest) and isinstance(reply, PathAddedReply):
            index = max(p.get("index", 0) for p in record["paths"]) + 1
            record["paths"].append(
                {
                    "path_id": reply.path_id,
                    "index": index,
                    "local_addr": msg.local_addr,
                    "device": msg.device,
                }
            )
        elif isinstance(msg, SwitchRequest):
            for p in record["paths"]:
                if p["path_id"] == msg.path_id:
                    record["active"] = p["index"]
        elif isinstance(msg, ClosePathRequest):
            record["paths"] = [p for p in record["paths"] if p["path_id"] != msg.path_id]
        else:
            return
        self._save(stable)

    # ------------------------------------------------------------------ handlers

    async def _dial(self, req: DialRequest) -> ConnectionSnapshot:
        if req.socket_key is not None:
            raise ValueError("sock= cannot cross processes: pass local_addr or device instead")
        # The public API (not a bare ask) so the agent holds the Connection and its streams.
        conn = await self.sup.dial(req.remote, **dial_options(req))
        self._bind(conn.conn_id, conn)
        self._records[conn.conn_id] = {
            "dial": {
                f.name: list(v) if isinstance(v := getattr(req, f.name), tuple) else v
                for f in dataclasses.fields(req)
            },
            "paths": [
                {"path_id": 0, "index": 0, "local_addr": req.local_addr, "device": req.device}
            ],
            "active": 0,
        }
        self._save(conn.conn_id)
        return await self._snapshot(conn.conn_id)

    async def _snapshot_request(self, req: SnapshotRequest) -> object:
        """As the control socket answers it: the connections this agent dialled, then the ones
        its listeners accepted (``inbound=True``, the peer's current address)."""
        if req.conn_id is None:
            outbound = self._outward(await self.sup.ask(req))
            assert isinstance(outbound, tuple)
            return (*outbound, *self.sup.inbound_connections())
        inbound = self.sup.inbound_snapshot(req.conn_id)
        if inbound is not None:
            return inbound
        reply = await self.sup.ask(SnapshotRequest(self._live.get(req.conn_id, req.conn_id)))
        return self._outward(reply)

    async def _close(self, req: CloseConnectionRequest) -> None:
        live = self._live.get(req.conn_id, req.conn_id)
        await self.sup.ask(dataclasses.replace(req, conn_id=live))
        self._forget(self._stable.get(live, req.conn_id))

    async def _info(self, _req: InfoRequest) -> AgentInfo:
        import ray

        return AgentInfo(
            label=self.label,
            node_id=ray.get_runtime_context().get_node_id(),
            hostname=socket.gethostname(),
            pid=os.getpid(),
            migration_enabled=self.sup.migration_enabled,
            connections=len(self.sup.connections()),
            started=self.started,
            restored=tuple(self._restored),
            listeners=len(self._listeners),
            event_streams=self._streams,
        )

    async def _events(self, req: EventsRequest) -> EventBatch:
        first = self._log[0][0] if self._log else self._next_seq
        cursor = max(req.cursor, 0)
        lost = max(0, first - cursor)
        picked = [e for seq, e in self._log if seq >= cursor][: max(req.limit, 0)]
        return EventBatch(cursor=max(cursor, first) + len(picked), events=tuple(picked), lost=lost)

    async def _drain(self, req: DrainRequest) -> DrainReport:
        """The node's part of a fleet drain: the core drain, reported with stable conn ids.

        The desired state follows what the drain did (the new active path, the drained path
        closed unless ``close_drained`` is False), so a restarted agent restores exactly what
        the connection has.
        """
        report = await drain(
            self.sup,
            local_addr=req.local_addr,
            device=req.device,
            probe_timeout=req.probe_timeout,
            close_drained=req.close_drained,
        )
        outcomes = []
        for outcome in report.outcomes:
            if outcome.result == "moved" and outcome.to_path_id is not None:
                self._record(SwitchRequest(outcome.conn_id, outcome.to_path_id, "drain"), None)
            if outcome.closed_drained and outcome.from_path_id is not None:
                self._record(ClosePathRequest(outcome.conn_id, outcome.from_path_id), None)
            stable = self._stable.get(outcome.conn_id, outcome.conn_id)
            outcomes.append(dataclasses.replace(outcome, conn_id=stable))
        return dataclasses.replace(report, outcomes=tuple(outcomes))

    async def _listen(self, req: ListenRequest) -> ListenerInfo:
        if req.handler is not None and req.handler not in LISTEN_HANDLERS:
            raise ValueError(
                f"handler {req.handler!r} is not a built-in stream handler: a remote listener "
                f"takes one of {', '.join(map(repr, LISTEN_HANDLERS))} or None"
            )
        certfile, keyfile = req.certfile, req.keyfile
        if certfile is None:  # as `serve` without --cert: a self-signed one, in the agent
            certfile, keyfile = await asyncio.to_thread(_self_signed_cert)
        listener = await self.sup.listen(
            req.addr,
            certfile=certfile,
            keyfile=keyfile,
            alpn_protocols=list(req.alpn_protocols) if req.alpn_protocols else None,
            handler=echo_handler if req.handler == "echo" else None,
        )
        listener_id = next(self._listener_ids)
        self._listeners[listener_id] = listener
        return self._listener_info(listener_id, listener)

    def _listener_info(self, listener_id: int, listener: Listener) -> ListenerInfo:
        from supervisor.addresses import sockaddr_to_multiaddr

        peers = sorted(
            {
                str(sockaddr_to_multiaddr(addr))
                for conn in listener.connections.values()
                for addr in conn.peer_addresses
            }
        )
        return ListenerInfo(
            listener_id,
            str(listener.multiaddr),
            "echo" if listener.handler is echo_handler else None,
            len(listener.connections),
            tuple(peers),
        )

    async def _listeners_request(self, _req: ListenersRequest) -> Listeners:
        return Listeners(tuple(self._listener_info(i, lst) for i, lst in self._listeners.items()))

    async def _close_listener(self, req: CloseListenerRequest) -> None:
        listener = self._listeners.pop(req.listener_id, None)
        if listener is None:
            raise KeyError(f"no listener {req.listener_id} on agent {self.label!r}")
        await listener.close()
        with contextlib.suppress(ValueError):
            self.sup._listeners.remove(listener)

    async def _metrics(self, _req: MetricsRequest) -> AgentMetrics:
        snaps = await self.sup.ask(SnapshotRequest(None))
        assert isinstance(snaps, tuple)
        by_state: dict[str, int] = {}
        paths: list[PathMetrics] = []
        for snap in snaps:
            stable = self._stable.get(snap.conn_id, snap.conn_id)
            for p in snap.paths:
                if not snap.closed:
                    by_state[str(p.state)] = by_state.get(str(p.state), 0) + 1
                paths.append(
                    PathMetrics(
                        stable,
                        p.path_id,
                        p.local_addr,
                        str(p.state),
                        p.active,
                        p.rtt,
                        p.bytes_sent,
                        p.bytes_received,
                    )
                )
        counters = _read_counters(self._reader)
        stats = await self.sup.ask(StatsRequest())
        assert isinstance(stats, MigrationStats)
        return AgentMetrics(
            label=self.label,
            since=self.started,
            connections=sum(1 for s in snaps if not s.closed),
            paths_by_state=by_state,
            migrations=counters.migrations,
            rollbacks=counters.rollbacks,
            probe_failures=counters.probe_failures,
            probe_rtt=counters.probe_rtt,
            paths=tuple(paths),
            migration_stats=stats,
        )

    async def _network_status(self, _req: NetworkStatusRequest) -> NetworkStatus:
        """For ``fleet network``: the node's monitor, or why it does not run."""
        return await self.sup.network_status()

    # ------------------------------------------------------------------ diagnostics

    async def _echo_start(self, req: EchoStart) -> EchoReport:
        live = self._live.get(req.conn_id, req.conn_id)
        conn = self._conns.get(live)
        if conn is None:
            raise _errors.ConnectionClosedError(req.conn_id)
        if req.nbytes < 0 or req.chunk <= 0:
            raise ValueError("nbytes must be >= 0 and chunk > 0")
        job = next(self._echo_ids)
        state = self._echo[job] = _Echo()
        stream = await conn.open_stream()

        async def writer(digest: Any) -> None:
            seed = os.urandom(16)
            block = 0
            while state.sent < req.nbytes:
                data = hashlib.shake_256(seed + block.to_bytes(8, "big")).digest(
                    min(req.chunk, req.nbytes - state.sent)
                )
                digest.update(data)
                await stream.write(data)
                state.sent += len(data)
                block += 1
                if req.pace:
                    await asyncio.sleep(req.pace)
            await stream.close()

        async def run() -> None:
            sent_digest = hashlib.sha256()
            got_digest = hashlib.sha256()
            w = asyncio.ensure_future(writer(sent_digest))
            while True:
                data = await stream.read(65536)
                if not data:
                    break
                got_digest.update(data)
                state.received += len(data)
            await w
            state.intact = (
                state.received == state.sent and got_digest.digest() == sent_digest.digest()
            )

        state.task = asyncio.get_running_loop().create_task(run())
        return EchoReport(job, 0, 0, False, False)

    async def _echo_wait(self, req: EchoWait) -> EchoReport:
        state = self._echo.get(req.job)
        if state is None or state.task is None:
            raise KeyError(f"no echo job {req.job}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(state.task), req.timeout)
        done = state.task.done()
        if done and state.task.exception() is not None:
            raise state.task.exception()  # type: ignore[misc]
        return EchoReport(req.job, state.sent, state.received, state.intact, done)


# -- the stop at process exit ----------------------------------------------------------------------


async def _shutdown(sup: Supervisor, deadline: float) -> StopReport:
    """``Supervisor.shutdown(deadline)`` as the wire's :class:`StopReport`."""
    report = await sup.shutdown(deadline)
    return StopReport(
        connections=report.connections,
        streams_cut=int(report.streams_cut),
        elapsed=float(report.elapsed),
        deadline_hit=bool(report.deadline_hit),
    )


def _exit_hook(ref: weakref.ref[SupervisorAgent]) -> None:
    agent = ref()
    if agent is not None:
        _stop_at_exit(agent)


def _stop_at_exit(agent: SupervisorAgent) -> None:
    """Run the orderly stop while the worker process exits (an ``atexit`` hook).

    Why here: Ray's worker turns SIGTERM into ``SystemExit`` on its main thread (its own
    handler, installed before the actor exists; an async actor's constructor runs on the
    loop's thread, where ``signal.signal`` is refused), and by the time ``atexit`` runs it
    has stopped the actor's event loop, without closing it. The loop still holds every
    socket and task, so it is run once more, here on the main thread, until the stop is done
    or ``exit_deadline`` (plus a margin) has passed. The same runs on any other exit that
    runs ``atexit`` (``ray.actor.exit_actor``); ``ray.kill`` (SIGKILL) runs nothing.
    """
    loop = agent._loop
    if loop is None or loop.is_closed():
        return
    if agent._stop_task is not None and agent._stop_task.done() and agent._control is None:
        return
    limit = agent.exit_deadline + 5.0
    coro = agent._exit_stop()
    try:
        here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        here = None
    try:
        if here is loop:  # cannot wait here for the loop this thread runs
            coro.close()
        elif not loop.is_running():
            loop.run_until_complete(asyncio.wait_for(coro, limit))
        else:  # another thread still runs it
            asyncio.run_coroutine_threadsafe(coro, loop).result(limit)
    except BaseException:
        log.exception("agent %s: the stop at exit failed", agent.label)
