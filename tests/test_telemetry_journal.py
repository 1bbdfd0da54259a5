"""The msgpack flight recorder: round trip, crash tail, rotation, format errors."""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider

from telemetry.journal import (
    JOURNAL_MAGIC,
    JournalFormatError,
    JournalWriter,
    journal_files,
    read_header,
    read_journal,
)


class State(enum.Enum):
    ACTIVE = "active"


@dataclasses.dataclass(frozen=True)
class Info:
    local_addr: str
    state: State


def test_round_trip_with_trace_ids(tmp_path: Path) -> None:
    path = tmp_path / "j.msgpack"
    tracer = TracerProvider().get_tracer("t")
    with JournalWriter(path) as j:
        j.msg("Switch", {"path": "p2", "timeout": 1.5}, conn="c1", path="p2", mono=10.0, wall=99.0)
        with tracer.start_as_current_span("quic.migration") as span:
            j.event("PathStateChanged", {"old": State.ACTIVE, "new": "standby"}, conn="c1")
        j.event("Weird", {"info": Info("/ip4/1.2.3.4/udp/1/quic-v1", State.ACTIVE), "s": {1}})
    header = read_header(path)
    assert header["magic"] == JOURNAL_MAGIC and header["version"] == 1
    recs = list(read_journal(path))
    assert [r["type"] for r in recs] == ["Switch", "PathStateChanged", "Weird"]
    first = recs[0]
    assert first == {
        "mono": 10.0,
        "wall": 99.0,
        "kind": "msg",
        "type": "Switch",
        "conn": "c1",
        "path": "p2",
        "trace_id": None,
        "span_id": None,
        "body": {"path": "p2", "timeout": 1.5},
    }
    ctx = span.get_span_context()
    assert recs[1]["trace_id"] == f"{ctx.trace_id:032x}"
    assert recs[1]["span_id"] == f"{ctx.span_id:016x}"
    assert recs[1]["body"] == {"old": "active", "new": "standby"}  # enum by value
    assert recs[2]["body"] == {
        "info": {"local_addr": "/ip4/1.2.3.4/udp/1/quic-v1", "state": "active"},
        "s": [1],
    }
    assert recs[1]["mono"] <= recs[2]["mono"]


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(alphabet=st.characters(codec=None, exclude_categories=()))  # with surrogates
    | st.binary(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=st.dictionaries(st.text(max_size=12), msgpack_values, max_size=6))
def test_any_msgpack_body_round_trips(tmp_path: Path, body: dict[str, Any]) -> None:
    path = tmp_path / "prop.msgpack"
    with JournalWriter(path, backups=0) as j:
        j.event("Any", body)
    (rec,) = read_journal(path)
    assert rec["body"] == body


def test_truncated_tail_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "j.msgpack"
    with JournalWriter(path) as j:
        for i in range(10):
            j.event("Tick", {"i": i, "pad": "x" * 50})
    data = path.read_bytes()
    for cut in (1, 7, 40):  # a crash in the middle of writing the last record
        path.write_bytes(data[:-cut])
        assert [r["body"]["i"] for r in read_journal(path)] == list(range(9))


def test_flush_policy(tmp_path: Path) -> None:
    path = tmp_path / "j.msgpack"
    j = JournalWriter(path, flush_every=4)
    try:
        assert list(read_journal(path)) == []  # the header is on disk at once
        for i in range(4):
            j.event("Tick", {"i": i})
        assert len(list(read_journal(path))) == 4  # flushed every 4 records
        j.event("Tick", {"i": 4})
        assert len(list(read_journal(path))) == 4  # still buffered
        j.flush()
        assert len(list(read_journal(path))) == 5
    finally:
        j.close()
    j.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        j.event("Late")


def test_rotation_at_cap(tmp_path: Path) -> None:
    path = tmp_path / "j.msgpack"
    max_bytes, n = 4096, 200
    with JournalWriter(path, max_bytes=max_bytes, backups=3) as j:
        for i in range(n):
            j.event("Tick", {"i": i, "pad": "x" * 100})
        rotations = j.rotations
    assert rotations > 3  # old files were dropped, not kept forever
    files = journal_files(path)
    assert [f.name for f in files] == ["j.msgpack.3", "j.msgpack.2", "j.msgpack.1", "j.msgpack"]
    assert not (tmp_path / "j.msgpack.4").exists()
    seen: list[int] = []
    for f in files:
        assert f.stat().st_size <= max_bytes
        read_header(f)  # every file stands alone
        seen += [r["body"]["i"] for r in read_journal(f)]
    # Oldest first, contiguous, ending with the last record written.
    assert seen == list(range(n - len(seen), n))


def test_reopening_rotates_the_previous_run(tmp_path: Path) -> None:
    path = tmp_path / "j.msgpack"
    with JournalWriter(path) as j:
        j.event("Run1")
    path.write_bytes(path.read_bytes()[:-2])  # the first run crashed mid-record
    with JournalWriter(path) as j:
        j.event("Run2")
    assert [r["type"] for r in read_journal(path)] == ["Run2"]
    assert [r["type"] for r in read_journal(tmp_path / "j.msgpack.1")] == []  # truncated tail


def test_writer_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        JournalWriter(tmp_path / "a", max_bytes=10)
    with pytest.raises(ValueError, match="backups"):
        JournalWriter(tmp_path / "a", backups=-1)
    with JournalWriter(tmp_path / "a") as j, pytest.raises(ValueError, match="kind"):
        j.write("log", "X")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "not a quic-supervisor journal"),
        (b"hello, this is a text file\n", "not a quic-supervisor journal"),
        (b"\xc1\xc1\xc1", "not a quic-supervisor journal"),
        (msgpack.packb({"kind": "event", "type": "X"}), "not a quic-supervisor journal"),
        (msgpack.packb({"magic": "something-else", "version": 1}), "not a quic-supervisor"),
        (msgpack.packb({"magic": JOURNAL_MAGIC, "version": 2}), "version 2 is not supported"),
        (msgpack.packb({"magic": JOURNAL_MAGIC, "version": 1}) + msgpack.packb(5), "record 0"),
    ],
)
def test_not_a_journal(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(JournalFormatError, match=match):
        list(read_journal(path))
    assert issubclass(JournalFormatError, ValueError)
