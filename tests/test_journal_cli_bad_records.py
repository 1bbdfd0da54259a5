"""``journal show|plot`` on damaged journals: bad records are skipped and reported, never a
traceback, and the good records are still shown.

Before: a record whose timestamp was a list, a map or a string made both commands print a
traceback. Runs ``main([...])`` in-process, as tests/test_telemetry_cli.py does.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import msgpack
import pytest

from supervisor.cli import main
from telemetry.journal import JournalWriter

BAD_TIMES: dict[str, object] = {
    "list": [1.0, 2.0],
    "map": {"t": 1.0},
    "string": "12.5",
    "bool": True,
    "nan": math.nan,
    "huge int": 2**63,  # beyond 1e12 s: no clock reading
}


def _journal(path: Path, *extra: bytes) -> None:
    """Two good records, then ``extra`` raw bytes appended as they are."""
    with JournalWriter(path) as j:
        j.event("PathAdded", {"local_addr": "/ip4/127.0.0.1/udp/1/quic-v1"}, conn="c1", path="p1")
        j.event("GoodToo", {"n": 1}, conn="c1", path="p1")
    with path.open("ab") as fh:
        for chunk in extra:
            fh.write(chunk)


def _record(**fields: object) -> bytes:
    base: dict[str, object] = {"kind": "event", "type": "Odd", "conn": "c1", "path": "p1"}
    return bytes(msgpack.packb(base | fields))


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["journal", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return status, out, err


@pytest.mark.parametrize("field", ["mono", "wall"])
@pytest.mark.parametrize("value", BAD_TIMES.values(), ids=BAD_TIMES.keys())
def test_show_and_plot_skip_a_record_with_a_bad_timestamp(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: object
) -> None:
    path = tmp_path / "run.journal"
    fields = {"mono": value} if field == "mono" else {"mono": None, "wall": value}
    _journal(path, _record(type="Weird", **fields))

    status, out, _ = _run(capsys, "show", str(path))
    assert status == 0
    assert "PathAdded" in out and "GoodToo" in out and "Weird" not in out
    assert "(1 record(s) without a usable mono/wall time not shown)" in out

    png = tmp_path / "t.png"
    status, out, _ = _run(capsys, "plot", str(path), "-o", str(png))
    assert status == 0
    assert f"wrote {png} (3 records, 1 without a usable time not drawn)" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_odd_field_values_are_shown_as_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run.journal"
    deep: object = "x"
    for _ in range(40):
        deep = [deep]
    _journal(
        path,
        _record(
            mono=1e9,
            type=["not", "a", "str"],
            conn={"a": 1},
            path=b"\x00\xff",
            trace_id=5,
            body={"bytes": "many", "from_path": [1], "to_path": "$\\frac{", "deep": deep},
        ),
        _record(mono=1e9 + 1, type="Stats", body={"tx_bytes": math.inf, "rx_bytes": -(2**63)}),
        _record(mono=1e9 + 2, type="PathStateChanged", body=["not", "a", "map"]),
    )
    status, out, _ = _run(capsys, "show", str(path))
    assert status == 0
    assert "['not', 'a', 'str']" in out and "[[[[...]]]]" in out
    png = tmp_path / "t.png"
    status, _, _ = _run(capsys, "plot", str(path), "-o", str(png))
    assert status == 0 and png.exists()


def test_records_that_are_not_records_are_skipped_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run.journal"
    _journal(
        path,
        msgpack.packb("a bare string"),
        msgpack.packb({"kind": "log", "type": "NoSuchKind"}),
        b"\x82\xa4kind\xa5event\xa4body" + b"\x91" * 500 + b"\xc0",  # nested too deep
        _record(mono=5.0, type="AfterTheBadOnes"),
        b"\xc1\xc1\xc1",  # corrupt bytes: the rest of the file is unreadable
        _record(mono=6.0, type="Unreachable"),
    )
    for argv in (["show", str(path)], ["plot", str(path), "-o", str(tmp_path / "t.png")]):
        status, out, err = _run(capsys, *argv)
        assert status == 0
        warnings = err.splitlines()
        assert len(warnings) == 4, err
        assert all(w.startswith("quic-supervisor journal: warning: skipped: ") for w in warnings)
        assert "record 2 is not a map" in warnings[0]
        assert "'log'" in warnings[1]
        assert "nested deeper than 64 levels" in warnings[2]
        assert "record 6 is corrupt" in warnings[3]
        if argv[0] == "show":
            assert "AfterTheBadOnes" in out and "Unreachable" not in out
        else:
            assert "(3 records)" in out


def test_many_bad_records_are_summarised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run.journal"
    _journal(path, *(msgpack.packb(i) for i in range(12)))
    status, out, err = _run(capsys, "show", str(path))
    assert status == 0 and "GoodToo" in out
    assert err.splitlines()[-1] == "quic-supervisor journal: warning: skipped 7 more bad record(s)"
    assert len(err.splitlines()) == 6


def test_a_foreign_file_in_the_chain_is_not_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run.journal"
    _journal(path)
    (tmp_path / "run.journal.1").write_text("someone's notes\n")
    status, out, err = _run(capsys, "show", str(path))
    assert status == 0 and "GoodToo" in out and err == ""


def test_a_directory_or_fifo_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "dir").mkdir()
    status, _, err = _run(capsys, "show", str(tmp_path / "dir"))
    assert status == 2 and "is a directory" in err and err.count("\n") == 1

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result: list[int] = []
    # In a thread: reading a FIFO would block forever.
    t = threading.Thread(target=lambda: result.append(main(["journal", "show", str(fifo)])))
    t.start()
    t.join(timeout=20)
    assert not t.is_alive(), "journal show blocked on a FIFO"
    assert result == [2]
    assert "is not a regular file" in capsys.readouterr().err
