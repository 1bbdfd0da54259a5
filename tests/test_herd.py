"""Herd control: limits, FIFO admission and cancellation (sans-I/O core and asyncio gate)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor import Supervisor
from supervisor.core.events import EvtConnectionMigrationCompleted, EvtConnectionMigrationStarted
from supervisor.core.messages import MigrationStats
from supervisor.orchestration.herd import HerdLimits, HerdQueue, MigrationGate
from tests.rig.aioquic_server import RigServer
from tests.support import dial_echo, event_log


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 3)), max_size=200),
    st.integers(1, 5),
    st.integers(1, 5),
)
def test_limits_hold_and_each_peer_is_served_in_arrival_order(
    ops: list[tuple[bool, int]], total: int, per_peer: int
) -> None:
    queue = HerdQueue(HerdLimits(in_flight=total, per_peer=per_peer))
    running: list[tuple[int, str]] = []
    arrived: dict[str, list[int]] = {}
    admitted: dict[str, list[int]] = {}
    ticket = 0

    def start(t: int, peer: str) -> None:
        running.append((t, peer))
        admitted.setdefault(peer, []).append(t)

    for is_request, x in ops:
        if is_request:
            peer = f"192.0.2.{x}"
            ticket += 1
            arrived.setdefault(peer, []).append(ticket)
            if queue.request(ticket, peer):
                start(ticket, peer)
        elif running:
            _, peer = running.pop(x % len(running))
            for t in queue.release(peer):
                start(t, next(p for p, ts in arrived.items() if t in ts))
        assert queue.in_flight == len(running) <= total
        per: dict[str, int] = {}
        for _, peer in running:
            per[peer] = per.get(peer, 0) + 1
        assert all(n <= per_peer for n in per.values())
        # Work-conserving: nobody waits while there is room for them.
        if queue.queued:
            assert len(running) == total or any(n == per_peer for n in per.values())
    while running:  # everyone is served in the end
        _, peer = running.pop(0)
        for t in queue.release(peer):
            start(t, next(p for p, ts in arrived.items() if t in ts))
    assert queue.queued == 0
    for peer, tickets in arrived.items():
        assert admitted[peer] == tickets  # FIFO per peer


def test_a_peer_at_its_limit_does_not_hold_back_another() -> None:
    queue = HerdQueue(HerdLimits(in_flight=4, per_peer=2))
    assert queue.request(1, "a") and queue.request(2, "a")
    assert not queue.request(3, "a")  # a is at its limit: queued
    assert queue.request(4, "b")  # b is not held back behind a's waiter
    assert queue.queued == 1 and queue.in_flight == 3
    assert queue.release("a") == [3]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8"])
def test_limits_reject_nonsense(bad: object) -> None:
    with pytest.raises(ValueError, match="in_flight"):
        HerdLimits(in_flight=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="per_peer"):
        HerdLimits(per_peer=bad)  # type: ignore[arg-type]


async def test_gate_queues_fifo_and_cancellation_leaks_no_slot() -> None:
    waits: list[float] = []
    gate = MigrationGate(HerdLimits(in_flight=1, per_peer=1), on_wait=waits.append)
    order: list[str] = []
    release = asyncio.Event()

    async def migrate(name: str) -> None:
        async with gate.slot("192.0.2.1"):
            order.append(name)
            await release.wait()

    first = asyncio.create_task(migrate("first"))
    await asyncio.sleep(0)  # let it take the slot (a turn, not a synchronisation)
    assert gate.in_flight == 1
    second = asyncio.create_task(migrate("second"))
    third = asyncio.create_task(migrate("third"))
    cancelled = asyncio.create_task(migrate("cancelled"))
    while gate.queued < 3:
        await asyncio.sleep(0)
    cancelled.cancel()  # gives up while queued: leaves the queue
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert gate.queued == 2
    release.set()
    await asyncio.wait_for(asyncio.gather(first, second, third), 5)
    assert order == ["first", "second", "third"]
    assert gate.in_flight == 0 and gate.queued == 0
    assert gate.waited == 2 and len(waits) == 2 and gate.max_queued == 3


async def test_a_waiter_cancelled_as_it_is_admitted_passes_the_slot_on() -> None:
    gate = MigrationGate(HerdLimits(in_flight=1, per_peer=1))
    hold = asyncio.Event()
    entered: list[str] = []

    async def migrate(name: str) -> None:
        async with gate.slot("192.0.2.1"):
            entered.append(name)
            await hold.wait()

    first = asyncio.create_task(migrate("first"))
    await asyncio.sleep(0)
    second = asyncio.create_task(migrate("second"))
    third = asyncio.create_task(migrate("third"))
    while gate.queued < 2:
        await asyncio.sleep(0)
    hold.set()
    while not first.done():  # its release admits "second": resolved, but not run yet
        await asyncio.sleep(0)
    second.cancel()  # cancelled in that very turn: the slot must go to "third"
    with pytest.raises(asyncio.CancelledError):
        await second
    await asyncio.wait_for(third, 5)
    assert entered == ["first", "third"]
    assert gate.in_flight == 0 and gate.queued == 0


async def test_a_drain_under_a_small_herd_limit_never_exceeds_it(echo: RigServer) -> None:
    """8 connections drained with 2 migrations allowed at once: every one moves, never more
    than 2 are between Started and Completed, and the waits are counted."""
    async with Supervisor(
        enable_experimental_connection_migration=True, herd=HerdLimits(in_flight=2, per_peer=2)
    ) as sup:
        for _ in range(8):
            conn = await dial_echo(sup, echo)
            second = await conn.as_migratable().add_path("/ip4/127.0.0.2/udp/0/quic-v1")
            await second.probe()
        async with event_log(
            sup, EvtConnectionMigrationStarted, EvtConnectionMigrationCompleted
        ) as log:
            report = await sup.drain(local_addr="/ip4/127.0.0.1", close_drained=False)
            await log.wait_for(lambda: len(log.of(EvtConnectionMigrationCompleted)) == 8)
        assert report.counts == {"moved": 8, "failed": 0, "untouched": 0}
        assert report.elapsed_s > 0
        running = peak = 0
        for evt in log.events:
            running += 1 if isinstance(evt, EvtConnectionMigrationStarted) else -1
            peak = max(peak, running)
        assert peak == 2
        stats = await sup.migration_stats()
        assert stats.completed == 8 and stats.in_flight == 0 and stats.queued == 0
        assert stats.waited >= 6 and stats.max_queued >= 1


async def test_supervisor_rejects_a_herd_that_is_not_herd_limits() -> None:
    with pytest.raises(TypeError, match="HerdLimits"):
        Supervisor(herd=64)  # type: ignore[arg-type]


def test_stats_summary_tells_operators_about_suspect_failovers_and_the_queue() -> None:
    quiet = MigrationStats(completed=3)
    assert quiet.summary() == "3 migrations, 3 completed (100.0%)"
    busy = MigrationStats(completed=3, suspect_failovers=1, in_flight=64, queued=900)
    assert busy.summary() == (
        "3 migrations, 3 completed (100.0%); 1 suspect failovers (path back within seconds); "
        "64 in flight, 900 queued"
    )
