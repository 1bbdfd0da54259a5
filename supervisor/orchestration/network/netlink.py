"""rtnetlink through pyroute2's ``AsyncIPRoute``: the one module that imports pyroute2.

``NetlinkSource`` is what the monitor needs from the kernel (dumps, ``ip route get``, the
event stream); ``open_pyroute2`` is the real one. pyroute2 is an optional extra
(``pip install 'quic-supervisor[netlink]'``): without it ``open_pyroute2`` raises
``NetlinkUnavailable`` and the supervisor keeps to probing (DESIGN §8). Tests inject their
own factory to make the socket fail.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Protocol

from supervisor.orchestration.network.inventory import (
    IFA_F_DADFAILED,
    IFA_F_DEPRECATED,
    IFA_F_TENTATIVE,
    IFF_RUNNING,
    IFF_UP,
    Address,
    Link,
    Route,
)

__all__ = [
    "LinkEvent",
    "NetlinkSource",
    "NetlinkUnavailable",
    "SourceFactory",
    "open_pyroute2",
]

#: What the event stream yields: ("link", Link) / ("unlink", index) / ("address", Address)
#: / ("unaddress", (index, ip)) / ("route", None): something in a routing table changed.
LinkEvent = tuple[str, Any]


class NetlinkUnavailable(RuntimeError):
    """No rtnetlink here (pyroute2 not installed, or its socket could not be opened)."""


class NetlinkSource(Protocol):
    async def links(self) -> list[Link]: ...

    async def addresses(self) -> list[Address]: ...

    async def default_routes(self) -> dict[int, Route | None]: ...

    async def route_to(self, ip: str) -> Route | None:
        """``ip route get IP``: the interface and source the kernel would use now."""
        ...

    def events(self) -> AsyncIterator[list[LinkEvent]]:
        """Batches of events; raises ``OSError(ENOBUFS)`` when the kernel dropped some."""
        ...

    async def close(self) -> None: ...


#: ``factory(netns)`` -> an open source; raises NetlinkUnavailable (or OSError) if it cannot.
SourceFactory = Callable[[str | None], Coroutine[Any, Any, NetlinkSource]]


def _link(msg: Any) -> Link:
    flags = int(msg.get("flags") or 0)
    return Link(
        index=int(msg["index"]),
        name=str(msg.get("ifname") or f"if{msg['index']}"),
        up=bool(flags & IFF_UP),
        carrier=bool(flags & IFF_UP) and bool(flags & IFF_RUNNING),
        mtu=int(msg.get("mtu") or 0),
    )


def _address(msg: Any) -> Address | None:
    ip = msg.get("address") or msg.get("local")
    if ip is None:
        return None
    flags = int(msg.get("IFA_FLAGS") or msg.get("flags") or 0)
    return Address(
        index=int(msg["index"]),
        ip=str(ip),
        prefixlen=int(msg.get("prefixlen") or 0),
        tentative=bool(flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED)),
        deprecated=bool(flags & IFA_F_DEPRECATED),
    )


def _route(msg: Any) -> Route:
    oif = msg.get("oif")
    return Route(
        index=int(oif) if oif is not None else None,
        source=msg.get("prefsrc"),
        gateway=msg.get("gateway"),
    )


class _Pyroute2Source:
    def __init__(self, ipr: Any, netlink_error: type[Exception]) -> None:
        self._ipr = ipr
        #: pyroute2's NetlinkError is not an OSError: it is turned into one here, so the
        #: monitor handles every kernel refusal the same way.
        self._error = netlink_error

    def _os_error(self, exc: Exception) -> OSError:
        code = getattr(exc, "code", 0) or 0
        return OSError(code, f"netlink: {exc}")

    async def links(self) -> list[Link]:
        try:
            return [_link(m) async for m in await self._ipr.link("dump")]
        except self._error as exc:
            raise self._os_error(exc) from exc

    async def addresses(self) -> list[Address]:
        out = []
        try:
            async for msg in await self._ipr.addr("dump"):
                address = _address(msg)
                if address is not None:
                    out.append(address)
        except self._error as exc:
            raise self._os_error(exc) from exc
        return out

    async def default_routes(self) -> dict[int, Route | None]:
        out: dict[int, Route | None] = {4: None, 6: None}
        try:
            for family, key in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
                async for msg in await self._ipr.route("dump", family=family, table=254):
                    if msg.get("dst_len") == 0 and msg.get("oif") is not None and out[key] is None:
                        out[key] = _route(msg)
        except self._error as exc:
            raise self._os_error(exc) from exc
        return out

    async def route_to(self, ip: str) -> Route | None:
        try:
            answer = await self._ipr.route("get", dst=ip)
        except (OSError, self._error):  # ENETUNREACH and friends: no route at all
            return None
        messages = answer if isinstance(answer, list) else [m async for m in answer]
        return _route(messages[0]) if messages else None

    async def events(self) -> AsyncIterator[list[LinkEvent]]:
        while True:
            try:
                batch = [e async for e in self._batch()]
            except self._error as exc:
                raise self._os_error(exc) from exc
            if batch:
                yield batch

    async def _batch(self) -> AsyncIterator[LinkEvent]:
        async for msg in self._ipr.get():
            kind = msg.get("event")
            if kind == "RTM_NEWLINK":
                yield ("link", _link(msg))
            elif kind == "RTM_DELLINK":
                yield ("unlink", int(msg["index"]))
            elif kind in ("RTM_NEWADDR", "RTM_DELADDR"):
                address = _address(msg)
                if address is None:
                    continue
                if kind == "RTM_NEWADDR":
                    yield ("address", address)
                else:
                    yield ("unaddress", (address.index, address.ip))
            elif kind in ("RTM_NEWROUTE", "RTM_DELROUTE"):
                yield ("route", None)

    async def close(self) -> None:
        self._ipr.close()


async def open_pyroute2(netns: str | None, *, rcvbuf: int = 4 * 1024 * 1024) -> NetlinkSource:
    """An rtnetlink socket subscribed to link, address and route groups, in ``netns`` (a
    name under /run/netns or a path; never created: a missing one is an error). ``rcvbuf``:
    room for a burst (1,000 addresses going at once is ~200 KiB of messages); what overflows
    it is ENOBUFS, and the monitor dumps again."""
    try:
        from pyroute2 import AsyncIPRoute
        from pyroute2.netlink.exceptions import NetlinkError
    except ImportError as exc:
        raise NetlinkUnavailable(
            "pyroute2 is not installed (pip install 'quic-supervisor[netlink]')"
        ) from exc
    kwargs: dict[str, Any] = {"rcvbuf": rcvbuf}
    if netns is not None:
        kwargs.update(netns=netns, flags=0)  # flags=0: never create the namespace
    ipr = AsyncIPRoute(**kwargs)
    try:
        await ipr.bind()
    except BaseException:
        ipr.close()
        raise
    return _Pyroute2Source(ipr, NetlinkError)
