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
        from supervisor.core import validate

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


@dataclass(frozen=True, slots=True)
class PathPolicy:
    """Which interfaces get a path automatically (``NetworkPolicy(paths=PathPolicy(...))``).

    The default matches nothing: a path on an interface the operator did not name could
    leak traffic onto a metered or untrusted network. An address matches when its device is
    in ``devices`` or it lies in one of ``prefixes`` (CIDR), and its family is in
    ``families``; each connection then gets a path on every matching usable address (never
    an IPv6 address still in DAD, never a link whose MTU cannot carry a QUIC packet), up to
    ``max_paths`` paths in all (the dialled one counts), probed at most ``probe_concurrency``
    at a time. Peers that sent ``disable_active_migration`` get none.
    """

    devices: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    families: tuple[int, ...] = (4, 6)
    max_paths: int = 2
    probe_concurrency: int = 16

    def __post_init__(self) -> None:
        import ipaddress

        from actors.factory import MAX_PATHS
        from supervisor.core import validate

        for name in ("devices", "prefixes", "families"):
            if not isinstance(getattr(self, name), tuple):
                raise TypeError(f"PathPolicy.{name} must be a tuple, e.g. ('eth1',)")
        for device in self.devices:
            if not isinstance(device, str):
                raise TypeError(f"PathPolicy.devices: {device!r} is not an interface name (str)")
            if not 0 < len(device) < 16 or "/" in device:
                raise ValueError(
                    f"PathPolicy.devices: {device!r} is not an interface name (1-15 characters)"
                )
        for prefix in self.prefixes:
            if not isinstance(prefix, str):
                raise TypeError(
                    f"PathPolicy.prefixes: {prefix!r} is not a CIDR prefix string such as "
                    "'10.0.0.0/8'"
                )
            try:
                ipaddress.ip_network(prefix, strict=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"PathPolicy.prefixes: {prefix!r} is not a CIDR prefix such as "
                    f"'10.0.0.0/8' or 'fd00::/8' ({exc})"
                ) from None
        for family in self.families:
            if family not in (4, 6):
                raise ValueError(f"PathPolicy.families: {family!r} is not 4 or 6")
        validate.count("max_paths", self.max_paths, minimum=1, maximum=MAX_PATHS)
        validate.count("probe_concurrency", self.probe_concurrency, minimum=1, maximum=1024)

    def matches(self, device: str, ip: str) -> bool:
        import ipaddress

        address = ipaddress.ip_address(ip)
        if address.version not in self.families:
            return False
        if device in self.devices:
            return True
        return any(
            address in ipaddress.ip_network(prefix, strict=False) for prefix in self.prefixes
        )


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    """How the supervisor reacts to the kernel's network events (DESIGN §8).

    The NetworkMonitor runs whenever a FailoverPolicy or a NetworkPolicy is given
    (``monitor=False`` turns it off). Carrier lost, an address removed or deprecated: every
    path on it fails at once and connections active on it move (reason ``network``); carrier
    or address back: those paths are probed again. ``follow_route``: when the kernel's
    route to a peer moves to another interface (a default-route change included), its
    connections follow, unbudgeted. Eager moves (failover off a degrading path or after
    write errors) onto a network that is not the route's are budgeted per connection and
    default network, as Cronet does: at most ``max_degrading_moves`` and
    ``max_write_error_moves``, and after ``max_time_on_non_default`` seconds there the
    connection goes back once the default path validates. ``paths``: auto-discovery.
    """

    paths: PathPolicy | None = None
    monitor: bool = True
    follow_route: bool = True
    max_degrading_moves: int = 5
    max_write_error_moves: int = 5
    max_time_on_non_default: float = 128.0
    #: How long a re-probe of a returning path (or the route's new path) may take.
    probe_timeout: float = 2.0

    def __post_init__(self) -> None:
        from supervisor.core import validate

        if self.paths is not None and not isinstance(self.paths, PathPolicy):
            raise TypeError(
                f"NetworkPolicy.paths must be a PathPolicy or None, not {type(self.paths).__name__}"
            )
        for name in ("monitor", "follow_route"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"NetworkPolicy.{name} must be True or False")
        validate.count("max_degrading_moves", self.max_degrading_moves, minimum=0, maximum=10_000)
        validate.count(
            "max_write_error_moves", self.max_write_error_moves, minimum=0, maximum=10_000
        )
        validate.duration("max_time_on_non_default", self.max_time_on_non_default)
        validate.duration("probe_timeout", self.probe_timeout)
