"""Node health at scale over real links (issue "node scale 1"): 200 connections, two links.

Topology (tests/rig/netns.py, `TwoPathTopology`, IPv4): net0 (c0 10.77.1.2) and net1 (c1
10.77.2.2) between a client and a server namespace; the aioquic echo server sits on 10.77.0.1.
Every connection is dialled over net0 and gets a validated standby path over net1, so the
supervisor holds two health groups, keyed (local IP, server IP): (10.77.1.2, 10.77.0.1) with the
200 active paths and (10.77.2.2, 10.77.0.1) with the 200 standby ones.

What is counted: UDP datagrams per link and direction (nftables counters in the client
namespace, `UdpCounters`) over a quiet window. One question per group and interval (the groups
design) puts ~2 x W / interval datagrams on net1 (challenge + response); per-path keep-alives
(the old design) would put at least 200 x W / interval challenges there. With NAT keep-alives on
(a separate, smaller node) net1 carries one per standby path and NAT period instead: that duty
is per 5-tuple, so its traffic grows with paths, as it must.

Then net0 is black-holed (nft drops on both receiving sides, no error anywhere) while every
connection has bytes in flight on an echo stream: every connection moves to net1 (reason
"failover") and every byte comes back intact. Counts are asserted, durations only printed.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator

import pytest

from actors.health_groups import GroupKey
from actors.streams import Stream
from supervisor import FailoverPolicy, Supervisor
from supervisor.core.events import EvtConnectionMigrationCompleted, EvtConnectionMigrationFailed
from supervisor.core.handles import Connection
from tests.rig.aioquic_server import RigServer
from tests.rig.certs import CertPair
from tests.rig.netns import TwoPathTopology, UdpCounters
from tests.support import EventLog, event_log, supervisor_actor

pytestmark = pytest.mark.netns

pytest_plugins = ["tests.rig.fixtures"]

N = 200
#: Health-group probe period: short, so a few-second window holds many rounds.
INTERVAL = 0.5
JITTER = 0.2  # FailoverPolicy's default, spelled out: the bounds below use it
#: The quiet window traffic is counted over (a measurement interval, not a synchronisation).
WINDOW = 4.0
#: Dials in flight at once.
PARALLEL = 32
#: Generous guards for a shared 2-core machine: counts are asserted, never durations.
GUARD = 30.0
#: Echo bytes per connection before the fault, and after it (in flight when net0 goes dark).
BEFORE, AFTER = 8 * 1024, 16 * 1024


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def topo(rig_topology_v4: TwoPathTopology) -> TwoPathTopology:
    """The rig's IPv4 two-path topology (tests/rig/fixtures.py)."""
    return rig_topology_v4


@pytest.fixture
def server(rig_server_in_topology: RigServer) -> RigServer:
    """The rig's echo server on 10.77.0.1, its receive buffer sized for 200 connections'
    first flights (``tests.rig.fixtures.SERVER_RCVBUF``)."""
    return rig_server_in_topology


@pytest.fixture
def counters(topo: TwoPathTopology) -> Iterator[UdpCounters]:
    """UDP datagram counters on c0 and c1 (client namespace), both directions."""
    with UdpCounters(topo.client.name, [p.client_if for p in topo.paths]) as udp:
        yield udp


# ---- helpers -----------------------------------------------------------------------------------


def _policy(nat_keepalive: float | None) -> FailoverPolicy:
    # min_silence 1 s: with 200 connections and their server on 2 shared cores, a starved loop
    # must not read its own stall as a silent active path (the fault suite's drain test saw
    # false failovers at 0.1 s with 20 streams).
    return FailoverPolicy(
        keepalive_interval=INTERVAL, jitter=JITTER, nat_keepalive=nat_keepalive, min_silence=1.0
    )


async def _dial_node(
    sup: Supervisor, topo: TwoPathTopology, server: RigServer, cert: CertPair, n: int
) -> list[Connection]:
    """``n`` connections dialled over net0, each with a validated standby path over net1."""
    gate = asyncio.Semaphore(PARALLEL)

    async def one() -> Connection:
        async with gate:
            conn = await sup.dial(
                f"/ip4/{server.host}/udp/{server.port}/quic-v1",
                alpn_protocols=["echo"],
                cafile=str(cert.certfile),
                sock=topo.client_socket(0),
                timeout=GUARD,
            )
            standby = await conn.as_migratable().add_path(sock=topo.client_socket(1))
            await standby.probe(timeout=GUARD)
            return conn

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def _settled(sup: Supervisor, n: int) -> None:
    """Wait until every path of the ``n`` connections is a member of its group (active and
    standby paths both are: 2 groups, 2 n members). No event signals membership: polled."""
    async with asyncio.timeout(GUARD):
        while True:
            status = await sup.health_status()
            if status.groups == 2 and status.members == 2 * n:
                return
            await asyncio.sleep(0.05)


def _group_members(sup: Supervisor, key: GroupKey) -> int | None:
    """Members of one health group, None when there is no such group (test-only look at the
    supervisor's NodeHealth)."""
    status = supervisor_actor(sup).health.groups.status(key)
    return None if status is None else int(status.members)


async def _window(
    sup: Supervisor, counters: UdpCounters
) -> tuple[float, dict[str, int], dict[str, int]]:
    """Count datagrams (per link and direction) and questions (by kind) over WINDOW seconds.
    Returns (elapsed s, datagram deltas, keep-alive deltas)."""
    loop = asyncio.get_running_loop()
    before = await asyncio.to_thread(counters.read)
    asked = (await sup.health_status()).keepalives
    t0 = loop.time()
    await asyncio.sleep(WINDOW)  # the interval traffic is counted over, not a wait for an event
    elapsed = loop.time() - t0
    after = await asyncio.to_thread(counters.read)
    asked_after = (await sup.health_status()).keepalives
    datagrams = {k: after[k] - before.get(k, 0) for k in after}
    kinds = {k: asked_after[k] - asked.get(k, 0) for k in asked_after}
    return elapsed, datagrams, kinds


class _Echo:
    """One echo stream: what was written is kept, what came back is compared at the end."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.sent = bytearray()
        self.received = bytearray()
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read(), name="echo-reader")

    @classmethod
    async def open(cls, conn: Connection) -> _Echo:
        return cls(await conn.open_stream())

    async def _read(self) -> None:
        try:
            while chunk := await self.stream.read(65536):
                self.received += chunk
                self._changed.set()
        finally:
            self._changed.set()

    async def send(self, data: bytes) -> None:
        self.sent += data
        await self.stream.write(data)

    async def echoed(self, timeout: float) -> None:
        """Wait until everything sent so far came back."""
        async with asyncio.timeout(timeout):
            while len(self.received) < len(self.sent):
                if self._reader.done():
                    self._reader.result()
                    raise AssertionError(f"echo ended at {len(self.received)}/{len(self.sent)}")
                self._changed.clear()
                await self._changed.wait()

    async def finish(self, timeout: float) -> int:
        """FIN, wait for the echo's FIN, and check every byte (order included)."""
        await self.stream.close()
        async with asyncio.timeout(timeout):
            await self._reader
        assert len(self.received) == len(self.sent), (len(self.received), len(self.sent))
        assert self.received == self.sent, "echoed bytes differ from the bytes sent"
        return len(self.sent)

    async def abort(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


def _failovers(log: EventLog) -> list[EvtConnectionMigrationCompleted]:
    return [
        e
        for e in log.of(EvtConnectionMigrationCompleted)
        if isinstance(e, EvtConnectionMigrationCompleted) and e.reason == "failover"
    ]


def _on(conn: Connection, ip: str) -> bool:
    return str(conn.as_migratable().active_path().local_addr).startswith(f"/ip4/{ip}/")


# ---- 1. 200 connections: group traffic, then link A black-holed ------------------------------


async def test_200_connections_probe_per_group_and_all_fail_over_on_blackhole(
    topo: TwoPathTopology, server: RigServer, cert: CertPair, counters: UdpCounters
) -> None:
    net0, net1 = topo.paths
    loop = asyncio.get_running_loop()
    async with Supervisor(
        enable_experimental_connection_migration=True, failover=_policy(None)
    ) as sup:
        t0 = loop.time()
        conns = await _dial_node(sup, topo, server, cert, N)
        dial_s = loop.time() - t0
        await _settled(sup, N)
        status = await sup.health_status()
        # Two groups whatever N is: every active path shares (net0 address, server), every
        # standby path (net1 address, server). Active paths are members too (asked by PING).
        assert (status.groups, status.members) == (2, 2 * N), status
        assert _group_members(sup, GroupKey(net0.client_v4, topo.SERVER_V4)) == N
        assert _group_members(sup, GroupKey(net1.client_v4, topo.SERVER_V4)) == N
        assert status.verdicts == {}, status

        # ---- a. traffic per interval is proportional to groups, not paths
        elapsed, datagrams, asked = await _window(sup, counters)
        rounds = elapsed / INTERVAL
        link1 = counters.link(net1.client_if, datagrams)
        per_path = N * rounds  # the old design's challenges alone on net1 (no responses)
        # One group on net1: at most elapsed / (INTERVAL x (1 - JITTER)) + 1 questions (a late
        # timer only lowers it), two datagrams each; x4 leaves room for a confirmation round.
        ceiling = 4 * 1 * (rounds / (1 - JITTER) + 1) * 2 + 10
        print(
            f"\n[node-health-netns] N={N} dial_s={dial_s:.1f} window_s={elapsed:.2f} "
            f"datagrams={datagrams} asked={asked} per_path_would_be>={per_path:.0f} "
            f"ceiling={ceiling:.0f} lag_s={status.loop_lag_s}"
        )
        assert ceiling < per_path / 10  # the bound separates the designs by an order
        assert link1 <= ceiling, (link1, datagrams)
        # ... and the groups do probe: challenges went out on c1 and answers came back on it,
        # at least half of the rounds (a starved loop fires late, never early).
        c1 = net1.client_if
        answered = min(datagrams.get(f"out:{c1}", 0), datagrams.get(f"in:{c1}", 0))
        assert answered >= rounds / (1 + JITTER) / 2, datagrams
        assert asked.get("nat", 0) == 0, asked
        # Every question of the window came from the two groups' rotation.
        questions = asked.get("representative", 0) + asked.get("confirm", 0)
        assert 0 < questions <= 4 * 2 * (rounds / (1 - JITTER) + 1), asked

        # ---- b. net0 black-holed with bytes in flight: all move, every byte echoed
        async with event_log(
            sup, EvtConnectionMigrationCompleted, EvtConnectionMigrationFailed
        ) as log:
            echoes = [await _Echo.open(c) for c in conns]
            try:
                await asyncio.gather(*(e.send(os.urandom(BEFORE)) for e in echoes))
                await asyncio.gather(*(e.echoed(GUARD) for e in echoes))
                assert log.of(EvtConnectionMigrationCompleted) == [], "moved before the fault"
                assert all(_on(c, net0.client_v4) for c in conns)

                t_fault, wall_fault = loop.time(), time.time()
                fault = await asyncio.to_thread(topo.blackhole, 0)
                await asyncio.gather(*(e.send(os.urandom(AFTER)) for e in echoes))
                await log.wait_for(lambda: len(_failovers(log)) >= N, timeout=GUARD * 3)
                t_moved = loop.time()
                await asyncio.gather(*(e.echoed(GUARD) for e in echoes))
                sent = sum(await asyncio.gather(*(e.finish(GUARD) for e in echoes)))
            except BaseException:
                await asyncio.gather(*(e.abort() for e in echoes))
                raise
        moved = _failovers(log)
        after = await sup.health_status()
        failed = log.of(EvtConnectionMigrationFailed)
        print(
            f"[node-health-netns] failovers={len(moved)} failed_attempts={len(failed)} "
            f"first_s={min((e.time for e in moved), default=wall_fault) - wall_fault:.2f} "
            f"last_s={max((e.time for e in moved), default=wall_fault) - wall_fault:.2f} "
            f"all_moved_s={t_moved - t_fault:.2f} dropped={fault.dropped()} bytes={sent} "
            f"verdicts={after.verdicts} asked={after.keepalives}"
        )
        assert len(moved) == N, len(moved)
        assert len({e.conn_id for e in moved}) == N  # each connection once
        assert all(str(e.to_local_addr).startswith(f"/ip4/{net1.client_v4}/") for e in moved)
        assert all(_on(c, net1.client_v4) and not c.is_closed for c in conns)
        assert sent == N * (BEFORE + AFTER)
        assert after.verdicts.get("dead", 0) >= 1, after  # net0's group was judged dead
        fault.close()
        for conn in conns:
            await conn.close()


# ---- 2. NAT keep-alives: per standby path -----------------------------------------------------

N_NAT = 50
NAT = 1.0  # seconds: a short NAT period, so a window holds a few per path


async def test_nat_keepalives_are_per_standby_path(
    topo: TwoPathTopology, server: RigServer, cert: CertPair, counters: UdpCounters
) -> None:
    """With NAT keep-alives on, net1 carries one keep-alive per standby path and NAT period (a
    NAT binding is per 5-tuple: this duty cannot be shared), on top of the group's probes;
    the keep-alives ask for nothing back."""
    net1 = topo.paths[1]
    async with Supervisor(
        enable_experimental_connection_migration=True, failover=_policy(NAT)
    ) as sup:
        conns = await _dial_node(sup, topo, server, cert, N_NAT)
        await _settled(sup, N_NAT)
        elapsed, datagrams, asked = await _window(sup, counters)
        link1 = counters.link(net1.client_if, datagrams)
        nat = asked.get("nat", 0)
        print(
            f"\n[node-health-netns] N={N_NAT} nat_s={NAT} window_s={elapsed:.2f} "
            f"datagrams={datagrams} asked={asked}"
        )
        # Each standby path: one NAT question per NAT x (1 +/- JITTER) s, skipped when the
        # rotation asked it meanwhile (rare: it asks one of 50 per INTERVAL). Half of the
        # fewest that fit in the window, for a loop that fires late.
        least = N_NAT * (elapsed / (NAT * (1 + JITTER)) - 1) / 2
        most = N_NAT * (elapsed / (NAT * (1 - JITTER)) + 1)
        assert least <= nat <= most, (least, nat, most, asked)
        # On the wire, all on net1 (standby paths only): the keep-alives go out and nothing
        # comes back for them (a NAT binding needs outbound bytes; they ask nothing), so what
        # comes in on net1 is the group's answers alone.
        out1, in1 = (
            datagrams.get(f"out:{net1.client_if}", 0),
            datagrams.get(f"in:{net1.client_if}", 0),
        )
        assert out1 >= nat, datagrams
        rounds = elapsed / INTERVAL / (1 - JITTER) + 1  # the most the one net1 group asks
        assert in1 <= 2 * rounds + 5, (in1, rounds, datagrams)
        # Proportional to paths: far above what the group alone puts on net1 (a question and
        # its answer per round).
        assert link1 > 2 * 2 * rounds, (link1, rounds)
        for conn in conns:
            await conn.close()
