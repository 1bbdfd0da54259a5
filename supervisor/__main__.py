"""``python -m supervisor``: the ``quic-supervisor`` command, for when the console script is
not on PATH (same arguments, output and exit status)."""

import sys

from supervisor.cli import run

if __name__ == "__main__":
    sys.exit(run())
