"""Argument checks at the public boundary: every duration, size, name and file the API takes.

Why one module: a bad value must be refused before it reaches the event loop or the wire. A
NaN or infinite timeout handed to ``asyncio`` poisons the loop's timer heap (unrelated timers
ran seconds late), a negative idle timeout overflows aioquic's transport parameters, a garbage
CA file was reported as a dial timeout. Each check raises ``TypeError`` (wrong type) or
:class:`~actors.errors.InvalidArgumentError` (a ``ValueError``) naming the argument, the value
and the fix. The SupervisorActor runs the request checks too, so requests that arrive over the
control socket or from the Ray agent are held to the same rules as in-process calls.
"""

from __future__ import annotations

import math
import os
import ssl
import stat
from collections.abc import Iterable
from typing import Any

from actors.errors import InvalidArgumentError

__all__ = [
    "MAX_DURATION",
    "alpn_list",
    "count",
    "duration",
    "existing_file",
    "flag",
    "optional_duration",
    "server_name",
]

#: Longer than any sensible timeout or interval (a day); beyond it a value is a mistake, and
#: far beyond it (1e300) the loop's clock arithmetic loses all precision.
MAX_DURATION = 86_400.0

#: RFC 1035: a DNS name is at most 253 characters; SNI carries a DNS name.
MAX_SERVER_NAME = 253
#: RFC 7301: a protocol name is 1-255 bytes; the extension is at most 65535 bytes in all.
MAX_ALPN_BYTES = 255
MAX_ALPN_PROTOCOLS = 64


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        raise InvalidArgumentError(
            name, value, f"too large: give at most {MAX_DURATION:g} seconds"
        ) from None


def duration(
    name: str, value: object, *, allow_zero: bool = False, maximum: float = MAX_DURATION
) -> float:
    """A finite number of seconds, > 0 (or >= 0 with ``allow_zero``), at most ``maximum``."""
    seconds = _number(name, value)
    if math.isnan(seconds) or math.isinf(seconds):
        raise InvalidArgumentError(name, value, "must be a finite number of seconds")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidArgumentError(name, value, f"must be {bound} seconds")
    if seconds > maximum:
        raise InvalidArgumentError(name, value, f"too large: give at most {maximum:g} seconds")
    return seconds


def optional_duration(name: str, value: object, **kwargs: Any) -> float | None:
    return None if value is None else duration(name, value, **kwargs)


def count(name: str, value: object, *, minimum: int = 0, maximum: int = 2**31 - 1) -> int:
    """An integer in [minimum, maximum] (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise InvalidArgumentError(name, value, f"must be between {minimum} and {maximum}")
    return value


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {type(value).__name__}")
    return value


def server_name(value: object) -> str | None:
    """The TLS server name (SNI), a DNS name or None for none."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"server_name must be a string or None, not {type(value).__name__}")
    if not value or len(value) > MAX_SERVER_NAME:
        raise InvalidArgumentError(
            "server_name",
            value,
            f"must be a DNS name of 1-{MAX_SERVER_NAME} characters (or None for no SNI)",
        )
    if any(c in value for c in "\x00/ "):
        raise InvalidArgumentError("server_name", value, "must be a DNS name (no spaces or '/')")
    return value


#: A libp2p protocol id is one multistream-select line: "/name/version", bounded.
MAX_PROTOCOL_ID_BYTES = 256
MAX_OFFERED_PROTOCOLS = 16


def protocol_ids(value: object, *, what: str = "protocols") -> tuple[str, ...]:
    """libp2p protocol ids (``["/ipfs/ping/1.0.0"]``), in order of preference: non-empty, at
    most 16, each a path-like string that fits one multistream-select line."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(
            f"{what} must be a list of protocol ids such as ['/ipfs/ping/1.0.0'], not "
            f"{type(value).__name__}"
        )
    ids = tuple(value)
    if not 1 <= len(ids) <= MAX_OFFERED_PROTOCOLS:
        raise InvalidArgumentError(
            what, value, f"give 1 to {MAX_OFFERED_PROTOCOLS} protocol ids, most preferred first"
        )
    for pid in ids:
        if not isinstance(pid, str):
            raise TypeError(f"{what} must hold strings, not {type(pid).__name__} ({pid!r})")
        if (
            not pid.startswith("/")
            or "\n" in pid
            or not 2 <= len(pid.encode()) <= MAX_PROTOCOL_ID_BYTES
        ):
            raise InvalidArgumentError(
                what,
                pid,
                f"a protocol id starts with '/', has no newline and is at most "
                f"{MAX_PROTOCOL_ID_BYTES} bytes, e.g. '/my-app/echo/1.0.0'",
            )
    return ids


def alpn_list(value: object) -> tuple[str, ...] | None:
    """ALPN protocol names: a list of non-empty strings (``["h3"]``), or None for no ALPN."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(
            f"alpn_protocols must be a list of strings such as ['h3'], not {type(value).__name__}"
        )
    names = tuple(value)
    if len(names) > MAX_ALPN_PROTOCOLS:
        raise InvalidArgumentError(
            "alpn_protocols", value, f"give at most {MAX_ALPN_PROTOCOLS} protocol names"
        )
    for name in names:
        if not isinstance(name, str):
            raise TypeError(
                f"alpn_protocols must hold strings such as 'h3', not {type(name).__name__} "
                f"({name!r})"
            )
        if not 1 <= len(name.encode()) <= MAX_ALPN_BYTES:
            raise InvalidArgumentError(
                "alpn_protocols", name, f"each name must be 1-{MAX_ALPN_BYTES} bytes"
            )
    return names or None


def existing_file(name: str, value: object) -> str:
    """A path to a readable regular file (checked now: before any packet is sent)."""
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a file path, not {type(value).__name__}")
    path = os.fspath(value)
    if not isinstance(path, str) or not path:
        raise InvalidArgumentError(name, value, "give the path of a PEM file")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InvalidArgumentError(name, path, "no such file: check the path") from None
    except OSError as exc:
        raise InvalidArgumentError(name, path, f"cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise InvalidArgumentError(name, path, "is not a regular file: give a PEM file")
    if not os.access(path, os.R_OK):
        raise InvalidArgumentError(name, path, "is not readable by this process")
    return path


def ca_file(value: object) -> str:
    """A CA bundle that really holds certificates (a garbage file was once reported as a
    dial timeout, 4 s later)."""
    path = existing_file("cafile", value)
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, ValueError) as exc:
        raise InvalidArgumentError(
            "cafile", path, f"holds no usable PEM certificate ({exc}): give a CA bundle"
        ) from None
    return path


def request(msg: object) -> None:
    """The same rules for a request however it arrived (a handle, the control socket, the
    Ray agent): what the typed front-ends check, checked again where requests are served."""
    from supervisor.core.messages import (
        AddPathRequest,
        DialRequest,
        ProbeRequest,
        SwitchRequest,
    )

    if isinstance(msg, DialRequest):
        if not isinstance(msg.remote, str):
            raise TypeError(f"remote address must be a multiaddr string, not {type(msg.remote)}")
        alpn_list(msg.alpn_protocols)
        server_name(msg.server_name)
        if msg.cafile is not None:
            ca_file(msg.cafile)
        flag("verify", msg.verify)
        duration("timeout", msg.timeout)
        duration("idle_timeout", msg.idle_timeout)
        _optional_text("local_addr", msg.local_addr)
        _optional_text("device", msg.device)
    elif isinstance(msg, AddPathRequest):
        _optional_text("local_addr", msg.local_addr)
        _optional_text("device", msg.device)
    elif isinstance(msg, ProbeRequest):
        duration("timeout", msg.timeout)
    elif isinstance(msg, SwitchRequest):
        duration("probe_timeout", msg.probe_timeout)
        flag("old_path_dead", msg.old_path_dead)


def _optional_text(name: str, value: object) -> None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a string or None, not {type(value).__name__}")
