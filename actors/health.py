"""Path health, sans-I/O: what the evidence says about a path, and when to look again.

Two judges, both fed with plain facts (times, RTT samples, outcomes) and tested without sockets:

- :class:`PathHealth` for a path that does not carry the connection (standby, failed): it is
  probed with PATH_CHALLENGE keep-alives (a PING would be non-probing: the peer would migrate
  to it). Consecutive unanswered keep-alives, or an ICMP unreachable, make it dead; one answer
  makes it alive again. RTT is an EWMA with variance (RFC 6298 gains), loss a sliding ratio.
- :class:`ActiveLiveness` for the active path: judged from what the connection receives while
  ack-eliciting data is outstanding, in units of the path's PTO, so no probe traffic is needed
  while data flows. When idle, the connection elicits an ACK now and then (keep-alive PING on
  the active path) so that silence keeps meaning something.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from enum import Enum


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """Tunables of path health (the FailoverPolicy carries them)."""

    #: Standby keep-alive period (PATH_CHALLENGE), jittered by +/- ``jitter`` of itself.
    keepalive_interval: float = 1.0
    jitter: float = 0.2
    #: How long a keep-alive waits for its answer, in path RTTs, at least ``min_wait``.
    keepalive_rtts: float = 4.0
    min_wait: float = 0.1
    #: Consecutive unanswered keep-alives that make a standby path dead.
    failures_to_fail: int = 3
    #: Silence on the active path, while data is outstanding, that makes it degraded / dead,
    #: in PTOs (never less than ``min_silence``).
    degraded_ptos: float = 1.5
    dead_ptos: float = 3.0
    min_silence: float = 0.1
    #: Idle active path: elicit an ACK after this long without receiving anything.
    active_keepalive: float = 1.0
    #: Window of keep-alive outcomes the loss ratio is computed over.
    loss_window: int = 20

    def __post_init__(self) -> None:
        if not self.keepalive_interval > 0:
            raise ValueError(f"keepalive_interval must be > 0, got {self.keepalive_interval!r}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter!r}")
        if self.failures_to_fail < 1:
            raise ValueError(f"failures_to_fail must be >= 1, got {self.failures_to_fail!r}")
        if not 0 < self.degraded_ptos <= self.dead_ptos:
            raise ValueError("need 0 < degraded_ptos <= dead_ptos")


class Verdict(Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"  # some keep-alives unanswered, not enough to call it dead
    DEAD = "dead"


@dataclass(slots=True)
class PathHealth:
    """Evidence about one non-active path."""

    config: HealthConfig = field(default_factory=HealthConfig)
    rtt: float | None = None
    rtt_var: float = 0.0
    consecutive_failures: int = 0
    unreachable: bool = False
    last_answer: float | None = None
    _outcomes: deque[bool] = field(default_factory=deque)

    def on_answer(self, rtt: float, now: float) -> None:
        if self.rtt is None:
            self.rtt, self.rtt_var = rtt, rtt / 2
        else:
            self.rtt_var = 0.75 * self.rtt_var + 0.25 * abs(self.rtt - rtt)
            self.rtt = 0.875 * self.rtt + 0.125 * rtt
        self.consecutive_failures = 0
        self.unreachable = False
        self.last_answer = now
        self._record(True)

    def on_lost(self) -> None:
        self.consecutive_failures += 1
        self._record(False)

    def on_unreachable(self) -> None:
        """ICMP unreachable (or a send that failed with it): immediate evidence."""
        self.unreachable = True
        self.consecutive_failures = max(self.consecutive_failures, self.config.failures_to_fail)
        self._record(False)

    def _record(self, ok: bool) -> None:
        self._outcomes.append(ok)
        while len(self._outcomes) > self.config.loss_window:
            self._outcomes.popleft()

    @property
    def loss_ratio(self) -> float:
        if not self._outcomes:
            return 0.0
        return self._outcomes.count(False) / len(self._outcomes)

    @property
    def verdict(self) -> Verdict:
        if self.unreachable or self.consecutive_failures >= self.config.failures_to_fail:
            return Verdict.DEAD
        if self.consecutive_failures:
            return Verdict.SUSPECT
        return Verdict.ALIVE

    def answer_wait(self) -> float:
        """How long one keep-alive waits for its answer."""
        if self.rtt is None:
            return self.config.min_wait
        return max(self.config.min_wait, self.config.keepalive_rtts * self.rtt + 4 * self.rtt_var)

    def next_keepalive(self, rng: random.Random | None = None) -> float:
        """Seconds until the next keep-alive: jittered so many paths don't probe in step."""
        r = (rng or random).uniform(-self.config.jitter, self.config.jitter)
        return self.config.keepalive_interval * (1 + r)

    def score(self) -> tuple[int, float, float]:
        """Sort key of failover candidates: healthy first, then lower loss, then lower RTT."""
        rank = {Verdict.ALIVE: 0, Verdict.SUSPECT: 1, Verdict.DEAD: 2}[self.verdict]
        return rank, self.loss_ratio, self.rtt if self.rtt is not None else float("inf")


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
        unreachable: bool = False,
    ) -> Liveness:
        """``outstanding_since``: send time of the oldest unacknowledged ack-eliciting packet.

        Silence only counts from the later of the last receipt and that send: a path that
        received nothing because nothing was asked of it is not dead.
        """
        if unreachable:
            return Liveness.DEAD
        if outstanding_since is None:
            return Liveness.ACTIVE
        since = outstanding_since if last_receive is None else max(last_receive, outstanding_since)
        silence = now - since
        if silence >= max(self.config.dead_ptos * pto, self.config.min_silence):
            return Liveness.DEAD
        if silence >= max(self.config.degraded_ptos * pto, self.config.min_silence / 2):
            return Liveness.DEGRADED
        return Liveness.ACTIVE

    def needs_keepalive(
        self, *, now: float, last_receive: float | None, outstanding_since: float | None
    ) -> bool:
        """Idle and quiet for a while: elicit an ACK so the next silence means something."""
        if outstanding_since is not None:
            return False
        return last_receive is None or now - last_receive >= self.config.active_keepalive
