"""The one remote protocol: requests, replies and typed errors, whatever carries them.

Two carriers drive a supervisor from another process: the Unix control socket
(:mod:`supervisor.remote.control`) and the Ray agent (:mod:`supervisor.remote.ray_agent`). Both
carry the same msgpack envelopes (``actors.envelope``) and answer through the same
:class:`Dispatcher`; what differs is only how bytes travel (length-prefixed frames, or Ray
calls) and which requests each offers. So a request gets the same reply, and a failure the same
typed exception (``InvalidAddressError`` with its ``addr``, ``PathNotValidatedError`` with its
``state``), on either side.

Replies: the handler's result as it is, ``None`` as :class:`Ok`, a tuple of snapshots as
:class:`Snapshots`, a failure as :class:`ErrorReply` (class name, text, plain attributes), which
:func:`rebuild_error` turns back into the exception. Only known classes are rebuilt (the
library's errors, ``EnvelopeError`` and a few builtins); any other class comes back as
:class:`RemoteError`, which names it. Rebuilding never calls ``__init__`` (the signatures are
keyword-rich), exactly as unpickling the library's errors does.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import enum
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from multiaddr import Multiaddr

from actors import errors as _errors
from actors.envelope import Envelope, EnvelopeError, decode, encode, message, type_name
from actors.path_state import PathState
from supervisor.addresses import parse_quic_multiaddr
from supervisor.core.messages import (
    AddPathRequest,
    ClosePathRequest,
    ConnectionSnapshot,
    PathAddedReply,
    PathSnapshot,
    ProbeRequest,
    SnapshotRequest,
    SwitchRequest,
    expect,
    reply_snapshot,
)
from supervisor.orchestration.drain import DrainReport, drain
from telemetry.propagation import attached

__all__ = [
    "Dispatcher",
    "DrainRequest",
    "ErrorReply",
    "Handler",
    "Health",
    "HealthRequest",
    "MigrateRequest",
    "Ok",
    "RemoteError",
    "Snapshots",
    "StopReport",
    "StopRequest",
    "ask_migrate",
    "encode_error",
    "error_reply",
    "rebuild_error",
    "reply_body",
]

log = logging.getLogger(__name__)

Handler = Callable[[Any], Awaitable[object]]


# -- envelopes every carrier shares ---------------------------------------------------------------


@message("remote.Ok")
@dataclass(frozen=True, slots=True)
class Ok:
    """The reply to a request that returns nothing (closing a path, a connection, a listener)."""


@message("remote.Snapshots")
@dataclass(frozen=True, slots=True)
class Snapshots:
    """Every outbound connection of the supervisor (a tuple cannot be an envelope's body)."""

    conns: tuple[ConnectionSnapshot, ...] = ()


@message("remote.Error")
@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A failed request: the exception's class name, its text and its plain attributes."""

    type: str
    message: str
    attrs: dict[str, Any] = field(default_factory=dict)


@message("remote.Drain")
@dataclass(frozen=True, slots=True)
class DrainRequest:
    """Run :func:`supervisor.orchestration.drain.drain` in the supervisor's process; the reply
    is its :class:`~supervisor.orchestration.drain.DrainReport`. Every carrier offers it (a
    fleet drain asks each node's agent)."""

    local_addr: str | None = None
    device: str | None = None
    probe_timeout: float = 2.0
    close_drained: bool = True


@message("remote.Migrate")
@dataclass(frozen=True, slots=True)
class MigrateRequest:
    """Make the path on ``to_local_addr`` the active one (:func:`migrate_to`), run where the
    connection lives: one request per migration, however many steps it takes there (B5). The
    reply is the connection's :class:`ConnectionSnapshot`."""

    conn_id: str
    to_local_addr: str
    probe_timeout: float = 2.0


@message("remote.Health")
@dataclass(frozen=True, slots=True)
class HealthRequest:
    """Is the process behind this carrier ready and alive? Answered without waiting for a
    restore in progress (a probe must not hang on it); the reply is :class:`Health`."""


@message("remote.HealthReply")
@dataclass(frozen=True, slots=True)
class Health:
    """Readiness (it should get work: started, desired state restored, not stopping) and
    liveness (its event loop turns). ``why`` is one line saying what is not so, or that all is.

    ``loop_lag``: the worst lateness, seconds, of the loop's heartbeat over the last few
    seconds; ``tick_age``: seconds since its last tick (large only when the heartbeat died).
    """

    ready: bool
    live: bool
    why: str
    loop_lag: float = 0.0
    tick_age: float = 0.0
    connections: int = 0
    stopping: bool = False


@message("remote.Stop")
@dataclass(frozen=True, slots=True)
class StopRequest:
    """Stop in order: not ready at once, listeners stop accepting, connections run until no
    stream is open or ``deadline`` seconds, then every one is closed with CONNECTION_CLOSE. The
    desired state is kept (a restarted agent re-dials). The reply is :class:`StopReport`."""

    deadline: float = 10.0


@message("remote.StopReport")
@dataclass(frozen=True, slots=True)
class StopReport:
    """What an orderly stop did: connections closed, streams cut at the deadline, how long it
    took, whether the deadline cut it short; ``already`` when an earlier stop had done it."""

    connections: int
    streams_cut: int
    elapsed: float
    deadline_hit: bool
    already: bool = False


class RemoteError(Exception):
    """The other side raised an exception class this side does not rebuild."""

    def __init__(self, type_name: str, message: str) -> None:
        self.type_name = type_name
        super().__init__(f"{type_name}: {message}")


# -- typed errors across the boundary -------------------------------------------------------------

_BUILTINS = (
    "ValueError",
    "TypeError",
    "KeyError",
    "LookupError",
    "TimeoutError",
    "OSError",
    "PermissionError",
    "FileNotFoundError",
    "NotImplementedError",
)

_REBUILDABLE: dict[str, type[BaseException]] = {
    **{name: getattr(_errors, name) for name in _errors.__all__},
    "EnvelopeError": EnvelopeError,
    **{name: getattr(builtins, name) for name in _BUILTINS},
}


def _is_plain(value: object) -> bool:
    """Data msgpack carries as it is (attributes of anything else are left out)."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_is_plain(v) for v in value)
    return False


def error_reply(exc: BaseException) -> ErrorReply:
    """Flatten ``exc``: class name, text, and the public attributes that are plain data.

    Multiaddrs and enum members (a ``PathState``) travel as their text; anything else that is
    not plain data is left out rather than failing the reply.
    """
    attrs: dict[str, Any] = {}
    for key, value in getattr(exc, "__dict__", {}).items():
        if key.startswith("_"):
            continue
        if isinstance(value, Multiaddr | enum.Enum):
            value = str(value)
        if _is_plain(value):
            attrs[key] = value
    return ErrorReply(type(exc).__name__, str(exc), attrs)


def encode_error(exc: BaseException) -> bytes:
    """``exc`` as an encoded :class:`ErrorReply`; never raises, so every failure gets its reply.

    The full reply can fail to encode (text with lone surrogates, say): then the text goes
    ASCII-escaped and without attributes.
    """
    try:
        return encode(error_reply(exc))
    except (TypeError, ValueError):
        return encode(ErrorReply(type(exc).__name__, ascii(str(exc))[1:-1]))


def rebuild_error(reply: ErrorReply) -> BaseException:
    """The exception ``reply`` stands for: same class, text and attributes when known here."""
    cls = _REBUILDABLE.get(reply.type)
    if cls is None:
        return RemoteError(reply.type, reply.message)
    exc = cls.__new__(cls)
    exc.args = (reply.message,)
    exc.__dict__.update(reply.attrs)
    return exc


def reply_body(body: object) -> object:
    """A decoded reply as the caller sees it: the result, ``None`` for :class:`Ok`, a tuple for
    :class:`Snapshots`; an :class:`ErrorReply` is raised as the exception it stands for."""
    if isinstance(body, ErrorReply):
        raise rebuild_error(body)
    if isinstance(body, Ok):
        return None
    if isinstance(body, Snapshots):
        return body.conns
    return body


def _outward(result: object) -> object:
    if result is None:
        return Ok()
    if isinstance(result, tuple):
        return Snapshots(result)
    return result


# -- the dispatcher -------------------------------------------------------------------------------


class Dispatcher:
    """Envelope in, envelope out: the one place a remote request is decoded, run with its
    caller's trace context current, and answered.

    ``handlers`` maps request types to coroutines (a carrier's own requests, e.g. the agent's
    dial or listen); ``forwarded`` are supervisor requests passed to ``forward`` unchanged
    (``Supervisor.ask``). :class:`DrainRequest` is always offered. Anything else is refused with a
    ``TypeError`` that lists what is accepted. No request can make it fail without replying.

    A migration asked through a carrier is an operator's (``quic-supervisor ctl``, ``fleet``, a
    program driving the agent): a ``SwitchRequest`` that does not say who asked is marked
    ``initiator="operator"`` here, so the span, the events and the journal say so (DESIGN §3);
    one that says is left as it is. A drain is the operator's by its reason.
    """

    def __init__(
        self,
        *,
        handlers: Mapping[type, Handler] | None = None,
        forwarded: tuple[type, ...] = (),
        forward: Callable[[object], Awaitable[object]] | None = None,
        asks: Any = None,
        prepare: Callable[[], Awaitable[None]] | None = None,
        unprepared: tuple[type, ...] = (HealthRequest, StopRequest),
        name: str = "remote",
    ) -> None:
        """``asks``: the supervisor (or anything with ``ask``) a :class:`DrainRequest` drains;
        ``prepare``: awaited before each request (an agent restoring its connections), its
        failure the request's, except for ``unprepared`` ones (a health probe or a stop must
        answer while a restore runs); ``name`` says which carrier refused a request."""
        self._handlers: dict[type, Handler] = dict(handlers or {})
        self._prepare = prepare
        self._unprepared = unprepared
        self._forwarded = forwarded
        self._forward = forward
        self._asks = asks
        self._name = name
        if DrainRequest not in self._handlers:
            self._handlers[DrainRequest] = self._drain
        self._handlers.setdefault(MigrateRequest, self._migrate)

    @property
    def accepted(self) -> tuple[type, ...]:
        return (*self._forwarded, *self._handlers)

    async def answer_bytes(self, data: bytes) -> bytes:
        """Decode, handle, encode; a frame that is no envelope gets its ``EnvelopeError``."""
        try:
            env = decode(data)
        except EnvelopeError as exc:
            return encode_error(exc)
        return await self.answer(env)

    async def answer(self, env: Envelope) -> bytes:
        try:
            # The caller's context is current while handling: the migration spans of a remote
            # migrate or drain are children of the caller's span (one trace across processes).
            with attached(
                {
                    "traceparent": env.traceparent,
                    "tracestate": env.tracestate,
                    "baggage": env.baggage,
                }
            ):
                result = await self.handle(env.body)
            return encode(_outward(result))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return encode_error(exc)

    async def handle(self, msg: object) -> object:
        if self._prepare is not None and not isinstance(msg, self._unprepared):
            await self._prepare()
        if isinstance(msg, SwitchRequest) and msg.initiator is None:
            msg = dataclasses.replace(msg, initiator="operator")
        handler = self._handlers.get(type(msg))
        if handler is not None:
            return await handler(msg)
        if isinstance(msg, self._forwarded) and self._forward is not None:
            return await self._forward(msg)
        accepted = ", ".join(type_name(t) for t in self.accepted)
        raise TypeError(f"{type_name(msg)} is not a {self._name} request: send one of {accepted}")

    async def _migrate(self, msg: MigrateRequest) -> ConnectionSnapshot:
        # Each step is handled as if it had come on its own (the carrier's id mapping and
        # records apply; the switch is the operator's), without a round trip per step.
        return await migrate_to(
            self.handle, msg.conn_id, msg.to_local_addr, probe_timeout=msg.probe_timeout
        )

    async def _drain(self, msg: DrainRequest) -> DrainReport:
        if self._asks is None:
            raise TypeError(f"{self._name} offers no drain")
        return await drain(
            self._asks,
            local_addr=msg.local_addr,
            device=msg.device,
            probe_timeout=msg.probe_timeout,
            close_drained=msg.close_drained,
        )


# -- a migration by target address, as both carriers' clients ask for one -------------------------


async def migrate_to(
    ask: Callable[[object], Awaitable[object]],
    conn_id: str,
    to_local_addr: str | Multiaddr,
    *,
    probe_timeout: float = 2.0,
) -> ConnectionSnapshot:
    """Make the path on ``to_local_addr`` the active one (reason ``"manual"``) through ``ask``
    (a control-socket or Ray-agent request): the path is found by local address (port 0
    matches any port), added when missing and closed again if it cannot be validated or
    switched to; a path that is not standby is probed first (``probe_timeout``)."""
    ip, port, _ = parse_quic_multiaddr(to_local_addr, what="migration target")
    snap = expect(await ask(SnapshotRequest(conn_id)), ConnectionSnapshot)
    target = find_path(snap.paths, ip, port)
    added = target is None
    if target is None:
        made = expect(
            await ask(AddPathRequest(conn_id, local_addr=str(to_local_addr))), PathAddedReply
        )
        snap = made.snapshot
        target = next(p for p in snap.paths if p.path_id == made.path_id)
    if target.active:
        return snap
    try:
        if target.state is not PathState.STANDBY:
            await ask(ProbeRequest(conn_id, target.path_id, probe_timeout))
        return reply_snapshot(await ask(SwitchRequest(conn_id, target.path_id, "manual")))
    except BaseException:
        if added:  # leave nothing behind
            with contextlib.suppress(Exception):
                await ask(ClosePathRequest(conn_id, target.path_id))
        raise


async def ask_migrate(
    ask: Callable[[object], Awaitable[object]],
    conn_id: str,
    to_local_addr: str | Multiaddr,
    *,
    probe_timeout: float = 2.0,
) -> ConnectionSnapshot:
    """A client's migrate-by-address: the target checked here, then one
    :class:`MigrateRequest` that :func:`migrate_to` answers on the far side."""
    parse_quic_multiaddr(to_local_addr, what="migration target")
    request = MigrateRequest(conn_id, str(to_local_addr), probe_timeout)
    return expect(await ask(request), ConnectionSnapshot)


def find_path(paths: tuple[PathSnapshot, ...], ip: str, port: int) -> PathSnapshot | None:
    """The path on ``ip`` (and ``port`` unless 0): the active one if it matches, else the best."""
    want = ipaddress.ip_address(ip)
    matches = []
    for p in paths:
        parts = p.local_addr.split("/")
        if ipaddress.ip_address(parts[2]) == want and port in (0, int(parts[4])):
            matches.append(p)
    matches.sort(key=lambda p: (not p.active, p.state is not PathState.STANDBY, p.path_id))
    return matches[0] if matches else None
