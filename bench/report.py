"""Regenerate README.md's results tables from ``bench/results/*.json``.

    python -m bench.report [--readme README.md] [--check]

Only the text between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` is replaced, so the
table is always what the last ``make bench`` measured (machine, date, load, per figure: goal,
baseline, result). Likewise ``<!-- interop:start -->`` / ``<!-- interop:end -->`` get the local
interop suite's peer x case table from ``bench/results/interop.json`` (written by
``pytest -m interop``, see tests/rig/interop_results.py; ``QS_INTEROP_RESULTS`` overrides), left
as it is when that file does not exist. ``--check`` exits 1 when the README differs (nothing is
written).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from bench._common import RESULTS_DIR, fmt

START = "<!-- bench:start -->"
END = "<!-- bench:end -->"
INTEROP_START = "<!-- interop:start -->"
INTEROP_END = "<!-- interop:end -->"
#: Known interop cases and peers first (in this order), any others after them, sorted.
INTEROP_CASES = ["client_migration", "connectionmigration"]
INTEROP_PEERS = {
    "ngtcp2": "ngtcp2 `gtlsserver` (Debian)",
    "aioquic": "aioquic 1.7 server (stock)",
    "ours": "our listener (`Supervisor.listen`)",
}
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


def interop_path() -> Path:
    """``$QS_INTEROP_RESULTS`` or ``bench/results/interop.json`` (the tests' writer's rule)."""
    return Path(os.environ.get("QS_INTEROP_RESULTS") or RESULTS_DIR / "interop.json")


def _ordered(names: set[str], known: list[str]) -> list[str]:
    return [n for n in known if n in names] + sorted(names - set(known))


def _interop_cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    outcome = str(entry.get("outcome", "?"))
    if outcome == "not applicable":
        return "n/a"
    shown = outcome if outcome == "pass" else f"**{outcome}**"
    stall = entry.get("stall_ms")
    return shown if stall is None else f"{shown}, stall {float(stall):.1f} ms"


def interop_table(results: Path | None = None) -> str:
    """The interop results as markdown: a row per peer, a column per case; each cell the
    outcome and the stall at the switch ("n/a": the case does not apply, "-": not run)."""
    path = results or interop_path()
    data = json.loads(path.read_text()) if path.exists() else {}
    entries = [e for e in data.values() if isinstance(e, dict)] if isinstance(data, dict) else []
    by_key = {(str(e.get("peer")), str(e.get("case"))): e for e in entries}
    cases = _ordered({case for _, case in by_key}, INTEROP_CASES)
    peers = _ordered({peer for peer, _ in by_key}, list(INTEROP_PEERS))
    if not cases:
        return "No interop results recorded yet (`.venv/bin/pytest -m interop`)."
    latest = max(str(e.get("at", "")) for e in entries)
    rows = [
        "| peer | " + " | ".join(f"`{_cell(c)}`" for c in cases) + " |",
        "|---|" + "---|" * len(cases),
    ]
    for peer in peers:
        cells = [_interop_cell(by_key.get((peer, case))) for case in cases]
        rows.append(f"| {_cell(INTEROP_PEERS.get(peer, peer))} | " + " | ".join(cells) + " |")
    note = f"Last recorded {latest or '?'}; every check and figure (switch confirmation times"
    return "\n".join([*rows, "", f"{note} too) in `bench/results/interop.json`."])


def _replace_block(text: str, start: str, end: str, body: str) -> str:
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    return f"{before}{start}\n{body}\n{end}{after}"


def update(readme: Path, check: bool = False) -> bool:
    """Replace the marked blocks; returns True when the file changed (or would)."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: markers {START} / {END} not found")
    new = _replace_block(text, START, END, table())
    if INTEROP_START in new and INTEROP_END in new and interop_path().exists():
        new = _replace_block(new, INTEROP_START, INTEROP_END, interop_table())
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
