"""Programs drive a fleet of per-node supervisors through Ray: handles, lookup, fleet-wide drain.

    fleet = connect(address="auto", namespace="quic-supervisor")
    for sup in fleet.list_supervisors():            # RemoteSupervisor, one per node
        print(sup.label, await sup.snapshot())
    sup = fleet.get_supervisor(node_id)
    conn = await sup.dial("/ip4/10.0.0.5/udp/4433/quic-v1", alpn_protocols=["echo"])
    mc = conn.as_migratable()                       # the same MigratableConn/Path handles
    path = await mc.add_path(device="net1"); await path.probe(); await path.switch()
    reports = await fleet.drain(device="net1")      # {label: DrainReport | exception}

A :class:`RayTransport` is the handles' ``Client``: it encodes each request into an envelope
(with the caller's trace context), calls the agent's ``ask`` through Ray and turns the reply
back into a snapshot or into the typed exception the agent raised. Snapshots are cached (no
live view across processes), sockets cannot be handed over (``sock=``), and streams stay in the
agent's process. Failures of the fleet itself are :class:`FleetError` subclasses.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
from collections.abc import Sequence
from typing import Any

from multiaddr import Multiaddr

from actors import errors as _errors
from actors.envelope import EnvelopeError, decode, encode
from actors.streams import Stream
from supervisor.handles import Connection
from supervisor.messages import ConnectionSnapshot, DialRequest, SnapshotRequest
from supervisor.ray_backend import (
    AGENT_NAME_PREFIX,
    DEFAULT_NAMESPACE,
    AgentInfo,
    DrainReport,
    DrainRequest,
    EchoReport,
    EchoStart,
    EchoWait,
    ErrorReply,
    EventBatch,
    EventsRequest,
    InfoRequest,
    Ok,
    Snapshots,
    SupervisorAgent,
    agent_name,
)
from telemetry.propagation import current_trace_fields

__all__ = [
    "Fleet",
    "FleetError",
    "RayTransport",
    "RemoteConnection",
    "RemoteError",
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


class RemoteError(FleetError):
    """The agent raised an exception type this side does not know."""

    def __init__(self, type_name: str, message: str) -> None:
        self.type_name = type_name
        super().__init__(f"{type_name}: {message}")


_REBUILDABLE: dict[str, type[BaseException]] = {
    name: getattr(_errors, name) for name in _errors.__all__
} | {
    "EnvelopeError": EnvelopeError,
    **{
        n: getattr(builtins, n)
        for n in ("ValueError", "TypeError", "KeyError", "LookupError", "TimeoutError")
    },
}


def rebuild_error(reply: ErrorReply) -> BaseException:
    """The typed exception an ``ErrorReply`` stands for (same class, text and attributes)."""
    cls = _REBUILDABLE.get(reply.type)
    if cls is None:
        return RemoteError(reply.type, reply.message)
    exc = cls.__new__(cls)
    exc.args = (reply.message,)
    exc.__dict__.update(reply.attrs)
    return exc


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
        body = decode(reply).body
        if isinstance(body, ErrorReply):
            raise rebuild_error(body)
        if isinstance(body, Ok):
            return None
        if isinstance(body, Snapshots):
            return body.conns
        return body

    def __repr__(self) -> str:
        return f"RayTransport({self.name!r}, namespace={self.namespace!r})"


class _AgentSide:
    """Stands in for the ConnectionActor, which lives in the agent's process: the inherited
    handle code sees an open connection (the snapshot says otherwise), and streams fail clearly."""

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


class RemoteSupervisor(RayTransport):
    """One node's agent: the local ``Supervisor`` API (dial, snapshots) plus fleet operations."""

    def __init__(
        self, handle: Any, *, label: str, namespace: str, timeout: float | None = None
    ) -> None:
        super().__init__(handle, name=agent_name(label), namespace=namespace, timeout=timeout)
        self.label = label

    async def info(self) -> AgentInfo:
        info = await self.ask(InfoRequest())
        assert isinstance(info, AgentInfo)
        self._migration_enabled = info.migration_enabled
        return info

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
        sock: Any = None,
        timeout: float = 10.0,
        idle_timeout: float = 30.0,
    ) -> RemoteConnection:
        """Dial from the agent's node (``cafile`` is a path on that node)."""
        if sock is not None:
            raise SocketNotTransferableError()
        snap = await self.ask(
            DialRequest(
                remote=str(addr),
                alpn_protocols=tuple(alpn_protocols) if alpn_protocols else None,
                server_name=server_name,
                cafile=cafile,
                verify=verify,
                local_addr=str(local_addr) if local_addr is not None else None,
                device=device,
                timeout=timeout,
                idle_timeout=idle_timeout,
            )
        )
        assert isinstance(snap, ConnectionSnapshot)
        return RemoteConnection(self, snap)

    async def snapshot(self) -> list[ConnectionSnapshot]:
        snaps = await self.ask(SnapshotRequest(None))
        assert isinstance(snaps, tuple)
        return list(snaps)

    async def connections(self) -> list[RemoteConnection]:
        return [RemoteConnection(self, s) for s in await self.snapshot()]

    async def connection(self, conn_id: str) -> RemoteConnection:
        snap = await self.ask(SnapshotRequest(conn_id))
        assert isinstance(snap, ConnectionSnapshot)
        return RemoteConnection(self, snap)

    async def drain(
        self,
        *,
        device: str | None = None,
        local_addr: str | None = None,
        probe_timeout: float = 5.0,
    ) -> DrainReport:
        report = await self.ask(DrainRequest(local_addr, device, probe_timeout))
        assert isinstance(report, DrainReport)
        return report

    async def events(self, cursor: int = 0, limit: int = 1000) -> EventBatch:
        """Events since ``cursor`` (pass the returned batch's ``cursor`` next time)."""
        batch = await self.ask(EventsRequest(cursor, limit))
        assert isinstance(batch, EventBatch)
        return batch

    async def echo(
        self, conn_id: str, nbytes: int, *, chunk: int = 16384, pace: float = 0.0
    ) -> int:
        """Start a checksummed echo transfer on the agent; returns a job id for ``echo_wait``."""
        rep = await self.ask(EchoStart(conn_id, nbytes, chunk, pace))
        assert isinstance(rep, EchoReport)
        return rep.job

    async def echo_wait(self, job: int, timeout: float = 60.0) -> EchoReport:
        rep = await self.ask(EchoWait(job, timeout))
        assert isinstance(rep, EchoReport)
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
    ) -> RemoteSupervisor:
        """Start (or find: ``get_if_exists``) the detached agent pinned to ``node_id``.

        ``node_id`` defaults to the caller's node; ``label`` (default: the node id) names it,
        so tests can run two agents on one node. ``env`` adds variables to the agent's
        process (e.g. ``OTEL_*``); by default it inherits the node's.
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
        if env:
            options["runtime_env"] = {"env_vars": dict(env)}
        handle = (
            ray.remote(SupervisorAgent)
            .options(**options)
            .remote(
                name,
                namespace=self.namespace,
                enable_migration=enable_migration,
                capture_spans=capture_spans,
                persist=persist,
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
