"""quic-supervisor: client-side QUIC connection migration for Python, run as actors.

Note: the import name ``supervisor`` is also that of supervisord's Python package; do not
install both into one environment.
"""

from actors.path_state import PathState
from actors.streams import Stream
from supervisor.core.config import FailoverPolicy, NetworkPolicy, PathPolicy
from supervisor.core.handles import Connection, MigratableConn, Path, PathInfo
from supervisor.orchestration.supervisor import ShutdownReport, Supervisor
from supervisor.server import InboundConnection, Listener

__all__ = [
    "Connection",
    "FailoverPolicy",
    "InboundConnection",
    "Listener",
    "MigratableConn",
    "NetworkPolicy",
    "Path",
    "PathInfo",
    "PathPolicy",
    "PathState",
    "ShutdownReport",
    "Stream",
    "Supervisor",
]
