"""The supervisor's one timer heap and its lag meter, driven by a fake clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.scheduler import LagMeter, Scheduler

# ------------------------------------------------------------------ Scheduler


def test_due_pops_in_deadline_order_and_only_what_is_due() -> None:
    s: Scheduler[str, int] = Scheduler()
    s.schedule("c", 3.0, 3)
    s.schedule("a", 1.0, 1)
    s.schedule("b", 2.0, 2)
    assert len(s) == 3 and s.next_deadline() == 1.0
    assert s.due(0.5) == []
    assert s.due(2.0) == [("a", 1), ("b", 2)]
    assert s.next_deadline() == 3.0 and len(s) == 1
    assert s.due(10.0) == [("c", 3)]
    assert s.next_deadline() is None and len(s) == 0
    assert s.due(10.0) == []


def test_rescheduling_a_key_replaces_its_deadline_and_payload() -> None:
    s: Scheduler[str, str] = Scheduler()
    s.schedule("k", 5.0, "first")
    s.schedule("k", 1.0, "earlier")
    assert s.deadline("k") == 1.0 and s.next_deadline() == 1.0
    s.schedule("k", 7.0, "later")
    assert s.next_deadline() == 7.0  # the stale entries at 1.0 and 5.0 are skipped
    assert s.due(6.0) == []
    assert s.due(7.0) == [("k", "later")]  # once, not once per schedule
    assert s.due(100.0) == []


def test_cancel_forgets_a_deadline() -> None:
    s: Scheduler[str, None] = Scheduler()
    s.schedule("a", 1.0, None)
    s.schedule("b", 2.0, None)
    assert s.cancel("a") is True
    assert s.cancel("a") is False and s.cancel("never") is False
    assert "a" not in s and "b" in s and s.deadline("a") is None
    assert s.next_deadline() == 2.0
    assert s.due(5.0) == [("b", None)]
    assert s.cancel("b") is False  # fired: nothing left to cancel


def test_ties_fire_in_scheduling_order_and_a_reschedule_goes_last() -> None:
    s: Scheduler[str, None] = Scheduler()
    for key in "abcd":
        s.schedule(key, 1.0, None)
    s.schedule("b", 1.0, None)  # same deadline, scheduled again: behind the others now
    assert [k for k, _ in s.due(1.0)] == ["a", "c", "d", "b"]


def test_due_with_a_limit_keeps_the_rest_for_the_next_turn() -> None:
    s: Scheduler[int, None] = Scheduler()
    for i in range(5):
        s.schedule(i, float(i), None)
    assert [k for k, _ in s.due(10.0, limit=2)] == [0, 1]
    assert s.next_deadline() == 2.0
    assert [k for k, _ in s.due(10.0)] == [2, 3, 4]


def test_nan_deadlines_are_refused() -> None:
    s: Scheduler[str, None] = Scheduler()
    with pytest.raises(ValueError):
        s.schedule("k", math.nan, None)
    assert len(s) == 0


def test_stale_entries_are_compacted_so_memory_follows_live_timers() -> None:
    """A keep-alive rescheduled a million times must not leave a million heap entries."""
    s: Scheduler[tuple[str, int], int] = Scheduler()
    for i in range(100):
        s.schedule(("keepalive", i), 1000.0 + i, i)
    for round_ in range(50):
        for i in range(100):
            s.schedule(("keepalive", i), float(round_ * 100 + i), i)
            assert s.footprint <= 2 * len(s) + 1
    for i in range(0, 100, 2):
        s.cancel(("keepalive", i))
        assert s.footprint <= 2 * len(s) + 1
    assert len(s) == 50
    fired = s.due(math.inf)
    assert [payload for _, payload in fired] == list(range(1, 100, 2))


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("schedule"), st.integers(0, 5), st.integers(0, 20)),
        st.tuples(st.just("cancel"), st.integers(0, 5), st.just(0)),
        st.tuples(st.just("due"), st.just(0), st.integers(0, 25)),
        st.tuples(st.just("peek"), st.just(0), st.just(0)),  # it drops stale tops: not always
    ),
    max_size=150,
)


@settings(max_examples=500, deadline=None)
@given(_ops)
def test_scheduler_agrees_with_a_naive_model(ops: list[tuple[str, int, int]]) -> None:
    """Random schedule / cancel / due sequences: the heap with lazy deletion and compaction
    behaves like a dict scanned in full (integer deadlines make ties common)."""
    s: Scheduler[int, int] = Scheduler()
    model: dict[int, tuple[float, int, int]] = {}  # key -> (at, seq, payload)
    seq = 0
    for step, (op, key, value) in enumerate(ops):
        if op == "schedule":
            seq += 1
            s.schedule(key, float(value), step)
            model[key] = (float(value), seq, step)
        elif op == "cancel":
            assert s.cancel(key) == (model.pop(key, None) is not None)
        elif op == "peek":
            assert s.next_deadline() == min((at for at, _, _ in model.values()), default=None)
        else:
            expected = sorted(
                (k for k, (at, _, _) in model.items() if at <= value),
                key=lambda k: model[k][:2],
            )
            assert s.due(float(value)) == [(k, model[k][2]) for k in expected]
            for k in expected:
                del model[k]
        assert len(s) == len(model)
        assert s.footprint <= 2 * len(s) + 1


# ------------------------------------------------------------------ LagMeter


def test_an_on_time_timer_records_no_stall() -> None:
    meter = LagMeter(min_lag=0.005)
    assert meter.on_fire(due=1.0, now=1.002) == pytest.approx(0.002)
    assert meter.on_fire(due=2.0, now=1.999) == 0.0  # early (clock granularity): no lag
    assert meter.last_stall_end is None
    assert meter.discounted_silence(0.0, 3.0) == 3.0


def test_a_late_timer_is_a_stall_subtracted_from_silence() -> None:
    meter = LagMeter()
    assert meter.on_fire(due=10.0, now=14.0) == 4.0  # the loop ran nothing for 4 s
    assert meter.last_stall_end == 14.0
    assert meter.starved(0.0, 20.0) == 4.0
    assert meter.starved(12.0, 13.0) == 1.0  # part of the stall
    assert meter.starved(14.0, 20.0) == 0.0
    assert meter.lag(window=5.0, now=15.0) == 4.0
    assert meter.discounted_silence(last_receive=9.0, now=15.0) == 2.0  # 6 s, 4 s stalled
    assert meter.discounted_silence(last_receive=14.5, now=15.0) == 0.5


def test_overlapping_late_timers_count_the_stall_once() -> None:
    """Several timers due during one stall all fire late in the same turn."""
    meter = LagMeter()
    for due in (10.0, 10.5, 11.0, 13.9):
        meter.on_fire(due=due, now=14.0)
    meter.on_fire(due=9.0, now=12.0)  # an earlier, overlapping report extends it back
    assert meter.starved(0.0, 20.0) == 5.0
    meter.on_fire(due=20.0, now=21.0)
    assert meter.starved(0.0, 30.0) == 6.0
    assert meter.starved(13.0, 20.5) == pytest.approx(1.5)


def test_stalls_older_than_the_horizon_are_forgotten() -> None:
    meter = LagMeter(horizon=60.0)
    meter.on_fire(due=0.0, now=2.0)
    meter.on_fire(due=30.0, now=31.0)
    assert meter.starved(0.0, 40.0) == 3.0
    meter.on_fire(due=70.0, now=70.0)  # on time, but it moves the horizon
    assert meter.starved(0.0, 70.0) == 1.0
    meter.on_fire(due=100.0, now=100.0)
    assert meter.last_stall_end is None


def test_too_many_stalls_merge_and_over_count_never_under_count() -> None:
    meter = LagMeter(max_stalls=3)
    for i in range(5):
        meter.on_fire(due=10.0 * i, now=10.0 * i + 1)
    assert meter.starved(0.0, 100.0) >= 5.0  # merged gaps only add lag: never a false death
    assert meter.starved(35.0, 100.0) == 1.0  # recent stalls stay exact


def test_judge_at_waits_for_readable_time_after_a_stall() -> None:
    meter = LagMeter()
    # No stall: silence since 1.0 with a 0.5 s wait may be judged from 1.5 on.
    assert meter.judge_at(since=1.0, wait=0.5, now=2.0) == pytest.approx(1.5)
    # The loop froze from 1.2 to 9.0: the answer may be queued; run a read grace first.
    meter.on_fire(due=1.2, now=9.0)
    # 0.2 s of silence counted (1.0-1.2); 0.3 s more of running time is needed.
    assert meter.judge_at(since=1.0, wait=0.5, now=9.0) == pytest.approx(9.3)
    # Silence long enough already: only the read grace after the stall.
    assert meter.judge_at(since=1.0, wait=0.1, now=9.0) == pytest.approx(9.0 + meter.read_grace)
    assert meter.judge_at(since=1.0, wait=0.5, now=9.5) <= 9.5


def test_judge_at_under_a_cpu_quota_still_judges() -> None:
    """Throttled 50 ms of every 100 ms (a pod's CPU limit): silence counts at half speed, and
    a verdict still comes (a real black hole is noticed), about twice as late."""
    meter = LagMeter()
    t = 0.0
    while t < 2.0:
        meter.on_fire(due=t + 0.05, now=t + 0.1)
        t += 0.1
    at = meter.judge_at(since=0.0, wait=0.3, now=2.0)
    assert at <= 2.0 + meter.read_grace + 1e-9  # the last stall ended at 2.0: one read grace
    assert meter.discounted_silence(0.0, 2.0) == pytest.approx(1.0)


def test_lag_meter_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        LagMeter(min_lag=-1.0)
    with pytest.raises(ValueError):
        LagMeter(max_stalls=0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 50), st.integers(0, 10)), max_size=30),
    st.integers(0, 60),
    st.integers(0, 60),
)
def test_starved_is_the_measure_of_the_union_of_stalls(
    fires: list[tuple[int, int]], a: int, b: int
) -> None:
    meter = LagMeter(min_lag=0.0, horizon=1e9)
    covered: set[int] = set()  # unit cells [t, t+1) stalled, integer times make it exact
    for due, lag in fires:
        meter.on_fire(float(due), float(due + lag))
        covered.update(range(due, due + lag))
    start, end = min(a, b), max(a, b)
    assert meter.starved(float(start), float(end)) == pytest.approx(
        sum(1 for t in covered if start <= t < end)
    )
