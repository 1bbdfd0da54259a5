"""Shared bench helpers: summaries over repeats, figure records, machine facts, JSON output.

Why one place: every benchmark reports the same shape (median with p25/p75 and min/max over
repeats, a goal, a baseline measured in the same run) so that ``bench.report`` can build one
table from all of them without knowing any benchmark.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

RESULTS_DIR = Path(__file__).parent / "results"
#: Where ``--quick`` runs write: never over the committed full-run results.
QUICK_DIR = RESULTS_DIR / "quick"

T = TypeVar("T")


def summary(samples: Iterable[float], scale: float = 1.0, digits: int = 3) -> dict[str, Any]:
    """median, p25/p75, p99, min/max and n of ``samples`` (times ``scale``), rounded."""
    xs = sorted(float(x) * scale for x in samples)
    if not xs:
        return {"n": 0}

    def pct(q: float) -> float:
        # Nearest rank on (n - 1): p50 of an even count is the upper middle (no interpolation
        # between two repeats that really happened).
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]

    return {
        "n": len(xs),
        "median": round(statistics.median(xs), digits),
        "p25": round(pct(0.25), digits),
        "p75": round(pct(0.75), digits),
        "p99": round(pct(0.99), digits),
        "min": round(xs[0], digits),
        "max": round(xs[-1], digits),
    }


@dataclass
class Figure:
    """One row of the results table: a measured value against its goal and its baseline.

    ``result`` and ``baseline`` are summaries (see :func:`summary`) or plain numbers; ``met``
    is None when the goal is not a simple threshold of this figure.
    """

    bench: str
    figure: str
    goal: str
    unit: str
    result: dict[str, Any] | float | None
    baseline: dict[str, Any] | float | str | None = None
    met: bool | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Report:
    """What one benchmark module returns: its figures and whatever raw detail it keeps."""

    name: str
    figures: list[Figure] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    quick: bool = False

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "quick": self.quick,
            "machine": machine(),
            "figures": [f.as_dict() for f in self.figures],
            "notes": self.notes,
            "detail": self.detail,
        }


def med(x: dict[str, Any] | float | None) -> float | None:
    """The median of a summary, or the number itself."""
    if isinstance(x, dict):
        value = x.get("median")
        return float(value) if value is not None else None
    return None if x is None else float(x)


def machine() -> dict[str, Any]:
    """Facts that make two runs comparable (or not): CPU, cores, load, versions, date."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "host_cpu": model,
        "cpus": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "kernel": platform.release(),
        "aioquic": ver("aioquic"),
        "uvloop": ver("uvloop"),
    }


def results_dir(quick: bool) -> Path:
    return QUICK_DIR if quick else RESULTS_DIR


def write_result(report: Report) -> Path:
    base = results_dir(report.quick)
    base.mkdir(parents=True, exist_ok=True)
    path = base / f"{report.name}.json"
    path.write_text(json.dumps(report.as_dict(), indent=2, default=str) + "\n")
    return path


def raise_nofile(want: int = 16384) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards ``want`` (bounded by the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_bytes() -> int:
    """Resident set size of this process now (not the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def run(main: Callable[[], Coroutine[Any, Any, T]], loop: str = "asyncio") -> T:
    """``asyncio.run`` on the default loop or on uvloop (``loop="uvloop"``)."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main())
    return asyncio.run(main())


class Deadline:
    """A time budget: benchmarks stop adding repeats once it is spent (they stop by themselves)."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0


def fmt(value: Any, unit: str = "") -> str:
    """A figure for a table: a summary as ``median [p25-p75] n=N`` (then ``p90 X max Y`` when
    it has a p90), else the value as is."""
    if isinstance(value, dict):
        if "median" in value:
            text = (
                f"{_num(value['median'])} {unit} [{_num(value['p25'])}-{_num(value['p75'])}]"
                f" n={value['n']}".replace("  ", " ")
            )
            if "p90" in value:  # the tail, where a figure asks for it
                text += f" p90 {_num(value['p90'])} max {_num(value['max'])}"
            return text
        return ", ".join(f"{k}: {fmt(v, unit)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{_num(value)} {unit}".strip()
    return "" if value is None else f"{value} {unit}".strip()


def _num(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)


def proc_cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) of process ``pid`` (this one when None) so far, from
    /proc/<pid>/stat: another process of the bench (a server) can be read without asking it."""
    stat = Path(f"/proc/{pid if pid is not None else 'self'}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # after the command name (which may hold spaces)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds() -> int:
    """File descriptors this process has open now."""
    return len(os.listdir("/proc/self/fd"))
