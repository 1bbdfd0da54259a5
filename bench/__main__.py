"""Run the benchmark suite (``make bench``): each benchmark in its own process, JSON to
``bench/results/<name>.json``, then one table on stdout.

    python -m bench [--quick] [--only b1_migration,b3_throughput] [--no-wait] [--skip-long]

Why a process per benchmark: a crash, a leaked thread (Ray) or a grown heap in one does not
touch the next, and every figure starts from the same state. The machine is shared and noisy:
before starting, the suite waits (bounded) for the 1-minute load average to fall to
``MAX_LOAD`` and records the load before and after each benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import Figure, Report, fmt, machine, results_dir, write_result

#: (module, seconds allowed, arguments); run in this order (Ray last: the heaviest start-up).
SUITE: list[tuple[str, int, list[str]]] = [
    ("b1_migration", 180, []),
    ("b2_failover", 420, []),
    ("b2_network", 240, []),  # 4 x 20 one-connection trials, 2 x 1,000: ~1-1.5 min
    ("b3_throughput", 300, []),
    ("b4_scale", 450, []),  # the 10,000 step stops dialing at its --budget (330 s)
    ("b4_starved", 480, []),  # netns + cgroup, 1,000 conns: ~4-5 min (windows: --window)
    ("telemetry_overhead", 120, ["--migrations", "200"]),
    ("b5_control", 240, []),
    ("b6_loss", 420, []),  # 1,000 + 10,000 migrations under loss, netns: ~3.5-4 min
]
#: Entries that take minutes on their own: ``--skip-long`` leaves them out (default: run).
LONG: frozenset[str] = frozenset({"b6_loss"})
MAX_LOAD = 1.5
MAX_WAIT = 180.0


def wait_for_quiet(max_load: float = MAX_LOAD, max_wait: float = MAX_WAIT) -> dict[str, Any]:
    """Poll the load average every 15 s until it is <= ``max_load`` or ``max_wait`` passed."""
    t0 = time.monotonic()
    first = os.getloadavg()[0]
    while os.getloadavg()[0] > max_load and time.monotonic() - t0 < max_wait:
        time.sleep(15)
    return {
        "load_at_start": round(first, 2),
        "load_when_started": round(os.getloadavg()[0], 2),
        "waited_s": round(time.monotonic() - t0, 1),
        "max_load": max_load,
    }


def _telemetry_report(res: dict[str, Any], quick: bool) -> Report:
    """bench.telemetry_overhead prints plain JSON: turn it into a row of the table."""
    report = Report("telemetry_overhead", detail=res, quick=quick)
    report.add(
        Figure(
            "T",
            "switch() with every span exported over OTLP/HTTP, median extra",
            "(issue 3: informative)",
            "ms",
            res.get("median_diff_ms"),
            baseline={"no provider p50 ms": res.get("switch_none", {}).get("p50_ms")},
            note=f"span CPU {res.get('span_cpu_us')} us per migration",
        )
    )
    return report


def run_one(name: str, timeout: int, args: list[str], quick: bool, logdir: Path) -> dict[str, Any]:
    argv = [sys.executable, "-m", f"bench.{name}", *args]
    if quick:
        argv.append("--quick" if name != "telemetry_overhead" else "")
    argv = [a for a in argv if a]
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    log = logdir / f"{name}.log"
    with open(log, "w") as err:
        try:
            proc = subprocess.run(
                argv, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout, check=False
            )
            code: int | str = proc.returncode
            stdout = proc.stdout
        except subprocess.TimeoutExpired:
            code, stdout = "timeout", ""
    elapsed = time.monotonic() - t0
    status = {
        "name": name,
        "exit": code,
        "seconds": round(elapsed, 1),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "log": str(log),
    }
    if name == "telemetry_overhead" and code == 0:
        write_result(_telemetry_report(json.loads(stdout), quick))
    path = results_dir(quick) / f"{name}.json"
    if path.exists() and code == 0:
        data = json.loads(path.read_text())
        data["run"] = status
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    else:
        tail = log.read_text(errors="replace")[-1500:]
        status["error_tail"] = tail
    return status


def print_table(names: list[str], base: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="quic-supervisor benchmarks", show_lines=False)
    for col in ("", "figure", "goal", "result: median [p25-p75]", "baseline", "met"):
        table.add_column(col, overflow="fold")
    for name in names:
        path = base / f"{name}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        for f in data.get("figures", []):
            met = {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[f.get("met")]
            table.add_row(
                f["bench"],
                f["figure"],
                f["goal"],
                fmt(f["result"], f["unit"]),
                fmt(f.get("baseline")),
                met,
            )
    Console(width=200).print(table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts (harness check)")
    parser.add_argument("--only", default="", help="comma-separated module names")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine")
    parser.add_argument(
        "--skip-long", action="store_true", help=f"leave out the long ones ({', '.join(LONG)})"
    )
    args = parser.parse_args()
    only = {n for n in args.only.split(",") if n}
    suite = [
        s for s in SUITE if (not only or s[0] in only) and not (args.skip_long and s[0] in LONG)
    ]
    base = results_dir(args.quick)
    base.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    load = {"skipped": True} if args.no_wait else wait_for_quiet()
    logdir = Path(tempfile.mkdtemp(prefix="qs-bench-logs-"))
    runs = []
    for name, timeout, extra in suite:
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        status = run_one(name, timeout, extra, args.quick, logdir)
        print(f"bench: {name} exit={status['exit']} in {status['seconds']} s", file=sys.stderr)
        runs.append(status)
    summary = {
        "machine": machine(),
        "quick": args.quick,
        "load": load,
        "total_s": round(time.monotonic() - started, 1),
        "runs": runs,
    }
    suite_file = base / "suite.json"
    if only and suite_file.exists():
        # A partial run updates its own entries; the full run's total and load stay.
        previous = json.loads(suite_file.read_text())
        kept = [r for r in previous.get("runs", []) if r.get("name") not in only]
        summary = {**previous, "runs": kept + runs}
    suite_file.write_text(json.dumps(summary, indent=2) + "\n")
    print_table([s[0] for s in suite], base)
    print(f"total {summary['total_s']} s; logs in {logdir}", file=sys.stderr)
    return 0 if all(r["exit"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
