"""Network-fault suite: automatic failover over real links (issue 4, item 4).

Topology (tests/rig/netns.py, `TwoPathTopology`): a client namespace with two veth links (net0
c0 10.77.1.2, net1 c1 10.77.2.2) to a server namespace holding the server address 10.77.0.1 on
its loopback; per-path source routing. The aioquic echo server and every client socket are
created inside their namespace and handed over with ``sock=``; one event loop drives both ends.
Everything is created and deleted per test (even on failure); no traffic leaves the namespaces.

Each scenario runs a checksummed bidirectional echo stream (`ChecksummedStream`) through the
fault and checks that no byte was lost or reordered. The failover stall (largest gap between
two consecutive echo deliveries around the fault) is printed and appended to
``bench/results/fault_suite.json`` (``QS_FAULT_RESULTS`` overrides); ``python -m
bench.fault_stalls`` summarises it. No timing is asserted here: figures are recorded.

Faults: ``ip link set down`` on the client side (sends fail with ENETUNREACH), nftables drops
(black hole, random loss on the receiving side), an NFQUEUE userspace delayer (delay), nftables
source NAT + ``conntrack -F`` (NAT rebinding).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest

from actors.path_state import PathState
from supervisor import FailoverPolicy, Supervisor
from supervisor.core.errors import MigrationRolledBackError, PathNotValidatedError
from supervisor.core.events import (
    Event,
    EvtConnectionMigrationCompleted,
    EvtConnectionMigrationFailed,
    EvtConnectionMigrationStarted,
    EvtPathRemoved,
    EvtPathStateChanged,
)
from supervisor.core.handles import Connection
from supervisor.core.handles import Path as QPath
from tests.rig.aioquic_server import ConnectionInfo, RigServer
from tests.rig.busy import Busy, busy_processes
from tests.rig.certs import CertPair
from tests.rig.faults import SnatRebinder, delay_unavailable, nat_unavailable, nfq_delay
from tests.rig.netns import Filters, TwoPathTopology
from tests.support import (
    ChecksummedStream,
    EventLog,
    TimedStream,
    connection_actor,
    event_log,
    fd_count,
    other_tasks,
    supervisor_actor,
)

pytest_plugins = ["tests.rig.fixtures"]

pytestmark = pytest.mark.netns

#: Fast, but not twitchy: standby keep-alives every 0.2 s (jittered), two unanswered ones fail a
#: standby path; the active path is dead after 3 PTOs (at least 0.1 s) of silence while data
#: is outstanding, at once on ENETUNREACH.
FAST = FailoverPolicy(keepalive_interval=0.2, failures_to_fail=2, hysteresis=0.5)
#: Waits of the tests themselves: generous guards, never the thing measured.
GUARD = 15.0
RESULTS = Path(
    os.environ.get(
        "QS_FAULT_RESULTS",
        Path(__file__).resolve().parent.parent / "bench/results/fault_suite.json",
    )
)


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def topo(rig_topology_v4: TwoPathTopology) -> TwoPathTopology:
    """The rig's IPv4 two-path topology (tests/rig/fixtures.py)."""
    return rig_topology_v4


@pytest.fixture
def server(rig_server_in_topology: RigServer) -> RigServer:
    """The rig's echo server on 10.77.0.1 in the server namespace."""
    return rig_server_in_topology


@pytest.fixture
def busy(request: pytest.FixtureRequest) -> Iterator[Busy]:
    """``request.param`` CPU-burning processes beside the test (tests/rig/busy.py), stopped
    and reaped afterwards: a host short of CPU (issue 13)."""
    with busy_processes(request.param) as procs:
        yield procs


# ---- helpers -----------------------------------------------------------------------------------


def _supervisor(policy: FailoverPolicy = FAST) -> Supervisor:
    return Supervisor(enable_experimental_connection_migration=True, failover=policy)


async def _dial(
    sup: Supervisor, server: RigServer, sock: socket.socket, cert: CertPair, **kw: Any
) -> Connection:
    return await sup.dial(
        f"/ip4/{server.host}/udp/{server.port}/quic-v1",
        alpn_protocols=["echo"],
        cafile=str(cert.certfile),
        sock=sock,
        **kw,
    )


async def _two_paths(
    sup: Supervisor, topo: TwoPathTopology, server: RigServer, cert: CertPair, **kw: Any
) -> tuple[Connection, QPath, QPath]:
    """A connection dialled on net0 with a validated standby path on net1."""
    conn = await _dial(sup, server, topo.client_socket(0), cert, **kw)
    mc = conn.as_migratable()
    second = await mc.add_path(sock=topo.client_socket(1))
    await second.probe(timeout=5.0)
    first = next(p for p in mc.paths() if p.path_id != second.path_id)
    return conn, first, second


def _addr(path: QPath) -> str:
    return str(path.info().local_addr)


def _port(path: QPath) -> int:
    return int(_addr(path).split("/")[4])


def _record(scenario: str, **figures: Any) -> None:
    """Print the figures and append them to the results file (one JSON list, locked)."""
    entry = {"scenario": scenario, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **figures}
    print(f"\n[fault-suite] {json.dumps(entry)}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        text = fh.read()
        runs = json.loads(text) if text.strip() else []
        runs.append(entry)
        fh.seek(0)
        fh.truncate()
        json.dump(runs, fh, indent=1)
        fh.write("\n")


E = TypeVar("E", bound=Event)


def _of(log: EventLog, kind: type[E]) -> list[E]:
    return [e for e in log.events if isinstance(e, kind)]


def _completed(log: EventLog, reason: str | None = None) -> list[EvtConnectionMigrationCompleted]:
    return [
        e for e in _of(log, EvtConnectionMigrationCompleted) if reason is None or e.reason == reason
    ]


def _state_changes(log: EventLog, path: QPath) -> list[tuple[PathState, PathState]]:
    addr = path.info().local_addr
    return [(e.old, e.new) for e in _of(log, EvtPathStateChanged) if e.local_addr == addr]


def _peer_is(conn: ConnectionInfo, addr: tuple[str, int]) -> bool:
    return conn.current_peer() == addr


async def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for a condition that no event signals (kernel or handle state), with a deadline."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
    assert predicate(), what


async def _failover_under(
    fault: Callable[[], Awaitable[object]],
    scenario: str,
    topo: TwoPathTopology,
    server: RigServer,
    cert: CertPair,
) -> None:
    """Scenarios 1 and 2: a fault on the active path (net0) mid-transfer -> automatic failover
    to the standby (net1); the stall is recorded."""
    loop = asyncio.get_running_loop()
    async with _supervisor() as sup:
        conn, first, second = await _two_paths(sup, topo, server, cert)
        mc = conn.as_migratable()
        async with event_log(
            sup, EvtConnectionMigrationStarted, EvtConnectionMigrationCompleted, EvtPathStateChanged
        ) as log:
            stream = TimedStream(conn)
            await stream.start()
            try:
                await stream.advance(512 * 1024, timeout=GUARD)
                pto = connection_actor(conn).quic.probe_timeout()  # test-only introspection
                t_fault, wall_fault = loop.time(), time.time()
                await fault()
                await log.wait_for(lambda: _completed(log), timeout=GUARD)
                (done,) = _completed(log)
                assert done.reason == "failover"
                assert done.to_local_addr == second.info().local_addr
                await stream.advance(512 * 1024, timeout=GUARD)  # flowing again, on net1
                t_end = loop.time()
                sent = await stream.finish(timeout=GUARD)
            except BaseException:
                await stream.abort()
                raise
        assert mc.active_path().local_addr == second.info().local_addr
        assert first.info().state is PathState.FAILED
        (started,) = log.of(EvtConnectionMigrationStarted)
        degraded = next(
            e.time for e in _of(log, EvtPathStateChanged) if e.new is PathState.DEGRADED
        )
        _record(
            scenario,
            stall_s=round(stream.max_gap(t_fault, t_end), 4),
            pto_s=round(pto, 4),
            degraded_s=round(degraded - wall_fault, 4),
            detect_s=round(started.time - wall_fault, 4),
            switch_s=round(done.time - started.time, 4),
            bytes=sent,
            states=[f"{o.value}->{n.value}" for o, n in _state_changes(log, first)],
        )
        await conn.close()


# ---- 1. active link down mid-transfer ----------------------------------------------------------


async def test_active_link_down_fails_over(
    topo: TwoPathTopology, server: RigServer, cert: CertPair
) -> None:
    """Client side ``ip link set down c0``: sends on net0 fail with ENETUNREACH (immediate
    evidence), the policy moves to net1, resending what net0 had in flight."""

    async def fault() -> None:
        await asyncio.to_thread(topo.link_down, 0)

    await _failover_under(fault, "link_down", topo, server, cert)


# ---- 2. active path black-holed ----------------------------------------------------------------


async def test_blackholed_active_path_fails_over(
    topo: TwoPathTopology, server: RigServer, cert: CertPair
) -> None:
    """nftables drops everything on net0 at both receiving ends, link up: no error anywhere,
    only silence while data is outstanding (dead after 3 PTOs, at least 0.1 s)."""

    async def fault() -> None:
        await asyncio.to_thread(topo.blackhole, 0)

    await _failover_under(fault, "blackhole", topo, server, cert)


# ---- 3. random loss, 200 migrations ------------------------------------------------------------

MIGRATIONS = 200


async def test_random_loss_on_both_paths_200_migrations(
    topo: TwoPathTopology, server: RigServer, cert: CertPair
) -> None:
    """5 % random loss on both links, in both directions (nft numgen on each receiving side),
    while 200 manual switches go back and forth under a running stream. A switch whose
    confirmation was lost rolls back (no byte lost either way) and is retried; rollbacks are
    counted and reported."""
    loop = asyncio.get_running_loop()
    # Three unanswered keep-alives in a row fail a standby path (at 10 % round-trip loss, two
    # would happen every ~100 keep-alives; a failed target is re-probed below anyway).
    policy = FailoverPolicy(keepalive_interval=0.2, failures_to_fail=3, hysteresis=0.5)
    async with _supervisor(policy) as sup:
        conn, first, second = await _two_paths(sup, topo, server, cert)
        mc = conn.as_migratable()
        drops = Filters(
            [
                topo.random_drop(path, 0.05, side=side)
                for path in (0, 1)
                for side in ("client", "server")
            ]
        )
        done = rollbacks = reprobes = 0
        async with event_log(sup, EvtConnectionMigrationCompleted) as log:
            stream = await ChecksummedStream(conn).start()
            t0 = loop.time()
            try:
                await stream.advance(256 * 1024, timeout=GUARD)
                for _ in range(MIGRATIONS * 3):  # bounded: retries included
                    if done >= MIGRATIONS:
                        break
                    active = mc.active_path().local_addr
                    target = first if second.info().local_addr == active else second
                    try:
                        async with asyncio.timeout(GUARD):
                            if target.info().state is PathState.FAILED:
                                reprobes += 1
                                await target.probe(timeout=5.0)
                            await target.switch()
                    except MigrationRolledBackError:
                        rollbacks += 1
                        continue
                    except PathNotValidatedError:  # failed between the check and the switch
                        reprobes += 1
                        continue
                    done += 1
                    await stream.advance(16 * 1024, timeout=GUARD)  # echoed over the new path
                elapsed = loop.time() - t0
                await log.wait_for(lambda: len(_completed(log, "manual")) >= done, GUARD)
                await stream.advance(256 * 1024, timeout=GUARD)
                sent = await stream.finish(timeout=GUARD * 2)
            except BaseException:
                await stream.abort()
                raise
        manual = len(_completed(log, "manual"))
        failovers = len(_completed(log, "failover"))
        assert done == manual >= MIGRATIONS, (done, manual, rollbacks)
        _record(
            "loss_200_migrations",
            migrations=manual,
            failovers=failovers,
            rollbacks=rollbacks,
            reprobes=reprobes,
            dropped_datagrams=drops.dropped(),
            seconds=round(elapsed, 2),
            bytes=sent,
        )
        await conn.close()


# ---- 4. added delay on one path ----------------------------------------------------------------

DELAY = 0.030


async def test_delayed_path_rtt_reflects_delay_and_policy_prefers_fast_path(
    topo: TwoPathTopology, server: RigServer, cert: CertPair
) -> None:
    """net1's outgoing datagrams are held 30 ms by an NFQUEUE userspace delayer in the client
    namespace. Three paths: active A (net0), standbys B (net0, another port) and C (net1,
    delayed). C's RTT estimate is >= 30 ms, B's is not; the failover candidates are ordered B, C;
    black-holing A (by port) fails over to B."""
    reason = delay_unavailable()
    if reason:
        pytest.skip(reason)
    with nfq_delay(topo.client, topo.paths[1].client_if, DELAY):
        async with _supervisor() as sup:
            conn = await _dial(sup, server, topo.client_socket(0), cert)
            mc = conn.as_migratable()
            fast = await mc.add_path(sock=topo.client_socket(0))
            slow = await mc.add_path(sock=topo.client_socket(1))
            await fast.probe(timeout=5.0)
            await slow.probe(timeout=5.0)
            active = next(p for p in mc.paths() if p.path_id not in (fast.path_id, slow.path_id))
            async with event_log(sup, EvtConnectionMigrationCompleted) as log:
                stream = TimedStream(conn)
                await stream.start()
                try:
                    await stream.advance(256 * 1024, timeout=GUARD)
                    # A few keep-alives have fed the EWMA by now; it must still be above the delay.
                    slow_rtt, fast_rtt = slow.info().rtt, fast.info().rtt
                    assert slow_rtt is not None and fast_rtt is not None
                    assert slow_rtt >= DELAY, slow_rtt
                    assert fast_rtt < DELAY, fast_rtt
                    policy = supervisor_actor(sup).policy
                    view = policy.port.view(conn.conn_id)
                    order = [p.path_id for p in policy.candidates(conn.conn_id, view)]
                    assert order == [fast.path_id, slow.path_id], order

                    # Kill A only (its port, both directions, receiving sides): B and C live.
                    port = _port(active)
                    net0 = topo.paths[0]
                    srv_in = topo.server.nft_table()
                    srv_in.add("input", f"ip saddr {net0.client_v4} udp sport {port} drop")
                    cli_in = topo.client.nft_table()
                    cli_in.add("input", f"ip daddr {net0.client_v4} udp dport {port} drop")
                    await log.wait_for(lambda: _completed(log), timeout=GUARD)
                    (done,) = _completed(log)
                    assert done.reason == "failover"
                    assert done.to_local_addr == fast.info().local_addr, done
                    await stream.advance(256 * 1024, timeout=GUARD)
                    sent = await stream.finish(timeout=GUARD)
                except BaseException:
                    await stream.abort()
                    raise
            _record(
                "delay",
                added_delay_s=DELAY,
                slow_rtt_s=round(slow_rtt, 4),
                fast_rtt_s=round(fast_rtt, 4),
                bytes=sent,
            )
            await conn.close()


# ---- 5. standby link down, then up -------------------------------------------------------------


async def test_standby_link_down_is_failed_never_used_then_standby_again(
    topo: TwoPathTopology, server: RigServer, cert: CertPair
) -> None:
    async with _supervisor() as sup:
        conn, first, second = await _two_paths(sup, topo, server, cert)
        mc = conn.as_migratable()
        async with event_log(
            sup, EvtPathStateChanged, EvtConnectionMigrationStarted, EvtConnectionMigrationFailed
        ) as log:
            stream = await ChecksummedStream(conn).start()
            try:
                await stream.advance(256 * 1024, timeout=GUARD)
                await asyncio.to_thread(topo.link_down, 1)
                await log.wait_for(
                    lambda: (PathState.STANDBY, PathState.FAILED) in _state_changes(log, second),
                    timeout=GUARD,
                )
                assert second.info().state is PathState.FAILED
                await stream.advance(256 * 1024, timeout=GUARD)  # unaffected, on net0
                await asyncio.to_thread(topo.link_up, 1)
                await log.wait_for(lambda: second.info().state is PathState.STANDBY, timeout=GUARD)
                await stream.advance(256 * 1024, timeout=GUARD)
                sent = await stream.finish(timeout=GUARD)
            except BaseException:
                await stream.abort()
                raise
        changes = _state_changes(log, second)
        # Never switched to, never even tried: the active path stayed healthy throughout.
        assert log.of(EvtConnectionMigrationStarted) == []
        assert log.of(EvtConnectionMigrationFailed) == []
        assert mc.active_path().local_addr == first.info().local_addr
        assert all(new is not PathState.ACTIVE for _old, new in changes)
        assert changes[-1] == (PathState.VALIDATING, PathState.STANDBY), changes
        _record(
            "standby_link_down", states=[f"{o.value}->{n.value}" for o, n in changes], bytes=sent
        )
        await conn.close()


# ---- 6. flapping active link -------------------------------------------------------------------

FLAP_PERIOD = 0.2
FLAP_FOR = 5.0


async def _flap(topo: TwoPathTopology, path: int) -> int:
    """Toggle path ``path``'s client link every FLAP_PERIOD for FLAP_FOR seconds (a fault
    schedule: the sleeps are its timer); leaves the link up. Returns the number of toggles."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    toggles, down = 0, False
    while loop.time() - start < FLAP_FOR:  # bounded by the schedule
        await asyncio.to_thread(topo.link_up if down else topo.link_down, path)
        down = not down
        toggles += 1
        await asyncio.sleep(max(0.0, start + toggles * FLAP_PERIOD - loop.time()))
    if down:
        await asyncio.to_thread(topo.link_up, path)
    return toggles


async def test_flapping_active_link_causes_at_most_three_switches(
    topo: TwoPathTopology, server: RigServer, cert: CertPair
) -> None:
    """net0 (preferred) goes down/up every 200 ms for 5 s. Expected: one failover to net1 at
    the first down, no switch while net0 flaps (each state change restarts the 2 s hysteresis),
    one switch back once it has been up for 2 s."""
    prefer = f"/ip4/{topo.paths[0].client_v4}/udp/0/quic-v1"
    policy = FailoverPolicy(
        keepalive_interval=0.2, failures_to_fail=2, prefer=prefer, hysteresis=2.0
    )
    async with _supervisor(policy) as sup:
        conn, first, _second = await _two_paths(sup, topo, server, cert)
        mc = conn.as_migratable()
        async with event_log(sup, EvtConnectionMigrationCompleted, EvtPathStateChanged) as log:
            stream = await ChecksummedStream(conn).start()
            try:
                await stream.advance(256 * 1024, timeout=GUARD)
                toggles = await _flap(topo, 0)
                during = len(_completed(log))
                # After the flapping: back on the preferred path once it has been stable.
                await log.wait_for(
                    lambda: (
                        mc.active_path().local_addr == first.info().local_addr
                        and first.info().state is PathState.ACTIVE
                    ),
                    timeout=GUARD,
                )
                await stream.advance(256 * 1024, timeout=GUARD)
                sent = await stream.finish(timeout=GUARD)
            except BaseException:
                await stream.abort()
                raise
        switches = _completed(log)
        assert all(e.reason == "failover" for e in switches)
        assert len(switches) <= 3, [(str(e.to_local_addr), e.time) for e in switches]
        _record(
            "flapping",
            toggles=toggles,
            switches=len(switches),
            switches_during_flapping=during,
            net0_state_changes=len(_state_changes(log, first)),
            bytes=sent,
        )
        await conn.close()


# ---- 7. both links down ------------------------------------------------------------------------


async def test_both_links_down_closes_connection_and_leaks_nothing(
    topo: TwoPathTopology, server: RigServer, cert: CertPair
) -> None:
    """No usable path: the policy waits while the idle timeout (2 s) allows, then reports
    EvtConnectionMigrationFailed(connection_closed=True); every socket and task is released."""
    fds = fd_count()
    tasks = other_tasks()
    loop = asyncio.get_running_loop()
    async with _supervisor() as sup:
        conn, _first, _second = await _two_paths(sup, topo, server, cert, idle_timeout=2.0)
        async with event_log(sup, EvtConnectionMigrationFailed, EvtPathRemoved) as log:
            stream = await ChecksummedStream(conn).start()
            try:
                await stream.advance(256 * 1024, timeout=GUARD)
                t_fault = loop.time()
                await asyncio.to_thread(topo.link_down, 0)
                await asyncio.to_thread(topo.link_down, 1)
                await log.wait_for(
                    lambda: any(
                        e.connection_closed for e in _of(log, EvtConnectionMigrationFailed)
                    ),
                    timeout=GUARD,
                )
                t_closed = loop.time()
                await log.wait_for(lambda: len(log.of(EvtPathRemoved)) == 2, timeout=GUARD)
            finally:
                await stream.abort()
        assert conn.is_closed
        assert sup.connections() == []
        final = [e for e in _of(log, EvtConnectionMigrationFailed) if e.connection_closed]
        assert final[-1].reason == "failover"
    # The supervisor is closed: every socket it was handed and every task it started is gone.
    assert fd_count() == fds
    await _until(lambda: not (other_tasks() - tasks), 5.0, "tasks left behind")
    _record("both_links_down", closed_after_s=round(t_closed - t_fault, 3))


# ---- 8. NAT rebinding of the active path -------------------------------------------------------


async def test_nat_rebinding_of_active_path_is_survived(
    topo: TwoPathTopology, server: RigServer, cert: CertPair
) -> None:
    """Source NAT in the client namespace maps the connection's net0 socket to a new port,
    twice (rule swapped, conntrack flushed). The server sees a new client address, validates it
    (PATH_CHALLENGE, answered by the client on the same path) and moves there; the client does
    not migrate and no byte is lost."""
    reason = nat_unavailable()
    if reason:
        pytest.skip(reason)
    net0 = topo.paths[0]
    async with _supervisor() as sup:
        conn, first, _second = await _two_paths(sup, topo, server, cert)
        mc = conn.as_migratable()
        srv = await server.wait_connection()
        port = _port(first)
        async with event_log(sup, EvtConnectionMigrationStarted) as log:
            stream = await ChecksummedStream(conn).start()
            try:
                await stream.advance(256 * 1024, timeout=GUARD)
                with SnatRebinder(topo.client, net0.client_v4, port) as nat:
                    for new_port in (41000, 42000):
                        nat.rebind(new_port)
                        await server.wait_for(
                            partial(_peer_is, srv, (net0.client_v4, new_port)),
                            GUARD,
                            f"server moved to port {new_port}",
                        )
                        await stream.advance(256 * 1024, timeout=GUARD)
                        # The server validated the new address: our client answered its
                        # PATH_CHALLENGE (test-only look at the stock server's path list).
                        assert srv.quic._network_paths[0].is_validated
                sent = await stream.finish(timeout=GUARD)
            except BaseException:
                await stream.abort()
                raise
        assert log.of(EvtConnectionMigrationStarted) == []  # the client did not move
        assert mc.active_path().local_addr == first.info().local_addr
        assert not conn.is_closed
        assert {(net0.client_v4, 41000), (net0.client_v4, 42000)} <= srv.peer_addresses
        _record("nat_rebinding", rebinds=2, bytes=sent)
        await conn.close()


# ---- 9. drain of one interface with 20 connections ---------------------------------------------

DRAINED = 20


@pytest.mark.parametrize("busy", [0, 3], ids=["idle", "busy3"], indirect=True)
async def test_drain_of_one_interface_moves_20_connections(
    topo: TwoPathTopology, server: RigServer, cert: CertPair, busy: Busy
) -> None:
    """20 connections on net0, each with a validated standby on net1 and a running stream;
    draining net0's address moves all of them (reason drain), closes the drained paths, and
    every stream comes through intact. ``busy``: CPU-burning processes beside it from the
    dials until the drain is done (issue 13): none of the 20 may have moved on its own before
    the drain. They stop before the final check: echoing the ~1 MiB each stream has buffered
    (flow-control windows) takes 20-30 s of a quarter of the CPU, which is not what is tested.

    By address, not ``device="c0"``: the interfaces live in the client namespace, and drain
    resolves device names in the caller's namespace (pytest runs in the root one)."""
    net0, net1 = topo.paths
    loop = asyncio.get_running_loop()
    # Keep-alives as in FAST, but active-path silence judged over >= 1 s. With FAST itself
    # 0-1 of 20 connections still moved before the drain when another benchmark shared the 2
    # cores (0 with 3 busy processes beside it): the rig's server runs in this very event loop,
    # the 20 streams start at full speed, and its socket overflows: the silence is real
    # loss (probably), answered again 0.2 s later (counted as a suspect failover). Before the
    # starved-host judgement it was 1-18 of 20. This test is about drain.
    patient = FailoverPolicy(
        keepalive_interval=0.2, failures_to_fail=2, hysteresis=0.5, min_silence=1.0
    )
    async with _supervisor(patient) as sup:
        conns = []
        for _ in range(DRAINED):
            conn, _first, _second = await _two_paths(sup, topo, server, cert)
            conns.append(conn)
        async with event_log(sup, EvtConnectionMigrationCompleted) as log:
            streams = [await ChecksummedStream(c, seed=i).start() for i, c in enumerate(conns)]
            try:
                await asyncio.gather(*(s.advance(64 * 1024, timeout=GUARD * 2) for s in streams))
                t0 = loop.time()
                report = await sup.drain(local_addr=f"/ip4/{net0.client_v4}")
                took = loop.time() - t0
                assert report.counts == {"moved": DRAINED, "failed": 0, "untouched": 0}, report
                assert all(o.closed_drained for o in report.moved), report
                await asyncio.gather(*(s.advance(64 * 1024, timeout=GUARD * 2) for s in streams))
                busy.stop()
                sent = sum(await asyncio.gather(*(s.finish(timeout=GUARD * 2) for s in streams)))
            except BaseException:
                await asyncio.gather(*(s.abort() for s in streams))
                raise
        assert len(_completed(log, "drain")) == DRAINED
        for conn in conns:
            mc = conn.as_migratable()
            assert str(mc.active_path().local_addr).startswith(f"/ip4/{net1.client_v4}/")
            assert len(mc.available_paths()) == 1
        _record("drain_20", connections=DRAINED, busy=len(busy), drain_s=round(took, 3), bytes=sent)
        for conn in conns:
            await conn.close()
