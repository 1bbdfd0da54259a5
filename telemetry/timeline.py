"""Render journal records as a text timeline or a PNG (lanes per path, throughput below).

Input: journal records (see :mod:`telemetry.journal`), in any order; time is ``mono`` relative
to the earliest record (``wall`` if a record has no ``mono``).

Record types the plot understands. A leading ``Evt``, and ``Connection`` before ``Migration``,
are ignored, so the supervisor's event names work as written (``ConnectionMigrationStarted`` or
``EvtConnectionMigrationStarted`` is ``MigrationStarted``, drawn like ``SwitchStarted``), and
``from_local_addr``/``to_local_addr`` stand for ``from_path``/``to_path``:

======================  ==========================================  =========================
type                    body fields used                            drawn as
======================  ==========================================  =========================
PathAdded, PathRemoved  --                                          grey / black square
ProbeStarted            --                                          hollow blue circle
ProbeSucceeded          ``rtt`` (s) or ``rtt_ms``: text only        green circle (validation)
ProbeFailed             ``error``: text only                        red cross
SwitchStarted           ``from_path``, ``to_path``                  orange triangle; a dotted
                                                                    line between the two lanes
MigrationCompleted      ``from_path``, ``to_path``                  green star (+ line)
MigrationRolledBack     ``from_path``, ``to_path``                  purple triangle (+ line)
MigrationFailed         ``error``, ``connection_closed``            red X; drawn as
                                                                    MigrationRolledBack when
                                                                    the connection is still
                                                                    open and ``error`` says
                                                                    "rolled back"
PathStateChanged        ``old``, ``new`` (path state names)         the lane is shaded with
                                                                    the state's colour from
                                                                    then on; ``-> validating``
                                                                    is also drawn as
                                                                    ProbeStarted, ``validating
                                                                    -> standby`` as
                                                                    ProbeSucceeded and
                                                                    ``validating -> failed``
                                                                    as ProbeFailed
ConnectionEnded         ``reason``                                  black X on the conn lane
Stats                   ``bytes`` (cumulative), or ``tx_bytes`` +   throughput subplot: rate
                        ``rx_bytes`` (cumulative)                   between samples, per lane
======================  ==========================================  =========================

Lane of a record: ``(conn, path)`` from the record, else ``body["path"]``, else
``body["to_path"]`` (or ``to_local_addr``); a record with neither sits on its connection's
``(conn)`` lane. Multiaddr lanes are labelled ``host:port``. Control messages (``kind="msg"``:
``SwitchRequest``, ``ProbeRequest``, ...) are drawn as grey ticks on their connection's lane,
except ``SnapshotRequest`` (reads, not actions) and requests without a connection (a dial);
other types as small grey dots. :func:`render_text` lists every record.

Bad records never break rendering: field values may have any type (a journal is only checked
for structure, see :func:`telemetry.journal.read_journal`). A record without a usable time (see
:func:`record_time`) is left out and counted (``render_text`` says how many; :func:`untimed`
counts them); any other odd value is shown as bounded text or ignored. The plot draws at most
:data:`MAX_LANES` lanes (the first ones to appear) and says so in its title.
"""

from __future__ import annotations

import itertools
import math
import os
import reprlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["MAX_LANES", "normalize_type", "plot", "record_time", "render_text", "untimed"]

#: Most lanes :func:`plot` draws: beyond that the figure would exceed what Agg can render.
MAX_LANES = 100
#: A timestamp beyond this many seconds (about 31,700 years) is no clock reading.
_MAX_TIME = 1e12

# Fields shown first by render_text, in this order; then the rest alphabetically.
_KEY_FIELDS = (
    "reason",
    "old",
    "new",
    "result",
    "rtt",
    "rtt_ms",
    "tries",
    "error",
    "from_path",
    "to_path",
    "from_local_addr",
    "to_local_addr",
    "probe_rtt",
    "local_addr",
    "remote_addr",
    "bytes",
    "tx_bytes",
    "rx_bytes",
)
_MAX_FIELDS = 6
_HIDDEN_FIELDS = frozenset({"conn_id", "time"})  # already in the record's columns
_SKIPPED_MSGS = frozenset({"SnapshotRequest"})
_MAX_VALUE = 40
_MAX_LABEL = 80

_ALIASES = {"MigrationStarted": "SwitchStarted"}

# Text of arbitrary record values: bounded depth and length, whatever the value.
_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = _MAX_VALUE

# type -> (marker, face colour, edge colour, legend label)
_MARKERS: dict[str, tuple[str, str, str, str]] = {
    "PathAdded": ("s", "0.6", "0.4", "path added"),
    "PathRemoved": ("s", "black", "black", "path removed"),
    "ProbeStarted": ("o", "none", "tab:blue", "probe"),
    "ProbeSucceeded": ("o", "tab:green", "darkgreen", "validated"),
    "ProbeFailed": ("x", "tab:red", "tab:red", "probe failed"),
    "SwitchStarted": ("^", "tab:orange", "darkorange", "switch"),
    "MigrationCompleted": ("*", "limegreen", "darkgreen", "migrated"),
    "MigrationRolledBack": ("<", "tab:purple", "indigo", "rolled back"),
    "MigrationFailed": ("X", "red", "darkred", "migration failed"),
    "ConnectionEnded": ("X", "black", "black", "connection ended"),
    "Request": ("|", "0.45", "0.45", "request (msg)"),
}
_UNFILLED = frozenset({"x", "+", "|", "_", "."})
_SWITCH_TYPES = frozenset({"SwitchStarted", "MigrationCompleted", "MigrationRolledBack"})

_STATE_COLOURS = {
    "new": "#eeeeee",
    "validating": "#fff3c4",
    "standby": "#d6e9ff",
    "active": "#c9f2c9",
    "degraded": "#ffe0b3",
    "failed": "#ffc9c9",
    "closed": "#dddddd",
}


def _text(value: Any) -> str:
    """``value`` as text for display: a str as is, anything else as a bounded repr."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value[:_MAX_VALUE].hex()
    if isinstance(value, float):
        return f"{value:.6g}"
    return _REPR.repr(value)


def _type(record: Mapping[str, Any]) -> str:
    return _text(record.get("type", ""))


def record_time(record: Mapping[str, Any]) -> float | None:
    """The record's time: ``mono``, else (``mono`` absent or None) ``wall``; None when that is
    not a finite number within 1e12 s (a list, a map, a string, a bool, NaN...)."""
    value = record.get("mono")
    if value is None:
        value = record.get("wall")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int) and abs(value) > _MAX_TIME:
        return None
    t = float(value)
    return t if math.isfinite(t) and abs(t) <= _MAX_TIME else None


def untimed(records: Iterable[Mapping[str, Any]]) -> int:
    """How many of ``records`` have no usable time (and so are not rendered)."""
    return sum(1 for r in records if record_time(r) is None)


def _timed(records: Iterable[Mapping[str, Any]]) -> tuple[list[tuple[float, Any]], int]:
    """(time, record) pairs sorted by time, and the number of records without a usable time."""
    timed: list[tuple[float, Any]] = []
    skipped = 0
    for r in records:
        t = record_time(r) if isinstance(r, Mapping) else None
        if t is None:
            skipped += 1
        else:
            timed.append((t, r))
    timed.sort(key=lambda pair: pair[0])
    return timed, skipped


def normalize_type(type_name: str) -> str:
    """``EvtConnectionMigrationStarted`` -> ``SwitchStarted``; ``EvtPathAdded`` -> ``PathAdded``."""
    name = _text(type_name).removeprefix("Evt")
    if name.startswith("ConnectionMigration"):
        name = name.removeprefix("Connection")
    return _ALIASES.get(name, name)


def _from_to(body: Mapping[str, Any]) -> tuple[str | None, str | None]:
    src = body.get("from_path") or body.get("from_local_addr")
    dst = body.get("to_path") or body.get("to_local_addr")
    return (_text(src) if src else None), (_text(dst) if dst else None)


def _plot_kind(record: Mapping[str, Any]) -> str | None:
    """What the plot draws for ``record`` (None: nothing, or only the state shading)."""
    kind = normalize_type(_type(record))
    body = _body(record)
    if record.get("kind") == "msg" and kind not in _MARKERS:
        # A request names its connection; a dial (no conn yet) or a read draws nothing.
        return None if kind in _SKIPPED_MSGS or not record.get("conn") else "Request"
    rolled_back = not body.get("connection_closed") and "rolled back" in _text(body.get("error"))
    if kind == "MigrationFailed" and rolled_back:
        return "MigrationRolledBack"
    if kind == "PathStateChanged":
        old, new = _text(body.get("old", "")), _text(body.get("new", ""))
        if new == "validating":
            return "ProbeStarted"
        if old == "validating" and new == "standby":
            return "ProbeSucceeded"
        if old == "validating" and new == "failed":
            return "ProbeFailed"
        return None
    return None if kind == "Stats" else kind


def _body(record: Mapping[str, Any]) -> Mapping[str, Any]:
    body = record.get("body")
    return body if isinstance(body, Mapping) else {}


def _short(value: Any, limit: int = _MAX_VALUE) -> str:
    text = _text(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fields(body: Mapping[str, Any]) -> str:
    keys = [k for k in _KEY_FIELDS if k in body]
    keys += sorted(
        k for k in body if isinstance(k, str) and k not in _KEY_FIELDS and k not in _HIDDEN_FIELDS
    )
    shown = [f"{k}={_short(body[k])}" for k in keys[:_MAX_FIELDS]]
    if len(keys) > _MAX_FIELDS:
        shown.append(f"(+{len(keys) - _MAX_FIELDS})")
    return " ".join(shown)


def render_text(records: Iterable[Mapping[str, Any]]) -> str:
    """One line per record: ``+seconds  conn  path  kind  type  key=value ... [trace]``.

    Records without a usable time are left out; a last line says how many.
    """
    timed, skipped = _timed(records)
    note = f"({skipped} record(s) without a usable mono/wall time not shown)\n" if skipped else ""
    if not timed:
        return "(no records)\n" + note
    t0 = timed[0][0]
    rows = [
        (
            f"{t - t0:+.6f}s",
            _short(r.get("conn") or "-", _MAX_LABEL),
            _short(r.get("path") or "-", _MAX_LABEL),
            _short(r.get("kind", "?")),
            _short(r.get("type", "?"), _MAX_LABEL),
            _fields(_body(r)),
            f"  [trace {_text(r.get('trace_id'))[:8]}]" if r.get("trace_id") else "",
        )
        for t, r in timed
    ]
    conn_w = max(4, *(len(row[1]) for row in rows))
    path_w = max(4, *(len(row[2]) for row in rows))
    type_w = max(4, *(len(row[4]) for row in rows))
    lines = [
        f"{'time':<11}  {'conn':<{conn_w}}  {'path':<{path_w}}  {'kind':<5}  "
        f"{'type':<{type_w}}  fields"
    ]
    for when, conn, path, kind, type_, fields, tail in rows:
        lines.append(
            f"{when:<11}  {conn:<{conn_w}}  {path:<{path_w}}  {kind:<5}  "
            f"{type_:<{type_w}}  {fields}{tail}".rstrip()
        )
    return "\n".join(lines) + "\n" + note


def _lane(record: Mapping[str, Any]) -> tuple[str, str | None]:
    body = _body(record)
    conn = _text(record.get("conn") or "-")
    path = record.get("path") or body.get("path") or _from_to(body)[1]
    return conn, (_text(path) if path is not None else None)


def _short_addr(addr: str) -> str:
    """``/ip4/127.0.0.1/udp/5000/quic-v1`` -> ``127.0.0.1:5000``; anything else unchanged."""
    parts = addr.split("/")
    if addr.startswith(("/ip4/", "/ip6/")) and len(parts) >= 5 and parts[3] == "udp":
        return f"[{parts[2]}]:{parts[4]}" if parts[1] == "ip6" else f"{parts[2]}:{parts[4]}"
    return addr


def _lane_label(lane: tuple[str, str | None]) -> str:
    """The lane's axis/legend text; ``$`` escaped, or matplotlib would parse it as math (and
    fail on a malformed formula)."""
    conn, path = lane
    label = f"{conn} / {_short_addr(path)}" if path is not None else f"{conn} (conn)"
    return _short(label, _MAX_LABEL).replace("$", r"\$")


def _count(value: Any) -> float | None:
    """A byte count: a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        return None
    return number if math.isfinite(number) else None


def _stats_bytes(body: Mapping[str, Any]) -> float | None:
    total = _count(body.get("bytes"))
    if total is not None:
        return total
    tx, rx = _count(body.get("tx_bytes")), _count(body.get("rx_bytes"))
    if tx is None and rx is None:
        return None
    return (tx or 0.0) + (rx or 0.0)


def _throughput(
    recs: Sequence[tuple[float, Mapping[str, Any]]],
    t0: float,
    lanes: Mapping[tuple[str, str | None], int],
) -> dict[tuple[str, str | None], tuple[list[float], list[float]]]:
    """Per drawn lane: (times, bytes/s) between consecutive cumulative samples; resets
    skipped."""
    samples: dict[tuple[str, str | None], list[tuple[float, float]]] = defaultdict(list)
    for t, r in recs:
        if normalize_type(_type(r)) != "Stats":
            continue
        total = _stats_bytes(_body(r))
        lane = _lane(r)
        if total is not None and lane in lanes:
            samples[lane].append((t - t0, total))
    series: dict[tuple[str, str | None], tuple[list[float], list[float]]] = {}
    for lane, pts in samples.items():
        times: list[float] = []
        rates: list[float] = []
        for (ta, ba), (tb, bb) in itertools.pairwise(pts):
            rate = (bb - ba) / (tb - ta) if tb > ta and bb >= ba else math.nan
            if math.isfinite(rate):
                times.append(tb)
                rates.append(rate)
        if times:
            series[lane] = (times, rates)
    return series


def plot(records: Iterable[Mapping[str, Any]], out_png: str | os.PathLike[str]) -> None:
    """Write a PNG timeline of ``records`` to ``out_png`` (see the module docstring).

    Uses matplotlib's Agg canvas directly (no pyplot): no global backend switch, no GUI,
    safe from any thread. Records without a usable time, and lanes past :data:`MAX_LANES`, are
    not drawn.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    recs, _ = _timed(records)
    t0 = recs[0][0] if recs else 0.0
    t_end = (recs[-1][0] - t0) if recs else 1.0
    t_end = t_end if t_end > 0 else 1.0

    seen_lanes: dict[tuple[str, str | None], None] = {}  # insertion-ordered set
    for _t, r in recs:
        is_state = normalize_type(_type(r)) == "PathStateChanged"
        if _plot_kind(r) is None and not is_state:
            continue
        seen_lanes.setdefault(_lane(r))
    for _t, r in recs:  # lanes named only as a switch's source
        src, _ = _from_to(_body(r))
        if _plot_kind(r) in _SWITCH_TYPES and src:
            seen_lanes.setdefault((_text(r.get("conn") or "-"), src))
    lanes = list(seen_lanes)[:MAX_LANES]
    lane_y = {lane: i for i, lane in enumerate(lanes)}
    throughput = _throughput(recs, t0, lane_y)

    nrows = 2 if throughput else 1
    fig = Figure(figsize=(11, 1.5 + 0.55 * max(len(lanes), 2) + (2.5 if throughput else 0)))
    FigureCanvasAgg(fig)
    ratios = [max(len(lanes), 2), 3] if throughput else [1]
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False, height_ratios=ratios)
    ax = axes[0][0]

    # State shading: from each PathStateChanged to the next one (or the end) on that lane.
    changes: dict[tuple[str, str | None], list[tuple[float, str]]] = defaultdict(list)
    for t, r in recs:
        if normalize_type(_type(r)) == "PathStateChanged" and _lane(r) in lane_y:
            changes[_lane(r)].append((t - t0, _text(_body(r).get("new", ""))))
    for lane, points in changes.items():
        y = lane_y[lane]
        ends = [t for t, _ in points[1:]] + [t_end]
        for (start, state), end in zip(points, ends, strict=True):
            ax.broken_barh(
                [(start, max(end - start, t_end * 1e-3))],
                (y - 0.35, 0.7),
                facecolors=_STATE_COLOURS.get(state, "#f4f4f4"),
                edgecolors="none",
                zorder=1,
            )

    seen: set[str] = set()
    for t_abs, r in recs:
        kind = _plot_kind(r)
        y_lane = lane_y.get(_lane(r))
        if kind is None or y_lane is None:
            continue
        t, y = t_abs - t0, y_lane
        from_path, to_path = _from_to(_body(r))
        if kind in _SWITCH_TYPES and from_path and to_path:
            y_src = lane_y.get((_text(r.get("conn") or "-"), from_path))
            y_dst = lane_y.get((_text(r.get("conn") or "-"), to_path))
            if y_src is not None and y_dst is not None:
                ax.plot([t, t], [y_src, y_dst], linestyle=":", color="0.3", linewidth=1, zorder=2)
        marker, face, edge, _label = _MARKERS.get(kind, (".", "0.5", "0.5", "other"))
        if marker in _UNFILLED:  # line-only markers take one colour
            ax.scatter([t], [y], marker=marker, s=70, c=edge, linewidths=1.2, zorder=3)
        else:
            ax.scatter(
                [t],
                [y],
                marker=marker,
                s=70,
                facecolors=face,
                edgecolors=edge,
                linewidths=1.2,
                zorder=3,
            )
        seen.add(kind if kind in _MARKERS else "other")

    ax.set_yticks(range(len(lanes)), [_lane_label(lane) for lane in lanes])
    ax.set_ylim(-0.7, max(len(lanes), 1) - 0.3)
    ax.invert_yaxis()
    ax.grid(axis="x", linestyle=":", linewidth=0.5)
    dropped = len(seen_lanes) - len(lanes)
    ax.set_title(
        "quic-supervisor timeline"
        + (f" (first {len(lanes)} of {len(seen_lanes)} lanes drawn)" if dropped else "")
    )
    handles = [
        Line2D([], [], linestyle="none", marker=m, markerfacecolor=f, markeredgecolor=e, label=lbl)
        for kind, (m, f, e, lbl) in _MARKERS.items()
        if kind in seen
    ]
    if "other" in seen:
        handles.append(Line2D([], [], linestyle="none", marker=".", color="0.5", label="other"))
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)

    if throughput:
        tax = axes[1][0]
        peak = max(max(rates) for _, rates in throughput.values())
        scale, unit = next(
            ((s, u) for s, u in ((1e6, "MB/s"), (1e3, "kB/s")) if peak >= s), (1.0, "B/s")
        )
        for lane, (times, rates) in throughput.items():
            tax.step(times, [v / scale for v in rates], where="pre", label=_lane_label(lane))
        tax.set_ylabel(f"throughput ({unit})")
        tax.grid(linestyle=":", linewidth=0.5)
        tax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        tax.set_xlabel("time (s)")
    else:
        ax.set_xlabel("time (s)")
    ax.set_xlim(-0.02 * t_end, t_end * 1.02)
    fig.tight_layout()
    fig.savefig(os.fspath(out_png), format="png", dpi=100)
