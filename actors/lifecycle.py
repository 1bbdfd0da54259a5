"""``async with`` for the library's long-lived objects, written once.

A supervisor, a control server or client: each is opened (``start``, where it has one) on the
way in and closed on the way out, whatever ended the block; ``close`` is theirs to define and
must be idempotent.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["Closing", "Service"]


class Closing:
    """``async with obj:`` closes ``obj`` on the way out (``await obj.close()``)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        raise NotImplementedError


class Service(Closing):
    """``async with obj:`` also starts ``obj`` on the way in (``await obj.start()``)."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def start(self) -> None:
        raise NotImplementedError
