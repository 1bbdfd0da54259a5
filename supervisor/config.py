"""Configuration dataclasses of the supervisor."""

from __future__ import annotations

from dataclasses import dataclass

from actors.factory import HealthConfig


@dataclass(frozen=True, slots=True)
class FailoverPolicy:
    """Automatic failover (opt-in: ``Supervisor(failover=FailoverPolicy())``).

    With a policy, standby paths get PATH_CHALLENGE keep-alives and the active path is judged
    from what arrives while data is outstanding; when it is judged dead the connection moves
    to the best validated standby path (healthy first, then lower loss, then lower RTT),
    resending what the dead path had in flight. ``prefer`` (a local multiaddr; port 0 matches
    any port) is switched back to once it has been healthy for ``hysteresis`` seconds, so a
    flapping link causes no switch storm.
    """

    keepalive_interval: float = 1.0
    jitter: float = 0.2
    #: Consecutive unanswered keep-alives before a standby path counts as failed.
    failures_to_fail: int = 3
    #: Silence on the active path (while data is outstanding) judged dead, in PTOs ...
    dead_after_ptos: float = 3.0
    #: ... but never less than this (loopback PTOs are a few ms).
    min_silence: float = 0.1
    prefer: str | None = None
    hysteresis: float = 2.0
    #: How long the re-probe of a stale failover target may take (a switch never waits on
    #: the caller's default 5 s when the policy says otherwise).
    probe_timeout: float = 2.0

    def __post_init__(self) -> None:
        if self.hysteresis < 0:
            raise ValueError(f"hysteresis must be >= 0, got {self.hysteresis!r}")
        if not self.probe_timeout > 0:
            raise ValueError(f"probe_timeout must be > 0 seconds, got {self.probe_timeout!r}")
        if not self.min_silence > 0:
            raise ValueError(f"min_silence must be > 0, got {self.min_silence!r}")
        if self.prefer is not None:
            from supervisor.addresses import parse_quic_multiaddr

            parse_quic_multiaddr(self.prefer, what="prefer")
        self.health_config()  # validates the rest

    def health_config(self) -> HealthConfig:
        return HealthConfig(
            keepalive_interval=self.keepalive_interval,
            jitter=self.jitter,
            failures_to_fail=self.failures_to_fail,
            dead_ptos=self.dead_after_ptos,
            degraded_ptos=min(1.5, self.dead_after_ptos),
            min_silence=self.min_silence,
        )
