"""The failover policy: what happens when an active path dies or a preferred one recovers.

Connections judge their own paths (``actors/health.py``) and report a dead active path; this
policy decides. It reads published views and acts only by sending the requests a user would
(``SwitchRequest`` with ``reason="failover"``) through its :class:`PolicyPort`, so every
automatic move has the events, trace and queueing of a manual one. Make-before-break: the
target is a path already validated by its keep-alives (a stale one is re-probed for at most
``FailoverPolicy.probe_timeout``). With nothing usable it waits for a path to come back while
the idle timeout allows; if the connection ends first,
``EvtConnectionMigrationFailed(connection_closed=True)`` says so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from opentelemetry.context import Context

from actors.errors import MigrationError
from actors.path_state import PathState
from actors.runtime import ActorError
from actors.view import ConnectionView, PathChange, PathView
from supervisor.addresses import parse_quic_multiaddr, sockaddr_to_multiaddr
from supervisor.core.config import FailoverPolicy
from supervisor.core.events import EvtConnectionMigrationFailed
from supervisor.core.messages import SwitchRequest
from supervisor.orchestration.policy import PolicyPort

log = logging.getLogger(__name__)


class TargetJudge(Protocol):
    """What the network policy says about failover targets
    (``supervisor.orchestration.network``)."""

    def usable(self, conn_id: str, path: PathView) -> bool:
        """False when the kernel says the path's address or link is gone."""
        ...

    def allowed(self, conn_id: str, view: ConnectionView, path: PathView, cause: str) -> bool:
        """May a failover (an eager move) go to ``path``? False when it leaves the route's
        network and the connection's budget for ``cause`` is spent."""
        ...

    def moved(
        self, conn_id: str, view: ConnectionView, path: PathView, reason: str, cause: str
    ) -> None: ...


class FailoverController:
    """Per-supervisor failover state; its inputs arrive in the supervisor's mailbox turn.

    It is also the one mover of the network policy (``move_off``), so a connection never
    has two automatic moves at once."""

    def __init__(self, port: PolicyPort, policy: FailoverPolicy) -> None:
        self.port = port
        self.policy = policy
        #: Set by the network policy when the monitor runs.
        self.judge: TargetJudge | None = None
        self._avoid: dict[str, set[int]] = {}
        self._prefer = parse_quic_multiaddr(policy.prefer) if policy.prefer else None
        self._running: dict[str, asyncio.Task[None]] = {}  # conn -> failover in progress
        self._changed: dict[str, asyncio.Event] = {}  # conn -> "a path changed state"
        self._switch_back: dict[tuple[str, int], asyncio.Task[None]] = {}
        #: (conn, path failed over from) -> when: an answer soon after makes it suspect.
        self._failed_over: dict[tuple[str, int], float] = {}

    # ------------------------------------------------------------------ inputs

    def on_active_dead(self, conn_id: str, path_id: int, reason: str) -> None:
        task = self._running.get(conn_id)
        if task is not None and not task.done():
            return
        log.info("connection %s: active path %d dead (%s): failing over", conn_id, path_id, reason)
        self._running[conn_id] = self.port.spawn(
            self._fail_over(conn_id, cause=reason), name="failover"
        )

    def move_off(
        self,
        conn_id: str,
        *,
        avoid: frozenset[int] = frozenset(),
        reason: str = "network",
        context: Context | None = None,
    ) -> None:
        """Move the connection off its active path now (the network policy: its link or
        address is gone), never onto ``avoid``; joins a failover already under way."""
        self._avoid.setdefault(conn_id, set()).update(avoid)
        task = self._running.get(conn_id)
        if task is not None and not task.done():
            return
        self._running[conn_id] = self.port.spawn(
            self._fail_over(conn_id, reason=reason, context=context, cause="network"),
            name="network-move",
        )

    def unavoid(self, conn_id: str, path_ids: frozenset[int]) -> None:
        """These paths are usable again (their link is back): a network move waiting for a
        target because its active path was among them ends; failover judges afresh."""
        avoid = self._avoid.get(conn_id)
        if avoid:
            avoid.difference_update(path_ids)
        event = self._changed.get(conn_id)
        if event is not None:
            event.set()

    def moving(self, conn_id: str) -> bool:
        task = self._running.get(conn_id)
        return task is not None and not task.done()

    async def settled(self, conn_id: str) -> None:
        """Returns once no automatic move of the connection is under way."""
        while (task := self._running.get(conn_id)) is not None and not task.done():
            await asyncio.wait([task])

    def on_changes(self, conn_id: str, changes: tuple[PathChange, ...]) -> None:
        event = self._changed.get(conn_id)
        if event is not None:
            event.set()
        for change in changes:
            if change.old is None:
                continue
            key = (conn_id, change.path_id)
            if change.old is PathState.FAILED and change.new is not PathState.CLOSED:
                at = self._failed_over.pop(key, None)
                if at is not None and time.monotonic() - at <= self.policy.suspect_window:
                    # The path we left as dead answers again within seconds: it probably
                    # never was (a starved host, a burst of loss): count it, loudly.
                    log.warning(
                        "connection %s: path %d answered %.1f s after failing over from it "
                        "(suspect failover)",
                        conn_id,
                        change.path_id,
                        time.monotonic() - at,
                    )
                    self.port.note("suspect_failover")
            pending = self._switch_back.pop(key, None)
            if pending is not None and not pending.done():
                pending.cancel()  # any change restarts the hysteresis clock
            if change.new is PathState.STANDBY and self._is_preferred(change.local):
                self._switch_back[key] = self.port.spawn(
                    self._switch_back_later(conn_id, change.path_id), name="switch-back"
                )

    def on_connection_end(self, conn_id: str) -> None:
        task = self._running.pop(conn_id, None)
        pending = task is not None and not task.done()
        if task is not None:
            task.cancel()
        for key in [k for k in self._switch_back if k[0] == conn_id]:
            self._switch_back.pop(key).cancel()
        self._changed.pop(conn_id, None)
        self._avoid.pop(conn_id, None)
        for key in [k for k in self._failed_over if k[0] == conn_id]:
            del self._failed_over[key]
        view = self.port.view(conn_id)
        if pending and view is not None:
            here = sockaddr_to_multiaddr(view.local)
            self.port.emit(
                EvtConnectionMigrationFailed(
                    conn_id,
                    sockaddr_to_multiaddr(view.remote),
                    time.time(),
                    here,
                    here,
                    "failover",
                    "no usable path before the connection ended (idle timeout)",
                    True,
                    "connection_closed",
                )
            )

    # ------------------------------------------------------------------ decisions

    def _is_preferred(self, local: tuple[str, int]) -> bool:
        if self._prefer is None:
            return False
        ip, port, _family = self._prefer
        return local[0] == ip and (port == 0 or local[1] == port)

    def candidates(self, conn_id: str, view: ConnectionView) -> list[PathView]:
        """Validated standby paths, best first: alive group, validated in both directions
        (its PATH_RESPONSE came back on its own socket; an asymmetric one proved only the way
        out), preferred, lower RTT."""
        samples = self.port.sample(conn_id)
        avoid = self._avoid.get(conn_id, ())
        judge = self.judge
        paths = [
            p
            for p in view.paths
            if p.path_id != view.active_path_id
            and p.state is PathState.STANDBY
            and p.path_id not in avoid
            and (judge is None or judge.usable(conn_id, p))
        ]

        def score(p: PathView) -> tuple[int, bool, int, float]:
            preferred = 0 if self._is_preferred(p.local) else 1
            sample = samples.get(p.path_id)
            rank = sample.health_rank if sample is not None else None
            rtt = sample.rtt if sample is not None else p.rtt
            return rank or 0, p.asymmetric, preferred, rtt if rtt is not None else float("inf")

        return sorted(paths, key=score)

    async def _fail_over(
        self,
        conn_id: str,
        *,
        reason: str = "failover",
        context: Context | None = None,
        cause: str = "silent",
    ) -> None:
        changed = self._changed.setdefault(conn_id, asyncio.Event())
        try:
            while True:
                view = self.port.view(conn_id)
                if view is None or view.closed:
                    return
                active = view.active
                if (
                    reason == "failover"
                    and active is not None
                    and active.state is PathState.ACTIVE
                    and active.path_id not in self._avoid.get(conn_id, ())
                ):
                    return  # it recovered (or a manual switch moved it) meanwhile
                if reason != "failover" and (
                    active is None or active.path_id not in self._avoid.get(conn_id, ())
                ):
                    return  # already off the lost path (a manual switch, or it was not on it)
                changed.clear()
                # A target that rolled back becomes failed: the next candidate is tried at once.
                for path in self.candidates(conn_id, view):
                    judge = self.judge
                    if (
                        reason == "failover"
                        and judge is not None
                        and not judge.allowed(conn_id, view, path, cause)
                    ):
                        continue
                    try:
                        await self.port.ask(
                            SwitchRequest(
                                conn_id,
                                path.path_id,
                                reason=reason,
                                probe_timeout=self.policy.probe_timeout,
                                old_path_dead=True,
                                initiator="policy",
                            ),
                            context=context,
                        )
                    except (MigrationError, ActorError) as exc:
                        # ActorError: the connection or the supervisor stopping meanwhile.
                        log.info(
                            "connection %s: %s to path %d failed: %s",
                            conn_id,
                            reason,
                            path.path_id,
                            exc,
                        )
                        continue
                    if view.active_path_id is not None:
                        self._failed_over[(conn_id, view.active_path_id)] = time.monotonic()
                    if judge is not None:
                        judge.moved(conn_id, view, path, reason, cause)
                    return
                # Nothing usable now: wait for a path to change state (keep-alives on failed
                # paths notice a link that came back), while the idle timeout allows.
                await changed.wait()
        finally:
            self._avoid.pop(conn_id, None)

    async def _switch_back_later(self, conn_id: str, path_id: int) -> None:
        await asyncio.sleep(self.policy.hysteresis)  # hysteresis timer (cancelled on change)
        view = self.port.view(conn_id)
        if view is None or view.closed or view.active_path_id == path_id:
            return
        path = view.path(path_id)
        if path is None or path.state is not PathState.STANDBY:
            return
        self._switch_back.pop((conn_id, path_id), None)
        try:
            await self.port.ask(
                SwitchRequest(
                    conn_id,
                    path_id,
                    reason="failover",
                    probe_timeout=self.policy.probe_timeout,
                    initiator="policy",
                )
            )
        except (MigrationError, ActorError) as exc:
            log.info(
                "connection %s: switch back to preferred path %d failed: %s", conn_id, path_id, exc
            )

    async def close(self) -> None:
        tasks = [t for t in [*self._running.values(), *self._switch_back.values()] if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
