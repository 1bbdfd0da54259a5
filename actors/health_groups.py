"""Shared-fate health groups, sans-I/O: probe one path per group, not every path.

Standby paths that leave from the same local address (or device) for the same remote IP cross
the same links and middleboxes: one answer speaks for all of them, and so does a confirmed
silence. Probes and timers therefore grow with groups (interfaces x peers), not with
connections (DESIGN.md §8). Members are opaque hashables (e.g. ``(conn_id, path_id)``).

Each group is in one explicit state (:class:`~actors.health.Verdict`):

- ALIVE: every ``interval`` (jittered) one member, in rotation, is probed (representative).
- SUSPECT: the representative missed. Nothing is declared yet: a random sample of other
  members is probed, at most ``confirm_batch`` per ``confirm_pace`` seconds, only as many
  as are still needed to reach ``threshold`` misses.
- DEAD: ``threshold`` misses since the last answer. One :class:`GroupVerdict` lists every
  member; the rotation goes on, so a link that comes back is noticed.

An ICMP net/host unreachable or a local send error on a member (:meth:`evidence`) makes the
group suspect at once and asks that member one question: unanswered, the group is dead
without waiting for ``threshold`` misses (the error is the first, our own silence confirms it).

Any answer from any member clears the suspicion (a DEAD group fans out ALIVE). A probe that
outlived an answer says nothing: misses count only since the last answer (an epoch). Silence
counts only for time the loop could read (:class:`~actors.scheduler.LagMeter`). The owner's own
evidence (a connection that judged its active path dead) starts the confirmation
(:meth:`suspect`) without being a miss itself, so one connection's detection gets the group
asked at once while only probed silence makes the verdict.

Two duties are per member because they cannot be shared: a member marked ``failed`` (by its own
evidence) goes first in the rotation, so it is re-tried within an interval or two rather than
once per round of a thousand members; and a member with ``nat=True`` (a standby path: NAT
bindings are per 5-tuple) gets a NAT keep-alive every ``nat_interval`` (jittered) unless the
rotation asked it something meanwhile. NAT keep-alives ask nothing (the owner sends a small
probing packet: a binding needs outbound bytes, not an answer) and are never judged.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from enum import StrEnum

from actors.health import HealthConfig, Verdict
from actors.scheduler import LagMeter, Scheduler

__all__ = [
    "Command",
    "GroupConfig",
    "GroupKey",
    "GroupStatus",
    "GroupVerdict",
    "HealthGroups",
    "ProbeMember",
    "ProbeReason",
]


@dataclass(frozen=True, slots=True)
class GroupKey:
    """What members share fate by: the local IP (or device) and the peer's IP."""

    local: str
    remote_ip: str


class ProbeReason(StrEnum):
    REPRESENTATIVE = "representative"  # the rotation's one probe per interval
    CONFIRM = "confirm"  # a sample member, after a miss
    NAT = "nat"  # a standby path's own NAT keep-alive (not judged)


@dataclass(frozen=True, slots=True)
class GroupConfig:
    """Tunables of group probing; :meth:`from_health` maps a per-path :class:`HealthConfig`."""

    interval: float = 1.0
    jitter: float = 0.2
    #: A probe's answer wait: ``answer_rtts`` RTTs + 4 RTT variances, at least ``min_wait``;
    #: ``initial_wait`` before the group's first RTT sample.
    answer_rtts: float = 4.0
    min_wait: float = 0.1
    initial_wait: float = 1.0
    #: Misses since the last answer, the representative's included, that make a group dead.
    threshold: int = 3
    confirm_batch: int = 2
    confirm_pace: float = 0.25
    #: NAT keep-alive period of ``nat=True`` members (RFC 9000 10.1.2: 30 s suits most
    #: middleboxes), jittered by ``jitter``; None: none.
    nat_interval: float | None = 30.0

    def __post_init__(self) -> None:
        if not (self.interval > 0 and 0 <= self.jitter < 1):
            raise ValueError("need interval > 0 and 0 <= jitter < 1")
        if not (self.min_wait > 0 and self.initial_wait > 0 and self.answer_rtts > 0):
            raise ValueError("answer waits must be > 0")
        if self.threshold < 2:
            raise ValueError("threshold must be >= 2: one miss is never a verdict")
        if self.confirm_batch < 1 or self.confirm_pace < 0:
            raise ValueError("need confirm_batch >= 1 and confirm_pace >= 0")
        if self.nat_interval is not None and not self.nat_interval > 0:
            raise ValueError("nat_interval must be > 0 (or None for no NAT keep-alives)")

    @classmethod
    def from_health(cls, health: HealthConfig) -> GroupConfig:
        return cls(
            interval=health.keepalive_interval,
            jitter=health.jitter,
            answer_rtts=health.keepalive_rtts,
            min_wait=health.min_wait,
            threshold=max(2, health.failures_to_fail),
            nat_interval=health.nat_keepalive,
        )


@dataclass(frozen=True, slots=True)
class ProbeMember:
    """Command: send one PATH_CHALLENGE on ``member``; report via on_answer, or on_miss /
    evidence when it failed outright."""

    group: GroupKey
    member: Hashable
    reason: ProbeReason


@dataclass(frozen=True, slots=True)
class GroupVerdict:
    """Command: the verdict of a whole group, fanned out once to all of its members."""

    group: GroupKey
    verdict: Verdict
    members: tuple[Hashable, ...]


Command = ProbeMember | GroupVerdict


@dataclass(frozen=True, slots=True)
class GroupStatus:
    """A read-only snapshot of one group (telemetry, tests)."""

    state: Verdict
    members: int
    misses: int
    outstanding: tuple[tuple[Hashable, ProbeReason], ...]


#: A timed-out question whose member's socket still holds unread datagrams is judged again
#: after ``RECHECK_AFTER`` seconds (the loop reads them first), at most ``MAX_RECHECKS`` times:
#: a socket flooded by someone else's datagrams must not postpone a verdict for ever.
RECHECK_AFTER = 0.005
MAX_RECHECKS = 20
#: A loop that is never on time (saturated, not paused) still judges: after this many answer
#: waits of wall time (at least 2 s) silence counts whatever the lag meter says.
STARVED_CAP = 10


@dataclass(slots=True)
class _Probe:
    reason: ProbeReason
    sent: float
    wait: float
    epoch: int
    rechecks: int = 0
    #: Asked because of an ICMP error or a send error: unanswered, the group is dead at once.
    confirms_evidence: bool = False


@dataclass(slots=True)
class _Group:
    key: GroupKey
    confirm_ready: float  # no confirmation batch before this time
    state: Verdict = Verdict.ALIVE
    members: dict[Hashable, None] = field(default_factory=dict)  # an ordered set
    probes: dict[Hashable, _Probe] = field(default_factory=dict)  # outstanding, per member
    rep: Hashable | None = None  # the member with the outstanding representative probe
    epoch: int = 0  # answers seen: a probe from an older epoch proves nothing
    misses: int = 0  # since the last answer
    tried: set[Hashable] = field(default_factory=set)  # probed in this confirmation
    rotation: list[Hashable] = field(default_factory=list)
    pos: int = 0
    rtt: float | None = None
    rtt_var: float = 0.0
    last_answer: float | None = None
    failed: dict[Hashable, None] = field(default_factory=dict)  # re-tried first, in turn


class HealthGroups:
    """All groups of one supervisor; each entry point returns the commands it caused.

    The owner arms its timer at :meth:`next_deadline`, calls :meth:`tick` when it fires, sends
    a PATH_CHALLENGE per :class:`ProbeMember` and reports answers; ``rng`` (seeded in tests)
    jitters the rotation and picks samples; ``lag`` keeps a starved loop from judging;
    ``queued(member)`` says whether the kernel still holds datagrams for the member's socket
    that the loop has not read (an answer may be among them: no miss yet).
    """

    def __init__(
        self,
        config: GroupConfig,
        rng: random.Random,
        lag: LagMeter | None = None,
        queued: Callable[[Hashable], bool] | None = None,
    ) -> None:
        self.config = config
        self._rng = rng
        self._lag = lag
        self._queued = queued
        self._groups: dict[GroupKey, _Group] = {}
        self._member_group: dict[Hashable, GroupKey] = {}
        self._timers: Scheduler[tuple[str, Hashable], None] = Scheduler()
        self._asked_at: dict[Hashable, float] = {}  # nat members: when last asked anything

    def __len__(self) -> int:
        return len(self._groups)

    def status(self, key: GroupKey) -> GroupStatus | None:
        g = self._groups.get(key)
        if g is None:
            return None
        outstanding = tuple((m, p.reason) for m, p in g.probes.items())
        return GroupStatus(g.state, len(g.members), g.misses, outstanding)

    @property
    def members(self) -> int:
        return len(self._member_group)

    @property
    def timers(self) -> int:
        return len(self._timers)

    def states(self) -> dict[str, int]:
        """Groups by state (a copy of the values first: a metric reader's thread calls it)."""
        counts = dict.fromkeys((v.value for v in Verdict), 0)
        for g in list(self._groups.values()):
            counts[g.state.value] += 1
        return counts

    def verdict_of(self, member: Hashable) -> Verdict | None:
        key = self._member_group.get(member)
        return None if key is None else self._groups[key].state

    def last_answer(self, member: Hashable) -> float | None:
        """When the member's group last heard from any member: shared-fate freshness."""
        key = self._member_group.get(member)
        return None if key is None else self._groups[key].last_answer

    def next_deadline(self) -> float | None:
        return self._timers.next_deadline()

    def add(
        self,
        member: Hashable,
        key: GroupKey,
        now: float,
        *,
        nat: bool = False,
        failed: bool = False,
    ) -> Verdict:
        """Join ``member`` to ``key``'s group (leaving any other); returns the group's verdict.
        A new group probes first at a random phase of the interval, so groups spread out.
        Joining again with other flags only updates them."""
        if self._member_group.get(member) == key:
            same = self._groups[key]
            self._flag(same, member, nat=nat, failed=failed, now=now)
            return same.state
        self.remove(member)
        g = self._groups.get(key)
        if g is None:
            g = self._groups[key] = _Group(key, confirm_ready=now)
            phase = self._rng.uniform(0, self.config.interval)
            self._timers.schedule(("probe", key), now + phase, None)
        g.members[member] = None
        self._member_group[member] = key
        self._flag(g, member, nat=nat, failed=failed, now=now)
        return g.state

    def _flag(self, g: _Group, member: Hashable, *, nat: bool, failed: bool, now: float) -> None:
        if failed:
            g.failed[member] = None
        else:
            g.failed.pop(member, None)
        interval = self.config.nat_interval
        if nat and interval is not None:
            if member not in self._asked_at:
                self._asked_at[member] = now
                self._timers.schedule(("nat", member), now + self._jittered(interval), None)
        elif self._asked_at.pop(member, None) is not None:
            self._timers.cancel(("nat", member))

    def remove(self, member: Hashable) -> None:
        """Forget ``member`` and its outstanding probe; an empty group goes away."""
        key = self._member_group.pop(member, None)
        if key is None:
            return
        g = self._groups[key]
        self._settle(g, member)
        del g.members[member]
        g.tried.discard(member)
        g.failed.pop(member, None)
        if self._asked_at.pop(member, None) is not None:
            self._timers.cancel(("nat", member))
        if not g.members:
            del self._groups[key]
            self._timers.cancel(("probe", key))
            self._timers.cancel(("confirm", key))
        elif g.state is Verdict.SUSPECT:  # its probe may be missing from the sample
            self._timers.schedule(("confirm", key), g.confirm_ready, None)

    def tick(self, now: float) -> list[Command]:
        """Run what is due: representative probes, confirmation batches, answer timeouts.
        Read the sockets first: an answer already queued must not count as a miss."""
        out: list[Command] = []
        for (kind, ref), _ in self._timers.due(now):
            if kind == "timeout":
                self._timeout(ref, now, out)
                continue
            if kind == "nat":
                self._nat(ref, now, out)
                continue
            assert isinstance(ref, GroupKey)
            if kind == "probe":
                self._representative(self._groups[ref], now, out)
            else:
                self._confirm(self._groups[ref], now, out)
        return out

    def on_answer(self, member: Hashable, rtt: float | None, now: float) -> list[Command]:
        """Any answer (or packet) from ``member``: the group is alive, whatever it missed."""
        key = self._member_group.get(member)
        if key is None:
            return []
        g = self._groups[key]
        self._settle(g, member)
        if rtt is not None and rtt > 0:
            if g.rtt is None:
                g.rtt, g.rtt_var = rtt, rtt / 2
            else:
                g.rtt_var = 0.75 * g.rtt_var + 0.25 * abs(g.rtt - rtt)
                g.rtt = 0.875 * g.rtt + 0.125 * rtt
        g.epoch += 1
        g.misses = 0
        g.last_answer = now
        g.tried.clear()
        self._timers.cancel(("confirm", key))
        was, g.state = g.state, Verdict.ALIVE
        if was is Verdict.DEAD:
            return [GroupVerdict(key, Verdict.ALIVE, tuple(g.members))]
        return []

    def on_miss(self, member: Hashable, now: float) -> list[Command]:
        """The outstanding probe of ``member`` failed outright (send error, ICMP unreachable).
        Silence is judged here, by the answer timeouts; without a probe, nothing counts."""
        key = self._member_group.get(member)
        out: list[Command] = []
        if key is not None and member in self._groups[key].probes:
            self._missed(self._groups[key], member, now, out)
        return out

    def suspect(self, member: Hashable, now: float) -> list[Command]:
        """The owner's own evidence that ``member`` is silent (a connection judged its active
        path dead): the group starts confirming, but the report is not a miss. Only the
        sample's silence counts: a burst that lost a few connections' flights (a full
        receive buffer at the peer) must not move every connection that shares the link."""
        key = self._member_group.get(member)
        out: list[Command] = []
        if key is None:
            return out
        g = self._groups[key]
        if g.state is Verdict.ALIVE:
            g.state = Verdict.SUSPECT
            g.tried = {member}
            self._confirm(g, now, out)
        return out

    def evidence(self, member: Hashable, now: float, *, local: bool = False) -> list[Command]:
        """An ICMP net/host unreachable or a local send error on ``member``'s socket: the group
        is suspect at once and ``member`` is asked one question now. ICMP is unauthenticated,
        so the error alone decides nothing; that question unanswered makes the group dead
        (the error plus our own silence), any answer clears it. More ICMP errors while the
        question is out change nothing; a ``local`` send error then is that question failing
        to leave at all (no route, link down): the group is dead at once."""
        key = self._member_group.get(member)
        out: list[Command] = []
        if key is None:
            return out
        g = self._groups[key]
        asked = g.probes.get(member)
        if asked is not None and asked.confirms_evidence:
            if local:
                self._missed(g, member, now, out)
            return out
        self._settle(g, member)  # an older question on it: superseded, proves nothing
        if g.state is Verdict.ALIVE:
            g.state = Verdict.SUSPECT
            g.tried = {member}
        g.tried.add(member)
        self._probe(g, member, ProbeReason.CONFIRM, now, out, confirms_evidence=True)
        return out

    def withdraw(self, member: Hashable, now: float) -> list[Command]:
        """The probe of ``member`` could not be sent (no CID, closing): it proves nothing
        either way; the confirmation asks someone else if it still needs an answer."""
        key = self._member_group.get(member)
        out: list[Command] = []
        if key is not None and self._settle(self._groups[key], member) is not None:
            self._confirm(self._groups[key], now, out)
        return out

    # ------------------------------------------------------------------ internals

    def _jittered(self, interval: float) -> float:
        j = self.config.jitter
        return interval * (1 + self._rng.uniform(-j, j))

    def _nat(self, member: Hashable, now: float, out: list[Command]) -> None:
        interval = self.config.nat_interval
        key = self._member_group.get(member)
        if interval is None or key is None or member not in self._asked_at:
            return
        due = self._asked_at[member] + interval
        if due <= now and member not in self._groups[key].probes:
            self._asked_at[member] = now
            out.append(ProbeMember(key, member, ProbeReason.NAT))
            due = now + interval
        # Asked by the rotation meanwhile (or busy being asked): look again a period later,
        # never in the past (a past deadline would make the owner's timer look late).
        at = due + self._jittered(interval) - interval
        self._timers.schedule(("nat", member), max(at, now + 0.5 * interval), None)

    def _representative(self, g: _Group, now: float, out: list[Command]) -> None:
        jitter = self._rng.uniform(-self.config.jitter, self.config.jitter)
        self._timers.schedule(("probe", g.key), now + self.config.interval * (1 + jitter), None)
        if g.state is Verdict.SUSPECT or g.rep is not None:
            return  # confirming, or the last representative has not been answered yet
        member = self._next_in_rotation(g)
        if member is not None:
            g.rep = member
            self._probe(g, member, ProbeReason.REPRESENTATIVE, now, out)

    def _next_in_rotation(self, g: _Group) -> Hashable | None:
        for member in g.failed:  # its own evidence failed it: re-try it first, in turn
            if member not in g.probes:
                del g.failed[member]
                g.failed[member] = None  # to the back of the failed members' queue
                return member
        for _ in range(2):  # the rest of this round, then one fresh round
            while g.pos < len(g.rotation):
                member = g.rotation[g.pos]
                g.pos += 1
                if member in g.members and member not in g.probes:
                    return member
            g.rotation, g.pos = list(g.members), 0
        return None

    def _confirm(self, g: _Group, now: float, out: list[Command]) -> None:
        if g.state is not Verdict.SUSPECT:
            return
        pending = sum(p.epoch == g.epoch for p in g.probes.values())
        needed = self.config.threshold - g.misses - pending
        if needed <= 0:
            return
        if now < g.confirm_ready:
            self._timers.schedule(("confirm", g.key), g.confirm_ready, None)
            return
        picks = self._sample(g, min(needed, self.config.confirm_batch))
        for member in picks:
            g.tried.add(member)
            self._probe(g, member, ProbeReason.CONFIRM, now, out)
        if picks:  # else every member is being asked: the next outcome calls again
            g.confirm_ready = now + self.config.confirm_pace
            if len(picks) < needed:
                self._timers.schedule(("confirm", g.key), g.confirm_ready, None)

    def _sample(self, g: _Group, k: int) -> list[Hashable]:
        """Members not asked yet in this confirmation; when they run out, any idle member."""
        idle = [m for m in g.members if m not in g.probes and m not in g.tried]
        if len(idle) < k:
            g.tried.clear()
            idle = [m for m in g.members if m not in g.probes]
        return self._rng.sample(idle, min(k, len(idle)))

    def _probe(
        self,
        g: _Group,
        m: Hashable,
        why: ProbeReason,
        now: float,
        out: list[Command],
        *,
        confirms_evidence: bool = False,
    ) -> None:
        c = self.config
        wait = c.initial_wait
        if g.rtt is not None:
            wait = max(c.min_wait, c.answer_rtts * g.rtt + 4 * g.rtt_var)
        g.probes[m] = _Probe(why, now, wait, g.epoch, confirms_evidence=confirms_evidence)
        if m in self._asked_at:
            self._asked_at[m] = now  # a question is also a NAT keep-alive
        self._timers.schedule(("timeout", m), now + wait, None)
        out.append(ProbeMember(g.key, m, why))

    def _timeout(self, member: Hashable, now: float, out: list[Command]) -> None:
        g = self._groups[self._member_group[member]]
        probe = g.probes.get(member)
        if probe is None:  # settled earlier in this very tick
            return
        later = now if self._lag is None else self._lag.judge_at(probe.sent, probe.wait, now)
        cap = probe.sent + max(STARVED_CAP * probe.wait, 2.0)
        if later > now and now < cap:  # the loop was starved: wait until it could read
            self._timers.schedule(("timeout", member), min(later, cap), None)
            return
        if probe.rechecks < MAX_RECHECKS and self._queued is not None and self._queued(member):
            # The answer may be waiting in the socket: the loop reads it before we look again.
            probe.rechecks += 1
            self._timers.schedule(("timeout", member), now + RECHECK_AFTER, None)
            return
        self._missed(g, member, now, out)

    def _missed(self, g: _Group, member: Hashable, now: float, out: list[Command]) -> None:
        probe = self._settle(g, member)
        if probe is not None and probe.epoch == g.epoch:
            g.misses += 1
            if g.state is Verdict.ALIVE:
                g.state = Verdict.SUSPECT
                g.tried = {member}
            if g.state is Verdict.SUSPECT and (
                g.misses >= self.config.threshold or probe.confirms_evidence
            ):
                self._declare_dead(g, out)
        self._confirm(g, now, out)  # also after a stale miss: its member may be needed

    def _declare_dead(self, g: _Group, out: list[Command]) -> None:
        g.state = Verdict.DEAD
        self._timers.cancel(("confirm", g.key))
        out.append(GroupVerdict(g.key, Verdict.DEAD, tuple(g.members)))

    def _settle(self, g: _Group, member: Hashable) -> _Probe | None:
        probe = g.probes.pop(member, None)
        if probe is not None:
            self._timers.cancel(("timeout", member))
        if g.rep == member:
            g.rep = None
        return probe
