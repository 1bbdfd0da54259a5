"""What the kernel says about interfaces, addresses and routes: a sans-I/O inventory.

The NetworkMonitor (``monitor.py``) turns rtnetlink messages into the plain records below and
feeds them here; this module keeps the inventory and says what changed, in the terms the
reactions use (DESIGN §8): carrier lost or regained, an address usable, removed or
deprecated, the default route or the route to a peer moved. Replaying a fresh dump
(``reconcile``, after ENOBUFS lost messages) yields exactly the changes that were missed.
Tested with hypothesis against arbitrary event orders, without netlink.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from typing import Final, Literal

__all__ = [
    "MIN_MTU",
    "Address",
    "ChangeKind",
    "Inventory",
    "Link",
    "NetworkChange",
    "NetworkFacts",
    "Route",
]

IFF_UP: Final = 0x1
IFF_RUNNING: Final = 0x40
IFF_LOWER_UP: Final = 0x10000
IFA_F_DADFAILED: Final = 0x08
IFA_F_DEPRECATED: Final = 0x20
IFA_F_TENTATIVE: Final = 0x40

#: The smallest link MTU a QUIC path can use: 1200 bytes of UDP payload plus the IPv4 (20)
#: or IPv6 (40) and UDP (8) headers (RFC 9000 §14). A link below it never carries a path.
MIN_MTU: Final = {4: 1228, 6: 1248}

ChangeKind = Literal[
    "carrier_lost",
    "carrier_regained",
    "link_removed",
    "address_added",
    "address_removed",
    "address_deprecated",
    "mtu_too_small",
    "default_route_changed",
    "route_changed",
]


@dataclass(frozen=True, slots=True)
class Link:
    index: int
    name: str
    #: Administratively up (IFF_UP).
    up: bool
    #: The far end is there (IFF_RUNNING: carrier and operational state up).
    carrier: bool
    mtu: int

    @property
    def live(self) -> bool:
        """Up with carrier: what carrier_lost / carrier_regained report (the MTU is judged
        per address family, by ``Inventory.usable``)."""
        return self.up and self.carrier


@dataclass(frozen=True, slots=True)
class Address:
    index: int
    ip: str
    prefixlen: int
    #: Duplicate address detection is still running (IPv6): the kernel will not send from it.
    tentative: bool = False
    #: Its preferred lifetime ended: existing flows may use it, new ones should not.
    deprecated: bool = False

    @property
    def family(self) -> int:
        return 6 if ":" in self.ip else 4


@dataclass(frozen=True, slots=True)
class Route:
    """Where the kernel sends towards a destination: the output interface and source."""

    index: int | None
    source: str | None
    gateway: str | None = None


@dataclass(frozen=True, slots=True)
class NetworkChange:
    """One fact that changed. ``addresses``: the local addresses it concerns (for a carrier
    change, every address of the link; for a route change, the new route's source);
    ``peer``: the remote IP whose route moved (``route_changed`` only)."""

    interface: str
    change: ChangeKind
    addresses: tuple[str, ...] = ()
    index: int = 0
    peer: str | None = None


@dataclass(frozen=True, slots=True)
class NetworkFacts:
    """An immutable copy of what the policies read (the inventory stays the monitor's)."""

    #: (interface, ip) of every address a new path may use now.
    usable: tuple[tuple[str, str], ...] = ()
    #: Every address the kernel listed, usable or not.
    known: frozenset[str] = frozenset()
    #: peer -> (interface, source) of the kernel's route to it; (None, None): unreachable.
    routes: tuple[tuple[str, str | None, str | None], ...] = ()

    def route(self, peer: str) -> tuple[str | None, str | None] | None:
        for p, interface, source in self.routes:
            if p == peer:
                return interface, source
        return None

    def may_use(self, ip: str) -> bool:
        """False only for an address the kernel knows and says is not usable now (an
        address it never listed, e.g. 127.0.0.2 under lo's /8, is the caller's business)."""
        ip = _norm(ip)
        return ip not in self.known or any(a == ip for _, a in self.usable)


def _norm(ip: str) -> str:
    return str(ipaddress.ip_address(ip.split("%", 1)[0]))


@dataclass
class Inventory:
    """Links by index, addresses by (index, ip), default routes by family, routes to peers."""

    links: dict[int, Link] = field(default_factory=dict)
    addresses: dict[tuple[int, str], Address] = field(default_factory=dict)
    defaults: dict[int, Route] = field(default_factory=dict)
    peer_routes: dict[str, Route] = field(default_factory=dict)

    # ------------------------------------------------------------------ queries

    def name_of(self, index: int | None) -> str:
        link = self.links.get(index) if index is not None else None
        return link.name if link is not None else f"if{index}"

    def index_of(self, name: str) -> int | None:
        for link in self.links.values():
            if link.name == name:
                return link.index
        return None

    def addresses_of(self, index: int) -> tuple[str, ...]:
        return tuple(sorted(a.ip for (i, _), a in self.addresses.items() if i == index))

    def interface_of(self, ip: str) -> Link | None:
        ip = _norm(ip)
        for (index, addr_ip), _addr in self.addresses.items():
            if addr_ip == ip:
                return self.links.get(index)
        return None

    def usable(self, address: Address) -> bool:
        """May a new path use this address? Its link up with carrier and an MTU that fits
        a QUIC packet, the address past DAD and not deprecated."""
        link = self.links.get(address.index)
        return (
            link is not None
            and link.up
            and link.carrier
            and link.mtu >= MIN_MTU[address.family]
            and not address.tentative
            and not address.deprecated
        )

    def usable_addresses(self) -> list[tuple[Link, Address]]:
        out = []
        for address in self.addresses.values():
            if self.usable(address):
                out.append((self.links[address.index], address))
        return sorted(out, key=lambda la: (la[0].name, la[1].ip))

    def is_lost(self, ip: str) -> bool:
        """No live link carries this address any more (removed, deprecated, carrier down)."""
        ip = _norm(ip)
        for (_index, addr_ip), address in self.addresses.items():
            if addr_ip == ip:
                link = self.links.get(address.index)
                return link is None or not (link.up and link.carrier) or address.deprecated
        return True

    # ------------------------------------------------------------------ events

    def _usable_ips(self, index: int) -> set[str]:
        return {a.ip for (i, _), a in self.addresses.items() if i == index and self.usable(a)}

    def link(self, link: Link) -> list[NetworkChange]:
        """Carrier lost or regained (admin state or the far end); an MTU change is judged
        per address family (a link between 1228 and 1248 bytes carries IPv4 paths only):
        addresses it makes unusable are ``mtu_too_small``, addresses it makes usable
        ``address_added``."""
        old = self.links.get(link.index)
        before = self._usable_ips(link.index)
        self.links[link.index] = link
        after = self._usable_ips(link.index)
        was_live = old is not None and old.live
        live = link.live
        changes: list[NetworkChange] = []
        if was_live and not live:
            changes.append(
                NetworkChange(link.name, "carrier_lost", self.addresses_of(link.index), link.index)
            )
        elif old is not None and not was_live and live:
            changes.append(
                NetworkChange(
                    link.name, "carrier_regained", self.addresses_of(link.index), link.index
                )
            )
        elif live and before - after:  # the MTU shrank below what a QUIC packet needs
            changes.append(
                NetworkChange(link.name, "mtu_too_small", tuple(sorted(before - after)), link.index)
            )
        changes += [
            NetworkChange(link.name, "address_added", (ip,), link.index)
            for ip in sorted(after - before)
        ]
        return changes

    def unlink(self, index: int) -> list[NetworkChange]:
        link = self.links.pop(index, None)
        gone = [a.ip for (i, _), a in self.addresses.items() if i == index]
        for ip in gone:
            del self.addresses[(index, ip)]
        if link is None:
            return []
        return [NetworkChange(link.name, "link_removed", tuple(sorted(gone)), index)]

    def address(self, address: Address) -> list[NetworkChange]:
        address = replace(address, ip=_norm(address.ip))
        key = (address.index, address.ip)
        old = self.addresses.get(key)
        self.addresses[key] = address
        name = self.name_of(address.index)
        if address.deprecated and (old is None or not old.deprecated):
            return [NetworkChange(name, "address_deprecated", (address.ip,), address.index)]
        was = old is not None and self.usable(old)
        if self.usable(address) and not was:
            return [NetworkChange(name, "address_added", (address.ip,), address.index)]
        return []

    def unaddress(self, index: int, ip: str) -> list[NetworkChange]:
        ip = _norm(ip)
        if self.addresses.pop((index, ip), None) is None:
            return []
        return [NetworkChange(self.name_of(index), "address_removed", (ip,), index)]

    def default_route(self, family: int, route: Route | None) -> list[NetworkChange]:
        old = self.defaults.get(family)
        if route is None:
            self.defaults.pop(family, None)
        else:
            self.defaults[family] = route
        if old == route:
            return []
        shown = route if route is not None else old
        assert shown is not None
        return [
            NetworkChange(
                self.name_of(shown.index),
                "default_route_changed",
                (route.source,) if route is not None and route.source else (),
                shown.index or 0,
            )
        ]

    def peer_route(self, peer: str, route: Route | None) -> list[NetworkChange]:
        """The kernel's answer to ``ip route get PEER`` (None: unreachable, kept as a route
        to nowhere so that the way back is a change too); a change when it moved. The first
        answer for a peer is its baseline."""
        peer = _norm(peer)
        old = self.peer_routes.get(peer)
        route = route if route is not None else Route(None, None)
        self.peer_routes[peer] = route
        if old is None or (old.index, old.source) == (route.index, route.source):
            return []
        shown = route.index if route.index is not None else old.index
        return [
            NetworkChange(
                self.name_of(shown) if shown is not None else "",
                "route_changed",
                (route.source,) if route.source else (),
                route.index or 0,
                peer,
            )
        ]

    def facts(self) -> NetworkFacts:
        return NetworkFacts(
            usable=tuple((link.name, a.ip) for link, a in self.usable_addresses()),
            known=frozenset(ip for _, ip in self.addresses),
            routes=tuple(
                (peer, self.name_of(r.index) if r.index is not None else None, r.source)
                for peer, r in sorted(self.peer_routes.items())
            ),
        )

    def forget_peers(self, keep: set[str]) -> None:
        for peer in [p for p in self.peer_routes if p not in keep]:
            del self.peer_routes[peer]

    def reconcile(
        self, links: list[Link], addresses: list[Address], defaults: dict[int, Route | None]
    ) -> list[NetworkChange]:
        """A fresh dump replaces what we knew (messages were lost: ENOBUFS); the changes are
        those the lost messages would have caused, found by comparing the two states (not
        by replaying the dump as events: the order of a replay would judge addresses by
        stale links, or links by stale addresses)."""
        old_links, old_addrs = self.links, self.addresses
        before = {key for key, a in old_addrs.items() if self.usable(a)}
        self.links = {link.index: link for link in links}
        self.addresses = {(a.index, _norm(a.ip)): replace(a, ip=_norm(a.ip)) for a in addresses}
        after = {key for key, a in self.addresses.items() if self.usable(a)}
        changes: list[NetworkChange] = []
        links_gone = set(old_links) - set(self.links)
        for index, ip in sorted(set(old_addrs) - set(self.addresses)):
            if index not in links_gone:  # a removed link names its addresses (below)
                name = old_links[index].name if index in old_links else self.name_of(index)
                changes.append(NetworkChange(name, "address_removed", (ip,), index))
        for index in sorted(links_gone):
            gone = tuple(sorted(ip for i, ip in old_addrs if i == index))
            changes.append(NetworkChange(old_links[index].name, "link_removed", gone, index))
        lost: set[int] = set()
        for index, link in sorted(self.links.items()):
            old = old_links.get(index)
            if old is not None and old.live and not link.live:
                lost.add(index)
                changes.append(
                    NetworkChange(link.name, "carrier_lost", self.addresses_of(index), index)
                )
            elif old is not None and not old.live and link.live:
                changes.append(
                    NetworkChange(link.name, "carrier_regained", self.addresses_of(index), index)
                )
        for key, address in sorted(self.addresses.items()):
            old_address = old_addrs.get(key)
            if address.deprecated and (old_address is None or not old_address.deprecated):
                changes.append(
                    NetworkChange(self.name_of(key[0]), "address_deprecated", (key[1],), key[0])
                )
        # Usable before, still there on a live link, not deprecated or back in DAD, and not
        # usable now: the link's MTU no longer carries a QUIC packet for it.
        shrunk: dict[int, list[str]] = {}
        for key in sorted((before & set(self.addresses)) - after):
            address = self.addresses[key]
            now = self.links.get(key[0])
            if (
                now is not None
                and now.live
                and key[0] not in lost
                and not address.deprecated
                and not address.tentative
            ):
                shrunk.setdefault(key[0], []).append(key[1])
        for index, ips in sorted(shrunk.items()):
            changes.append(NetworkChange(self.name_of(index), "mtu_too_small", tuple(ips), index))
        for index, ip in sorted(after - before):
            changes.append(NetworkChange(self.name_of(index), "address_added", (ip,), index))
        for family, route in defaults.items():
            changes += self.default_route(family, route)
        return changes
