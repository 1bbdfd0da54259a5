"""Active-path liveness without sockets: the verdicts a failover policy acts on (standby
paths are judged by health groups: tests/test_health_groups.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.health import ActiveLiveness, HealthConfig, Liveness


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
