"""PathState transition table: code, documentation and state machine agree."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from actors.errors import InvalidTransitionError, MigrationError
from actors.path_state import TRANSITIONS, PathState, PathStateMachine, check_transition

DOC = Path(__file__).resolve().parent.parent / "docs" / "path-states.md"
_STATES = st.sampled_from(list(PathState))


def _doc_edges() -> set[tuple[PathState, PathState]]:
    """Rows of the table under '## Transitions' whose first two cells are `state` names."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Transitions", 1)[1].split("\n## ", 1)[0]
    edges: set[tuple[PathState, PathState]] = set()
    row = re.compile(r"^\|\s*`(\w+)`\s*\|\s*`(\w+)`\s*\|")
    for line in section.splitlines():
        m = row.match(line)
        if m:
            edge = (PathState(m.group(1)), PathState(m.group(2)))
            assert edge not in edges, f"edge listed twice in {DOC.name}: {edge}"
            edges.add(edge)
    return edges


def _code_edges() -> set[tuple[PathState, PathState]]:
    return {(old, new) for old, targets in TRANSITIONS.items() for new in targets}


def test_doc_table_matches_code() -> None:
    doc, code = _doc_edges(), _code_edges()
    assert doc, "no transition rows parsed from docs/path-states.md"
    assert doc - code == set(), f"in the doc but not in TRANSITIONS: {sorted(doc - code)}"
    assert code - doc == set(), f"in TRANSITIONS but not in the doc: {sorted(code - doc)}"


def test_doc_lists_every_state() -> None:
    text = DOC.read_text(encoding="utf-8")
    for state in PathState:
        assert f"| `{state.value}`" in text


def test_table_shape() -> None:
    assert set(TRANSITIONS) == set(PathState)
    assert TRANSITIONS[PathState.CLOSED] == frozenset()
    for old, targets in TRANSITIONS.items():
        assert old not in targets, f"self-loop on {old}"
        if old is not PathState.CLOSED:
            assert PathState.CLOSED in targets, f"{old} cannot be closed"
    # every state but new is reachable from new
    seen, todo = {PathState.NEW}, [PathState.NEW]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(PathState)


def test_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        TRANSITIONS[PathState.CLOSED] = frozenset({PathState.NEW})  # type: ignore[index]


def test_values_and_str() -> None:
    assert [s.value for s in PathState] == [
        "new",
        "validating",
        "standby",
        "active",
        "degraded",
        "failed",
        "closed",
    ]
    assert PathState("standby") is PathState.STANDBY
    assert str(PathState.ACTIVE) == "active" and f"{PathState.ACTIVE}" == "active"
    assert PathState.ACTIVE == "active"  # str enum
    assert PathState.DEGRADED.carries_traffic and PathState.ACTIVE.carries_traffic
    assert not PathState.STANDBY.carries_traffic
    assert pickle.loads(pickle.dumps(PathState.FAILED)) is PathState.FAILED


@given(_STATES, _STATES)
def test_check_transition_agrees_with_table(old: PathState, new: PathState) -> None:
    if new in TRANSITIONS[old]:
        check_transition(old, new)
    else:
        with pytest.raises(InvalidTransitionError) as info:
            check_transition(old, new)
        err = info.value
        assert isinstance(err, MigrationError)
        assert (err.old, err.new) == (old, new)
        assert f"{old.value} -> {new.value}" in str(err)


def test_invalid_transition_message_lists_options() -> None:
    with pytest.raises(InvalidTransitionError, match="active -> new") as info:
        check_transition(PathState.ACTIVE, PathState.NEW)
    assert "closed, degraded, failed, standby" in str(info.value)
    restored = pickle.loads(pickle.dumps(info.value))
    assert (restored.old, restored.new) == (PathState.ACTIVE, PathState.NEW)
    assert str(restored) == str(info.value)
    with pytest.raises(InvalidTransitionError, match="terminal"):
        check_transition(PathState.CLOSED, PathState.NEW)


def test_machine_basics() -> None:
    sm = PathStateMachine()
    assert sm.state is PathState.NEW and not sm.closed
    assert sm.move(PathState.NEW) is None
    assert sm.move(PathState.VALIDATING) == (PathState.NEW, PathState.VALIDATING)
    assert sm.move(cast(PathState, "standby")) == (PathState.VALIDATING, PathState.STANDBY)
    with pytest.raises(InvalidTransitionError):
        sm.move(PathState.NEW)
    assert sm.state is PathState.STANDBY  # unchanged by the refused move
    assert sm.move(PathState.CLOSED) == (PathState.STANDBY, PathState.CLOSED)
    assert sm.closed and sm.move(PathState.CLOSED) is None  # idempotent close
    with pytest.raises(ValueError):
        sm.move(cast(PathState, "bogus"))
    assert repr(PathStateMachine(PathState.ACTIVE)) == "PathStateMachine(active)"


def test_handshake_path_lifecycle() -> None:
    """The handshake path starts active, is switched away from, and can come back."""
    sm = PathStateMachine()
    for nxt in (
        PathState.ACTIVE,
        PathState.STANDBY,
        PathState.VALIDATING,
        PathState.STANDBY,
        PathState.ACTIVE,
        PathState.DEGRADED,
        PathState.FAILED,
        PathState.VALIDATING,
        PathState.STANDBY,
        PathState.CLOSED,
    ):
        assert sm.move(nxt) is not None
    assert sm.closed


class PathStateRules(RuleBasedStateMachine):
    """Random walks: every move taken is an edge of the table; illegal ones raise and change
    nothing; closed is terminal."""

    def __init__(self) -> None:
        super().__init__()
        self.sm = PathStateMachine()
        self.model = PathState.NEW
        self.taken: list[tuple[PathState, PathState]] = []

    @rule(to=_STATES)
    def move(self, to: PathState) -> None:
        before = self.sm.state
        if to is before:
            assert self.sm.move(to) is None
        elif to in TRANSITIONS[before]:
            assert self.sm.move(to) == (before, to)
            self.taken.append((before, to))
            self.model = to
        else:
            with pytest.raises(InvalidTransitionError):
                self.sm.move(to)
        assert self.sm.state is self.model

    @rule(data=st.data())
    def legal_move(self, data: st.DataObject) -> None:
        """Walk only legal edges too, so long walks reach every state."""
        allowed = sorted(TRANSITIONS[self.sm.state], key=lambda s: s.value)
        if not allowed:
            return
        to = data.draw(st.sampled_from(allowed))
        before = self.sm.state
        assert self.sm.move(to) == (before, to)
        self.taken.append((before, to))
        self.model = to

    @rule()
    def close(self) -> None:
        edge = self.sm.move(PathState.CLOSED)
        assert edge is None or edge[1] is PathState.CLOSED
        if edge is not None:
            self.taken.append(edge)
        self.model = PathState.CLOSED

    @invariant()
    def edges_in_table(self) -> None:
        for old, new in self.taken:
            assert new in TRANSITIONS[old]

    @invariant()
    def closed_is_terminal(self) -> None:
        if PathState.CLOSED in [new for _, new in self.taken]:
            assert self.sm.state is PathState.CLOSED
            assert self.taken[-1][1] is PathState.CLOSED

    @invariant()
    def can_move_agrees(self) -> None:
        for s in PathState:
            assert self.sm.can_move(s) == (s is self.sm.state or s in TRANSITIONS[self.sm.state])


TestPathStateRules = PathStateRules.TestCase
