"""Programs drive a fleet of per-node supervisors through Ray: handles, lookup, fleet-wide drain.

    fleet = connect(address="auto", namespace="quic-supervisor")
    for sup in fleet.list_supervisors():            # RemoteSupervisor, one per node
        print(sup.label, await sup.snapshot())
    sup = fleet.get_supervisor(node_id)
    conn = await sup.dial("/ip4/10.0.0.5/udp/4433/quic-v1", alpn_protocols=["echo"])
    mc = conn.as_migratable()                       # the same MigratableConn/Path handles
    path = await mc.add_path(device="net1"); await path.probe(); await path.switch()
    reports = await fleet.drain(device="net1")      # {label: DrainReport | exception}
    lst = await sup.listen("/ip4/0.0.0.0/udp/4433/quic-v1", certfile=..., handler="echo")
    print(await sup.metrics())                      # counters and bytes per path
    print(await sup.network_status())               # interfaces, routes (network=True agents)
    async with sup.events() as stream:              # pushed by a Ray streaming generator
        async for evt in stream: ...

A :class:`RayTransport` is the handles' ``Client``: it encodes each request into an envelope
(with the caller's trace context), calls the agent's ``ask`` through Ray and turns the reply
back into a snapshot or into the typed exception the agent raised. Snapshots are cached (no
live view across processes), sockets cannot be handed over (``sock=``), and streams stay in the
agent's process. Failures of the fleet itself are :class:`FleetError` subclasses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Sequence
from typing import Any, Unpack

from multiaddr import Multiaddr

from actors.envelope import EnvelopeError, decode, encode
from actors.lifecycle import Closing
from actors.streams import Stream
from supervisor.core.dialing import DialOptions, dial_request
from supervisor.core.handles import Connection
from supervisor.core.messages import ConnectionSnapshot, SnapshotRequest, expect
from supervisor.orchestration.drain import DrainReport
from supervisor.orchestration.network.monitor import NetworkStatus, NetworkStatusRequest
from supervisor.remote.protocol import (
    DrainRequest,
    ErrorReply,
    RemoteError,
    rebuild_error,
    reply_body,
)
from supervisor.remote.ray_agent import (
    AGENT_NAME_PREFIX,
    DEFAULT_NAMESPACE,
    AgentInfo,
    AgentMetrics,
    CloseListenerRequest,
    EchoReport,
    EchoStart,
    EchoWait,
    EventBatch,
    EventsRequest,
    InfoRequest,
    ListenerInfo,
    Listeners,
    ListenersRequest,
    ListenRequest,
    MetricsRequest,
    SupervisorAgent,
    agent_name,
)
from telemetry.propagation import current_trace_fields

__all__ = [
    "EventStream",
    "Fleet",
    "FleetError",
    "HandlerNotRemoteError",
    "RayTransport",
    "RemoteConnection",
    "RemoteError",
    "RemoteListener",
    "RemoteSupervisor",
    "SocketNotTransferableError",
    "StreamsNotRemoteError",
    "SupervisorNotFoundError",
    "SupervisorUnavailableError",
    "connect",
]


class FleetError(Exception):
    """Base of the errors of the fleet itself (lookup, reachability), not of QUIC."""


class SupervisorNotFoundError(FleetError, LookupError):
    """No agent of that name in that namespace: not started, or started in another namespace."""

    def __init__(self, label: str, namespace: str, known: Sequence[str] = ()) -> None:
        self.label = label
        self.namespace = namespace
        self.known = list(known)
        hint = (
            f"known: {', '.join(self.known)}"
            if self.known
            else "none is running: start one with `quic-supervisor agent` on each node"
        )
        super().__init__(
            f"no supervisor {agent_name(label)!r} in Ray namespace {namespace!r} ({hint})"
        )


class SupervisorUnavailableError(FleetError):
    """The agent's actor died (or is restarting) while handling the call."""

    def __init__(self, name: str, namespace: str, cause: str) -> None:
        self.name = name
        self.namespace = namespace
        first = cause.strip().splitlines()[0] if cause.strip() else "no detail"
        super().__init__(
            f"supervisor {name!r} (namespace {namespace!r}) is unavailable: {first}; if it "
            "has max_restarts it is coming back: retry, its connections are re-dialled"
        )


class SocketNotTransferableError(FleetError, TypeError):
    """``sock=`` was given to a remote supervisor: a socket cannot cross processes."""

    def __init__(self) -> None:
        super().__init__(
            "sock= cannot be used with a remote supervisor: a socket cannot cross processes; "
            "pass local_addr= or device= so the agent binds it on its own node"
        )


class StreamsNotRemoteError(FleetError):
    """Streams stay in the agent's process: data never crosses Ray."""

    def __init__(self) -> None:
        super().__init__(
            "streams of a remote connection live in the agent's process (datagrams never "
            "cross Ray): run the application next to the agent, or use a local Supervisor"
        )


class HandlerNotRemoteError(FleetError, TypeError):
    """A callable stream handler was given to a remote ``listen``: code cannot cross processes."""

    def __init__(self, handler: object) -> None:
        super().__init__(
            f"listen(handler={handler!r}): a remote listener runs in the agent's process, where "
            "a Python callable cannot be sent; pass handler='echo' (built in) or None, or run "
            "a local Supervisor next to your handler"
        )


class RayTransport:
    """The handles' ``Client`` over a Ray actor handle: envelopes in, envelopes out."""

    def __init__(
        self, handle: Any, *, name: str, namespace: str, timeout: float | None = None
    ) -> None:
        self.handle = handle
        self.name = name
        self.namespace = namespace
        self.timeout = timeout
        self._migration_enabled = True  # refreshed by every info()

    @property
    def migration_enabled(self) -> bool:
        return self._migration_enabled

    def live_snapshot(self, conn_id: str) -> ConnectionSnapshot | None:
        """Always None: handles use the snapshot of their last reply (read-your-writes)."""
        return None

    def register_socket(self, sock: Any) -> int:
        raise SocketNotTransferableError()

    async def call(self, data: bytes, timeout: float | None = None) -> bytes:
        """One raw envelope round trip; Ray failures become :class:`SupervisorUnavailableError`."""
        from ray.exceptions import RayActorError

        ref = self.handle.ask.remote(data)
        limit = timeout if timeout is not None else self.timeout
        try:
            reply = await (asyncio.wait_for(ref, limit) if limit is not None else ref)
        except RayActorError as exc:
            raise SupervisorUnavailableError(self.name, self.namespace, str(exc)) from exc
        if not isinstance(reply, bytes):
            raise EnvelopeError(
                f"supervisor {self.name!r} answered {type(reply).__name__}, not envelope bytes: "
                "it runs an incompatible quic-supervisor version"
            )
        return reply

    async def ask(self, msg: object, timeout: float | None = None) -> object:
        """Send ``msg`` with the current trace context; return the reply or raise its error."""
        reply = await self.call(encode(msg, **current_trace_fields()), timeout)
        return reply_body(decode(reply).body)

    def __repr__(self) -> str:
        return f"RayTransport({self.name!r}, namespace={self.namespace!r})"


class _AgentSide:
    """Stands in for the connection's data-plane port, which lives in the agent's process: the
    inherited handle code sees an open connection (the snapshot says otherwise), and streams
    fail clearly."""

    closed = False

    def open_stream(self) -> Stream:
        raise StreamsNotRemoteError()

    async def accept_stream(self) -> Stream:
        raise StreamsNotRemoteError()

    def check_open(self) -> None:
        raise StreamsNotRemoteError()


class RemoteConnection(Connection):
    """A connection owned by a remote agent: paths and migration, but no streams here."""

    def __init__(self, client: RayTransport, snap: ConnectionSnapshot) -> None:
        super().__init__(client, snap, _AgentSide())  # type: ignore[arg-type]

    @property
    def is_closed(self) -> bool:
        return self._snap.closed

    async def refresh(self) -> ConnectionSnapshot:
        """Fetch a fresh snapshot (changes made by failover, drain or other clients)."""
        return self._update(await self._client.ask(SnapshotRequest(self.conn_id)))


class RemoteListener:
    """A QUIC server running in an agent; ``multiaddr`` is its bound address."""

    def __init__(self, client: RayTransport, info: ListenerInfo) -> None:
        self._client = client
        self.info = info

    @property
    def listener_id(self) -> int:
        return self.info.listener_id

    @property
    def multiaddr(self) -> Multiaddr:
        return Multiaddr(self.info.multiaddr)

    async def refresh(self) -> ListenerInfo:
        """Fetch the listener's current connections and the client addresses they used."""
        reply = expect(await self._client.ask(ListenersRequest()), Listeners)
        for info in reply.listeners:
            if info.listener_id == self.listener_id:
                self.info = info
                return info
        raise KeyError(f"listener {self.listener_id} is closed")

    async def close(self) -> None:
        await self._client.ask(CloseListenerRequest(self.listener_id))

    def __repr__(self) -> str:
        return f"RemoteListener({self.info.multiaddr!r}, handler={self.info.handler!r})"


class EventStream(Closing):
    """Events of one agent as they happen, from its ``events_stream`` Ray streaming generator.

    ``async for evt in stream`` yields events (``types`` filters by class) from ``cursor`` on;
    ``cursor`` is then where to resume and ``lost`` counts events the agent's bounded log
    dropped before they were sent. ``aclose()`` (or leaving ``async with``) cancels the remote
    generator and waits until it has ended, so nothing keeps running in the agent; a consumer
    cancelled while waiting cancels it too. A dead agent raises
    :class:`SupervisorUnavailableError`.
    """

    def __init__(
        self,
        sup: RemoteSupervisor,
        *,
        cursor: int,
        limit: int,
        types: tuple[type, ...],
        backpressure: int,
    ) -> None:
        self._sup = sup
        self.cursor = cursor
        self.lost = 0
        self._types = types
        self._pending: deque[Any] = deque()
        self._closed = False
        # Backpressure: at most this many unread batches wait in Ray's object store; beyond it
        # the agent's generator pauses (and its bounded log drops the oldest events).
        self._gen = sup.handle.events_stream.options(
            num_returns="streaming", _generator_backpressure_num_objects=backpressure
        ).remote(cursor, limit)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Any:
        while not self._pending:
            if self._closed:
                raise StopAsyncIteration
            try:
                batch = await self._next_batch()
            except asyncio.CancelledError:
                self._cancel_remote()  # the consumer is gone: stop the agent's generator
                raise
            if batch is None:
                self._closed = True
                raise StopAsyncIteration
            self.cursor = batch.cursor
            self.lost += batch.lost
            self._pending.extend(
                e for e in batch.events if not self._types or isinstance(e, self._types)
            )
        return self._pending.popleft()

    async def _next_batch(self) -> EventBatch | None:
        from ray.exceptions import RayActorError

        try:
            ref = await self._gen.__anext__()
            data = await ref
        except StopAsyncIteration:
            return None
        except RayActorError as exc:
            self._closed = True
            raise SupervisorUnavailableError(self._sup.name, self._sup.namespace, str(exc)) from exc
        body = decode(data).body
        if isinstance(body, ErrorReply):
            self._closed = True
            raise rebuild_error(body)
        if not isinstance(body, EventBatch):
            raise EnvelopeError(f"events_stream sent {type(body).__name__}, not an EventBatch")
        return body

    def _cancel_remote(self) -> None:
        import ray

        self._closed = True
        ray.cancel(self._gen)

    def __del__(self) -> None:
        # Ray keeps a generator running when its ref is dropped: a forgotten stream would
        # hold a slot in the agent forever. Best effort (Ray may be shut down already).
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):
                self._cancel_remote()

    async def close(self, timeout: float = 10.0) -> None:
        """Cancel the agent's generator and wait (up to ``timeout``) until it has ended."""
        self._cancel_remote()
        self._pending.clear()

        async def drain() -> None:
            while True:
                try:
                    ref = await self._gen.__anext__()
                except StopAsyncIteration:
                    return
                except Exception:  # the agent died: nothing is left running there
                    return
                try:
                    await ref
                except Exception:  # TaskCancelledError: the generator's last word
                    continue

        await asyncio.wait_for(drain(), timeout)

    aclose = close  # the name async iterators close by


class RemoteSupervisor(RayTransport):
    """One node's agent: the local ``Supervisor`` API (dial, snapshots) plus fleet operations."""

    def __init__(
        self, handle: Any, *, label: str, namespace: str, timeout: float | None = None
    ) -> None:
        super().__init__(handle, name=agent_name(label), namespace=namespace, timeout=timeout)
        self.label = label

    async def info(self) -> AgentInfo:
        info = expect(await self.ask(InfoRequest()), AgentInfo)
        self._migration_enabled = info.migration_enabled
        return info

    async def dial(self, addr: str | Multiaddr, **options: Unpack[DialOptions]) -> RemoteConnection:
        """Dial from the agent's node (keywords: :class:`~supervisor.core.dialing.DialOptions`;
        ``cafile`` is a path on that node, ``sock`` cannot cross processes)."""
        if options.get("sock") is not None:
            raise SocketNotTransferableError()
        snap = expect(
            await self.ask(dial_request(addr, options, files_here=False)), ConnectionSnapshot
        )
        return RemoteConnection(self, snap)

    async def listen(
        self,
        addr: str | Multiaddr,
        *,
        certfile: str | os.PathLike[str],
        keyfile: str | os.PathLike[str] | None = None,
        alpn_protocols: list[str] | None = None,
        handler: str | None = "echo",
    ) -> RemoteListener:
        """Serve QUIC from the agent's node (files are paths on that node).

        ``handler`` names a built-in stream handler, since a callable cannot cross processes:
        ``"echo"`` sends every byte back; ``None`` accepts connections and leaves their streams
        unread (flow control then stops the peer). Listeners are not re-created on restart.
        """
        if handler is not None and not isinstance(handler, str):
            raise HandlerNotRemoteError(handler)
        info = await self.ask(
            ListenRequest(
                addr=str(addr),
                certfile=os.fspath(certfile),
                keyfile=os.fspath(keyfile) if keyfile is not None else None,
                alpn_protocols=tuple(alpn_protocols) if alpn_protocols else None,
                handler=handler,
            )
        )
        assert isinstance(info, ListenerInfo)
        return RemoteListener(self, info)

    async def listeners(self) -> list[RemoteListener]:
        reply = expect(await self.ask(ListenersRequest()), Listeners)
        return [RemoteListener(self, info) for info in reply.listeners]

    async def metrics(self) -> AgentMetrics:
        """Counters of this agent: connections, paths by state, migrations by reason and
        result, rollbacks, probe RTT summary, bytes per path."""
        reply = expect(await self.ask(MetricsRequest()), AgentMetrics)
        return reply

    async def network_status(self) -> NetworkStatus:
        """What the agent's NetworkMonitor knows (interfaces, routes, reactions), or, with
        ``available`` False, why it does not run (agents start it with ``network=True``)."""
        reply = expect(await self.ask(NetworkStatusRequest()), NetworkStatus)
        return reply

    async def snapshot(self) -> list[ConnectionSnapshot]:
        snaps = expect(await self.ask(SnapshotRequest(None)), tuple)
        return list(snaps)

    async def connections(self) -> list[RemoteConnection]:
        return [RemoteConnection(self, s) for s in await self.snapshot()]

    async def connection(self, conn_id: str) -> RemoteConnection:
        snap = expect(await self.ask(SnapshotRequest(conn_id)), ConnectionSnapshot)
        return RemoteConnection(self, snap)

    async def drain(
        self,
        *,
        device: str | None = None,
        local_addr: str | None = None,
        probe_timeout: float = 5.0,
    ) -> DrainReport:
        report = await self.ask(
            DrainRequest(local_addr, device, probe_timeout, close_drained=False)
        )
        assert isinstance(report, DrainReport)
        return report

    def events(
        self,
        *types: type,
        cursor: int = 0,
        limit: int = 1000,
        backpressure: int = 16,
    ) -> EventStream:
        """Events as they happen (``types``: only these classes), from ``cursor`` on.

        ``cursor=0`` starts with whatever the agent's log still holds, so nothing that
        happened after this call can be missed; use it with ``async with`` (see
        :class:`EventStream`).
        """
        return EventStream(self, cursor=cursor, limit=limit, types=types, backpressure=backpressure)

    async def events_since(self, cursor: int = 0, limit: int = 1000) -> EventBatch:
        """One batch of events since ``cursor`` (pass the batch's ``cursor`` next time)."""
        batch = expect(await self.ask(EventsRequest(cursor, limit)), EventBatch)
        return batch

    async def echo(
        self, conn_id: str, nbytes: int, *, chunk: int = 16384, pace: float = 0.0
    ) -> int:
        """Start a checksummed echo transfer on the agent; returns a job id for ``echo_wait``."""
        rep = expect(await self.ask(EchoStart(conn_id, nbytes, chunk, pace)), EchoReport)
        return rep.job

    async def echo_wait(self, job: int, timeout: float = 60.0) -> EchoReport:
        rep = expect(await self.ask(EchoWait(job, timeout)), EchoReport)
        return rep

    async def finished_spans(self) -> list[dict[str, Any]]:
        """Spans the agent kept in memory (only when started with ``capture_spans=True``)."""
        from ray.exceptions import RayActorError

        try:
            spans: list[dict[str, Any]] = await self.handle.finished_spans.remote()
        except RayActorError as exc:
            raise SupervisorUnavailableError(self.name, self.namespace, str(exc)) from exc
        return spans

    def kill(self, *, no_restart: bool = True) -> None:
        """Kill the agent's process; with ``no_restart=False`` Ray restarts it (max_restarts)."""
        import ray

        ray.kill(self.handle, no_restart=no_restart)

    def __repr__(self) -> str:
        return f"RemoteSupervisor({self.label!r}, namespace={self.namespace!r})"


class Fleet:
    """The agents of one Ray namespace."""

    def __init__(self, namespace: str = DEFAULT_NAMESPACE, *, timeout: float | None = None) -> None:
        self.namespace = namespace
        self.timeout = timeout

    def labels(self) -> list[str]:
        """Labels (node ids, normally) of the agents registered in this namespace."""
        import ray

        names = ray.util.list_named_actors(all_namespaces=True)
        return sorted(
            str(n["name"]).removeprefix(AGENT_NAME_PREFIX)
            for n in names
            if isinstance(n, dict)
            and n.get("namespace") == self.namespace
            and str(n.get("name", "")).startswith(AGENT_NAME_PREFIX)
        )

    def get_supervisor(self, node_id: str) -> RemoteSupervisor:
        """The agent of ``node_id`` (or of a label given to :meth:`start_agent`)."""
        import ray

        try:
            handle = ray.get_actor(agent_name(node_id), namespace=self.namespace)
        except ValueError:
            raise SupervisorNotFoundError(node_id, self.namespace, self.labels()) from None
        return RemoteSupervisor(
            handle, label=node_id, namespace=self.namespace, timeout=self.timeout
        )

    def list_supervisors(self) -> list[RemoteSupervisor]:
        out = []
        for label in self.labels():
            try:
                out.append(self.get_supervisor(label))
            except SupervisorNotFoundError:
                continue  # died between the listing and the lookup
        return out

    def start_agent(
        self,
        node_id: str | None = None,
        *,
        label: str | None = None,
        max_restarts: int = -1,
        enable_migration: bool = True,
        capture_spans: bool = False,
        persist: bool = True,
        env: dict[str, str] | None = None,
        network: bool = False,
    ) -> RemoteSupervisor:
        """Start (or find: ``get_if_exists``) the detached agent pinned to ``node_id``.

        ``node_id`` defaults to the caller's node; ``label`` (default: the node id) names it,
        so tests can run two agents on one node. ``env`` adds variables to the agent's
        process (e.g. ``OTEL_*``); by default it inherits the node's. ``network``: run the
        NetworkMonitor and its reactions (``NetworkPolicy()``) in the agent.
        """
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = node_id or ray.get_runtime_context().get_node_id()
        name = label or node
        options: dict[str, Any] = {
            "name": agent_name(name),
            "namespace": self.namespace,
            "lifetime": "detached",
            "get_if_exists": True,
            "max_restarts": max_restarts,
            "max_task_retries": 0,  # a request is not replayed on a new incarnation
            "num_cpus": 0,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False),
        }
        env = dict(env or {})
        if network:
            # pyroute2 opens its netlink socket with create_datagram_endpoint, which uvloop
            # (Ray's loop for async actors) refuses for AF_NETLINK: asyncio's own loop.
            env.setdefault("RAY_USE_UVLOOP", "0")
        if env:
            options["runtime_env"] = {"env_vars": env}
        handle = (
            ray.remote(SupervisorAgent)
            .options(**options)
            .remote(
                name,
                namespace=self.namespace,
                enable_migration=enable_migration,
                capture_spans=capture_spans,
                persist=persist,
                network=network,
            )
        )
        return RemoteSupervisor(handle, label=name, namespace=self.namespace, timeout=self.timeout)

    async def drain(
        self,
        *,
        device: str | None = None,
        local_addr: str | None = None,
        probe_timeout: float = 5.0,
    ) -> dict[str, DrainReport | BaseException]:
        """Drain every agent in parallel; one report (or the error it met) per label."""
        if (device is None) == (local_addr is None):
            raise ValueError("drain needs exactly one of device= or local_addr=")
        sups = self.list_supervisors()
        results = await asyncio.gather(
            *(
                s.drain(device=device, local_addr=local_addr, probe_timeout=probe_timeout)
                for s in sups
            ),
            return_exceptions=True,
        )
        return {s.label: r for s, r in zip(sups, results, strict=True)}

    async def network_status(self) -> dict[str, NetworkStatus | BaseException]:
        """Every agent's network monitor status (or the error it met), by label."""
        sups = self.list_supervisors()
        results = await asyncio.gather(*(s.network_status() for s in sups), return_exceptions=True)
        return {s.label: r for s, r in zip(sups, results, strict=True)}

    async def snapshots(self) -> dict[str, list[ConnectionSnapshot] | BaseException]:
        """Every connection and path in the fleet, by label."""
        sups = self.list_supervisors()
        results = await asyncio.gather(*(s.snapshot() for s in sups), return_exceptions=True)
        return {s.label: r for s, r in zip(sups, results, strict=True)}


def connect(
    address: str | None = "auto",
    namespace: str = DEFAULT_NAMESPACE,
    *,
    timeout: float | None = None,
    **init_kwargs: Any,
) -> Fleet:
    """Join the Ray cluster at ``address`` (unless already joined) and return its fleet.

    ``address="auto"`` finds the local node's cluster (``RAY_ADDRESS`` wins when set); token
    authentication is Ray's own (``RAY_AUTH_TOKEN`` / the token file, see k8s/README).
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS", address) if address == "auto" else address,
            namespace=namespace,
            logging_level=logging.WARNING,
            **init_kwargs,
        )
    return Fleet(namespace, timeout=timeout)
