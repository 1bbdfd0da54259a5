"""Typed errors across a process boundary: flatten an exception to plain data, rebuild it.

Why: a caller on the other side of a socket (``quic-supervisor ctl``, any envelope transport)
must get the exception class the supervisor raised (``InvalidAddressError`` with its ``addr``,
``PathNotValidatedError`` with its ``state``), not a string to parse. Only known classes are
rebuilt (the library's errors, ``EnvelopeError`` and a few builtins); any other class comes back
as :class:`RemoteError`, which names it. Rebuilding never calls ``__init__`` (the signatures are
keyword-rich), exactly as unpickling the library's errors does.
"""

from __future__ import annotations

import builtins
import enum
from dataclasses import dataclass, field
from typing import Any

from multiaddr import Multiaddr

from actors import errors as _errors
from actors.envelope import EnvelopeError, message

__all__ = ["ErrorReply", "RemoteError", "error_reply", "rebuild_error"]


@message("ctl.Error")
@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A failed request: the exception's class name, its text and its plain attributes."""

    type: str
    message: str
    attrs: dict[str, Any] = field(default_factory=dict)


class RemoteError(Exception):
    """The other side raised an exception class this side does not rebuild."""

    def __init__(self, type_name: str, message: str) -> None:
        self.type_name = type_name
        super().__init__(f"{type_name}: {message}")


_BUILTINS = (
    "ValueError",
    "TypeError",
    "KeyError",
    "LookupError",
    "TimeoutError",
    "OSError",
    "PermissionError",
    "FileNotFoundError",
    "NotImplementedError",
)

_REBUILDABLE: dict[str, type[BaseException]] = {
    **{name: getattr(_errors, name) for name in _errors.__all__},
    "EnvelopeError": EnvelopeError,
    **{name: getattr(builtins, name) for name in _BUILTINS},
}


def _plain(value: object) -> bool:
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return False


def error_reply(exc: BaseException) -> ErrorReply:
    """Flatten ``exc``: class name, text, and the public attributes that are plain data.

    Multiaddrs and enum members (a ``PathState``) travel as their text; anything else that is
    not plain data is left out rather than failing the reply.
    """
    attrs: dict[str, Any] = {}
    for key, value in getattr(exc, "__dict__", {}).items():
        if key.startswith("_"):
            continue
        if isinstance(value, Multiaddr | enum.Enum):
            value = str(value)
        if _plain(value):
            attrs[key] = value
    return ErrorReply(type(exc).__name__, str(exc), attrs)


def rebuild_error(reply: ErrorReply) -> BaseException:
    """The exception ``reply`` stands for: same class, text and attributes when known here."""
    cls = _REBUILDABLE.get(reply.type)
    if cls is None:
        return RemoteError(reply.type, reply.message)
    exc = cls.__new__(cls)
    exc.args = (reply.message,)
    exc.__dict__.update(reply.attrs)
    return exc
