"""Messages and events as plain msgpack-able data, for the journal.

Why not leave it to the journal's own fallback conversion: a ``Multiaddr`` is a ``Mapping``,
which the journal would record as a map of protocol objects; here it is its text, as people
read it in ``journal show``."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


def plain_dict(obj: object) -> dict[str, Any]:
    value = plain(obj)
    return value if isinstance(value, dict) else {"value": value}


def plain(obj: object) -> object:
    """Dataclasses as maps, enums as their values, anything else unknown as its text."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if isinstance(obj, enum.Enum):
        return obj.value
    return str(obj)
