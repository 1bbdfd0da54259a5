"""One timer heap per supervisor, and a meter of how late the loop ran it; sans-I/O.

A node holds thousands of connections (DESIGN.md §8): keep-alives, liveness checks, probe
retries and NAT keep-alives must not each sleep in a task of their own. They are deadlines in
one :class:`Scheduler`; its owner arms a single loop timer at :meth:`Scheduler.next_deadline`
and, when it fires, takes :meth:`Scheduler.due`. Time is passed in (``now``), never read, so
a fake clock drives the tests.

A starved process (other processes on its CPUs, a cgroup quota) cannot read its sockets.
:class:`LagMeter` records such stalls (its owner measures them: NodeHealth from the thread's
run-queue wait) so that silence can be counted only for time the loop could read: a path is
not dead because its answer waited in the socket while nothing ran.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["LagMeter", "Scheduler"]

K = TypeVar("K", bound=Hashable)
P = TypeVar("P")


class Scheduler(Generic[K, P]):
    """Deadlines by key: O(log n) schedule and pop, O(1) cancel (lazy deletion).

    A key has at most one deadline: scheduling it again replaces it. The heap keeps stale
    entries (cancelled or replaced) until they surface or outnumber the live ones, when it is
    rebuilt, so memory stays within twice the live timers. Ties fire in the order they were
    (re)scheduled: each entry carries a sequence number, which also tells a live entry from
    its stale predecessors.
    """

    __slots__ = ("_heap", "_live", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._live: dict[K, tuple[float, int, P]] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: object) -> bool:
        return key in self._live

    @property
    def footprint(self) -> int:
        """Heap entries held, live or stale: never more than ``2 * len(self) + 1``."""
        return len(self._heap)

    def schedule(self, key: K, at: float, payload: P) -> None:
        """Fire ``payload`` for ``key`` at ``at``, replacing any earlier deadline of ``key``."""
        if math.isnan(at):
            raise ValueError("deadline must be a number, got nan")
        self._seq += 1
        self._live[key] = (at, self._seq, payload)
        heapq.heappush(self._heap, (at, self._seq, key))
        self._compact_if_stale()

    def cancel(self, key: K) -> bool:
        """Forget ``key``'s deadline; False when it had none (already fired or never set)."""
        if self._live.pop(key, None) is None:
            return False
        self._compact_if_stale()
        return True

    def deadline(self, key: K) -> float | None:
        entry = self._live.get(key)
        return None if entry is None else entry[0]

    def next_deadline(self) -> float | None:
        """The earliest live deadline: what the owner's one loop timer is armed for."""
        heap, live = self._heap, self._live
        while heap:
            at, seq, key = heap[0]
            entry = live.get(key)
            if entry is not None and entry[1] == seq:
                return at
            heapq.heappop(heap)  # stale: drop it now that it surfaced
        return None

    def due(self, now: float, limit: int | None = None) -> list[tuple[K, P]]:
        """Pop every deadline ``<= now`` (at most ``limit``, so one turn stays short), in
        deadline order, ties in scheduling order. Each key fires once."""
        heap, live = self._heap, self._live
        fired: list[tuple[K, P]] = []
        while heap and heap[0][0] <= now and (limit is None or len(fired) < limit):
            _, seq, key = heapq.heappop(heap)
            entry = live.get(key)
            if entry is None or entry[1] != seq:
                continue
            del live[key]
            fired.append((key, entry[2]))
        if fired:  # firing shrinks the live set: stale entries behind it may now be the most
            self._compact_if_stale()
        return fired

    def _compact_if_stale(self) -> None:
        if len(self._heap) - len(self._live) > len(self._live):
            self._heap = [(at, seq, key) for key, (at, seq, _) in self._live.items()]
            heapq.heapify(self._heap)


@dataclass(slots=True)
class LagMeter:
    """Stalls of the owner's loop: intervals in which it could not read.

    The owner calls :meth:`on_fire` with the start and end of a stall (NodeHealth: the
    thread's run-queue wait since its last look, ending now; without schedstat, its timer's
    lateness); ``[due, now]`` counts when it exceeds ``min_lag`` (timer slack is not
    starvation). Stalls are kept merged and sorted for ``horizon`` seconds; past
    ``max_stalls`` the two oldest merge, which over-counts lag: the error errs towards not
    declaring a path dead, never towards a false failover.
    """

    min_lag: float = 0.005
    #: Running time after a stall before silence may be judged (see :meth:`judge_at`).
    read_grace: float = 0.02
    horizon: float = 600.0
    max_stalls: int = 1024
    _stalls: list[tuple[float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.min_lag < 0 or self.horizon <= 0 or self.max_stalls < 1:
            raise ValueError("need min_lag >= 0, horizon > 0 and max_stalls >= 1")

    def on_fire(self, due: float, now: float) -> float:
        """A timer due at ``due`` ran at ``now``; returns the lag (0 when on time)."""
        lag = max(0.0, now - due)
        if lag > self.min_lag:
            self._insert(due, now)
        self._prune(now)
        return lag

    @property
    def last_stall_end(self) -> float | None:
        """When the loop last resumed after a stall (None: no stall within the horizon)."""
        return self._stalls[-1][1] if self._stalls else None

    def starved(self, start: float, end: float) -> float:
        """Seconds of ``[start, end]`` the loop spent stalled."""
        total = 0.0
        for s, e in reversed(self._stalls):
            if e <= start:
                break
            total += max(0.0, min(e, end) - max(s, start))
        return total

    def lag(self, window: float, now: float) -> float:
        """Seconds stalled during the last ``window`` seconds."""
        return self.starved(now - window, now)

    def discounted_silence(self, last_receive: float, now: float) -> float:
        """Silence since ``last_receive`` that counts: the time the loop could have read."""
        return max(0.0, now - last_receive - self.starved(last_receive, now))

    def judge_at(self, since: float, wait: float, now: float) -> float:
        """When silence since ``since`` may be judged against ``wait``: once it counted for
        ``wait`` seconds, and the loop has run ``read_grace`` past its last stall (a turn or
        two to read what queued meanwhile; the judge also asks the socket whether the kernel
        still holds anything). ``<= now``: judge now; else look again then.

        Not ``wait`` past the stall: a throttled process (a CPU quota stalls it every period)
        would never be allowed to judge, and a real black hole would go unnoticed."""
        later = now + wait - self.discounted_silence(since, now)
        stall_end = self.last_stall_end
        return later if stall_end is None else max(later, stall_end + min(wait, self.read_grace))

    def _insert(self, start: float, end: float) -> None:
        stalls = self._stalls
        i = bisect_left(stalls, (start, start))
        if i > 0 and stalls[i - 1][1] >= start:
            i -= 1
            start = stalls[i][0]
        j = i
        while j < len(stalls) and stalls[j][0] <= end:
            end = max(end, stalls[j][1])
            j += 1
        stalls[i:j] = [(start, end)]
        if len(stalls) > self.max_stalls:
            stalls[0:2] = [(stalls[0][0], stalls[1][1])]

    def _prune(self, now: float) -> None:
        stalls, cutoff = self._stalls, now - self.horizon
        k = 0
        while k < len(stalls) and stalls[k][1] < cutoff:
            k += 1
        if k:
            del stalls[:k]
