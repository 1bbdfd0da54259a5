"""The ``quic-supervisor`` command and the demo it runs: an application of the library.

``main`` is the console script; ``ctl`` drives a control socket, ``fleet`` a Ray fleet. The
command line needs the ``cli`` extra (rich for tables and progress, matplotlib for ``journal
plot``); the library itself (``import supervisor``) needs neither. Without rich, ``main`` is a
stand-in that says so in one line (exit 2) instead of a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["main", "run"]


def _missing(name: str) -> Callable[[Sequence[str] | None], int]:
    def main(argv: Sequence[str] | None = None) -> int:
        """Stand-in for the command line when its ``cli`` extra is not installed."""
        print(
            f"quic-supervisor: error: the command line needs the Python package {name}, "
            "which is not installed: pip install 'quic-supervisor[cli]'",
            file=sys.stderr,
        )
        return 2

    return main


def __getattr__(name: str) -> Any:
    """``main``, imported when asked for: importing this package for ``python -m
    supervisor.cli.fleet`` must not import ``supervisor.cli.fleet`` first (runpy warns)."""
    if name != "main":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from supervisor.cli.main import main
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".", 1)[0] != "rich":
            raise
        return _missing(exc.name or "rich")
    # Importing the submodule bound its name here to the module: the function wins, as it did
    # when this package imported it eagerly (``supervisor.cli:main`` is the console script).
    globals()["main"] = main
    return main


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line (``python -m supervisor``): ``main``, or its stand-in."""
    command: Callable[[Sequence[str] | None], int] = __getattr__("main")
    return command(argv)
