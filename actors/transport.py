"""How public handles reach the supervisor: one ``ask`` call, whatever is behind it.

Handles (``MigratableConn``, ``Path``) are written against :class:`AskTransport` only, so running
the supervisor in-process or inside a Ray actor on another node swaps the transport, nothing else.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from actors.runtime import ActorRef

__all__ = ["AskTransport", "LocalTransport"]


@runtime_checkable
class AskTransport(Protocol):
    """Request/reply channel to the supervisor; errors raised by the handler re-raise here."""

    async def ask(self, msg: object, timeout: float | None = None) -> object:
        """Send ``msg`` and return the reply (or raise what the receiver raised)."""
        ...


class LocalTransport:
    """In-process transport: a direct :meth:`ActorRef.ask` on the same event loop (no codec)."""

    __slots__ = ("ref",)

    def __init__(self, ref: ActorRef) -> None:
        self.ref = ref

    async def ask(self, msg: object, timeout: float | None = None) -> object:
        return await self.ref.ask(msg, timeout)

    def __repr__(self) -> str:
        return f"LocalTransport({self.ref!r})"
