"""Render journal records as a text timeline or a PNG (lanes per path, goodput and RTT below).

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
Stats                   ``tx_bytes``, ``rx_bytes`` (cumulative;     tx and rx goodput panels
                        older journals: ``bytes``), ``rtt`` (s) or  (rate between samples, per
                        ``rtt_ms``                                  lane); RTT panel
======================  ==========================================  =========================

The RTT panel also takes ``rtt`` of ProbeSucceeded and ``probe_rtt`` (s) of a completed
migration (on its target lane). Each switch that ended gets a label on its target lane: its
reason and confirmation time in ms (see :func:`switch_labels`). The legend names every marker
drawn and every state colour shaded.

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

__all__ = [
    "MAX_LANES",
    "WIDTH",
    "figure",
    "normalize_type",
    "plot",
    "record_time",
    "render_text",
    "select",
    "start_time",
    "switch_labels",
    "untimed",
]

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
_MAX_FIELDS = 8
_HIDDEN_FIELDS = frozenset({"conn_id", "time"})  # already in the record's columns
_SKIPPED_MSGS = frozenset({"SnapshotRequest"})
_MAX_VALUE = 40
_MAX_LABEL = 80
#: ``journal show``: widest line, and caps on its columns, so a line stays readable.
WIDTH = 120
_MAX_INDENT = 40
_MAX_SHOWN = 60
_MAX_CONN = 20
_MAX_PATH = 24
_MAX_TYPE = 32

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
_OTHER_STATE_COLOUR = "#f4f4f4"


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


def start_time(records: Iterable[Mapping[str, Any]]) -> float | None:
    """The journal's start: the earliest usable record time (None without one). Times shown by
    :func:`render_text` and taken by :func:`select` and :func:`figure` are seconds after it."""
    times = [t for r in records if isinstance(r, Mapping) and (t := record_time(r)) is not None]
    return min(times) if times else None


def _type_matches(record_type: str, wanted: str) -> bool:
    """``wanted`` as written in the journal, or the same event under another spelling
    (``MigrationCompleted`` matches ``EvtConnectionMigrationCompleted``)."""
    return record_type == wanted or normalize_type(record_type) == normalize_type(wanted)


def _wall(record: Mapping[str, Any]) -> float | None:
    value = record.get("wall")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(float(value)) else None


def select(
    records: Iterable[Mapping[str, Any]],
    *,
    conns: Sequence[str] = (),
    types: Sequence[str] = (),
    since: float | None = None,
    until: float | None = None,
    since_wall: float | None = None,
    until_wall: float | None = None,
    stats: bool = True,
) -> list[Mapping[str, Any]]:
    """The records that pass every filter given (an empty filter passes everything).

    ``conns``: connection ids or unique prefixes of them, as printed; ``types``: record types,
    either spelling (see :func:`_type_matches`); ``since``/``until``: seconds after
    :func:`start_time`, inclusive; ``since_wall``/``until_wall``: Unix times compared with each
    record's ``wall`` (a record without one fails them); ``stats=False`` drops the periodic
    ``Stats`` records. Records without a usable time fail any time filter.
    """
    recs = [r for r in records if isinstance(r, Mapping)]
    t0 = start_time(recs) or 0.0
    out: list[Mapping[str, Any]] = []
    for r in recs:
        type_ = _type(r)
        if not stats and normalize_type(type_) == "Stats":
            continue
        if conns and not any(_text(r.get("conn") or "").startswith(c) for c in conns):
            continue
        if types and not any(_type_matches(type_, t) for t in types):
            continue
        if since is not None or until is not None:
            t = record_time(r)
            if t is None or (since is not None and t - t0 < since):
                continue
            if until is not None and t - t0 > until:
                continue
        if since_wall is not None or until_wall is not None:
            wall = _wall(r)
            if wall is None or (since_wall is not None and wall < since_wall):
                continue
            if until_wall is not None and wall > until_wall:
                continue
        out.append(r)
    return out


def _wrap(head: str, tokens: Sequence[str], width: int) -> list[str]:
    """``head`` then ``tokens`` (space-separated) in lines of at most ``width`` characters:
    continuation lines are indented to the fields column (or :data:`_MAX_INDENT` when that is
    far right); a token longer than a line is cut with an ellipsis."""
    indent = " " * min(len(head), _MAX_INDENT)
    lines: list[str] = []
    line = head
    fresh = True  # nothing after the head/indent yet
    for token in tokens:
        room = width - len(indent)
        token = token if len(token) <= room else token[: room - 1] + "…"
        if not fresh and len(line) + 1 + len(token) > width:
            lines.append(line)
            line, fresh = indent, True
        if fresh and len(line) + len(token) > width:  # the head alone leaves no room
            lines.append(line.rstrip())
            line = indent
        line = f"{line}{'' if fresh else ' '}{token}"
        fresh = False
    lines.append(line.rstrip())
    return lines


def _field_tokens(body: Mapping[str, Any], path: Any = None) -> list[str]:
    """``key=value`` of the body: key fields first; None values, and a ``local_addr`` that is
    the record's own path (already in the path column), left out (``--json`` shows them)."""
    body = {
        k: v
        for k, v in body.items()
        if v is not None and not (k == "local_addr" and path is not None and v == path)
    }
    keys = [k for k in _KEY_FIELDS if k in body]
    keys += sorted(
        k for k in body if isinstance(k, str) and k not in _KEY_FIELDS and k not in _HIDDEN_FIELDS
    )
    shown = [f"{k}={_short(body[k], _MAX_SHOWN)}" for k in keys[:_MAX_FIELDS]]
    if len(keys) > _MAX_FIELDS:
        shown.append(f"(+{len(keys) - _MAX_FIELDS} more: --json shows all)")
    return shown


def _trace_token(record: Mapping[str, Any]) -> list[str]:
    trace_id = record.get("trace_id")
    return [f"trace={_short(trace_id, 64)}"] if trace_id else []


def render_text(
    records: Iterable[Mapping[str, Any]], *, t0: float | None = None, width: int = WIDTH
) -> str:
    """One entry per record: ``+seconds  conn  path  kind  type  key=value ... trace=ID``.

    Times are seconds after ``t0`` (default: the earliest record shown; pass
    :func:`start_time` of the whole journal so a filtered listing keeps the journal's clock).
    Paths are shown as ``host:port``; the trace id in full (32 hex, as OTLP backends search
    it). An entry longer than ``width`` continues on indented lines. Records without a usable
    time are left out; a last line says how many.
    """
    timed, skipped = _timed(records)
    note = f"({skipped} record(s) without a usable mono/wall time not shown)\n" if skipped else ""
    if not timed:
        return "(no records)\n" + note
    base = timed[0][0] if t0 is None else t0
    rows = [
        (
            f"{t - base:+.6f}s",
            _short(r.get("conn") or "-", _MAX_CONN),
            _short(_short_addr(_text(r.get("path") or "-")), _MAX_PATH),
            _short(r.get("kind", "?"), 5),
            _short(r.get("type", "?"), _MAX_TYPE),
            _field_tokens(_body(r), r.get("path")) + _trace_token(r),
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
    for when, conn, path, kind, type_, tokens in rows:
        head = f"{when:<11}  {conn:<{conn_w}}  {path:<{path_w}}  {kind:<5}  {type_:<{type_w}}  "
        lines.extend(_wrap(head, tokens, width))
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
    """A byte count or a duration: a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        return None
    return number if math.isfinite(number) else None


Lane = tuple[str, str | None]
Series = dict[Lane, tuple[list[float], list[float]]]

#: Rate panels: (body field with a cumulative byte count, axis label). ``bytes`` is the older
#: undirected total; ``tx_bytes``/``rx_bytes`` are drawn apart, never summed.
_RATE_PANELS = (
    ("tx_bytes", "tx goodput"),
    ("rx_bytes", "rx goodput"),
    ("bytes", "throughput (tx+rx)"),
)


def _rates(
    recs: Sequence[tuple[float, Mapping[str, Any]]], t0: float, lanes: Mapping[Lane, int], key: str
) -> Series:
    """Per drawn lane: (times, bytes/s) of ``key`` between consecutive cumulative samples of
    ``Stats`` records; counter resets skipped."""
    samples: dict[Lane, list[tuple[float, float]]] = defaultdict(list)
    for t, r in recs:
        if normalize_type(_type(r)) != "Stats":
            continue
        total = _count(_body(r).get(key))
        lane = _lane(r)
        if total is not None and lane in lanes:
            samples[lane].append((t - t0, total))
    series: Series = {}
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


def _rtt_ms(record: Mapping[str, Any]) -> tuple[Lane, float] | None:
    """An RTT sample in ms and its lane: ``rtt`` (s) or ``rtt_ms`` of a Stats or
    ProbeSucceeded record, or ``probe_rtt`` (s) of a completed migration (the new path's)."""
    kind = normalize_type(_type(record))
    body = _body(record)
    if kind in ("Stats", "ProbeSucceeded"):
        seconds, ms = _count(body.get("rtt")), _count(body.get("rtt_ms"))
    elif kind == "MigrationCompleted":
        seconds, ms = _count(body.get("probe_rtt")), None
    else:
        return None
    value = ms if ms is not None else (seconds * 1e3 if seconds is not None else None)
    if value is None or value < 0:
        return None
    conn = _text(record.get("conn") or "-")
    if kind == "MigrationCompleted":
        to_path = _from_to(body)[1]
        return ((conn, to_path), value) if to_path else None
    return _lane(record), value


def _rtts(
    recs: Sequence[tuple[float, Mapping[str, Any]]], t0: float, lanes: Mapping[Lane, int]
) -> Series:
    series: Series = {}
    for t, r in recs:
        sample = _rtt_ms(r)
        if sample is not None and sample[0] in lanes:
            times, values = series.setdefault(sample[0], ([], []))
            times.append(t - t0)
            values.append(sample[1])
    return series


def _window(series: Series, start: float, end: float) -> Series:
    """Only the samples in [start, end]: the axis scales to what is shown."""
    out: Series = {}
    for lane, (times, values) in series.items():
        kept = [(t, v) for t, v in zip(times, values, strict=True) if start <= t <= end]
        if kept:
            out[lane] = ([t for t, _ in kept], [v for _, v in kept])
    return out


#: A switch's end: what its label says happened.
_OUTCOME_WORDS = {
    "MigrationCompleted": "",
    "MigrationRolledBack": "rolled back after ",
    "MigrationFailed": "failed after ",
}


def switch_labels(records: Iterable[Mapping[str, Any]]) -> list[tuple[float, Lane, str]]:
    """Per switch that ended (completed, rolled back, failed): (seconds after the start, lane
    of its target path, label). The label gives the reason and the confirmation time
    (``manual: 4.2 ms``; ``failover: rolled back after 812.0 ms``): from the switch's start
    (the latest ``SwitchStarted`` on the connection not yet paired) to its end, in ms; "time
    unknown" when the start is not in the journal."""
    timed, _ = _timed(records)
    if not timed:
        return []
    t0 = timed[0][0]
    open_starts: dict[str, tuple[float, Mapping[str, Any]]] = {}
    labels: list[tuple[float, Lane, str]] = []
    for t, r in timed:
        kind = normalize_type(_type(r))
        conn = _text(r.get("conn") or "-")
        if kind == "SwitchStarted":
            open_starts[conn] = (t, _body(r))
            continue
        if kind not in _OUTCOME_WORDS:
            continue
        body = _body(r)
        start = open_starts.pop(conn, None)
        reason = body.get("reason") or (start[1].get("reason") if start else None) or "?"
        plot_kind = _plot_kind(r) or kind
        words = _OUTCOME_WORDS.get(plot_kind, "ended after ")
        when = f"{words}{(t - start[0]) * 1e3:.1f} ms" if start else "time unknown"
        to_path = _from_to(body)[1] or (_from_to(start[1])[1] if start else None)
        lane = (conn, to_path) if to_path else _lane(r)
        labels.append((t - t0, lane, _short(f"{_text(reason)}: {when}", _MAX_LABEL)))
    return labels


def _legend_handles(seen: set[str], states: Iterable[str]) -> list[Any]:
    """A legend entry per marker drawn and per state colour shaded."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = [
        Line2D([], [], linestyle="none", marker=m, markerfacecolor=f, markeredgecolor=e, label=lbl)
        for kind, (m, f, e, lbl) in _MARKERS.items()
        if kind in seen
    ]
    if "other" in seen:
        handles.append(Line2D([], [], linestyle="none", marker=".", color="0.5", label="other"))
    for state in states:
        colour = _STATE_COLOURS.get(state, _OTHER_STATE_COLOUR)
        handles.append(Patch(facecolor=colour, edgecolor="0.6", label=f"state: {state}"))
    return handles


def figure(
    records: Iterable[Mapping[str, Any]], *, start: float | None = None, end: float | None = None
) -> Any:
    """The timeline as a matplotlib ``Figure`` (see the module docstring); ``start``/``end``
    zoom to that window, in seconds after the earliest record.

    Panels, top to bottom: the lanes (state shading, markers, a label per switch with its
    reason and confirmation time), then each rate series the journal has (tx goodput, rx
    goodput: per lane, never summed), then RTT over time. Raises ValueError for a window that
    is empty (``start >= end``) or negative.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if (start is not None and start < 0) or (end is not None and end <= 0):
        raise ValueError(f"zoom window must be seconds after the start (>= 0), got {start}..{end}")
    if start is not None and end is not None and start >= end:
        raise ValueError(f"zoom window is empty: from {start} s is not before to {end} s")
    records = list(records)
    recs, _ = _timed(records)
    t0 = recs[0][0] if recs else 0.0
    t_end = (recs[-1][0] - t0) if recs else 1.0
    t_end = t_end if t_end > 0 else 1.0
    lo = 0.0 if start is None else start
    hi = t_end if end is None else end

    seen_lanes: dict[Lane, None] = {}  # insertion-ordered set
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
    panels: list[tuple[str, Series]] = []
    for key, title in _RATE_PANELS:
        series = _window(_rates(recs, t0, lane_y, key), lo, hi)
        if series:
            panels.append((title, series))
    rtts = _window(_rtts(recs, t0, lane_y), lo, hi)

    n_lower = len(panels) + (1 if rtts else 0)
    fig = Figure(figsize=(12, 1.8 + 0.55 * max(len(lanes), 2) + 2.2 * n_lower))
    FigureCanvasAgg(fig)
    ratios = [max(len(lanes), 2) * 0.9] + [2.5] * n_lower
    axes = fig.subplots(1 + n_lower, 1, sharex=True, squeeze=False, height_ratios=ratios)
    ax = axes[0][0]

    # State shading: from each PathStateChanged to the next one (or the end) on that lane.
    changes: dict[Lane, list[tuple[float, str]]] = defaultdict(list)
    for t, r in recs:
        if normalize_type(_type(r)) == "PathStateChanged" and _lane(r) in lane_y:
            changes[_lane(r)].append((t - t0, _text(_body(r).get("new", ""))))
    states: dict[str, None] = {}
    for lane, points in changes.items():
        y = lane_y[lane]
        ends = [t for t, _ in points[1:]] + [t_end]
        for (begin, state), finish in zip(points, ends, strict=True):
            if finish < lo or begin > hi:
                continue
            states.setdefault(state)
            ax.broken_barh(
                [(begin, max(finish - begin, t_end * 1e-3))],
                (y - 0.35, 0.7),
                facecolors=_STATE_COLOURS.get(state, _OTHER_STATE_COLOUR),
                edgecolors="none",
                zorder=1,
            )

    seen: set[str] = set()
    for t_abs, r in recs:
        kind = _plot_kind(r)
        y_lane = lane_y.get(_lane(r))
        t = t_abs - t0
        if kind is None or y_lane is None or not lo <= t <= hi:
            continue
        y = y_lane
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

    # A label per switch, above its target lane; stacked when switches are close in time so
    # that labels do not cover each other.
    # A 7 pt character is about 1/140 of the lanes' width (12 in at 100 dpi, legend aside).
    per_char = (hi - lo) / 140
    last_at: dict[int, tuple[float, int]] = {}  # lane -> (time its last label ends, level)
    for t, lane, text in switch_labels(records):
        y_lane = lane_y.get(lane)
        if y_lane is None or not lo <= t <= hi:
            continue
        prev = last_at.get(y_lane)
        level = (prev[1] + 1) % 3 if prev is not None and t < prev[0] else 0
        last_at[y_lane] = (t + (len(text) + 2) * per_char, level)
        ax.annotate(
            text.replace("$", r"\$"),
            xy=(t, y_lane),
            xytext=(4, 9 + 11 * level),
            textcoords="offset points",
            fontsize=7,
            color="0.15",
            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.8, "lw": 0},
            zorder=4,
            gid="switch-label",
        )

    ax.set_yticks(range(len(lanes)), [_lane_label(lane) for lane in lanes])
    ax.set_ylim(-0.7, max(len(lanes), 1) - 0.3)
    ax.invert_yaxis()
    ax.grid(axis="x", linestyle=":", linewidth=0.5)
    dropped = len(seen_lanes) - len(lanes)
    zoom = f", {lo:g}-{hi:g} s" if start is not None or end is not None else ""
    ax.set_title(
        "quic-supervisor timeline"
        + zoom
        + (f" (first {len(lanes)} of {len(seen_lanes)} lanes drawn)" if dropped else "")
    )
    handles = _legend_handles(seen, states)
    if handles:
        ax.legend(
            handles=handles,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize=7,
            ncols=2 if len(handles) > max(len(lanes), 2) * 2 + 2 else 1,
        )

    row = 1
    for title, series in panels:
        pax = axes[row][0]
        row += 1
        peak = max(max(values) for _, values in series.values())
        scale, unit = next(
            ((s, u) for s, u in ((1e6, "MB/s"), (1e3, "kB/s")) if peak >= s), (1.0, "B/s")
        )
        for lane, (times, rates) in series.items():
            pax.step(times, [v / scale for v in rates], where="pre", label=_lane_label(lane))
        pax.set_ylabel(f"{title} ({unit})")
        pax.grid(linestyle=":", linewidth=0.5)
        pax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    if rtts:
        rax = axes[row][0]
        for lane, (times, values) in rtts.items():
            rax.plot(times, values, marker=".", linewidth=1, label=_lane_label(lane))
        rax.set_ylabel("RTT (ms)")
        rax.set_ylim(bottom=0)
        rax.grid(linestyle=":", linewidth=0.5)
        rax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    axes[-1][0].set_xlabel("time (s after the journal's first record)")
    pad = 0.02 * (hi - lo)
    ax.set_xlim(lo - (pad if start is None else 0), hi + (pad if end is None else 0))
    fig.tight_layout()
    return fig


def plot(
    records: Iterable[Mapping[str, Any]],
    out_png: str | os.PathLike[str],
    *,
    start: float | None = None,
    end: float | None = None,
) -> None:
    """Write a PNG of :func:`figure` to ``out_png``.

    Uses matplotlib's Agg canvas directly (no pyplot): no global backend switch, no GUI,
    safe from any thread. Records without a usable time, and lanes past :data:`MAX_LANES`, are
    not drawn.
    """
    fig = figure(records, start=start, end=end)
    fig.savefig(os.fspath(out_png), format="png", dpi=100)
