"""A small actor runtime on plain asyncio.

Why our own: every actor of a connection shares one event loop (datagrams are handed over by direct
synchronous calls, see DESIGN.md section 1), so all we need from "actors" is a mailbox, a task that
drains it one message at a time, and supervision. An external actor library would add a scheduler
and a process model we do not want on the data path.

The rules this module keeps:

* One mailbox (a FIFO with one reader) and at most one task per actor reading it; messages are
  handled one at a time in arrival order, so an actor's state needs no lock and delivery is ordered
  per sender.
* An actor class that sets ``parks_when_idle`` has that task only while it has mail: the task ends
  when the mailbox runs empty and the next message (or stop) starts a new one, because a node holds
  thousands of mostly idle connections of three actors each, and a parked actor costs no task.
* ``ask`` failures go back to the asker only; the actor keeps running.
* Any other failure (a ``tell`` handler, ``on_start``, a task the actor owns) stops the actor and
  is reported to its parent as a :class:`ChildFailed` *message* (Erlang style). A TaskGroup would
  instead cancel the siblings, which is exactly what a supervisor must not do.
* Nothing leaks: children stop before their parent (reverse start order), owned tasks are cancelled
  and awaited, and :class:`Runtime` awaits every task it created before ``__aexit__`` returns,
  whether an actor is parked or not.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from actors.lifecycle import Closing

__all__ = [
    "Actor",
    "ActorError",
    "ActorRef",
    "ActorStoppedError",
    "AskTimeoutError",
    "ChildFailed",
    "Later",
    "RestartIntensity",
    "Runtime",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The actor cell whose task (or owned task) is running; lets ``tell``/``ask`` fill in the sender
#: and lets ``stop`` avoid waiting on itself.
_current: contextvars.ContextVar[_Cell | None] = contextvars.ContextVar("actor", default=None)

#: Wakes an idle actor so it notices a stop request; never handed to ``receive``.
_WAKE = object()

_Item = tuple[object, "asyncio.Future[object] | None", "ActorRef | None"]


class ActorError(Exception):
    """Base class of the runtime's own errors."""


class ActorStoppedError(ActorError):
    """The actor is stopped (or stopping) and takes no more messages.

    ``cause`` is the exception that made the actor fail, if it failed, so an asker whose request
    was still queued learns why.
    """

    def __init__(self, name: str, cause: BaseException | None = None) -> None:
        self.actor_name = name
        self.cause = cause
        text = f"actor {name!r} is stopped"
        if cause is not None:
            text += f" (it failed: {cause!r})"
        super().__init__(text)


class AskTimeoutError(ActorError, TimeoutError):
    """No reply to an ``ask`` within its timeout.

    Also a ``TimeoutError`` so callers that only care about "took too long" can catch that.
    """

    def __init__(self, name: str, msg_type: str, timeout: float) -> None:
        self.actor_name = name
        self.msg_type = msg_type
        self.timeout = timeout
        super().__init__(f"actor {name!r} did not answer {msg_type} within {timeout:g}s")


@dataclass(frozen=True, slots=True)
class ChildFailed:
    """Delivered to a parent's mailbox (or the Runtime's callback) after a child failed and stopped.

    The child is fully stopped when this arrives (its tasks awaited, ``on_stop`` run), so a
    supervisor may restart it at once and reuse its resources (ports, names).
    """

    ref: ActorRef
    name: str
    error: str
    traceback: str


class RestartIntensity:
    """Erlang/OTP's restart intensity for one child, sans-I/O: at most ``max_restarts``
    within ``period`` seconds, each after a backoff (``first`` doubling to ``cap``); past
    that the parent gives up on the child (``next_delay`` returns None)."""

    def __init__(
        self, max_restarts: int, period: float, *, first: float = 0.1, cap: float = 5.0
    ) -> None:
        self.max_restarts = max_restarts
        self.period = period
        self.first = first
        self.cap = cap
        self._at: list[float] = []

    def next_delay(self, now: float) -> float | None:
        """A failure at ``now``: how long to wait before restarting, or None: do not."""
        self._at = [t for t in self._at if now - t < self.period]
        if len(self._at) >= self.max_restarts:
            return None
        self._at.append(now)
        return min(self.first * 2 ** (len(self._at) - 1), self.cap)


@dataclass(frozen=True, slots=True)
class Later:
    """Returned by ``receive`` to answer an ``ask`` when ``task`` finishes instead of now.

    Why: a handler that waits on the network (a probe, a handshake) would hold up the mailbox.
    It spawns the work as an owned task and returns ``Later(task)``; the actor goes on handling
    messages, and the asker gets the task's result, or its exception (to the asker only: the
    actor keeps running, as for any ask). Several asks may share one task; when the last ask
    waiting on it is cancelled (or times out) the task is cancelled too, so an abandoned
    operation leaves no trace. If the task is cancelled otherwise, the asker gets
    :class:`ActorStoppedError` when the actor is stopping, else an :class:`ActorError`.

    Wrap a task that is still running (e.g. just spawned): one that already failed before being
    wrapped has already failed the actor. Returned for a ``tell``, the task's failure is the
    actor's failure.
    """

    task: asyncio.Future[Any]


def _format(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


class Actor:
    """Base class: override :meth:`on_start`, :meth:`receive` and :meth:`on_stop`.

    No ``__init__`` is required of subclasses; the runtime attaches the actor when it is started.
    An actor instance can be started once.
    """

    _cell: _Cell | None = None

    #: True: the actor's task ends whenever its mailbox runs empty ("parks") and the next message
    #: or stop request starts a new one. For actors that are numerous and idle most of their life
    #: (a connection's): a parked actor holds no task, coroutine frame or waiter future, at the
    #: price of one task creation per message that finds it idle. Its tasks share one context, so
    #: contextvars survive parking. Unlike a waiting task, a parked actor is not woken by loop
    #: teardown to run ``on_stop``: stop it (or its Runtime) before the loop closes.
    parks_when_idle: ClassVar[bool] = False

    async def on_start(self) -> None:
        """Runs in the actor's task before the first message; a failure here stops the actor."""

    async def on_stop(self) -> None:
        """Runs once when the actor stops, after its children stopped and its tasks were awaited.

        Also runs after a failed ``on_start``, or none at all when the actor was stopped before
        its task first ran, so it must tolerate partial initialisation.
        """

    async def receive(self, msg: object) -> object:
        """Handle one message; the return value answers an ``ask`` (ignored for ``tell``).

        The default raises, so an unhandled message (including an unhandled :class:`ChildFailed`)
        escalates as a failure instead of vanishing.
        """
        raise TypeError(f"{type(self).__name__} does not handle {type(msg).__name__}")

    @property
    def ref(self) -> ActorRef:
        """This actor's own reference."""
        return self._require_cell().ref

    @property
    def sender(self) -> ActorRef | None:
        """The actor that sent the message being handled, or None when sent from outside actors."""
        return self._require_cell().sender

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
        """Start a background task owned by this actor.

        It is cancelled and awaited when the actor stops; if it raises, the actor fails (reported
        to the parent) rather than the error being lost in an unobserved task.
        """
        return self._require_cell().spawn(coro, name)

    def spawn_child(self, actor: Actor, *, name: str | None = None) -> ActorRef:
        """Start a child actor; it reports failures to this actor and stops before it."""
        cell = self._require_cell()
        return cell.runtime._start(actor, name, parent=cell)

    def _require_cell(self) -> _Cell:
        if self._cell is None:
            raise ActorError(f"{type(self).__name__} has not been started by a Runtime")
        return self._cell


class ActorRef:
    """The only handle other code holds on an actor: send to it, ask it, stop it."""

    __slots__ = ("_cell",)

    def __init__(self, cell: _Cell) -> None:
        self._cell = cell

    @property
    def name(self) -> str:
        return self._cell.name

    @property
    def is_alive(self) -> bool:
        """False from the moment a stop was requested or a failure happened."""
        return not self._cell.stopping

    @property
    def parked(self) -> bool:
        """True while the actor holds no task because it is idle (``parks_when_idle`` only).

        Lets tests and benchmarks check the cost of idle connections without counting tasks.
        """
        return self._cell.task is None

    def request_stop(self) -> None:
        """Ask for a graceful stop without waiting for it (usable from anywhere, even sync code)."""
        self._cell.request_stop()

    def tell(self, msg: object) -> None:
        """Queue ``msg`` without waiting. Raises :class:`ActorStoppedError` if the actor stopped."""
        cell = self._cell
        if cell.stopping:
            raise ActorStoppedError(cell.name, cell.failure)
        cell.mailbox.put_nowait((msg, None, _sender_ref()))
        if cell.task is None:
            cell.unpark()

    async def ask(self, msg: object, timeout: float | None = None) -> object:
        """Send ``msg`` and wait for what ``receive`` returns (or re-raise what it raised).

        Cancelling the caller (or a timeout) does not disturb the actor: a request it has not
        started yet is skipped, one in progress finishes and its reply is dropped. A request
        answered with :class:`Later` whose task nobody else waits on is cancelled, and the
        cancellation waits for that task's cleanup (Trio's rule: a cancelled switch has rolled
        back by the time the caller sees ``CancelledError``).
        """
        cell = self._cell
        if cell.stopping:
            raise ActorStoppedError(cell.name, cell.failure)
        task = cell.task  # None when parked: then no handler of this actor is running
        if task is not None and asyncio.current_task() is task:
            raise ActorError(f"actor {cell.name!r} asked itself, which would deadlock")
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        cell.mailbox.put_nowait((msg, fut, _sender_ref()))
        if task is None:
            cell.unpark()
        if timeout is None:  # the common case: no timeout context manager per ask
            try:
                return await fut
            except asyncio.CancelledError:
                await cell.settle_abandoned(fut)
                raise
        cm = asyncio.timeout(timeout)
        try:
            async with cm:
                return await fut
        except TimeoutError:
            await cell.settle_abandoned(fut)
            if cm.expired():
                raise AskTimeoutError(cell.name, type(msg).__name__, timeout) from None
            raise
        except asyncio.CancelledError:
            await cell.settle_abandoned(fut)
            raise

    async def stop(self) -> None:
        """Stop gracefully: finish the message in hand, handle nothing further, run ``on_stop``.

        Returns once the actor has fully stopped (``on_stop`` ran, a failure was reported); a
        parked actor gets a task for that. Idempotent. Called from the actor itself (or one of its
        descendants) it only requests the stop, since waiting would wait on itself.
        """
        await self._cell.stop_and_wait()

    async def wait_stopped(self) -> None:
        """Wait until the actor has fully stopped (or its task was killed), whatever ended it."""
        cell = self._cell
        if not cell.finished:
            await asyncio.wait({cell.stopped_future()})

    def __repr__(self) -> str:
        state = "alive" if self.is_alive else "stopped"
        return f"<ActorRef {self._cell.name!r} {state}>"


def _sender_ref() -> ActorRef | None:
    cell = _current.get()
    return None if cell is None else cell.ref


class _Mailbox:
    """A FIFO with one reader (the actor's task): a deque and, while it waits, one future.

    A parking actor's task never waits on it (it parks instead), so it holds no future then.

    Not an ``asyncio.Queue``: that carries two more deques and an Event (one more) for many
    readers and bounded sizes, ~2 KiB per actor at ~0.6 KiB a deque, and a connection has three
    actors (bench B4 counts RSS per connection).
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        # Made on first mail and dropped when drained: a deque allocates a ~0.6 KiB block at
        # once, and most of a node's actors hold no mail most of the time.
        self._items: collections.deque[_Item] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._items) if self._items is not None else 0

    def put_nowait(self, item: _Item) -> None:
        if self._items is None:
            self._items = collections.deque()
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def get_nowait(self) -> _Item:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._pop(self._items)

    async def get(self) -> _Item:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._pop(self._items)

    def _pop(self, items: collections.deque[_Item]) -> _Item:
        item = items.popleft()
        if not items:
            self._items = None
        return item


class _LaterBook:
    """Asks answered by :class:`Later` tasks, while any are pending."""

    __slots__ = ("askers", "replies", "reply_tasks", "task_of")

    def __init__(self) -> None:
        self.reply_tasks: set[asyncio.Future[Any]] = set()  # their errors go to askers
        self.replies: set[asyncio.Future[object]] = set()  # asks awaiting a Later task
        self.askers: dict[asyncio.Future[Any], set[asyncio.Future[object]]] = {}
        self.task_of: dict[asyncio.Future[object], asyncio.Future[Any]] = {}  # reply -> task


class _Cell:
    """Runtime-side state of one actor; kept apart from :class:`Actor` so subclasses stay clean."""

    __slots__ = (  # a node holds thousands of cells: no instance dict
        "_stopped",
        "actor",
        "children",
        "context",
        "entered",
        "failure",
        "finished",
        "forced",
        "later",
        "loop",
        "mailbox",
        "name",
        "parent",
        "parks",
        "ref",
        "runtime",
        "sender",
        "shutting_down",
        "started",
        "stopping",
        "task",
        "tasks",
    )

    def __init__(self, actor: Actor, name: str, runtime: Runtime, parent: _Cell | None) -> None:
        self.actor = actor
        self.name = name
        self.runtime = runtime
        self.parent = parent
        self.ref = ActorRef(self)
        self.mailbox = _Mailbox()
        self.children: list[_Cell] = []
        # Owned tasks and the Later book exist only while in use (a node holds thousands of
        # idle actors: empty sets and dicts cost ~0.2 KiB each).
        self.tasks: set[asyncio.Task[Any]] | None = None
        self.later: _LaterBook | None = None
        self.sender: ActorRef | None = None
        self.failure: BaseException | None = None
        self.stopping = False  # no new messages accepted
        self.started = False  # the first task began (on_start runs once, in it)
        self.entered = False  # this task began _main (cancelling one that never ran skips cleanup)
        self.shutting_down = False  # past the point where a forced cancel is allowed
        self.forced = False  # we cancelled our own task to cut a handler short
        self.finished = False  # _finish ran, or the task was killed: nothing runs this actor again
        # Created only when someone waits for the stop, so an idle actor holds no future.
        self._stopped: asyncio.Future[None] | None = None
        self.loop = asyncio.get_running_loop()
        # Every task of this actor runs in this one context (they never overlap), so contextvars
        # set in on_start or a handler survive parking as they would in a single task.
        self.context = contextvars.copy_context()
        actor._cell = self
        #: The task reading the mailbox; None while parked (a message then starts one).
        self.task: asyncio.Task[None] | None = None
        self.unpark()

    # -- lifecycle --------------------------------------------------------------------------

    def unpark(self) -> None:
        """Start the task that reads the mailbox (at start, or when mail reaches a parked actor).

        Registered with the runtime, since ``Runtime.stop`` must await every task it created,
        including the many short ones of a parking actor.
        """
        if self.finished:
            return
        self.entered = False
        task = self.loop.create_task(self._main(), name=f"actor:{self.name}", context=self.context)
        self.task = task
        self.runtime._tasks.add(task)
        task.add_done_callback(self._task_ended)

    async def _main(self) -> None:
        _current.set(self)
        self.entered = True
        parked = False
        try:
            if not self.started:
                self.started = True
                # Stopped before it ever ran: skip on_start (it could not spawn anyway) but still
                # run on_stop, so resources handed to the constructor are released.
                if not self.stopping:
                    await self.actor.on_start()
            mailbox = self.mailbox
            if self.actor.parks_when_idle:
                while not self.stopping:
                    if not mailbox:
                        # Synchronous up to the task's end, so a message posted after this line
                        # sees task None and starts the next task: never two readers at once.
                        self.task = None
                        parked = True
                        return
                    item = mailbox.get_nowait()
                    if item[0] is not _WAKE:
                        await self._dispatch(*item)
            else:
                while not self.stopping:
                    item = await mailbox.get()
                    if self.stopping:
                        self._reject(item)
                        break
                    if item[0] is not _WAKE:
                        await self._dispatch(*item)
        except asyncio.CancelledError:
            if not self.forced:
                raise  # cancelled from outside (e.g. loop shutdown): clean up, then propagate
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        except Exception as exc:
            self.fail(exc)
        finally:
            if not parked:
                await self._shutdown()

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        self.runtime._tasks.discard(task)
        if task is self.task and not self.finished:
            # It neither parked nor reached _finish: killed from outside (loop teardown, or
            # cancelled before it ran). No task will run this actor again: release its waiters.
            self.stopping = True
            self._mark_ended()

    def _mark_ended(self) -> None:
        self.finished = True
        fut = self._stopped
        if fut is not None and not fut.done():
            fut.set_result(None)

    def stopped_future(self) -> asyncio.Future[None]:
        """Done once the actor fully stopped; what stop and ``wait_stopped`` wait on.

        A future rather than the task, since a parked actor has no task to wait on.
        """
        fut = self._stopped
        if fut is None:
            fut = self._stopped = self.loop.create_future()
            if self.finished:
                fut.set_result(None)
        return fut

    async def _dispatch(
        self, msg: object, reply: asyncio.Future[object] | None, sender: ActorRef | None
    ) -> None:
        if reply is not None and reply.done():
            return  # the asker gave up before we started: leave no trace
        self.sender = sender
        try:
            result = await self.actor.receive(msg)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # We are being stopped or cancelled: the asker must not wait for ever.
                if reply is not None and not reply.done():
                    reply.set_exception(ActorStoppedError(self.name, self.failure))
                raise
            err = ActorError(f"handler for {type(msg).__name__} in {self.name!r} was cancelled")
            err.__cause__ = exc
            if reply is None:
                raise err from exc
            if not reply.done():
                reply.set_exception(err)
        except Exception as exc:
            if reply is None:
                raise  # a tell handler failing is the actor failing
            if not reply.done():
                reply.set_exception(exc)
        else:
            if isinstance(result, Later):
                self._reply_later(result.task, reply)
            elif reply is not None and not reply.done():
                reply.set_result(result)
        finally:
            self.sender = None

    def _reply_later(self, fut: asyncio.Future[Any], reply: asyncio.Future[object] | None) -> None:
        if reply is None:
            if not self.tasks or fut not in self.tasks:  # an owned task's failure: _task_done
                fut.add_done_callback(self._foreign_done)
            return
        book = self.later
        if book is None:
            book = self.later = _LaterBook()
        book.reply_tasks.add(fut)
        book.replies.add(reply)
        book.askers.setdefault(fut, set()).add(reply)
        book.task_of[reply] = fut
        fut.add_done_callback(lambda done: self._later_done(reply, done))
        reply.add_done_callback(lambda r: self._later_asker_gone(fut, r))

    async def settle_abandoned(self, reply: asyncio.Future[object]) -> None:
        """Wait (through further cancellations) until the Later task ``reply`` was waiting on
        has ended, if giving up on it cancels it; an abandoned request leaves no work behind."""
        book = self.later
        task = book.task_of.pop(reply, None) if book is not None else None
        if task is None or task.done() or (book and book.askers.get(task, set()) - {reply}):
            return  # never started, already over, or another ask still wants it
        if not reply.done():
            reply.cancel()  # the timeout path: make the last asker's departure cancel the task
        cancelled = False
        while not task.done():
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError

    def _later_asker_gone(self, fut: asyncio.Future[Any], reply: asyncio.Future[object]) -> None:
        """An ask on a Later task was answered or given up; the last one to give up cancels it.

        So a cancelled operation leaves no trace (a cancelled switch rolls back), while a task
        that another ask still waits on keeps running.
        """
        book = self.later
        waiting = book.askers.get(fut) if book is not None else None
        if book is None or waiting is None:
            return
        waiting.discard(reply)
        if waiting:
            return
        del book.askers[fut]
        self._tidy_later(book)
        if reply.cancelled() and not fut.done():
            fut.cancel()

    def _tidy_later(self, book: _LaterBook) -> None:
        if not (book.reply_tasks or book.replies or book.askers or book.task_of):
            self.later = None

    def _later_done(self, reply: asyncio.Future[object], fut: asyncio.Future[Any]) -> None:
        book = self.later
        if book is not None:
            book.replies.discard(reply)
            book.task_of.pop(reply, None)
            book.reply_tasks.discard(fut)
            self._tidy_later(book)
        if fut.cancelled():
            if not reply.done():
                if self.stopping:
                    reply.set_exception(ActorStoppedError(self.name, self.failure))
                else:
                    reply.set_exception(ActorError(f"{self.name!r} cancelled the reply's task"))
            return
        exc = fut.exception()  # also marks it retrieved when nobody waits any more
        if reply.done():
            return  # the asker gave up
        if exc is not None:
            reply.set_exception(exc)
        else:
            reply.set_result(fut.result())

    def _foreign_done(self, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and (exc := fut.exception()) is not None and not self.stopping:
            self.fail(exc)
            self.force()

    def fail(self, exc: BaseException) -> None:
        """Record the first failure and stop taking messages."""
        if self.failure is None:
            self.failure = exc
        self.request_stop()

    def request_stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.post((_WAKE, None, None))

    def post(self, item: _Item) -> None:
        """Queue ``item``, starting a task if the actor is parked (so a stop gets its shutdown)."""
        self.mailbox.put_nowait(item)
        if self.task is None:
            self.unpark()

    def force(self) -> None:
        """Cut the running handler short (not ``on_stop``: cleanup always runs to the end).

        A parked actor has no handler to cut: its stop request already started its shutdown.
        """
        task = self.task
        if task is not None and self.entered and not self.shutting_down and not task.done():
            self.forced = True
            task.cancel()

    async def stop_and_wait(self) -> None:
        self.request_stop()
        here = _current.get()
        while here is not None:
            if here is self:
                return  # we are inside this actor (or a descendant): waiting would deadlock
            here = here.parent
        if self.finished:
            return
        stopped = self.stopped_future()
        grace = self.runtime.stop_grace
        done, _ = await asyncio.wait({stopped}, timeout=grace)
        if not done:
            log.warning(
                "actor %r did not stop within %ss; cancelling its handler", self.name, grace
            )
            self.force()
            await asyncio.wait({stopped})

    async def _shutdown(self) -> None:
        self.stopping = True
        self.shutting_down = True
        for child in reversed(list(self.children)):
            await child.stop_and_wait()
        tasks = list(self.tasks or ())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        try:
            await self.actor.on_stop()
        except Exception as exc:
            log.warning("on_stop of actor %r raised %r", self.name, exc)
            if self.failure is None:
                self.failure = exc
        self._finish()

    def _finish(self) -> None:
        """Final bookkeeping: fail queued asks, detach, report a failure upwards."""
        if self.finished:
            return
        self.finished = True
        self.stopping = True
        while True:
            try:
                self._reject(self.mailbox.get_nowait())
            except asyncio.QueueEmpty:
                break
        if self.later is not None:
            for reply in self.later.replies:  # Later on a future the actor did not own
                if not reply.done():
                    reply.set_exception(ActorStoppedError(self.name, self.failure))
            self.later.replies.clear()
        siblings = self.parent.children if self.parent is not None else self.runtime._top
        if self in siblings:
            siblings.remove(self)
        if self.failure is not None:
            self._report(self.failure)
        self._mark_ended()

    def _reject(self, item: _Item) -> None:
        reply = item[1]
        if reply is not None and not reply.done():
            reply.set_exception(ActorStoppedError(self.name, self.failure))

    def _report(self, exc: BaseException) -> None:
        report = ChildFailed(self.ref, self.name, repr(exc), _format(exc))
        parent = self.parent
        if parent is None:
            self.runtime._report(report)
        elif parent.stopping:
            log.warning(
                "actor %r failed while its parent %r stops: %r", self.name, parent.name, exc
            )
        else:
            parent.post((report, None, self.ref))

    # -- owned tasks ------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None) -> asyncio.Task[T]:
        if self.stopping:
            coro.close()  # never awaited: close it so Python does not warn about it
            raise ActorStoppedError(self.name, self.failure)
        # Run it in this actor's context wherever spawn is called from, so its tell/ask carry
        # this actor as sender and a stop it requests on its own actor does not wait on itself.
        ctx = contextvars.copy_context()
        ctx.run(_current.set, self)
        task = asyncio.get_running_loop().create_task(
            coro, name=name or f"{self.name}:task", context=ctx
        )
        if self.tasks is None:
            self.tasks = set()
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if self.tasks is not None:
            self.tasks.discard(task)
            if not self.tasks:
                self.tasks = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None or (self.later is not None and task in self.later.reply_tasks):
            return  # a Later task's error belongs to its askers
        if self.stopping:
            log.warning("task %r of stopping actor %r raised %r", task.get_name(), self.name, exc)
            return
        self.fail(exc)
        self.force()


class Runtime(Closing):
    """Owns every actor task; ``async with Runtime() as rt`` guarantees none outlives the block.

    That includes each task a parked actor was given for later mail or for its stop.

    ``on_failure`` receives :class:`ChildFailed` for top-level actors (they have no parent mailbox);
    by default the failure is logged. ``stop_grace`` bounds how long a stop waits for the handler in
    progress before cancelling it (None: wait as long as it takes).
    """

    def __init__(
        self,
        *,
        on_failure: Callable[[ChildFailed], None] | None = None,
        stop_grace: float | None = 5.0,
    ) -> None:
        self.on_failure = on_failure
        self.stop_grace = stop_grace
        self._top: list[_Cell] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def close(self) -> None:
        """``stop()``, the name ``async with`` closes by."""
        await self.stop()

    def start(self, actor: Actor, *, name: str | None = None) -> ActorRef:
        """Start a top-level actor. ``on_start`` runs in its task; messages sent meanwhile queue."""
        return self._start(actor, name, parent=None)

    async def stop(self) -> None:
        """Stop all actors, last started first, and await every task this runtime created."""
        self._closed = True
        for cell in reversed(list(self._top)):
            await cell.stop_and_wait()
        # Actors that stopped by themselves (or failed) may still be finishing their last step;
        # loop until none is left, so that a task one of those steps started is awaited too.
        while pending := {task for task in self._tasks if not task.done()}:
            await asyncio.wait(pending)

    def _start(self, actor: Actor, name: str | None, parent: _Cell | None) -> ActorRef:
        if self._closed:
            raise ActorError("runtime is stopped")
        if parent is not None and parent.stopping:
            raise ActorStoppedError(parent.name, parent.failure)
        if actor._cell is not None:
            raise ActorError(f"{type(actor).__name__} instance was already started")
        cell = _Cell(actor, name or type(actor).__name__, self, parent)
        (parent.children if parent is not None else self._top).append(cell)
        return cell.ref

    def _report(self, report: ChildFailed) -> None:
        if self.on_failure is None:
            log.error("actor %r failed: %s\n%s", report.name, report.error, report.traceback)
            return
        try:
            self.on_failure(report)
        except Exception:
            log.exception("on_failure callback raised while reporting %r", report.name)
