"""Path states and the one table of legal transitions between them.

One enum serves the API (``PathInfo.state``), events (``EvtPathStateChanged``), telemetry and
failover policy. The states are not a fixed order: a failed path can recover, a standby path
can become active and back. ``TRANSITIONS`` is the single source of truth; ``docs/path-states.md``
holds the same table with the reason for each edge, and a test keeps the two equal.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

from actors.envelope import wire_enum
from actors.errors import InvalidTransitionError

__all__ = ["TRANSITIONS", "PathState", "PathStateMachine", "check_transition"]


@wire_enum("PathState")
class PathState(enum.StrEnum):
    """Where a path is in its life. The values are the wire, log and telemetry spelling
    (``StrEnum``: a ``str`` subclass, ``str(state) == state.value``)."""

    NEW = "new"  # socket bound, nothing sent yet
    VALIDATING = "validating"  # a probe (PATH_CHALLENGE) is in flight
    STANDBY = "standby"  # validated, not carrying application data
    ACTIVE = "active"  # the connection's one path for non-probing packets
    DEGRADED = "degraded"  # still the active path, but health checks see loss or silence
    FAILED = "failed"  # probe timed out, keep-alives lost, or failed over from
    CLOSED = "closed"  # socket closed, CID retired; terminal

    @property
    def carries_traffic(self) -> bool:
        """True for the active path, healthy or not (ACTIVE, DEGRADED)."""
        return self in (PathState.ACTIVE, PathState.DEGRADED)


_S = PathState

# Each edge with why it exists; docs/path-states.md says the same in its table.
TRANSITIONS: Mapping[PathState, frozenset[PathState]] = MappingProxyType(
    {
        _S.NEW: frozenset(
            {
                _S.VALIDATING,  # probe() starts
                _S.ACTIVE,  # the handshake path: the handshake itself validated it
                _S.CLOSED,  # closed before any probe; add_path cleanup; connection closed
            }
        ),
        _S.VALIDATING: frozenset(
            {
                _S.STANDBY,  # PATH_RESPONSE arrived on this socket; or a re-probe of a standby
                # path was cancelled / found no CID (back to where it was: no trace)
                _S.FAILED,  # probe timed out or ICMP unreachable; or a cancelled re-probe of a
                # failed path goes back to failed
                _S.NEW,  # first probe cancelled or NoConnectionIdError: nothing happened
                _S.CLOSED,  # path or connection closed while probing
            }
        ),
        _S.STANDBY: frozenset(
            {
                _S.VALIDATING,  # explicit re-probe (probe() again, or switch() to a stale path);
                # periodic keep-alive challenges stay in standby, so they emit no event
                _S.ACTIVE,  # switch() or failover chose this path
                _S.FAILED,  # keep-alive challenges went unanswered, or an ICMP error
                _S.CLOSED,  # close(), or the connection closed
            }
        ),
        _S.ACTIVE: frozenset(
            {
                _S.STANDBY,  # switched away from (manual/drain); also a rolled-back switch
                _S.DEGRADED,  # health policy sees loss, RTT growth or an ICMP error
                _S.FAILED,  # only via failover: the connection moved off a dead active path
                _S.CLOSED,  # only when the connection closes (close() raises
                # ActivePathCloseError)
            }
        ),
        _S.DEGRADED: frozenset(
            {
                _S.ACTIVE,  # health recovered
                _S.STANDBY,  # switched away from while degraded (manual or drain)
                _S.FAILED,  # failover away from it
                _S.CLOSED,  # the connection closed
            }
        ),
        _S.FAILED: frozenset(
            {
                _S.VALIDATING,  # re-probe: the link may have recovered
                _S.CLOSED,  # close(), or the connection closed
            }
        ),
        _S.CLOSED: frozenset(),  # terminal: a closed path's socket and CID are gone
    }
)


def check_transition(old: PathState, new: PathState) -> None:
    """Raise ``InvalidTransitionError`` unless ``old -> new`` is in ``TRANSITIONS``.

    A self-transition is not an edge (it would emit a meaningless event), so it raises too;
    ``PathStateMachine.move`` treats it as a no-op before asking.
    """
    allowed = TRANSITIONS[old]
    if new not in allowed:
        raise InvalidTransitionError(old, new, allowed)


class PathStateMachine:
    """The state of one path, sans I/O: the owner moves it and emits the returned edge as an
    ``EvtPathStateChanged``. Not thread-safe; its PathActor is its only user."""

    __slots__ = ("_state",)

    def __init__(self, initial: PathState = PathState.NEW) -> None:
        self._state = PathState(initial)

    @property
    def state(self) -> PathState:
        return self._state

    @property
    def closed(self) -> bool:
        return self._state is PathState.CLOSED

    def can_move(self, new: PathState) -> bool:
        """True if ``move(new)`` would succeed (including the no-op)."""
        return new is self._state or new in TRANSITIONS[self._state]

    def move(self, new: PathState) -> tuple[PathState, PathState] | None:
        """Go to ``new``; return ``(old, new)`` for the event, or ``None`` when already there.

        Raises ``InvalidTransitionError`` (state unchanged) for an edge not in the table.
        """
        new = PathState(new)
        old = self._state
        if new is old:
            return None
        check_transition(old, new)
        self._state = new
        return (old, new)

    def __repr__(self) -> str:
        return f"PathStateMachine({self._state.value})"
