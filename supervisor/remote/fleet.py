"""Programs drive a fleet of per-node supervisors through Ray: handles, lookup, fleet-wide drain.

    fleet = connect(address="auto", namespace="quic-supervisor")
    for sup in fleet.list_supervisors():            # RemoteSupervisor, one per node
        print(sup.label, await sup.snapshot())
    sup = fleet.get_supervisor(node_id)
    conn = await sup.dial("/ip4/10.0.0.5/udp/4433/quic-v1", alpn_protocols=["echo"])
    mc = conn.as_migratable()                       # the same MigratableConn/Path handles
    path = await mc.add_path(device="net1"); await path.probe(); await path.switch()
    reports = await fleet.drain(device="net1")      # {label: DrainReport | exception}
    snap = await sup.migrate(conn.conn_id, "/ip4/10.0.1.5/udp/0/quic-v1")  # as ControlClient
    lst = await sup.listen("/ip4/0.0.0.0/udp/4433/quic-v1", certfile=..., handler="echo")
    print(await sup.metrics())                      # counters and bytes per path
    print(await sup.network_status())               # interfaces, routes (network=True agents)
    async with sup.events() as stream:              # pushed by a Ray streaming generator
        async for evt in stream: ...

A :class:`RayTransport` is the handles' ``Client``: it encodes each request into an envelope
(with the caller's trace context), calls the agent's ``ask`` through Ray and turns the reply
back into a snapshot or into the typed exception the agent raised. Snapshots are cached (no
live view across processes), sockets cannot be handed over (``sock=``), and streams stay in the
agent's process. Failures of the fleet itself are :class:`FleetError` subclasses; with a
``timeout``, :func:`connect` and every call return within it (:class:`FleetUnreachableError`,
:class:`SupervisorTimeoutError`) instead of waiting on Ray's own retries. Whatever Ray raises
(``ActorUnschedulableError``, ``ActorDiedError`` ...), a call on an agent whose node has left the
cluster fails at once with :class:`SupervisorNodeLostError`; without a Ray connection every call
raises :class:`FleetDisconnectedError` and cleanup does nothing, since any Ray call would start a
new local cluster by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Unpack

from multiaddr import Multiaddr

from actors.envelope import EnvelopeError, decode, encode
from actors.lifecycle import Closing
from actors.streams import Stream
from supervisor.core.dialing import DialOptions, dial_request
from supervisor.core.handles import Connection
from supervisor.core.messages import (
    ConnectionSnapshot,
    MigrationStats,
    SnapshotRequest,
    StatsRequest,
    expect,
)
from supervisor.core.validate import duration
from supervisor.orchestration.drain import DrainReport
from supervisor.orchestration.network.monitor import NetworkStatus, NetworkStatusRequest
from supervisor.remote.protocol import (
    DrainRequest,
    ErrorReply,
    Health,
    HealthRequest,
    RemoteError,
    StopReport,
    StopRequest,
    ask_migrate,
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
    "FleetDisconnectedError",
    "FleetError",
    "FleetUnreachableError",
    "HandlerNotRemoteError",
    "RayTransport",
    "RemoteConnection",
    "RemoteError",
    "RemoteListener",
    "RemoteSupervisor",
    "SocketNotTransferableError",
    "StreamsNotRemoteError",
    "SupervisorNodeLostError",
    "SupervisorNotFoundError",
    "SupervisorTimeoutError",
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


class SupervisorNodeLostError(SupervisorUnavailableError):
    """The agent's node has left the cluster: the agent cannot come back there, so every call
    on its handles fails at once (Ray's ``ActorUnschedulableError``, ``ActorDiedError``, a
    bounded wait on a node that is gone ...)."""

    def __init__(self, name: str, namespace: str, node_id: str, cause: str) -> None:
        FleetError.__init__(
            self,
            f"supervisor {name!r} (namespace {namespace!r}) is gone with its node {node_id}, "
            "which has left the Ray cluster: start an agent on a live node (`quic-supervisor "
            "agent` there; `quic-supervisor fleet ls` lists them) and dial its connections "
            "again from there",
        )
        self.name = name
        self.namespace = namespace
        self.node_id = node_id
        self.cause = cause


class FleetDisconnectedError(FleetError, ConnectionError):
    """This process is not connected to Ray (``ray.shutdown()``, or never ``connect()``ed): a
    call would otherwise make Ray start a new, empty local cluster by itself."""

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(
            f"cannot reach {what}: this process is not connected to Ray "
            "(ray.shutdown() was called, or connect() never was); a handle does not outlive "
            "its Ray session: connect() again and look the agent up with fleet.get_supervisor()"
        )


class SupervisorTimeoutError(FleetError, TimeoutError):
    """The agent did not answer within the handle's ``timeout``."""

    def __init__(self, name: str, namespace: str, timeout: float) -> None:
        self.name = name
        self.namespace = namespace
        self.timeout = timeout
        super().__init__(
            f"supervisor {name!r} (namespace {namespace!r}) did not answer within {timeout:g} s: "
            "raise the timeout (--timeout), or check the agent (`quic-supervisor fleet ls`)"
        )


class FleetUnreachableError(FleetError, ConnectionError):
    """No Ray cluster could be joined at that address within the timeout."""

    def __init__(self, address: str, reason: str, fix: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(f"cannot reach the Ray cluster at {address}: {reason}: {fix}")


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


def _ray_connected() -> bool:
    """Whether this process is connected to Ray, without ever starting it (every public Ray
    call on a handle, ``ray.kill`` and ``ray.cancel`` included, starts a local cluster when
    it is not)."""
    import ray

    return bool(ray.is_initialized())


def _node_alive(node_id: str) -> bool | None:
    """Whether the cluster lists ``node_id`` as alive; None: not known (no such node id, e.g.
    a label that is not one, or the GCS did not answer)."""
    import ray

    if not _ray_connected():
        return None
    try:
        nodes = ray.nodes()
    except Exception:  # the GCS is unreachable: nothing to conclude
        return None
    for node in nodes:
        if node.get("NodeID") == node_id:
            return bool(node.get("Alive"))
    return None


class RayTransport:
    """The handles' ``Client`` over a Ray actor handle: envelopes in, envelopes out."""

    def __init__(
        self,
        handle: Any,
        *,
        name: str,
        namespace: str,
        timeout: float | None = None,
        node_id: str | None = None,
    ) -> None:
        self.handle = handle
        self.name = name
        self.namespace = namespace
        self.timeout = timeout
        #: The node the agent is pinned to (from start_agent, the label, or its info()):
        #: how a failure is told apart from a restart (its node has left the cluster).
        self.node_id = node_id
        self._migration_enabled = True  # refreshed by every info()

    def _check_connected(self) -> None:
        if not _ray_connected():
            raise FleetDisconnectedError(f"supervisor {self.name!r}")

    async def _failure(self, exc: BaseException, limit: float | None = None) -> FleetError:
        """The fleet error a Ray failure of a call means: its node is gone
        (:class:`SupervisorNodeLostError`), the agent is down or restarting
        (:class:`SupervisorUnavailableError`), or it did not answer within ``limit``."""
        from ray.exceptions import ActorUnschedulableError

        cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        node = self.node_id
        if node is not None:
            alive = await asyncio.to_thread(_node_alive, node)
            if alive is False or (alive is None and isinstance(exc, ActorUnschedulableError)):
                return SupervisorNodeLostError(self.name, self.namespace, node, cause)
        elif isinstance(exc, ActorUnschedulableError):  # pinned to a node that is not there
            return SupervisorNodeLostError(self.name, self.namespace, "(unknown)", cause)
        if isinstance(exc, TimeoutError) and limit is not None:
            return SupervisorTimeoutError(self.name, self.namespace, limit)
        return SupervisorUnavailableError(self.name, self.namespace, cause)

    async def _remote(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """One Ray call of the agent's ``method``: every Ray failure becomes a fleet error, and
        without a Ray connection none is made (Ray would start a new cluster by itself)."""
        from ray.exceptions import GetTimeoutError, RayError

        self._check_connected()
        try:
            ref = getattr(self.handle, method).remote(*args)
            return await (asyncio.wait_for(ref, timeout) if timeout is not None else ref)
        except (RayError, TimeoutError, GetTimeoutError) as exc:
            raise await self._failure(exc, timeout) from exc

    @property
    def migration_enabled(self) -> bool:
        return self._migration_enabled

    def live_snapshot(self, conn_id: str) -> ConnectionSnapshot | None:
        """Always None: handles use the snapshot of their last reply (read-your-writes)."""
        return None

    def register_socket(self, sock: Any) -> int:
        raise SocketNotTransferableError()

    async def call(self, data: bytes, timeout: float | None = None) -> bytes:
        """One raw envelope round trip; Ray failures become :class:`FleetError` subclasses
        (:meth:`_failure`)."""
        limit = timeout if timeout is not None else self.timeout
        reply = await self._remote("ask", data, timeout=limit)
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
        sup._check_connected()
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
        from ray.exceptions import RayError

        if not _ray_connected():
            self._closed = True
            raise FleetDisconnectedError(f"supervisor {self._sup.name!r}")
        try:
            ref = await self._gen.__anext__()
            data = await ref
        except StopAsyncIteration:
            return None
        except RayError as exc:
            self._closed = True
            raise await self._sup._failure(exc) from exc
        body = decode(data).body
        if isinstance(body, ErrorReply):
            self._closed = True
            raise rebuild_error(body)
        if not isinstance(body, EventBatch):
            raise EnvelopeError(f"events_stream sent {type(body).__name__}, not an EventBatch")
        return body

    def _cancel_remote(self) -> bool:
        """Cancel the agent's generator; False (nothing done) without a Ray connection: after
        ``ray.shutdown()`` the generator is gone with the session, and ``ray.cancel`` would
        start a new local cluster by itself."""
        import ray

        self._closed = True
        if not _ray_connected():
            return False
        ray.cancel(self._gen)
        return True

    def __del__(self) -> None:
        # Ray keeps a generator running when its ref is dropped: a forgotten stream would
        # hold a slot in the agent forever. Best effort (Ray may be shut down already:
        # _cancel_remote then does nothing).
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):
                self._cancel_remote()

    async def close(self, timeout: float = 10.0) -> None:
        """Cancel the agent's generator and wait (up to ``timeout``) until it has ended."""
        self._pending.clear()
        if not self._cancel_remote():
            return

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
        self,
        handle: Any,
        *,
        label: str,
        namespace: str,
        timeout: float | None = None,
        node_id: str | None = None,
    ) -> None:
        super().__init__(
            handle, name=agent_name(label), namespace=namespace, timeout=timeout, node_id=node_id
        )
        self.label = label

    async def info(self) -> AgentInfo:
        info = expect(await self.ask(InfoRequest()), AgentInfo)
        self._migration_enabled = info.migration_enabled
        self.node_id = info.node_id
        return info

    async def dial(self, addr: str | Multiaddr, **options: Unpack[DialOptions]) -> RemoteConnection:
        """Dial from the agent's node (keywords: :class:`~supervisor.core.dialing.DialOptions`;
        ``cafile`` is a path on that node, ``sock`` cannot cross processes)."""
        if options.get("sock") is not None:
            raise SocketNotTransferableError()
        # The handshake's own deadline answers first (DialTimeoutError), not the Ray call's.
        handshake = options.get("timeout")
        limit = self.timeout
        if limit is not None and handshake is not None:
            limit = max(limit, float(handshake) + 5.0)
        snap = expect(
            await self.ask(dial_request(addr, options, files_here=False), limit),
            ConnectionSnapshot,
        )
        return RemoteConnection(self, snap)

    async def listen(
        self,
        addr: str | Multiaddr,
        *,
        certfile: str | os.PathLike[str] | None = None,
        keyfile: str | os.PathLike[str] | None = None,
        alpn_protocols: list[str] | None = None,
        handler: str | None = "echo",
    ) -> RemoteListener:
        """Serve QUIC from the agent's node (files are paths on that node; without
        ``certfile`` the agent makes a self-signed "localhost" certificate, as ``serve`` does).

        ``handler`` names a built-in stream handler, since a callable cannot cross processes:
        ``"echo"`` sends every byte back; ``None`` accepts connections and leaves their streams
        unread (flow control then stops the peer). Listeners are not re-created on restart.
        """
        if handler is not None and not isinstance(handler, str):
            raise HandlerNotRemoteError(handler)
        info = await self.ask(
            ListenRequest(
                addr=str(addr),
                certfile=os.fspath(certfile) if certfile is not None else None,
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

    async def migration_stats(self) -> MigrationStats:
        """How the agent's migrations ended (``Supervisor.migration_stats`` in the agent)."""
        reply = expect(await self.ask(StatsRequest()), MigrationStats)
        return reply

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

    async def health(self) -> Health:
        """The agent's readiness and liveness (``remote.Health``), answered even while it
        restores its connections."""
        return expect(await self.ask(HealthRequest()), Health)

    async def stop(self, deadline: float = 10.0) -> StopReport:
        """The agent's orderly stop: not ready at once, ``Supervisor.shutdown(deadline)`` in the
        agent (connections closed with CONNECTION_CLOSE by the deadline), the desired state
        kept. The agent's process keeps running (stopped) until Ray or the pod ends it."""
        deadline = duration("deadline", deadline, allow_zero=True)
        limit = None if self.timeout is None else self.timeout + deadline
        return expect(await self.ask(StopRequest(deadline), limit), StopReport)

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
        probe_timeout: float = 2.0,
        close_drained: bool = True,
    ) -> DrainReport:
        """``Supervisor.drain`` in the agent: the same defaults, the drained path closed unless
        ``close_drained=False`` (the agent's recorded state follows, for a restart)."""
        report = expect(
            await self.ask(DrainRequest(local_addr, device, probe_timeout, close_drained)),
            DrainReport,
        )
        return report

    async def migrate(
        self, conn_id: str, to_local_addr: str | Multiaddr, *, probe_timeout: float = 2.0
    ) -> ConnectionSnapshot:
        """Make the path on ``to_local_addr`` the active one (reason ``"manual"``), as
        ``ControlClient.migrate`` does (``protocol.migrate_to``)."""
        return await ask_migrate(self.ask, conn_id, to_local_addr, probe_timeout=probe_timeout)

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
        spans: list[dict[str, Any]] = await self._remote("finished_spans", timeout=self.timeout)
        return spans

    def kill(self, *, no_restart: bool = True) -> None:
        """Kill the agent's process; with ``no_restart=False`` Ray restarts it (max_restarts)."""
        import ray

        self._check_connected()
        ray.kill(self.handle, no_restart=no_restart)

    def __repr__(self) -> str:
        return f"RemoteSupervisor({self.label!r}, namespace={self.namespace!r})"


class Fleet:
    """The agents of one Ray namespace."""

    def __init__(self, namespace: str = DEFAULT_NAMESPACE, *, timeout: float | None = None) -> None:
        self.namespace = namespace
        self.timeout = timeout

    def _check_connected(self) -> None:
        if not _ray_connected():
            raise FleetDisconnectedError(f"the fleet of namespace {self.namespace!r}")

    def labels(self) -> list[str]:
        """Labels (node ids, normally) of the agents registered in this namespace."""
        import ray

        self._check_connected()
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

        self._check_connected()
        try:
            handle = ray.get_actor(agent_name(node_id), namespace=self.namespace)
        except ValueError:
            raise SupervisorNotFoundError(node_id, self.namespace, self.labels()) from None
        # A label is the node id unless start_agent was given another (then info() says).
        return RemoteSupervisor(
            handle, label=node_id, namespace=self.namespace, timeout=self.timeout, node_id=node_id
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
        control_socket: str | None = None,
        exit_deadline: float | None = None,
    ) -> RemoteSupervisor:
        """Start (or find: ``get_if_exists``) the detached agent pinned to ``node_id``.

        ``node_id`` defaults to the caller's node; ``label`` (default: the node id) names it,
        so tests can run two agents on one node. ``env`` adds variables to the agent's
        process (e.g. ``OTEL_*``); by default it inherits the node's. ``network``: run the
        NetworkMonitor and its reactions (``NetworkPolicy()``) in the agent.
        ``control_socket``: the agent also serves the Unix control socket there (kubelet's
        probes and preStop use it); ``exit_deadline``: seconds its stop at process exit
        (SIGTERM) may take. Ray passes both again to a restarted incarnation.
        """
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._check_connected()
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
                control_socket=control_socket,
                exit_deadline=exit_deadline,
            )
        )
        return RemoteSupervisor(
            handle, label=name, namespace=self.namespace, timeout=self.timeout, node_id=node
        )

    async def drain(
        self,
        *,
        device: str | None = None,
        local_addr: str | None = None,
        probe_timeout: float = 2.0,
        close_drained: bool = True,
        supervisors: Sequence[RemoteSupervisor] | None = None,
    ) -> dict[str, DrainReport | BaseException]:
        """Drain every agent (or ``supervisors``) in parallel; one report (or the error it
        met) per label."""
        if (device is None) == (local_addr is None):
            raise ValueError("drain needs exactly one of device= or local_addr=")
        sups = list(supervisors) if supervisors is not None else self.list_supervisors()
        results = await asyncio.gather(
            *(
                s.drain(
                    device=device,
                    local_addr=local_addr,
                    probe_timeout=probe_timeout,
                    close_drained=close_drained,
                )
                for s in sups
            ),
            return_exceptions=True,
        )
        return {s.label: r for s, r in zip(sups, results, strict=True)}

    async def network_status(
        self, supervisors: Sequence[RemoteSupervisor] | None = None
    ) -> dict[str, NetworkStatus | BaseException]:
        """Every agent's (or ``supervisors``') network monitor status (or the error it met),
        by label."""
        sups = list(supervisors) if supervisors is not None else self.list_supervisors()
        results = await asyncio.gather(*(s.network_status() for s in sups), return_exceptions=True)
        return {s.label: r for s, r in zip(sups, results, strict=True)}

    async def snapshots(
        self, supervisors: Sequence[RemoteSupervisor] | None = None
    ) -> dict[str, list[ConnectionSnapshot] | BaseException]:
        """Every connection and path in the fleet (or of ``supervisors``), by label."""
        sups = list(supervisors) if supervisors is not None else self.list_supervisors()
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

    ``address="auto"`` finds the local node's cluster and uses this host's token
    (``~/.ray/auth_token``), as Ray does; an explicit address (``HOST:PORT``, or
    ``RAY_ADDRESS``, which wins over "auto") of a cluster with token authentication needs
    ``RAY_AUTH_MODE=token`` and the token (see k8s/README); ``None`` or
    ``"local"`` starts a cluster in this process. ``timeout`` bounds joining an existing
    cluster too: its GCS port must accept a TCP connection, then ``ray.init`` must finish,
    within it, or :class:`FleetUnreachableError` says why (Ray alone retries a dead address
    for minutes); starting a new cluster is bounded by Ray's own start-up limits.
    ``init_kwargs`` go to ``ray.init`` (``logging_level`` defaults to ``logging.WARNING``).
    """
    import ray

    if not ray.is_initialized():
        init_kwargs.setdefault("logging_level", logging.WARNING)
        shown = address or "local"
        if timeout is None or address in (None, "", "local"):
            # A new cluster starts in this thread: its processes die with the thread that
            # started them (PR_SET_PDEATHSIG), so never in a helper thread. Ray bounds it.
            _init(address, namespace, init_kwargs)
        else:
            deadline = time.monotonic() + timeout
            _check_reachable(address, timeout)
            _init_within(address, namespace, init_kwargs, deadline, timeout, shown)
    return Fleet(namespace, timeout=timeout)


_UNREACHABLE_FIX = (
    "start one there (`ray start --head`), or give --address HOST:PORT of its GCS (port 6379 "
    "unless changed)"
)
_SLOW_FIX = (
    "check that it is the cluster's GCS address; a cluster with token authentication needs "
    "RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN, or ~/.ray/auth_token) when the address "
    "is explicit (--address or RAY_ADDRESS); or raise --timeout"
)


def _init(address: str | None, namespace: str, init_kwargs: dict[str, Any]) -> None:
    import ray

    ray.init(address=address, namespace=namespace, **init_kwargs)


def _gcs_host_port(address: str | None) -> tuple[str, int] | None:
    """Where ``ray.init(address)`` will connect, as Ray resolves it; None: a new local cluster
    (nothing to check). Raises :class:`FleetUnreachableError` when "auto" finds no cluster."""
    if address in (None, "", "local"):
        return None
    assert address is not None
    if address.startswith("ray://"):  # Ray Client: its server, port 10001 unless given
        host, sep, port = address.removeprefix("ray://").partition("/")[0].rpartition(":")
        if not sep:
            host, port = port, "10001"
        return (host, int(port)) if host and port.isdigit() else None
    try:
        from ray._private.services import canonicalize_bootstrap_address

        resolved = canonicalize_bootstrap_address(address)
    except ConnectionError as exc:  # "auto" and no cluster on this host
        raise FleetUnreachableError(address, _first_line(exc), _UNREACHABLE_FIX) from None
    except ValueError as exc:
        raise FleetUnreachableError(
            address, f"not a Ray address ({_first_line(exc)})", "give HOST:PORT or auto"
        ) from None
    except (ImportError, AttributeError):  # another Ray release: check the text as given
        resolved = address
    if not resolved:
        return None
    host, sep, port = resolved.rpartition(":")
    if not sep or not port.isdigit():
        raise FleetUnreachableError(address, "no port in it", "give HOST:PORT or auto")
    with contextlib.suppress(ValueError):
        host = str(ipaddress.ip_address(host.strip("[]")))
    return host, int(port)


def _check_reachable(address: str | None, timeout: float) -> None:
    """The cluster's GCS accepts a TCP connection within ``timeout``: a dead address fails
    here at once (connection refused) or after ``timeout``, never after Ray's retries."""
    target = _gcs_host_port(address)
    if target is None:
        return
    host, port = target
    where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except TimeoutError:
        raise FleetUnreachableError(
            str(address), f"no answer from {where} within {timeout:g} s", _SLOW_FIX
        ) from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise FleetUnreachableError(
            str(address), f"{reason} at {where}", _UNREACHABLE_FIX
        ) from None


def _init_within(
    address: str | None,
    namespace: str,
    init_kwargs: dict[str, Any],
    deadline: float,
    timeout: float,
    shown: str,
) -> None:
    """``ray.init`` in a daemon thread, waited for until ``deadline``: Ray's own connection
    retries (GCS, authentication) block in native code where no timeout reaches them."""
    outcome: list[BaseException | None] = []
    done = threading.Event()

    def run() -> None:
        try:
            _init(address, namespace, init_kwargs)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name="ray-init", daemon=True).start()
    if not done.wait(max(deadline - time.monotonic(), 0.0)):
        raise FleetUnreachableError(
            shown, f"Ray did not finish joining the cluster within {timeout:g} s", _SLOW_FIX
        )
    error = outcome[0]
    if error is None:
        return
    if isinstance(error, ConnectionError) or type(error).__name__ == "AuthenticationError":
        raise FleetUnreachableError(shown, _first_line(error), _SLOW_FIX) from error
    raise error


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].rstrip(".") if lines else type(exc).__name__
