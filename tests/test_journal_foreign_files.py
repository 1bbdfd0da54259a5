"""The journal writer never overwrites, renames or deletes a file it did not write.

Before: ``Supervisor(journal="notes.txt")`` on a text file moved the text to ``notes.txt.1`` (and
deleted ``notes.txt.3``); ``journal="photos"`` renamed the directory. Now anything at the path
that is not a journal is refused before anything is touched, and rotation only shifts files that
start with the journal header.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor import Supervisor
from telemetry.journal import (
    MAX_DEPTH,
    JournalFormatError,
    JournalPathError,
    JournalWriter,
    journal_files,
    read_header,
    read_journal,
)

TEXT = b"my notes\n\x00\xff binary tail, not a journal\n"


def _tree(root: Path) -> dict[str, str]:
    """Every entry under ``root``: name -> kind and content digest (symlinks not followed)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = f"link -> {os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _fill(writer: JournalWriter, n: int) -> None:
    for i in range(n):
        writer.event("Tick", {"i": i, "pad": "x" * 100})


# ------------------------------------------------------------------ refused at the path itself


def test_a_text_file_is_refused_and_left_byte_equal(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_bytes(TEXT)
    (tmp_path / "notes.txt.3").write_bytes(b"an old journal? no: someone's file")
    before = _tree(tmp_path)
    with pytest.raises(JournalPathError) as err:
        JournalWriter(notes)
    text = str(err.value)
    assert str(notes) in text and "not a quic-supervisor journal" in text
    assert "choose another journal path" in text  # the fix
    assert isinstance(err.value, JournalFormatError) and isinstance(err.value, ValueError)
    assert _tree(tmp_path) == before  # nothing renamed, deleted or created
    assert notes.read_bytes() == TEXT


async def test_supervisor_journal_on_a_text_file_fails_at_start_and_touches_nothing(
    tmp_path: Path,
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_bytes(TEXT)
    before = _tree(tmp_path)
    with pytest.raises(JournalPathError, match=r"notes\.txt"):
        async with Supervisor(journal=notes):
            pass
    assert _tree(tmp_path) == before


def test_a_directory_is_refused_and_left_alone(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"\xff\xd8 meow")
    before = _tree(tmp_path)
    with pytest.raises(JournalPathError, match=r"photos is a directory"):
        JournalWriter(photos)
    assert _tree(tmp_path) == before
    assert not (tmp_path / "photos.1").exists()


@pytest.mark.parametrize("target", ["foreign", "journal", "missing"])
def test_a_symlink_is_refused_whatever_it_points_to(tmp_path: Path, target: str) -> None:
    dest = tmp_path / "dest"
    if target == "foreign":
        dest.write_bytes(TEXT)
    elif target == "journal":
        JournalWriter(dest).close()
    link = tmp_path / "run.journal"
    link.symlink_to(dest)
    before = _tree(tmp_path)
    with pytest.raises(JournalPathError, match="symbolic link"):
        JournalWriter(link)
    assert _tree(tmp_path) == before  # a dangling link's target is not created either


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result: list[BaseException] = []
    # In a thread: a writer that opened the FIFO would block this test forever.
    t = threading.Thread(target=lambda: _capture(result, lambda: JournalWriter(fifo)))
    t.start()
    t.join(timeout=10)
    assert not t.is_alive(), "JournalWriter blocked opening a FIFO"
    assert len(result) == 1 and isinstance(result[0], JournalPathError)
    assert "not a regular file" in str(result[0])


def _capture(into: list[BaseException], fn: Any) -> None:
    try:
        fn()
    except BaseException as exc:
        into.append(exc)


def test_an_empty_file_is_accepted_as_nothing_to_lose(tmp_path: Path) -> None:
    path = tmp_path / "run.journal"
    path.touch()
    with JournalWriter(path) as j:
        j.event("First")
    assert [r["type"] for r in read_journal(path)] == ["First"]
    assert journal_files(path) == [path]  # no backup made of an empty file


def test_an_existing_journal_is_kept_as_the_first_backup(tmp_path: Path) -> None:
    path = tmp_path / "run.journal"
    with JournalWriter(path) as j:
        j.event("Run1")
    with JournalWriter(path) as j:
        j.event("Run2")
    assert [f.name for f in journal_files(path)] == ["run.journal.1", "run.journal"]
    assert [r["type"] for f in journal_files(path) for r in read_journal(f)] == ["Run1", "Run2"]


# ------------------------------------------------------------------ foreign files in the chain


@pytest.mark.parametrize("slot", [1, 2, 3])
def test_a_foreign_file_in_the_rotation_chain_survives(tmp_path: Path, slot: int) -> None:
    path = tmp_path / "j"
    foreign = tmp_path / f"j.{slot}"
    foreign.write_bytes(TEXT)
    n = 300
    with JournalWriter(path, max_bytes=4096, backups=3) as j:
        _fill(j, n)
        assert j.rotations > 3
    assert foreign.read_bytes() == TEXT
    # The chain stops below the foreign file: slot - 1 backups, never past it.
    files = journal_files(path)
    assert foreign not in files
    assert [f.name for f in files] == [f"j.{k}" for k in range(slot - 1, 0, -1)] + ["j"]
    assert not any((tmp_path / f"j.{k}").exists() for k in range(slot + 1, 5))
    seen = [r["body"]["i"] for f in files for r in read_journal(f)]
    assert seen == list(range(n - len(seen), n))  # contiguous, newest last


def test_a_directory_in_the_rotation_chain_survives(tmp_path: Path) -> None:
    path = tmp_path / "j"
    (tmp_path / "j.2").mkdir()
    (tmp_path / "j.2" / "keep").write_text("keep me")
    with JournalWriter(path, max_bytes=4096, backups=3) as j:
        _fill(j, 200)
    assert (tmp_path / "j.2" / "keep").read_text() == "keep me"
    assert [f.name for f in journal_files(path)] == ["j.1", "j"]


def test_a_foreign_file_in_the_chain_is_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "j.1").write_bytes(TEXT)
    with JournalWriter(tmp_path / "j", max_bytes=4096, backups=2) as j:
        _fill(j, 200)
    warnings = [r for r in caplog.records if "left alone" in r.getMessage()]
    assert len(warnings) == 1 and "j.1" in warnings[0].getMessage()


def test_journal_files_lists_only_real_backups(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with JournalWriter(path) as j:
        j.event("Now")
    JournalWriter(tmp_path / "j.4").close()
    (tmp_path / "j.2").write_bytes(TEXT)
    (tmp_path / "j.²").write_bytes(TEXT)  # a Unicode digit: not a backup, and no crash
    (tmp_path / "j.x").write_bytes(TEXT)
    assert [f.name for f in journal_files(path)] == ["j.4", "j"]


# ------------------------------------------------------------------ what the writer writes


def test_the_writer_bounds_what_the_reader_must_accept(tmp_path: Path) -> None:
    path = tmp_path / "j"
    deep: Any = "leaf"
    for _ in range(MAX_DEPTH * 3):
        deep = [deep]
    with JournalWriter(path) as j:
        j.event("Odd", {"big": 2**70, "neg": -(2**80), "deep": deep, "keyed": {(1, 2): "tuple"}})
        j.event("Huge", {"blob": b"x" * (9 * 1024 * 1024)})
        j.event("After")
    odd, huge, after = read_journal(path)
    assert odd["body"]["big"] == str(2**70) and odd["body"]["neg"] == str(-(2**80))
    assert odd["body"]["keyed"] == {"(1, 2)": "tuple"}
    level, node = 2, odd["body"]["deep"]
    while isinstance(node, list):
        level, node = level + 1, node[0]
    assert level <= MAX_DEPTH + 1 and "nested deeper" in node
    assert "record limit" in huge["body"]["journal_error"]
    assert after["type"] == "After"


plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(alphabet=st.characters(codec=None, exclude_categories=()))
    | st.binary(max_size=16),
    lambda children: (
        st.lists(children, max_size=3)
        | st.tuples(children, children)
        | st.frozensets(st.integers(), max_size=3)
        | st.dictionaries(st.integers() | st.text(max_size=4) | st.tuples(st.integers()), children)
    ),
    max_leaves=20,
)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=st.dictionaries(st.text(max_size=6), plain_values, max_size=4), depth=st.integers(0, 300)
)
def test_whatever_is_written_reads_back(tmp_path: Path, body: dict[str, Any], depth: int) -> None:
    path = tmp_path / "prop"
    nested: Any = body
    for _ in range(depth):
        nested = {"n": nested}
    with JournalWriter(path, backups=0) as j:
        j.event("Any", nested)
    (record,) = read_journal(path)
    assert record["type"] == "Any"
    assert read_header(path)["version"] == 1


def test_a_non_journal_record_mid_file_is_skipped_only_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with JournalWriter(path) as j:
        j.event("Before")
    with path.open("ab") as fh:
        fh.write(msgpack.packb(["not", "a", "map"]))
        fh.write(b"\x82\xa4kind\xa5event\xa4body" + b"\x91" * 1000 + b"\xc0")  # too deep
        fh.write(msgpack.packb({"kind": "event", "type": "After", "mono": 1.0}))
    with pytest.raises(JournalFormatError, match="record 1 is not a map"):
        list(read_journal(path))
    problems: list[JournalFormatError] = []
    assert [r["type"] for r in read_journal(path, on_invalid=problems.append)] == [
        "Before",
        "After",
    ]
    assert ["not a map" in str(p) for p in problems] == [True, False]
    assert "deeper than" in str(problems[1])
