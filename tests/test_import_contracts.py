"""The import contracts of pyproject.toml ([tool.importlinter]) hold.

Layers (supervisor above actors above telemetry) and the boundary (supervisor and telemetry see
only actors' public modules) are what lets actors' internals change without touching callers;
``lint-imports`` checks them on the import graph, TYPE_CHECKING imports included.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The venv's own lint-imports, next to the interpreter running the tests.
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run lint-imports in ``cwd``, importing the packages from there (not the installed copy)."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_import_contracts_are_kept() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def _write_package(root: Path, *, a_imports_b: bool) -> None:
    pkg = root / "contract_demo"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "b.py").write_text("VALUE = 1\n")
    (pkg / "a.py").write_text("from contract_demo import b\n" if a_imports_b else "VALUE = 2\n")


def test_a_forbidden_import_breaks_a_contract(tmp_path: Path) -> None:
    """The runner can fail: a contract forbidding an import that exists is reported broken."""
    config = tmp_path / "contracts.toml"
    config.write_text(
        "[tool.importlinter]\n"
        'root_packages = ["contract_demo"]\n'
        "[[tool.importlinter.contracts]]\n"
        'name = "a does not import b"\n'
        'type = "forbidden"\n'
        'source_modules = ["contract_demo.a"]\n'
        'forbidden_modules = ["contract_demo.b"]\n'
    )
    _write_package(tmp_path, a_imports_b=True)
    broken = lint_imports(tmp_path, "--config", str(config))
    assert broken.returncode != 0, broken.stdout + broken.stderr
    assert "contract_demo.a -> contract_demo.b" in broken.stdout, broken.stdout + broken.stderr
    # Control: the same contract is kept once the import is gone.
    _write_package(tmp_path, a_imports_b=False)
    kept = lint_imports(tmp_path, "--config", str(config))
    assert kept.returncode == 0, kept.stdout + kept.stderr
