"""NodeHealth: the one timer and the health groups of a supervisor (DESIGN.md §8).

A node holds thousands of connections over a few interfaces. Their health duties are deadlines
in one :class:`~actors.scheduler.Scheduler` (active-path liveness looks, and anything else a
connection wants done later) and in one :class:`~actors.health_groups.HealthGroups` (group
probes, confirmations, NAT keep-alives), driven by a single loop timer armed at the earliest of
the two. No task sleeps for health; an idle connection costs no wake-up at all.

This is the I/O shell around those sans-I/O cores: it reads the clock, arms the loop timer,
measures how late the timer ran (:class:`~actors.scheduler.LagMeter`: a starved loop's silence
does not count), and turns group commands into calls on the connections that own the paths
(:class:`HealthMember`), in the same loop, with no mailbox hop. Connections report what they
saw (answers, send errors, their own judgement of an active path); they alone decide their
paths' states. Members are ``(conn_id, path_id)``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Protocol, cast

from actors.health import HealthConfig, Verdict
from actors.health_groups import (
    Command,
    GroupConfig,
    GroupKey,
    GroupVerdict,
    HealthGroups,
    ProbeReason,
)
from actors.scheduler import LagMeter, Scheduler
from actors.socket_errors import Evidence

__all__ = ["HealthMember", "HealthStatus", "NodeHealth", "ProbeReason"]

log = logging.getLogger(__name__)

#: The clock of every deadline here: the connections' (time.monotonic; uvloop's loop.time()
#: is cached per turn).
_now = time.monotonic

#: Deadlines run per timer callback at most: a burst (thousands of connections due at once)
#: is spread over loop turns so the sockets are read in between.
_BATCH = 512


class RunDelay:
    """Seconds the calling thread has waited on a run queue since it started (None: not
    known), from ``/proc/thread-self/schedstat``.

    The file stays open and is re-read with ``pread``: opening it on every timer fire was 5 %
    of a node's CPU at rest (bench B4: ~150 fires a second). ``thread-self`` resolves when
    opened, so a call from another thread opens that thread's file.
    """

    __slots__ = ("_fd", "_thread")

    def __init__(self) -> None:
        self._fd: int | None = None
        self._thread: int | None = None

    def __call__(self) -> float | None:
        thread = threading.get_ident()
        if self._fd is None or self._thread != thread:
            self.close()
            try:
                self._fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
            self._thread = thread
        try:
            return int(os.pread(self._fd, 256, 0).split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            return None

    def close(self) -> None:
        fd, self._fd, self._thread = self._fd, None, None
        if fd is not None:
            os.close(fd)


#: Gone peers remembered at most (the oldest is forgotten first).
_MAX_GONE = 4096


class HealthMember(Protocol):
    """A connection, as the health groups reach it (its own methods, called synchronously)."""

    def health_probe(self, path_id: int, reason: ProbeReason) -> bool:
        """Ask the path one question now (PATH_CHALLENGE; a PING on the active path). False
        when it cannot be asked (no spare CID, closing): that proves nothing either way."""
        ...

    def health_verdict(self, path_id: int, verdict: Verdict) -> None:
        """The path's group was judged (dead, or alive again): the connection decides."""
        ...

    def flush(self) -> None:
        """Send what the connection has queued (the node's per-turn batch calls it)."""
        ...

    def health_queued(self, path_id: int) -> bool:
        """Whether the kernel holds datagrams for the path's socket that were not read yet
        (an answer may be among them: no miss may be counted before they are read)."""
        ...


@dataclass(frozen=True, slots=True)
class HealthStatus:
    """What the node's health machinery is doing (``Supervisor.health_status()``, bench B4)."""

    groups: int
    members: int
    #: Live deadlines: scheduled looks plus the groups' probe, confirm, timeout and NAT timers.
    timers: int
    #: Questions sent since start, by kind: representative, confirm, nat (standby NAT
    #: keep-alives), idle (an idle connection's PING a third into its idle period).
    keepalives: dict[str, int]
    #: Group verdicts fanned out since start: dead, alive.
    verdicts: dict[str, int]
    #: Seconds the loop was stalled (its timer ran late) within the last minute.
    loop_lag_s: float
    #: Socket errors that were evidence, by kind: unreachable (ICMP net/host unreachable or a
    #: local send error: the path suspect, one probe confirms) and peer_gone (port unreachable
    #: from the peer itself: no failover).
    evidence: dict[str, int] = field(default_factory=dict)
    #: Questions whose answer wait ended while the socket still held unread datagrams, judged
    #: again once they were read (a starved loop, not a silent path).
    rechecks: int = 0


class NodeHealth:
    """One per supervisor; ``config`` None: no group probing (idle keep-alives still counted)."""

    def __init__(
        self,
        config: HealthConfig | None = None,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = _now,
    ) -> None:
        self.config = config
        self.lag = LagMeter()
        self._clock = clock
        self.groups = (
            HealthGroups(
                GroupConfig.from_health(config), rng or random.Random(), self.lag, self._queued
            )
            if config is not None
            else None
        )
        self._timers: Scheduler[Hashable, Callable[[], None]] = Scheduler()
        self._members: dict[str, HealthMember] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at: float | None = None
        self._expected = 0.0  # when the armed timer should run (never before it was armed)
        self._run_delay = RunDelay()
        self._run_delay_seen = self._run_delay() or 0.0
        self._closed = False
        self.sent: Counter[str] = Counter()
        self.verdicts: Counter[str] = Counter()
        self.evidence_seen: Counter[str] = Counter()
        self.rechecks = 0
        self._to_flush: list[HealthMember] = []
        #: Peers (ip, port) whose own host answered with a port unreachable and that nobody
        #: has heard from since: their connections do not fail over (DESIGN §4).
        self.gone: dict[tuple[str, int], float] = {}

    # ------------------------------------------------------------------ connections

    def register(self, conn_id: str, member: HealthMember) -> None:
        self._members[conn_id] = member

    def unregister(self, conn_id: str, path_ids: list[int]) -> None:
        self._members.pop(conn_id, None)
        for path_id in path_ids:
            self.leave(conn_id, path_id)

    def join(
        self, conn_id: str, path_id: int, key: GroupKey, *, nat: bool, failed: bool
    ) -> Verdict | None:
        """Make the path a member of ``key``'s group (or update its flags); its verdict."""
        if self.groups is None or self._closed:
            return None
        verdict = self.groups.add((conn_id, path_id), key, self._clock(), nat=nat, failed=failed)
        self._arm()
        return verdict

    def leave(self, conn_id: str, path_id: int) -> None:
        if self.groups is not None:
            self.groups.remove((conn_id, path_id))

    def answered(self, conn_id: str, path_id: int, rtt: float | None) -> None:
        if self.groups is not None:
            self._run(self.groups.on_answer((conn_id, path_id), rtt, self._clock()))

    def evidence(self, conn_id: str, path_id: int, kind: Evidence) -> None:
        """A socket error judged by ``actors.socket_errors``: counted; an unreachable makes
        the path's group suspect and asks the path one question now."""
        self.evidence_seen[kind.value] += 1
        if kind is not Evidence.PEER_GONE and self.groups is not None:
            local = kind is Evidence.SEND_FAILED
            self._run(self.groups.evidence((conn_id, path_id), self._clock(), local=local))

    def _queued(self, member: Hashable) -> bool:
        conn_id, path_id = cast(tuple[str, int], member)
        target = self._members.get(conn_id)
        if target is None or not target.health_queued(path_id):
            return False
        self.rechecks += 1
        return True

    def suspect(self, conn_id: str, path_id: int) -> None:
        """The connection judged this (active) path dead: its group starts confirming."""
        if self.groups is not None:
            self._run(self.groups.suspect((conn_id, path_id), self._clock()))

    def verdict(self, conn_id: str, path_id: int) -> Verdict | None:
        return None if self.groups is None else self.groups.verdict_of((conn_id, path_id))

    def last_answer(self, conn_id: str, path_id: int) -> float | None:
        """When the path's group last heard an answer (on this node's clock)."""
        return None if self.groups is None else self.groups.last_answer((conn_id, path_id))

    def peer_gone(self, peer: tuple[str, int]) -> None:
        now = self._clock()
        if peer not in self.gone and len(self.gone) >= _MAX_GONE:
            oldest = min(self.gone, key=self.gone.__getitem__)
            del self.gone[oldest]
        self.gone[peer] = now

    def is_gone(self, peer: tuple[str, int]) -> bool:
        return peer in self.gone

    def peer_heard(self, peer: tuple[str, int]) -> None:
        self.gone.pop(peer, None)

    def group_states(self) -> dict[str, int]:
        """Groups by verdict (alive, suspect, dead); safe to call from a metric reader."""
        return self.groups.states() if self.groups is not None else {}

    def flush_soon(self, member: HealthMember) -> None:
        """Flush ``member`` later in this loop turn, with every other connection that has
        something to send: one loop callback for the node (a drain moves hundreds of
        connections in the same turns), not one per connection. Its ``flush`` checks that
        it still has something to send; called twice in a turn, it flushes once."""
        if not self._to_flush:
            asyncio.get_running_loop().call_soon(self._flush_all)
        self._to_flush.append(member)

    def _flush_all(self) -> None:
        batch, self._to_flush = self._to_flush, []
        for member in batch:
            try:
                member.flush()
            except Exception:  # one connection's bug must not keep the others from sending
                log.exception("flush of %r failed", member)

    def count(self, kind: str) -> None:
        self.sent[kind] += 1

    def clock(self) -> float:
        return self._clock()

    # ------------------------------------------------------------------ deadlines

    def schedule(self, key: Hashable, at: float, callback: Callable[[], None]) -> None:
        """Call ``callback`` at ``at`` (this node's clock), replacing ``key``'s deadline."""
        if self._closed:
            return
        self._timers.schedule(key, at, callback)
        if self._armed_at is None or at < self._armed_at:
            self._arm()

    def cancel(self, key: Hashable) -> None:
        self._timers.cancel(key)

    def status(self) -> HealthStatus:
        groups = self.groups
        return HealthStatus(
            groups=len(groups) if groups is not None else 0,
            members=groups.members if groups is not None else 0,
            timers=len(self._timers) + (groups.timers if groups is not None else 0),
            keepalives=dict(self.sent),
            verdicts=dict(self.verdicts),
            loop_lag_s=round(self.lag.lag(60.0, self._clock()), 6),
            evidence=dict(self.evidence_seen),
            rechecks=self.rechecks,
        )

    def close(self) -> None:
        self._closed = True
        self._run_delay.close()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._armed_at = None

    # ------------------------------------------------------------------ the one timer

    def _arm(self) -> None:
        if self._closed:
            return
        at = self._timers.next_deadline()
        if self.groups is not None:
            g = self.groups.next_deadline()
            if g is not None and (at is None or g < at):
                at = g
        if at == self._armed_at and self._handle is not None:
            return
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._armed_at = at
        if at is not None:
            now = self._clock()
            # Lateness counts from when the loop was asked to run us: a deadline already past
            # when armed (a backlog beyond _BATCH, a rescheduled keep-alive) is no stall of
            # the loop (it was: seconds of phantom lag, which blinded every judgement).
            self._expected = max(at, now)
            loop = asyncio.get_running_loop()
            self._handle = loop.call_later(max(0.0, at - now), self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._armed_at = None
        now = self._clock()
        self._measure_stall(now)
        for _key, callback in self._timers.due(now, _BATCH):
            try:
                callback()
            except Exception:  # one connection's bug must not stop every node timer
                log.exception("health deadline %r failed", _key)
        if self.groups is not None:
            self._run(self.groups.tick(now), arm=False)
        self._arm()

    def _measure_stall(self, now: float) -> None:
        """The time the loop could not read since the last look: the time the kernel kept
        this thread waiting for a CPU (``run_delay`` in ``/proc/thread-self/schedstat``:
        other processes, a cgroup quota), placed just before ``now``. A loop that was late
        because it was busy (reading, running callbacks, ours included) could read: none of
        that is discounted (it was, and a busy node discounted nearly all silence: a
        black-holed path took 20 s to judge); what arrived meanwhile is in the socket, and
        every judgement reads that first. Without schedstat (another OS, schedstats off)
        the timer's lateness counts instead, as before."""
        delay = self._run_delay()
        if delay is None:
            self.lag.on_fire(self._expected, now)
            return
        waited = delay - self._run_delay_seen
        if waited > self.lag.min_lag:  # smaller waits add up until they count
            self._run_delay_seen = delay
            self.lag.on_fire(now - waited, now)

    def _run(self, commands: list[Command], *, arm: bool = True) -> None:
        groups = self.groups
        assert groups is not None
        for command in commands:
            if isinstance(command, GroupVerdict):
                self.verdicts[command.verdict.value] += 1
                for member in command.members:
                    conn_id, path_id = cast(tuple[str, int], member)
                    target = self._members.get(conn_id)
                    if target is not None:
                        target.health_verdict(path_id, command.verdict)
                continue
            conn_id, path_id = cast(tuple[str, int], command.member)
            conn = self._members.get(conn_id)
            if conn is not None and conn.health_probe(path_id, command.reason):
                self.sent[command.reason.value] += 1
            elif command.reason is not ProbeReason.NAT:
                self._run(groups.withdraw(command.member, self._clock()), arm=False)
        if arm:
            self._arm()
