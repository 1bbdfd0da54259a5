"""Regenerate README.md's results table from ``bench/results/*.json``.

    python -m bench.report [--readme README.md] [--check]

Only the text between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` is replaced, so the
table is always what the last ``make bench`` measured (machine, date, load, per figure: goal,
baseline, result). ``--check`` exits 1 when the README differs (nothing is written).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench._common import RESULTS_DIR, fmt

START = "<!-- bench:start -->"
END = "<!-- bench:end -->"
ORDER = [
    "b1_migration",
    "b2_failover",
    "b2_network",
    "b3_throughput",
    "b4_scale",
    "b4_starved",
    "b5_control",
    "telemetry_overhead",
]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _figures(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text())
    return list(data.get("figures", [])) if isinstance(data, dict) else []


def table(results: Path = RESULTS_DIR) -> str:
    files = {p.stem: p for p in results.glob("*.json") if p.stem != "suite"}
    names = [n for n in ORDER if n in files] + sorted(set(files) - set(ORDER))
    suite_path = results / "suite.json"
    suite: dict[str, Any] = json.loads(suite_path.read_text()) if suite_path.exists() else {}
    first: dict[str, Any] | None = None
    rows = []
    for name in names:
        data = json.loads(files[name].read_text())
        if not isinstance(data, dict) or "figures" not in data:
            continue  # not a suite result (e.g. the fault suite's own log)
        first = first or data.get("machine")
        run = data.get("run", {})
        load = f"{run['load_before']}" if "load_before" in run else "?"
        for f in data["figures"]:
            met = {True: "yes", False: "**no**", None: "-"}[f.get("met")]
            base = f.get("baseline")
            rows.append(
                "| "
                + " | ".join(
                    _cell(x)
                    for x in (
                        f["bench"],
                        f["figure"],
                        f["goal"],
                        fmt(base),
                        fmt(f["result"], f["unit"]),
                        met,
                        load,
                    )
                )
                + " |"
            )
    notes = [
        f"- {f['bench']} {f['figure']}: {f['note']}"
        for name in names
        for f in _figures(files[name])
        if f.get("note")
    ]
    machine = suite.get("machine") or first or {}
    head = [
        f"Measured by `make bench` on {machine.get('date', '?')}: {machine.get('cpus', '?')} x "
        f"{machine.get('host_cpu', '?')}, Linux {machine.get('kernel', '?')}, Python "
        f"{machine.get('python', '?')}, aioquic {machine.get('aioquic', '?')}"
        + (f", suite {suite['total_s']} s" if "total_s" in suite else "")
        + ("" if not suite.get("quick") else " (**--quick counts**)")
        + ". Results are median [p25-p75] over n repeats; load = 1-minute load average when "
        "that benchmark started (a shared machine).",
        "",
        "| | figure | goal | baseline (same run) | result | met | load |",
        "|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + rows + (["", *notes] if notes else []))


def update(readme: Path, check: bool = False) -> bool:
    """Replace the marked block; returns True when the file changed (or would)."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: markers {START} / {END} not found")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    new = f"{before}{START}\n{table()}\n{END}{after}"
    if new == text:
        return False
    if not check:
        readme.write_text(new)
    return True


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=Path(__file__).parent.parent / "README.md")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    changed = update(args.readme, args.check)
    if args.check and changed:
        raise SystemExit(1)
    print(f"{args.readme}: {'updated' if changed else 'unchanged'}")
