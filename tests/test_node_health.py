"""NodeHealth, the I/O shell of the node's health machinery, on a real loop with fake members.

The cores (Scheduler, HealthGroups, LagMeter) are tested on a fake clock elsewhere; here: the one
loop timer runs their deadlines, group commands reach the connections that own the paths,
verdicts fan out, and a question that could not be sent proves nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

from actors.health import HealthConfig, Verdict
from actors.health_groups import GroupKey, ProbeReason
from actors.node_health import NodeHealth, RunDelay
from tests.rig.busy import busy_processes

A = GroupKey("192.0.2.10", "198.51.100.1")
B = GroupKey("192.0.2.11", "198.51.100.1")
FAST = HealthConfig(keepalive_interval=0.02, jitter=0.1, failures_to_fail=2, min_wait=0.01)


@dataclass
class Member:
    """A connection as the groups see it: answers at once unless ``silent``."""

    health: NodeHealth
    conn_id: str
    silent: set[int] = field(default_factory=set)
    sendable: bool = True
    asked: list[tuple[int, ProbeReason]] = field(default_factory=list)
    verdicts: list[tuple[int, Verdict]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    flushed: int = 0

    def health_probe(self, path_id: int, reason: ProbeReason) -> bool:
        self.asked.append((path_id, reason))
        self.changed.set()
        if not self.sendable:
            return False
        if path_id not in self.silent:
            asyncio.get_running_loop().call_soon(self.health.answered, self.conn_id, path_id, 0.001)
        return True

    def health_verdict(self, path_id: int, verdict: Verdict) -> None:
        self.verdicts.append((path_id, verdict))
        self.changed.set()

    def health_queued(self, path_id: int) -> bool:
        return False

    def flush(self) -> None:
        self.flushed += 1


async def until(members: list[Member], predicate: object, timeout: float = 10.0) -> None:
    assert callable(predicate)
    async with asyncio.timeout(timeout):
        while not predicate():
            waits = [asyncio.ensure_future(m.changed.wait()) for m in members]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            for m in members:
                m.changed.clear()


def join_all(health: NodeHealth, members: list[Member], key_of: object, paths: int) -> None:
    assert callable(key_of)
    for m in members:
        health.register(m.conn_id, m)
        for path_id in range(paths):
            health.join(m.conn_id, path_id, key_of(m, path_id), nat=False, failed=False)


async def test_deadlines_run_in_order_on_one_timer_and_a_failing_one_stops_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    health = NodeHealth()
    ran: list[str] = []
    done = asyncio.Event()

    def boom() -> None:
        ran.append("boom")
        raise RuntimeError("a connection's bug")

    def last() -> None:
        ran.append("c")
        done.set()

    now = health.clock()
    health.schedule("c", now + 0.03, last)
    health.schedule("a", now + 0.01, lambda: ran.append("a"))
    health.schedule("b", now + 0.02, boom)
    health.schedule("x", now + 0.015, lambda: ran.append("x"))
    health.cancel("x")
    with caplog.at_level(logging.ERROR):
        async with asyncio.timeout(5):
            await done.wait()
    assert ran == ["a", "boom", "c"]
    assert "a connection's bug" in caplog.text
    assert health.status().timers == 0
    health.close()


async def test_one_probe_per_group_and_interval_and_the_dead_verdict_fans_out() -> None:
    """Two groups of 20 paths: questions go one at a time per group, in rotation; when every
    path of group A falls silent, A's verdict reaches all 20 (and nothing of B's)."""
    health = NodeHealth(FAST, rng=random.Random(3))
    members = [Member(health, f"c{i}") for i in range(20)]
    join_all(health, members, lambda m, p: A if p == 0 else B, paths=2)
    assert health.status().groups == 2 and health.status().members == 40

    def asked() -> int:
        return sum(len(m.asked) for m in members)

    await until(members, lambda: asked() >= 40)
    per_path: dict[tuple[str, int], int] = {}
    for m in members:
        for path_id, _ in m.asked:
            per_path[(m.conn_id, path_id)] = per_path.get((m.conn_id, path_id), 0) + 1
    assert max(per_path.values()) <= 2  # rotation: nobody is asked twice before a round ends
    assert all(v == [] for v in (m.verdicts for m in members))

    for m in members:
        m.silent.add(0)  # link A goes silent
    await until(members, lambda: all((0, Verdict.DEAD) in m.verdicts for m in members))
    assert all(p == 0 for m in members for p, _ in m.verdicts)  # B untouched
    assert health.status().verdicts == {"dead": 1}

    for m in members:
        m.silent.clear()  # back: the rotation goes on, one answer revives the whole group
    await until(members, lambda: all((0, Verdict.ALIVE) in m.verdicts for m in members))
    assert health.status().verdicts == {"dead": 1, "alive": 1}
    assert health.status().keepalives["representative"] >= 40
    health.close()


async def test_a_question_that_cannot_be_sent_proves_nothing() -> None:
    """No spare CID, a closing connection: the probe is withdrawn, never counted as a miss."""
    health = NodeHealth(FAST)
    member = Member(health, "c0", sendable=False)
    join_all(health, [member], lambda m, p: A, paths=1)
    await until([member], lambda: len(member.asked) >= 10)
    assert member.verdicts == []
    assert health.status().keepalives == {}
    assert health.verdict("c0", 0) is Verdict.ALIVE
    health.close()


async def test_nat_keepalives_go_to_standby_members_only() -> None:
    config = HealthConfig(keepalive_interval=3600, nat_keepalive=0.02, jitter=0.1)
    health = NodeHealth(config)
    member = Member(health, "c0")
    health.register("c0", member)
    health.join("c0", 0, A, nat=False, failed=False)  # the active path
    health.join("c0", 1, A, nat=True, failed=False)  # a standby path
    await until([member], lambda: sum(r is ProbeReason.NAT for _, r in member.asked) >= 5)
    assert {p for p, r in member.asked if r is ProbeReason.NAT} == {1}
    health.leave("c0", 1)
    assert health.status().members == 1
    health.close()


def _spin(seconds: float) -> None:
    """Want the CPU for ``seconds`` (a callback doing work, not sleeping)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


_SCHEDSTAT = os.path.exists("/proc/thread-self/schedstat")


@pytest.mark.skipif(not _SCHEDSTAT, reason="no /proc/thread-self/schedstat")
async def test_lag_is_the_time_the_loop_waited_for_a_cpu_not_the_time_it_was_busy() -> None:
    """A loop late because its own callbacks ran (busy, or a blocking bug) could read its
    sockets right after: no lag, what came meanwhile is read before any judgement. A loop
    kept off the CPU by other processes (3 CPU burners on 2 cores) could not: that time,
    the thread's run-queue wait, is lag, which silence judgements discount."""

    async def spin_then_look(health: NodeHealth, seconds: float) -> float:
        """Spin in a deadline, then let the next one measure; the run-queue wait meanwhile."""
        done = asyncio.Event()
        before = run_delay() or 0.0
        now = health.clock()
        health.schedule("spin", now, lambda: _spin(seconds))
        health.schedule("after", now + 0.01, done.set)
        async with asyncio.timeout(10):
            await done.wait()
        return (run_delay() or 0.0) - before

    run_delay = RunDelay()
    health = NodeHealth()
    waited = await spin_then_look(health, 0.3)
    # Late by 0.3 s, but only what the kernel made it wait (~0 on a quiet host) is lag.
    assert health.status().loop_lag_s <= waited + 0.02
    with busy_processes(3) as burners:
        assert burners.running() == 3
        lag_before = health.status().loop_lag_s
        waited = await spin_then_look(health, 0.6)
    assert waited > 0.05  # 4 spinners on 2 cores: ~0.3 s
    assert health.status().loop_lag_s - lag_before >= waited / 2
    health.close()
    run_delay.close()


async def test_a_deadline_already_past_is_no_lag() -> None:
    """A deadline in the past when it was scheduled (a rescheduled keep-alive, a backlog) runs
    at once and is no stall of the loop. It was counted as one (seconds of phantom lag,
    discounted from every silence: a black-holed path was never judged dead; bench B4)."""
    health = NodeHealth()
    done = asyncio.Event()
    health.schedule("long ago", health.clock() - 5.0, done.set)
    async with asyncio.timeout(5):
        await done.wait()
    assert health.status().loop_lag_s < 1.0  # not the 5 s the deadline was behind
    health.close()


async def test_unregistered_connections_leave_their_groups() -> None:
    health = NodeHealth(FAST)
    members = [Member(health, f"c{i}") for i in range(3)]
    join_all(health, members, lambda m, p: A, paths=2)
    health.unregister("c1", [0, 1])
    assert health.status().members == 4
    await until(members, lambda: sum(len(m.asked) for m in members) >= 8)
    assert members[1].asked == []  # it left before the first question
    health.close()
    assert health.status().groups == 1


async def test_flushes_of_a_turn_are_one_batch_and_one_per_connection() -> None:
    """Hundreds of connections with something to send in one turn cost one loop callback
    (a connection asks at most once per turn: its own flag), and a failing one stops
    nothing."""
    health = NodeHealth()
    members = [Member(health, f"c{i}") for i in range(300)]
    loop = asyncio.get_running_loop()
    scheduled = 0
    original = loop.call_soon

    def counting(callback: Any, *args: Any, **kwargs: Any) -> asyncio.Handle:
        nonlocal scheduled
        scheduled += 1
        return original(callback, *args, **kwargs)

    class Broken(Member):
        def flush(self) -> None:
            raise RuntimeError("a bug in one connection")

    broken = Broken(health, "broken")
    loop.call_soon = counting  # type: ignore[method-assign,assignment]
    try:
        health.flush_soon(broken)
        for m in members:
            health.flush_soon(m)
    finally:
        loop.call_soon = original  # type: ignore[method-assign]
    assert scheduled == 1
    done = loop.create_future()
    loop.call_soon(done.set_result, None)  # runs after the batch (FIFO within a turn)
    await done
    assert [m.flushed for m in members] == [1] * 300


def _schedstat_files() -> list[str]:
    """The schedstat files this process holds open (their /proc/<pid>/task/<tid>/ paths)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.endswith("/schedstat"):
                out.append(target)
    return out


@pytest.mark.skipif(not _SCHEDSTAT, reason="no /proc/thread-self/schedstat")
def test_run_delay_keeps_one_file_open_per_thread_and_closes_it() -> None:
    """The schedstat file stays open between reads (re-read with pread), is the calling
    thread's own (another thread gets its own file, not the first thread's figures), and
    close() releases it: a closed supervisor leaves no descriptor behind."""
    others = Counter(_schedstat_files())  # other tests' NodeHealth instances, not closed yet

    def opened() -> list[str]:
        return list((Counter(_schedstat_files()) - others).elements())

    mine = f"/task/{threading.get_native_id()}/schedstat"
    run_delay = RunDelay()
    first = run_delay()
    assert first is not None
    assert len(opened()) == 1 and opened()[0].endswith(mine)
    _spin(0.02)
    assert (run_delay() or 0.0) >= first  # a counter: never goes back
    assert len(opened()) == 1  # the same file, re-read
    seen: list[tuple[float | None, list[str], int]] = []

    def in_worker() -> None:
        seen.append((run_delay(), opened(), threading.get_native_id()))

    worker = threading.Thread(target=in_worker)
    worker.start()
    worker.join()
    value, files, tid = seen[0]
    assert value is not None
    assert len(files) == 1 and files[0].endswith(f"/task/{tid}/schedstat")
    assert run_delay() is not None
    assert len(opened()) == 1 and opened()[0].endswith(mine)  # back to this thread's own
    run_delay.close()
    run_delay.close()  # twice is harmless
    assert opened() == []
