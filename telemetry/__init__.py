"""Telemetry for quic-supervisor: providers from OTEL_* variables, migration spans, metrics,
trace-context propagation for envelopes, the msgpack flight-recorder journal and its timeline.

Imported by ``supervisor`` and ``actors``; imports neither. Never sets global providers.
"""

from telemetry.journal import JournalFormatError, JournalWriter, read_journal
from telemetry.metrics import Metrics, low_cardinality
from telemetry.propagation import context_from_fields, current_trace_fields, inject_fields
from telemetry.providers import Providers, build_providers_from_env
from telemetry.tracing import Tracing

__all__ = [
    "JournalFormatError",
    "JournalWriter",
    "Metrics",
    "Providers",
    "Tracing",
    "build_providers_from_env",
    "context_from_fields",
    "current_trace_fields",
    "inject_fields",
    "low_cardinality",
    "read_journal",
]
