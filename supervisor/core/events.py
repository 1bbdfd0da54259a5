"""Migration events (go-libp2p's ``core/event`` types, in Python) and the bus that carries them.

Events are frozen dataclasses so one object can be handed to many subscribers; registered with
the envelope codec (``event.<ClassName>``) so they are written to the journal and sent across a
process boundary unchanged. No event type subclasses another, so
subscribing to ``EvtConnectionMigrationStarted`` never delivers a ``Completed``.

Every published event carries ``seq`` (DESIGN §3), its place on its supervisor's bus, and the
bus keeps the newest ones: ``subscribe(*types, since=seq)`` first replays those after ``seq``,
so a program that subscribes after an awaited call (``await path.switch()``) still sees what
that call caused.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import threading
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Literal, get_args

from multiaddr import Multiaddr

from actors.envelope import message
from actors.errors import InvalidArgumentError
from actors.path_state import PathState

__all__ = [
    "DEFAULT_RETAIN",
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
    "EvtPeerAddressChanged",
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
    correlation across hosts, not for measuring durations). Not published by itself.

    ``seq``: the event's place on its supervisor's bus, 1, 2, 3, ... in publication order,
    assigned by :meth:`EventBus.publish` (0: not published). Keyword-only with a default, so
    events built positionally, and journals written before it existed, keep working."""

    conn_id: str
    remote_addr: Multiaddr
    time: float
    seq: int = field(default=0, kw_only=True)


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


@message("event.EvtPeerAddressChanged")
@dataclass(frozen=True, slots=True)
class EvtPeerAddressChanged(Event):
    """An inbound connection's peer now sends from another address, and our listener answers
    there: the client migrated, or a NAT rebound it (the server cannot tell which). Emitted
    once per change of the address the listener sends to, not per datagram; a probe from a
    new address alone changes nothing. ``remote_addr`` is the new address (with ``/p2p/`` on a
    libp2p connection); ``old_remote_addr`` and ``new_remote_addr`` are the plain addresses."""

    old_remote_addr: Multiaddr
    new_remote_addr: Multiaddr


EVENT_TYPES: Final[tuple[type[Event], ...]] = (
    EvtConnectionMigrationStarted,
    EvtConnectionMigrationCompleted,
    EvtConnectionMigrationFailed,
    EvtPathAdded,
    EvtPathRemoved,
    EvtPathStateChanged,
    EvtNetworkChanged,
    EvtPeerAddressChanged,
)

#: Events an :class:`EventBus` keeps for late subscribers by default. A switch publishes 4-7
#: events (started, path states, completed), so 1024 covers the last ~150 migrations: far more
#: than a program that subscribes right after its own awaited call needs, for ~0.6 MB (measured).
DEFAULT_RETAIN: Final = 1024


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Subscription:
    """One subscriber's bounded queue of events; an async iterator.

    Created by ``EventBus.subscribe``: it is registered at once, so events published before
    iteration starts are kept; with ``since`` the retained events after it are queued first.
    Events arrive in ``seq`` order, each once. When the queue is full the OLDEST event is
    dropped and ``dropped`` counts it: a slow consumer must never block or slow down the
    supervisor (publish runs inside the actors' event loop, on the migration path), and the
    newest events describe the current state. Iteration ends (``StopAsyncIteration``) after
    ``close()`` at once, or after ``EventBus.close()`` once the events already queued were
    delivered.
    """

    def __init__(
        self,
        bus: EventBus,
        types: tuple[type[Event], ...],
        maxsize: int,
        since: int | None = None,
    ) -> None:
        self._bus = bus
        self._types = types
        self._since = since
        self._queue: collections.deque[Event] = collections.deque(maxlen=maxsize)
        self._waiters: list[asyncio.Future[None]] = []
        self._dropped = 0
        self._missed = 0
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
    def since(self) -> int | None:
        """The ``since`` it was subscribed with (None: live events only)."""
        return self._since

    @property
    def missed(self) -> int:
        """Events after ``since`` the bus had already forgotten when this subscribed (it keeps
        the newest ``EventBus.retain``): 0 when the replay is complete for this
        subscription's types. Otherwise the number of events of every type between ``since``
        and the oldest one kept, an upper bound for those of its types (the bus remembers
        which types it forgot after which seq, not how many of each)."""
        return self._missed

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
            f"dropped={self._dropped} missed={self._missed}>"
        )


class EventBus:
    """Fan-out of events to subscriptions; one per Supervisor (``sup.events``).

    ``publish`` is synchronous and never blocks or raises into the publisher (an actor in the
    middle of a migration). It gives each event the next ``seq`` and keeps the newest
    ``retain`` events (default :data:`DEFAULT_RETAIN`; 0 keeps none) for
    ``subscribe(since=...)``. Numbering, keeping and delivery happen under one lock, so every
    subscription sees its events in ``seq`` order and a subscription made while events are
    published gets each of them exactly once, replayed or live. Use it from the event loop's
    thread; from another thread it still works (wake-ups are handed to the loop).
    """

    def __init__(self, *, retain: int = DEFAULT_RETAIN) -> None:
        if isinstance(retain, bool) or not isinstance(retain, int):
            raise TypeError(f"retain must be an int, not {type(retain).__name__}")
        if retain < 0:
            raise InvalidArgumentError(
                "retain", retain, "give how many events to keep for late subscribers (0: none)"
            )
        self._subs: dict[Subscription, None] = {}  # insertion-ordered set
        # Guards _subs, _seq and _kept against a publisher on another thread.
        self._lock = threading.Lock()
        self._closed = False
        self._seq = 0
        self._kept: collections.deque[Event] = collections.deque(maxlen=retain)
        self._forgot_upto = 0  # the newest seq no longer kept (every seq up to it is gone)
        self._forgot_type: dict[type[Event], int] = {}  # event type -> newest seq of it forgot

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def subscriptions(self) -> int:
        """How many subscriptions are open."""
        return len(self._subs)

    @property
    def seq(self) -> int:
        """The ``seq`` of the newest event published (0 before the first): remember it, and
        ``subscribe(since=it)`` later gets everything published after it."""
        return self._seq

    @property
    def retain(self) -> int:
        """How many of the newest events are kept for ``subscribe(since=...)``."""
        maxlen = self._kept.maxlen
        assert maxlen is not None
        return maxlen

    def subscribe(
        self, *types: type[Event], maxsize: int = 1024, since: int | None = None
    ) -> Subscription:
        """Subscribe to ``types`` (none: all events). Registered when this returns.

        ``since``: first queue the kept events with a greater ``seq`` (``since=0``: every one
        kept), then the live ones, with no gap and no duplicate between them; events already
        forgotten are counted in ``Subscription.missed``. ``None``: live events only.
        ``async for evt in bus.subscribe(EvtPathAdded): ...``, or ``async with`` it to
        unsubscribe on exit. On a closed bus the subscription ends after its replay.
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
        if since is not None and (isinstance(since, bool) or not isinstance(since, int)):
            raise TypeError(
                f"since must be an event's seq (int) or None, got {type(since).__name__}"
            )
        if since is not None and since < 0:
            raise InvalidArgumentError(
                "since", since, "give an event's seq, or 0 to replay every event kept"
            )
        sub = Subscription(self, tuple(checked), maxsize, since)
        with self._lock:
            if since is not None:
                sub._missed = self._forgotten_after(since, sub)
                # seqs are consecutive in _kept: the first one after ``since`` is found by
                # arithmetic, not by a scan of the whole window
                first = self._kept[0].seq if self._kept else self._seq + 1
                for evt in itertools.islice(self._kept, max(0, since + 1 - first), None):
                    sub._offer(evt)
            if self._closed:
                sub._end(discard=False)
            else:
                self._subs[sub] = None
        return sub

    def _forgotten_after(self, since: int, sub: Subscription) -> int:
        """Events after ``since`` no longer kept, if any of ``sub``'s types is among them."""
        if since >= self._forgot_upto:
            return 0
        if sub.types and not any(
            newest > since and issubclass(kind, sub.types)
            for kind, newest in self._forgot_type.items()
        ):
            return 0
        return self._forgot_upto - since

    def publish(self, evt: Event) -> Event | None:
        """Number ``evt``, keep it, and queue it for every matching subscription. Returns the
        event as delivered (``evt`` with its ``seq``), None if it was not published (not an
        event, or the bus is closed). Never raises, never blocks."""
        try:
            if not isinstance(evt, Event):
                log.error("EventBus.publish: not an event, dropped: %r", evt)
                return None
            with self._lock:
                if self._closed:
                    return None
                self._seq += 1
                if evt.seq == 0:
                    # Never published, so nobody but its publisher (who handed it over) holds
                    # it: numbered in place. dataclasses.replace costs ~5 us an event (this
                    # 0.1): ~2 % of a migration's 1.2 ms of CPU at node scale, 5 events each.
                    object.__setattr__(evt, "seq", self._seq)
                else:  # published before (here or on another bus): a numbered copy
                    evt = dataclasses.replace(evt, seq=self._seq)
                kept = self._kept
                if len(kept) == kept.maxlen:
                    gone = kept[0] if kept else evt  # retain=0: forgotten at once
                    self._forgot_upto = gone.seq
                    self._forgot_type[type(gone)] = gone.seq
                if kept.maxlen:
                    kept.append(evt)
                for sub in self._subs:
                    try:
                        sub._offer(evt)
                    except Exception:  # a broken subscriber must not break the publisher
                        log.exception(
                            "EventBus: delivering %s to %r failed", type(evt).__name__, sub
                        )
            return evt
        except Exception:
            log.exception("EventBus.publish failed")
            return None

    def close(self) -> None:
        """End every subscription (each iteration stops after its queued events). Later
        publishes are ignored; the kept events can still be replayed. Idempotent."""
        with self._lock:
            self._closed = True
            subs, self._subs = list(self._subs), {}
        for sub in subs:
            sub._end(discard=False)

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subs.pop(sub, None)
