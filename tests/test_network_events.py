"""The supervisor hears the kernel (issue "network events"): real rtnetlink events in real
namespaces drive failover, return, discovery and route following.

Topology (tests/rig/netns.py, ``TwoPathTopology``, IPv4): net0 (c0 10.77.1.2) and net1 (c1
10.77.2.2) between a client and a server namespace; the aioquic echo server listens on
10.77.0.1. The Supervisor runs with ``netns=<client namespace>``: its path sockets are bound
there by address and its NetworkMonitor listens there. Each connection is dialled from
10.77.1.2 (path A) with a validated standby path from 10.77.2.2 (path B).

Every wait is on an event or a published state, with a generous guard; counts are asserted,
durations only printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from actors.path_state import PathState
from supervisor import FailoverPolicy, NetworkPolicy, PathPolicy, Supervisor
from supervisor.core.events import (
    Event,
    EvtConnectionMigrationCompleted,
    EvtConnectionMigrationStarted,
    EvtNetworkChanged,
    EvtPathRemoved,
)
from supervisor.core.handles import Connection
from supervisor.orchestration.network.netlink import NetlinkSource, NetlinkUnavailable
from tests.rig.aioquic_server import RigServer
from tests.rig.certs import CertPair
from tests.rig.netns import TwoPathTopology, _ip, veth, wait_oper_up
from tests.support import ChecksummedStream, EventLog, echo_roundtrip, event_log

pytestmark = pytest.mark.netns

pytest_plugins = ["tests.rig.fixtures"]

A, B = TwoPathTopology.PATHS[0].client_v4, TwoPathTopology.PATHS[1].client_v4
GUARD = 20.0


def _ma(ip: str) -> str:
    return f"/ip4/{ip}/udp/0/quic-v1"


@pytest.fixture
def topo(rig_topology_v4: TwoPathTopology) -> TwoPathTopology:
    return rig_topology_v4


@pytest.fixture
def server(rig_server_in_topology: RigServer) -> RigServer:
    return rig_server_in_topology


@contextlib.asynccontextmanager
async def supervisor(topo: TwoPathTopology, **kwargs: object) -> AsyncIterator[Supervisor]:
    kwargs.setdefault("network", NetworkPolicy())
    async with Supervisor(
        enable_experimental_connection_migration=True, netns=topo.client.name, **kwargs
    ) as sup:
        yield sup


async def _dial(
    sup: Supervisor, server: RigServer, cert: CertPair, *, standby: bool = True
) -> Connection:
    conn = await sup.dial(
        f"/ip4/{server.host}/udp/{server.port}/quic-v1",
        alpn_protocols=["echo"],
        cafile=str(cert.certfile),
        local_addr=_ma(A),
        timeout=GUARD,
    )
    if standby:
        path = await conn.as_migratable().add_path(_ma(B))
        await path.probe(timeout=GUARD)
    return conn


def _active_ip(conn: Connection) -> str:
    info = conn.as_migratable().active_path()
    return str(info.local_addr).split("/")[2]


def _states(conn: Connection) -> dict[str, PathState]:
    return {
        str(p.local_addr).split("/")[2]: p.state for p in conn.as_migratable().available_paths()
    }


async def _monitor_ready(sup: Supervisor, peer: str | None = None) -> None:
    """The monitor has dumped the namespace (and learnt the route to ``peer``)."""
    async with asyncio.timeout(GUARD):
        while True:
            status = await sup.network_status()
            if status.available and (peer is None or any(r.peer == peer for r in status.routes)):
                return
            await asyncio.sleep(0.02)  # polled: the status has no change notification


def _moves(log: EventLog, conn: Connection, reason: str) -> list[Event]:
    return [
        e
        for e in log.of(EvtConnectionMigrationCompleted, conn_id=conn.conn_id)
        if getattr(e, "reason", None) == reason
    ]


# ---- link down ----------------------------------------------------------------------------


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
async def test_link_down_moves_every_connection_at_once(
    topo: TwoPathTopology, server: RigServer, cert: CertPair, busy: bool
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with supervisor(topo, tracer_provider=provider) as sup, event_log(sup) as log:
        conns = [await _dial(sup, server, cert) for _ in range(3)]
        streams = []
        if busy:
            streams = [await ChecksummedStream(c, seed=i).start() for i, c in enumerate(conns)]
            for s in streams:
                await s.advance(16 * 1024, timeout=GUARD)
        await _monitor_ready(sup, server.host)
        t0 = time.monotonic()
        topo.link_down(0)
        await log.wait_for(lambda: all(_moves(log, c, "network") for c in conns), timeout=GUARD)
        print(f"\nlink down -> all {len(conns)} moved in {time.monotonic() - t0:.3f} s")
        for conn in conns:
            assert _active_ip(conn) == B
            assert _states(conn)[A] is PathState.FAILED
            (move,) = _moves(log, conn, "network")
            assert getattr(move, "initiator", None) == "policy"
        (lost,) = [
            e
            for e in log.of(EvtNetworkChanged)
            if getattr(e, "change", None) == "carrier_lost"
            and getattr(e, "interface", None) == "c0"
        ]
        # One trace: the change's span, and every migration it caused as its child.
        spans = exporter.get_finished_spans()
        (change_span,) = [
            s
            for s in spans
            if s.name == "quic.network.change"
            and (s.attributes or {}).get("quic.network.change") == "carrier_lost"
        ]
        ctx = change_span.get_span_context()
        assert ctx is not None and getattr(lost, "trace_id", None) == f"{ctx.trace_id:032x}"
        assert (change_span.attributes or {}).get("quic.network.connections_moved") == len(conns)
        moves = [s for s in spans if s.name == "quic.migration"]
        ours = [s for s in moves if s.parent is not None and s.parent.span_id == ctx.span_id]
        assert len(ours) == len(conns)
        for span in ours:
            attrs = span.attributes or {}
            assert attrs.get("quic.migration.reason") == "network"
            assert attrs.get("quic.migration.initiator") == "policy"
        for s in streams:
            await s.advance(16 * 1024, timeout=GUARD)
            await s.finish(timeout=GUARD)  # every byte echoed, in order
        for conn in conns:  # still usable when idle: one more echo on B
            await echo_roundtrip(conn, timeout=GUARD)


async def test_a_link_lost_with_nowhere_to_go_and_back_leaves_the_connection_usable(
    topo: TwoPathTopology, server: RigServer, cert: CertPair
) -> None:
    """One path only: the loss degrades it (no move is possible); when the carrier is back
    the path carries again, no migration was started, and the stream goes on."""
    async with supervisor(topo) as sup, event_log(sup) as log:
        conn = await _dial(sup, server, cert, standby=False)
        await _monitor_ready(sup, server.host)
        stream = await ChecksummedStream(conn, chunk=4096).start()
        await stream.advance(16 * 1024, timeout=GUARD)
        topo.link_down(0)
        await log.wait_for(lambda: _states(conn)[A] is PathState.DEGRADED, timeout=GUARD)
        await asyncio.to_thread(topo.link_up, 0)
        await log.wait_for(lambda: _states(conn)[A] is PathState.ACTIVE, timeout=GUARD)
        await stream.advance(16 * 1024, timeout=GUARD)
        await stream.finish(timeout=GUARD)
        assert not log.of(EvtConnectionMigrationStarted)


# ---- address removed and back ---------------------------------------------------------------


async def test_address_removed_moves_and_its_return_makes_the_path_standby_again(
    topo: TwoPathTopology, server: RigServer, cert: CertPair
) -> None:
    c = topo.client.name
    async with supervisor(topo) as sup, event_log(sup) as log:
        conn = await _dial(sup, server, cert)
        await _monitor_ready(sup, server.host)
        _ip("addr", "del", f"{A}/24", "dev", "c0", ns=c)  # the link stays up
        await log.wait_for(lambda: _moves(log, conn, "network"), timeout=GUARD)
        assert _active_ip(conn) == B
        assert _states(conn)[A] is PathState.FAILED
        assert any(
            getattr(e, "change", None) == "address_removed" for e in log.of(EvtNetworkChanged)
        )

        # As a host would: the route to the server now goes over net1. Then A's address comes
        # back, and its own source route (the kernel dropped the routes that used it).
        p0, p1 = topo.paths
        _ip("route", "replace", topo.SERVER_V4, "via", p1.server_v4, "dev", "c1", ns=c)
        _ip("addr", "add", f"{A}/24", "dev", "c0", ns=c)
        _ip(
            "route",
            "replace",
            topo.SERVER_V4,
            "via",
            p0.server_v4,
            "dev",
            "c0",
            "table",
            str(p0.table),
            ns=c,
        )
        await log.wait_for(lambda: _states(conn).get(A) is PathState.STANDBY, timeout=GUARD)
        assert _active_ip(conn) == B  # standby: no preferred path, so no move back
        assert len(_moves(log, conn, "network")) == 1


# ---- interfaces that appear and go --------------------------------------------------------------

C_CLIENT, C_SERVER = "10.77.3.2", "10.77.3.1"


def _third_link(topo: TwoPathTopology) -> None:
    """A third veth between the namespaces (c2 10.77.3.2 -- s2 10.77.3.1), source-routed."""
    c = topo.client.name
    veth(c, topo.server.name, f"{C_CLIENT}/24", f"{C_SERVER}/24", "c2", "s2")
    _ip("rule", "add", "pref", "1020", "from", C_CLIENT, "table", "103", ns=c)
    _ip("route", "replace", topo.SERVER_V4, "via", C_SERVER, "dev", "c2", "table", "103", ns=c)
    wait_oper_up(c, ["c2"])


async def test_auto_discovery_adds_a_validated_path_on_a_new_interface_and_closes_it_when_it_goes(
    topo: TwoPathTopology, server: RigServer, cert: CertPair
) -> None:
    policy = NetworkPolicy(paths=PathPolicy(prefixes=("10.77.3.0/24",), max_paths=3))
    async with supervisor(topo, network=policy) as sup, event_log(sup) as log:
        conns = [await _dial(sup, server, cert) for _ in range(3)]
        await _monitor_ready(sup)
        assert all(C_CLIENT not in _states(c) for c in conns)  # nothing matched before
        _third_link(topo)
        await log.wait_for(
            lambda: all(_states(c).get(C_CLIENT) is PathState.STANDBY for c in conns),
            timeout=GUARD,
        )
        status = await sup.network_status()
        assert status.reactions.get("paths_added") == 3

        _ip("link", "del", "c2", ns=topo.client.name)
        await log.wait_for(lambda: all(C_CLIENT not in _states(c) for c in conns), timeout=GUARD)
        removed = [
            e
            for e in log.of(EvtPathRemoved)
            if str(getattr(e, "local_addr", "")).split("/")[2] == C_CLIENT
        ]
        assert len(removed) == 3  # closed cleanly: one EvtPathRemoved each
        for conn in conns:
            assert _active_ip(conn) == A  # nobody moved
            await echo_roundtrip(conn, timeout=GUARD)


# ---- the route to the peer moves --------------------------------------------------------------


@pytest.mark.parametrize("via", ["host_route", "default_route"])
async def test_connections_follow_the_route_to_their_peer(
    topo: TwoPathTopology, server: RigServer, cert: CertPair, via: str
) -> None:
    c = topo.client.name
    p0, p1 = topo.paths
    if via == "default_route":  # the server is reached through the default route
        _ip("route", "del", topo.SERVER_V4, ns=c)
        _ip("route", "replace", "default", "via", p0.server_v4, "dev", "c0", ns=c)
    async with supervisor(topo) as sup, event_log(sup) as log:
        conns = [await _dial(sup, server, cert) for _ in range(2)]
        await _monitor_ready(sup, server.host)
        if via == "default_route":
            _ip("route", "replace", "default", "via", p1.server_v4, "dev", "c1", ns=c)
        else:
            _ip("route", "replace", topo.SERVER_V4, "via", p1.server_v4, "dev", "c1", ns=c)
        await log.wait_for(lambda: all(_moves(log, x, "network") for x in conns), timeout=GUARD)
        for conn in conns:
            assert _active_ip(conn) == B
            assert _states(conn)[A] is PathState.STANDBY  # A is fine: only the route moved
        changes = [
            (getattr(e, "change", None), getattr(e, "interface", None))
            for e in log.of(EvtNetworkChanged)
        ]
        assert [i for ch, i in changes if ch == "route_changed"] == ["c1"]
        if via == "default_route":
            assert ("default_route_changed", "c1") in changes


# ---- eager moves are budgeted ---------------------------------------------------------------


async def _status_until(sup: Supervisor, what: str, at_least: int) -> None:
    async with asyncio.timeout(GUARD):
        while (await sup.network_status()).reactions.get(what, 0) < at_least:
            await asyncio.sleep(0.05)  # polled: the counters have no change notification


async def test_eager_moves_off_a_degrading_default_path_are_budgeted_and_return(
    topo: TwoPathTopology, server: RigServer, cert: CertPair
) -> None:
    """The route to the server is net0 (A): a failover to B is an eager move onto a
    non-default network. With a budget of one: the first black hole on A moves to B; after
    ``max_time_on_non_default`` the connection goes back to A once A validates; the second
    black hole finds the budget spent and the connection stays on A (it recovers when the
    black hole lifts); every byte is echoed."""
    failover = FailoverPolicy(keepalive_interval=0.2, min_silence=0.3, probe_timeout=1.0)
    network = NetworkPolicy(max_degrading_moves=1, max_time_on_non_default=1.0)
    async with (
        supervisor(topo, failover=failover, network=network) as sup,
        event_log(sup) as log,
    ):
        conn = await _dial(sup, server, cert)
        await _monitor_ready(sup, server.host)
        stream = await ChecksummedStream(conn, chunk=4096).start()
        await stream.advance(16 * 1024, timeout=GUARD)

        with topo.blackhole(0):
            await log.wait_for(lambda: _moves(log, conn, "failover"), timeout=GUARD)
        assert _active_ip(conn) == B
        await log.wait_for(lambda: _moves(log, conn, "network"), timeout=GUARD)  # back to A
        assert _active_ip(conn) == A
        await stream.advance(16 * 1024, timeout=GUARD)

        with topo.blackhole(0):
            await _status_until(sup, "eager_refused", 1)
        assert len(_moves(log, conn, "failover")) == 1  # the budget held
        assert _active_ip(conn) == A
        status = await sup.network_status()
        assert status.reactions.get("eager_moves") == 1
        assert status.reactions.get("returns") == 1
        await stream.advance(16 * 1024, timeout=GUARD)
        await stream.finish(timeout=GUARD)


# ---- a flapping link ------------------------------------------------------------------------


async def test_a_flapping_link_costs_at_most_three_switches_and_ends_on_the_preferred_path(
    topo: TwoPathTopology, server: RigServer, cert: CertPair
) -> None:
    failover = FailoverPolicy(prefer=_ma(A), hysteresis=1.0)
    async with supervisor(topo, failover=failover) as sup, event_log(sup) as log:
        conns = [await _dial(sup, server, cert) for _ in range(3)]
        await _monitor_ready(sup, server.host)
        c, p0 = topo.client.name, topo.paths[0]

        def flap(down: bool) -> None:
            _ip("link", "set", "c0", "down" if down else "up", ns=c)
            if not down:
                topo._routes(p0, check=False)

        loop = asyncio.get_running_loop()
        end = loop.time() + 5.0
        down = True
        while loop.time() < end:  # the stimulus: 200 ms per state change
            await asyncio.to_thread(flap, down)
            down = not down
            await asyncio.sleep(0.2)
        if not down:  # it ended down: bring it back
            await asyncio.to_thread(flap, False)
        wait_oper_up(c, ["c0"])

        def back_on_a(conn: Connection) -> bool:
            done = log.of(EvtConnectionMigrationCompleted, conn_id=conn.conn_id)
            return bool(done) and f"/{A}/" in str(getattr(done[-1], "to_local_addr", ""))

        await log.wait_for(lambda: all(back_on_a(x) for x in conns), timeout=GUARD)
        for conn in conns:
            assert _active_ip(conn) == A
            switches = log.of(EvtConnectionMigrationCompleted, conn_id=conn.conn_id)
            print(f"\n{conn.conn_id}: {[getattr(e, 'reason', '') for e in switches]}")
            assert 1 <= len(switches) <= 3
            await echo_roundtrip(conn, timeout=GUARD)


async def test_eager_moves_after_write_errors_have_their_own_budget(
    topo: TwoPathTopology, server: RigServer, cert: CertPair
) -> None:
    """A's own source route goes (sends from A fail: ENETUNREACH) while the kernel's route to
    the server still says A: a failover to B would be an eager move after write errors, and
    that budget is 0 here; the connection stays and recovers when the route is back."""
    failover = FailoverPolicy(keepalive_interval=0.2, min_silence=0.3, probe_timeout=1.0)
    network = NetworkPolicy(max_write_error_moves=0)
    c, p0 = topo.client.name, topo.paths[0]
    async with (
        supervisor(topo, failover=failover, network=network) as sup,
        event_log(sup) as log,
    ):
        conn = await _dial(sup, server, cert)
        await _monitor_ready(sup, server.host)
        stream = await ChecksummedStream(conn, chunk=4096).start()
        await stream.advance(16 * 1024, timeout=GUARD)
        _ip("route", "del", topo.SERVER_V4, "table", str(p0.table), ns=c)
        await _status_until(sup, "eager_refused", 1)
        assert not _moves(log, conn, "failover")
        assert _active_ip(conn) == A
        topo._routes(p0)
        await stream.advance(16 * 1024, timeout=GUARD)
        await stream.finish(timeout=GUARD)
        assert not log.of(EvtConnectionMigrationCompleted)


# ---- without netlink ------------------------------------------------------------------------


async def _no_netlink(netns: str | None) -> NetlinkSource:
    raise NetlinkUnavailable("pyroute2 is not installed (a test's factory)")


async def test_without_netlink_probing_still_fails_over(
    topo: TwoPathTopology,
    server: RigServer,
    cert: CertPair,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The monitor cannot start: one warning line, and a link going down is still noticed,
    by the health probing (reason "failover"), every byte echoed."""
    failover = FailoverPolicy(keepalive_interval=0.2, min_silence=0.3, probe_timeout=1.0)
    with caplog.at_level(logging.WARNING, logger="supervisor.orchestration.network.monitor"):
        async with (
            supervisor(topo, failover=failover, netlink=_no_netlink) as sup,
            event_log(sup) as log,
        ):
            conn = await _dial(sup, server, cert)
            status = await sup.network_status()
            assert not status.available and "pyroute2" in (status.unavailable_reason or "")
            stream = await ChecksummedStream(conn, chunk=4096).start()
            await stream.advance(16 * 1024, timeout=GUARD)
            topo.link_down(0)
            await log.wait_for(lambda: _moves(log, conn, "failover"), timeout=GUARD)
            assert _active_ip(conn) == B
            assert not log.of(EvtNetworkChanged)
            await stream.advance(16 * 1024, timeout=GUARD)
            await stream.finish(timeout=GUARD)
    warnings = [r for r in caplog.records if r.name == "supervisor.orchestration.network.monitor"]
    assert len(warnings) == 1 and "probing" in warnings[0].getMessage()
