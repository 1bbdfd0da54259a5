"""B6's own arithmetic: how an attempt is classified and counted (no network, nothing timed)."""

from __future__ import annotations

from bench.__main__ import LONG, SUITE
from bench.b6_loss import (
    AFTER_RETRY,
    FIRST_TRY,
    classify,
    first_difference,
    rate_text,
    stats_delta,
    tally,
)
from supervisor.core.messages import MigrationStats


def test_classify_separates_first_try_from_a_retried_challenge() -> None:
    assert classify(None, 0) == FIRST_TRY  # validated recently: switched without a probe
    assert classify(None, 1) == FIRST_TRY  # probed, answered at once
    assert classify(None, 2) == AFTER_RETRY  # a challenge or its response was lost
    assert classify("rolled_back", 0) == "rolled_back"  # a failure keeps the library's name
    assert classify("probe_timeout", 7) == "probe_timeout"


def test_tally_counts_completed_over_attempted_and_names_every_failure() -> None:
    t = tally([FIRST_TRY] * 997 + [AFTER_RETRY, "rolled_back", "no_connection_id"])
    assert (t["attempted"], t["completed"]) == (1000, 998)
    assert t["rate"] == 0.998
    assert list(t["outcomes"]) == [FIRST_TRY, AFTER_RETRY, "no_connection_id", "rolled_back"]
    assert t["outcomes"]["rolled_back"] == 1
    assert tally([])["rate"] is None
    # Both completed kinds are always listed, so a zero is visible in the table.
    assert tally(["rolled_back"])["outcomes"] == {FIRST_TRY: 0, AFTER_RETRY: 0, "rolled_back": 1}


def test_rate_text_does_not_round_a_miss_up_to_100() -> None:
    text = rate_text(tally([FIRST_TRY] * 9995 + ["rolled_back"] * 5))
    assert text == {"completed/attempted": "9,995/10,000", "rate": "99.95 %"}


def test_first_difference_finds_the_first_corrupt_byte() -> None:
    assert first_difference(b"abc", bytearray(b"abcdef")) is None
    assert first_difference(b"abX", b"abcdef") == 2
    assert first_difference(b"abcd", b"ab") == 2  # more came back than was expected


def test_stats_delta_is_what_the_library_counted_in_between() -> None:
    before = MigrationStats(completed=10, failed={"rolled_back": 1})
    after = MigrationStats(completed=25, failed={"rolled_back": 1, "probe_timeout": 2})
    assert stats_delta(before, after) == {"completed": 15, "failed": {"probe_timeout": 2}}


def test_b6_is_in_the_suite_and_marked_long() -> None:
    names = [name for name, _, _ in SUITE]
    assert "b6_loss" in names
    assert LONG.issubset(names)
    assert "b6_loss" in LONG
