"""Span helpers for migrations (DESIGN.md section 6): one trace per migration.

``quic.migration`` opens when a switch begins and is a root span or the child of the caller's
span; its children are ``quic.path.switch``, ``quic.path.probe`` (a re-probe; a standalone
``probe()`` is its own ``quic.path.probe`` root) and ``quic.path.close``. There is no
long-lived per-connection span: the SDK keeps only 128 events per span.

Names follow the semantic conventions where they exist (``network.peer.address``,
``network.peer.port``, ``network.transport``, ``network.type``); the rest live under ``quic.``.

Async use: the context managers attach the span to the *current contextvars context*, so they
are correct across ``await`` inside one task, and concurrent tasks each see their own span.
Enter and exit them in the same task. Actor tasks inherit whatever context was current when
they were created, so code that handles a message must pass the envelope's context
(``propagation.context_from_fields``) as ``parent_context`` rather than rely on the current one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.semconv.attributes.network_attributes import (
    NETWORK_PEER_ADDRESS,
    NETWORK_PEER_PORT,
    NETWORK_TRANSPORT,
    NETWORK_TYPE,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.util.types import AttributeValue

__all__ = [
    "SPAN_MIGRATION",
    "SPAN_PATH_CLOSE",
    "SPAN_PATH_PROBE",
    "SPAN_PATH_SWITCH",
    "Tracing",
    "add_event",
    "format_address",
    "network_type",
    "path_event",
    "record_error",
    "set_result",
]

INSTRUMENTATION_NAME = "quic-supervisor"

# Span names.
SPAN_MIGRATION = "quic.migration"
SPAN_PATH_SWITCH = "quic.path.switch"
SPAN_PATH_PROBE = "quic.path.probe"
SPAN_PATH_CLOSE = "quic.path.close"
#: One kernel network change the supervisor acted on; the migrations it causes are children.
SPAN_NETWORK_CHANGE = "quic.network.change"

# Attribute keys: semantic conventions where they exist.
ATTR_NETWORK_PEER_ADDRESS = NETWORK_PEER_ADDRESS  # "network.peer.address"
ATTR_NETWORK_PEER_PORT = NETWORK_PEER_PORT  # "network.peer.port"
ATTR_NETWORK_TRANSPORT = NETWORK_TRANSPORT  # "network.transport" = "quic"
ATTR_NETWORK_TYPE = NETWORK_TYPE  # "network.type" = "ipv4" | "ipv6"
NETWORK_TRANSPORT_QUIC = "quic"

# Attribute keys: project-specific.
ATTR_CONNECTION_ID = "quic.connection.id"
#: The peer id of a libp2p connection's far end (DESIGN §9), base58btc.
ATTR_LIBP2P_PEER_ID = "libp2p.peer.id"
ATTR_MIGRATION_REASON = "quic.migration.reason"  # manual | failover | drain | network | ...
ATTR_MIGRATION_INITIATOR = "quic.migration.initiator"  # application | operator | policy
ATTR_NETWORK_INTERFACE = "quic.network.interface"
ATTR_NETWORK_CHANGE = "quic.network.change"
ATTR_NETWORK_ADDRESSES = "quic.network.addresses"
ATTR_NETWORK_MOVED = "quic.network.connections_moved"
ATTR_MIGRATION_RESULT = "quic.migration.result"
#: The finer taxonomy of a migration that did not complete (supervisor.core.events.OUTCOMES).
ATTR_MIGRATION_OUTCOME = "quic.migration.outcome"
#: How long the migration waited for a herd-control slot (supervisor.orchestration.herd),
#: when it did.
ATTR_MIGRATION_QUEUE_WAIT_MS = "quic.migration.queue_wait_ms"
ATTR_PATH_FROM_LOCAL_ADDRESS = "quic.path.from.local_address"
ATTR_PATH_TO_LOCAL_ADDRESS = "quic.path.to.local_address"
ATTR_CID_SEQUENCE_BEFORE = "quic.cid.sequence.before"
ATTR_CID_SEQUENCE_AFTER = "quic.cid.sequence.after"
ATTR_SWITCH_CONFIRMATION_MS = "quic.switch.confirmation_ms"
ATTR_SWITCH_ROLLED_BACK = "quic.switch.rolled_back"
ATTR_PROBE_RTT_MS = "quic.probe.rtt_ms"
#: The PATH_RESPONSE came back on another path than the probed one (RFC 9000 §8.2.3).
ATTR_VALIDATION_ASYMMETRIC = "quic.path.validation.asymmetric"
ATTR_PROBE_TRIES = "quic.probe.tries"
ATTR_PATH_LOCAL_ADDRESS = "quic.path.local_address"  # quic.path.close and path events
ATTR_PATH_CLOSE_REMOVED = "quic.path.close.removed"  # False: it was closed already
ATTR_PATH_STATE_OLD = "quic.path.state.old"
ATTR_PATH_STATE_NEW = "quic.path.state.new"

# quic.migration.result values.
RESULT_COMPLETED = "completed"
RESULT_FAILED = "failed"
RESULT_ROLLED_BACK = "rolled_back"
RESULT_CANCELLED = "cancelled"
MIGRATION_RESULTS = frozenset(
    {RESULT_COMPLETED, RESULT_FAILED, RESULT_ROLLED_BACK, RESULT_CANCELLED}
)

# Event names.
EVENT_PROBE_TRY = "quic.probe.try"
EVENT_CANCELLED = "cancelled"
# Path changes while a migration (or a standalone probe, or a close) is open: events of that
# span, never of a long-lived per-connection span.
EVENT_PATH_ADDED = "quic.path.added"
EVENT_PATH_REMOVED = "quic.path.removed"
EVENT_PATH_STATE_CHANGED = "quic.path.state_changed"

# An address: ``(host, port)``, a multiaddr string, ``host:port``, or anything str()-able.
Address = object


def _host_port(addr: Address) -> tuple[str | None, int | None]:
    """Host and port of a ``(host, port, ...)`` tuple, ``/ip4|ip6/H/udp/P/...`` or ``H:P``."""
    if addr is None:
        return None, None
    if isinstance(addr, tuple) and len(addr) >= 2:
        return str(addr[0]), int(addr[1])
    text = str(addr)
    parts = text.split("/")
    if text.startswith("/") and len(parts) >= 5 and parts[1] in ("ip4", "ip6"):
        try:
            return parts[2], int(parts[4])
        except ValueError:
            return parts[2], None
    if text.startswith("[") and "]:" in text:  # [v6]:port
        host, _, port = text[1:].partition("]:")
        return host, int(port) if port.isdigit() else None
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, int(port)
    return text, None


def format_address(addr: Address) -> str:
    """A span-attribute string for a local address: tuples as ``host:port`` (``[v6]:port``)."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)


def network_type(family: str | int | None, addr: Address = None) -> str | None:
    """``ipv4``/``ipv6`` from a family name, ``socket.AF_*`` or, failing that, an address."""
    if family in (socket.AF_INET, "ipv4", "ip4", "inet"):
        return "ipv4"
    if family in (socket.AF_INET6, "ipv6", "ip6", "inet6"):
        return "ipv6"
    host, _ = _host_port(addr)
    if host is None:
        return None
    try:
        return "ipv6" if ipaddress.ip_address(host.strip("[]")).version == 6 else "ipv4"
    except ValueError:
        return None


def set_result(span: Span, result: str) -> None:
    """Set ``quic.migration.result`` (one of :data:`MIGRATION_RESULTS`)."""
    if result not in MIGRATION_RESULTS:
        raise ValueError(f"result must be one of {sorted(MIGRATION_RESULTS)}, not {result!r}")
    span.set_attribute(ATTR_MIGRATION_RESULT, result)


def record_error(span: Span, exc: BaseException, description: str | None = None) -> None:
    """Record ``exc`` as an exception event and set the span's status to ERROR."""
    if not span.is_recording():
        return
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, description or f"{type(exc).__name__}: {exc}"))


def add_event(span: Span, name: str, /, **attributes: AttributeValue) -> None:
    """Add an event; pass dotted keys with ``**{"quic.probe.tries": 2}``."""
    if span.is_recording():
        span.add_event(name, attributes=attributes)


def path_event(
    span: Span,
    name: str,
    local_address: object,
    old: str | None = None,
    new: str | None = None,
) -> None:
    """A path added/removed/state change as an event of ``span`` (local address as a string)."""
    if not span.is_recording():
        return
    attrs: dict[str, AttributeValue] = {ATTR_PATH_LOCAL_ADDRESS: str(local_address)}
    if old is not None:
        attrs[ATTR_PATH_STATE_OLD] = old
    if new is not None:
        attrs[ATTR_PATH_STATE_NEW] = new
    span.add_event(name, attributes=attrs)


def _has_attribute(span: Span, key: str) -> bool:
    attrs = getattr(span, "attributes", None)  # SDK spans expose their attributes
    return isinstance(attrs, Mapping) and key in attrs


class Tracing:
    """Migration span helpers over a tracer provider; ``None`` makes every helper a no-op.

    The provider is the one given to the supervisor, never the global one.
    """

    def __init__(
        self, tracer_provider: TracerProvider | None, *, version: str | None = None
    ) -> None:
        self._tracer: trace.Tracer = (
            tracer_provider.get_tracer(INSTRUMENTATION_NAME, version)
            if tracer_provider is not None
            else trace.NoOpTracer()
        )
        self.enabled = tracer_provider is not None

    @contextmanager
    def span(
        self,
        name: str,
        *,
        parent_context: Context | None = None,
        attributes: Mapping[str, AttributeValue] | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
    ) -> Iterator[Span]:
        """A span made current for the ``with`` body (across awaits, in this task).

        ``parent_context=None`` parents on the current context. An exception is recorded and
        sets status ERROR; a cancellation only adds a ``cancelled`` event (not an error).
        """
        span = self._tracer.start_span(
            name, context=parent_context, kind=kind, attributes=attributes
        )
        try:
            with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                yield span
        except asyncio.CancelledError:
            if span.is_recording():
                span.add_event(EVENT_CANCELLED)
            raise
        except BaseException as exc:
            record_error(span, exc)
            raise
        finally:
            span.end()

    def past_span(
        self,
        name: str,
        start_ns: int,
        end_ns: int,
        *,
        attributes: Mapping[str, AttributeValue] | None = None,
        error: BaseException | None = None,
    ) -> Span:
        """A child of the current span for work that already happened elsewhere (a re-probe
        the connection ran inside a switch), with the times it really took."""
        span = self._tracer.start_span(name, attributes=attributes, start_time=start_ns)
        if error is not None:
            record_error(span, error)
        span.end(end_time=max(end_ns, start_ns))
        return span

    @contextmanager
    def child_span(self, name: str, /, **attrs: AttributeValue) -> Iterator[Span]:
        """A child of the current span (e.g. ``quic.path.switch`` inside ``migration_span``)."""
        with self.span(name, attributes=attrs) as span:
            yield span

    @contextmanager
    def migration_span(
        self,
        conn_id: str,
        reason: str,
        from_addr: Address,
        to_addr: Address,
        remote_addr: Address,
        family: str | int | None = None,
        parent_context: Context | None = None,
    ) -> Iterator[Span]:
        """The ``quic.migration`` span; sets ``quic.migration.result`` on the way out.

        The body may call :func:`set_result` (e.g. ``rolled_back`` before raising); otherwise
        the result is ``completed`` on normal exit, ``cancelled`` on cancellation and ``failed``
        on any other exception.
        """
        peer_host, peer_port = _host_port(remote_addr)
        attrs: dict[str, AttributeValue] = {
            ATTR_CONNECTION_ID: conn_id,
            ATTR_MIGRATION_REASON: reason,
            ATTR_PATH_FROM_LOCAL_ADDRESS: format_address(from_addr),
            ATTR_PATH_TO_LOCAL_ADDRESS: format_address(to_addr),
            ATTR_NETWORK_TRANSPORT: NETWORK_TRANSPORT_QUIC,
        }
        if peer_host is not None:
            attrs[ATTR_NETWORK_PEER_ADDRESS] = peer_host
        if peer_port is not None:
            attrs[ATTR_NETWORK_PEER_PORT] = peer_port
        net_type = network_type(family, remote_addr)
        if net_type is not None:
            attrs[ATTR_NETWORK_TYPE] = net_type

        def finish(span: Span, result: str) -> None:
            if span.is_recording() and not _has_attribute(span, ATTR_MIGRATION_RESULT):
                set_result(span, result)

        # Set the result inside ``span()`` so it is on the span before span() ends it.
        with self.span(SPAN_MIGRATION, parent_context=parent_context, attributes=attrs) as span:
            try:
                yield span
            except asyncio.CancelledError:
                finish(span, RESULT_CANCELLED)
                raise
            except BaseException:
                finish(span, RESULT_FAILED)
                raise
            finish(span, RESULT_COMPLETED)
