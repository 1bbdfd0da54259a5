"""The ``quic-supervisor`` command and the demo it runs: an application of the library.

``main`` is the console script; ``ctl`` drives a control socket, ``fleet`` a Ray fleet.
"""

from supervisor.cli.main import main

__all__ = ["main"]
