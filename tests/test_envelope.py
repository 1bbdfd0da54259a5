"""Tests of the control-message envelope and its msgpack codec.

``test_every_registered_message_round_trips`` imports every module of the three packages and walks
the registry at test time, so message types added later are covered without touching this file.
A type whose constructor checks more than its annotations say can add a strategy to
``CUSTOM_STRATEGIES`` below.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import pkgutil
import types
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multiaddr import Multiaddr

from actors.envelope import (
    CODEC_VERSION,
    EXT_ENUM,
    EXT_MESSAGE,
    EXT_MULTIADDR,
    Envelope,
    EnvelopeError,
    decode,
    encode,
    message,
    message_types,
    type_name,
    wire_enum,
    wire_enums,
)

# -- test message types -----------------------------------------------------------------------


@wire_enum("test.Color")
class Color(enum.Enum):
    RED = "red"
    GREEN = 2


@wire_enum("test.Level")
class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Loose(enum.Enum):
    """Deliberately not registered with @wire_enum."""

    A = 1


@message("test.Leaf")
@dataclass(frozen=True, slots=True)
class Leaf:
    n: int
    color: Color | None = None


@message("test.Everything")
@dataclass(frozen=True, slots=True)
class Everything:
    """One field of every kind the codec supports."""

    nothing: None
    flag: bool
    count: int
    ratio: float
    text: str
    blob: bytes
    addr: Multiaddr
    color: Color
    level: Level
    leaf: Leaf
    maybe_leaf: Leaf | None
    ints: list[int]
    pair: tuple[str, bytes]
    many: tuple[float, ...]
    leaves: tuple[Leaf, ...]
    table: dict[str, tuple[int, Color]]
    mode: Literal["a", "b"]
    either: int | str
    anything: Any
    nested: list[dict[str, list[tuple[int, ...]]]]
    optional_default: str | None = None
    with_factory: list[str] = field(default_factory=list)


@message("test.Tree")
@dataclass(frozen=True, slots=True)
class Tree:
    """Self-referential through a forward reference, resolved at first use."""

    label: str
    children: tuple[Tree, ...] = ()


@message("test.Validated")
@dataclass(frozen=True, slots=True)
class Validated:
    """A constructor check stricter than the annotation: needs a custom strategy."""

    port: int

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")


# -- strategies -------------------------------------------------------------------------------

INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
FLOATS = st.floats(allow_nan=False)  # NaN != NaN: covered by its own test


@st.composite
def multiaddrs(draw: st.DrawFn) -> Multiaddr:
    ip = draw(st.ip_addresses())
    port = draw(st.integers(0, 65535))
    family = "ip4" if ip.version == 4 else "ip6"
    suffix = draw(st.sampled_from(["", "/quic-v1"]))
    return Multiaddr(f"/{family}/{ip}/udp/{port}{suffix}")


#: Any-typed fields: wire-native values only (tuples would come back as lists, by design).
ANY_VALUE = st.recursive(
    st.none() | st.booleans() | INT64 | FLOATS | st.text() | st.binary() | multiaddrs(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)

#: Per wire name, for types whose constructors check more than their annotations.
CUSTOM_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "test.Validated": st.builds(Validated, port=st.integers(0, 65535)),
}

_MESSAGE_STRATEGIES: dict[type, st.SearchStrategy[Any]] = {}


def strategy_for(hint: Any) -> st.SearchStrategy[Any]:
    """A strategy for any type hint the codec accepts (what ``@message`` lets through)."""
    if hint is Any or hint is object:
        return ANY_VALUE
    if hint is None or hint is type(None):
        return st.none()
    simple: dict[Any, st.SearchStrategy[Any]] = {
        bool: st.booleans(),
        int: INT64,
        float: FLOATS,
        str: st.text(),
        bytes: st.binary(),
        Multiaddr: multiaddrs(),
        list: st.lists(ANY_VALUE, max_size=3),
        tuple: st.lists(ANY_VALUE, max_size=3).map(tuple),
        dict: st.dictionaries(st.text(), ANY_VALUE, max_size=3),
    }
    if hint in simple:
        return simple[hint]
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return st.one_of([strategy_for(a) for a in args])
    if origin is Literal:
        return st.sampled_from(args)
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=4)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(strategy_for(args[0]), max_size=4).map(tuple)
        if args == ((),):
            return st.just(())
        return st.tuples(*[strategy_for(a) for a in args])
    if origin is dict:
        return st.dictionaries(st.text(), strategy_for(args[1]), max_size=4)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return st.from_type(hint)
    if isinstance(hint, type) and is_dataclass(hint):
        return message_strategy(hint)
    return st.from_type(hint)


def message_strategy(cls: type) -> st.SearchStrategy[Any]:
    custom = CUSTOM_STRATEGIES.get(type_name(cls))
    if custom is not None:
        return custom
    if cls not in _MESSAGE_STRATEGIES:
        # deferred: message types may refer to themselves (Tree).
        _MESSAGE_STRATEGIES[cls] = st.deferred(lambda: _build_message_strategy(cls))
    return _MESSAGE_STRATEGIES[cls]


def _build_message_strategy(cls: type) -> st.SearchStrategy[Any]:
    hints = get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if f.init:
            kwargs[f.name] = strategy_for(hints[f.name])
    return st.builds(cls, **kwargs)


def assert_round_trips(msg: object, **trace: str | None) -> Envelope:
    data = encode(msg, **trace)
    env = decode(data)
    assert env.v == CODEC_VERSION
    assert env.type == type_name(msg)
    assert type(env.body) is type(msg)
    assert env.body == msg
    assert encode(env.body, **trace) == data
    for key in ("traceparent", "tracestate", "baggage"):
        assert getattr(env, key) == trace.get(key)
    return env


# -- round trips ------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    msg=message_strategy(Everything),
    traceparent=st.none() | st.text(),
    tracestate=st.none() | st.text(),
    baggage=st.none() | st.text(),
)
def test_everything_round_trips(
    msg: Everything, traceparent: str | None, tracestate: str | None, baggage: str | None
) -> None:
    env = assert_round_trips(msg, traceparent=traceparent, tracestate=tracestate, baggage=baggage)
    body = env.body
    assert isinstance(body, Everything)
    # Tuples come back as tuples where the field says so, lists stay lists.
    assert type(body.pair) is tuple and type(body.many) is tuple and type(body.leaves) is tuple
    assert type(body.ints) is list
    assert all(type(v) is tuple for v in body.table.values())


@settings(max_examples=60, deadline=None)
@given(message_strategy(Tree))
def test_recursive_message_round_trips(tree: Tree) -> None:
    assert_round_trips(tree)


def test_nan_round_trips_bit_for_bit() -> None:
    data = encode(_everything(ratio=float("nan"), many=(float("nan"), -0.0, float("inf"))))
    body = decode(data).body
    assert isinstance(body, Everything)
    assert body.ratio != body.ratio
    assert encode(body) == data


def _import_all_modules() -> list[str]:
    """Import every module of our packages so their @message types register.

    Returns the modules skipped because an optional third-party dependency (e.g. ray) is missing;
    any other import error fails the test.
    """
    skipped = []
    for package_name in ("supervisor", "actors", "telemetry"):
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, f"{package_name}."):
            if info.name.rsplit(".", 1)[-1] == "__main__":
                continue  # importing __main__ would run the program
            try:
                importlib.import_module(info.name)
            except ModuleNotFoundError as exc:
                top = (exc.name or "").split(".")[0]
                if top in ("supervisor", "actors", "telemetry") or not top:
                    raise
                skipped.append(f"{info.name} (needs {top})")
    return skipped


def test_every_module_imports_for_the_registry() -> None:
    skipped = _import_all_modules()
    if skipped:
        pytest.skip(f"messages in these modules are not covered: {', '.join(skipped)}")


def test_every_registered_message_round_trips() -> None:
    _import_all_modules()
    registry = dict(message_types())
    assert {"test.Everything", "test.Leaf", "test.Tree", "test.Validated"} <= registry.keys()
    failures: list[str] = []
    for name, cls in sorted(registry.items()):

        @settings(
            max_examples=40,
            database=None,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        @given(message_strategy(cls))
        def check(msg: object) -> None:
            assert_round_trips(msg, traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01")

        try:
            check()
        except Exception as exc:
            failures.append(f"{name} ({cls.__module__}.{cls.__qualname__}): {exc!r}")
    assert not failures, "message types that do not round-trip:\n" + "\n".join(failures)


def test_every_registered_enum_member_round_trips() -> None:
    _import_all_modules()
    assert wire_enums(), "no enum registered"
    for enum_cls in wire_enums().values():
        for member in enum_cls:
            body = decode(encode(_everything(anything=member))).body
            assert isinstance(body, Everything)
            assert body.anything is member


# -- wire form --------------------------------------------------------------------------------


def test_wire_form_is_a_plain_map_without_absent_trace_fields() -> None:
    doc = msgpack.unpackb(encode(Leaf(3, Color.RED)), raw=False)
    assert doc == {"v": 1, "type": "test.Leaf", "body": {"n": 3, "color": doc["body"]["color"]}}
    ext = doc["body"]["color"]
    assert ext.code == EXT_ENUM
    assert msgpack.unpackb(ext.data) == ["test.Color", "red"]
    doc = msgpack.unpackb(encode(Leaf(3), traceparent="tp", baggage="b=1"), raw=False)
    assert doc["traceparent"] == "tp" and doc["baggage"] == "b=1" and "tracestate" not in doc


def test_multiaddr_travels_as_its_binary_form() -> None:
    addr = Multiaddr("/ip4/127.0.0.1/udp/4433/quic-v1")
    doc = msgpack.unpackb(encode(_everything(addr=addr)), raw=False)
    assert doc["body"]["addr"] == msgpack.ExtType(EXT_MULTIADDR, addr.to_bytes())


def test_unknown_body_field_is_ignored_and_missing_default_is_filled() -> None:
    raw = {"v": 1, "type": "test.Leaf", "body": {"n": 5, "added_in_a_later_release": [1]}}
    assert decode(msgpack.packb(raw)).body == Leaf(5)


# -- decode errors ----------------------------------------------------------------------------


def _pack(doc: object) -> bytes:
    data: bytes = msgpack.packb(doc, use_bin_type=True)
    return data


def test_unknown_type_names_version_skew() -> None:
    with pytest.raises(EnvelopeError) as info:
        decode(_pack({"v": 1, "type": "x.Y", "body": {}}))
    assert str(info.value) == (
        "unknown message type 'x.Y': sender and receiver run different quic-supervisor versions"
    )


def test_newer_version_says_upgrade() -> None:
    with pytest.raises(EnvelopeError, match=r"envelope version 2 is newer than this receiver's 1"):
        decode(_pack({"v": 2, "type": "test.Leaf", "body": {"n": 1}}))
    with pytest.raises(EnvelopeError, match="upgrade"):
        decode(_pack({"v": 2, "type": "from.TheFuture", "body": {}}))


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\xff\xff\xff", b"not msgpack at all", _pack([1, 2, 3]), _pack("str"), b"\x01"],
)
def test_garbage_is_an_envelope_error(data: bytes) -> None:
    with pytest.raises(EnvelopeError, match="malformed"):
        decode(data)


def test_every_truncation_is_an_envelope_error() -> None:
    data = encode(_everything(), traceparent="00-abc")
    for cut in range(len(data)):
        with pytest.raises(EnvelopeError):
            decode(data[:cut])


def test_trailing_bytes_are_an_envelope_error() -> None:
    with pytest.raises(EnvelopeError, match="malformed"):
        decode(encode(Leaf(1)) + b"\x00")


@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_envelope_error(data: bytes) -> None:
    with contextlib.suppress(EnvelopeError):
        decode(data)


@settings(deadline=None)
@given(st.data())
def test_corrupted_envelopes_decode_or_raise_envelope_error(data: st.DataObject) -> None:
    good = bytearray(encode(data.draw(message_strategy(Everything))))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(good) - 1))
        good[pos] = data.draw(st.integers(0, 255))
    with contextlib.suppress(EnvelopeError):
        decode(bytes(good))


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"type": "test.Leaf", "body": {"n": 1}}, "'v' must be an int"),
        ({"v": "1", "type": "test.Leaf", "body": {"n": 1}}, "'v' must be an int"),
        ({"v": 0, "type": "test.Leaf", "body": {"n": 1}}, "version 0 is invalid"),
        ({"v": 1, "body": {"n": 1}}, "'type' must be a str"),
        ({"v": 1, "type": "test.Leaf"}, "has no 'body'"),
        ({"v": 1, "type": "test.Leaf", "body": [1]}, "body must be a map"),
        ({"v": 1, "type": "test.Leaf", "body": {}}, "missing required field.* n: sender and"),
        ({"v": 1, "type": "test.Leaf", "body": {"n": "1"}}, r"field test.Leaf.n: expected int"),
        ({"v": 1, "type": "test.Leaf", "body": {"n": True}}, r"expected int, got bool"),
        ({"v": 1, "type": "test.Leaf", "body": {"n": 1}, "traceparent": 5}, "traceparent"),
        ({"v": 1, "type": "test.Validated", "body": {"port": 70000}}, "port out of range"),
        ({"v": 1, "type": "test.Tree", "body": {"label": "x", "children": [1]}}, "Tree.children"),
    ],
)
def test_malformed_documents(doc: dict[str, Any], match: str) -> None:
    with pytest.raises(EnvelopeError, match=match):
        decode(_pack(doc))


def _everything_body(**changes: Any) -> dict[str, Any]:
    doc = msgpack.unpackb(encode(_everything()), raw=False)
    doc["body"].update(changes)
    return doc


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"pair": ["only one"]}, r"Everything.pair: expected 2 items, got 1"),
        ({"pair": ["a", "not bytes"]}, r"Everything.pair\[1\]: expected bytes"),
        ({"many": "abc"}, r"Everything.many: expected"),
        ({"ratio": "fast"}, r"Everything.ratio: expected float"),
        ({"mode": "c"}, r"Everything.mode: expected Literal"),
        ({"either": 1.5}, r"Everything.either: expected int \| str"),
        ({"table": {"k": [1]}}, r"Everything.table\['k'\]: expected 2 items"),
        ({"addr": msgpack.ExtType(EXT_MULTIADDR, b"\xff\xff")}, "invalid multiaddr bytes"),
        ({"addr": msgpack.ExtType(EXT_MULTIADDR, b"\x04\x7f")}, "invalid multiaddr bytes"),
        ({"addr": "/ip4/1.2.3.4/udp/1"}, r"Everything.addr: expected Multiaddr"),
        ({"color": msgpack.ExtType(EXT_ENUM, _pack(["test.Color", "blue"]))}, "not a member"),
        ({"color": msgpack.ExtType(EXT_ENUM, _pack(["test.Nope", 1]))}, "unknown enum 'test.Nope'"),
        ({"color": msgpack.ExtType(EXT_ENUM, _pack(["test.Level", 1]))}, "expected Color"),
        ({"color": msgpack.ExtType(EXT_ENUM, b"\xc1")}, "malformed field"),
        ({"color": msgpack.ExtType(EXT_ENUM, _pack([1, 2, 3]))}, "malformed extension payload"),
        ({"leaf": msgpack.ExtType(EXT_MESSAGE, _pack(["x.Gone", {}]))}, "unknown message type"),
        ({"leaf": msgpack.ExtType(EXT_MESSAGE, _pack(["test.Leaf", {}]))}, "Leaf is missing"),
        ({"leaf": msgpack.ExtType(42, b"")}, "unknown msgpack extension type 42"),
        ({"leaf": {"n": 1}}, r"Everything.leaf: expected Leaf"),
        ({"anything": msgpack.Timestamp(1, 0)}, "unsupported msgpack value"),
    ],
)
def test_wrong_field_types(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(EnvelopeError, match=match):
        decode(_pack(_everything_body(**changes)))


def test_non_bytes_input() -> None:
    with pytest.raises(EnvelopeError, match="must be bytes"):
        decode("text")  # type: ignore[arg-type]


def test_envelope_error_is_a_value_error() -> None:
    assert issubclass(EnvelopeError, ValueError)


# -- encode and registration errors -----------------------------------------------------------


def test_encode_refuses_unregistered_and_unsupported_values() -> None:
    @dataclass(frozen=True)
    class NotRegistered:
        x: int

    with pytest.raises(TypeError, match="not a registered message"):
        encode(NotRegistered(1))
    with pytest.raises(TypeError, match="cannot cross the wire"):
        encode(_everything(anything=object()))
    with pytest.raises(TypeError, match="dict keys must be str"):
        encode(_everything(anything={1: 2}))
    with pytest.raises(ValueError, match="does not fit"):
        encode(Leaf(2**64))
    with pytest.raises(TypeError, match="traceparent must be a str"):
        encode(Leaf(1), traceparent=b"x")  # type: ignore[arg-type]


def test_duplicate_name_raises_at_registration() -> None:
    with pytest.raises(ValueError, match="already registered"):

        @message("test.Leaf")
        @dataclass(frozen=True, slots=True)
        class Impostor:
            n: int

    assert message_types()["test.Leaf"] is Leaf

    with pytest.raises(ValueError, match="already registered"):

        @wire_enum("test.Color")
        class OtherColor(enum.Enum):
            X = 1


def test_registration_checks() -> None:
    with pytest.raises(ValueError, match=r"namespace\.Name"):
        message("NoNamespace")
    with pytest.raises(TypeError, match="above @dataclass"):

        @message("test.Misordered")
        class Misordered:
            pass

    with pytest.raises(TypeError, match="frozen"):

        @message("test.Mutable")
        @dataclass
        class Mutable:
            x: int

    with pytest.raises(TypeError, match="cannot cross the wire"):

        @message("test.BadField")
        @dataclass(frozen=True)
        class BadField:
            x: set[int]

    with pytest.raises(TypeError, match="not registered: use @wire_enum"):

        @message("test.LooseEnum")
        @dataclass(frozen=True)
        class LooseEnum:
            x: Loose

    with pytest.raises(TypeError, match="dict keys must be str"):

        @message("test.IntKeys")
        @dataclass(frozen=True)
        class IntKeys:
            x: dict[int, int]

    for name in (
        "test.Misordered",
        "test.Mutable",
        "test.BadField",
        "test.LooseEnum",
        "test.IntKeys",
    ):
        assert name not in message_types()


# -- helpers ----------------------------------------------------------------------------------


def _everything(**changes: Any) -> Everything:
    base: dict[str, Any] = {
        "nothing": None,
        "flag": True,
        "count": -(2**63),
        "ratio": 0.5,
        "text": "héllo",
        "blob": b"\x00\xff",
        "addr": Multiaddr("/ip6/::1/udp/443/quic-v1"),
        "color": Color.GREEN,
        "level": Level.HIGH,
        "leaf": Leaf(1, Color.RED),
        "maybe_leaf": None,
        "ints": [1, 2],
        "pair": ("a", b"b"),
        "many": (1.0, 2.5),
        "leaves": (Leaf(2),),
        "table": {"k": (1, Color.RED)},
        "mode": "a",
        "either": "s",
        "anything": {"x": [1, b"y", None]},
        "nested": [{"a": [(1, 2), ()]}],
    }
    base.update(changes)
    return Everything(**base)
