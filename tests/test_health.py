"""Path health without sockets: the verdicts a failover policy acts on."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.health import ActiveLiveness, HealthConfig, Liveness, PathHealth, Verdict


def test_consecutive_losses_make_a_standby_path_dead_and_one_answer_revives_it() -> None:
    health = PathHealth(HealthConfig(failures_to_fail=3))
    health.on_answer(0.010, now=1.0)
    health.on_lost()
    health.on_lost()
    assert health.verdict is Verdict.SUSPECT
    health.on_lost()
    assert health.verdict is Verdict.DEAD
    health.on_answer(0.012, now=5.0)
    assert health.verdict is Verdict.ALIVE
    assert health.loss_ratio == pytest.approx(3 / 5)


def test_icmp_unreachable_is_immediate_evidence() -> None:
    health = PathHealth()
    health.on_answer(0.01, now=0.0)
    health.on_unreachable()
    assert health.verdict is Verdict.DEAD


def test_rtt_ewma_follows_rfc6298_gains() -> None:
    health = PathHealth()
    health.on_answer(0.100, now=0.0)
    assert (health.rtt, health.rtt_var) == (0.100, 0.050)
    health.on_answer(0.020, now=1.0)
    assert health.rtt == pytest.approx(0.875 * 0.100 + 0.125 * 0.020)
    assert health.rtt_var == pytest.approx(0.75 * 0.050 + 0.25 * 0.080)


def test_keepalive_jitter_stays_in_bounds() -> None:
    health = PathHealth(HealthConfig(keepalive_interval=1.0, jitter=0.2))
    rng = random.Random(7)
    delays = [health.next_keepalive(rng) for _ in range(1000)]
    assert min(delays) >= 0.8 and max(delays) <= 1.2
    assert len({round(d, 3) for d in delays}) > 100  # really jittered


def test_candidates_sort_healthy_then_low_loss_then_low_rtt() -> None:
    fast, slow, lossy, dead = (PathHealth() for _ in range(4))
    fast.on_answer(0.005, now=0)
    slow.on_answer(0.050, now=0)
    lossy.on_answer(0.001, now=0)
    lossy.on_lost()
    dead.on_unreachable()
    ranked = sorted([dead, lossy, slow, fast], key=PathHealth.score)
    assert ranked == [fast, slow, lossy, dead]


def test_active_path_is_not_dead_when_nothing_was_asked_of_it() -> None:
    judge = ActiveLiveness(HealthConfig(dead_ptos=3, min_silence=0.1))
    assert judge.judge(now=100.0, last_receive=1.0, outstanding_since=None, pto=0.05) is (
        Liveness.ACTIVE
    )


def test_active_path_silence_while_data_is_outstanding() -> None:
    judge = ActiveLiveness(HealthConfig(degraded_ptos=1.5, dead_ptos=3, min_silence=0.1))
    common = {"last_receive": 10.0, "outstanding_since": 10.0, "pto": 0.1}
    assert judge.judge(now=10.1, **common) is Liveness.ACTIVE
    assert judge.judge(now=10.2, **common) is Liveness.DEGRADED
    assert judge.judge(now=10.31, **common) is Liveness.DEAD
    # Silence counts from the later of last receipt and the oldest outstanding send.
    assert judge.judge(now=10.31, last_receive=1.0, outstanding_since=10.25, pto=0.1) is (
        Liveness.ACTIVE
    )
    assert (
        judge.judge(now=0.0, last_receive=None, outstanding_since=None, pto=1, unreachable=True)
        is Liveness.DEAD
    )


@given(
    pto=st.floats(min_value=0.001, max_value=2.0),
    silence=st.floats(min_value=0.0, max_value=10.0),
)
def test_liveness_is_monotonic_in_silence(pto: float, silence: float) -> None:
    judge = ActiveLiveness()
    order = [Liveness.ACTIVE, Liveness.DEGRADED, Liveness.DEAD]
    a = judge.judge(now=silence, last_receive=0.0, outstanding_since=0.0, pto=pto)
    b = judge.judge(now=silence * 1.5 + 0.01, last_receive=0.0, outstanding_since=0.0, pto=pto)
    assert order.index(b) >= order.index(a)


def test_idle_active_path_asks_for_an_ack_now_and_then() -> None:
    judge = ActiveLiveness(HealthConfig(active_keepalive=1.0))
    assert not judge.needs_keepalive(now=5.0, last_receive=4.5, outstanding_since=None)
    assert judge.needs_keepalive(now=5.0, last_receive=3.9, outstanding_since=None)
    assert not judge.needs_keepalive(now=5.0, last_receive=0.0, outstanding_since=4.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keepalive_interval": 0},
        {"jitter": 1.0},
        {"failures_to_fail": 0},
        {"degraded_ptos": 4, "dead_ptos": 3},
    ],
)
def test_bad_config_is_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        HealthConfig(**kwargs)  # type: ignore[arg-type]
