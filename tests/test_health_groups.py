"""Shared-fate health groups on a fake clock: traffic per group, confirmation, fan-out, lag."""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.health import HealthConfig, Verdict
from actors.health_groups import (
    Command,
    GroupConfig,
    GroupKey,
    GroupVerdict,
    HealthGroups,
    ProbeMember,
    ProbeReason,
)
from actors.scheduler import LagMeter

A = GroupKey("192.0.2.10", "198.51.100.1")
B = GroupKey("eth1", "198.51.100.1")


@dataclass
class Net:
    """The owner and the network: wakes at each deadline (``late`` seconds late when the
    loop is starved), reads queued answers before ticking, answers probes after ``rtt``."""

    groups: HealthGroups
    meter: LagMeter | None = None
    up: bool = True
    mute: set[Hashable] = field(default_factory=set)
    rtt: float = 0.01
    read_first: bool = True  # read the socket before ticking, as the owner should
    now: float = 0.0
    probes: list[tuple[float, ProbeMember]] = field(default_factory=list)
    verdicts: list[tuple[float, GroupVerdict]] = field(default_factory=list)
    _answers: list[tuple[float, int, Hashable]] = field(default_factory=list)
    _seq: int = 0

    def feed(self, commands: Sequence[Command]) -> None:
        for c in commands:
            if isinstance(c, GroupVerdict):
                self.verdicts.append((self.now, c))
                continue
            self.probes.append((self.now, c))
            if self.up and c.member not in self.mute:
                self._seq += 1
                heapq.heappush(self._answers, (self.now + self.rtt, self._seq, c.member))

    def run(self, until: float, late: float = 0.0) -> None:
        while True:
            deadline = self.groups.next_deadline()
            d = math.inf if deadline is None else deadline
            a = self._answers[0][0] if self._answers else math.inf
            if min(d, a) > until:
                break
            if a <= d and not late:  # a starved loop reads only when it wakes
                _, _, member = heapq.heappop(self._answers)
                self.now = max(self.now, a)
                self.feed(self.groups.on_answer(member, self.rtt, self.now))
                continue
            self.now = max(self.now, d + late)
            if self.meter is not None:
                self.meter.on_fire(d, self.now)
            if self.read_first:
                self.read()
            self.feed(self.groups.tick(self.now))
            self.read()
        self.now = max(self.now, until)

    def holds(self, member: Hashable) -> bool:
        """The kernel holds an answer for ``member`` that the owner has not read yet."""
        return any(t <= self.now and m == member for t, _, m in self._answers)

    def read(self) -> None:
        """What waited in the socket while the loop did not run."""
        while self._answers and self._answers[0][0] <= self.now:
            _, _, member = heapq.heappop(self._answers)
            self.feed(self.groups.on_answer(member, self.rtt, self.now))

    def run_until_state(self, key: GroupKey, state: Verdict, limit: float = 20.0) -> None:
        end = self.now + limit
        while (s := self.groups.status(key)) is None or s.state is not state:
            assert self.now < end, f"{key} never became {state}"
            self.run(until=self.now + 0.01)

    def reasons(self, since: float = -1.0) -> Counter[ProbeReason]:
        return Counter(p.reason for t, p in self.probes if t >= since)


def make(config: GroupConfig | None = None, meter: LagMeter | None = None, seed: int = 1) -> Net:
    groups = HealthGroups(config or GroupConfig(), random.Random(seed), lag=meter)
    return Net(groups, meter=meter)


def populate(net: Net, keys: Sequence[GroupKey], per_group: int) -> list[Hashable]:
    members: list[Hashable] = []
    for key in keys:
        for i in range(per_group):
            member = (key, i)
            net.groups.add(member, key, net.now)
            members.append(member)
    return members


# ------------------------------------------------------------------ traffic and rotation


@pytest.mark.parametrize(("groups", "per_group"), [(2, 500), (100, 10)])
def test_probes_grow_with_groups_not_members(groups: int, per_group: int) -> None:
    """1000 paths: ~one representative probe per group per interval, over 100 intervals."""
    net = make()
    keys = [GroupKey(f"10.0.{g}.1", "203.0.113.7") for g in range(groups)]
    populate(net, keys, per_group)
    net.run(until=100.0)
    assert net.reasons() == Counter({ProbeReason.REPRESENTATIVE: len(net.probes)})
    assert 0.95 * groups * 100 <= len(net.probes) <= 1.05 * groups * 100
    per_second = Counter(int(t) for t, _ in net.probes)
    assert max(per_second.values()) <= 2 * groups  # spread by phase and jitter, no bursts
    per_member = Counter(p.member for _, p in net.probes)
    assert max(per_member.values()) <= math.ceil(100 * 1.25 / per_group)
    assert net.verdicts == []


def test_rotation_visits_every_member_once_per_round() -> None:
    net = make(GroupConfig(jitter=0.0))
    members = populate(net, [A], 5)
    net.run(until=5.0)
    first = [p.member for _, p in net.probes]
    assert sorted(first, key=str) == sorted(members, key=str)  # each once
    late = ("late", 0)
    net.groups.add(late, A, net.now)  # joins at the next round
    net.run(until=11.0)
    rounds = [p.member for _, p in net.probes]
    assert Counter(rounds[:10]) == Counter({m: 2 for m in members})
    assert rounds[10] == late


# ------------------------------------------------------------------ confirmation and verdicts


def go_dead(net: Net) -> float:
    """Answered for 5 s (an RTT sample sets the answer wait), then the link goes."""
    net.run(until=5.0)
    net.up = False
    return net.now


def test_a_representative_miss_probes_a_sample_before_any_verdict() -> None:
    net = make(GroupConfig(threshold=3, confirm_batch=2))
    members = populate(net, [A], 10)
    down = go_dead(net)
    net.run_until_state(A, Verdict.SUSPECT)  # the next representative went out, missed
    assert net.verdicts == []
    after = [(t, p) for t, p in net.probes if t >= down]
    rep_at, rep = after[0]
    assert rep.reason is ProbeReason.REPRESENTATIVE
    confirms = [p for _, p in after[1:]]
    assert [p.reason for p in confirms] == [ProbeReason.CONFIRM] * 2
    assert rep.member not in {p.member for p in confirms}
    assert len({p.member for p in confirms}) == 2
    net.run(until=down + 10.0)
    assert len(net.verdicts) == 1  # one command for the group, not one per member
    when, verdict = net.verdicts[0]
    assert verdict == GroupVerdict(A, Verdict.DEAD, tuple(members))
    assert when > rep_at and net.groups.status(A) is not None
    assert net.reasons(since=down)[ProbeReason.CONFIRM] == 2


def test_status_shows_suspect_while_confirming() -> None:
    net = make(GroupConfig(threshold=3, confirm_batch=2))
    populate(net, [A], 4)
    go_dead(net)
    net.run_until_state(A, Verdict.SUSPECT)
    status = net.groups.status(A)
    assert status is not None and status.state is Verdict.SUSPECT and status.misses == 1
    assert Counter(r for _, r in status.outstanding) == Counter({ProbeReason.CONFIRM: 2})
    assert net.verdicts == []


def test_confirmation_is_paced_in_batches() -> None:
    net = make(GroupConfig(threshold=6, confirm_batch=2, confirm_pace=0.5))
    populate(net, [A], 20)
    down = go_dead(net)
    net.run(until=down + 10.0)
    confirm_times = [t for t, p in net.probes if p.reason is ProbeReason.CONFIRM]
    assert len(confirm_times) == 5  # threshold - 1: only what is still needed
    batches = sorted(Counter(confirm_times).items())
    assert [n for _, n in batches] == [2, 2, 1]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(batches)]
    assert all(gap >= 0.5 - 1e-9 for gap in gaps)
    assert [v.verdict for _, v in net.verdicts] == [Verdict.DEAD]


def test_an_answer_while_confirming_clears_the_suspicion() -> None:
    net = make(GroupConfig(threshold=3, confirm_batch=2))
    members = populate(net, [A], 6)
    go_dead(net)
    net.run_until_state(A, Verdict.SUSPECT)
    assert net.groups.on_answer(members[0], 0.01, net.now) == []  # no verdict was declared
    status = net.groups.status(A)
    assert status is not None and (status.state, status.misses) == (Verdict.ALIVE, 0)
    net.run(until=net.now + 0.5)  # the sample's misses are older than the answer
    status = net.groups.status(A)
    assert status is not None and (status.state, status.misses) == (Verdict.ALIVE, 0)
    assert net.verdicts == []


def test_recovery_fans_out_alive_once() -> None:
    net = make()
    members = populate(net, [A, B], 3)
    down = go_dead(net)
    net.run(until=down + 10.0)
    assert sorted((v.group.local, v.verdict) for _, v in net.verdicts) == [
        (A.local, Verdict.DEAD),
        (B.local, Verdict.DEAD),
    ]
    net.up = True  # the link is back: the rotation, still running, notices
    net.run(until=down + 20.0)
    recovered = [v for _, v in net.verdicts[2:]]
    assert sorted(v.group.local for v in recovered) == [A.local, B.local]
    assert all(v.verdict is Verdict.ALIVE for v in recovered)
    assert {m for v in recovered for m in v.members} == set(members)


def test_a_late_answer_revives_and_a_probe_older_than_an_answer_proves_nothing() -> None:
    net = make(GroupConfig(threshold=2, initial_wait=0.5))
    members = populate(net, [A], 3)
    net.up = False
    net.run_until_state(A, Verdict.DEAD)
    while not (status := net.groups.status(A)) or not status.outstanding:
        net.run(until=net.now + 0.01)  # the rotation goes on: wait for a probe in flight
    ghost = status.outstanding[0][0]
    other = next(m for m in members if m != ghost)
    net.feed(net.groups.on_answer(other, None, net.now))  # traffic, from another member
    assert [v.verdict for _, v in net.verdicts] == [Verdict.DEAD, Verdict.ALIVE]
    net.run(until=net.now + 0.5 + 1e-6)  # the ghost probe times out: sent before the answer
    status = net.groups.status(A)
    assert status is not None and (status.state, status.misses) == (Verdict.ALIVE, 0)
    assert len(net.verdicts) == 2


def test_a_lone_member_is_dead_after_threshold_misses_of_its_own() -> None:
    net = make(GroupConfig(threshold=3))
    populate(net, [A], 1)
    down = go_dead(net)
    net.run(until=down + 10.0)
    after = [p for t, p in net.probes if t >= down]
    assert [p.reason for p in after[:3]] == [
        ProbeReason.REPRESENTATIVE,
        ProbeReason.CONFIRM,
        ProbeReason.CONFIRM,
    ]
    assert [v.verdict for _, v in net.verdicts] == [Verdict.DEAD]


def test_an_explicit_miss_counts_at_once_and_only_for_an_outstanding_probe() -> None:
    net = make(GroupConfig(threshold=2, confirm_batch=1))
    members = populate(net, [A], 2)
    assert net.groups.on_miss(members[0], 0.0) == []  # nothing was asked: nothing learnt
    net.up = False
    net.run(until=1.0)
    (_, rep), *_ = net.probes
    commands = net.groups.on_miss(rep.member, net.now)  # ICMP unreachable
    assert [type(c) for c in commands] == [ProbeMember]
    (confirm,) = commands
    assert isinstance(confirm, ProbeMember) and confirm.member != rep.member
    (verdict,) = net.groups.on_miss(confirm.member, net.now)
    assert verdict == GroupVerdict(A, Verdict.DEAD, tuple(members))


@pytest.mark.parametrize("answered", [False, True])
def test_socket_error_evidence_is_confirmed_by_one_question_of_our_own(answered: bool) -> None:
    """An ICMP unreachable (unauthenticated) makes the group suspect and asks that member at
    once; more errors meanwhile change nothing. Unanswered: dead without ``threshold``
    misses; answered: alive, nothing declared."""
    net = make(GroupConfig(threshold=3))
    members = populate(net, [A], 5)
    net.run(until=5.0)  # an RTT sample: the answer wait is short
    net.up = answered
    asked = len(net.probes)
    net.feed(net.groups.evidence(members[2], net.now))
    (_, question), *_ = net.probes[asked:]
    assert question == ProbeMember(A, members[2], ProbeReason.CONFIRM)
    status = net.groups.status(A)
    assert status is not None and status.state is Verdict.SUSPECT
    assert net.groups.evidence(members[2], net.now) == []  # already being confirmed
    net.run(until=net.now + 0.5)
    if answered:
        assert net.verdicts == []
        assert net.groups.verdict_of(members[0]) is Verdict.ALIVE
    else:
        assert [v.verdict for _, v in net.verdicts] == [Verdict.DEAD]
        assert net.reasons(since=5.0)[ProbeReason.CONFIRM] == 1  # no sample was needed


def test_a_confirming_question_that_cannot_leave_is_a_miss_at_once() -> None:
    """A local send error (no route: the link is down here) while the confirming question is
    out is that question failing to leave: the group is dead at once, no answer wait."""
    net = make(GroupConfig(threshold=3))
    members = populate(net, [A], 5)
    net.run(until=5.0)
    net.up = False
    net.feed(net.groups.evidence(members[1], net.now, local=True))  # the first send error
    assert net.verdicts == []  # suspect, one question out
    net.feed(net.groups.evidence(members[1], net.now, local=True))  # that question's sendto
    assert [v.verdict for _, v in net.verdicts] == [Verdict.DEAD]


# ------------------------------------------------------------------ membership


def test_removing_the_representative_drops_its_probe() -> None:
    net = make(GroupConfig(jitter=0.0))
    populate(net, [A], 3)
    net.up = False
    net.run(until=1.0)
    (_, rep), *_ = net.probes
    net.groups.remove(rep.member)
    net.run(until=1.0 + 0.9)
    status = net.groups.status(A)
    assert status is not None and (status.state, status.misses, status.members) == (
        Verdict.ALIVE,
        0,
        2,
    )
    net.run(until=2.5)  # the next representative is another member
    assert net.probes[1][1].member != rep.member


def test_removing_members_mid_confirmation() -> None:
    net = make(GroupConfig(threshold=3, confirm_batch=2))
    members = populate(net, [A], 6)
    down = go_dead(net)
    while not any(p.reason is ProbeReason.CONFIRM for _, p in net.probes):
        net.run(until=net.now + 0.01)
    sample = [p.member for _, p in net.probes if p.reason is ProbeReason.CONFIRM]
    rep = next(p.member for t, p in net.probes if t >= down)
    for gone in (*sample, rep):  # the whole sample and the missed representative leave
        net.groups.remove(gone)
    net.run(until=net.now + 10.0)
    replacements = [p for _, p in net.probes if p.reason is ProbeReason.CONFIRM][2:]
    assert len(replacements) == 2 and not {p.member for p in replacements} & set(sample)
    remaining = tuple(m for m in members if m not in (*sample, rep))
    assert [v for _, v in net.verdicts] == [GroupVerdict(A, Verdict.DEAD, remaining)]


def test_an_emptied_group_goes_away_without_a_verdict() -> None:
    net = make()
    members = populate(net, [A], 4)
    go_dead(net)
    net.run_until_state(A, Verdict.SUSPECT)
    for m in members:
        net.groups.remove(m)
    assert len(net.groups) == 0 and net.groups.status(A) is None
    assert net.groups.next_deadline() is None
    net.run(until=100.0)
    assert net.verdicts == []


def test_add_tells_the_verdict_and_moves_a_member_between_groups() -> None:
    net = make()
    members = populate(net, [A], 2)
    net.up = False
    net.run(until=10.0)
    assert net.groups.add(("new", 0), A, net.now) is Verdict.DEAD
    assert net.groups.add(("new", 0), A, net.now) is Verdict.DEAD  # idempotent
    assert net.groups.add(members[0], B, net.now) is Verdict.ALIVE  # re-keyed: a new group
    status_a, status_b = net.groups.status(A), net.groups.status(B)
    assert status_a is not None and status_a.members == 2
    assert status_b is not None and status_b.members == 1
    net.groups.remove(("unknown", 9))  # harmless
    assert net.groups.on_answer(("unknown", 9), 0.01, net.now) == []


# ------------------------------------------------------------------ a starved loop


def test_a_starved_loop_judges_late_but_judges() -> None:
    """Every wake-up of the loop is 1 s late: silence the loop could not read counts only
    up to the starved cap (10 answer waits, at least 2 s), so a live peer whose answers are
    read is never judged, and a dead one is judged (later than on an on-time loop)."""
    live = make(meter=LagMeter())
    populate(live, [A, B], 50)
    live.run(until=5.0)
    live.run(until=200.0, late=1.0)
    assert live.verdicts == []

    on_time = make(meter=LagMeter())
    populate(on_time, [A], 50)
    down = go_dead(on_time)
    on_time.run_until_state(A, Verdict.DEAD)
    quick = on_time.verdicts[0][0] - down

    starved = make(meter=LagMeter())
    populate(starved, [A], 50)
    down = go_dead(starved)
    starved.run(until=down + 200.0, late=1.0)
    assert [v.verdict for _, v in starved.verdicts] == [Verdict.DEAD]
    assert starved.verdicts[0][0] - down > quick


@pytest.mark.parametrize("protected", [True, False])
def test_answers_queued_during_a_freeze_are_not_misses(protected: bool) -> None:
    """Every wake-up is 20 s late (past the starved cap) and the owner ticks before reading
    its socket: the answers are there, unread. With the meter and the kernel-queue check,
    no suspicion; without them, one per wake-up."""
    net = make(meter=LagMeter() if protected else None)
    if protected:
        net.groups = HealthGroups(GroupConfig(), random.Random(1), net.meter, net.holds)
    populate(net, [A], 10)
    net.run(until=5.0)
    net.read_first = False
    net.run(until=net.now + 300.0, late=20.0)
    assert net.verdicts == []
    confirms = net.reasons(since=5.0)[ProbeReason.CONFIRM]
    assert confirms == 0 if protected else confirms > 0


def test_a_socket_that_holds_datagrams_is_read_before_a_miss_counts() -> None:
    """No lag meter, and the owner ticks before reading: the kernel-queue check alone keeps
    waiting answers from being misses. A socket that never empties (someone else's flood) is
    re-checked a bounded number of times, then the silence counts."""
    net = make()
    net.groups = HealthGroups(GroupConfig(), random.Random(1), queued=net.holds)
    populate(net, [A], 10)
    net.run(until=5.0)
    net.read_first = False
    net.run(until=net.now + 300.0, late=20.0)
    assert net.verdicts == []
    assert net.reasons(since=5.0)[ProbeReason.CONFIRM] == 0

    flooded = make()
    flooded.groups = HealthGroups(GroupConfig(), random.Random(1), queued=lambda m: True)
    populate(flooded, [A], 10)
    go_dead(flooded)
    flooded.run_until_state(A, Verdict.DEAD, limit=30.0)


# ------------------------------------------------------------------ config


def test_config_from_health_and_validation() -> None:
    health = HealthConfig(keepalive_interval=2.0, jitter=0.1, failures_to_fail=1)
    config = GroupConfig.from_health(health)
    assert (config.interval, config.jitter, config.threshold) == (2.0, 0.1, 2)
    for bad in (
        {"interval": 0.0},
        {"jitter": 1.0},
        {"min_wait": 0.0},
        {"threshold": 1},
        {"confirm_batch": 0},
        {"confirm_pace": -1.0},
    ):
        with pytest.raises(ValueError):
            GroupConfig(**bad)


# ------------------------------------------------------------------ invariants


_op = st.one_of(
    st.tuples(st.just("add"), st.integers(0, 9), st.integers(0, 2)),
    st.tuples(st.just("remove"), st.integers(0, 9), st.just(0)),
    st.tuples(st.just("advance"), st.integers(1, 30), st.just(0)),
    st.tuples(st.just("stall"), st.integers(1, 50), st.just(0)),
    st.tuples(st.just("answer"), st.integers(0, 20), st.just(0)),
    st.tuples(st.just("miss"), st.integers(0, 20), st.just(0)),
    st.tuples(st.just("traffic"), st.integers(0, 9), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=80), st.integers(0, 2**16), st.integers(2, 4))
def test_state_machine_invariants(
    ops: list[tuple[str, int, int]], seed: int, threshold: int
) -> None:
    """Random membership, outcomes, time and stalls. Never DEAD without ``threshold``
    probes of the group since its last answer; never DEAD in a stalled turn unless the stall
    outlasted the starved cap (2 s here: then the kernel-queue check, not modelled here,
    is what reads a waiting answer first); verdicts alternate and list the members; at most
    one representative outstanding per group."""
    config = GroupConfig(threshold=threshold, confirm_batch=2, confirm_pace=0.2, initial_wait=0.3)
    meter = LagMeter()
    groups = HealthGroups(config, random.Random(seed), lag=meter)
    keys = [GroupKey(f"10.0.0.{k}", "192.0.2.1") for k in range(3)]
    where: dict[Hashable, GroupKey] = {}
    since_answer: Counter[GroupKey] = Counter()
    last: dict[GroupKey, Verdict] = {}
    now = 0.0

    def check(commands: list[Command], stalled: float = 0.0) -> None:
        probed = [c.member for c in commands if isinstance(c, ProbeMember)]
        assert len(probed) == len(set(probed))
        for c in commands:
            if isinstance(c, ProbeMember):
                assert where.get(c.member) == c.group
                since_answer[c.group] += 1
                continue
            assert set(c.members) == {m for m, k in where.items() if k == c.group}
            assert len(c.members) == len(set(c.members))
            if c.verdict is Verdict.DEAD:
                assert stalled < 0.005 or stalled >= 2.0
                assert since_answer[c.group] >= threshold
                assert last.get(c.group, Verdict.ALIVE) is Verdict.ALIVE
            else:
                assert last.get(c.group) is Verdict.DEAD
            last[c.group] = c.verdict
        for key in keys:
            status = groups.status(key)
            if status is None:
                assert key not in where.values()
                since_answer.pop(key, None)
                last.pop(key, None)
                continue
            reps = [m for m, r in status.outstanding if r is ProbeReason.REPRESENTATIVE]
            assert len(reps) <= 1
            assert all(where.get(m) == key for m, _ in status.outstanding)
            if status.state is Verdict.DEAD:
                assert status.misses >= threshold

    def outstanding() -> list[Hashable]:
        found: list[Hashable] = []
        for key in keys:
            status = groups.status(key)
            found += [m for m, _ in status.outstanding] if status else []
        return found

    for op, x, y in ops:
        if op == "add":
            old = where.get(x)
            groups.add(x, keys[y], now)
            where[x] = keys[y]
            if old is not None and old != keys[y] and old not in where.values():
                since_answer.pop(old, None)
                last.pop(old, None)
        elif op == "remove":
            groups.remove(x)
            where.pop(x, None)
        elif op in ("advance", "stall"):
            target = now + x / 10
            stalled = op == "stall"
            while (d := groups.next_deadline()) is not None and d <= target:
                now = max(now, target if stalled else d)
                meter.on_fire(d, now)
                check(groups.tick(now), stalled=now - d if stalled else 0.0)
                stalled = False
            now = target
        elif op in ("answer", "miss"):
            pending = outstanding()
            if pending:
                member = pending[x % len(pending)]
                if op == "answer":
                    since_answer[where[member]] = 0
                    check(groups.on_answer(member, 0.02, now))
                else:
                    check(groups.on_miss(member, now))
        elif x in where:  # traffic: any packet from a member
            since_answer[where[x]] = 0
            check(groups.on_answer(x, None, now))
        check([])


# ------------------------------------------------------------------ per-member duties


def test_nat_keepalives_are_per_standby_member_and_group_probes_per_group() -> None:
    """Over 300 s: group probes ~1 per group and interval whatever the members; NAT
    keep-alives one per nat member and period (the one duty that grows with paths), none
    for members without a NAT binding of their own to keep (the active paths)."""
    for per_group in (10, 400):
        net = make(GroupConfig(nat_interval=30.0))
        for key in (A, B):
            for i in range(per_group):
                net.groups.add((key, i), key, net.now, nat=i % 2 == 0)
        net.run(until=300.0)
        reasons = net.reasons()
        assert 0.9 * 2 * 300 <= reasons[ProbeReason.REPRESENTATIVE] <= 1.1 * 2 * 300
        nat_members = per_group  # half of 2 x per_group
        periods = 300 / 30
        # Minus the members the rotation happened to ask within their period.
        assert reasons[ProbeReason.NAT] <= nat_members * periods * 1.25
        assert reasons[ProbeReason.NAT] >= nat_members * (periods - 2) - 600
        nat_probed = {p.member for _, p in net.probes if p.reason is ProbeReason.NAT}
        assert all(member[1] % 2 == 0 for member in nat_probed)  # type: ignore[index]


def test_a_member_asked_by_the_rotation_needs_no_nat_keepalive_that_period() -> None:
    net = make(GroupConfig(interval=1.0, jitter=0.0, nat_interval=5.0))
    net.groups.add("only", A, net.now, nat=True)  # the rotation asks it every second
    net.run(until=60.0)
    assert net.reasons()[ProbeReason.NAT] == 0
    assert net.reasons()[ProbeReason.REPRESENTATIVE] >= 55


def test_a_failed_member_is_retried_first_in_the_rotation() -> None:
    net = make(GroupConfig(jitter=0.0))
    populate(net, [A], 1000)
    net.run(until=3.0)
    net.groups.add("lost", A, net.now, failed=True)
    net.run(until=5.0)
    reps = [p.member for t, p in net.probes if t > 3.0]
    assert reps[0] == "lost"  # not after a round of 1000 members
    net.groups.add("lost", A, net.now, failed=False)  # it answered: back to its turn
    net.run(until=10.0)
    assert [p.member for t, p in net.probes if t > 5.0].count("lost") == 0


def test_a_connections_own_dead_judgement_starts_the_groups_confirmation() -> None:
    """One connection judged its active path dead: its group confirms with a paced sample,
    and only the sample's silence makes the verdict that moves everyone."""
    net = make(GroupConfig(threshold=3, confirm_batch=2))
    members = populate(net, [A], 50)
    go_dead(net)
    net.feed(net.groups.suspect(members[0], net.now))
    status = net.groups.status(A)
    # A report is not a miss: only the sample's silence counts towards the verdict.
    assert status is not None and status.state is Verdict.SUSPECT and status.misses == 0
    assert net.verdicts == []
    confirm = net.reasons()[ProbeReason.CONFIRM]
    assert confirm == 2  # one batch at once
    for other in members[1:4]:  # more reports add no misses and no extra probes
        net.feed(net.groups.suspect(other, net.now))
    assert net.reasons()[ProbeReason.CONFIRM] == 2
    net.run_until_state(A, Verdict.DEAD)
    ((_, verdict),) = net.verdicts
    assert set(verdict.members) == set(members)


def test_reported_suspicion_is_cleared_by_any_answer() -> None:
    net = make(GroupConfig(threshold=3))
    members = populate(net, [A], 5)
    net.run(until=3.0)
    net.feed(net.groups.suspect(members[0], net.now))  # up: the sample answers
    net.run(until=6.0)
    status = net.groups.status(A)
    assert status is not None and status.state is Verdict.ALIVE and status.misses == 0
    assert net.verdicts == []


def test_a_probe_that_could_not_be_sent_is_withdrawn_not_missed() -> None:
    net = make(GroupConfig(threshold=2, confirm_batch=1))
    members = populate(net, [A], 3)
    net.up = False
    while not net.probes:  # until the first representative goes out (it would be missed)
        net.run(until=net.now + 0.01)
    status = net.groups.status(A)
    assert status is not None and len(status.outstanding) == 1
    ((member, _reason),) = status.outstanding
    net.feed(net.groups.withdraw(member, net.now))
    after = net.groups.status(A)
    assert after is not None and after.outstanding == () and after.misses == 0
    assert net.verdicts == []
    assert member in members


def test_group_freshness_is_its_latest_answer() -> None:
    net = make(GroupConfig(jitter=0.0))
    members = populate(net, [A], 3)
    assert net.groups.last_answer(members[0]) is None
    net.run(until=3.0)
    fresh = net.groups.last_answer(members[2])
    assert fresh is not None and 2.0 <= fresh <= 3.0  # answered for another member
    assert net.groups.last_answer("stranger") is None
