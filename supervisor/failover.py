"""The failover policy: what the SupervisorActor does when an active path dies or recovers.

Connections judge their own paths (``actors/health.py``) and report a dead active path; this
policy decides. Every automatic move is an ordinary migration with ``reason="failover"``
(events, trace, serialised with the connection's other operations), make-before-break: the
target is a path already validated by its keep-alives. When no path is usable it keeps
waiting for one to come back while the idle timeout allows; if the connection ends first,
``EvtConnectionMigrationFailed(connection_closed=True)`` says so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from actors.errors import MigrationError
from actors.path_state import PathState
from supervisor.addresses import parse_quic_multiaddr
from supervisor.config import FailoverPolicy
from supervisor.events import EvtConnectionMigrationFailed
from supervisor.messages import SwitchRequest

if TYPE_CHECKING:
    from actors.path import PathActor
    from supervisor.supervisor_actor import SupervisorActor, _Entry

log = logging.getLogger(__name__)


class FailoverController:
    """Per-supervisor failover state; all methods run on the supervisor's event loop."""

    def __init__(self, actor: SupervisorActor, policy: FailoverPolicy) -> None:
        self.actor = actor
        self.policy = policy
        self._prefer = parse_quic_multiaddr(policy.prefer) if policy.prefer else None
        self._running: dict[str, asyncio.Task[None]] = {}  # conn -> failover in progress
        self._changed: dict[str, asyncio.Event] = {}  # conn -> "a path changed state"
        self._switch_back: dict[tuple[str, int], asyncio.Task[None]] = {}

    # ------------------------------------------------------------------ inputs

    def on_active_dead(self, conn_id: str, path_id: int, reason: str) -> None:
        task = self._running.get(conn_id)
        if task is not None and not task.done():
            return
        log.info("connection %s: active path %d dead (%s): failing over", conn_id, path_id, reason)
        self._running[conn_id] = self.actor.spawn(self._fail_over(conn_id), name="failover")

    def on_path_state(self, conn_id: str, path_id: int, new: PathState) -> None:
        event = self._changed.get(conn_id)
        if event is not None:
            event.set()
        key = (conn_id, path_id)
        pending = self._switch_back.pop(key, None)
        if pending is not None and not pending.done():
            pending.cancel()  # any change restarts the hysteresis clock
        if new is PathState.STANDBY and self._is_preferred(conn_id, path_id):
            self._switch_back[key] = self.actor.spawn(
                self._switch_back_later(conn_id, path_id), name="switch-back"
            )

    def on_connection_end(self, conn_id: str) -> None:
        task = self._running.pop(conn_id, None)
        pending = task is not None and not task.done()
        if task is not None:
            task.cancel()
        for key in [k for k in self._switch_back if k[0] == conn_id]:
            self._switch_back.pop(key).cancel()
        self._changed.pop(conn_id, None)
        entry = self.actor.conns.get(conn_id)
        if pending and entry is not None:
            active = self._active(entry)
            here = self.actor._local_of(entry, active) if active is not None else entry.local
            self.actor._publish(
                EvtConnectionMigrationFailed(
                    conn_id,
                    entry.remote,
                    time.time(),
                    here,
                    here,
                    "failover",
                    "no usable path before the connection ended (idle timeout)",
                    True,
                )
            )

    # ------------------------------------------------------------------ decisions

    def _active(self, entry: _Entry) -> int | None:
        quic = entry.actor.quic
        return quic.active_path_id if quic.path_count else None

    def _is_preferred(self, conn_id: str, path_id: int) -> bool:
        if self._prefer is None:
            return False
        entry = self.actor.conns.get(conn_id)
        if entry is None:
            return False
        path = entry.actor.paths.get(path_id)
        if path is None:
            return False
        ip, port, _family = self._prefer
        return str(path.local[0]) == ip and (port == 0 or int(path.local[1]) == port)

    def candidates(self, entry: _Entry) -> list[PathActor]:
        """Validated standby paths, best first."""
        active = self._active(entry)
        paths = [
            p
            for pid, p in entry.actor.paths.items()
            if pid != active and p.state is PathState.STANDBY
        ]

        def score(p: PathActor) -> tuple[int, int, float, float]:
            preferred = 0 if self._is_preferred(entry.conn_id, p.path_id) else 1
            if p.health is not None:
                rank, loss, rtt = p.health.score()
            else:
                rank, loss, rtt = 0, 0.0, p.rtt if p.rtt is not None else float("inf")
            return rank, preferred, loss, rtt

        return sorted(paths, key=score)

    async def _fail_over(self, conn_id: str) -> None:
        changed = self._changed.setdefault(conn_id, asyncio.Event())
        while True:
            entry = self.actor.conns.get(conn_id)
            if entry is None or entry.actor.closed:
                return
            active = self._active(entry)
            current = entry.actor.paths.get(active) if active is not None else None
            if current is not None and current.state is PathState.ACTIVE:
                return  # it recovered (or a manual switch moved it) meanwhile
            changed.clear()
            for path in self.candidates(entry):
                try:
                    await self.actor._switch(
                        SwitchRequest(conn_id, path.path_id, reason="failover"),
                        old_path_dead=True,
                    )
                except MigrationError as exc:
                    log.info(
                        "connection %s: failover to path %d failed: %s", conn_id, path.path_id, exc
                    )
                    continue
                return
            # Nothing usable now: wait for a path to change state (keep-alives on failed paths
            # notice a link that came back), while the idle timeout allows.
            await changed.wait()

    async def _switch_back_later(self, conn_id: str, path_id: int) -> None:
        await asyncio.sleep(self.policy.hysteresis)  # hysteresis timer (cancelled on change)
        entry = self.actor.conns.get(conn_id)
        if entry is None or entry.actor.closed or self._active(entry) == path_id:
            return
        path = entry.actor.paths.get(path_id)
        if path is None or path.state is not PathState.STANDBY:
            return
        self._switch_back.pop((conn_id, path_id), None)
        try:
            await self.actor._switch(SwitchRequest(conn_id, path_id, reason="failover"))
        except MigrationError as exc:
            log.info(
                "connection %s: switch back to preferred path %d failed: %s", conn_id, path_id, exc
            )

    async def close(self) -> None:
        tasks = [t for t in [*self._running.values(), *self._switch_back.values()] if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
