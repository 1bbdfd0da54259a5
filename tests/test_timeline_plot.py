"""``journal plot`` explains a real run: a Supervisor with 2 paths and 3 switches (manual,
drain, failover) writes a journal; the figure is checked from its artists.

The failover is caused on loopback as in tests/test_failover.py: a UDP shim black-holes the
active path. Byte counters come from the CLI's own ``journal_stats`` sampler.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.colors import to_rgba
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from supervisor import FailoverPolicy, Supervisor
from supervisor.cli import main
from supervisor.cli.demo import journal_stats
from supervisor.core.events import EvtConnectionMigrationCompleted
from telemetry.journal import read_journal
from telemetry.timeline import figure, normalize_type, plot, switch_labels
from tests.rig.aioquic_server import RigServer
from tests.rig.udp_shim import udp_shim
from tests.support import ChecksummedStream, addr_of, dial_echo, event_log

FAST = FailoverPolicy(keepalive_interval=0.2, failures_to_fail=2, hysteresis=0.5)
REASONS = ["manual", "drain", "failover"]


@pytest_asyncio.fixture
async def journal(echo: RigServer, tmp_path: Path) -> AsyncIterator[Path]:
    """The journal of a run: A -> B (manual ``switch()``), B -> A (``drain`` of B, kept
    open), A -> B (failover: A black-holed). Data flows throughout."""
    path = tmp_path / "run.journal"
    async with (
        udp_shim(echo.addr) as shim,
        Supervisor(
            enable_experimental_connection_migration=True, failover=FAST, journal=path
        ) as sup,
    ):
        stats = asyncio.create_task(journal_stats(sup, every=0.05))
        try:
            conn = await dial_echo(sup, shim.listen_addr)
            mc = conn.as_migratable()
            second = await mc.add_path("/ip4/127.0.0.2/udp/0/quic-v1")
            await second.probe()
            first = next(p for p in mc.paths() if p.path_id != second.path_id)
            async with event_log(sup, EvtConnectionMigrationCompleted) as log:
                stream = await ChecksummedStream(conn).start()
                await stream.advance()
                await second.switch()
                await stream.advance()
                report = await sup.drain(local_addr=second.info().local_addr, close_drained=False)
                assert report, report
                await stream.advance()
                addr = addr_of(first.info().local_addr)
                shim.drop_client_to_server(addr)
                shim.drop_server_to_client(addr)
                await log.wait_for(lambda: len(log.of(EvtConnectionMigrationCompleted)) >= 3, 15)
                done = log.of(EvtConnectionMigrationCompleted)
                assert [getattr(e, "reason", None) for e in done] == REASONS
                await stream.advance()
                await stream.finish()
        finally:
            stats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stats
    yield path


def _records(path: Path) -> list[dict[str, Any]]:
    return list(read_journal(path))


def _legend_texts(ax: Any) -> list[str]:
    legend = ax.get_legend()
    assert legend is not None
    return [t.get_text() for t in legend.get_texts()]


def _labels(fig: Any) -> list[Any]:
    return [a for a in fig.axes[0].texts if a.get_gid() == "switch-label"]


def _axis(fig: Any, word: str) -> Any:
    (ax,) = [a for a in fig.axes if word in a.get_ylabel()]
    return ax


async def test_the_figure_explains_every_switch(journal: Path, tmp_path: Path) -> None:
    records = _records(journal)
    fig = figure(records)
    lanes = fig.axes[0]
    legend = _legend_texts(lanes)
    # Every state colour shaded has an entry, and so has every marker drawn.
    states = {
        str(r["body"]["new"]) for r in records if normalize_type(r["type"]) == "PathStateChanged"
    }
    assert {"active", "standby"} <= states
    assert {f"state: {s}" for s in states} <= set(legend)
    assert {"migrated", "switch"} <= set(legend)
    # Every colour on the lanes has its legend entry: state shading and marker faces.
    handles = lanes.get_legend().legend_handles
    patch_colours = {to_rgba(h.get_facecolor()) for h in handles if isinstance(h, Patch)}
    marker_faces = {to_rgba(h.get_markerfacecolor()) for h in handles if isinstance(h, Line2D)} | {
        to_rgba(h.get_markeredgecolor()) for h in handles if isinstance(h, Line2D)
    }
    shading = [c for c in lanes.collections if isinstance(c, PolyCollection)]
    markers = [c for c in lanes.collections if isinstance(c, PathCollection)]
    assert shading and markers
    for bars in shading:
        assert {tuple(map(float, rgba)) for rgba in bars.get_facecolor()} <= patch_colours
    for dots in markers:
        colours = [*dots.get_facecolor(), *dots.get_edgecolor()]
        assert any(tuple(map(float, rgba)) in marker_faces for rgba in colours), colours

    labels = [a.get_text() for a in _labels(fig)]
    assert len(labels) == 3, labels
    for reason, label in zip(REASONS, labels, strict=True):
        assert label.startswith(f"{reason}: ") and label.endswith(" ms"), label
        assert 0 < float(label.split()[-2]) < 15_000, label  # confirmation time

    tx, rx = _axis(fig, "tx goodput"), _axis(fig, "rx goodput")
    assert tx is not rx
    for ax in (tx, rx):
        lines = [line for line in ax.get_lines() if len(line.get_xdata())]
        assert len(lines) == 2, [line.get_label() for line in lines]  # one per path
        assert all("127.0.0." in line.get_label() for line in lines)
        assert max(max(line.get_ydata()) for line in lines) > 0
        assert ax.get_ylabel().endswith("/s)")
    assert not [a for a in fig.axes if "tx+rx" in a.get_ylabel()]

    rtt = _axis(fig, "RTT")
    assert rtt.get_ylabel() == "RTT (ms)"
    points = [v for line in rtt.get_lines() for v in line.get_ydata()]
    assert points and all(0 < v < 5_000 for v in points)

    out = tmp_path / "run.png"
    plot(records, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_zoom_shows_only_the_window(journal: Path) -> None:
    records = _records(journal)
    ends = [t for t, _lane, _text in switch_labels(records)]
    assert len(ends) == 3
    start, end = ends[1] - 0.01, ends[2] - 0.01  # the drain only
    fig = figure(records, start=start, end=end)
    assert fig.axes[0].get_xlim() == (start, end)
    (label,) = [a.get_text() for a in _labels(fig)]
    assert label.startswith("drain: ")
    for ax in fig.axes[1:]:
        for line in ax.get_lines():
            assert all(start <= x <= end for x in line.get_xdata())


async def test_cli_plot_zoom_and_its_errors(
    journal: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def cli(*argv: str) -> Any:
        return asyncio.to_thread(main, ["journal", "plot", str(journal), *argv])

    out = tmp_path / "zoom.png"
    assert await cli("-o", str(out), "--from", "0.1", "--to", "30") == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in capsys.readouterr().out
    for argv, expected in [
        (("--from", "2", "--to", "1"), "journal: error: --from 2 is not before --to 1: "),
        (("--to", "soon"), "journal plot: error: argument --to: 'soon' is not a time: "),
        (("--from", "-1"), "journal plot: error: argument --from: '-1' is not a time: "),
    ]:
        assert await cli(*argv) == 2, argv
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"quic-supervisor {expected}"), line


def test_figure_rejects_an_empty_window() -> None:
    with pytest.raises(ValueError, match="empty"):
        figure([], start=2.0, end=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        figure([], start=-1.0)


def test_switch_label_without_its_start_says_time_unknown() -> None:
    recs = [
        {"mono": 1.0, "kind": "event", "type": "PathAdded", "conn": "c", "path": "a", "body": {}},
        {"mono": 2.0, "kind": "event", "type": "MigrationCompleted", "conn": "c", "path": None,
         "body": {"from_path": "a", "to_path": "b", "reason": "network"}},
    ]  # fmt: skip
    assert switch_labels(recs) == [(1.0, ("c", "b"), "network: time unknown")]
