"""Tests of the asyncio actor runtime: ordering, ask/tell semantics, supervision, no leaked tasks.

Synchronisation is always an event, a future or a reply awaited with a timeout, never a sleep.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import pytest

from actors.runtime import (
    Actor,
    ActorError,
    ActorRef,
    ActorStoppedError,
    AskTimeoutError,
    ChildFailed,
    Later,
    Runtime,
)

T = TypeVar("T")
WAIT = 5.0  # generous upper bound for "should happen promptly"; never reached when things work


async def within(aw: Awaitable[T], timeout: float = WAIT) -> T:
    return await asyncio.wait_for(aw, timeout)


class Recorder(Actor):
    """Appends every told message; answers asks with ("echo", msg) or its log."""

    def __init__(self) -> None:
        self.log: list[object] = []
        self.senders: list[ActorRef | None] = []

    async def receive(self, msg: object) -> object:
        if msg == "log":
            return list(self.log)
        if isinstance(msg, tuple) and msg[0] == "boom":
            raise ValueError(msg[1])
        self.log.append(msg)
        self.senders.append(self.sender)
        return ("echo", msg)


class Gate(Actor):
    """Blocks in its handler on ``("wait", event)`` until the event is set; records handled msgs."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.handled: list[object] = []

    async def receive(self, msg: object) -> object:
        if isinstance(msg, tuple) and msg[0] == "wait":
            self.entered.set()
            await msg[1].wait()
            self.handled.append("wait")
            return "released"
        self.handled.append(msg)
        return msg


async def test_ordered_delivery_per_sender() -> None:
    async with Runtime() as rt:
        rec = Recorder()
        ref = rt.start(rec, name="rec")
        for i in range(200):
            ref.tell(i)
        assert await within(ref.ask("log")) == list(range(200))


async def test_ordered_delivery_with_interleaved_senders() -> None:
    """Two senders racing: each sender's own messages keep their order."""
    async with Runtime() as rt:
        ref = rt.start(Recorder(), name="rec")

        async def send(tag: str) -> None:
            for i in range(50):
                ref.tell((tag, i))
                if i % 7 == 0:
                    await asyncio.sleep(0)  # yield to interleave, not to synchronise

        await within(asyncio.gather(send("a"), send("b")))
        log = await within(ref.ask("log"))
        assert isinstance(log, list)
        for tag in ("a", "b"):
            assert [i for t, i in log if t == tag] == list(range(50))


async def test_ask_reply_and_sender() -> None:
    async with Runtime() as rt:
        rec = Recorder()
        ref = rt.start(rec, name="rec")
        assert await within(ref.ask("hello", timeout=WAIT)) == ("echo", "hello")
        assert rec.senders == [None]  # asked from outside any actor

        class Forwarder(Actor):
            async def receive(self, msg: object) -> object:
                return await ref.ask(msg)

        fwd = rt.start(Forwarder(), name="fwd")
        assert await within(fwd.ask("via")) == ("echo", "via")
        assert rec.senders[-1] is fwd


async def test_ask_exception_propagates_and_actor_survives() -> None:
    failures: list[ChildFailed] = []
    async with Runtime(on_failure=failures.append) as rt:
        ref = rt.start(Recorder(), name="rec")
        with pytest.raises(ValueError, match="bad input"):
            await within(ref.ask(("boom", "bad input")))
        assert ref.is_alive
        assert await within(ref.ask("after")) == ("echo", "after")
    assert failures == []


async def test_ask_timeout_is_typed_and_names_actor_and_message() -> None:
    release = asyncio.Event()
    async with Runtime() as rt:
        gate = Gate()
        ref = rt.start(gate, name="slowpoke")
        with pytest.raises(AskTimeoutError) as info:
            await ref.ask(("wait", release), timeout=0.05)
        err = info.value
        assert isinstance(err, ActorError) and isinstance(err, TimeoutError)
        assert err.actor_name == "slowpoke" and err.msg_type == "tuple"
        assert "slowpoke" in str(err) and "tuple" in str(err)
        # A timed-out ask that had not started yet is skipped, so it leaves no trace.
        with pytest.raises(AskTimeoutError):
            await ref.ask("queued-then-abandoned", timeout=0.01)
        release.set()
        assert await within(ref.ask("next")) == "next"
        assert gate.handled == ["wait", "next"]


async def test_handler_raising_timeout_error_is_not_an_ask_timeout() -> None:
    class Raiser(Actor):
        async def receive(self, msg: object) -> object:
            raise TimeoutError("from the handler")

    async with Runtime() as rt:
        ref = rt.start(Raiser(), name="raiser")
        with pytest.raises(TimeoutError, match="from the handler") as info:
            await ref.ask("x", timeout=WAIT)
        assert not isinstance(info.value, AskTimeoutError)


async def test_cancelling_an_ask_leaves_the_actor_working() -> None:
    release = asyncio.Event()
    async with Runtime() as rt:
        gate = Gate()
        ref = rt.start(gate, name="gate")
        in_progress = asyncio.create_task(ref.ask(("wait", release)))
        await within(gate.entered.wait())
        queued = asyncio.create_task(ref.ask("never-started"))
        await asyncio.sleep(0)  # let `queued` put its request in the mailbox
        in_progress.cancel()
        queued.cancel()
        for task in (in_progress, queued):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert ref.is_alive
        release.set()
        assert await within(ref.ask("still here")) == "still here"
        # The in-progress handler finished; the cancelled, not-yet-started one was skipped.
        assert gate.handled == ["wait", "still here"]


async def test_pending_asks_fail_when_actor_stops_before_answering() -> None:
    release = asyncio.Event()
    async with Runtime() as rt:
        gate = Gate()
        ref = rt.start(gate, name="gate")
        first = asyncio.create_task(ref.ask(("wait", release)))
        await within(gate.entered.wait())
        second = asyncio.create_task(ref.ask("queued"))
        await asyncio.sleep(0)  # let `second` enqueue
        stopping = asyncio.create_task(ref.stop())
        release.set()
        await within(stopping)
        assert await within(first) == "released"  # graceful: the message in hand completes
        with pytest.raises(ActorStoppedError, match="gate"):
            await within(second)
        assert gate.handled == ["wait"]  # nothing further was processed
        with pytest.raises(ActorStoppedError):
            ref.tell("late")
        with pytest.raises(ActorStoppedError):
            await ref.ask("late")
        await within(ref.stop())  # stopping twice is fine


async def test_stop_grace_cuts_a_stuck_handler_short() -> None:
    never = asyncio.Event()
    async with Runtime(stop_grace=0.05) as rt:
        gate = Gate()
        ref = rt.start(gate, name="stuck")
        asking = asyncio.create_task(ref.ask(("wait", never)))
        await within(gate.entered.wait())
        await within(ref.stop())
        with pytest.raises(ActorStoppedError):
            await within(asking)


class Worker(Actor):
    """Owns a background task that runs until cancelled; crashes on "crash"."""

    def __init__(self, events: dict[str, asyncio.Event]) -> None:
        self.events = events

    async def on_start(self) -> None:
        self.spawn(self._background(), name="background")

    async def _background(self) -> None:
        self.events["bg_started"].set()
        try:
            await asyncio.Event().wait()
        finally:
            self.events["bg_cancelled"].set()

    async def on_stop(self) -> None:
        self.events["on_stop"].set()

    async def receive(self, msg: object) -> object:
        if msg == "crash":
            raise RuntimeError("worker crashed")
        if msg == "crash-in-task":

            async def explode() -> None:
                raise KeyError("task exploded")

            self.spawn(explode(), name="exploder")
        return msg


class Parent(Actor):
    """Starts a Worker child and forwards the ChildFailed it receives to a future."""

    def __init__(self, events: dict[str, asyncio.Event], failed: asyncio.Future[object]) -> None:
        self.events = events
        self.failed = failed
        self.child: ActorRef | None = None
        self.bg_cancelled_at_report: bool | None = None

    async def on_start(self) -> None:
        self.child = self.spawn_child(Worker(self.events), name="worker")

    async def receive(self, msg: object) -> object:
        if isinstance(msg, ChildFailed):
            self.bg_cancelled_at_report = self.events["bg_cancelled"].is_set()
            if not self.failed.done():
                self.failed.set_result((msg, self.sender))
            return None
        if msg == "child":
            return self.child
        raise TypeError(msg)


def new_events() -> dict[str, asyncio.Event]:
    return {k: asyncio.Event() for k in ("bg_started", "bg_cancelled", "on_stop")}


@pytest.mark.parametrize("trigger", ["crash", "crash-in-task"])
async def test_child_failure_reaches_parent_as_message(trigger: str) -> None:
    events = new_events()
    failed: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    top_failures: list[ChildFailed] = []
    async with Runtime(on_failure=top_failures.append) as rt:
        parent = Parent(events, failed)
        pref = rt.start(parent, name="parent")
        child = await within(pref.ask("child"))
        assert isinstance(child, ActorRef)
        await within(events["bg_started"].wait())
        child.tell(trigger)
        report, sender = await within(failed)
        assert isinstance(report, ChildFailed)
        assert report.ref is child and sender is child and report.name == "worker"
        expected = "RuntimeError('worker crashed')" if trigger == "crash" else "KeyError"
        assert expected in report.error
        assert "Traceback" in report.traceback
        # The child was fully stopped before the parent heard about it.
        assert parent.bg_cancelled_at_report is True
        assert events["on_stop"].is_set()
        assert not child.is_alive
        with pytest.raises(ActorStoppedError):
            child.tell("anything")
        # The parent itself carries on.
        assert pref.is_alive
        assert await within(pref.ask("child")) is child
    assert top_failures == []


async def test_on_start_failure_reported_to_runtime_callback() -> None:
    reported: asyncio.Future[ChildFailed] = asyncio.get_running_loop().create_future()
    stopped = asyncio.Event()

    class BadStart(Actor):
        async def on_start(self) -> None:
            raise OSError("cannot bind")

        async def on_stop(self) -> None:
            stopped.set()

    def on_failure(report: ChildFailed) -> None:
        reported.set_result(report)

    async with Runtime(on_failure=on_failure) as rt:
        ref = rt.start(BadStart(), name="bad")
        queued = asyncio.create_task(ref.ask("never answered"))
        report = await within(reported)
        assert report.ref is ref and "cannot bind" in report.error
        assert stopped.is_set()  # on_stop runs after a failed on_start too
        with pytest.raises(ActorStoppedError) as info:
            await within(queued)
        assert isinstance(info.value.cause, OSError)


async def test_children_stop_before_parent_in_reverse_start_order() -> None:
    order: list[str] = []

    class Node(Actor):
        def __init__(self, label: str, kids: tuple[str, ...] = ()) -> None:
            self.label = label
            self.kids = kids

        async def on_start(self) -> None:
            self.refs = [self.spawn_child(Node(kid), name=kid) for kid in self.kids]

        async def receive(self, msg: object) -> object:
            for ref in self.refs:  # "ready" once every descendant has run on_start
                await ref.ask(msg)
            return self.label

        async def on_stop(self) -> None:
            order.append(self.label)

    async with Runtime() as rt:
        a = rt.start(Node("A", ("A1", "A2")), name="A")
        b = rt.start(Node("B", ("B1",)), name="B")
        assert await within(a.ask("ready")) == "A"
        assert await within(b.ask("ready")) == "B"
    assert order == ["B1", "B", "A2", "A1", "A"]


async def test_runtime_exit_leaves_no_task() -> None:
    before = set(asyncio.all_tasks())
    events = new_events()
    failed: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    release = asyncio.Event()
    async with Runtime(on_failure=lambda _: None) as rt:
        rt.start(Parent(events, failed), name="parent")
        gate = Gate()
        gref = rt.start(gate, name="gate")
        pending = asyncio.create_task(gref.ask(("wait", release)))
        await within(gate.entered.wait())
        await within(events["bg_started"].wait())
        crasher = rt.start(Worker(new_events()), name="crasher")
        crasher.tell("crash")
        release.set()
        assert await within(pending) == "released"
    assert set(asyncio.all_tasks()) == before
    assert events["bg_cancelled"].is_set() and events["on_stop"].is_set()
    with pytest.raises(ActorError):
        rt.start(Recorder())


async def test_self_ask_is_refused_instead_of_deadlocking() -> None:
    class Selfish(Actor):
        async def receive(self, msg: object) -> object:
            return await self.ref.ask("again")

    async with Runtime() as rt:
        ref = rt.start(Selfish(), name="selfish")
        with pytest.raises(ActorError, match="asked itself"):
            await within(ref.ask("go"))


async def test_actor_can_stop_itself_from_its_handler() -> None:
    stopped = asyncio.Event()

    class Quitter(Actor):
        async def receive(self, msg: object) -> object:
            await self.ref.stop()  # only requests the stop: must not wait on itself
            return "bye"

        async def on_stop(self) -> None:
            stopped.set()

    async with Runtime() as rt:
        ref = rt.start(Quitter(), name="quitter")
        assert await within(ref.ask("quit")) == "bye"
        await within(ref.wait_stopped())
        assert stopped.is_set() and not ref.is_alive


async def test_actor_instance_starts_once() -> None:
    async with Runtime() as rt:
        rec = Recorder()
        rt.start(rec)
        with pytest.raises(ActorError, match="already started"):
            rt.start(rec)


class Deferring(Actor):
    """Answers ("slow", key) with Later(task) that waits for ``gates[key]``; other asks at once."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task[object]] = {}

    async def receive(self, msg: object) -> object:
        if isinstance(msg, tuple) and msg[0] == "slow":
            key = msg[1]
            if key not in self.tasks:
                self.gates[key] = asyncio.Event()
                self.tasks[key] = self.spawn(self._work(key), name=f"work-{key}")
            return Later(self.tasks[key])
        return ("now", msg)

    async def _work(self, key: str) -> object:
        await self.gates[key].wait()
        if key.startswith("fail"):
            raise LookupError(key)
        return ("done", key)


async def test_later_answers_when_task_finishes_without_blocking_mailbox() -> None:
    failures: list[ChildFailed] = []
    async with Runtime(on_failure=failures.append) as rt:
        actor = Deferring()
        ref = rt.start(actor, name="deferring")
        first = asyncio.create_task(ref.ask(("slow", "a")))
        second = asyncio.create_task(ref.ask(("slow", "a")))  # shares the same task
        # The mailbox is free while the work runs.
        assert await within(ref.ask("ping")) == ("now", "ping")
        assert not first.done() and not second.done()
        actor.gates["a"].set()
        assert await within(first) == ("done", "a")
        assert await within(second) == ("done", "a")
        # An exception of a Later task goes to the asker; the actor keeps running.
        failing = asyncio.create_task(ref.ask(("slow", "fail-1")))
        await within(ref.ask("sync"))  # the task now exists
        actor.gates["fail-1"].set()
        with pytest.raises(LookupError, match="fail-1"):
            await within(failing)
        assert ref.is_alive
        assert await within(ref.ask("still")) == ("now", "still")
    assert failures == []


async def test_later_task_is_cancelled_when_its_last_asker_gives_up() -> None:
    async with Runtime() as rt:
        actor = Deferring()
        ref = rt.start(actor, name="deferring")
        first = asyncio.create_task(ref.ask(("slow", "k")))
        second = asyncio.create_task(ref.ask(("slow", "k")))
        await asyncio.sleep(0)  # let both asks enqueue before the next one
        await within(ref.ask("sync"))
        work = actor.tasks["k"]
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await within(ref.ask("sync"))
        assert not work.done()  # `second` still waits on it
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        await within(asyncio.wait({work}))
        assert work.cancelled()  # the last asker gave up: the work left no trace
        assert ref.is_alive
        assert await within(ref.ask("after")) == ("now", "after")


async def test_later_pending_when_actor_stops_fails_with_actor_stopped() -> None:
    async with Runtime() as rt:
        ref = rt.start(Deferring(), name="deferring")
        pending = asyncio.create_task(ref.ask(("slow", "never")))
        await within(ref.ask("sync"))
        await within(ref.stop())
        with pytest.raises(ActorStoppedError):
            await within(pending)


async def test_request_stop_does_not_wait() -> None:
    stopped = asyncio.Event()

    class Stoppable(Actor):
        async def on_stop(self) -> None:
            stopped.set()

    async with Runtime() as rt:
        ref = rt.start(Stoppable(), name="stoppable")
        ref.request_stop()
        assert not ref.is_alive
        with pytest.raises(ActorStoppedError):
            ref.tell("x")
        await within(ref.wait_stopped())
        assert stopped.is_set()


def test_unstarted_actor_has_no_ref() -> None:
    with pytest.raises(ActorError, match="not been started"):
        _ = Recorder().ref


def test_restart_intensity_backs_off_then_gives_up_and_forgets_old_failures() -> None:
    from actors.runtime import RestartIntensity

    intensity = RestartIntensity(3, 60.0, first=0.1, cap=0.3)
    assert [intensity.next_delay(t) for t in (0.0, 1.0, 2.0)] == [0.1, 0.2, 0.3]
    assert intensity.next_delay(3.0) is None  # three within a minute: give up
    # A minute after the first failure it no longer counts: one restart is allowed again.
    assert intensity.next_delay(60.5) == 0.3
    assert intensity.next_delay(61.5) == 0.3
    assert intensity.next_delay(61.6) is None
