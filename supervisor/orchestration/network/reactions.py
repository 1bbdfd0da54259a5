"""The network policy: what the supervisor does when the kernel reports a change (DESIGN §8).

It hears ``NetworkChanged`` in the supervisor's mailbox turn and acts only through its
:class:`~supervisor.orchestration.policy.PolicyPort`, with the requests a user or an
operator would send,
so every reaction is an ordinary migration (events, span, confirmation and rollback, herd
control) with reason ``network`` and initiator ``policy``; the requests carry the
``quic.network.change`` span's context, so one trace shows the change and every migration
it caused. Moves off a lost path go through the failover controller (the one mover per
connection); the eager-move budget is judged here (``TargetJudge``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from collections.abc import Coroutine
from typing import Any

from opentelemetry.context import Context

from actors.errors import MigrationError
from actors.path_state import PathState
from actors.runtime import ActorError
from actors.view import ConnectionView, PathView
from supervisor.addresses import to_multiaddr
from supervisor.core.config import NetworkPolicy
from supervisor.core.messages import (
    AddPathRequest,
    ClosePathRequest,
    PathAddedReply,
    PathsBackRequest,
    PathsLostRequest,
    ProbeRequest,
    SwitchRequest,
)
from supervisor.orchestration.failover import FailoverController
from supervisor.orchestration.network.budget import EagerBudget, eager_kind
from supervisor.orchestration.network.inventory import NetworkChange, NetworkFacts
from supervisor.orchestration.policy import PolicyPort

__all__ = ["NetworkController"]

log = logging.getLogger(__name__)

_LOST = frozenset(
    {"carrier_lost", "link_removed", "address_removed", "address_deprecated", "mtu_too_small"}
)
_GONE = frozenset({"link_removed", "address_removed", "address_deprecated"})
_BACK = frozenset({"carrier_regained", "address_added"})
#: Retries of a return to the default network that did not validate yet: 1 s doubling.
_RETURN_BACKOFF = (1.0, 30.0)
#: Waits between re-probes of a returning path that did not answer yet (then it is left to
#: the health groups' questions, or the next change).
_REPROBE_BACKOFF = (0.25, 0.5, 1.0, 2.0, 4.0)


def _family(ip: str) -> int:
    return ipaddress.ip_address(ip).version


class NetworkController:
    """Per-supervisor network reactions; a Policy and the failover's TargetJudge."""

    def __init__(self, port: PolicyPort, policy: NetworkPolicy, mover: FailoverController) -> None:
        self.port = port
        self.policy = policy
        self.mover = mover
        mover.judge = self
        self.facts = NetworkFacts()
        self.budget = EagerBudget(policy.max_degrading_moves, policy.max_write_error_moves)
        paths = policy.paths
        self._probe_slots = asyncio.Semaphore(paths.probe_concurrency if paths else 16)
        #: conn -> path ids this policy added (closed by it when their address goes).
        self._auto: dict[str, set[int]] = {}
        #: conn -> when it moved eagerly onto a non-default network (its return is pending).
        self._returns: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        #: local ip -> when its link or address last came or went (damping: a return onto a
        #: flapping interface waits until it has been stable for the failover hysteresis).
        self._changed_at: dict[str, float] = {}
        self._following: dict[str, asyncio.Task[None]] = {}
        self._reprobing: set[tuple[str, int]] = set()
        #: Counted for ``NetworkStatus`` and the notes: reactions by kind.
        self.reactions: dict[str, int] = {}

    # ------------------------------------------------------------------ inputs

    def on_network(
        self, changes: tuple[NetworkChange, ...], facts: NetworkFacts, context: Context | None
    ) -> int:
        """React to one batch; returns how many connections it started moving."""
        self.facts = facts
        moved = 0
        now = time.monotonic()
        for change in changes:
            if change.change in _LOST or change.change in _BACK:
                for ip in change.addresses:
                    self._changed_at[ip] = now
            if change.change in _LOST:
                moved += self._lost(change, context)
            elif change.change in _BACK:
                self._back(change, context)
            elif change.change == "route_changed" and self.policy.follow_route:
                moved += self._route_moved(change, context)
        return moved

    def on_connection_ready(self, conn_id: str) -> None:
        """A dial completed: give it paths on the matching interfaces."""
        if self.policy.paths is not None:
            self._spawn(self._discover(conn_id, None, None), "discover")

    def on_changes(self, conn_id: str, changes: tuple[object, ...]) -> None:
        return None

    def on_active_dead(self, conn_id: str, path_id: int, reason: str) -> None:
        return None  # the failover controller moves; ``allowed`` budgets it

    def on_connection_end(self, conn_id: str) -> None:
        self._auto.pop(conn_id, None)
        following = self._following.pop(conn_id, None)
        if following is not None:
            following.cancel()
        self.budget.forget(conn_id)
        task = self._returns.pop(conn_id, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        tasks = [
            t
            for t in [*self._tasks, *self._returns.values(), *self._following.values()]
            if not t.done()
        ]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    # ------------------------------------------------------------------ TargetJudge

    def usable(self, conn_id: str, path: PathView) -> bool:
        return self.facts.may_use(path.local[0])

    def _default_of(self, view: ConnectionView) -> tuple[str | None, str | None] | None:
        """The connection's default network: the kernel's route to its peer, when one of
        its paths is on it (paths handed in from another namespace with ``sock=`` may share
        nothing with this namespace's routes: then there is no default, and no budget)."""
        route = self.facts.route(str(ipaddress.ip_address(view.remote[0])))
        if route is None or route[1] is None:
            return None
        if not any(self._on_default(p, route) for p in view.paths):
            return None
        return route

    def _on_default(self, path: PathView, default: tuple[str | None, str | None]) -> bool:
        interface, source = default
        return path.local[0] == source or (path.device is not None and path.device == interface)

    def allowed(self, conn_id: str, view: ConnectionView, path: PathView, cause: str) -> bool:
        default = self._default_of(view)
        if default is None or self._on_default(path, default):
            return True
        if self.budget.allow(conn_id, default, eager_kind(cause)):
            return True
        self._count("eager_refused")
        log.info(
            "connection %s: eager move (%s) to path %d refused: budget for %s spent",
            conn_id,
            cause,
            path.path_id,
            default[0],
        )
        return False

    def moved(
        self, conn_id: str, view: ConnectionView, path: PathView, reason: str, cause: str
    ) -> None:
        default = self._default_of(view)
        if reason != "failover" or default is None or self._on_default(path, default):
            return
        self.budget.spend(conn_id, default, eager_kind(cause))
        self._count("eager_moves")
        if conn_id not in self._returns:
            self._returns[conn_id] = self.port.spawn(
                self._guarded(self._return_to_default(conn_id), "return"), name="network-return"
            )

    # ------------------------------------------------------------------ reactions

    def _count(self, what: str) -> None:
        self.reactions[what] = self.reactions.get(what, 0) + 1

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = self.port.spawn(self._guarded(coro, name), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _guarded(coro: Coroutine[Any, Any, Any], name: str) -> None:
        """A reaction that fails is logged, never the supervisor's crash (its tasks are the
        supervisor's: one raising would stop it). A connection that ended meanwhile, or a
        supervisor stopping, are ordinary."""
        try:
            await coro
        except (MigrationError, ActorError) as exc:
            log.info("network policy: %s: %s", name, exc)
        except Exception:
            log.exception("network policy: %s failed", name)

    def _views(self) -> list[ConnectionView]:
        out = []
        for conn_id in self.port.conn_ids():
            view = self.port.view(conn_id)
            if view is not None and not view.closed:
                out.append(view)
        return out

    def _lost(self, change: NetworkChange, context: Context | None) -> int:
        """Every path on the lost link or address fails at once; connections active on it
        move now, idle or busy, before the application writes again."""
        ips = set(change.addresses)
        device = change.interface if change.change in ("carrier_lost", "link_removed") else None
        moved = 0
        lost: list[tuple[str, tuple[int, ...]]] = []
        for view in self._views():
            hit = frozenset(
                p.path_id
                for p in view.paths
                if p.local[0] in ips or (device is not None and p.device == device)
            )
            if not hit:
                continue
            conn_id = view.conn_id
            mark = hit
            if view.active_path_id in hit:
                # The move first: its switch request reaches the supervisor's mailbox before
                # any marking (the move avoids the lost paths whatever the view says).
                self.mover.move_off(conn_id, avoid=hit, context=context)
                moved += 1
                if any(p.state is PathState.STANDBY and p.path_id not in hit for p in view.paths):
                    # A target exists: the switch itself fails the old path; marking it
                    # degraded meanwhile would only be more work on the move's way.
                    mark = hit - {view.active_path_id}
            if mark:
                lost.append((conn_id, tuple(sorted(mark))))
            auto = self._auto.get(conn_id, set()) & hit
            if auto and change.change in _GONE:
                self._spawn(self._close_gone(conn_id, auto, context), "close-gone")
        if lost:
            self._spawn(self._mark_lost(lost, context), "paths-lost")
        if moved:
            self._count("moves_lost")
        return moved

    async def _mark_lost(
        self, lost: list[tuple[str, tuple[int, ...]]], context: Context | None
    ) -> None:
        """One task marks every connection's lost paths, in turn (a thousand tasks for a
        thousand connections would only crowd the loop the moves need)."""
        for conn_id, path_ids in lost:
            try:
                await self.port.ask(PathsLostRequest(conn_id, path_ids), context=context)
            except MigrationError as exc:
                log.debug("connection %s: marking paths lost: %s", conn_id, exc)

    async def _mark_back(
        self, conn_id: str, path_ids: tuple[int, ...], context: Context | None
    ) -> None:
        try:
            await self.port.ask(PathsBackRequest(conn_id, path_ids), context=context)
        except MigrationError as exc:
            log.debug("connection %s: marking paths back: %s", conn_id, exc)

    async def _close_gone(self, conn_id: str, path_ids: set[int], context: Context | None) -> None:
        """An auto-discovered path whose address went away is closed (after the move off
        it, if it was active)."""
        await self.mover.settled(conn_id)  # the move has its own deadlines (probe, rollback)
        view = self.port.view(conn_id)
        if view is None or view.closed:
            return
        for path_id in path_ids:
            if view.path(path_id) is None or view.active_path_id == path_id:
                continue
            try:
                await self.port.ask(ClosePathRequest(conn_id, path_id), context=context)
                self._auto.get(conn_id, set()).discard(path_id)
                self._count("paths_closed")
            except MigrationError as exc:
                log.info("connection %s: closing path %d: %s", conn_id, path_id, exc)

    def _back(self, change: NetworkChange, context: Context | None) -> None:
        """Carrier or address back: its failed paths are probed again (standby once they
        answer; the failover policy's hysteresis returns a preferred one); and
        auto-discovery adds paths on a new usable address."""
        ips = set(change.addresses)
        for view in self._views():
            here = frozenset(p.path_id for p in view.paths if p.local[0] in ips)
            active = view.active
            if active is not None and active.path_id in here:
                # Still on it (nothing else was usable): it carries again.
                self.mover.unavoid(view.conn_id, here)
                if active.state is PathState.DEGRADED:
                    self._spawn(self._mark_back(view.conn_id, (active.path_id,), context), "back")
            for path in view.paths:
                key = (view.conn_id, path.path_id)
                if (
                    path.local[0] in ips
                    and path.state is PathState.FAILED
                    and key not in self._reprobing
                ):
                    self._reprobing.add(key)
                    self._spawn(self._reprobe(key, context), "reprobe")
            if self.policy.paths is not None and change.change == "address_added":
                self._spawn(self._discover(view.conn_id, ips, context), "discover")

    async def _reprobe(self, key: tuple[str, int], context: Context | None) -> None:
        """Probe a returning path; retried with backoff while its address stays usable (a
        carrier or address comes back before its routes and neighbours do: the first probe
        may fail at once with no route)."""
        conn_id, path_id = key
        try:
            for delay in _REPROBE_BACKOFF:
                view = self.port.view(conn_id)
                path = view.path(path_id) if view is not None and not view.closed else None
                if path is None or path.state is not PathState.FAILED:
                    return
                if not self.facts.may_use(path.local[0]):
                    return  # gone again: its next return starts afresh
                if await self._probe(conn_id, path_id, context):
                    return
                await asyncio.sleep(delay)
        finally:
            self._reprobing.discard(key)

    async def _probe(self, conn_id: str, path_id: int, context: Context | None) -> bool:
        async with self._probe_slots:  # paced: a link back under 1,000 connections
            try:
                await self.port.ask(
                    ProbeRequest(conn_id, path_id, self.policy.probe_timeout), context=context
                )
            except MigrationError as exc:
                log.info("connection %s: re-probe of path %d: %s", conn_id, path_id, exc)
                return False
        self._count("reprobes")
        return True

    def _route_moved(self, change: NetworkChange, context: Context | None) -> int:
        """The kernel now routes to the peer through another interface: its connections
        follow (unbudgeted), onto the path with the route's source address."""
        if change.peer is None or not change.addresses:
            return 0  # unreachable now: nothing to follow (the lost-path reaction moves)
        source = change.addresses[0]
        moved = 0
        for view in self._views():
            if str(ipaddress.ip_address(view.remote[0])) != change.peer:
                continue
            conn_id = view.conn_id
            self.budget.forget(conn_id)  # a new default network: a fresh budget
            previous = self._following.pop(conn_id, None)
            if previous is not None:
                previous.cancel()  # the route moved again: follow the newest
            active = view.active
            if active is not None and active.local[0] == source:
                continue
            self._following[conn_id] = self.port.spawn(
                self._guarded(
                    self._follow(conn_id, change.peer, source, change.interface, context),
                    "follow",
                ),
                name="follow",
            )
            moved += 1
        if moved:
            self._count("moves_route")
        return moved

    async def _follow(
        self, conn_id: str, peer: str, source: str, interface: str, context: Context | None
    ) -> None:
        try:
            await self._follow_now(conn_id, peer, source, interface, context)
        finally:
            if self._following.get(conn_id) is asyncio.current_task():
                del self._following[conn_id]

    async def _follow_now(
        self, conn_id: str, peer: str, source: str, interface: str, context: Context | None
    ) -> None:
        # Damping: back onto an interface that just came or went only once it has been
        # stable for the failover hysteresis (a link flapping every 200 ms costs two moves,
        # not two per flap). A route that moves to a steady interface is followed at once.
        hold = self.mover.policy.hysteresis
        while (left := self._changed_at.get(source, -math.inf) + hold - time.monotonic()) > 0:
            await asyncio.sleep(left)
        if self.facts.route(peer) != (interface, source):
            return  # it moved again meanwhile (a newer follow is under way, or none)
        await self.mover.settled(conn_id)  # one mover at a time: let a lost-path move end
        view = self.port.view(conn_id)
        if view is None or view.closed or view.peer_disabled_migration:
            return
        target = next((p for p in view.paths if p.local[0] == source), None)
        if target is None:
            paths = self.policy.paths
            if paths is None or not paths.matches(interface, source):
                log.info(
                    "connection %s: route to the peer moved to %s (%s) and no path is there",
                    conn_id,
                    interface,
                    source,
                )
                return
            path_id = await self._add(conn_id, source, context)
            if path_id is None:
                return
            view = self.port.view(conn_id)
            target = view.path(path_id) if view is not None else None
            if target is None:
                return
        await self._switch_to(conn_id, target.path_id, context)

    async def _switch_to(self, conn_id: str, path_id: int, context: Context | None) -> bool:
        view = self.port.view(conn_id)
        path = view.path(path_id) if view is not None else None
        if view is None or path is None or view.active_path_id == path_id:
            return False
        if path.state is not PathState.STANDBY and not await self._probe(conn_id, path_id, context):
            return False
        try:
            await self.port.ask(
                SwitchRequest(
                    conn_id,
                    path_id,
                    reason="network",
                    probe_timeout=self.policy.probe_timeout,
                    initiator="policy",
                ),
                context=context,
            )
        except MigrationError as exc:
            log.info("connection %s: network move to path %d: %s", conn_id, path_id, exc)
            return False
        return True

    async def _return_to_default(self, conn_id: str) -> None:
        """After ``max_time_on_non_default`` on another network, go back to the route's
        network once its path validates (retried with backoff while it does not)."""
        try:
            await asyncio.sleep(self.policy.max_time_on_non_default)
            delay, cap = _RETURN_BACKOFF
            while True:
                view = self.port.view(conn_id)
                if view is None or view.closed:
                    return
                default = self._default_of(view)
                active = view.active
                if default is None or (active is not None and self._on_default(active, default)):
                    return
                target = next((p for p in view.paths if self._on_default(p, default)), None)
                if target is None:
                    return
                if not self.mover.moving(conn_id) and await self._switch_to(
                    conn_id, target.path_id, None
                ):
                    self._count("returns")
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, cap)
        finally:
            if self._returns.get(conn_id) is asyncio.current_task():
                del self._returns[conn_id]

    # ------------------------------------------------------------------ auto-discovery

    async def _add(self, conn_id: str, ip: str, context: Context | None) -> int | None:
        try:
            reply = await self.port.ask(
                AddPathRequest(conn_id, str(to_multiaddr(ip, 0))), context=context
            )
        except (MigrationError, OSError, ValueError) as exc:
            log.info("connection %s: auto path on %s: %s", conn_id, ip, exc)
            return None
        assert isinstance(reply, PathAddedReply)
        self._auto.setdefault(conn_id, set()).add(reply.path_id)
        self._count("paths_added")
        return reply.path_id

    async def _discover(self, conn_id: str, only: set[str] | None, context: Context | None) -> None:
        """A path on every matching usable address (``only``: just these), up to
        ``max_paths``, each probed (paced); never for a peer that disabled migration."""
        paths = self.policy.paths
        view = self.port.view(conn_id)
        if paths is None or view is None or view.closed or view.peer_disabled_migration:
            return
        family = _family(view.remote[0])
        have = {p.local[0] for p in view.paths}
        room = paths.max_paths - len(view.paths)
        added = []
        for interface, ip in self.facts.usable:
            if room <= 0:
                break
            if only is not None and ip not in only:
                continue
            if ip in have or _family(ip) != family or not paths.matches(interface, ip):
                continue
            if ipaddress.ip_address(ip).is_link_local:
                continue  # needs a scope id per interface; not a path to a routed peer
            path_id = await self._add(conn_id, ip, context)
            if path_id is not None:
                added.append(path_id)
                have.add(ip)
                room -= 1
        if added:
            await asyncio.gather(*(self._probe(conn_id, pid, context) for pid in added))
