"""Configuration dataclasses of the supervisor."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FailoverPolicy:
    """Automatic failover (opt-in: ``Supervisor(failover=FailoverPolicy())``).

    Accepted and validated now; the health monitor that acts on it is the failover issue's work.
    """

    keepalive_interval: float = 1.0
    jitter: float = 0.2
    prefer: str | None = None  # local multiaddr of the preferred path (switch back when healthy)
    hysteresis: float = 2.0  # seconds a recovered preferred path must stay healthy

    def __post_init__(self) -> None:
        if not self.keepalive_interval > 0:
            raise ValueError(f"keepalive_interval must be > 0, got {self.keepalive_interval!r}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter!r}")
        if self.hysteresis < 0:
            raise ValueError(f"hysteresis must be >= 0, got {self.hysteresis!r}")
