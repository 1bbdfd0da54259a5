"""Telemetry through the command line: OTEL_* variables only, --trace-file, --journal, --qlog-dir.

The OTLP test runs the installed console script against a real OTLP/HTTP receiver on loopback
(tests/rig_otlp.py); the others run ``main([...])`` in-process (faster, same code path).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.cli import main
from telemetry.journal import read_journal
from telemetry.otlp_json import read_otlp_json, spans_from_otlp_json
from tests.rig_otlp import OTLPReceiver

SCRIPT = Path(sys.executable).with_name("quic-supervisor")
TRACE_ID = re.compile(r"^migration \d+: .* confirmed in .* trace ([0-9a-f]{32})$", re.M)
#: Every migration line, done or not: a rolled-back one prints its trace id too.
ANY_TRACE_ID = re.compile(
    r"^migration \d+: .*( confirmed in | NOT done: ).* trace ([0-9a-f]{32})$", re.M
)


def printed_outcomes(out: str) -> dict[str, bool]:
    """Trace id -> confirmed, for every migration the demo printed.

    A busy host can roll a migration back (the demo carries on and still exits 0); its span is
    in the export with its own result, so the checks follow each migration's printed outcome.
    """
    return {tid: how == " confirmed in " for how, tid in ANY_TRACE_ID.findall(out)}


DEMO = ["demo", "--duration", "2", "--interval", "0.5", "--plain"]


@pytest.fixture
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests set exactly the OTEL_* variables they mean; none leak in from the environment."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    yield


def _closed_port() -> int:
    """A loopback TCP port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _check_png(path: Path) -> None:
    image = pytest.importorskip("matplotlib.image")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 400
    assert float(pixels[..., :3].var()) > 0.005  # not blank


@pytest.mark.skipif(not SCRIPT.exists(), reason=f"{SCRIPT} missing: pip install -e '.[dev]'")
def test_demo_exports_migration_traces_configured_only_by_otel_env(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    with OTLPReceiver() as rx:
        env |= {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_SERVICE_NAME": "cli-under-test",
        }
        proc = subprocess.run(
            [str(SCRIPT), *DEMO],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        printed = TRACE_ID.findall(proc.stdout)
        assert len(printed) >= 2, proc.stdout
        # Shutdown flushed before exit: everything is there already, nothing to wait for.
        spans = rx.spans()
    outcomes = printed_outcomes(proc.stdout)
    by_id = {s["span_id"]: s for s in spans}
    migrations = [s for s in spans if s["name"] == "quic.migration"]
    assert set(printed) <= {m["trace_id"] for m in migrations} <= set(outcomes)
    for m in migrations:
        caller = by_id[m["parent_span_id"]]
        assert caller["name"] == "quic-supervisor.migrate"
        assert caller["parent_span_id"] is None and caller["trace_id"] == m["trace_id"]
        confirmed = outcomes[m["trace_id"]]
        assert (m["attributes"]["quic.migration.result"] == "completed") is confirmed
        assert m["attributes"]["network.transport"] == "quic"
        assert m["resource"]["service.name"] == "cli-under-test"
        if not confirmed:
            continue  # its span says why; the checks below are those of a completed switch
        (switch,) = [s for s in spans if s["parent_span_id"] == m["span_id"]]
        assert switch["name"] == "quic.path.switch"
        assert switch["attributes"]["quic.switch.rolled_back"] is False
        # The probe before each switch is the caller's child too: one trace per migration.
        probes = [
            s
            for s in spans
            if s["name"] == "quic.path.probe" and s["parent_span_id"] == caller["span_id"]
        ]
        assert len(probes) == 1
    # The demo's first probe (before any migration) is a trace of its own.
    roots = [s for s in spans if s["parent_span_id"] is None and s["name"] == "quic.path.probe"]
    assert len(roots) == 1 and roots[0]["trace_id"] not in printed


def test_dead_collector_costs_the_demo_nothing(
    no_otel_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_BSP_EXPORT_TIMEOUT", "500")  # bounds the flush at exit
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export (and fail) during the run
    assert main(DEMO) == 0
    out = capsys.readouterr().out
    assert len(TRACE_ID.findall(out)) >= 2, out
    assert "OK: every byte verified" in out


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One in-process demo run with --journal, --trace-file and --qlog-dir (no OTEL_* set)."""
    tmp = tmp_path_factory.mktemp("demo")
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("OTEL_")}
    try:
        argv = [
            *DEMO,
            "--journal",
            str(tmp / "run.journal"),
            "--trace-file",
            str(tmp / "spans.jsonl"),
            "--qlog-dir",
            str(tmp / "qlog"),
        ]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(argv) == 0, out.getvalue()
    finally:
        os.environ.update(saved)
    return tmp, out.getvalue()


def test_trace_file_holds_otlp_json_migration_spans(demo_run: tuple[Path, str]) -> None:
    tmp, out = demo_run
    printed = TRACE_ID.findall(out)
    assert len(printed) >= 2, out
    requests = list(read_otlp_json(tmp / "spans.jsonl"))
    assert requests and all("resourceSpans" in r for r in requests)
    spans = spans_from_otlp_json(requests)
    migrations = [s for s in spans if s["name"] == "quic.migration"]
    outcomes = printed_outcomes(out)
    # Hex ids, as OTLP/JSON says; a migration whose probe failed never reached a switch span.
    assert set(printed) <= {m["traceId"] for m in migrations} <= set(outcomes)
    by_id = {s["spanId"]: s for s in spans}
    for m in migrations:
        assert re.fullmatch(r"[0-9a-f]{16}", m["spanId"])
        assert by_id[m["parentSpanId"]]["name"] == "quic-supervisor.migrate"
        attrs = {a["key"]: a["value"] for a in m["attributes"]}
        completed = attrs["quic.migration.result"] == {"stringValue": "completed"}
        assert completed is outcomes[m["traceId"]]
        assert m["kind"] == 1  # enums as integers (SPAN_KIND_INTERNAL)


def test_journal_show_and_plot_of_a_demo_run(
    demo_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp, _ = demo_run
    journal = tmp / "run.journal"
    types = {r["type"] for r in read_journal(journal)}
    assert {
        "DialRequest",
        "AddPathRequest",
        "ProbeRequest",
        "SwitchRequest",
        "PathAdded",
        "PathStateChanged",
        "ConnectionMigrationStarted",
        "ConnectionMigrationCompleted",
        "Stats",
    } <= types
    assert main(["journal", "show", str(journal)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split()[:5] == ["time", "conn", "path", "kind", "type"]
    entries = re.split(r"\n(?=\+)", text)  # a record's entry: its line and continuations
    completed = [e for e in entries if "ConnectionMigrationCompleted" in e]
    assert len(completed) >= 2 and all("from_local_addr=/ip4/" in c for c in completed)
    assert max(len(line) for line in text.splitlines()) <= 120
    switches = [e for e in entries if " SwitchRequest " in e]
    assert any(re.search(r"trace=[0-9a-f]{32}\b", e) for e in switches)  # the caller's trace

    png = tmp_path / "timeline.png"
    assert main(["journal", "plot", str(journal), "-o", str(png)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    _check_png(png)


def test_journal_show_tolerates_a_truncated_tail_and_rejects_garbage(
    demo_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    journal = demo_run[0] / "run.journal"
    records = len(list(read_journal(journal)))
    cut = tmp_path / "crashed.journal"
    cut.write_bytes(journal.read_bytes()[:-7])  # the writer died mid-record
    assert main(["journal", "show", str(cut)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("+")]
    assert len(lines) == records - 1  # every record but the cut one

    garbage = tmp_path / "notes.txt"
    garbage.write_text("not a journal\n")
    for action in (["show"], ["plot", "-o", str(tmp_path / "x.png")]):
        assert main(["journal", *action, str(garbage)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0
        assert err.startswith("quic-supervisor journal: error: ")
        assert "is not a quic-supervisor journal" in err
    assert not (tmp_path / "x.png").exists()
    assert main(["journal", "show", str(tmp_path / "missing")]) == 2
    assert "no journal at" in capsys.readouterr().err


def test_qlog_dir_writes_one_file_per_connection_named_by_conn_id(
    demo_run: tuple[Path, str],
) -> None:
    tmp, _ = demo_run
    records = list(read_journal(tmp / "run.journal"))
    # The demo's own listener reports its client's moves (server-side, not a dialled conn).
    inbound = {r["conn"] for r in records if r["type"] == "PeerAddressChanged"}
    conn_ids = {r["conn"] for r in records if r["conn"]} - inbound
    assert len(conn_ids) == 1 and len(inbound) == 1
    files = sorted(p.name for p in (tmp / "qlog").iterdir())
    (conn_id,) = conn_ids
    assert f"{conn_id}.qlog" in files
    assert any(re.fullmatch(r"server-[0-9a-f]+\.qlog", f) for f in files)  # the demo's server
    (trace,) = json.loads((tmp / "qlog" / f"{conn_id}.qlog").read_text())["traces"]
    assert trace["vantage_point"]["type"] == "client"
    names = {e["name"] for e in trace["events"]}
    assert {"transport:packet_sent", "transport:packet_received"} <= names
    frames = {f["frame_type"] for e in trace["events"] for f in e["data"].get("frames", [])}
    assert "connection_close" in frames  # written at the end: the newest events are kept
