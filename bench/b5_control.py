"""B5 control plane: a migration asked through a Ray handle vs in-process.

    python -m bench.b5_control [--quick]

A thin wrapper around ``bench.ray_overhead`` (the measurement itself: a local Ray cluster, a
listener agent, a dialer agent, ``Path.switch()`` via a ``RemoteSupervisor`` handle vs a local
``Supervisor`` against the same listener) that turns its figures into this suite's records.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bench._common import Figure, Report, write_result


def main(quick: bool = False) -> dict[str, Any]:
    report = Report("b5_control", quick=quick)
    try:
        from bench import ray_overhead
    except ImportError as exc:  # ray is an optional extra
        report.notes.append(f"skipped: {exc} (pip install -e '.[ray]')")
        write_result(report)
        return report.as_dict()
    res = ray_overhead.main(calls=100 if quick else 300, migrations=30 if quick else 100)
    report.detail = res
    mig = res["migration"]
    call = res["call"]
    for key, goal, limit in (("p50", "<= +1.5 ms", 1.5), ("p99", "<= +5 ms", 5.0)):
        over = mig[f"overhead_{key}_ms"]
        report.add(
            Figure(
                "B5",
                f"migration via Ray handle, {key} overhead",
                goal,
                "ms",
                over,
                baseline={
                    "in-process ms": mig["in_process"][f"{key}_ms"],
                    "via handle ms": mig["handle"][f"{key}_ms"],
                },
                met=over <= limit,
                note=f"n={mig['handle']['n']} each; request round trip {key}: "
                f"{call['handle'][f'{key}_ms']} vs {call['in_process'][f'{key}_ms']} ms",
            )
        )
    write_result(report)
    return report.as_dict()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print(json.dumps(main(parser.parse_args().quick), indent=2))
