"""The one vocabulary of ``quic-supervisor ctl`` and ``quic-supervisor fleet``.

Both front ends drive the same supervisor operations, one through a Unix control socket and
one through Ray, so they take the same arguments (built here), print the same tables and
lines (rendered here), give ids the same way (printed whole or as a unique prefix, accepted
as printed) and fail with the same one-line errors. ``fleet`` shows one block per agent,
each exactly what ``ctl`` shows for its one supervisor; ``--json`` of ``fleet`` is
``{node: <what ctl --json prints>}``.

Conventions, and why:

- **The connection is a positional ``CONN_ID``** (``ctl migrate CONN_ID --to MA``, ``fleet
  migrate CONN_ID --to MA``): it is the one object every such command acts on, as a PID is
  for ``kill``; options are for modifiers. ``fleet`` finds the agent holding it
  (``--node`` narrows the search when ids repeat).
- **Drain closes the drained path** unless ``--keep-drained``, in both (and in the library:
  ``Supervisor.drain``, ``RemoteSupervisor.drain``). A drain prepares an interface for
  maintenance: a path left there keeps sending keep-alives and health probes through it,
  and a ``FailoverPolicy(prefer=...)`` would move connections back onto it.
- **Units**: seconds for every duration option (``--timeout``, ``--probe-timeout``),
  milliseconds for RTT columns (``rtt ms``), SI bytes (``k``, ``M``, ``G``); addresses are
  multiaddrs, never ``ip:port``.
- **Tables are complete when piped**: off a terminal the console is as wide as the widest
  row, so nothing is cut at 80 columns or wrapped inside a multiaddr.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from supervisor.core.messages import ConnectionSnapshot, MigrationStats
from supervisor.core.validate import MAX_DURATION
from supervisor.orchestration.drain import DrainReport
from supervisor.remote.protocol import Health, StopReport

__all__ = [
    "DEFAULT_PROBE_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "LS_COLUMNS",
    "PATH_COLUMNS",
    "AmbiguousIdError",
    "IdError",
    "UnknownIdError",
    "add_deadline_argument",
    "add_drain_arguments",
    "add_json",
    "add_log_level",
    "add_migrate_arguments",
    "add_timeout",
    "drain_json",
    "drain_lines",
    "health_line",
    "health_ok",
    "ls_table",
    "make_console",
    "migrate_line",
    "not_negative",
    "one_line",
    "paths_table",
    "positive",
    "resolve_id",
    "short_ids",
    "size",
    "snapshot_json",
    "stats_json",
    "stop_json",
    "stop_line",
]

#: Seconds ``ctl`` and ``fleet`` wait for the socket or the Ray cluster, and for each answer.
DEFAULT_TIMEOUT = 60.0
#: Seconds a probe of an unvalidated target may take (``Supervisor.drain``'s default too).
DEFAULT_PROBE_TIMEOUT = 2.0
#: Seconds ``stop`` lets open streams finish before every connection is closed (the pod's
#: preStop passes its own, below terminationGracePeriodSeconds).
DEFAULT_STOP_DEADLINE = 10.0
#: Off a terminal: wide enough for any row, so rich never cuts or wraps one.
_PIPE_WIDTH = 100_000
#: Ids longer than this are shown as their shortest unique prefix (Ray node ids: 56 hex).
_SHORT_AFTER = 16
_SHORT_MIN = 12

PATH_COLUMNS = (
    "conn",
    "dir",
    "local",
    "remote",
    "state",
    "device",
    "rtt ms",
    "sent",
    "recv",
    "migrations",
)
LS_COLUMNS = (
    "node",
    "host",
    "pid",
    "connections",
    "listeners",
    "restored",
    "migrations",
    "success",
)


# -- arguments ------------------------------------------------------------------------------------


def positive(text: str) -> float:
    """argparse type: seconds > 0 (argparse names the option in its error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print JSON instead of tables and lines"
    )


def add_timeout(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--timeout",
        type=positive,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait for {what}, and for each answer (default: {DEFAULT_TIMEOUT:g})",
    )


def add_log_level(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` after the subcommand too (before it, the main parser's wins)."""
    parser.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        choices=["debug", "info", "warning", "error"],
        help="logging threshold (stderr; default: warning); info or debug also shows the "
        "warnings of the libraries underneath (Ray's included)",
    )


def _probe_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--probe-timeout",
        type=positive,
        default=DEFAULT_PROBE_TIMEOUT,
        metavar="SECONDS",
        help="how long the probe of a path that is not validated yet may take "
        f"(default: {DEFAULT_PROBE_TIMEOUT:g})",
    )


def add_drain_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--local-addr",
        metavar="MA",
        help="local address to drain, e.g. /ip4/10.0.0.1 (a /udp/PORT narrows it to that port)",
    )
    which.add_argument("--device", metavar="DEV", help="interface to drain, e.g. eth1")
    _probe_timeout(parser)
    parser.add_argument(
        "--keep-drained",
        action="store_true",
        help="keep the drained paths open (standby) instead of closing them (default: close)",
    )


def not_negative(text: str) -> float:
    """argparse type: seconds a stop may wait (0: at once), within what the library accepts
    (``validate.MAX_DURATION``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value <= MAX_DURATION:  # NaN and inf too
        raise argparse.ArgumentTypeError(
            f"must be >= 0 and <= {MAX_DURATION:g} seconds, got {text!r}"
        )
    return value


def add_deadline_argument(parser: argparse.ArgumentParser) -> None:
    """``stop --deadline``: how long open streams may run before every connection is closed."""
    parser.add_argument(
        "--deadline",
        type=not_negative,
        default=DEFAULT_STOP_DEADLINE,
        metavar="SECONDS",
        help="let connections with open streams run this long, then close every one with "
        f"CONNECTION_CLOSE (0: at once; default: {DEFAULT_STOP_DEADLINE:g})",
    )


def add_health_choice(parser: argparse.ArgumentParser) -> None:
    """``health --ready|--live``: which state a probe asks about (both when neither)."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--ready", action="store_true", help="only readiness counts")
    which.add_argument("--live", action="store_true", help="only liveness counts")


def add_migrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "conn_id",
        metavar="CONN_ID",
        help="the connection, as `paths` prints it (a unique prefix is enough)",
    )
    parser.add_argument(
        "--to",
        required=True,
        metavar="MA",
        help="local multiaddr of the path to switch to, added when missing; port 0 matches any "
        "port, e.g. /ip4/10.0.1.5/udp/0/quic-v1",
    )
    _probe_timeout(parser)


# -- ids ------------------------------------------------------------------------------------------


class IdError(LookupError):
    """An id given on the command line that names no object, or more than one."""


class UnknownIdError(IdError):
    def __init__(self, what: str, given: str, known: Sequence[str], listing: str) -> None:
        self.what = what
        self.given = given
        self.known = list(known)
        shown = ", ".join(self.known[:8]) + (", ..." if len(self.known) > 8 else "")
        there = f"known: {shown}" if self.known else "there are none"
        super().__init__(
            f"no {what} {given!r} ({there}): give an id as `{listing}` prints it, or a unique "
            "prefix of one"
        )


class AmbiguousIdError(IdError):
    def __init__(self, what: str, given: str, candidates: Sequence[str]) -> None:
        self.what = what
        self.given = given
        self.candidates = list(candidates)
        super().__init__(
            f"{what} {given!r} is ambiguous, it starts {len(self.candidates)} of them "
            f"({', '.join(self.candidates)}): give more characters"
        )


def resolve_id(given: str, known: Iterable[str], *, what: str, listing: str) -> str:
    """The one id in ``known`` that is ``given`` or starts with it."""
    ids = sorted(set(known))
    if given in ids:
        return given
    matches = [i for i in ids if given and i.startswith(given)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UnknownIdError(what, given, ids, listing)
    raise AmbiguousIdError(what, given, matches)


def short_ids(ids: Iterable[str]) -> dict[str, str]:
    """How to print each id: whole up to 16 characters, else its shortest prefix of at least
    12 that no other id starts with (git's abbreviation), which :func:`resolve_id` accepts."""
    unique = sorted(set(ids))
    out: dict[str, str] = {}
    for i in unique:
        if len(i) <= _SHORT_AFTER:
            out[i] = i
            continue
        n = _SHORT_MIN
        while n < len(i) and any(o != i and o.startswith(i[:n]) for o in unique):
            n += 1
        out[i] = i[:n]
    return out


# -- rendering -----------------------------------------------------------------------------------


def make_console() -> Console:
    """A console for ``sys.stdout``: as a terminal is on a terminal; else wide, uncoloured."""
    if sys.stdout.isatty():
        return Console(highlight=False)
    return Console(width=_PIPE_WIDTH, no_color=True, highlight=False)


def _ms(rtt: float | None) -> str:
    return "-" if rtt is None else f"{rtt * 1000:.2f}"


def size(n: int) -> str:
    """Bytes in SI units: 999, 1.2k, 3.4M, 5.6G."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _table(columns: Sequence[str], title: str | None) -> Table:
    table = Table(
        *columns,
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    for column in table.columns:
        column.no_wrap = True
    return table


def paths_table(snaps: Sequence[ConnectionSnapshot], title: str | None = None) -> Table:
    """Every connection and its paths, one row per path (:data:`PATH_COLUMNS`)."""
    table = _table(PATH_COLUMNS, title)
    for snap in snaps:
        head = [snap.conn_id, "in" if snap.inbound else "out"]
        if not snap.paths:
            state = "closed" if snap.closed else "-"
            table.add_row(
                *head, snap.local_addr, snap.remote_addr, state, *"----", str(snap.migrations)
            )
            continue
        for n, p in enumerate(snap.paths):
            table.add_row(
                *(head if n == 0 else ["", ""]),
                p.local_addr,
                p.remote_addr,
                str(p.state),
                p.device or "-",
                _ms(p.rtt),
                size(p.bytes_sent),
                size(p.bytes_received),
                str(snap.migrations) if n == 0 else "",
            )
    return table


def ls_table(rows: Sequence[dict[str, Any]], shown: dict[str, str]) -> Table:
    """``fleet ls``: one row per agent (:data:`LS_COLUMNS`); ``shown`` abbreviates labels."""
    table = _table(LS_COLUMNS, None)
    for r in rows:
        label = shown.get(r["label"], r["label"])
        if "error" in r:
            table.add_row(label, f"error: {r['error']}", *[""] * (len(LS_COLUMNS) - 2))
            continue
        rate = r.get("success_rate")
        table.add_row(
            label,
            str(r["host"]),
            str(r["pid"]),
            str(r["connections"]),
            str(r["listeners"]),
            str(r["restored"]),
            str(r["migrations"]),
            "-" if rate is None else f"{rate:.1%}",
        )
    return table


def snapshot_json(snap: ConnectionSnapshot) -> dict[str, Any]:
    """A connection as ``--json`` prints it (path states as their names)."""
    data = dataclasses.asdict(snap)
    for p in data["paths"]:
        p["state"] = str(p["state"])
    return data


def stats_json(stats: MigrationStats) -> dict[str, Any]:
    return {
        "completed": stats.completed,
        "failed": dict(stats.failed),
        "success_rate": stats.success_rate,
        "suspect_failovers": stats.suspect_failovers,
        "in_flight": stats.in_flight,
        "queued": stats.queued,
        "waited": stats.waited,
        "max_wait_s": stats.max_wait_s,
        "max_queued": stats.max_queued,
    }


def drain_json(report: DrainReport) -> dict[str, Any]:
    return {**dataclasses.asdict(report), "counts": report.counts}


def drain_lines(report: DrainReport, prefix: str = "") -> list[str]:
    """One line per connection on the drained address, then the counts and the wall time."""
    lines = []
    for o in report.outcomes:
        if o.result == "moved":
            line = f"{o.conn_id}: moved {o.from_addr} -> {o.to_addr}"
            line += " (drained path closed)" if o.closed_drained else " (drained path kept)"
            if o.error:
                line += f" ({o.error})"
        elif o.result == "failed":
            line = f"{o.conn_id}: FAILED, still on {o.from_addr}: {o.error}"
        else:
            continue  # not on the drained address: counted below
        lines.append(prefix + line)
    counts = report.counts
    lines.append(
        f"{prefix}moved {counts['moved']}, failed {counts['failed']}, "
        f"untouched {counts['untouched']} in {report.elapsed_s:.3f} s"
    )
    return lines


def stop_json(report: StopReport) -> dict[str, Any]:
    return dataclasses.asdict(report)


def stop_line(report: StopReport, prefix: str = "") -> str:
    """What an orderly stop did, in one line."""
    if report.already:
        return f"{prefix}already stopped: {report.connections} connection(s) were closed"
    cut = (
        f", {report.streams_cut} stream(s) cut at the deadline"
        if report.deadline_hit
        else ", every stream had ended"
    )
    return (
        f"{prefix}stopped: {report.connections} connection(s) closed{cut}, "
        f"in {report.elapsed:.3f} s"
    )


def health_line(health: Health, which: str = "both", prefix: str = "") -> str:
    """One line for a probe: ``ready``/``live``/``both`` decides what counts, the rest is said."""
    loop = f"loop lag {health.loop_lag * 1000:.1f} ms, last tick {health.tick_age:.1f} s ago"
    if which == "live":
        state = "live" if health.live else "NOT LIVE: the event loop is stuck"
        return f"{prefix}{state} ({loop})"
    ready = "ready" if health.ready else f"NOT READY: {health.why}"
    if which == "ready":
        return f"{prefix}{ready} ({health.connections} connection(s))"
    live = "live" if health.live else "NOT LIVE"
    return f"{prefix}{ready}, {live} ({health.connections} connection(s), {loop})"


def health_ok(health: Health, which: str = "both") -> bool:
    if which == "ready":
        return health.ready
    if which == "live":
        return health.live
    return health.ready and health.live


def migrate_line(snap: ConnectionSnapshot) -> str:
    active = next((p for p in snap.paths if p.active), None)
    return f"{snap.conn_id}: active path {active.local_addr if active else 'none'}"


def one_line(exc: BaseException) -> str:
    """An exception as one line: the text of this project's errors as it is (they say what
    failed and the fix), anyone else's behind its class name (``OSError: ...``)."""
    text = " ".join(str(exc).split())
    ours = type(exc).__module__.split(".")[0] in ("supervisor", "actors", "telemetry")
    if ours and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
