"""Run every benchmark module of this package and print ``{name: result}`` as JSON."""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
from pathlib import Path


def main() -> int:
    results = {}
    for mod in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"bench.{mod.name}")
        run = getattr(module, "main", None)
        if callable(run):
            results[mod.name] = run()
    json.dump(results, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
