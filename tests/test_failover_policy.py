"""The failover policy's decisions, through its PolicyPort (our own port, sans-I/O): which
target first, the next one after a rollback, and the suspect-failover count."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

from actors.errors import MigrationRolledBackError
from actors.path_state import PathState
from actors.view import ConnectionView, PathChange, PathSample, PathView
from supervisor.core.config import FailoverPolicy
from supervisor.core.events import Event
from supervisor.core.messages import SwitchRequest
from supervisor.orchestration.failover import FailoverController

CONN = "c1"


def _path(path_id: int, state: PathState, rtt: float, asymmetric: bool = False) -> PathView:
    return PathView(
        path_id, (f"192.0.2.{path_id + 1}", 5000), state, rtt, 1.0, None, None, asymmetric
    )


@dataclass
class Port:
    """What the supervisor gives a policy: views, requests, events, tasks, notes."""

    view_now: ConnectionView
    rolls_back: set[int] = field(default_factory=set)
    asked: list[SwitchRequest] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    def view(self, conn_id: str) -> ConnectionView | None:
        return self.view_now

    def sample(self, conn_id: str) -> dict[int, PathSample]:
        return {}

    async def ask(self, request: object, *, context: object = None) -> object:
        assert isinstance(request, SwitchRequest)
        self.asked.append(request)
        if request.path_id in self.rolls_back:
            # As the connection does: the target that rolled back is failed now.
            paths = tuple(
                replace(p, state=PathState.FAILED) if p.path_id == request.path_id else p
                for p in self.view_now.paths
            )
            self.view_now = replace(self.view_now, paths=paths)
            raise MigrationRolledBackError("192.0.2.1:5000", "x", timeout=0.2, reason="test")
        paths = tuple(
            replace(p, state=PathState.ACTIVE)
            if p.path_id == request.path_id
            else replace(p, state=PathState.FAILED)
            if p.path_id == self.view_now.active_path_id
            else p
            for p in self.view_now.paths
        )
        self.view_now = replace(self.view_now, paths=paths, active_path_id=request.path_id)
        return None

    def emit(self, evt: Event) -> None:
        pass

    def note(self, what: str) -> None:
        self.notes.append(what)

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self.tasks.append(task)
        return task


def _view() -> ConnectionView:
    return ConnectionView(
        CONN,
        ("198.51.100.1", 443),
        ("192.0.2.1", 5000),
        (
            _path(0, PathState.DEGRADED, 0.010),  # the dead active path
            _path(1, PathState.STANDBY, 0.001, asymmetric=True),  # fastest, one way proven
            _path(2, PathState.STANDBY, 0.005),
            _path(3, PathState.STANDBY, 0.003),
        ),
        active_path_id=0,
    )


async def test_targets_validated_both_ways_first_and_the_next_after_a_rollback() -> None:
    port = Port(_view(), rolls_back={3})
    policy = FailoverController(port, FailoverPolicy())
    policy.on_active_dead(CONN, 0, "silent")
    await asyncio.wait_for(asyncio.gather(*port.tasks), 5)
    # 3 (both ways, 3 ms) rolled back, then 2 (both ways, 5 ms); the asymmetric one stayed
    # last although it was the fastest.
    assert [r.path_id for r in port.asked] == [3, 2]
    assert all(r.reason == "failover" and r.old_path_dead for r in port.asked)
    assert port.view_now.active_path_id == 2


async def test_a_failed_over_path_that_answers_within_the_window_is_a_suspect_failover() -> None:
    port = Port(_view())
    policy = FailoverController(port, FailoverPolicy(suspect_window=10.0))
    policy.on_active_dead(CONN, 0, "silent")
    await asyncio.wait_for(asyncio.gather(*port.tasks), 5)
    assert port.notes == []
    revived = PathChange(0, ("192.0.2.1", 5000), PathState.FAILED, PathState.VALIDATING)
    policy.on_changes(CONN, (revived,))
    assert port.notes == ["suspect_failover"]
    policy.on_changes(CONN, (revived,))  # counted once per failover
    assert port.notes == ["suspect_failover"]


async def test_a_path_back_after_the_window_is_no_suspect() -> None:
    port = Port(_view())
    policy = FailoverController(port, FailoverPolicy(suspect_window=0.001))
    policy.on_active_dead(CONN, 0, "silent")
    await asyncio.wait_for(asyncio.gather(*port.tasks), 5)
    await asyncio.sleep(0.01)  # the window is time itself: let it pass
    policy.on_changes(
        CONN, (PathChange(0, ("192.0.2.1", 5000), PathState.FAILED, PathState.STANDBY),)
    )
    assert port.notes == []
