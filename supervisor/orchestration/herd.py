"""Herd control: at most K migrations in flight per supervisor and per remote IP, FIFO.

A link going down, a black hole or a drain under thousands of connections must not fire every
migration at once (DESIGN.md §8): each migration is a probe, a switch and a confirmation at
our loop and at the peer, and a burst of them read late is a burst of false rollbacks (a
warm drain of 1,000 lost 3-34 connections that way). Every switch, whoever asked for it
(user, failover, drain, preferred address), takes a slot here first.

:class:`HerdQueue` is the sans-I/O core (admission order, counts); :class:`MigrationGate`
the asyncio shell (futures, cancellation, wait times). Admission is FIFO among the waiters
that fit: a waiter held back only by its own peer's limit does not hold back another peer's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

__all__ = ["HerdLimits", "HerdQueue", "MigrationGate"]


@dataclass(frozen=True, slots=True)
class HerdLimits:
    """``Supervisor(herd=HerdLimits(...))``: migrations in flight at once."""

    #: In the whole supervisor.
    in_flight: int = 64
    #: Towards one remote IP (a peer's loop validates two paths per migration too).
    per_peer: int = 64

    def __post_init__(self) -> None:
        for name in ("in_flight", "per_peer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"HerdLimits.{name} must be a whole number >= 1 (migrations at once), "
                    f"got {value!r}"
                )


class HerdQueue:
    """Who may migrate now: counts per peer and in total, waiters in arrival order."""

    __slots__ = ("_in_flight", "_limits", "_per_peer", "_queued_for", "_waiting")

    def __init__(self, limits: HerdLimits) -> None:
        self._limits = limits
        self._in_flight = 0
        self._per_peer: collections.Counter[str] = collections.Counter()
        self._waiting: dict[int, str] = {}  # ticket -> peer, in arrival order
        self._queued_for: collections.Counter[str] = collections.Counter()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def _fits(self, peer: str) -> bool:
        return (
            self._in_flight < self._limits.in_flight
            and self._per_peer[peer] < self._limits.per_peer
        )

    def _admit(self, peer: str) -> None:
        self._in_flight += 1
        self._per_peer[peer] += 1

    def request(self, ticket: int, peer: str) -> bool:
        """Admit now (True) or queue ``ticket``. Nobody overtakes an earlier waiter of the
        same peer, nor any earlier waiter while the total is the limit."""
        if not self._queued_for[peer] and self._fits(peer):
            self._admit(peer)
            return True
        self._waiting[ticket] = peer
        self._queued_for[peer] += 1
        return False

    def _unqueue(self, peer: str) -> None:
        self._queued_for[peer] -= 1
        if self._queued_for[peer] <= 0:
            del self._queued_for[peer]

    def withdraw(self, ticket: int) -> bool:
        """A queued waiter gave up; False when it was not queued (admitted already)."""
        peer = self._waiting.pop(ticket, None)
        if peer is None:
            return False
        self._unqueue(peer)
        return True

    def release(self, peer: str) -> list[int]:
        """A migration towards ``peer`` ended; the waiters admitted now, in order."""
        self._in_flight -= 1
        self._per_peer[peer] -= 1
        if self._per_peer[peer] <= 0:
            del self._per_peer[peer]
        admitted: list[int] = []
        # Oldest first; the scan stops as soon as the total is full again (one release
        # usually admits one waiter, found at the head: no walk over a long queue).
        for ticket, waiting in self._waiting.items():
            if self._in_flight >= self._limits.in_flight:
                break
            if self._fits(waiting):
                self._admit(waiting)
                admitted.append(ticket)
        for ticket in admitted:
            self._unqueue(self._waiting.pop(ticket))
        return admitted


class MigrationGate:
    """The asyncio side: ``async with gate.slot(peer) as waited:`` around each migration."""

    def __init__(
        self, limits: HerdLimits | None = None, *, on_wait: Callable[[float], None] | None = None
    ) -> None:
        self.limits = limits or HerdLimits()
        self._queue = HerdQueue(self.limits)
        self._tickets = itertools.count()
        self._futures: dict[int, asyncio.Future[None]] = {}
        self._on_wait = on_wait
        #: Since start: migrations that waited, the longest wait (s), the deepest queue.
        self.waited = 0
        self.max_wait_s = 0.0
        self.max_queued = 0

    @property
    def in_flight(self) -> int:
        return self._queue.in_flight

    @property
    def queued(self) -> int:
        return self._queue.queued

    @contextlib.asynccontextmanager
    async def slot(self, peer: str) -> AsyncIterator[float]:
        """Hold one migration slot towards ``peer``; yields how long it waited (seconds)."""
        ticket = next(self._tickets)
        waited = 0.0
        if not self._queue.request(ticket, peer):
            self.max_queued = max(self.max_queued, self._queue.queued)
            future = asyncio.get_running_loop().create_future()
            self._futures[ticket] = future
            t0 = time.monotonic()
            try:
                await future
            except BaseException:
                self._futures.pop(ticket, None)
                if not self._queue.withdraw(ticket):
                    self._release(peer)  # admitted just as it was cancelled: pass it on
                raise
            waited = time.monotonic() - t0
            self.waited += 1
            self.max_wait_s = max(self.max_wait_s, waited)
            if self._on_wait is not None:
                self._on_wait(waited)
        try:
            yield waited
        finally:
            self._release(peer)

    def _release(self, peer: str) -> None:
        for ticket in self._queue.release(peer):
            future = self._futures.pop(ticket, None)
            if future is not None and not future.done():
                future.set_result(None)
