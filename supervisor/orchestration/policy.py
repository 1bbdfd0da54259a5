"""How policies (failover; drain is one-shot and uses requests only) meet the supervisor.

A policy hears of changes as messages handled in the supervisor's mailbox turn (never inside
an operation's call chain) and acts only through :class:`PolicyPort`: the published views,
the same requests a user sends, and the event bus. It never holds a connection or calls the
supervisor's internals, so neither imports the other.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from opentelemetry.context import Context

from actors.envelope import enveloped
from actors.runtime import ActorRef
from actors.view import ConnectionView, PathChange, PathSample
from supervisor.core.events import Event
from supervisor.orchestration.registry import ConnectionEntry
from telemetry.propagation import inject_fields

T = TypeVar("T")


class Policy(Protocol):
    def on_changes(self, conn_id: str, changes: tuple[PathChange, ...]) -> None: ...

    def on_active_dead(self, conn_id: str, path_id: int, reason: str) -> None: ...

    def on_connection_end(self, conn_id: str) -> None: ...

    async def close(self) -> None: ...


class PolicyPort(Protocol):
    def view(self, conn_id: str) -> ConnectionView | None:
        """The connection's latest published view (None once it is forgotten)."""
        ...

    def sample(self, conn_id: str) -> dict[int, PathSample]:
        """Its paths' live figures (RTT, keep-alive health), read now."""
        ...

    async def ask(self, request: object, *, context: Context | None = None) -> object:
        """Send a request exactly as a user would (events, spans, the connection's queue);
        ``context``: the span its spans are children of (a network change's)."""
        ...

    def conn_ids(self) -> list[str]:
        """The connections known now (open or closing)."""
        ...

    def emit(self, evt: Event) -> None: ...

    def note(self, what: str) -> None:
        """Count an observation of the policy's (``suspect_failover``) in MigrationStats."""
        ...

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str) -> Any:
        """Run ``coro`` as a task the supervisor owns (cancelled and awaited when it stops)."""
        ...


@dataclass(frozen=True, slots=True)
class SupervisorPort:
    """A :class:`PolicyPort` over a SupervisorActor's registry, ref and event emitter."""

    registry: Mapping[str, ConnectionEntry]
    ref: ActorRef
    emit: Callable[[Event], None]
    spawn: Callable[..., Any]
    note: Callable[[str], None]

    def view(self, conn_id: str) -> ConnectionView | None:
        entry = self.registry.get(conn_id)
        return entry.view if entry is not None else None

    def sample(self, conn_id: str) -> dict[int, PathSample]:
        entry = self.registry.get(conn_id)
        return entry.cell.sample() if entry is not None else {}

    async def ask(self, request: object, *, context: Context | None = None) -> object:
        if context is None:
            return await self.ref.ask(request)
        return await self.ref.ask(enveloped(request, inject_fields(context)))

    def conn_ids(self) -> list[str]:
        return list(self.registry)
