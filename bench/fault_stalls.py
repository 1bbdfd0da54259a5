"""Failover stalls recorded by the fault suite (tests/test_fault_suite.py), summarised.

The suite appends one entry per run of each scenario to ``bench/results/fault_suite.json``
(``QS_FAULT_RESULTS`` overrides). This reads it and prints, for the link-down and black-hole
scenarios, the stall the application saw (largest gap between two echo deliveries around the
fault), the detection time (fault -> failover started) and the switch time (started ->
confirmed): median and max over all recorded runs. It runs nothing itself (the suite needs
root and namespaces): run the two tests a few times first, e.g.

    for i in 1 2 3 4 5; do
        pytest -q tests/test_fault_suite.py -k "link_down_fails or blackholed"
    done
    python -m bench.fault_stalls
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(
    os.environ.get(
        "QS_FAULT_RESULTS", Path(__file__).resolve().parent / "results" / "fault_suite.json"
    )
)
SCENARIOS = ("link_down", "blackhole")
FIGURES = ("stall_s", "detect_s", "switch_s")


def summarise(path: Path = RESULTS) -> dict[str, Any]:
    runs = json.loads(path.read_text()) if path.exists() else []
    out: dict[str, Any] = {}
    for scenario in SCENARIOS:
        mine = [r for r in runs if r.get("scenario") == scenario]
        if not mine:
            continue
        entry: dict[str, Any] = {"runs": len(mine)}
        for figure in FIGURES:
            values = [float(r[figure]) for r in mine if figure in r]
            if values:
                entry[figure] = {
                    "median": round(statistics.median(values), 4),
                    "max": round(max(values), 4),
                }
        out[scenario] = entry
    flaps = [r["switches"] for r in runs if r.get("scenario") == "flapping"]
    if flaps:
        out["flapping"] = {"runs": len(flaps), "switches_max": max(flaps)}
    return out


def main() -> dict[str, Any]:
    return summarise()


if __name__ == "__main__":
    json.dump(main(), sys.stdout, indent=2)
    print()
