"""Configuration dataclasses of the supervisor."""

from __future__ import annotations

from dataclasses import dataclass

from actors.factory import HealthConfig


@dataclass(frozen=True, slots=True)
class FailoverPolicy:
    """Automatic failover (opt-in: ``Supervisor(failover=FailoverPolicy())``).

    With a policy, paths are watched by shared-fate health groups (one question per group of
    paths with the same local address and server IP, and interval; verdicts for all) and the
    active path is judged from what arrives while data is outstanding; when it is judged dead
    the connection moves to the best validated standby path (not in a dead group, then one
    validated in both directions, then lower RTT; after a rollback, the next one), resending
    what the dead path had in flight. ``prefer`` (a local multiaddr; port 0 matches
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
    #: NAT keep-alive period of each standby path (jittered by ``jitter``). NAT bindings are
    #: per 5-tuple, so this one duty cannot be shared by a health group; RFC 9000 10.1.2
    #: notes 30 s suits most middleboxes (UDP bindings often last 30-120 s). None: none.
    nat_keepalive: float | None = 30.0
    #: A failover whose failed path answers again within this many seconds counts as a
    #: suspect failover (``MigrationStats.suspect_failovers``): probably never dead.
    suspect_window: float = 10.0

    def __post_init__(self) -> None:
        from supervisor import validate

        for name in (
            "keepalive_interval",
            "dead_after_ptos",
            "min_silence",
            "probe_timeout",
            "suspect_window",
        ):
            validate.duration(name, getattr(self, name))
        if self.nat_keepalive is not None:
            validate.duration("nat_keepalive", self.nat_keepalive)
        validate.duration("hysteresis", self.hysteresis, allow_zero=True)
        validate.duration("jitter", self.jitter, allow_zero=True, maximum=0.9)
        validate.count("failures_to_fail", self.failures_to_fail, minimum=1, maximum=1000)
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
            nat_keepalive=self.nat_keepalive,
        )
