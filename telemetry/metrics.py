"""Metrics over a given meter provider (``None``: no-op), with low-cardinality attributes only.

Instruments (attribute keys in brackets):

- ``quic.migrations`` counter [quic.migration.reason, quic.migration.result]
- ``quic.probe.rtt`` histogram, seconds [] (successful probes)
- ``quic.probe.failures`` counter [error.type]
- ``quic.migration.rollbacks`` counter [quic.migration.reason]
- ``quic.path.active_changes`` counter [quic.migration.reason]
- ``quic.path.bytes`` counter, bytes [quic.path.state, network.io.direction]
- ``quic.cid.spare`` observable gauge []: the *lowest* spare peer-CID count over the registered
  connections (the one closest to being unable to migrate); per-connection counts would need a
  connection id attribute, which is unbounded. Per-connection values belong in spans/journal.
- ``quic.datagrams.dropped_offpath`` counter []: datagrams from an address other than the peer's.
- Node health and herd control (``register_node``; observed from plain counters):
  ``quic.node.loop_lag`` gauge, seconds stalled in the last minute []; ``quic.health.keepalives``
  counter [quic.keepalive.kind: representative, confirm, nat, idle]; ``quic.health.groups``
  gauge [quic.health.state: alive, suspect, dead]; ``quic.health.verdicts`` counter
  [quic.health.state]; ``quic.health.evidence`` counter [quic.health.evidence: unreachable,
  peer_gone]; ``quic.migrations.in_flight`` and ``quic.migrations.queued`` gauges [];
  ``quic.migration.suspect_failovers`` counter [] (a failed-over path answered again soon:
  the false-failover indicator); ``quic.migration.queue_wait`` histogram, seconds [].

Why the attribute rules: every distinct attribute set is a separate time series kept in memory
by the SDK and the backend. Ports, CIDs, connection ids and addresses are unbounded (a port is
new for every path), so :func:`low_cardinality` strips (or, strict, rejects) keys whose dotted
or underscored segments are one of ``port, cid, cids, id, ids, address, addr, ip, host`` and
values that look like addresses, multiaddrs, ``host:port`` or long hex ids. Known enumerations
(reason, result, state, direction, error type) are clamped to their values, ``other`` otherwise.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from opentelemetry import metrics as metrics_api
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from opentelemetry.util.types import AttributeValue

from telemetry.tracing import (
    ATTR_MIGRATION_OUTCOME,
    ATTR_MIGRATION_REASON,
    ATTR_MIGRATION_RESULT,
    INSTRUMENTATION_NAME,
    MIGRATION_RESULTS,
)

__all__ = ["Metrics", "low_cardinality"]

_log = logging.getLogger(__name__)
T = TypeVar("T")

ATTR_PATH_STATE = "quic.path.state"
ATTR_IO_DIRECTION = "network.io.direction"  # semantic convention: transmit | receive
ATTR_ERROR_TYPE = "error.type"

OTHER = "other"
REASONS = frozenset({"manual", "failover", "drain", "network", "preferred_address"})
_PREFERRED = frozenset({"followed", "ignored", "refused", "unreachable"})
#: supervisor.orchestration.network.inventory.ChangeKind (the same names, kept equal by a test).
NETWORK_CHANGES = frozenset(
    {
        "carrier_lost",
        "carrier_regained",
        "link_removed",
        "address_added",
        "address_removed",
        "address_deprecated",
        "mtu_too_small",
        "default_route_changed",
        "route_changed",
    }
)
#: supervisor.core.events.OUTCOMES (telemetry imports nothing of ours: the same names, kept equal
#: by tests/test_telemetry_metrics.py).
OUTCOMES = frozenset(
    {
        "probe_timeout",
        "no_connection_id",
        "peer_disabled",
        "rolled_back",
        "cancelled",
        "connection_closed",
        "rejected",
    }
)
PATH_STATES = frozenset({"new", "validating", "standby", "active", "degraded", "failed", "closed"})
PROBE_ERRORS = frozenset({"timeout", "unreachable", "no_cid", "cancelled"})
_DIRECTIONS = {
    "transmit": "transmit",
    "tx": "transmit",
    "sent": "transmit",
    "send": "transmit",
    "receive": "receive",
    "rx": "receive",
    "received": "receive",
    "recv": "receive",
}

# Seconds: loopback (~50 us) to intercontinental with retries.
RTT_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

_FORBIDDEN_SEGMENTS = frozenset(
    {"port", "cid", "cids", "id", "ids", "address", "addr", "ip", "host"}
)
#: (instrument, kind, unit, description, key in the node figures).
_NODE_INSTRUMENTS = (
    (
        "quic.node.loop_lag",
        "gauge",
        "s",
        "Seconds the event loop was stalled, last minute.",
        "loop_lag_s",
    ),
    (
        "quic.health.keepalives",
        "counter",
        "{packet}",
        "Health questions and keep-alives sent.",
        "keepalives",
    ),
    ("quic.health.groups", "gauge", "{group}", "Health groups by state.", "groups"),
    ("quic.health.verdicts", "counter", "{verdict}", "Group verdicts fanned out.", "verdicts"),
    ("quic.health.evidence", "counter", "{error}", "Socket errors taken as evidence.", "evidence"),
    ("quic.migrations.in_flight", "gauge", "{migration}", "Migrations in flight.", "in_flight"),
    ("quic.migrations.queued", "gauge", "{migration}", "Migrations waiting for a slot.", "queued"),
    (
        "quic.migration.suspect_failovers",
        "counter",
        "{migration}",
        "Failovers whose failed path answered again soon (probably false).",
        "suspect_failovers",
    ),
)
_NODE_LABELS = {
    "keepalives": "quic.keepalive.kind",
    "groups": "quic.health.state",
    "verdicts": "quic.health.state",
    "evidence": "quic.health.evidence",
}
_HOST_PORT = re.compile(r"^\[?[0-9A-Za-z.:-]+\]?:\d{1,5}$")
_LONG_HEX = re.compile(r"^(0x)?[0-9a-fA-F]{12,}$")


def _bad_key(key: str) -> bool:
    return any(seg in _FORBIDDEN_SEGMENTS for seg in re.split(r"[._\-]", key.lower()))


def _bad_value(value: object) -> bool:
    if not isinstance(value, str):
        return False
    if value.startswith(("/ip4/", "/ip6/", "/dns")) or _HOST_PORT.match(value):
        return True
    if _LONG_HEX.match(value):
        return True
    try:
        ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        return False
    return True


def low_cardinality(
    attributes: Mapping[str, Any] | None, *, strict: bool = False
) -> dict[str, AttributeValue]:
    """Keep only attributes safe for metrics (see the module docstring for the rules).

    ``strict=True`` raises ``ValueError`` naming the offending key instead of dropping it.
    """
    out: dict[str, AttributeValue] = {}
    for key, value in (attributes or {}).items():
        if _bad_key(key) or _bad_value(value):
            if strict:
                raise ValueError(
                    f"metric attribute {key!r}={value!r} looks like a port, CID, id or address: "
                    "unbounded cardinality"
                )
            _log.debug("dropping high-cardinality metric attribute %r", key)
            continue
        if value is None:
            continue
        out[key] = value
    return out


def _clamp(value: str | None, allowed: frozenset[str]) -> str:
    return value if value in allowed else OTHER


class _Sources(Generic[T]):
    """Readers registered by live objects (connections, supervisors) for observable
    instruments; read on the metric reader's thread, so registration is locked and a reader
    that fails (its owner is closing) is skipped, never the whole collection."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._lock = threading.Lock()
        self._sources: dict[int, Callable[[], T]] = {}
        self._next = 0

    def add(self, source: Callable[[], T]) -> Callable[[], None]:
        """Register ``source``; returns the function that unregisters it (idempotent)."""
        with self._lock:
            key = self._next
            self._next += 1
            self._sources[key] = source

        def unregister() -> None:
            with self._lock:
                self._sources.pop(key, None)

        return unregister

    def read(self) -> Iterator[T]:
        with self._lock:
            sources = list(self._sources.values())
        for source in sources:
            try:
                yield source()
            except Exception:
                _log.debug("%s source failed", self._what, exc_info=True)


class Metrics:
    """The project's instruments over ``meter_provider`` (never the global one)."""

    def __init__(self, meter_provider: MeterProvider | None, *, version: str | None = None) -> None:
        provider = meter_provider if meter_provider is not None else metrics_api.NoOpMeterProvider()
        self.enabled = meter_provider is not None
        meter = provider.get_meter(INSTRUMENTATION_NAME, version)
        self._migrations = meter.create_counter(
            "quic.migrations", unit="{migration}", description="Migrations by reason and result."
        )
        self._preferred = meter.create_counter(
            "quic.preferred_address.offers",
            unit="{offer}",
            description="Server preferred addresses seen, by what became of them.",
        )
        self._network_changes = meter.create_counter(
            "quic.network.changes",
            unit="{change}",
            description="Kernel network changes the supervisor acted on, by kind.",
        )
        self._probe_rtt = meter.create_histogram(
            "quic.probe.rtt",
            unit="s",
            description="RTT measured by successful path probes (PATH_CHALLENGE/RESPONSE).",
            explicit_bucket_boundaries_advisory=list(RTT_BUCKETS_S),
        )
        self._probe_failures = meter.create_counter(
            "quic.probe.failures", unit="{probe}", description="Path probes that failed."
        )
        self._rollbacks = meter.create_counter(
            "quic.migration.rollbacks",
            unit="{migration}",
            description="Switches rolled back because the peer did not confirm the new path.",
        )
        self._active_changes = meter.create_counter(
            "quic.path.active_changes", unit="{change}", description="Changes of the active path."
        )
        self._path_bytes = meter.create_counter(
            "quic.path.bytes",
            unit="By",
            description="UDP payload bytes by path state and direction.",
        )
        self._offpath = meter.create_counter(
            "quic.datagrams.dropped_offpath",
            unit="{datagram}",
            description="Datagrams dropped: they came from an address other than the peer's.",
        )
        self._queue_wait = meter.create_histogram(
            "quic.migration.queue_wait",
            unit="s",
            description="Time a migration waited for a herd-control slot (when it waited).",
            explicit_bucket_boundaries_advisory=list(RTT_BUCKETS_S),
        )
        self._node_sources: _Sources[Mapping[str, Any]] = _Sources("node figures")
        for name, kind, unit, description, key in _NODE_INSTRUMENTS:
            make = (
                meter.create_observable_counter
                if kind == "counter"
                else meter.create_observable_gauge
            )
            make(
                name,
                callbacks=[functools.partial(self._observe_node, key)],
                unit=unit,
                description=description,
            )
        self._cid_sources: _Sources[int | None] = _Sources("quic.cid.spare")
        meter.create_observable_gauge(
            "quic.cid.spare",
            callbacks=[self._observe_cid_spare],
            unit="{cid}",
            description="Lowest number of spare peer connection IDs over live connections.",
        )

    def migration(self, reason: str, result: str, outcome: str | None = None) -> None:
        """One finished migration; ``outcome`` (the finer taxonomy) for the failed ones."""
        attrs = {
            ATTR_MIGRATION_REASON: _clamp(reason, REASONS),
            ATTR_MIGRATION_RESULT: _clamp(result, MIGRATION_RESULTS),
        }
        if outcome is not None:
            attrs[ATTR_MIGRATION_OUTCOME] = _clamp(outcome, OUTCOMES)
        self._migrations.add(1, attrs)

    def preferred_address(self, what: str) -> None:
        """A server preferred address (RFC 9000 §9.6): followed, ignored, refused, unreachable."""
        self._preferred.add(1, {"quic.preferred_address.result": _clamp(what, _PREFERRED)})

    def network_change(self, change: str) -> None:
        self._network_changes.add(1, {"quic.network.change": _clamp(change, NETWORK_CHANGES)})

    def probe_rtt(self, seconds: float) -> None:
        self._probe_rtt.record(seconds)

    def probe_failure(self, error_type: str = "timeout") -> None:
        self._probe_failures.add(1, {ATTR_ERROR_TYPE: _clamp(error_type, PROBE_ERRORS)})

    def rollback(self, reason: str) -> None:
        self._rollbacks.add(1, {ATTR_MIGRATION_REASON: _clamp(reason, REASONS)})

    def active_path_change(self, reason: str) -> None:
        self._active_changes.add(1, {ATTR_MIGRATION_REASON: _clamp(reason, REASONS)})

    def path_bytes(self, nbytes: int, *, state: str, direction: str) -> None:
        if nbytes <= 0:
            return
        self._path_bytes.add(
            nbytes,
            {
                ATTR_PATH_STATE: _clamp(state, PATH_STATES),
                ATTR_IO_DIRECTION: _DIRECTIONS.get(direction, OTHER),
            },
        )

    def datagrams_dropped_offpath(self, count: int = 1) -> None:
        self._offpath.add(count)

    def migration_queue_wait(self, seconds: float) -> None:
        self._queue_wait.record(seconds)

    def register_node(self, source: Callable[[], Mapping[str, Any]]) -> Callable[[], None]:
        """Register a supervisor's node figures (``SupervisorActor._node_figures``: plain
        numbers and dicts of them); returns the function that unregisters it. ``source`` runs
        on the metric reader's thread."""
        return self._node_sources.add(source)

    def _observe_node(self, key: str, _options: CallbackOptions) -> Iterable[Observation]:
        totals: dict[str | None, float] = {}
        for figures in self._node_sources.read():
            value = figures.get(key)
            items = value.items() if isinstance(value, Mapping) else [(None, value)]
            for label, number in items:
                if number is not None:
                    totals[label] = totals.get(label, 0) + number
        attr = _NODE_LABELS.get(key)
        return [
            Observation(number, {attr: label} if attr and label is not None else None)
            for label, number in totals.items()
        ]

    def register_cid_spare(self, source: Callable[[], int | None]) -> Callable[[], None]:
        """Register a connection's spare-CID reader; returns the function that unregisters it.

        ``source`` runs on the metric reader's thread: it must be cheap and only read a plain
        int the connection keeps up to date (``None`` = not known yet).
        """
        return self._cid_sources.add(source)

    def _observe_cid_spare(self, _options: CallbackOptions) -> Iterable[Observation]:
        values = [v for v in self._cid_sources.read() if v is not None]
        return [Observation(min(values))] if values else []
