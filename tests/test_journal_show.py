"""``journal show``: filters, full trace ids, lines that fit 120 columns, --json.

A journal written by the real :class:`JournalWriter` (known times, two connections, a traced
migration, periodic Stats) is read back through the CLI, in-process.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
from opentelemetry.trace import SpanContext, TraceFlags

from supervisor.cli import main
from telemetry.journal import JournalWriter

TRACE = 0x0AF7651916CD43DD8448EB211C80319C
TRACE_HEX = f"{TRACE:032x}"
WALL0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z
A, B = "aaaa1111cafe", "bbbb2222beef"
PA = "/ip4/127.0.0.1/udp/5000/quic-v1"
PB = "/ip4/127.0.0.2/udp/5001/quic-v1"
LONG = "x" * 300


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    """Records at t = 0, 0.5, 1, ... s: per connection PathAdded, Stats, a migration."""
    path = tmp_path / "j.journal"
    traced = SpanContext(TRACE, 0x1234, is_remote=False, trace_flags=TraceFlags(1))
    with JournalWriter(path) as j:

        def add(t: float, type_: str, conn: str, body: Mapping[str, object], **kw: object) -> None:
            j.write("event", type_, body, conn=conn, mono=100.0 + t, wall=WALL0 + t, **kw)  # type: ignore[arg-type]

        add(0.0, "PathAdded", A, {"local_addr": PA}, path=PA)
        add(0.5, "PathAdded", B, {"local_addr": PA}, path=PA)
        add(1.0, "Stats", A, {"tx_bytes": 10, "rx_bytes": 20}, path=PA)
        add(1.5, "Stats", B, {"tx_bytes": 10, "rx_bytes": 20}, path=PA)
        body = {"from_local_addr": PA, "to_local_addr": PB, "reason": "manual", "note": LONG}
        add(2.0, "EvtConnectionMigrationCompleted", A, body, span_context=traced)
        add(2.5, "Stats", A, {"tx_bytes": 99, "rx_bytes": 99}, path=PB)
        add(3.0, "ConnectionMigrationFailed", B, {"error": "probe timed out", "reason": "drain"})
    return path


def show(journal: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    """The table's record lines (first line of each entry), after a successful run."""
    assert main(["journal", "show", str(journal), *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    return [line for line in lines[1:] if line.startswith("+")]


def fail(journal: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The one error line of a run that must fail with status 2."""
    assert main(["journal", "show", str(journal), *argv]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    return line


def test_lines_fit_and_trace_ids_are_whole(
    journal: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["journal", "show", str(journal)]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 120
    assert f"trace={TRACE_HEX}" in out  # the whole id, as OTLP backends search it
    assert f"{LONG[:40]}" in out and LONG not in out and "…" in out  # cut, not dropped
    entry = out[out.index("EvtConnectionMigrationCompleted") :].split("\n+")[0]
    assert "127.0.0.2" in entry and TRACE_HEX in entry  # continuation lines, same entry
    assert "127.0.0.1:5000" in out  # the path column: host:port


def test_conn_filter_takes_ids_and_prefixes(
    journal: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = show(journal, capsys, "--conn", "aaaa")
    assert len(lines) == 4 and all(A in line for line in lines)
    assert len(show(journal, capsys, "--conn", A, "--conn", B)) == 7
    line = fail(journal, capsys, "--conn", "cccc")
    assert line.startswith("quic-supervisor journal: error: --conn cccc: no connection")
    assert A in line and B in line  # what to give instead


def test_type_filter_accepts_either_spelling(
    journal: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (line,) = show(journal, capsys, "--type", "MigrationCompleted")
    assert "EvtConnectionMigrationCompleted" in line
    lines = show(journal, capsys, "--type", "PathAdded", "--type", "MigrationFailed")
    assert [line.split()[4] for line in lines] == [
        "PathAdded",
        "PathAdded",
        "ConnectionMigrationFailed",
    ]
    line = fail(journal, capsys, "--type", "Nope")
    assert line.startswith("quic-supervisor journal: error: --type Nope: no record")
    assert "PathAdded" in line


def test_since_until_in_seconds_keep_the_journals_clock(
    journal: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = show(journal, capsys, "--since", "1", "--until", "2")
    assert [line.split()[0] for line in lines] == ["+1.000000s", "+1.500000s", "+2.000000s"]
    assert [line.split()[0] for line in show(journal, capsys, "--since", "2.6")] == ["+3.000000s"]


def test_since_until_as_iso_times(journal: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def iso(t: float) -> str:
        return datetime.datetime.fromtimestamp(WALL0 + t, datetime.UTC).isoformat()

    lines = show(journal, capsys, "--since", iso(0.4), "--until", iso(1.1))
    assert [line.split()[0] for line in lines] == ["+0.500000s", "+1.000000s"]


def test_bad_times_are_one_line_errors(journal: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = fail(journal, capsys, "--since", "soon")
    assert line.startswith("quic-supervisor journal show: error: argument --since: 'soon'")
    assert "ISO 8601" in line and "2.5" in line
    assert "argument --until" in fail(journal, capsys, "--until", "-3")
    line = fail(journal, capsys, "--since", "2", "--until", "1")
    assert line.startswith("quic-supervisor journal: error: --since 2 is after --until 1: ")
    late, early = "2027-01-15T08:00:05+00:00", "2027-01-15T08:00:01+00:00"
    line = fail(journal, capsys, "--since", late, "--until", early)
    assert f"--since {late} is after --until {early}: " in line


def test_no_stats_hides_the_periodic_counters(
    journal: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert sum("Stats" in line for line in show(journal, capsys)) == 3
    lines = show(journal, capsys, "--no-stats")
    assert len(lines) == 4 and not any("Stats" in line for line in lines)


def test_json_is_one_whole_record_per_line(
    journal: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["journal", "show", str(journal), "--json", "--conn", A, "--no-stats"]
    assert main(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["type"] for r in records] == ["PathAdded", "EvtConnectionMigrationCompleted"]
    assert records[1]["trace_id"] == TRACE_HEX
    assert records[1]["body"]["note"] == LONG  # nothing cut
    assert records[1]["t"] == 2.0


def test_a_reader_that_left_is_not_an_error(journal: Path) -> None:
    """``journal show | head``: the pipe's reader is gone; the command stops quietly with
    128 + SIGPIPE, as a shell reports it, and no error line."""
    script = Path(sys.executable).with_name("quic-supervisor")
    if not script.exists():
        pytest.skip(f"{script} missing: run .venv/bin/pip install -e '.[dev,cli]'")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader left before the first line
    try:
        proc = subprocess.run(
            [str(script), "journal", "show", str(journal)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""
