"""Drain: move every connection off a local address or interface (maintenance), in parallel.

One implementation for every front end: ``Supervisor.drain()``, the control socket
(``quic-supervisor ctl drain``) and the Ray agent call :func:`drain` with the supervisor they
host. It only sends the supervisor's ordinary requests (snapshot, probe, switch with reason
``"drain"``, close path), so a drain is a set of normal migrations: same events, spans,
metrics and place in the connection's operation queue as ``path.switch()``.

Which paths are "on" a device: a path socket bound to a device (``SO_BINDTODEVICE``,
``PathSnapshot.device``) is on that device and no other; an unbound one is on the interface
that holds its local IP (exact address first, else the longest prefix, which is how all of
127.0.0.0/8 is on ``lo``). Interface addresses come from ``getifaddrs(3)``, which unlike the
``SIOCGIFADDR`` ioctl also lists secondary and IPv6 addresses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from multiaddr import Multiaddr

from actors.envelope import message
from actors.errors import ConnectionClosedError, InvalidAddressError
from actors.path_state import PathState
from supervisor.addresses import _check_device
from supervisor.core.messages import (
    ClosePathRequest,
    ConnectionSnapshot,
    InterfaceAddressesRequest,
    PathSnapshot,
    ProbeRequest,
    SnapshotRequest,
    SwitchRequest,
)
from supervisor.interfaces import IPInterface

__all__ = ["DrainOutcome", "DrainReport", "DrainResult", "drain"]

DrainResult = Literal["moved", "failed", "untouched"]

#: Probes of unvalidated targets at once. Switches need no limit here: every switch takes a
#: slot of the supervisor's herd control first (``supervisor.orchestration.herd``: 64 in
#: flight, FIFO), so
#: a drain hands over all its connections at once and the gate paces them (all at once and
#: unpaced, 1,000 switches read their confirmations too late: bench B4 lost up to half).
MAX_CONCURRENT = 64

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@message("sup.DrainOutcome")
@dataclass(frozen=True, slots=True)
class DrainOutcome:
    """What the drain did to one connection.

    ``moved``: it now runs on ``to_addr``; ``failed``: its active path is still on the drained
    address (``error`` says why, one clause per path tried); ``untouched``: its active path was
    not on the drained address. Path ids let a caller that keeps its own records (the Ray agent)
    update them; ``closed_drained`` says whether the drained path was closed afterwards.
    """

    conn_id: str
    result: DrainResult
    from_addr: str | None  # the active local address before the drain
    to_addr: str | None = None
    error: str | None = None
    from_path_id: int | None = None
    to_path_id: int | None = None
    closed_drained: bool = False


@message("sup.DrainReport")
@dataclass(frozen=True, slots=True)
class DrainReport:
    """One outcome per open outbound connection, for the drained ``local_addr`` or ``device``."""

    local_addr: str | None = None
    device: str | None = None
    outcomes: tuple[DrainOutcome, ...] = ()
    #: Wall time of the whole drain, seconds.
    elapsed_s: float = 0.0

    def _with(self, result: DrainResult) -> tuple[DrainOutcome, ...]:
        return tuple(o for o in self.outcomes if o.result == result)

    @property
    def moved(self) -> tuple[DrainOutcome, ...]:
        return self._with("moved")

    @property
    def failed(self) -> tuple[DrainOutcome, ...]:
        return self._with("failed")

    @property
    def untouched(self) -> tuple[DrainOutcome, ...]:
        return self._with("untouched")

    @property
    def counts(self) -> dict[str, int]:
        return {r: len(self._with(r)) for r in ("moved", "failed", "untouched")}

    @property
    def ok(self) -> bool:
        """Nothing failed: every connection that was on the drained address moved."""
        return not self.failed


class _Asks(Protocol):
    """What drain needs of a supervisor: its request transport (``Supervisor.ask``)."""

    async def ask(self, msg: object, timeout: float | None = None) -> object: ...


# -- which paths are on the drained address or device -------------------------------------------

_EXAMPLES = "/ip4/10.0.0.1, /ip4/10.0.0.1/udp/4433/quic-v1 or 10.0.0.1"


def _parse_drained(value: object) -> tuple[IPAddress, int]:
    """``(ip, port)`` of a drain target; port 0 matches every port.

    Accepts ``/ip4|ip6/ADDR`` optionally followed by ``/udp/PORT`` and ``/quic-v1``, or a bare IP
    (what the fleet CLI has always accepted).
    """
    if isinstance(value, Multiaddr):
        text = str(value)
    elif isinstance(value, str):
        text = value.strip()
    else:
        raise TypeError(
            f"local_addr must be a multiaddr or an IP string, not {type(value).__name__}"
        )

    def bad(reason: str) -> InvalidAddressError:
        return InvalidAddressError(value, reason, what="local address")

    if not text.startswith("/"):
        try:
            return ipaddress.ip_address(text), 0
        except ValueError:
            raise bad(f"it is neither a multiaddr nor an IP address: use {_EXAMPLES}") from None
    try:
        parts = [(p.name, v) for p, v in Multiaddr(text).items()]
    except Exception as exc:
        raise bad(f"it is not a valid multiaddr ({exc}): use {_EXAMPLES}") from exc
    names = [name for name, _ in parts]
    if (
        not names
        or names[0] not in ("ip4", "ip6")
        or names[1:] not in ([], ["udp"], ["udp", "quic-v1"])
    ):
        raise bad(f"a drain target is an IP, optionally with its UDP port: use {_EXAMPLES}")
    port = int(parts[1][1]) if len(parts) > 1 else 0
    return ipaddress.ip_address(parts[0][1]), port


def _ip_port(local_addr: str) -> tuple[IPAddress, int]:
    parts = local_addr.split("/")  # our own snapshots: always /ip4|ip6/ADDR/udp/PORT/quic-v1
    return ipaddress.ip_address(parts[2]), int(parts[4])


async def _interfaces_of(sup: _Asks) -> dict[str, list[IPInterface]]:
    """The supervisor's namespace's addresses (it may live in another: ``netns=``)."""
    pairs = await sup.ask(InterfaceAddressesRequest())
    assert isinstance(pairs, tuple)
    out: dict[str, list[IPInterface]] = {}
    for name, address in pairs:
        out.setdefault(name, []).append(ipaddress.ip_interface(address))
    return out


def _devices_of(ip: IPAddress, interfaces: dict[str, list[IPInterface]]) -> set[str]:
    """The interface(s) holding ``ip``: exact address first, else the longest matching prefix."""
    exact = {dev for dev, addrs in interfaces.items() if any(a.ip == ip for a in addrs)}
    if exact:
        return exact
    best, owners = -1, set()
    for dev, addrs in interfaces.items():
        for a in addrs:
            if a.version == ip.version and ip in a.network:
                if a.network.prefixlen > best:
                    best, owners = a.network.prefixlen, {dev}
                elif a.network.prefixlen == best:
                    owners.add(dev)
    return owners


# -- the drain ----------------------------------------------------------------------------------

_RANK = {PathState.STANDBY: 0, PathState.VALIDATING: 1, PathState.NEW: 1, PathState.FAILED: 2}


async def drain(
    sup: _Asks,
    *,
    local_addr: str | Multiaddr | None = None,
    device: str | None = None,
    probe_timeout: float = 2.0,
    close_drained: bool = True,
) -> DrainReport:
    """Move every outbound connection whose active path is on ``local_addr`` or ``device``.

    Exactly one of the two. ``local_addr`` matches by IP, and by port too when it gives a
    non-zero one. Each such connection switches (reason ``"drain"``) to its best path off the
    drained address: a standby path (lowest RTT first), else a new or failed one once it answers
    a probe within ``probe_timeout``; the drained path is then closed if ``close_drained``.
    Connections are drained concurrently; one that cannot move is reported ``failed`` and stays
    usable on its current path. Argument errors (``ValueError``, ``InvalidAddressError`` naming
    the input, an unknown device) are raised before anything moves.
    """
    if (local_addr is None) == (device is None):
        raise ValueError("drain needs exactly one of local_addr= or device=")
    if isinstance(probe_timeout, bool) or not probe_timeout > 0:
        raise ValueError(f"probe_timeout must be > 0 seconds, got {probe_timeout!r}")
    on_target: Callable[[PathSnapshot], bool]
    if local_addr is not None:
        ip, port = _parse_drained(local_addr)
        target = str(local_addr)

        def on_target(path: PathSnapshot) -> bool:
            path_ip, path_port = _ip_port(path.local_addr)
            return path_ip == ip and port in (0, path_port)

    else:
        assert device is not None
        dev = _check_device(device)
        interfaces = await _interfaces_of(sup)
        target = f"device {dev}"

        def on_target(path: PathSnapshot) -> bool:
            if path.device is not None:  # bound: its packets leave through that device only
                return path.device == dev
            return dev in _devices_of(_ip_port(path.local_addr)[0], interfaces)

    t0 = time.monotonic()
    snaps = await sup.ask(SnapshotRequest(None))
    assert isinstance(snaps, tuple)
    live = [s for s in snaps if isinstance(s, ConnectionSnapshot) and not s.closed]
    probes = asyncio.Semaphore(MAX_CONCURRENT)

    async def one(snap: ConnectionSnapshot) -> DrainOutcome:
        return await _drain_one(sup, snap, on_target, target, probe_timeout, close_drained, probes)

    results = await asyncio.gather(*(one(s) for s in live), return_exceptions=True)
    outcomes = []
    for snap, result in zip(live, results, strict=True):
        if isinstance(result, DrainOutcome):
            outcomes.append(result)
        elif isinstance(result, Exception):  # a bug or an unexpected failure: say so, go on
            active = next((p for p in snap.paths if p.active), None)
            outcomes.append(
                DrainOutcome(
                    snap.conn_id,
                    "failed",
                    active.local_addr if active else None,
                    error=f"{type(result).__name__}: {result}",
                )
            )
        else:
            raise result
    return DrainReport(
        local_addr=None if local_addr is None else str(local_addr),
        device=device,
        outcomes=tuple(outcomes),
        elapsed_s=round(time.monotonic() - t0, 6),
    )


async def _drain_one(
    sup: _Asks,
    snap: ConnectionSnapshot,
    on_target: Callable[[PathSnapshot], bool],
    target: str,
    probe_timeout: float,
    close_drained: bool,
    probes: asyncio.Semaphore,
) -> DrainOutcome:
    conn_id = snap.conn_id
    active = next((p for p in snap.paths if p.active), None)
    if active is None or not on_target(active):
        return DrainOutcome(conn_id, "untouched", active.local_addr if active else None)

    def failed(error: str) -> DrainOutcome:
        return DrainOutcome(
            conn_id, "failed", active.local_addr, error=error, from_path_id=active.path_id
        )

    if not snap.supports_migration:
        return failed(
            "this connection cannot migrate (the supervisor runs without "
            "enable_experimental_connection_migration, or the peer sent disable_active_migration)"
        )
    candidates = sorted(
        (p for p in snap.paths if not p.active and p.state in _RANK and not on_target(p)),
        key=lambda p: (_RANK[p.state], p.rtt if p.rtt is not None else math.inf),
    )
    if not candidates:
        return failed(f"no path off {target}: add one on another address or device first")
    errors = []
    for cand in candidates:
        try:
            if cand.state is not PathState.STANDBY:
                async with probes:
                    await sup.ask(ProbeRequest(conn_id, cand.path_id, probe_timeout))
            await sup.ask(SwitchRequest(conn_id, cand.path_id, "drain"))
        except ConnectionClosedError as exc:
            errors.append(str(exc))
            break
        except Exception as exc:  # probe timeout, rollback, no CID ...: try the next path
            errors.append(f"{cand.local_addr}: {exc}")
            continue
        closed, error = False, None
        if close_drained:
            try:
                await sup.ask(ClosePathRequest(conn_id, active.path_id))
                closed = True
            except Exception as exc:
                error = f"moved, but closing the drained path failed: {exc}"
        return DrainOutcome(
            conn_id,
            "moved",
            active.local_addr,
            cand.local_addr,
            error,
            active.path_id,
            cand.path_id,
            closed,
        )
    return failed("; ".join(errors))
