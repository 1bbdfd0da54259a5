"""Control-message envelope and its msgpack codec.

Control messages are frozen dataclasses registered under a stable wire name with ``@message``. The
same message object travels through an in-process mailbox unchanged, and through this codec when it
crosses a process boundary (Ray) or is written to the journal, so the wire form is part of the
contract between quic-supervisor versions:

    {"v": 1, "type": "namespace.Name", "body": {field: value, ...}, "traceparent": "...", ...}

Field values are msgpack natives (None, bool, int, float, str, bytes, lists, str-keyed maps) plus
three extension types, so a value's kind never depends on guessing: a ``Multiaddr`` (its binary
form), a registered enum member (``[enum name, value]``) and a nested registered message
(``[type name, body]``). Decoding checks every field against the dataclass's type hints and turns
lists back into tuples where the field says tuple. Every decode problem is an :class:`EnvelopeError`
that says what is wrong and what to do about it: :func:`decode` raises nothing else, whatever the
bytes.

Limits, so that hostile or corrupt bytes cost bounded work and no recursion: an envelope is at most
:data:`MAX_ENVELOPE_BYTES`, and no value nests deeper than :data:`MAX_DEPTH` levels (each map,
array and enum/message extension payload is one level, the envelope map level 1). Nesting is
checked by an iterative walk before any field is decoded.

Compatibility rules: a body field the receiver does not know is ignored, and a missing field that
has a default takes it, so adding an optional field needs no version bump; anything else does.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import msgpack
from multiaddr import Multiaddr

__all__ = [
    "CODEC_VERSION",
    "MAX_DEPTH",
    "MAX_ENVELOPE_BYTES",
    "Envelope",
    "EnvelopeError",
    "decode",
    "encode",
    "enveloped",
    "message",
    "message_types",
    "type_name",
    "wire_enum",
    "wire_enums",
]

#: Bumped only for changes an older receiver cannot read; see the module docstring.
CODEC_VERSION = 1

EXT_MULTIADDR = 1
EXT_ENUM = 2
EXT_MESSAGE = 3

#: Deepest nesting :func:`decode` accepts (real messages use about a dozen levels).
MAX_DEPTH = 64
#: Largest envelope :func:`decode` accepts (the control socket's replies stay far below).
MAX_ENVELOPE_BYTES = 64 * 1024 * 1024

_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1

_T = TypeVar("_T")
_E = TypeVar("_E", bound=enum.Enum)

_MSG_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+\Z")
_ENUM_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\Z")

_MESSAGES: dict[str, type] = {}
_MESSAGE_NAMES: dict[type, str] = {}
_ENUMS: dict[str, type[enum.Enum]] = {}
_ENUM_NAMES: dict[type[enum.Enum], str] = {}


@dataclass(frozen=True, slots=True)
class _Schema:
    hints: dict[str, Any]  # init fields -> resolved type hint
    required: frozenset[str]  # init fields without a default


_SCHEMAS: dict[type, _Schema] = {}

_VERSION_SKEW = "sender and receiver run different quic-supervisor versions"


class EnvelopeError(ValueError):
    """Bytes that cannot be decoded into a known message; the text names the problem and the fix."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded message with its codec version and W3C trace context (None when absent)."""

    v: int
    type: str
    body: object
    traceparent: str | None = None
    tracestate: str | None = None
    baggage: str | None = None


def enveloped(body: object, fields: Mapping[str, str]) -> Envelope:
    """``body`` in an envelope carrying the W3C trace fields (``traceparent``, ...) given:
    how a request takes its caller's span along, in-process or across a process."""
    return Envelope(
        v=CODEC_VERSION,
        type=type_name(body),
        body=body,
        traceparent=fields.get("traceparent"),
        tracestate=fields.get("tracestate"),
        baggage=fields.get("baggage"),
    )


# -- registration ---------------------------------------------------------------------------------


def _register(
    table: dict[str, Any], names: dict[Any, str], name: str, cls: type, kind: str
) -> None:
    old = table.get(name)
    if old is not None and old is not cls:
        if (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(
                f"{kind} name {name!r} is already registered by "
                f"{old.__module__}.{old.__qualname__}: pick another name"
            )
        # The same class defined again (module re-imported): the new definition wins.
        names.pop(old, None)
        _SCHEMAS.pop(old, None)
    prev = names.get(cls)
    if prev is not None and prev != name:
        raise ValueError(f"{cls.__qualname__} is already registered as {prev!r}")
    table[name] = cls
    names[cls] = name


def message(name: str) -> Callable[[type[_T]], type[_T]]:
    """Register a frozen dataclass as a control message under the wire name ``name``.

    Apply it above ``@dataclass(frozen=True, slots=True)``: with ``slots=True`` the dataclass
    decorator returns a new class, and that is the one that must be registered. Duplicate names
    raise here, at import, rather than as a confusing decode later.
    """
    if not _MSG_NAME.match(name):
        raise ValueError(f"message name {name!r} must look like 'namespace.Name'")

    def decorate(cls: type[_T]) -> type[_T]:
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise TypeError(
                f"@message({name!r}) must be applied above @dataclass(frozen=True, slots=True)"
            )
        params = getattr(cls, "__dataclass_params__", None)
        if params is None or not params.frozen:
            raise TypeError(f"message {name!r} ({cls.__qualname__}) must be a frozen dataclass")
        try:
            schema: _Schema | None = _build_schema(cls, name)
        except NameError:
            schema = None  # forward reference to a later class: resolved on first use
        _register(_MESSAGES, _MESSAGE_NAMES, name, cls, "message")
        if schema is not None:
            _SCHEMAS[cls] = schema
        return cls

    return decorate


def wire_enum(name: str) -> Callable[[type[_E]], type[_E]]:
    """Register an ``enum.Enum`` so its members may appear in message fields (as ``[name, value]``).

    Members travel by value, so renaming a member is compatible and changing a value is not.
    """
    if not _ENUM_NAME.match(name):
        raise ValueError(f"enum name {name!r} must be a dotted identifier")

    def decorate(cls: type[_E]) -> type[_E]:
        if not (isinstance(cls, type) and issubclass(cls, enum.Enum)):
            raise TypeError(f"@wire_enum({name!r}) applies to enum.Enum subclasses")
        for member in cls:
            _to_wire(member.value, f"{name}.{member.name}")
        _register(_ENUMS, _ENUM_NAMES, name, cls, "enum")
        return cls

    return decorate


def message_types() -> Mapping[str, type]:
    """Read-only view of every registered message type, by wire name."""
    return types.MappingProxyType(_MESSAGES)


def wire_enums() -> Mapping[str, type[enum.Enum]]:
    """Read-only view of every registered enum, by wire name."""
    return types.MappingProxyType(_ENUMS)


def type_name(msg: object) -> str:
    """The wire name of a message instance or class; TypeError if it is not registered."""
    cls = msg if isinstance(msg, type) else type(msg)
    name = _MESSAGE_NAMES.get(cls)
    if name is None:
        raise TypeError(
            f"{cls.__qualname__} is not a registered message: decorate it with "
            "@message('namespace.Name')"
        )
    return name


# -- schema ---------------------------------------------------------------------------------------

_SCALARS: frozenset[Any] = frozenset({type(None), bool, int, float, str, bytes, Multiaddr})


def _schema(cls: type) -> _Schema:
    schema = _SCHEMAS.get(cls)
    if schema is None:
        schema = _SCHEMAS[cls] = _build_schema(cls, _MESSAGE_NAMES[cls])
    return schema


def _build_schema(cls: type, name: str) -> _Schema:
    hints = get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    for f in fields:
        _check_hint(hints[f.name], f"{name}.{f.name}")
    required = frozenset(
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    return _Schema({f.name: hints[f.name] for f in fields}, required)


def _check_hint(hint: Any, where: str) -> None:
    """Refuse, at registration, field types the codec could not round-trip."""
    if hint in (Any, object, None, list, tuple, dict) or hint in _SCALARS:
        return
    origin = get_origin(hint)
    args = get_args(hint)
    if origin is Literal:
        for arg in args:
            if not isinstance(arg, bool | int | str | bytes | enum.Enum | None):
                raise TypeError(f"{where}: Literal value {arg!r} cannot cross the wire")
        return
    if origin in (Union, types.UnionType, list, tuple):
        for arg in args:
            if arg is not Ellipsis:
                _check_hint(arg, where)
        return
    if origin is dict:
        if args and args[0] is not str:
            raise TypeError(f"{where}: dict keys must be str, not {args[0]!r}")
        if args:
            _check_hint(args[1], where)
        return
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if hint not in _ENUM_NAMES:
            raise TypeError(f"{where}: enum {hint.__qualname__} is not registered: use @wire_enum")
        return
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if hint not in _MESSAGE_NAMES:
            raise TypeError(
                f"{where}: {hint.__qualname__} is not a registered message: use @message"
            )
        return
    raise TypeError(
        f"{where}: type {hint!r} cannot cross the wire (use None, bool, int, float, str, bytes, "
        "list, tuple, dict[str, ...], Literal, unions, Multiaddr, registered enums or messages)"
    )


# -- encoding -------------------------------------------------------------------------------------


def encode(
    msg: object,
    *,
    traceparent: str | None = None,
    tracestate: str | None = None,
    baggage: str | None = None,
) -> bytes:
    """Serialise a registered message into an envelope; trace fields are left out when None.

    Raises TypeError for an unregistered message or a value the wire cannot carry, ValueError for
    an int outside msgpack's 64-bit range: sender bugs, caught before anything is sent.
    """
    name = type_name(msg)
    doc: dict[str, Any] = {"v": CODEC_VERSION, "type": name, "body": _body(msg, name)}
    for key, value in (
        ("traceparent", traceparent),
        ("tracestate", tracestate),
        ("baggage", baggage),
    ):
        if value is not None:
            if not isinstance(value, str):
                raise TypeError(f"{key} must be a str, not {type(value).__name__}")
            doc[key] = value
    return _pack(doc, name)


def _body(msg: object, name: str) -> dict[str, Any]:
    schema = _schema(type(msg))
    return {f: _to_wire(getattr(msg, f), f"{name}.{f}") for f in schema.hints}


def _pack(obj: object, where: str) -> bytes:
    try:
        packed: bytes = msgpack.packb(obj, use_bin_type=True)
        return packed
    except (ValueError, OverflowError) as exc:  # e.g. a str holding lone surrogates
        raise ValueError(f"{where}: cannot encode: {exc}") from exc


def _to_wire(value: object, where: str) -> Any:
    # Enum first: IntEnum/StrEnum members are also ints/strs.
    if isinstance(value, enum.Enum):
        enum_name = _ENUM_NAMES.get(type(value))
        if enum_name is None:
            raise TypeError(
                f"{where}: enum {type(value).__qualname__} is not registered: use @wire_enum"
            )
        payload = [enum_name, _to_wire(value.value, where)]
        return msgpack.ExtType(EXT_ENUM, _pack(payload, where))
    if value is None or isinstance(value, bool | float | str | bytes):
        return value
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise ValueError(f"{where}: integer {value} does not fit in msgpack's 64 bits")
        return value
    if isinstance(value, Multiaddr):
        return msgpack.ExtType(EXT_MULTIADDR, value.to_bytes())
    if isinstance(value, list | tuple):
        return [_to_wire(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: dict keys must be str, not {type(key).__name__}")
            out[key] = _to_wire(item, f"{where}[{key!r}]")
        return out
    nested = _MESSAGE_NAMES.get(type(value))
    if nested is not None:
        return msgpack.ExtType(EXT_MESSAGE, _pack([nested, _body(value, nested)], where))
    raise TypeError(f"{where}: {type(value).__qualname__} cannot cross the wire")


# -- decoding -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Nested:
    """An enum or message extension whose payload the depth walk has already unpacked."""

    code: int
    payload: Any


def decode(data: bytes) -> Envelope:
    """Parse envelope bytes, check every field against the message's type hints, rebuild it.

    Raises only :class:`EnvelopeError`, for any input.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EnvelopeError(f"envelope must be bytes, not {type(data).__name__}")
    try:
        size = memoryview(data).nbytes
    except (TypeError, ValueError) as exc:  # e.g. a released memoryview
        raise EnvelopeError(f"envelope bytes cannot be read: {exc}") from exc
    if size > MAX_ENVELOPE_BYTES:
        raise EnvelopeError(
            f"envelope of {size} bytes exceeds the {MAX_ENVELOPE_BYTES}-byte limit: "
            "a control message is never that large (corrupt length, or not a quic-supervisor peer)"
        )
    try:
        return _decode(data)
    except EnvelopeError:
        raise
    except Exception as exc:
        # A message class's own checks (__post_init__) may raise anything; so may a codec bug.
        raise EnvelopeError(
            f"envelope could not be decoded ({type(exc).__name__}: {exc}); if these bytes came "
            "from quic-supervisor itself, this is a bug: please report it"
        ) from exc


def _decode(data: bytes | bytearray | memoryview) -> Envelope:
    doc = _unpack_tree(data, "envelope")
    if not isinstance(doc, dict):
        raise EnvelopeError(
            f"malformed envelope: expected a msgpack map, got {type(doc).__name__}: "
            "these bytes are not a quic-supervisor control message"
        )
    v = doc.get("v")
    if type(v) is not int:
        raise EnvelopeError(
            f"malformed envelope: 'v' must be an int, got {v!r}: "
            "these bytes are not a quic-supervisor control message"
        )
    if v > CODEC_VERSION:
        raise EnvelopeError(
            f"envelope version {v} is newer than this receiver's {CODEC_VERSION}: upgrade "
            "quic-supervisor on the receiving side (or run the sender's older release)"
        )
    if v < 1:
        raise EnvelopeError(f"envelope version {v} is invalid: versions start at 1")
    name = doc.get("type")
    if not isinstance(name, str):
        raise EnvelopeError(f"malformed envelope: 'type' must be a str, got {name!r}")
    cls = _MESSAGES.get(name)
    if cls is None:
        raise EnvelopeError(f"unknown message type {name!r}: {_VERSION_SKEW}")
    if "body" not in doc:
        raise EnvelopeError(f"malformed envelope: {name} has no 'body'")
    body = _build(cls, name, doc["body"])
    trace: dict[str, str | None] = {}
    for key in ("traceparent", "tracestate", "baggage"):
        value = doc.get(key)
        if value is not None and not isinstance(value, str):
            raise EnvelopeError(f"malformed envelope: {key!r} must be a str, got {value!r}")
        trace[key] = value
    return Envelope(v, name, body, trace["traceparent"], trace["tracestate"], trace["baggage"])


def _unpack_tree(data: bytes | bytearray | memoryview, where: str) -> Any:
    """Unpack ``data`` and, iteratively, every enum/message extension inside it (each becomes a
    :class:`_Nested`); EnvelopeError if anything nests deeper than :data:`MAX_DEPTH`.

    After this, decoding recurses at most MAX_DEPTH levels, far inside Python's stack limit.
    """
    root = _unpack(data, where)
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, list):
            slots: Any = enumerate(node)
        elif isinstance(node, dict):
            slots = node.items()
        else:
            continue
        if level > MAX_DEPTH:
            raise EnvelopeError(
                f"malformed {where}: nested deeper than {MAX_DEPTH} levels; no control message "
                "is, so these bytes are corrupt or not a quic-supervisor envelope"
            )
        nested: list[tuple[Any, _Nested]] = []
        for key, item in slots:
            if isinstance(item, msgpack.ExtType) and item.code in (EXT_ENUM, EXT_MESSAGE):
                try:
                    ext = _Nested(item.code, _unpack(item.data, where))
                except EnvelopeError:
                    continue  # left as is: decoding the field reports it, naming the field
                nested.append((key, ext))
                stack.append((ext.payload, level + 1))
            elif isinstance(item, list | dict):
                stack.append((item, level + 1))
        for key, ext in nested:  # replaced after the loop: a dict must not change while iterated
            node[key] = ext
    return root


def _unpack(data: bytes | bytearray | memoryview, where: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:
        raise EnvelopeError(
            f"malformed {where}: not one complete msgpack document ({exc}); the bytes were "
            "truncated or corrupted in transit, or are not a quic-supervisor envelope"
        ) from exc


def _build(cls: type, name: str, body: object) -> object:
    if not isinstance(body, dict):
        raise EnvelopeError(f"malformed {name}: body must be a map, got {type(body).__name__}")
    schema = _schema(cls)
    missing = schema.required - body.keys()
    if missing:
        raise EnvelopeError(
            f"{name} is missing required field(s) {', '.join(sorted(missing))}: {_VERSION_SKEW}"
        )
    kwargs = {
        field: _from_wire(body[field], hint, f"{name}.{field}")
        for field, hint in schema.hints.items()
        if field in body
    }
    try:
        return cls(**kwargs)
    except Exception as exc:  # __post_init__ checks may raise anything
        raise EnvelopeError(f"{name} rejected its decoded fields: {exc}") from exc


def _describe(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _mismatch(value: object, hint: Any, where: str) -> EnvelopeError:
    return EnvelopeError(f"field {where}: expected {_hint_name(hint)}, got {_describe(value)}")


def _hint_name(hint: Any) -> str:
    return hint.__qualname__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _from_wire(raw: Any, hint: Any, where: str) -> Any:
    """Turn a raw unpacked value into the field's type, or raise EnvelopeError."""
    if isinstance(raw, msgpack.ExtType | _Nested):
        obj = _decode_ext(raw, where)
        if not _accepts(obj, hint):
            raise _mismatch(obj, hint, where)
        return obj
    if hint is Any or hint is object:
        return _generic(raw, where)
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        for arg in get_args(hint):
            try:
                return _from_wire(raw, arg, where)
            except EnvelopeError:
                continue
        raise _mismatch(raw, hint, where)
    if origin is Literal:
        for arg in get_args(hint):
            if type(arg) is type(raw) and arg == raw:
                return raw
        raise _mismatch(raw, hint, where)
    if hint is None or hint is type(None):
        if raw is None:
            return None
        raise _mismatch(raw, hint, where)
    if hint is bool:
        if type(raw) is bool:
            return raw
        raise _mismatch(raw, hint, where)
    if hint is int or hint is float:
        # A float field accepts an int (numeric tower); neither accepts a bool.
        if (type(raw) is int) or (hint is float and type(raw) is float):
            return raw
        raise _mismatch(raw, hint, where)
    if hint is str or hint is bytes:
        if type(raw) is hint:
            return raw
        raise _mismatch(raw, hint, where)
    if hint is list or hint is tuple or origin is list or origin is tuple:
        if not isinstance(raw, list):
            raise _mismatch(raw, hint, where)
        return _sequence(raw, hint, where)
    if hint is dict or origin is dict:
        if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
            raise _mismatch(raw, hint, where)
        args = get_args(hint)
        value_hint = args[1] if args else Any
        return {k: _from_wire(v, value_hint, f"{where}[{k!r}]") for k, v in raw.items()}
    # Multiaddr, enums and messages only ever arrive as ExtType, handled above.
    raise _mismatch(raw, hint, where)


def _sequence(raw: list[Any], hint: Any, where: str) -> list[Any] | tuple[Any, ...]:
    args = get_args(hint)
    is_tuple = hint is tuple or get_origin(hint) is tuple
    if not is_tuple:
        item_hint = args[0] if args else Any
        return [_from_wire(v, item_hint, f"{where}[{i}]") for i, v in enumerate(raw)]
    if not args or (len(args) == 2 and args[1] is Ellipsis):
        item_hint = args[0] if args else Any
        return tuple(_from_wire(v, item_hint, f"{where}[{i}]") for i, v in enumerate(raw))
    if args == ((),):  # tuple[()]
        args = ()
    if len(raw) != len(args):
        raise EnvelopeError(f"field {where}: expected {len(args)} items, got {len(raw)}")
    return tuple(
        _from_wire(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(raw, args, strict=True))
    )


def _accepts(obj: object, hint: Any) -> bool:
    """Does a decoded extension value (Multiaddr, enum member, message) fit ``hint``?"""
    if hint is Any or hint is object:
        return True
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_accepts(obj, arg) for arg in get_args(hint))
    if origin is Literal:
        return any(arg is obj for arg in get_args(hint))
    return isinstance(hint, type) and isinstance(obj, hint)


def _generic(raw: Any, where: str) -> Any:
    """Decode a value whose field is typed Any/object: by its own wire kind (tuples stay lists)."""
    if isinstance(raw, msgpack.ExtType | _Nested):
        return _decode_ext(raw, where)
    if isinstance(raw, list):
        return [_generic(v, f"{where}[{i}]") for i, v in enumerate(raw)]
    if isinstance(raw, dict):
        return {k: _generic(v, f"{where}[{k!r}]") for k, v in raw.items()}
    if raw is None or isinstance(raw, bool | int | float | str | bytes):
        return raw
    raise EnvelopeError(f"field {where}: unsupported msgpack value {_describe(raw)}")


def _decode_ext(ext: msgpack.ExtType | _Nested, where: str) -> object:
    if isinstance(ext, msgpack.ExtType) and ext.code == EXT_MULTIADDR:
        data = bytes(ext.data)
        try:
            # The multiaddr library parses binary lazily and accepts truncated components:
            # insist that the text form parses back to exactly these bytes.
            addr = Multiaddr(data)
            ok = Multiaddr(str(addr)).to_bytes() == data
        except Exception as exc:
            raise EnvelopeError(f"field {where}: invalid multiaddr bytes ({exc})") from exc
        if not ok:
            raise EnvelopeError(f"field {where}: invalid multiaddr bytes {data.hex()}")
        return addr
    if isinstance(ext, _Nested):
        payload = ext.payload
    elif ext.code in (EXT_ENUM, EXT_MESSAGE):  # the walk could not unpack it: this raises
        payload = _unpack_tree(ext.data, f"field {where}")
    else:
        raise EnvelopeError(f"field {where}: unknown msgpack extension type {ext.code}")
    if not (isinstance(payload, list) and len(payload) == 2 and isinstance(payload[0], str)):
        raise EnvelopeError(f"field {where}: malformed extension payload {_describe(payload)}")
    name, value = payload
    if ext.code == EXT_MESSAGE:
        cls = _MESSAGES.get(name)
        if cls is None:
            raise EnvelopeError(f"field {where}: unknown message type {name!r}: {_VERSION_SKEW}")
        return _build(cls, name, value)
    enum_cls = _ENUMS.get(name)
    if enum_cls is None:
        raise EnvelopeError(f"field {where}: unknown enum {name!r}: {_VERSION_SKEW}")
    try:
        return enum_cls(_generic(value, where))
    except Exception as exc:  # an enum's _missing_ may raise anything
        raise EnvelopeError(
            f"field {where}: {value!r} is not a member of {name}: {_VERSION_SKEW}"
        ) from exc
