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
    assert all(line[:1] == "+" for line in lines[1:])
    added = next(line for line in lines if "PathAdded" in line)
    assert added.startswith("+0.000000s   c1    p1    event  PathAdded ")
    assert "local_addr=/ip4/127.0.0.1/udp/5000/quic-v1" in added
    rolled = next(line for line in lines if "MigrationRolledBack" in line)
    assert "+0.400000s" in rolled
    assert "from_path=p1 to_path=p2" in rolled
    assert "[trace 0af76519]" in rolled
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
