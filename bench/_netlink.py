"""The kernel event's clock for the network-events bench (``bench.b2_network``).

``LinkSwitch``: a link down (or up) by one ``RTM_NEWLINK`` request that this process sends on
its own NETLINK_ROUTE socket inside a namespace, blocking until the kernel's ACK: rtnetlink
handles the request in our ``sendmsg()``, multicasts the link's new state to every listener
and only then queues the ACK, so the wall clock right after the ACK is a tight upper bound
on the event (the request's send-to-ACK time is the bracket), with no process start in it.

``Heard``: a ``Supervisor(netlink=heard.factory)`` factory that opens the supervisor's own
netlink source (``open_pyroute2``, the default) and passes everything through, stamping the
wall clock at which each batch of link events reached the NetworkMonitor.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator

from supervisor.orchestration.network.inventory import Address, Link, Route
from supervisor.orchestration.network.netlink import LinkEvent, NetlinkSource, open_pyroute2
from tests.rig.netns import create_socket_in_netns

__all__ = ["Heard", "LinkSwitch"]

RTM_NEWLINK = 16
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
IFF_UP = 0x1
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, pad, type, index, flags, change


class LinkSwitch:
    """A NETLINK_ROUTE socket inside a namespace: a link up or down by one ``RTM_NEWLINK``
    request, blocking until the kernel's ACK (what ``ip link set DEV down`` sends, without a
    process start)."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        # NETLINK_ROUTE is protocol 0: socket(AF_NETLINK, SOCK_RAW) in the namespace.
        self.sock = create_socket_in_netns(netns, socket.AF_NETLINK, type=socket.SOCK_RAW)
        self.sock.bind((0, 0))
        self.sock.settimeout(5.0)
        self._seq = 0
        self._index: dict[str, int] = {}

    def index(self, ifname: str) -> int:
        if ifname not in self._index:
            out = subprocess.run(
                ["ip", "-n", self.netns, "-j", "link", "show", "dev", ifname],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout
            self._index[ifname] = int(json.loads(out)[0]["ifindex"])
        return self._index[ifname]

    def set(self, ifname: str, *, up: bool) -> tuple[float, float]:
        """Returns (wall clock just before the request was sent, right after its ACK)."""
        self._seq += 1
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, self.index(ifname), IFF_UP if up else 0, IFF_UP)
        head = _NLMSGHDR.pack(
            _NLMSGHDR.size + len(body), RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, self._seq, 0
        )
        sent = time.time()
        self.sock.send(head + body)
        while True:
            data = self.sock.recv(65536)
            acked = time.time()
            _, kind, _, seq, _ = _NLMSGHDR.unpack_from(data)
            if kind == NLMSG_ERROR and seq == self._seq:
                (err,) = struct.unpack_from("=i", data, _NLMSGHDR.size)
                if err:
                    raise OSError(-err, f"RTM_NEWLINK {ifname}: {os.strerror(-err)}")
                return sent, acked

    def close(self) -> None:
        self.sock.close()


class _HeardSource:
    """The supervisor's own netlink source (``open_pyroute2``), passed through; each batch
    of events it hands the monitor is timestamped (link events only)."""

    def __init__(self, inner: NetlinkSource, heard: Heard) -> None:
        self._inner = inner
        self._heard = heard

    async def links(self) -> list[Link]:
        return await self._inner.links()

    async def addresses(self) -> list[Address]:
        return await self._inner.addresses()

    async def default_routes(self) -> dict[int, Route | None]:
        return await self._inner.default_routes()

    async def route_to(self, ip: str) -> Route | None:
        return await self._inner.route_to(ip)

    async def events(self) -> AsyncIterator[list[LinkEvent]]:
        async for batch in self._inner.events():
            now = time.time()
            for kind, what in batch:
                if kind == "link":
                    self._heard.links.append((now, what.name, what.carrier))
            yield batch

    async def close(self) -> None:
        await self._inner.close()


class Heard:
    """``Supervisor(netlink=heard.factory)``: when the monitor got each link event."""

    def __init__(self) -> None:
        self.links: list[tuple[float, str, bool]] = []  # (wall clock, interface, carrier)

    async def factory(self, netns: str | None) -> NetlinkSource:
        return _HeardSource(await open_pyroute2(netns), self)

    def carrier_lost(self, ifname: str, after: float) -> float | None:
        return next((t for t, n, c in self.links if t >= after and n == ifname and not c), None)
