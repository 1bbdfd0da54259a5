"""Timeline rendering: text lines and a PNG with lanes and throughput."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from telemetry.journal import JournalWriter, read_journal
from telemetry.timeline import normalize_type, plot, render_text


def scenario() -> list[dict[str, Any]]:
    """A migration from p1 to p2 that is rolled back once, then succeeds; with stats."""
    t0 = 1000.0
    recs: list[dict[str, Any]] = []

    def add(
        dt: float, type_: str, path: str | None, body: dict[str, Any], kind: str = "event"
    ) -> None:
        recs.append(
            {
                "mono": t0 + dt,
                "wall": 1.7e9 + dt,
                "kind": kind,
                "type": type_,
                "conn": "c1",
                "path": path,
                "trace_id": "0af7651916cd43dd8448eb211c80319c" if "Migration" in type_ else None,
                "span_id": None,
                "body": body,
            }
        )

    add(0.00, "PathAdded", "p1", {"local_addr": "/ip4/127.0.0.1/udp/5000/quic-v1"})
    add(0.01, "PathStateChanged", "p1", {"old": "new", "new": "active"})
    add(0.20, "PathAdded", "p2", {"local_addr": "/ip4/127.0.0.2/udp/5001/quic-v1"})
    add(0.21, "ProbeStarted", "p2", {})
    add(0.22, "ProbeSucceeded", "p2", {"rtt": 0.0012})
    add(0.23, "PathStateChanged", "p2", {"old": "validating", "new": "standby"})
    add(0.30, "Switch", None, {"to_path": "p2"}, kind="msg")
    add(0.30, "SwitchStarted", None, {"from_path": "p1", "to_path": "p2", "reason": "manual"})
    add(0.40, "MigrationRolledBack", None, {"from_path": "p1", "to_path": "p2"})
    add(0.50, "ProbeStarted", "p2", {})
    add(0.55, "ProbeFailed", "p2", {"error": "timeout"})
    add(0.60, "EvtConnectionMigrationStarted", None, {"from_path": "p1", "to_path": "p2"})
    add(0.61, "PathStateChanged", "p2", {"old": "standby", "new": "active"})
    add(0.61, "PathStateChanged", "p1", {"old": "active", "new": "standby"})
    add(0.62, "MigrationCompleted", None, {"from_path": "p1", "to_path": "p2"})
    add(0.90, "MigrationFailed", "p1", {"error": "peer unreachable"})
    total = 0
    for i in range(20):
        total += 50_000 if i < 12 else 120_000
        add(0.05 * i, "Stats", "p1" if i < 12 else "p2", {"bytes": total})
    return recs


def test_render_text_lines() -> None:
    text = render_text(reversed(scenario()))  # any order in, time order out
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["time", "conn", "path", "kind", "type"]
    assert all(line[:1] in "+ " and len(line) <= 120 for line in lines[1:])
    added = next(line for line in lines if "PathAdded" in line)
    assert added.startswith("+0.000000s   c1    p1    event  PathAdded ")
    assert "local_addr=/ip4/127.0.0.1/udp/5000/quic-v1" in added
    rolled = next(line for line in lines if "MigrationRolledBack" in line)
    assert "+0.400000s" in rolled
    assert "from_path=p1 to_path=p2" in rolled
    assert "trace=0af7651916cd43dd8448eb211c80319c" in text.split("MigrationRolledBack")[1]
    probe = next(line for line in lines if "ProbeSucceeded" in line)
    assert "rtt=0.0012" in probe
    assert render_text([]) == "(no records)\n"


def test_normalize_type() -> None:
    assert normalize_type("EvtConnectionMigrationStarted") == "SwitchStarted"
    assert normalize_type("EvtConnectionMigrationCompleted") == "MigrationCompleted"
    assert normalize_type("EvtPathAdded") == "PathAdded"
    assert normalize_type("ProbeFailed") == "ProbeFailed"


def _check_png(out: Path, min_bytes: int) -> None:
    image = pytest.importorskip("matplotlib.image")
    assert out.stat().st_size > min_bytes
    pixels = image.imread(out)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400
    assert float(pixels[..., :3].var()) > 0.005  # not a blank or single-coloured image


def test_plot_writes_a_non_trivial_png(tmp_path: Path) -> None:
    out = tmp_path / "timeline.png"
    plot(scenario(), out)
    _check_png(out, 20_000)


def test_plot_without_stats_and_from_a_journal(tmp_path: Path) -> None:
    path = tmp_path / "j.msgpack"
    with JournalWriter(path) as j:
        for r in scenario():
            if r["type"] != "Stats":
                j.write(r["kind"], r["type"], r["body"], conn=r["conn"], path=r["path"],
                        mono=r["mono"], wall=r["wall"])  # fmt: skip
    recs = list(read_journal(path))
    out = tmp_path / "no-stats.png"
    plot(recs, out)
    _check_png(out, 10_000)
    assert "MigrationCompleted" in render_text(recs)


def test_plot_empty(tmp_path: Path) -> None:
    out = tmp_path / "empty.png"
    plot([], out)
    assert out.stat().st_size > 0


def test_supervisor_record_types_are_understood() -> None:
    """What the SupervisorActor writes: event names without ``Evt``, request class names."""
    from telemetry.timeline import _plot_kind

    def rec(type_: str, body: dict[str, Any], kind: str = "event", conn: str | None = "c1"):
        return {"type": type_, "kind": kind, "conn": conn, "body": body}

    assert normalize_type("ConnectionMigrationStarted") == "SwitchStarted"
    assert normalize_type("ConnectionMigrationFailed") == "MigrationFailed"
    assert normalize_type("ConnectionEnded") == "ConnectionEnded"
    rolled = "switch to 127.0.0.2:1 was rolled back to 127.0.0.1:2: the peer did not reach us"
    assert _plot_kind(rec("ConnectionMigrationFailed", {"error": rolled})) == "MigrationRolledBack"
    closed = {"error": rolled, "connection_closed": True}
    assert _plot_kind(rec("ConnectionMigrationFailed", closed)) == "MigrationFailed"
    assert _plot_kind(rec("ConnectionMigrationFailed", {"error": "not validated"})) == (
        "MigrationFailed"
    )
    state = "PathStateChanged"
    assert _plot_kind(rec(state, {"old": "standby", "new": "validating"})) == "ProbeStarted"
    assert _plot_kind(rec(state, {"old": "validating", "new": "standby"})) == "ProbeSucceeded"
    assert _plot_kind(rec(state, {"old": "validating", "new": "failed"})) == "ProbeFailed"
    assert _plot_kind(rec(state, {"old": "standby", "new": "active"})) is None  # shading only
    assert _plot_kind(rec("SwitchRequest", {"path_id": 1}, kind="msg")) == "Request"
    assert _plot_kind(rec("SnapshotRequest", {}, kind="msg")) is None
    assert _plot_kind(rec("DialRequest", {}, kind="msg", conn=None)) is None
    assert _plot_kind(rec("Stats", {"tx_bytes": 1})) is None


def test_plot_of_supervisor_records_draws_lanes_per_path(tmp_path: Path) -> None:
    a, b = "/ip4/127.0.0.1/udp/5000/quic-v1", "/ip4/127.0.0.2/udp/5001/quic-v1"
    recs: list[dict[str, Any]] = []

    def add(dt: float, type_: str, path: str | None, body: dict[str, Any]) -> None:
        recs.append({"mono": dt, "kind": "event", "type": type_, "conn": "c1", "path": path,
                     "body": body})  # fmt: skip

    add(0.0, "PathAdded", a, {"local_addr": a})
    add(0.1, "PathStateChanged", a, {"old": "new", "new": "active"})
    add(0.2, "PathAdded", b, {"local_addr": b})
    add(0.3, "PathStateChanged", b, {"old": "new", "new": "validating"})
    add(0.4, "PathStateChanged", b, {"old": "validating", "new": "standby"})
    add(0.5, "ConnectionMigrationStarted", None, {"from_local_addr": a, "to_local_addr": b})
    add(0.6, "ConnectionMigrationFailed", None,
        {"from_local_addr": a, "to_local_addr": b, "error": "x was rolled back"})  # fmt: skip
    for i in range(8):
        add(0.1 * i, "Stats", a, {"tx_bytes": 1000 * i, "rx_bytes": 900 * i})
    out = tmp_path / "sup.png"
    plot(recs, out)
    _check_png(out, 15_000)
    text = render_text(recs)
    assert "from_local_addr=/ip4/127.0.0.1/udp/5000/quic-v1" in text
