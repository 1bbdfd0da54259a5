"""CPU contention for tests: N child processes that burn CPU until told to stop.

Why: a supervisor's liveness judgement reads silence on a path from its event loop's clock. On
a host short of CPU (a busy node, a pod throttled by its CPU limit) the loop runs late, and a
judgement that does not discount that lag declares healthy paths dead (issue 13: 3 busy
processes on 2 cores moved 7-10 of 20 healthy connections in the fault suite's drain test).
`busy_processes(3)` recreates that host: each child is a pure-Python busy loop at the default
priority, so the kernel shares the cores between them and the test process.

Safety: the children are always stopped and reaped when the block exits (SIGTERM, then
SIGKILL), however it exits; and each child checks its parent every few milliseconds and exits
by itself when orphaned (the test process was killed), so none outlives the run.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

__all__ = ["BURN", "Busy", "busy_processes"]

#: The child: spin, and look up every ~100k iterations (a few ms) whether its parent is gone.
BURN = (
    "import os\n"
    "parent = os.getppid()\n"
    "while os.getppid() == parent:\n"
    "    for _ in range(100_000):\n"
    "        pass\n"
)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Terminate, then kill, and reap one child (idempotent)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout)


class Busy:
    """The running burners of one `busy_processes` block."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def __len__(self) -> int:
        return len(self._procs)

    def running(self) -> int:
        """How many burners are still running."""
        return sum(p.poll() is None for p in self._procs)

    def _start(self) -> None:
        self._procs.append(
            subprocess.Popen(
                [sys.executable, "-S", "-c", BURN],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=True,
                env={"PATH": os.environ.get("PATH", "")},
            )
        )

    def stop(self) -> None:
        """Stop and reap every burner now (idempotent; the block's exit does it anyway): for
        a test whose contention phase ends before its last, CPU-hungry checks."""
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        for proc in self._procs:
            _stop(proc)


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[Busy]:
    """Run ``count`` CPU-burning child processes for the duration of the block.

    Yields a `Busy` handle (``len()`` is ``count``; ``count == 0`` runs the same code path
    without contention; ``stop()`` ends the contention early). Every child is stopped and
    reaped on exit, also when starting one failed.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    busy = Busy()
    try:
        for _ in range(count):
            busy._start()
        yield busy
    finally:
        busy.stop()
