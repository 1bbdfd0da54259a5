"""Every decoder of outside bytes raises only its documented error, whatever the input.

Decoders: the envelope codec (``EnvelopeError``), control-socket framing (``FrameError``, then
the envelope codec), the journal reader (``JournalFormatError``) and the timeline renderers
behind ``journal show|plot`` (no error at all: a bad record is skipped or shown as text).
Inputs: random bytes, and nesting far deeper than any limit (msgpack.packb refuses to build
that, so it is written by hand: ``0x91`` is a one-element array, ``0x81 0xa1 'k'`` a one-entry
map, ``0xc0`` nil).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import actors.envelope as envelope
import supervisor.remote.control  # noqa: F401  (registers the remote.* messages)
from actors.envelope import EXT_ENUM, EXT_MESSAGE, EnvelopeError, decode
from supervisor.remote.control import MAX_FRAME, FrameError, frame, read_frame
from supervisor.remote.protocol import ErrorReply
from telemetry.journal import JournalFormatError, JournalWriter, read_journal
from telemetry.timeline import plot, record_time, render_text

FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# An envelope whose ``attrs`` (typed dict[str, Any]) holds one value; the last byte is its nil.
_ERROR_PREFIX = msgpack.packb(
    {"v": 1, "type": "remote.Error", "body": {"type": "X", "message": "m", "attrs": {"a": None}}}
)[:-1]


def nested(depth: int, kind: str) -> bytes:
    """``depth`` levels of one-element arrays or maps around a nil."""
    level = b"\x91" if kind == "array" else b"\x81\xa1k"
    return level * depth + b"\xc0"


def nested_messages(depth: int) -> bytes:
    """An envelope whose Any field holds a message holding a message ... ``depth`` deep."""
    inner = msgpack.packb(None)
    for _ in range(depth):
        payload = b"\x92" + msgpack.packb("remote.Error") + _ERROR_PREFIX.split(b"\xa4body", 1)[1]
        inner = msgpack.packb(msgpack.ExtType(EXT_MESSAGE, payload + inner))
    return _ERROR_PREFIX + inner


def _decode_or_envelope_error(data: bytes) -> None:
    with contextlib.suppress(EnvelopeError):
        decode(data)


# ------------------------------------------------------------------ envelope codec


@FUZZ
@given(st.binary(max_size=2048))
def test_envelope_random_bytes(data: bytes) -> None:
    _decode_or_envelope_error(data)


@FUZZ
@given(st.binary(max_size=512), st.integers(0, 64))
def test_envelope_random_bytes_inside_a_valid_prefix(tail: bytes, cut: int) -> None:
    _decode_or_envelope_error(_ERROR_PREFIX[: len(_ERROR_PREFIX) - cut] + tail)


@settings(max_examples=60, deadline=None)
@given(depth=st.integers(0, 10_000), kind=st.sampled_from(["array", "map"]), at=st.booleans())
def test_envelope_deep_nesting_is_an_envelope_error(depth: int, kind: str, at: bool) -> None:
    """At the top, or inside an Any field of a valid envelope (the 600-deep control frame that
    raised RecursionError in the server was the latter)."""
    data = (_ERROR_PREFIX if at else b"") + nested(depth, kind)
    if at and depth < envelope.MAX_DEPTH - 5:
        assert isinstance(decode(data).body, ErrorReply)  # shallow values still decode
    else:
        with pytest.raises(EnvelopeError):
            decode(data)


def test_the_known_600_deep_frame_is_an_envelope_error_naming_the_limit() -> None:
    data = _ERROR_PREFIX + nested(600, "array")
    assert len(data) < 700
    with pytest.raises(EnvelopeError, match=f"nested deeper than {envelope.MAX_DEPTH} levels"):
        decode(data)


@pytest.mark.parametrize("depth", [1, 10, 40, 200])
def test_envelope_nested_extension_messages_count_towards_the_limit(depth: int) -> None:
    data = nested_messages(depth)
    if depth <= 10:
        reply = decode(data).body
        for _ in range(depth + 1):  # the envelope's own message, then the nested ones
            assert isinstance(reply, ErrorReply)
            reply = reply.attrs["a"]
        assert reply is None
    else:
        with pytest.raises(EnvelopeError, match="nested deeper"):
            decode(data)


@FUZZ
@given(
    code=st.sampled_from([EXT_ENUM, EXT_MESSAGE, 1, 7, -1]),
    payload=st.binary(max_size=64),
    name=st.sampled_from(["remote.Error", "remote.Ok", "sup.Snapshot", "actors.PathState", "x.Y"]),
    value=st.recursive(
        st.none()
        | st.integers(-(2**63), 2**64 - 1)
        | st.text(max_size=4)
        | st.binary(max_size=4)
        | st.floats(),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
        max_leaves=8,
    ),
)
def test_envelope_hostile_extensions(code: int, payload: bytes, name: str, value: Any) -> None:
    for ext_data in (payload, msgpack.packb([name, value])):
        # ext 32 by hand: msgpack.ExtType refuses the reserved negative codes.
        ext = b"\xc9" + len(ext_data).to_bytes(4, "big") + code.to_bytes(1, "big", signed=True)
        _decode_or_envelope_error(_ERROR_PREFIX + ext + ext_data)


def test_envelope_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(envelope, "MAX_ENVELOPE_BYTES", 1024)
    with pytest.raises(EnvelopeError, match="exceeds the 1024-byte limit"):
        decode(_ERROR_PREFIX + msgpack.packb("x" * 2000))


@pytest.mark.parametrize("data", [memoryview(b"\x80"), bytearray(b"\xc1"), "str", None, 5])
def test_envelope_non_bytes_and_views(data: Any) -> None:
    _decode_or_envelope_error(data)


# ------------------------------------------------------------------ control frames


async def _frames(data: bytes) -> list[bytes]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    out: list[bytes] = []
    while (payload := await read_frame(reader, MAX_FRAME)) is not None:
        out.append(payload)
    return out


@FUZZ
@given(st.binary(max_size=1024))
def test_control_frames_random_bytes(data: bytes) -> None:
    try:
        payloads = asyncio.run(_frames(data))
    except FrameError:
        return
    for payload in payloads:
        _decode_or_envelope_error(payload)


@settings(max_examples=40, deadline=None)
@given(depth=st.integers(0, 10_000), kind=st.sampled_from(["array", "map"]))
def test_control_frames_deep_nesting(depth: int, kind: str) -> None:
    (payload,) = asyncio.run(_frames(frame(_ERROR_PREFIX + nested(depth, kind))))
    _decode_or_envelope_error(payload)


# ------------------------------------------------------------------ journal reader


def _header(tmp_path: Path) -> bytes:
    path = tmp_path / "h"
    JournalWriter(path).close()
    return path.read_bytes()


@FUZZ
@given(data=st.binary(max_size=1024), after_header=st.booleans())
def test_journal_reader_random_bytes(tmp_path: Path, data: bytes, after_header: bool) -> None:
    path = tmp_path / "fuzz.journal"
    path.write_bytes((_header(tmp_path) if after_header else b"") + data)
    with contextlib.suppress(JournalFormatError):
        list(read_journal(path))
    # Asked to skip, the reader raises nothing for bad records (only for a bad header).
    problems: list[JournalFormatError] = []
    if after_header:
        list(read_journal(path, on_invalid=problems.append))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(depth=st.integers(0, 10_000), kind=st.sampled_from(["array", "map"]))
def test_journal_reader_deep_nesting(tmp_path: Path, depth: int, kind: str) -> None:
    path = tmp_path / "deep.journal"
    record = b"\x82\xa4kind\xa5event\xa4body" + nested(depth, kind)
    path.write_bytes(_header(tmp_path) + record + msgpack.packb({"kind": "msg", "type": "Ok"}))
    problems: list[JournalFormatError] = []
    types = [r.get("type") for r in read_journal(path, on_invalid=problems.append)]
    assert types in (["Ok"], [None, "Ok"], [])  # skipped, kept, or the rest unreadable
    assert all(isinstance(p, JournalFormatError) for p in problems)


# ------------------------------------------------------------------ timeline (journal show|plot)

_odd_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=8)
    | st.sampled_from(["$x$", "$\\frac{", "validating", "standby", "/ip4/1.2.3.4/udp/5/quic-v1"]),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=10,
)
_fields = st.sampled_from(["mono", "wall", "kind", "type", "conn", "path", "trace_id", "body"])
_types = st.sampled_from(
    ["Stats", "PathStateChanged", "SwitchRequest", "ConnectionMigrationCompleted", "X"]
)
_records = st.lists(
    st.fixed_dictionaries(
        {"kind": st.sampled_from(["msg", "event"]), "type": _types | _odd_values},
        optional={
            "mono": _odd_values,
            "wall": _odd_values,
            "conn": _odd_values,
            "path": _odd_values,
            "trace_id": _odd_values,
            "body": st.dictionaries(
                st.sampled_from(
                    ["bytes", "tx_bytes", "rx_bytes", "from_path", "to_path", "old", "new"]
                )
                | st.text(max_size=4),
                _odd_values,
            )
            | _odd_values,
        },
    ),
    max_size=12,
)


@FUZZ
@given(_records)
def test_render_text_never_fails(records: list[dict[str, Any]]) -> None:
    text = render_text(records)
    untimed = sum(1 for r in records if record_time(r) is None)
    assert (f"({untimed} record(s) without" in text) == (untimed > 0)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(_records)
def test_plot_never_fails(tmp_path: Path, records: list[dict[str, Any]]) -> None:
    out = tmp_path / "fuzz.png"
    plot(records, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("value", "usable"),
    [
        ([1.0], False),
        ({"t": 1.0}, False),
        ("12.5", False),
        (True, False),
        (math.nan, False),
        (math.inf, False),
        (2**80, False),
        (12, True),
        (12.5, True),
    ],
)
def test_record_time(value: object, usable: bool) -> None:
    assert (record_time({"mono": value}) is not None) == usable
    assert (record_time({"mono": None, "wall": value}) is not None) == usable
