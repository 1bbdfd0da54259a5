"""Migration events (go-libp2p's ``core/event`` types, in Python) and the bus that carries them.

Events are frozen dataclasses so one object can be handed to many subscribers; registered with
the envelope codec (``event.<ClassName>``) so they are written to the journal and sent across a
process boundary unchanged. No event type subclasses another, so
subscribing to ``EvtConnectionMigrationStarted`` never delivers a ``Completed``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Literal, get_args

from multiaddr import Multiaddr

from actors.envelope import message
from actors.path_state import PathState

__all__ = [
    "EVENT_TYPES",
    "OUTCOMES",
    "Event",
    "EventBus",
    "EvtConnectionMigrationCompleted",
    "EvtConnectionMigrationFailed",
    "EvtConnectionMigrationStarted",
    "EvtNetworkChanged",
    "EvtPathAdded",
    "EvtPathRemoved",
    "EvtPathStateChanged",
    "MigrationInitiator",
    "MigrationOutcome",
    "MigrationReason",
    "Subscription",
    "initiator_of",
]

log = logging.getLogger(__name__)

MigrationReason = Literal["manual", "failover", "drain", "network", "preferred_address"]
_REASONS: Final = frozenset(get_args(MigrationReason))
#: Who asked for a migration: the application (``switch()``), an operator (drain, ``ctl``,
#: ``fleet``) or one of the supervisor's policies (failover, network, preferred address).
MigrationInitiator = Literal["application", "operator", "policy"]
_INITIATORS: Final = frozenset(get_args(MigrationInitiator))


def initiator_of(reason: str) -> MigrationInitiator:
    """The initiator a reason implies when the request did not say."""
    if reason == "manual":
        return "application"
    if reason == "drain":
        return "operator"
    return "policy"


#: How a migration that did not complete ended: exactly one per failed migration (DESIGN
#: section 3), on the Failed event, the ``quic.migration`` span (``quic.migration.outcome``)
#: and the ``quic.migrations`` metric. ``rejected``: refused before anything was sent (the
#: target was not validated, or closed meanwhile).
MigrationOutcome = Literal[
    "probe_timeout",
    "no_connection_id",
    "peer_disabled",
    "rolled_back",
    "cancelled",
    "connection_closed",
    "rejected",
]
OUTCOMES: Final = frozenset(get_args(MigrationOutcome))


@dataclass(frozen=True, slots=True)
class Event:
    """Fields every event carries. ``time`` is wall-clock ``time.time()`` (for logs and
    correlation across hosts, not for measuring durations). Not published by itself."""

    conn_id: str
    remote_addr: Multiaddr
    time: float


def _check_reason(reason: str, initiator: str = "application") -> None:
    if reason not in _REASONS:
        raise ValueError(f"reason must be one of {sorted(_REASONS)}, got {reason!r}")
    if initiator not in _INITIATORS:
        raise ValueError(f"initiator must be one of {sorted(_INITIATORS)}, got {initiator!r}")


@message("event.EvtConnectionMigrationStarted")
@dataclass(frozen=True, slots=True)
class EvtConnectionMigrationStarted(Event):
    """A switch began: ``switch()`` (reason "manual"), the failover policy ("failover"), or a
    drain of the current path ("drain")."""

    from_local_addr: Multiaddr
    to_local_addr: Multiaddr
    reason: MigrationReason
    initiator: MigrationInitiator = "application"

    def __post_init__(self) -> None:
        _check_reason(self.reason, self.initiator)


@message("event.EvtConnectionMigrationCompleted")
@dataclass(frozen=True, slots=True)
class EvtConnectionMigrationCompleted(Event):
    """The peer was confirmed on the new path. ``probe_rtt``: seconds, from the probe that
    validated the new path (``None`` if it had none)."""

    from_local_addr: Multiaddr
    to_local_addr: Multiaddr
    reason: MigrationReason
    probe_rtt: float | None
    initiator: MigrationInitiator = "application"

    def __post_init__(self) -> None:
        _check_reason(self.reason, self.initiator)


@message("event.EvtConnectionMigrationFailed")
@dataclass(frozen=True, slots=True)
class EvtConnectionMigrationFailed(Event):
    """The switch did not complete. ``outcome`` says how (one of :data:`OUTCOMES`);
    ``connection_closed`` whether the connection is gone; otherwise it is back on
    ``from_local_addr``."""

    from_local_addr: Multiaddr
    to_local_addr: Multiaddr
    reason: MigrationReason
    error: str
    connection_closed: bool
    outcome: MigrationOutcome = "rolled_back"
    initiator: MigrationInitiator = "application"

    def __post_init__(self) -> None:
        _check_reason(self.reason, self.initiator)
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(OUTCOMES)}, got {self.outcome!r}")


@message("event.EvtPathAdded")
@dataclass(frozen=True, slots=True)
class EvtPathAdded(Event):
    """``add_path`` bound a new path socket (nothing was sent)."""

    local_addr: Multiaddr


@message("event.EvtPathRemoved")
@dataclass(frozen=True, slots=True)
class EvtPathRemoved(Event):
    """A path was closed: its socket is closed and its connection ID retired."""

    local_addr: Multiaddr


@message("event.EvtPathStateChanged")
@dataclass(frozen=True, slots=True)
class EvtPathStateChanged(Event):
    """A path moved along an edge of ``actors.path_state.TRANSITIONS``."""

    local_addr: Multiaddr
    old: PathState
    new: PathState


@message("event.EvtNetworkChanged")
@dataclass(frozen=True, slots=True)
class EvtNetworkChanged(Event):
    """The kernel reported a change the supervisor acts on (DESIGN §8): ``change`` is one of
    carrier_lost, carrier_regained, link_removed, address_added (usable: past DAD),
    address_removed, address_deprecated, mtu_too_small (the link's MTU no longer carries a
    QUIC packet for these addresses), default_route_changed, route_changed. Node-wide:
    ``conn_id`` is empty; ``remote_addr`` is the peer whose route moved (route_changed) or
    the unspecified address. ``trace_id``: the ``quic.network.change`` span that the
    migrations it causes are children of."""

    interface: str
    change: str
    addresses: tuple[str, ...]
    trace_id: str | None = None


EVENT_TYPES: Final[tuple[type[Event], ...]] = (
    EvtConnectionMigrationStarted,
    EvtConnectionMigrationCompleted,
    EvtConnectionMigrationFailed,
    EvtPathAdded,
    EvtPathRemoved,
    EvtPathStateChanged,
    EvtNetworkChanged,
)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Subscription:
    """One subscriber's bounded queue of events; an async iterator.

    Created by ``EventBus.subscribe``: it is registered at once, so events published before
    iteration starts are kept. When the queue is full the OLDEST event is dropped and
    ``dropped`` counts it: a slow consumer must never block or slow down the supervisor (publish
    runs inside the actors' event loop, on the migration path), and the newest events describe
    the current state. Iteration ends (``StopAsyncIteration``) after ``close()`` at once, or
    after ``EventBus.close()`` once the events already queued were delivered.
    """

    def __init__(self, bus: EventBus, types: tuple[type[Event], ...], maxsize: int) -> None:
        self._bus = bus
        self._types = types
        self._queue: collections.deque[Event] = collections.deque(maxlen=maxsize)
        self._waiters: list[asyncio.Future[None]] = []
        self._dropped = 0
        self._closed = False  # no more events will be queued
        self._discard = False  # close() by the consumer: stop without draining

    @property
    def types(self) -> tuple[type[Event], ...]:
        """The event types delivered; empty means all."""
        return self._types

    @property
    def maxsize(self) -> int:
        assert self._queue.maxlen is not None
        return self._queue.maxlen

    @property
    def dropped(self) -> int:
        """Events dropped because the queue was full."""
        return self._dropped

    @property
    def pending(self) -> int:
        """Events queued and not yet consumed."""
        return len(self._queue)

    @property
    def closed(self) -> bool:
        return self._closed

    def wants(self, evt: Event) -> bool:
        return not self._types or isinstance(evt, self._types)

    def _offer(self, evt: Event) -> None:
        if self._closed or not self.wants(evt):
            return
        if len(self._queue) == self._queue.maxlen:
            self._dropped += 1  # the deque's maxlen drops the oldest on append
            if self._dropped == 1:
                log.warning(
                    "event subscription %s is full (%d): dropping the oldest events; "
                    "consume faster or subscribe with a larger maxsize",
                    self._type_names(),
                    self.maxsize,
                )
        self._queue.append(evt)
        self._wake()

    def _end(self, *, discard: bool) -> None:
        self._closed = True
        if discard:
            self._discard = True
            self._queue.clear()
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if fut.done():
                continue
            loop = fut.get_loop()
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                fut.set_result(None)
            else:  # published from another thread: hand the wake-up to the waiter's loop
                with contextlib.suppress(RuntimeError):  # loop closed: nobody waits any more
                    loop.call_soon_threadsafe(_resolve, fut)

    def close(self) -> None:
        """Unsubscribe; a pending or later ``__anext__`` ends at once (queued events dropped).
        Idempotent."""
        self._bus._unsubscribe(self)
        self._end(discard=True)

    async def aclose(self) -> None:
        self.close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self._queue:
                return self._queue.popleft()
            if self._closed or self._discard:
                raise StopAsyncIteration
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                # re-check after registering: a publisher on another thread may have queued
                # between the check above and the append (no lost wake-up)
                if not (self._queue or self._closed):
                    await fut
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _type_names(self) -> str:
        return "(all events)" if not self._types else ", ".join(t.__name__ for t in self._types)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<Subscription {self._type_names()} {state} pending={self.pending} "
            f"dropped={self._dropped}>"
        )


class EventBus:
    """Fan-out of events to subscriptions; one per Supervisor (``sup.events``).

    ``publish`` is synchronous and never blocks or raises into the publisher (an actor in the
    middle of a migration). Use it from the event loop's thread; from another thread it still
    works (wake-ups are handed to the loop) but ordering across threads is not defined.
    """

    def __init__(self) -> None:
        self._subs: dict[Subscription, None] = {}  # insertion-ordered set
        self._lock = threading.Lock()  # guards _subs against a publisher on another thread
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def subscriptions(self) -> int:
        """How many subscriptions are open."""
        return len(self._subs)

    def subscribe(self, *types: type[Event], maxsize: int = 1024) -> Subscription:
        """Subscribe to ``types`` (none: all events). Registered when this returns.

        ``async for evt in bus.subscribe(EvtPathAdded): ...``, or ``async with`` it to
        unsubscribe on exit. On a closed bus the subscription is already ended.
        """
        checked: list[type[Event]] = []
        for t in types:
            if isinstance(t, Event):
                raise TypeError(
                    f"subscribe() takes event classes, got an instance of {type(t).__name__}: "
                    f"pass {type(t).__name__} itself"
                )
            if not (isinstance(t, type) and issubclass(t, Event)):
                names = ", ".join(e.__name__ for e in EVENT_TYPES)
                raise TypeError(f"subscribe() takes event classes ({names}), got {t!r}")
            if t not in checked:
                checked.append(t)
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize must be a positive int, got {maxsize!r}")
        sub = Subscription(self, tuple(checked), maxsize)
        with self._lock:
            if self._closed:
                sub._end(discard=False)
            else:
                self._subs[sub] = None
        return sub

    def publish(self, evt: Event) -> None:
        """Queue ``evt`` for every matching subscription. Never raises, never blocks."""
        try:
            if not isinstance(evt, Event):
                log.error("EventBus.publish: not an event, dropped: %r", evt)
                return
            with self._lock:
                subs = list(self._subs)
            for sub in subs:
                try:
                    sub._offer(evt)
                except Exception:  # a broken subscriber must not break the publisher
                    log.exception("EventBus: delivering %s to %r failed", type(evt).__name__, sub)
        except Exception:
            log.exception("EventBus.publish failed")

    def close(self) -> None:
        """End every subscription (each iteration stops after its queued events). Later
        publishes are ignored. Idempotent."""
        with self._lock:
            self._closed = True
            subs, self._subs = list(self._subs), {}
        for sub in subs:
            sub._end(discard=False)

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subs.pop(sub, None)
