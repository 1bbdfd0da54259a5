"""Spans to a file as OTLP JSON: one ``ExportTraceServiceRequest`` per line (JSON Lines).

The same layout the OpenTelemetry Collector's ``file`` exporter writes and its ``otlpjsonfile``
receiver reads, so a ``--trace-file`` can be replayed into any backend. Each line is the
OTLP/JSON encoding of one exported batch (OTLP spec, "JSON Protobuf Encoding"): field names in
lowerCamelCase, enums as integers, 64-bit integers as strings, and trace/span ids as hex
strings (plain protobuf JSON would give base64; the spec requires hex). The protobuf message is
built by ``opentelemetry-exporter-otlp-proto-common``'s encoder, the one the OTLP exporters use.

Use it behind a batch processor (the CLI does): the file is written on the processor's worker
thread, never on the event loop.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any

from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

__all__ = ["OtlpJsonFileSpanExporter", "read_otlp_json", "spans_from_otlp_json", "to_otlp_json"]

_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def _b64_to_hex(value: str) -> str:
    return base64.b64decode(value).hex()


def _hex_ids(obj: dict[str, Any]) -> None:
    for key in _ID_FIELDS:
        if isinstance(obj.get(key), str):
            obj[key] = _b64_to_hex(obj[key])


def to_otlp_json(spans: Sequence[ReadableSpan]) -> dict[str, Any]:
    """The OTLP/JSON form of an ``ExportTraceServiceRequest`` holding ``spans``."""
    request = MessageToDict(encode_spans(spans), use_integers_for_enums=True)
    for resource_spans in request.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                _hex_ids(span)
                for link in span.get("links", []):
                    _hex_ids(link)
    return request


class OtlpJsonFileSpanExporter(SpanExporter):
    """Writes each exported batch as one OTLP/JSON line to ``path`` (truncated when opened)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._file: IO[str] | None = open(self.path, "w", encoding="utf-8")  # noqa: SIM115

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        line = json.dumps(to_otlp_json(spans), separators=(",", ":"))
        with self._lock:
            if self._file is None:
                return SpanExportResult.FAILURE
            self._file.write(line + "\n")
            self._file.flush()  # a crash keeps every batch already exported
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # every export is flushed as it is written

    def shutdown(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def read_otlp_json(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The ``ExportTraceServiceRequest`` dicts of a trace file, one per non-empty line."""
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                request = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{os.fspath(path)}:{number}: not OTLP JSON: {exc}") from None
            if not isinstance(request, dict):
                raise ValueError(f"{os.fspath(path)}:{number}: not an OTLP JSON object")
            yield request


def spans_from_otlp_json(requests: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every span of the requests, flattened (each OTLP span dict as written)."""
    return [
        span
        for request in requests
        for resource_spans in request.get("resourceSpans", [])
        for scope_spans in resource_spans.get("scopeSpans", [])
        for span in scope_spans.get("spans", [])
    ]
