"""Tests of idle parking: an actor with ``parks_when_idle`` holds a task only while it has mail.

Why it matters: a node holds thousands of idle connections of three actors each, so an idle actor
must cost no task, while every rule of the runtime (order, ask, stop, supervision, no leaked task)
holds as for an actor that keeps its task. Synchronisation is an event, a future or a reply
awaited with a timeout; an actor is parked as soon as an ``ask`` it answered returns, because it
parks in the same step as it answers when its mailbox is empty.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable
from typing import ClassVar, TypeVar

import pytest

from actors.runtime import (
    Actor,
    ActorError,
    ActorRef,
    ActorStoppedError,
    ChildFailed,
    Later,
    Runtime,
)

T = TypeVar("T")
Report = asyncio.Future[tuple[ChildFailed, ActorRef | None]]
WAIT = 5.0  # generous upper bound for "should happen promptly"; never reached when things work


async def within(aw: Awaitable[T], timeout: float = WAIT) -> T:
    async with asyncio.timeout(timeout):
        return await aw


def reader_tasks(name: str) -> list[asyncio.Task[object]]:
    """The live tasks reading actor ``name``'s mailbox (the runtime names them actor:<name>)."""
    return [t for t in asyncio.all_tasks() if t.get_name() == f"actor:{name}"]


async def until_parked(ref: ActorRef, turns: int = 50) -> None:
    """Let the loop turn until ``ref`` parked: for actors nobody asks (on_start just ended)."""
    for _ in range(turns):
        if ref.parked:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{ref!r} did not park within {turns} loop turns")


class Recorder(Actor):
    """Logs told messages and the task that handled each; answers "log" with the message log."""

    parks_when_idle: ClassVar[bool] = True

    def __init__(self) -> None:
        self.log: list[object] = []
        self.handlers: list[asyncio.Task[object] | None] = []
        self.readers_seen: set[int] = set()
        self.senders: list[ActorRef | None] = []

    async def receive(self, msg: object) -> object:
        self.readers_seen.add(len(reader_tasks(self.ref.name)))
        if msg == "log":
            return list(self.log)
        if msg == "crash":
            raise RuntimeError("recorder crashed")
        self.log.append(msg)
        self.handlers.append(asyncio.current_task())
        self.senders.append(self.sender)
        return ("echo", msg)


class Lifecycle(Actor):
    """Counts on_start/on_stop; owns a background task that records its cancellation."""

    parks_when_idle: ClassVar[bool] = True

    def __init__(self, order: list[str] | None = None, label: str = "") -> None:
        self.starts = 0
        self.stops = 0
        self.order = order if order is not None else []
        self.label = label
        self.bg_started = asyncio.Event()
        self.bg_cancelled = asyncio.Event()

    async def on_start(self) -> None:
        self.starts += 1
        self.spawn(self._background(), name="background")

    async def _background(self) -> None:
        self.bg_started.set()
        try:
            await asyncio.Event().wait()
        finally:
            self.bg_cancelled.set()
            self.order.append(f"{self.label}:bg-cancelled")

    async def receive(self, msg: object) -> object:
        return msg

    async def on_stop(self) -> None:
        self.stops += 1
        self.order.append(f"{self.label}:on_stop")


async def test_default_actor_keeps_its_task() -> None:
    class Plain(Actor):
        async def receive(self, msg: object) -> object:
            return msg

    assert Actor.parks_when_idle is False
    async with Runtime() as rt:
        ref = rt.start(Plain(), name="plain")
        assert await within(ref.ask("x")) == "x"
        assert not ref.parked
        assert len(reader_tasks("plain")) == 1


async def test_idle_actor_holds_no_task_future_or_waiter() -> None:
    async with Runtime() as rt:
        ref = rt.start(Lifecycle(), name="idle")
        await until_parked(ref)  # nobody sent anything: it parks once on_start returned
        assert reader_tasks("idle") == []
        cell = ref._cell
        assert cell.mailbox._waiter is None and cell._stopped is None
        assert await within(ref.ask("ping")) == "ping"
        assert ref.parked and reader_tasks("idle") == []


async def test_idle_connection_shape_costs_no_task() -> None:
    """The issue's budget: an idle connection (one actor and two path actors) <= 2 tasks."""

    class Path(Actor):
        parks_when_idle: ClassVar[bool] = True

        async def receive(self, msg: object) -> object:
            return msg

    class Connection(Actor):
        parks_when_idle: ClassVar[bool] = True

        async def on_start(self) -> None:
            self.paths = [self.spawn_child(Path(), name=f"path{i}") for i in range(2)]

        async def receive(self, msg: object) -> object:
            return [await path.ask(msg) for path in self.paths]

    async with Runtime() as rt:
        conn = rt.start(Connection(), name="conn")
        assert await within(conn.ask("ready")) == ["ready", "ready"]
        idle = [t for t in asyncio.all_tasks() if t.get_name().startswith("actor:")]
        assert idle == []


async def test_order_kept_across_park_and_unpark_with_one_reader_at_a_time() -> None:
    async with Runtime() as rt:
        rec = Recorder()
        ref = rt.start(rec, name="rec")
        expected: list[object] = []
        for batch in range(5):
            for i in range(batch + 1):
                ref.tell((batch, i))
                expected.append((batch, i))
            assert await within(ref.ask("log")) == expected
            assert ref.parked and reader_tasks("rec") == []
        # Each batch found the actor parked, so a new task handled it; never two at once.
        assert len({id(task) for task in rec.handlers}) == 5
        assert rec.readers_seen == {1}

        async def sender(tag: str) -> None:
            for i in range(30):
                ref.tell((tag, i))
                if i % 4 == 0:
                    await asyncio.sleep(0)  # yield to interleave (and let it park), not to sync

        await within(asyncio.gather(sender("a"), sender("b")))
        log = await within(ref.ask("log"))
        assert isinstance(log, list)
        for tag in ("a", "b"):
            assert [i for t, i in log if t == tag] == list(range(30))
        assert rec.readers_seen == {1}


async def test_on_start_still_running_holds_messages_back() -> None:
    release = asyncio.Event()
    handled: list[object] = []

    class SlowStart(Actor):
        parks_when_idle: ClassVar[bool] = True

        async def on_start(self) -> None:
            await release.wait()
            handled.append("started")

        async def receive(self, msg: object) -> object:
            handled.append(msg)
            return msg

    async with Runtime() as rt:
        ref = rt.start(SlowStart(), name="slow")
        ref.tell(1)
        asking = asyncio.create_task(ref.ask(2))
        await asyncio.sleep(0)  # let the ask enqueue and on_start begin waiting
        assert not ref.parked and not asking.done()
        release.set()
        assert await within(asking) == 2
        assert handled == ["started", 1, 2]
        assert ref.parked


async def test_ask_after_parking_and_ask_self_still_refused() -> None:
    class Selfish(Actor):
        parks_when_idle: ClassVar[bool] = True

        async def receive(self, msg: object) -> object:
            if msg == "self":
                return await self.ref.ask("again")
            return ("ok", msg)

    async with Runtime() as rt:
        ref = rt.start(Selfish(), name="selfish")
        assert await within(ref.ask(1)) == ("ok", 1)
        assert ref.parked
        with pytest.raises(ActorError, match="asked itself"):
            await within(ref.ask("self"))  # the first message after parking: a new task
        assert ref.is_alive and ref.parked
        assert await within(ref.ask(2)) == ("ok", 2)


async def test_sender_and_contextvars_survive_parking() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    async with Runtime() as rt:
        rec = Recorder()
        rec_ref = rt.start(rec, name="rec")

        class Teller(Actor):
            parks_when_idle: ClassVar[bool] = True

            async def on_start(self) -> None:
                var.set("from on_start")

            async def receive(self, msg: object) -> object:
                rec_ref.tell(msg)  # sender is filled in from the current (new) task's actor
                return var.get()

        teller = rt.start(Teller(), name="teller")
        await until_parked(teller)
        var.set("from the test")  # the asker's context must not leak into the actor
        assert await within(teller.ask("m1")) == "from on_start"
        assert teller.parked
        assert await within(teller.ask("m2")) == "from on_start"
        assert await within(rec_ref.ask("log")) == ["m1", "m2"]
        assert rec.senders == [teller, teller]


async def test_stop_of_parked_actor_runs_shutdown_once_and_cancels_owned_tasks() -> None:
    order: list[str] = []
    async with Runtime(stop_grace=0.05) as rt:
        actor = Lifecycle(order, "x")
        ref = rt.start(actor, name="x")
        await within(actor.bg_started.wait())
        assert await within(ref.ask("ping")) == "ping"
        assert ref.parked
        waiter = asyncio.create_task(ref.wait_stopped())
        await asyncio.sleep(0)  # the waiter is waiting before the stop is asked for
        await within(ref.stop())
        await within(waiter)
        assert actor.bg_cancelled.is_set()
        assert order == ["x:bg-cancelled", "x:on_stop"]  # owned tasks end before on_stop
        assert (actor.starts, actor.stops) == (1, 1)
        assert reader_tasks("x") == [] and not ref.is_alive
        await within(ref.stop())  # idempotent
        await within(ref.wait_stopped())
        with pytest.raises(ActorStoppedError):
            ref.tell("late")
        with pytest.raises(ActorStoppedError):
            await ref.ask("late")
    assert actor.stops == 1


async def test_request_stop_from_sync_code_wakes_a_parked_actor() -> None:
    async with Runtime() as rt:
        actor = Lifecycle()
        ref = rt.start(actor, name="y")
        await within(ref.ask("ping"))
        assert ref.parked
        ref.request_stop()
        assert not ref.is_alive and not ref.parked  # a task now runs its shutdown
        await within(ref.wait_stopped())
        assert actor.stops == 1 and actor.bg_cancelled.is_set()


async def test_stopped_before_first_task_ran_skips_on_start_runs_on_stop() -> None:
    async with Runtime() as rt:
        actor = Lifecycle()
        ref = rt.start(actor, name="early")
        ref.request_stop()
        await within(ref.wait_stopped())
        assert (actor.starts, actor.stops) == (0, 1)


async def test_task_killed_from_outside_still_releases_stop_waiters() -> None:
    """A reader task cancelled before it ran (as at loop teardown) ends the actor for waiters."""
    async with Runtime() as rt:
        ref = rt.start(Lifecycle(), name="killed")
        await within(ref.ask("ping"))
        ref.tell("wake")  # a new task, not yet run
        (task,) = reader_tasks("killed")
        task.cancel()
        await within(ref.wait_stopped())
        assert not ref.is_alive and not ref.parked
        with pytest.raises(ActorStoppedError):
            ref.tell("late")
        await within(ref.stop())


async def test_children_of_parked_parent_stop_first() -> None:
    order: list[str] = []

    class Node(Lifecycle):
        def __init__(self, label: str, kids: tuple[str, ...] = ()) -> None:
            super().__init__(order, label)
            self.kids = kids

        async def on_start(self) -> None:
            self.refs = [self.spawn_child(Node(kid), name=kid) for kid in self.kids]

        async def receive(self, msg: object) -> object:
            for ref in self.refs:
                await ref.ask(msg)
            return self.label

    async with Runtime() as rt:
        a = rt.start(Node("A", ("A1", "A2")), name="A")
        b = rt.start(Node("B", ("B1",)), name="B")
        assert await within(a.ask("ready")) == "A"
        assert await within(b.ask("ready")) == "B"
        assert [t for t in asyncio.all_tasks() if t.get_name().startswith("actor:")] == []
        await within(a.stop())
        assert order == ["A2:on_stop", "A1:on_stop", "A:on_stop"]
    assert order[3:] == ["B1:on_stop", "B:on_stop"]


class Supervising(Actor):
    """Parks; starts a Recorder-like child and hands the ChildFailed it receives to a future."""

    parks_when_idle: ClassVar[bool] = True

    def __init__(self, child: Actor, failed: Report) -> None:
        self.child_actor = child
        self.failed = failed

    async def on_start(self) -> None:
        self.child = self.spawn_child(self.child_actor, name="child")

    async def receive(self, msg: object) -> object:
        if isinstance(msg, ChildFailed):
            self.failed.set_result((msg, self.sender))
            return None
        return self.child


async def test_failing_tell_handler_reports_child_failed_to_parked_parent() -> None:
    failed: Report = asyncio.get_running_loop().create_future()
    top: list[ChildFailed] = []
    async with Runtime(on_failure=top.append) as rt:
        pref = rt.start(Supervising(Recorder(), failed), name="parent")
        child = await within(pref.ask("child"))
        assert isinstance(child, ActorRef)
        assert await within(child.ask("ping")) == ("echo", "ping")
        assert pref.parked and child.parked
        child.tell("crash")
        report, sender = await within(failed)
        assert report.ref is child and sender is child
        assert "recorder crashed" in report.error
        assert not child.is_alive and pref.is_alive
        assert await within(pref.ask("again")) is child
        assert pref.parked
    assert top == []


async def test_owned_task_failing_while_parked_fails_the_actor() -> None:
    failed: Report = asyncio.get_running_loop().create_future()
    go = asyncio.Event()

    class Exploding(Lifecycle):
        async def receive(self, msg: object) -> object:
            async def explode() -> None:
                await go.wait()
                raise KeyError("task exploded")

            self.spawn(explode(), name="exploder")
            return "armed"

    async with Runtime() as rt:
        child_actor = Exploding()
        pref = rt.start(Supervising(child_actor, failed), name="parent")
        child = await within(pref.ask("child"))
        assert isinstance(child, ActorRef)
        assert await within(child.ask("arm")) == "armed"
        assert child.parked and pref.parked
        go.set()
        report, _ = await within(failed)
        assert "task exploded" in report.error
        assert child_actor.stops == 1 and child_actor.bg_cancelled.is_set()
        await within(child.wait_stopped())


class Deferring(Actor):
    """Answers ("slow", key) with Later(task) waiting for ``gates[key]``; other asks at once."""

    parks_when_idle: ClassVar[bool] = True

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task[object]] = {}

    async def receive(self, msg: object) -> object:
        if isinstance(msg, tuple) and msg[0] == "slow":
            key = msg[1]
            self.gates[key] = asyncio.Event()
            self.tasks[key] = self.spawn(self._work(key), name=f"work-{key}")
            return Later(self.tasks[key])
        return ("now", msg)

    async def _work(self, key: str) -> object:
        await self.gates[key].wait()
        if key.startswith("fail"):
            raise LookupError(key)
        return ("done", key)


async def test_later_reply_answers_while_actor_parks_meanwhile() -> None:
    failures: list[ChildFailed] = []
    async with Runtime(on_failure=failures.append) as rt:
        actor = Deferring()
        ref = rt.start(actor, name="deferring")
        pending = asyncio.create_task(ref.ask(("slow", "a")))
        failing = asyncio.create_task(ref.ask(("slow", "fail")))
        await asyncio.sleep(0)  # let both asks enqueue before "sync"
        assert await within(ref.ask("sync")) == ("now", "sync")
        assert ref.parked and not pending.done() and not failing.done()
        actor.gates["a"].set()
        assert await within(pending) == ("done", "a")
        actor.gates["fail"].set()
        with pytest.raises(LookupError, match="fail"):
            await within(failing)
        assert ref.is_alive and ref.parked
        # A Later still pending when the parked actor is stopped fails with ActorStoppedError.
        never = asyncio.create_task(ref.ask(("slow", "never")))
        await asyncio.sleep(0)  # let it enqueue before "sync"
        await within(ref.ask("sync"))
        assert ref.parked
        await within(ref.stop())
        with pytest.raises(ActorStoppedError):
            await within(never)
        assert actor.tasks["never"].cancelled()
    assert failures == []


async def test_stop_grace_still_cuts_a_stuck_handler_of_a_parking_actor() -> None:
    never = asyncio.Event()
    entered = asyncio.Event()

    class Stuck(Actor):
        parks_when_idle: ClassVar[bool] = True

        async def receive(self, msg: object) -> object:
            entered.set()
            await never.wait()
            return msg

    async with Runtime(stop_grace=0.05) as rt:
        ref = rt.start(Stuck(), name="stuck")
        asking = asyncio.create_task(ref.ask("hang"))
        await within(entered.wait())
        await within(ref.stop())
        with pytest.raises(ActorStoppedError):
            await within(asking)
        assert reader_tasks("stuck") == []


async def test_runtime_exit_leaves_no_task_with_parked_and_busy_actors() -> None:
    before = set(asyncio.all_tasks())
    release = asyncio.Event()
    failed: Report = asyncio.get_running_loop().create_future()
    actors: list[Lifecycle] = []
    async with Runtime(on_failure=lambda _: None) as rt:
        for i in range(5):
            actor = Lifecycle(label=str(i))
            actors.append(actor)
            ref = rt.start(actor, name=f"idle{i}")
            await within(ref.ask("ping"))
            assert ref.parked
        sup = rt.start(Supervising(Recorder(), failed), name="sup")
        child = await within(sup.ask("child"))
        assert isinstance(child, ActorRef)
        child.tell("crash")
        await within(failed)
        deferring = Deferring()
        dref = rt.start(deferring, name="deferring")
        later = asyncio.create_task(dref.ask(("slow", "k")))
        await asyncio.sleep(0)  # let it enqueue before "sync"
        await within(dref.ask("sync"))

        class Busy(Actor):
            parks_when_idle: ClassVar[bool] = True

            async def receive(self, msg: object) -> object:
                await release.wait()
                return msg

        bref = rt.start(Busy(), name="busy")
        busy = asyncio.create_task(bref.ask("work"))
        bref.tell("queued")
        release.set()
        assert await within(busy) == "work"
    assert set(asyncio.all_tasks()) == before
    assert all(a.stops == 1 and a.bg_cancelled.is_set() for a in actors)
    with pytest.raises(ActorStoppedError):
        await within(later)
