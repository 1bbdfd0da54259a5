"""NetworkMonitor: one actor per supervisor that hears the kernel's rtnetlink events.

It owns the netlink socket (``netlink.py``) and the inventory (``inventory.py``), and tells
its supervisor what changed (``NetworkChanged``, in order, carrier and address changes before
the route checks they cause). Routes are asked, not inferred: after any batch of events the
kernel is asked ``ip route get PEER`` for every peer a connection talks to, and for the
default routes, so a policy routing rule, a metric change or a new default all count. When
the kernel dropped messages (ENOBUFS) the monitor dumps again and reports what the lost
messages would have said. Without netlink it logs one line and stays idle: the health
probing is all there is.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from actors.envelope import message
from actors.runtime import Actor
from supervisor.orchestration.network.inventory import Inventory, NetworkChange, NetworkFacts, Route
from supervisor.orchestration.network.netlink import (
    NetlinkSource,
    NetlinkUnavailable,
    SourceFactory,
)

__all__ = [
    "InterfaceStatus",
    "NetworkChanged",
    "NetworkMonitor",
    "NetworkStatus",
    "NetworkStatusRequest",
    "PeerRoute",
    "WatchPeers",
]

log = logging.getLogger(__name__)

#: Dumps tried in a row when each overflows (ENOBUFS) before the monitor gives up.
_DUMP_TRIES = 5
#: How long route questions wait after the first event of a burst (coalescing it).
_ROUTE_SETTLE = 0.02


@dataclass(frozen=True, slots=True)
class NetworkChanged:
    """Monitor -> supervisor: what changed, in the order the kernel said it."""

    changes: tuple[NetworkChange, ...]
    #: The inventory after them.
    facts: NetworkFacts


@dataclass(frozen=True, slots=True)
class WatchPeers:
    """Supervisor -> monitor: the remote IPs connections talk to now (routes are asked for
    these; a route learnt for a new peer is its baseline, not a change)."""

    peers: tuple[str, ...]


@message("net.StatusRequest")
@dataclass(frozen=True, slots=True)
class NetworkStatusRequest:
    pass


@message("net.InterfaceStatus")
@dataclass(frozen=True, slots=True)
class InterfaceStatus:
    name: str
    index: int
    up: bool
    carrier: bool
    mtu: int
    #: "ADDR/PREFIX" plus " tentative" / " deprecated" when so.
    addresses: tuple[str, ...]


@message("net.PeerRoute")
@dataclass(frozen=True, slots=True)
class PeerRoute:
    peer: str
    interface: str | None
    source: str | None


@message("net.Status")
@dataclass(frozen=True, slots=True)
class NetworkStatus:
    """The monitor's inventory: for ``ctl network``, ``fleet network``, tests."""

    available: bool
    #: Why the monitor is not running (pyroute2 missing, socket refused), or None.
    unavailable_reason: str | None
    netns: str | None
    interfaces: tuple[InterfaceStatus, ...]
    default_routes: tuple[PeerRoute, ...]
    routes: tuple[PeerRoute, ...]
    #: Dumps after the kernel dropped messages (ENOBUFS).
    resyncs: int
    #: Kernel events handled since start.
    events: int
    #: What the network policy did, by kind (moves_lost, moves_route, reprobes, paths_added,
    #: paths_closed, eager_moves, eager_refused, returns).
    reactions: dict[str, int] = field(default_factory=dict)


class NetworkMonitor(Actor):
    def __init__(
        self,
        factory: SourceFactory,
        sink: Callable[[NetworkChanged], None],
        *,
        netns: str | None = None,
        inventory: Inventory | None = None,
    ) -> None:
        """``sink`` gets each batch of changes (the supervisor tells itself); ``factory``
        opens the netlink source in ``netns``. ``inventory``: a crashed predecessor's (its
        supervisor restarts it): the first dump then reports what changed meanwhile."""
        self._factory = factory
        self._sink = sink
        self.netns = netns
        self._inherited = inventory is not None
        self.inventory = inventory if inventory is not None else Inventory()
        self.ready = asyncio.Event()
        self.unavailable: str | None = None
        self.resyncs = 0
        self.events_seen = 0
        self._source: NetlinkSource | None = None
        self._peers: set[str] = set()
        self._routes_dirty = asyncio.Event()

    async def on_start(self) -> None:
        self.spawn(self._run(), name="netlink")

    async def on_stop(self) -> None:
        if self._source is not None:
            source, self._source = self._source, None
            await source.close()

    async def receive(self, msg: object) -> object:
        if isinstance(msg, WatchPeers):
            fresh = set(msg.peers) - self._peers
            self._peers = set(msg.peers)
            self.inventory.forget_peers(self._peers)
            if fresh:
                self._routes_dirty.set()
            return None
        if isinstance(msg, NetworkStatusRequest):
            return self.status()
        return await super().receive(msg)

    def status(self) -> NetworkStatus:
        inv = self.inventory
        interfaces = []
        for link in sorted(inv.links.values(), key=lambda lk: lk.index):
            addresses = []
            for (index, _), a in sorted(inv.addresses.items()):
                if index == link.index:
                    flags = (" tentative" if a.tentative else "") + (
                        " deprecated" if a.deprecated else ""
                    )
                    addresses.append(f"{a.ip}/{a.prefixlen}{flags}")
            interfaces.append(
                InterfaceStatus(
                    link.name, link.index, link.up, link.carrier, link.mtu, tuple(addresses)
                )
            )

        def shown(peer: str, route: Route) -> PeerRoute:
            name = inv.name_of(route.index) if route.index is not None else None
            return PeerRoute(peer, name, route.source)

        return NetworkStatus(
            available=self.unavailable is None and self.ready.is_set(),
            unavailable_reason=self.unavailable,
            netns=self.netns,
            interfaces=tuple(interfaces),
            default_routes=tuple(
                shown(f"default/ip{fam}", r) for fam, r in sorted(inv.defaults.items())
            ),
            routes=tuple(shown(p, r) for p, r in sorted(inv.peer_routes.items())),
            resyncs=self.resyncs,
            events=self.events_seen,
        )

    # ------------------------------------------------------------------ the reader

    async def _open(self, *, report: bool = False) -> None:
        """Open and dump; a dump that overflowed (a burst of events meanwhile) is tried
        again on a fresh socket, up to ``_DUMP_TRIES`` times."""
        for attempt in range(_DUMP_TRIES):
            try:
                await self._reopen()
                await self._dump(report=report)
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS or attempt == _DUMP_TRIES - 1:
                    raise

    async def _resync(self) -> None:
        await self._open(report=True)

    async def _run(self) -> None:
        try:
            await self._open(report=self._inherited)
        except (NetlinkUnavailable, OSError, ValueError) as exc:
            # ValueError: an event loop that refuses a netlink socket (uvloop does).
            self.unavailable = f"{type(exc).__name__}: {exc}"
            log.warning(
                "network monitor off (%s): interface changes are noticed by probing only",
                self.unavailable,
            )
            if self._source is not None:
                await self._source.close()
                self._source = None
            self.ready.set()
            return
        self.ready.set()
        self._sink(NetworkChanged((), self.inventory.facts()))  # the starting inventory
        routes = self.spawn(self._route_checks(), name="routes")
        try:
            await self._read()
        finally:
            routes.cancel()

    async def _read(self) -> None:
        assert self._source is not None
        while self._source is not None:
            try:
                async for batch in self._source.events():
                    self.events_seen += len(batch)
                    changes: list[NetworkChange] = []
                    inv = self.inventory
                    for kind, what in batch:
                        if kind == "link":
                            changes += inv.link(what)
                        elif kind == "unlink":
                            changes += inv.unlink(what)
                        elif kind == "address":
                            changes += inv.address(what)
                        elif kind == "unaddress":
                            changes += inv.unaddress(*what)
                    self._report(changes)
                    self._routes_dirty.set()  # any of these may move a route
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    self.unavailable = f"netlink read failed: {exc}"
                    log.warning("network monitor stopped: %s", exc)
                    return
                # The kernel dropped messages: what we know may be stale. Dump again and
                # report what the lost messages would have said. On a fresh socket: pyroute2
                # keeps the error and raises it again on every later request of the old one.
                self.resyncs += 1
                log.info("netlink ENOBUFS: dumping again (resync %d)", self.resyncs)
                try:
                    await self._resync()
                except (NetlinkUnavailable, OSError, ValueError) as again:
                    self.unavailable = f"netlink resync failed: {again}"
                    log.warning("network monitor stopped: %s", self.unavailable)
                    return
                self._routes_dirty.set()

    async def _reopen(self) -> None:
        old, self._source = self._source, None
        if old is not None:
            await old.close()
        self._source = await self._factory(self.netns)

    async def _dump(self, *, report: bool) -> None:
        assert self._source is not None
        links = await self._source.links()
        addresses = await self._source.addresses()
        defaults = await self._source.default_routes()
        changes = self.inventory.reconcile(links, addresses, defaults)
        if report:
            self._report(changes)

    async def _route_checks(self) -> None:
        """Ask the kernel for the routes that matter after every batch of events (the flag
        coalesces a burst into one round of questions)."""
        while True:
            await self._routes_dirty.wait()
            # A link going down comes as a burst of batches (the link, then each route it
            # took away) within a few ms: one round of questions after the burst, and out of
            # the way of the moves the first batch started.
            await asyncio.sleep(_ROUTE_SETTLE)
            self._routes_dirty.clear()
            source = self._source
            if source is None:
                return
            before = self.inventory.facts()
            try:
                answers = await source.default_routes()
                routes = {peer: await source.route_to(peer) for peer in sorted(self._peers)}
            except OSError as exc:
                log.info("route check failed: %s", exc)
                continue
            if source is not self._source:
                self._routes_dirty.set()  # resynced meanwhile: ask the new socket
                continue
            changes: list[NetworkChange] = []
            for family, route in answers.items():
                changes += self.inventory.default_route(family, route)
            for peer, answer in routes.items():
                changes += self.inventory.peer_route(peer, answer)
            if changes:
                self._report(changes)
            elif self.inventory.facts() != before:  # a new peer's baseline route
                self._sink(NetworkChanged((), self.inventory.facts()))

    def _report(self, changes: list[NetworkChange]) -> None:
        if changes:
            self._sink(NetworkChanged(tuple(changes), self.inventory.facts()))
