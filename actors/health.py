"""Path health, sans-I/O: what the evidence says about a path, and when to look again.

Paths that do not carry the connection (standby, failed), and idle active paths, are judged by
shared-fate health groups (``actors/health_groups.py``): one probe per group and interval, not
per path. What stays per connection is :class:`ActiveLiveness`: the active path judged from
what the connection receives while ack-eliciting data is outstanding, in units of the path's
PTO, so no probe traffic is needed while data flows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """Tunables of path health (the FailoverPolicy carries them)."""

    #: Health-group probe period (one member per group), jittered by +/- ``jitter`` of itself.
    keepalive_interval: float = 1.0
    jitter: float = 0.2
    #: How long a keep-alive waits for its answer, in path RTTs, at least ``min_wait``.
    keepalive_rtts: float = 4.0
    min_wait: float = 0.1
    #: Unanswered probes since the group's last answer that make the group dead.
    failures_to_fail: int = 3
    #: Silence on the active path, while data is outstanding, that makes it degraded / dead,
    #: in PTOs (never less than ``min_silence``).
    degraded_ptos: float = 1.5
    dead_ptos: float = 3.0
    min_silence: float = 0.1
    #: NAT keep-alive period of each standby path (NAT bindings are per 5-tuple; RFC 9000
    #: 10.1.2: 30 s suits most middleboxes); None: none.
    nat_keepalive: float | None = 30.0

    def __post_init__(self) -> None:
        if not self.keepalive_interval > 0:
            raise ValueError(f"keepalive_interval must be > 0, got {self.keepalive_interval!r}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter!r}")
        if self.failures_to_fail < 1:
            raise ValueError(f"failures_to_fail must be >= 1, got {self.failures_to_fail!r}")
        if not 0 < self.degraded_ptos <= self.dead_ptos:
            raise ValueError("need 0 < degraded_ptos <= dead_ptos")
        if self.nat_keepalive is not None and not self.nat_keepalive > 0:
            raise ValueError(f"nat_keepalive must be > 0 or None, got {self.nat_keepalive!r}")


class Verdict(Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"  # some keep-alives unanswered, not enough to call it dead
    DEAD = "dead"


class Liveness(Enum):
    ACTIVE = "active"
    DEGRADED = "degraded"
    DEAD = "dead"


@dataclass(slots=True)
class ActiveLiveness:
    """Judges the active path from receive times while ack-eliciting data is outstanding."""

    config: HealthConfig = field(default_factory=HealthConfig)

    def judge(
        self,
        *,
        now: float,
        last_receive: float | None,
        outstanding_since: float | None,
        pto: float,
    ) -> Liveness:
        """``outstanding_since``: send time of the oldest unacknowledged ack-eliciting packet.

        Silence only counts from the later of the last receipt and that send: a path that
        received nothing because nothing was asked of it is not dead. Socket errors are not
        judged here: they make the path's health group ask it (``HealthGroups.evidence``).
        """
        if outstanding_since is None:
            return Liveness.ACTIVE
        since = outstanding_since if last_receive is None else max(last_receive, outstanding_since)
        silence = now - since
        if silence >= max(self.config.dead_ptos * pto, self.config.min_silence):
            return Liveness.DEAD
        if silence >= max(self.config.degraded_ptos * pto, self.config.min_silence / 2):
            return Liveness.DEGRADED
        return Liveness.ACTIVE
