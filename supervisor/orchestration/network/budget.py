"""Budgets for eager moves onto a network that is not the route's (sans-I/O).

Following the route to the peer is never budgeted (Cronet follows the default network the
same way). A failover off a degrading path, or after write errors, onto another network is
an eager move: each connection may make at most so many per default network, and the count
starts again when its default network changes. Cronet's ``maxPathDegradingEagerMigrationsCount``
and ``maxWriteErrorEagerMigrationsCount`` are the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["EagerBudget", "EagerKind", "eager_kind"]

EagerKind = Literal["degrading", "write_error"]

#: ActivePathDead reasons that are write errors (a send failed or was refused by ICMP).
_WRITE_ERRORS = frozenset({"send_failed", "unreachable", "write_error"})


def eager_kind(cause: str) -> EagerKind:
    return "write_error" if cause in _WRITE_ERRORS else "degrading"


@dataclass
class _Spent:
    default: object
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class EagerBudget:
    degrading: int
    write_error: int
    _spent: dict[str, _Spent] = field(default_factory=dict)

    def _entry(self, conn_id: str, default: object) -> _Spent:
        entry = self._spent.get(conn_id)
        if entry is None or entry.default != default:
            entry = self._spent[conn_id] = _Spent(default)  # a new default network: afresh
        return entry

    def allow(self, conn_id: str, default: object, kind: EagerKind) -> bool:
        limit = self.degrading if kind == "degrading" else self.write_error
        return self._entry(conn_id, default).counts.get(kind, 0) < limit

    def spend(self, conn_id: str, default: object, kind: EagerKind) -> None:
        counts = self._entry(conn_id, default).counts
        counts[kind] = counts.get(kind, 0) + 1

    def spent(self, conn_id: str) -> dict[str, int]:
        entry = self._spent.get(conn_id)
        return dict(entry.counts) if entry is not None else {}

    def forget(self, conn_id: str) -> None:
        self._spent.pop(conn_id, None)
