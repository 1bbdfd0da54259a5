"""Event numbers and replay: every event carries ``seq``; ``subscribe(*types, since=seq)``
replays the events the bus kept after it, then the live ones, with no gap and no duplicate
between them (DESIGN §3), so a program that subscribes after ``await path.switch()`` never
hangs. The bus alone, then a real connection to a stock aioquic echo server on loopback.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path

import pytest
from multiaddr import Multiaddr

from actors.errors import InvalidArgumentError
from supervisor import Supervisor
from supervisor.core.events import (
    DEFAULT_RETAIN,
    Event,
    EventBus,
    EvtConnectionMigrationCompleted,
    EvtConnectionMigrationStarted,
    EvtPathAdded,
    Subscription,
)
from supervisor.core.messages import SwitchResult
from telemetry.journal import read_journal
from tests.rig.aioquic_server import RigServer
from tests.support import dial_echo

REMOTE = Multiaddr("/ip4/127.0.0.1/udp/4433/quic-v1")
LOCAL_A = Multiaddr("/ip4/127.0.0.1/udp/50000/quic-v1")
LOCAL_B = Multiaddr("/ip4/127.0.0.2/udp/50001/quic-v1")
SECOND = "/ip4/127.0.0.2/udp/0/quic-v1"


def added(i: int = 0) -> EvtPathAdded:
    return EvtPathAdded(f"c{i}", REMOTE, time.time(), LOCAL_B)


def completed(i: int = 0) -> EvtConnectionMigrationCompleted:
    return EvtConnectionMigrationCompleted(
        f"c{i}", REMOTE, time.time(), LOCAL_A, LOCAL_B, "manual", 0.001
    )


def queued(sub: Subscription) -> list[Event]:
    """What the subscription holds now (it is consumed)."""
    out = []
    while sub.pending:
        out.append(sub._queue.popleft())
    return out


# ------------------------------------------------------------------------------ numbering


def test_every_published_event_gets_the_next_seq() -> None:
    bus = EventBus()
    assert bus.seq == 0 and bus.retain == DEFAULT_RETAIN
    fresh = added(1)
    assert fresh.seq == 0  # not published
    out = [bus.publish(e) for e in (fresh, completed(2), added(3))]
    assert [e.seq for e in out if e is not None] == [1, 2, 3]
    assert bus.seq == 3
    # Published again (here, or relayed to another bus): a numbered copy; what the first
    # subscribers got keeps its number.
    sub = bus.subscribe()
    again = bus.publish(fresh)
    assert again is not None and again is not fresh and again.seq == 4 and fresh.seq == 1
    assert again.conn_id == fresh.conn_id and queued(sub) == [again]
    other = EventBus()
    relayed = other.publish(again)
    assert relayed is not None and relayed.seq == 1 and again.seq == 4


def test_publish_returns_none_for_what_it_did_not_publish() -> None:
    bus = EventBus()
    assert bus.publish("not an event") is None  # type: ignore[arg-type]
    bus.close()
    assert bus.publish(added()) is None and bus.seq == 0


# ------------------------------------------------------------------------------ replay


async def test_since_replays_what_came_after_then_live_events() -> None:
    bus = EventBus()
    for i in range(1, 6):
        bus.publish(added(i) if i % 2 else completed(i))
    sub = bus.subscribe(since=2)
    assert [e.seq for e in queued(sub)] == [3, 4, 5] and sub.missed == 0 and sub.since == 2
    only = bus.subscribe(EvtConnectionMigrationCompleted, since=0)
    assert [e.seq for e in queued(only)] == [2, 4]
    live = bus.subscribe()  # no since: live events only, as before
    assert live.since is None and live.pending == 0
    everything = bus.subscribe(since=0)
    bus.publish(added(6))
    assert [e.seq for e in queued(everything)] == [1, 2, 3, 4, 5, 6]
    assert [e.seq for e in queued(live)] == [6]
    now = bus.subscribe(since=bus.seq)  # "from here on"
    assert now.pending == 0
    beyond = bus.subscribe(since=1000)  # a seq this bus never gave: nothing to replay
    bus.publish(added(7))
    assert [e.seq for e in queued(now)] == [7] and [e.seq for e in queued(beyond)] == [7]


async def test_a_late_subscriber_is_woken_by_the_replay() -> None:
    bus = EventBus()
    bus.publish(completed(1))
    got = await asyncio.wait_for(anext(aiter(bus.subscribe(since=0))), 1)
    assert got.seq == 1 and isinstance(got, EvtConnectionMigrationCompleted)


async def test_beyond_the_window_the_gap_is_counted_in_missed() -> None:
    bus = EventBus(retain=5)
    for i in range(1, 13):
        bus.publish(added(i))
    sub = bus.subscribe(since=0)
    assert [e.seq for e in queued(sub)] == [8, 9, 10, 11, 12]
    assert sub.missed == 7  # seqs 1-7 are gone
    inside = bus.subscribe(since=9)
    assert [e.seq for e in queued(inside)] == [10, 11, 12] and inside.missed == 0
    edge = bus.subscribe(since=7)  # the oldest forgotten one itself was already seen
    assert [e.seq for e in queued(edge)] == [8, 9, 10, 11, 12] and edge.missed == 0


def test_missed_is_zero_when_none_of_the_subscribed_types_was_forgotten() -> None:
    bus = EventBus(retain=3)
    for i in range(5):
        bus.publish(added(i))  # seqs 1-5; 1-5 forgotten once the three below arrive
    for i in range(3):
        bus.publish(completed(i))  # seqs 6-8, all kept
    done = bus.subscribe(EvtConnectionMigrationCompleted, since=0)
    assert [e.seq for e in queued(done)] == [6, 7, 8] and done.missed == 0
    paths = bus.subscribe(EvtPathAdded, since=0)
    assert queued(paths) == [] and paths.missed == 5  # every one of them is gone
    later = bus.subscribe(EvtPathAdded, since=5)
    assert later.missed == 0


def test_retain_zero_keeps_nothing_and_says_so() -> None:
    bus = EventBus(retain=0)
    bus.publish(added(1))
    bus.publish(added(2))
    sub = bus.subscribe(since=0)
    assert sub.pending == 0 and sub.missed == 2
    assert bus.subscribe(since=2).missed == 0


def test_a_replay_larger_than_the_queue_drops_the_oldest_and_counts_them() -> None:
    bus = EventBus()
    for i in range(10):
        bus.publish(added(i))
    sub = bus.subscribe(since=0, maxsize=4)
    assert [e.seq for e in queued(sub)] == [7, 8, 9, 10]
    assert sub.dropped == 6 and sub.missed == 0


async def test_a_closed_bus_still_replays_what_it_kept_then_ends() -> None:
    bus = EventBus()
    bus.publish(added(1))
    bus.publish(completed(2))
    bus.close()
    sub = bus.subscribe(since=0)
    assert sub.closed and [e.seq async for e in sub] == [1, 2]
    assert [e async for e in bus.subscribe()] == []  # no since: ended at once, as before


def test_bad_since_and_retain() -> None:
    bus = EventBus()
    with pytest.raises(InvalidArgumentError, match="since") as err:
        bus.subscribe(since=-1)
    assert err.value.name == "since" and "0 to replay" in str(err.value)
    for bad in ("3", 1.5, True):
        with pytest.raises(TypeError, match="since"):
            bus.subscribe(since=bad)  # type: ignore[arg-type]
    assert bus.subscriptions == 0
    with pytest.raises(InvalidArgumentError, match="retain") as err:
        EventBus(retain=-1)
    assert err.value.name == "retain"
    for bad_retain in (1.5, True, "10"):
        with pytest.raises(TypeError, match="retain"):
            EventBus(retain=bad_retain)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="event_retention"):
        Supervisor(event_retention=-5)


# ------------------------------------------------------------------------------ concurrency


async def test_no_gap_and_no_duplicate_while_another_thread_publishes() -> None:
    """Subscriptions made at random moments while a thread publishes as fast as it can: each
    gets exactly the seqs after its ``since``, in order, once each."""
    total = 20_000
    bus = EventBus(retain=total)
    started = threading.Event()

    def publish_all() -> None:
        started.set()
        for i in range(total):
            bus.publish(added(i) if i % 3 else completed(i))
            if i % 100 == 0:
                time.sleep(0)  # hand the GIL over: subscriptions interleave with publishes

    publisher = threading.Thread(target=publish_all)
    publisher.start()
    started.wait(5)
    subs: list[Subscription] = []
    rng = random.Random(7)
    next_at = 0
    while publisher.is_alive() or len(subs) < 3:
        if bus.seq >= next_at or not publisher.is_alive():
            next_at = bus.seq + 300  # spread the subscriptions over the whole run
            since = max(0, bus.seq - rng.randrange(0, 50))
            kind = rng.choice((None, EvtConnectionMigrationCompleted))
            types = () if kind is None else (kind,)
            subs.append(bus.subscribe(*types, since=since, maxsize=total))
        await asyncio.sleep(0)  # let the loop run; the publisher is on its own thread
    publisher.join(10)
    assert not publisher.is_alive()
    bus.close()
    assert bus.seq == total
    caught_mid_stream = 0
    for sub in subs:
        assert sub.since is not None
        seqs = [e.seq async for e in sub]
        want = [
            s
            for s in range(sub.since + 1, total + 1)
            # completed() was published for i % 3 == 0, i = seq - 1
            if not sub.types or (s - 1) % 3 == 0
        ]
        assert seqs == want, (sub, seqs[:5], want[:5])
        assert sub.missed == 0 and sub.dropped == 0
        caught_mid_stream += 0 < sub.since < total
    assert caught_mid_stream >= 2, f"only {caught_mid_stream} subscriptions raced the publisher"


async def test_no_gap_and_no_duplicate_with_publishers_on_the_loop() -> None:
    """The in-loop case (actors publish from the event loop): subscribing between two
    publishes of concurrent tasks splits the stream exactly at ``since``."""
    bus = EventBus()

    async def publisher(n: int) -> None:
        for i in range(n):
            bus.publish(added(i))
            if i % 7 == 0:
                await asyncio.sleep(0)

    tasks = [asyncio.create_task(publisher(200)) for _ in range(3)]
    subs = []
    while not all(t.done() for t in tasks):
        subs.append(bus.subscribe(since=max(0, bus.seq - 5)))
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    bus.close()
    for sub in subs:
        assert sub.since is not None
        assert [e.seq async for e in sub] == list(range(sub.since + 1, 601))


# ------------------------------------------------------------------------------ a real switch


async def test_subscribing_after_switch_returned_yields_its_completed_event(
    echo: RigServer, tmp_path: Path
) -> None:
    """The README's first example: subscribe after ``await path.switch()``; it does not hang."""
    journal = tmp_path / "sup.journal"
    async with Supervisor(enable_experimental_connection_migration=True, journal=journal) as sup:
        conn = await dial_echo(sup, echo)
        mc = conn.as_migratable()
        path = await mc.add_path(SECOND)
        await path.probe(timeout=5.0)
        before = sup.events.seq
        result = await path.switch()
        assert isinstance(result, SwitchResult)
        assert result.to_addr == str(path.info().local_addr)

        sub = sup.events.subscribe(EvtConnectionMigrationCompleted, since=0)
        evt = await asyncio.wait_for(anext(aiter(sub)), 5)
        assert isinstance(evt, EvtConnectionMigrationCompleted)
        assert evt.conn_id == conn.conn_id and str(evt.to_local_addr) == result.to_addr
        assert evt.seq > before and sub.missed == 0

        # "Everything since I looked": the switch's own events, in order, started first.
        since = sup.events.subscribe(
            EvtConnectionMigrationStarted, EvtConnectionMigrationCompleted, since=before
        )
        got = [await asyncio.wait_for(anext(aiter(since)), 5) for _ in range(2)]
        assert [type(e) for e in got] == [
            EvtConnectionMigrationStarted,
            EvtConnectionMigrationCompleted,
        ]
        assert got[1] == evt and got[0].seq < got[1].seq
        seqs = [e.seq for e in queued(sup.events.subscribe(since=0))]
        assert seqs == list(range(1, sup.events.seq + 1))  # every event kept, numbered 1..n
        last = sup.events.seq
    # The journal records carry the same numbers as the bus (closing added a few more).
    journalled = [r for r in read_journal(journal) if r["kind"] == "event"]
    assert len(journalled) >= last
    assert [r["body"]["seq"] for r in journalled] == list(range(1, len(journalled) + 1))
    [done] = [r for r in journalled if r["type"] == "ConnectionMigrationCompleted"]
    assert done["body"]["seq"] == evt.seq
