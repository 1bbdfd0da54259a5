"""Shared writer of the local interop suite's results (``bench/results/interop.json``).

Several test files (client migration, connection migration, NAT rebinding, ...) record their
peer x case outcomes into ONE file, which ``bench/report.py`` renders as the README's interop
table. It is test output: git ignores it; ``QS_INTEROP_RESULTS`` overrides its path.

Format: one JSON object keyed by ``"<case>/<peer>"`` (case = the interop runner's test name
where one exists, e.g. ``connectionmigration``, ours otherwise, e.g. ``client_migration``;
peer = ``ngtcp2``, ``aioquic``, ``ours``, ...). Each value is an object::

    {
      "case": "client_migration",      # always written by `record`
      "peer": "ngtcp2",                # always written by `record`
      "at": "2025-01-01T12:00:00+0000",# always written by `record` (local time of the run)
      "outcome": "pass",               # "pass" | "fail" | "not applicable" (the table cell)
      "checks": {"first_is_path_challenge": true, ...},   # each check's pass/fail
      "stall_ms": 12.3,                # measurement (never asserted); null if none taken
      "confirmation_ms": 4.5,          # SwitchResult.confirmation_s in ms; null if none
      "note": "why not applicable / what failed"
    }

Only ``case``, ``peer`` and ``at`` are fixed; the rest are the recommended fields the renderer
reads (``outcome``, ``stall_ms``); any other JSON-serialisable field is kept as given. A new
`record` for a key replaces that key's whole entry (no stale fields from an earlier run) and
leaves every other key untouched.

Writers serialise on an ``fcntl`` lock (a sibling ``.lock`` file, since the JSON file itself is
replaced) and write atomically (temp file + ``os.replace``): concurrent test processes never
lose each other's keys and a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["load", "record", "results_path"]

_DEFAULT = Path(__file__).resolve().parents[2] / "bench" / "results" / "interop.json"


def results_path() -> Path:
    """The results file: ``$QS_INTEROP_RESULTS`` or ``bench/results/interop.json``."""
    return Path(os.environ.get("QS_INTEROP_RESULTS") or _DEFAULT)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """The recorded results (empty if none yet; a corrupt or non-object file reads as empty)."""
    path = path or results_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record(case: str, peer: str, **fields: Any) -> dict[str, Any]:
    """Set the entry ``"<case>/<peer>"`` to ``fields`` (plus case, peer, at); return it."""
    path = results_path()
    entry = {"case": case, "peer": peer, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
    print(f"\n[interop] {json.dumps(entry)}")
    with _locked(path):
        data = load(path)
        data[f"{case}/{peer}"] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
                fh.write("\n")
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return entry
