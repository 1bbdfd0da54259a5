"""The NetworkMonitor's failure paths, and what it makes of the real kernel.

* ENOBUFS for real: a 4 KiB rtnetlink buffer and a burst of 300 address adds (while ``ip``
  runs, the event loop is blocked on it, so nobody drains the buffer: the overflow is
  certain). The monitor dumps again, on a fresh socket (pyroute2 keeps the error on the old
  one); every address is reported ``address_added`` exactly once -- the Inventory reports an
  address only when it turns usable, and nothing turns unusable in the burst, so an address
  learnt from the dump and then from a queued event (or the other way round) is one report.
* The same resync against a scripted source (no root): lost addresses, a lost link removal;
  and a first dump that overflows is tried again.
* No netlink (pyroute2 absent, the socket refused, the first dump refused, a read failing
  later): one warning, ``network_status()`` says why, and the supervisor still works.
* DAD and MTU in a real namespace: an IPv6 address added without ``nodad`` is tentative and
  not usable until DAD completes; a link whose MTU cannot carry a QUIC packet has no usable
  address until the MTU is raised (its carrier is reported all the same: carrier follows up
  and running, whatever the MTU; the raise is ``address_added``).
* A namespace deleted before start: refused as missing, every time, and nothing started.

The namespace tests (marked ``netns``) make and delete their own ``qs-*`` namespaces and
touch nothing outside them. Waits are on events or polled state with a deadline; counts are
asserted, durations only printed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import TracebackType

import pytest

from actors.errors import InvalidArgumentError, SupervisorClosedError
from supervisor import FailoverPolicy, NetworkPolicy, PathPolicy, Supervisor
from supervisor.core.events import EvtNetworkChanged
from supervisor.orchestration.network.inventory import Address, Link, Route
from supervisor.orchestration.network.monitor import NetworkStatus
from supervisor.orchestration.network.netlink import (
    LinkEvent,
    NetlinkSource,
    SourceFactory,
    open_pyroute2,
)
from tests.rig.aioquic_server import RigServer
from tests.rig.netns import NETNS_DIR, NetNS, _ip, _run, wait_oper_up
from tests.support import dial_echo, echo_roundtrip

pytest_plugins = ["tests.rig.fixtures"]

GUARD = 20.0
MONITOR_LOGGER = "supervisor.orchestration.network.monitor"


# ---- helpers ------------------------------------------------------------------------------


class NetEvents:
    """Every EvtNetworkChanged of a supervisor, collected from the moment it is made."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.events: list[EvtNetworkChanged] = []
        self._sub = sup.events.subscribe(EvtNetworkChanged, maxsize=16384)
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="net-events")

    async def _run(self) -> None:
        async for evt in self._sub:
            assert isinstance(evt, EvtNetworkChanged)
            self.events.append(evt)
            self._changed.set()

    async def __aenter__(self) -> NetEvents:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._sub.close()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    @property
    def dropped(self) -> int:
        return self._sub.dropped

    def ips(self, change: str, interface: str | None = None) -> collections.Counter[str]:
        return collections.Counter(
            ip
            for e in self.events
            if e.change == change and (interface is None or e.interface == interface)
            for ip in e.addresses
        )

    def of(self, interface: str) -> list[tuple[str, tuple[str, ...]]]:
        return [(e.change, e.addresses) for e in self.events if e.interface == interface]

    async def wait_for(self, predicate: Callable[[], object], timeout: float = GUARD) -> None:
        """Until ``predicate()``; re-checked on every event and, every 50 ms, the monitor
        is asked whether it still runs (a crashed monitor fails the wait at once)."""
        async with asyncio.timeout(timeout):
            while not predicate():
                status = await self.sup.network_status()
                if not status.available:
                    raise AssertionError(f"the monitor stopped: {status.unavailable_reason}")
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 0.05)


async def status_until(
    sup: Supervisor, predicate: Callable[[NetworkStatus], object], timeout: float = GUARD
) -> NetworkStatus:
    """Poll ``network_status()`` (it has no change notification) until ``predicate``."""
    async with asyncio.timeout(timeout):
        while True:
            status = await sup.network_status()
            if predicate(status):
                return status
            await asyncio.sleep(0.01)


def interface(status: NetworkStatus, name: str) -> tuple[str, ...]:
    """The status's addresses of one interface ("ip/prefix[ tentative][ deprecated]")."""
    for i in status.interfaces:
        if i.name == name:
            return i.addresses
    return ()


def monitor_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("supervisor") and r.levelno >= logging.WARNING
    ]


def veth_inside(ns: str, a: str, b: str, *, mtu: int | None = None) -> None:
    """A veth pair with both ends in ``ns`` (carrier once both are up)."""
    _ip("link", "add", a, "type", "veth", "peer", "name", b, ns=ns)
    if mtu is not None:
        _ip("link", "set", a, "mtu", str(mtu), ns=ns)


def up(ns: str, *names: str) -> None:
    for name in names:
        _ip("link", "set", name, "up", ns=ns)


@pytest.fixture
def ns(rig_netns: None) -> Iterator[NetNS]:
    with NetNS("mon") as namespace:
        yield namespace


# ---- ENOBUFS for real -----------------------------------------------------------------------

BURST = 300


@pytest.mark.netns
async def test_enobufs_for_real_resyncs_and_reports_every_address_once(ns: NetNS) -> None:
    veth_inside(ns.name, "vB", "pB")
    up(ns.name, "vB", "pB")
    wait_oper_up(ns.name, ["vB"])
    sup = Supervisor(
        network=NetworkPolicy(),
        netns=ns.name,
        netlink=functools.partial(open_pyroute2, rcvbuf=4096),
    )
    async with sup, NetEvents(sup) as events:
        await status_until(sup, lambda s: s.available)
        want = [f"10.89.{i // 200}.{i % 200 + 1}" for i in range(BURST)]
        script = "".join(f"addr add {ip}/32 dev vB\n" for ip in want)
        t0 = time.monotonic()
        # Synchronous on purpose: the loop (the monitor's reader) waits for `ip` to finish.
        _run(["ip", "-n", ns.name, "-batch", "-"], input=script)
        await events.wait_for(lambda: set(want) <= set(events.ips("address_added", "vB")))
        print(f"\n{BURST} addresses reported in {time.monotonic() - t0:.3f} s")
        # A barrier: anything still queued from the burst is reported before this.
        _ip("addr", "add", "10.89.250.1/32", "dev", "vB", ns=ns.name)
        await events.wait_for(lambda: "10.89.250.1" in events.ips("address_added"))

        status = await sup.network_status()
        assert status.available
        assert status.resyncs >= 1, "the 4 KiB buffer did not overflow"
        listed = {a.split("/")[0] for a in interface(status, "vB")}
        assert set(want) <= listed
        added = events.ips("address_added", "vB")
        assert {ip: n for ip, n in added.items() if n != 1} == {}  # each exactly once
        assert set(want) | {"10.89.250.1"} <= set(added)
        assert events.dropped == 0
        print(f"resyncs {status.resyncs}, kernel events handled {status.events}")


# ---- ENOBUFS against a scripted source (no root) -------------------------------------------


class ScriptedSource:
    """A NetlinkSource whose kernel state is a dict and whose events are pushed by the test
    (a batch, or an exception to raise from the stream)."""

    def __init__(self) -> None:
        self.kernel_links: dict[int, Link] = {}
        self.kernel_addrs: dict[tuple[int, str], Address] = {}
        self.pushed: asyncio.Queue[list[LinkEvent] | BaseException] = asyncio.Queue()
        self.dumps = 0
        #: Opened by the factory, closed by the monitor (the same object each time).
        self.opened = 0
        self.closed = 0
        self.fail_dump: OSError | None = None
        #: Fail only the next dump with this (then dump normally).
        self.fail_dump_once: OSError | None = None

    def add_link(self, link: Link) -> None:
        self.kernel_links[link.index] = link

    def add(self, index: int, ip: str, *, announce: bool = True) -> None:
        address = Address(index, ip, 24)
        self.kernel_addrs[(index, ip)] = address
        if announce:
            self.pushed.put_nowait([("address", address)])

    async def links(self) -> list[Link]:
        if self.fail_dump is not None:
            raise self.fail_dump
        if self.fail_dump_once is not None:
            failure, self.fail_dump_once = self.fail_dump_once, None
            raise failure
        self.dumps += 1
        return list(self.kernel_links.values())

    async def addresses(self) -> list[Address]:
        return list(self.kernel_addrs.values())

    async def default_routes(self) -> dict[int, Route | None]:
        return {4: None, 6: None}

    async def route_to(self, ip: str) -> Route | None:
        return None

    async def events(self) -> AsyncIterator[list[LinkEvent]]:
        while True:
            item = await self.pushed.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    async def close(self) -> None:
        self.closed += 1


def factory_of(source: ScriptedSource) -> SourceFactory:
    async def factory(netns: str | None) -> NetlinkSource:
        assert netns is None
        source.opened += 1
        return source

    return factory


async def test_enobufs_resync_reports_what_was_lost_once(caplog: pytest.LogCaptureFixture) -> None:
    source = ScriptedSource()
    source.add_link(Link(2, "eth0", True, True, 1500))
    source.add_link(Link(3, "eth1", True, True, 1500))
    source.add(2, "10.0.0.1", announce=False)
    source.add(3, "10.0.1.1", announce=False)
    sup = Supervisor(network=NetworkPolicy(), netlink=factory_of(source))
    async with sup, NetEvents(sup) as events:
        await status_until(sup, lambda s: s.available)
        source.add(2, "10.0.0.11")
        await events.wait_for(lambda: "10.0.0.11" in events.ips("address_added"))

        # Lost to the overflow: two addresses come and eth1 goes with its address.
        source.add(2, "10.0.0.12", announce=False)
        source.add(2, "10.0.0.13", announce=False)
        del source.kernel_links[3], source.kernel_addrs[(3, "10.0.1.1")]
        source.pushed.put_nowait(OSError(errno.ENOBUFS, "No buffer space available"))
        # What the kernel had queued after the overflow: .13 again, and one more.
        source.pushed.put_nowait([("address", source.kernel_addrs[(2, "10.0.0.13")])])
        source.add(2, "10.0.0.14")
        await events.wait_for(
            lambda: {"10.0.0.12", "10.0.0.13", "10.0.0.14"} <= set(events.ips("address_added"))
            and ("link_removed", ("10.0.1.1",)) in events.of("eth1")
        )
        source.add(2, "10.0.0.15")  # a barrier
        await events.wait_for(lambda: "10.0.0.15" in events.ips("address_added"))

        status = await sup.network_status()
        assert status.available and status.resyncs == 1
        assert source.dumps == 2  # at start, and after the overflow
        added = events.ips("address_added")
        assert added == collections.Counter(f"10.0.0.{n}" for n in (11, 12, 13, 14, 15))
        # The removed link names the address it took with it (as an RTM_DELLINK would).
        assert events.of("eth1") == [("link_removed", ("10.0.1.1",))]
        assert [i.name for i in status.interfaces] == ["eth0"]
        # The resync reopened the source (pyroute2 keeps the error on the old socket) and
        # closed the old one; the one in use is open.
        assert (source.opened, source.closed) == (2, 1)
    assert source.closed == source.opened  # each closed once
    assert monitor_warnings(caplog) == []


async def test_a_first_dump_that_overflows_is_tried_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = ScriptedSource()
    source.add_link(Link(2, "eth0", True, True, 1500))
    source.add(2, "10.0.0.1", announce=False)
    source.fail_dump_once = OSError(errno.ENOBUFS, "No buffer space available")
    caplog.set_level(logging.WARNING)
    sup = Supervisor(network=NetworkPolicy(), netlink=factory_of(source))
    async with sup, NetEvents(sup) as events:
        status = await status_until(sup, lambda s: s.available or s.unavailable_reason)
        assert status.available, status.unavailable_reason
        assert interface(status, "eth0") == ("10.0.0.1/24",)
        assert status.resyncs == 0  # not a resync: the start, on a fresh socket
        assert (source.opened, source.closed, source.dumps) == (2, 1, 1)
        source.add(2, "10.0.0.2")  # and it reads events
        await events.wait_for(lambda: "10.0.0.2" in events.ips("address_added"))
    assert source.closed == source.opened
    assert monitor_warnings(caplog) == []


# ---- no netlink ---------------------------------------------------------------------------


async def _refused_socket(netns: str | None) -> NetlinkSource:
    raise OSError(errno.EPROTONOSUPPORT, "netlink socket refused")


NO_PYROUTE2 = "pyroute2 is not installed"


@pytest.mark.parametrize("how", ["pyroute2-absent", "socket-refused", "dump-refused"])
async def test_without_netlink_one_warning_and_the_supervisor_still_works(
    how: str,
    echo: RigServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    source: ScriptedSource | None = None
    netlink: SourceFactory | None = None
    if how == "pyroute2-absent":
        monkeypatch.setitem(sys.modules, "pyroute2", None)  # the real open_pyroute2 runs
        why = NO_PYROUTE2
    elif how == "socket-refused":
        netlink, why = _refused_socket, "netlink socket refused"
    else:
        source = ScriptedSource()
        source.fail_dump = OSError(errno.EPERM, "dump refused")
        netlink, why = factory_of(source), "dump refused"

    caplog.set_level(logging.WARNING)
    sup = Supervisor(failover=FailoverPolicy(), netlink=netlink)
    async with sup:
        status = await status_until(sup, lambda s: s.unavailable_reason is not None)
        assert not status.available
        assert status.unavailable_reason is not None and why in status.unavailable_reason
        assert status.interfaces == () and status.resyncs == 0

        conn = await dial_echo(sup, echo)  # the supervisor works without it
        await echo_roundtrip(conn)
        await conn.close()

        again = await sup.network_status()
        assert not again.available and again.unavailable_reason == status.unavailable_reason
        warnings = monitor_warnings(caplog)
        assert len(warnings) == 1, warnings  # one line, not one per connection or request
        assert "network monitor off" in warnings[0] and why in warnings[0]
        assert {r.name for r in caplog.records if r.levelno >= logging.WARNING} == {
            MONITOR_LOGGER
        }
    if source is not None:
        assert source.opened == source.closed == 1  # the half-opened source is closed, once


async def test_a_read_failure_stops_the_monitor_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = ScriptedSource()
    source.add_link(Link(2, "eth0", True, True, 1500))
    caplog.set_level(logging.WARNING)
    sup = Supervisor(network=NetworkPolicy(), netlink=factory_of(source))
    async with sup:
        await status_until(sup, lambda s: s.available)
        source.pushed.put_nowait(OSError(errno.EIO, "socket went away"))
        status = await status_until(sup, lambda s: not s.available)
        assert status.unavailable_reason is not None
        assert "netlink read failed" in status.unavailable_reason
        assert "socket went away" in status.unavailable_reason
        assert status.resyncs == 0
        warnings = monitor_warnings(caplog)
        assert len(warnings) == 1 and "network monitor stopped" in warnings[0], warnings
    assert source.opened == source.closed == 1


# ---- DAD and MTU in a real namespace ----------------------------------------------------------


def _kernel_flags(ns: str, dev: str, ip: str) -> list[str]:
    for link in json.loads(_ip("-j", "addr", "show", "dev", dev, ns=ns) or "[]"):
        for info in link.get("addr_info", []):
            if info.get("local") == ip:
                return [k for k in ("tentative", "dadfailed", "deprecated") if info.get(k)]
    raise AssertionError(f"{ip} not on {dev}")


@pytest.mark.netns
async def test_tentative_ipv6_and_a_too_small_mtu_are_not_usable(ns: NetNS) -> None:
    veth_inside(ns.name, "vX", "pX")
    _ip("addr", "add", "10.88.0.1/24", "dev", "vX", ns=ns.name)
    up(ns.name, "vX", "pX")
    wait_oper_up(ns.name, ["vX"])
    # The rig turns DAD off in its namespaces; on vX it runs: two probes 1 s apart, no
    # random start delay, so an address stays tentative for 2 s.
    ns.sysctl("net.ipv6.conf.vX.accept_dad", "1")
    ns.sysctl("net.ipv6.conf.vX.dad_transmits", "2")
    ns.sysctl("net.ipv6.conf.vX.router_solicitation_delay", "0")

    policy = NetworkPolicy(paths=PathPolicy(devices=("vX",), max_paths=3))
    async with Supervisor(netns=ns.name, network=policy) as sup, NetEvents(sup) as events:
        await status_until(sup, lambda s: s.available)

        # -- IPv6 DAD: tentative, not usable; usable (address_added) once DAD is over.
        t0 = time.monotonic()
        _ip("addr", "add", "fd88::1/64", "dev", "vX", ns=ns.name)  # no nodad
        seen = await status_until(
            sup, lambda s: any(a.startswith("fd88::1/") for a in interface(s, "vX"))
        )
        assert "fd88::1/64 tentative" in interface(seen, "vX")
        assert "fd88::1" not in events.ips("address_added")
        await events.wait_for(lambda: "fd88::1" in events.ips("address_added", "vX"))
        print(f"\nDAD over, address_added after {time.monotonic() - t0:.2f} s")
        assert _kernel_flags(ns.name, "vX", "fd88::1") == []
        after = await sup.network_status()
        assert "fd88::1/64" in interface(after, "vX")
        assert events.ips("address_added")["fd88::1"] == 1

        # -- MTU 1200: the link is up with carrier and its address is not usable.
        veth_inside(ns.name, "vM", "pM", mtu=1200)
        _ip("addr", "add", "10.88.9.1/24", "dev", "vM", ns=ns.name)
        up(ns.name, "pM", "vM")
        wait_oper_up(ns.name, ["vM"])
        await status_until(
            sup, lambda s: any(i.name == "vM" and i.carrier and i.mtu == 1200 for i in s.interfaces)
        )
        _ip("addr", "add", "10.88.0.2/24", "dev", "vX", ns=ns.name)  # a barrier
        await events.wait_for(lambda: "10.88.0.2" in events.ips("address_added"))
        status = await sup.network_status()
        assert interface(status, "vM") == ("10.88.9.1/24",)  # known, and never added
        # Its carrier came (live is up and running, whatever the MTU); nothing usable.
        assert events.of("vM") == [("carrier_regained", ("10.88.9.1",))]
        assert "10.88.9.1" not in events.ips("address_added")

        # Raised to 1500, the same link carries a path: the MTU was the only reason. No
        # carrier news: the link was live all along. (IPv6 comes up on it too: its link-local
        # address may be added as well.)
        _ip("link", "set", "vM", "mtu", "1500", ns=ns.name)
        await events.wait_for(lambda: "10.88.9.1" in events.ips("address_added", "vM"))
        after_raise = events.of("vM")[1:]
        assert ("address_added", ("10.88.9.1",)) in after_raise
        assert [c for c, _ in after_raise if c != "address_added"] == [], after_raise
        assert events.ips("address_added", "vM")["10.88.9.1"] == 1

        # Lowered into [1228, 1248): IPv4 still fits, so nothing says so. The IPv6 link-local
        # address that came with 1500 goes: mtu_too_small and/or removed (the kernel drops
        # IPv6 from a link below 1280; the order of its messages is its own).
        reported = len(events.of("vM"))
        link_local = {ip for ip in events.ips("address_added", "vM") if ":" in ip}
        _ip("link", "set", "vM", "mtu", "1240", ns=ns.name)
        await status_until(
            sup, lambda s: any(i.name == "vM" and i.mtu == 1240 for i in s.interfaces)
        )
        _ip("addr", "add", "10.88.0.3/24", "dev", "vX", ns=ns.name)  # a barrier
        await events.wait_for(lambda: "10.88.0.3" in events.ips("address_added"))
        status = await sup.network_status()
        assert "10.88.9.1/24" in interface(status, "vM")
        after_lower = events.of("vM")[reported:]
        assert not any("10.88.9.1" in ips for _, ips in after_lower), after_lower
        assert link_local <= {
            ip for c, ips in after_lower if c in ("mtu_too_small", "address_removed") for ip in ips
        }, after_lower
        assert [c for c, _ in after_lower if c.startswith("carrier")] == [], after_lower
        # Lowered below 1228: now the IPv4 address is too, by name.
        _ip("link", "set", "vM", "mtu", "1200", ns=ns.name)
        await events.wait_for(lambda: ("mtu_too_small", ("10.88.9.1",)) in events.of("vM"))
        assert [c for c, _ in events.of("vM") if c.startswith("carrier")] == ["carrier_regained"]
        assert events.dropped == 0


# ---- a namespace that went away before start ---------------------------------------------------


@contextlib.contextmanager
def _gone_namespace(journal: Path | None = None) -> Iterator[tuple[str, Supervisor]]:
    namespace = NetNS("gone")
    with namespace:
        sup = Supervisor(netns=namespace.name, network=NetworkPolicy(), journal=journal)
    yield namespace.name, sup  # deleted now


@pytest.mark.netns
async def test_a_namespace_deleted_before_start_is_refused_and_not_recreated(
    rig_netns: None,
) -> None:
    threads = threading.active_count()
    with _gone_namespace() as (name, sup):
        assert not (NETNS_DIR / name).exists()
        with pytest.raises(InvalidArgumentError) as info:
            await sup.start()
        assert info.value.name == "netns" and name in str(info.value)
        await sup.close()
        assert not (NETNS_DIR / name).exists()
        assert name not in os.listdir(NETNS_DIR)
        assert threading.active_count() == threads


@pytest.mark.netns
async def test_a_namespace_deleted_before_start_is_reported_as_missing(rig_netns: None) -> None:
    with _gone_namespace() as (name, sup):
        with pytest.raises(InvalidArgumentError) as info:
            await sup.start()
        await sup.close()
        message = str(info.value)
        assert "CAP_SYS_ADMIN" not in message and "does not exist" in message, message
        assert f"ip netns add {name}" in message
        assert "BrokenThreadPool" not in message


@pytest.mark.netns
async def test_a_failed_start_is_not_a_silent_success_the_second_time(
    rig_netns: None, tmp_path: Path
) -> None:
    """start() checks the namespace first: a failed start leaves nothing started (no
    journal, no runtime), and a second start() checks again."""
    journal = tmp_path / "journal"
    with _gone_namespace(journal) as (name, sup):
        try:
            errors: list[InvalidArgumentError] = []
            for _ in range(2):
                with pytest.raises(InvalidArgumentError) as info:
                    await sup.start()
                errors.append(info.value)
                assert not journal.exists()
                with pytest.raises(SupervisorClosedError, match="not started yet"):
                    await sup.network_status()
            assert [(e.name, e.value, str(e)) for e in errors] == [
                ("netns", name, str(errors[0]))
            ] * 2
        finally:
            await sup.close()


# ---- a crashed monitor is restarted (Erlang/OTP restart intensity) ---------------------------


async def test_a_crashed_monitor_is_restarted_and_reports_what_changed_meanwhile(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug in the reader (not a netlink error) crashes the monitor: the supervisor restarts
    it with the inventory it had, so what changed while it was down is reported once."""
    source = ScriptedSource()
    source.add_link(Link(2, "eth0", True, True, 1500))
    source.add(2, "10.0.0.1", announce=False)
    sup = Supervisor(network=NetworkPolicy(), netlink=factory_of(source))
    async with sup, NetEvents(sup) as events:
        await status_until(sup, lambda s: s.available)
        source.add(2, "10.0.0.2", announce=False)  # while the monitor is down
        source.pushed.put_nowait(RuntimeError("a bug in the reader"))
        status = await status_until(sup, lambda s: s.available and s.events == 0)  # the new one
        await events.wait_for(lambda: "10.0.0.2" in events.ips("address_added"))
        assert source.opened == 2 and source.dumps == 2
        assert events.ips("address_added") == collections.Counter({"10.0.0.2": 1})
        assert {a.split("/")[0] for a in interface(status, "eth0")} == {"10.0.0.1", "10.0.0.2"}
    crashed = [r for r in caplog.records if "network monitor crashed" in r.getMessage()]
    assert len(crashed) == 1 and "restarting" in crashed[0].getMessage()


async def test_a_monitor_that_keeps_crashing_is_given_up(caplog: pytest.LogCaptureFixture) -> None:
    source = ScriptedSource()
    source.add_link(Link(2, "eth0", True, True, 1500))
    sup = Supervisor(network=NetworkPolicy(), netlink=factory_of(source))
    async with sup:
        await status_until(sup, lambda s: s.available)
        for _ in range(6):  # the first crash and the five restarts allowed in a minute
            source.pushed.put_nowait(RuntimeError("a bug in the reader"))
        status = await status_until(sup, lambda s: "not restarted" in (s.unavailable_reason or ""))
        assert not status.available
        assert source.opened == 6  # the first start and five restarts
    messages = [r.getMessage() for r in caplog.records]
    crashed = [m for m in messages if "network monitor crashed" in m]
    assert len(crashed) == 6 and "not restarted" in crashed[-1]
