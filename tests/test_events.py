"""Event dataclasses and the EventBus."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import threading
import time
from typing import Any

import msgpack
import pytest
from multiaddr import Multiaddr

from actors.envelope import EnvelopeError, decode, encode, type_name
from actors.path_state import PathState
from supervisor.core.events import (
    EVENT_TYPES,
    Event,
    EventBus,
    EvtConnectionMigrationCompleted,
    EvtConnectionMigrationFailed,
    EvtConnectionMigrationStarted,
    EvtNetworkChanged,
    EvtPathAdded,
    EvtPathRemoved,
    EvtPathStateChanged,
    EvtPeerAddressChanged,
    Subscription,
)

REMOTE = Multiaddr("/ip4/127.0.0.1/udp/4433/quic-v1")
LOCAL_A = Multiaddr("/ip4/127.0.0.1/udp/50000/quic-v1")
LOCAL_B = Multiaddr("/ip4/127.0.0.2/udp/50001/quic-v1")


def added(i: int = 0) -> EvtPathAdded:
    return EvtPathAdded(f"c{i}", REMOTE, time.time(), LOCAL_B)


def one_of_each() -> list[Event]:
    now = time.time()
    return [
        EvtConnectionMigrationStarted("c1", REMOTE, now, LOCAL_A, LOCAL_B, "manual"),
        EvtConnectionMigrationCompleted("c1", REMOTE, now, LOCAL_A, LOCAL_B, "failover", 0.012),
        EvtConnectionMigrationFailed(
            "c1", REMOTE, now, LOCAL_A, LOCAL_B, "drain", "rolled back", False
        ),
        EvtPathAdded("c1", REMOTE, now, LOCAL_B),
        EvtPathRemoved("c1", REMOTE, now, LOCAL_B),
        EvtPathStateChanged("c1", REMOTE, now, LOCAL_B, PathState.NEW, PathState.VALIDATING),
        EvtNetworkChanged("", REMOTE, now, "eth1", "carrier_lost", ("10.0.0.2",)),
        EvtPeerAddressChanged("c1", REMOTE, now, LOCAL_A, REMOTE),
    ]


def test_field_order_and_names() -> None:
    """Each constructor's positional order is part of the API (events are built positionally);
    ``seq`` is keyword-only, so adding it moved none of them."""

    def positional(cls: type) -> list[str]:
        params = inspect.signature(cls).parameters.values()
        return [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]

    names = {cls.__name__: positional(cls) for cls in EVENT_TYPES}
    common = ["conn_id", "remote_addr", "time"]
    started = [*common, "from_local_addr", "to_local_addr", "reason"]
    # initiator comes last with a default: positional construction from before it existed
    # keeps working.
    assert names == {
        "EvtConnectionMigrationStarted": [*started, "initiator"],
        "EvtConnectionMigrationCompleted": [*started, "probe_rtt", "initiator"],
        "EvtConnectionMigrationFailed": [
            *started,
            "error",
            "connection_closed",
            "outcome",
            "initiator",
        ],
        "EvtPathAdded": [*common, "local_addr"],
        "EvtPathRemoved": [*common, "local_addr"],
        "EvtPathStateChanged": [*common, "local_addr", "old", "new"],
        "EvtNetworkChanged": [*common, "interface", "change", "addresses", "trace_id"],
        "EvtPeerAddressChanged": [*common, "old_remote_addr", "new_remote_addr"],
    }
    for cls in EVENT_TYPES:
        seq = inspect.signature(cls).parameters["seq"]
        assert seq.kind is seq.KEYWORD_ONLY and seq.default == 0, cls


def test_events_are_frozen_and_hashable() -> None:
    for evt in one_of_each():
        with pytest.raises(dataclasses.FrozenInstanceError):
            evt.conn_id = "other"  # type: ignore[misc]
        assert hash(evt) == hash(dataclasses.replace(evt))
        assert evt == dataclasses.replace(evt)


def test_no_event_type_subclasses_another() -> None:
    for a in EVENT_TYPES:
        for b in EVENT_TYPES:
            assert a is b or not issubclass(a, b)


def test_reason_is_validated() -> None:
    reason: Any = "sideways"
    with pytest.raises(ValueError, match="'sideways'"):
        EvtConnectionMigrationStarted("c1", REMOTE, 0.0, LOCAL_A, LOCAL_B, reason)


async def test_filter_by_type() -> None:
    bus = EventBus()
    sub = bus.subscribe(EvtPathAdded, EvtConnectionMigrationCompleted)
    for evt in one_of_each():
        bus.publish(evt)
    bus.close()
    got = [evt async for evt in sub]
    assert [type(e) for e in got] == [EvtConnectionMigrationCompleted, EvtPathAdded]


async def test_no_types_means_all() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    assert sub.types == ()
    events = one_of_each()
    for evt in events:
        bus.publish(evt)
    bus.close()
    assert [evt async for evt in sub] == events


async def test_subscribed_at_call_late_iteration_still_receives() -> None:
    bus = EventBus()
    sub = bus.subscribe(EvtPathAdded)
    bus.publish(added(1))  # before anyone iterates
    await asyncio.sleep(0)
    bus.publish(added(2))
    assert sub.pending == 2
    it = aiter(sub)
    assert (await anext(it)).conn_id == "c1"
    assert (await anext(it)).conn_id == "c2"


async def test_waiting_consumer_is_woken() -> None:
    bus = EventBus()
    sub = bus.subscribe(EvtPathAdded)
    task = asyncio.create_task(anext(aiter(sub)))
    await asyncio.sleep(0)
    assert not task.done()
    bus.publish(added(7))
    assert (await asyncio.wait_for(task, 1)).conn_id == "c7"


async def test_drop_oldest_with_counter(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus()
    sub = bus.subscribe(EvtPathAdded, maxsize=3)
    for i in range(10):
        bus.publish(added(i))  # never blocks, never raises
    assert sub.dropped == 7 and sub.pending == 3
    assert "dropping the oldest" in caplog.text
    bus.close()
    assert [e.conn_id async for e in sub] == ["c7", "c8", "c9"]


async def test_bus_close_ends_iteration_after_queued_events() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    waiting = bus.subscribe()
    task = asyncio.create_task(anext(aiter(waiting)))
    await asyncio.sleep(0)
    bus.publish(added())
    bus.close()
    assert bus.closed and bus.subscriptions == 0
    assert (await task).conn_id == "c0"
    with pytest.raises(StopAsyncIteration):
        await anext(aiter(waiting))
    assert [e.conn_id async for e in sub] == ["c0"]
    bus.publish(added())  # ignored after close, no error
    late = bus.subscribe()
    assert late.closed and [e async for e in late] == []
    bus.close()  # idempotent


async def test_blocked_consumer_ends_on_bus_close() -> None:
    bus = EventBus()
    sub = bus.subscribe()

    async def consume() -> list[Event]:
        return [e async for e in sub]

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)
    bus.close()
    assert await asyncio.wait_for(task, 1) == []


async def test_subscription_close_and_context_manager() -> None:
    bus = EventBus()
    async with bus.subscribe(EvtPathAdded) as sub:
        assert isinstance(sub, Subscription) and bus.subscriptions == 1
        bus.publish(added())
    assert bus.subscriptions == 0 and sub.closed
    bus.publish(added())
    with pytest.raises(StopAsyncIteration):  # close() discards what was queued
        await anext(aiter(sub))
    sub.close()  # idempotent

    other = bus.subscribe()
    task = asyncio.create_task(anext(aiter(other)))
    await asyncio.sleep(0)
    await other.aclose()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(task, 1)


async def test_cancelled_consumer_leaves_subscription_usable() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    task = asyncio.create_task(anext(aiter(sub)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    bus.publish(added(3))
    assert (await asyncio.wait_for(anext(aiter(sub)), 1)).conn_id == "c3"


async def test_publish_from_another_thread_wakes_consumer() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    task = asyncio.create_task(anext(aiter(sub)))
    await asyncio.sleep(0)
    t = threading.Thread(target=bus.publish, args=(added(5),))
    t.start()
    t.join()
    assert (await asyncio.wait_for(task, 1)).conn_id == "c5"


def test_bad_subscribe_arguments() -> None:
    bus = EventBus()
    with pytest.raises(TypeError, match="ValueError"):
        bus.subscribe(ValueError)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'EvtPathAdded'"):
        bus.subscribe("EvtPathAdded")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="instance of EvtPathAdded"):
        bus.subscribe(added())  # type: ignore[arg-type]
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="maxsize"):
            bus.subscribe(maxsize=bad)  # type: ignore[arg-type]
    assert bus.subscriptions == 0


def test_publish_never_raises() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    bus.publish("not an event")  # type: ignore[arg-type]
    assert sub.pending == 0

    class Broken(Subscription):
        def _offer(self, evt: Event) -> None:
            raise RuntimeError("boom")

    bus._subs[Broken(bus, (), 1)] = None
    bus.publish(added())
    assert sub.pending == 1


@pytest.mark.parametrize("evt", one_of_each(), ids=lambda e: type(e).__name__)
def test_round_trip_through_envelope(evt: Event) -> None:
    assert type_name(evt) == f"event.{type(evt).__name__}"
    env = decode(encode(evt, traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01"))
    assert env.type == f"event.{type(evt).__name__}"
    assert env.body == evt and type(env.body) is type(evt)


def test_envelope_rejects_bad_reason() -> None:
    evt = one_of_each()[0]
    raw = msgpack.unpackb(encode(evt), raw=False)
    raw["body"]["reason"] = "sideways"
    with pytest.raises(EnvelopeError):
        decode(msgpack.packb(raw, use_bin_type=True))
