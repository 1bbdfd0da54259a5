"""The bench harness's own arithmetic and README rewriting (no benchmark runs, nothing timed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import report
from bench._client import largest_gap
from bench._common import Figure, Report, fmt, summary


def test_summary_is_nearest_rank_over_sorted_samples() -> None:
    s = summary([5, 1, 4, 2, 3], scale=1000)
    assert s["n"] == 5
    assert (s["min"], s["p25"], s["median"], s["p75"], s["max"]) == (1000, 2000, 3000, 4000, 5000)
    assert summary([]) == {"n": 0}


def test_largest_gap_counts_gaps_that_overlap_the_window() -> None:
    times = [0.0, 0.1, 0.2, 0.7, 0.8]
    assert largest_gap(times, 0.25, 0.3) == pytest.approx(0.5)  # 0.2 -> 0.7 spans the window
    assert largest_gap(times, 0.75, 0.8) == pytest.approx(0.1)
    assert largest_gap(times, 2.0, 3.0) == 0.0


def test_fmt_shows_median_and_quartiles() -> None:
    assert fmt(summary([1.0, 2.0, 3.0]), "ms") == "2 ms [1-3] n=3"
    assert fmt({"raw MB/s": 12.5}) == "raw MB/s: 12.5"
    assert fmt(None) == ""


def test_report_rewrites_only_the_marked_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = tmp_path / "results"
    results.mkdir()
    rep = Report("b9_example")
    rep.add(Figure("B9", "a | figure", "<= 1 ms", "ms", summary([0.5, 0.7]), met=True, note="n"))
    (results / "b9_example.json").write_text(json.dumps(rep.as_dict()))
    (results / "fault_suite.json").write_text("[]")  # not a suite result: skipped
    monkeypatch.setattr(report, "RESULTS_DIR", results)
    monkeypatch.setattr(report.table, "__defaults__", (results,))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold\n{report.END}\noutro\n")
    assert report.update(readme, check=True) is True
    assert "old" in readme.read_text()  # --check writes nothing
    assert report.update(readme) is True
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n")
    assert "| B9 | a \\| figure | <= 1 ms |" in text and "old" not in text
    assert report.update(readme) is False  # idempotent
