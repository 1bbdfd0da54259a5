"""W3C trace context and baggage in a plain dict: the envelope's ``traceparent`` fields.

Uses its own composite propagator (TraceContext + Baggage), never the global one, so the
envelope format does not change with whatever an application configured globally.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import context as context_api
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "TRACE_FIELDS",
    "attached",
    "context_from_fields",
    "current_trace_fields",
    "inject_fields",
]

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
BAGGAGE = "baggage"
TRACE_FIELDS = (TRACEPARENT, TRACESTATE, BAGGAGE)

_PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])


def inject_fields(context: Context | None = None) -> dict[str, str]:
    """The trace fields of ``context`` (default: the current one); absent ones are omitted."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=context)
    return {k: v for k, v in carrier.items() if k in TRACE_FIELDS and v}


def current_trace_fields() -> dict[str, str]:
    """The current span's ``traceparent``/``tracestate`` and the current ``baggage``."""
    return inject_fields(None)


def context_from_fields(fields: Mapping[str, str | None] | None) -> Context:
    """A context parented on ``fields``; an empty, fresh context (a root) when they carry none.

    Extraction starts from an empty ``Context()``, not the current one, so that an actor task
    that inherited some unrelated context never leaks it into a message's trace. Missing,
    ``None`` or malformed fields give a root context.
    """
    carrier = {k: v for k, v in (fields or {}).items() if k in TRACE_FIELDS and isinstance(v, str)}
    if not carrier:
        return Context()
    return _PROPAGATOR.extract(carrier, context=Context())


@contextmanager
def attached(fields: Mapping[str, str | None] | None) -> Iterator[Context]:
    """Make the context from ``fields`` current for the ``with`` body (same task only)."""
    ctx = context_from_fields(fields)
    token = context_api.attach(ctx)
    try:
        yield ctx
    finally:
        context_api.detach(token)
