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


def _interop_entry(case: str, peer: str, outcome: str, stall: float | None) -> dict[str, object]:
    return {
        "case": case,
        "peer": peer,
        "at": f"2026-01-0{1 + len(peer) % 8}T10:00:00+0000",
        "outcome": outcome,
        "checks": {"data_intact": outcome == "pass"},
        "stall_ms": stall,
        "confirmation_ms": 1.5,
    }


def test_interop_table_has_a_row_per_peer_and_a_column_per_case(tmp_path: Path) -> None:
    results = tmp_path / "interop.json"
    entries = [
        _interop_entry("nat_rebinding", "ours", "pass", 3.0),  # another file's case: last
        _interop_entry("client_migration", "ours", "fail", 12.345),
        _interop_entry("client_migration", "ngtcp2", "pass", 45.81),
        _interop_entry("connectionmigration", "ngtcp2", "pass", None),
        _interop_entry("connectionmigration", "ours", "not applicable", None),
        _interop_entry("client_migration", "quiche", "pass", 7.0),  # an unknown peer: last
    ]
    results.write_text(json.dumps({f"{e['case']}/{e['peer']}": e for e in entries}))
    assert report.interop_table(results).splitlines() == [
        "| peer | `client_migration` | `connectionmigration` | `nat_rebinding` |",
        "|---|---|---|---|",
        "| ngtcp2 `gtlsserver` (Debian) | pass, stall 45.8 ms | pass | - |",
        "| our listener (`Supervisor.listen`) | **fail**, stall 12.3 ms | n/a "
        "| pass, stall 3.0 ms |",
        "| quiche | pass, stall 7.0 ms | - | - |",
        "",
        "Last recorded 2026-01-07T10:00:00+0000; every check and figure (switch confirmation "
        "times too) in `bench/results/interop.json`.",
    ]


def test_report_rewrites_the_interop_block_from_the_results_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report, "table", lambda: "bench table")
    results = tmp_path / "interop.json"
    monkeypatch.setenv("QS_INTEROP_RESULTS", str(results))
    readme = tmp_path / "README.md"
    interop = f"{report.INTEROP_START}\nold\n{report.INTEROP_END}"
    readme.write_text(f"intro\n{report.START}\nb\n{report.END}\nmid\n{interop}\noutro\n")
    report.update(readme)
    assert interop in readme.read_text()  # no results file: the block is left as it is
    entry = _interop_entry("client_migration", "aioquic", "pass", 1.0)
    results.write_text(json.dumps({"client_migration/aioquic": entry}))
    assert report.update(readme) is True
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert "| aioquic 1.7 server (stock) | pass, stall 1.0 ms |" in text
    assert f"{report.START}\nbench table\n{report.END}\nmid\n" in text
    assert report.update(readme) is False  # idempotent
