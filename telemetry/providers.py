"""Build tracer/meter providers from the standard ``OTEL_*`` environment variables.

The OpenTelemetry SDK alone does not read ``OTEL_TRACES_EXPORTER``/``OTEL_METRICS_EXPORTER``
(the distro's auto-configurator does, but it also sets the *global* providers, which a
library must never do). So this module parses the variables itself and returns providers
that the CLI or the Ray agent hand to ``Supervisor(tracer_provider=..., meter_provider=...)``.

Variables read from ``env`` (default: ``os.environ``):

- ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER``: comma list of ``otlp``, ``console``,
  ``none``. **Default ``none``** (the spec's default is ``otlp``): a library CLI run on a
  laptop must neither print spans nor connect to ``localhost:4318`` unless asked to.
  With ``none`` (and no extra processors) the provider is ``None``, which the library treats
  as a no-op: no span objects are built at all.
- ``OTEL_EXPORTER_OTLP_PROTOCOL`` (and the ``_TRACES_``/``_METRICS_`` variants):
  ``http/protobuf`` (default) or ``grpc`` (needs ``opentelemetry-exporter-otlp-proto-grpc``).
- ``OTEL_EXPORTER_OTLP_ENDPOINT`` (base URL; ``/v1/traces`` and ``/v1/metrics`` are appended
  for HTTP) and ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``_METRICS_ENDPOINT`` (used as is).
- ``OTEL_EXPORTER_OTLP_HEADERS`` (and per-signal variants).
- ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES`` (parsed here with the SDK's rules rather
  than by ``Resource.create``, because that one reads ``os.environ`` and ``env`` may be a test
  mapping), and the Kubernetes downward-API names ``K8S_POD_NAME``/``POD_NAME``,
  ``K8S_NODE_NAME``/``NODE_NAME``, ``K8S_NAMESPACE``/``POD_NAMESPACE``.
- ``OTEL_BSP_MAX_QUEUE_SIZE``, ``OTEL_BSP_SCHEDULE_DELAY``, ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``,
  ``OTEL_BSP_EXPORT_TIMEOUT`` (ms; used as the exporter's timeout, default 2 s because the SDK's
  batch processor ignores its own export timeout), ``OTEL_METRIC_EXPORT_INTERVAL``.

Settings left to the exporters, which read them from ``os.environ`` only: TLS certificates,
``*_INSECURE``, compression, and the sampler (``OTEL_TRACES_SAMPLER``).

Export never blocks the data plane: spans go through a bounded ``BatchSpanProcessor``;
:class:`DropCountingSpanProcessor` bounds its queue itself and counts what it drops.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from urllib.parse import unquote

from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import (
    SERVICE_NAME,
    TELEMETRY_SDK_LANGUAGE,
    TELEMETRY_SDK_NAME,
    TELEMETRY_SDK_VERSION,
    Resource,
)
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.semconv.attributes.k8s_attributes import (
    K8S_NAMESPACE_NAME,
    K8S_NODE_NAME,
    K8S_POD_NAME,
)
from opentelemetry.util.re import parse_env_headers

__all__ = [
    "ACCEPTED_EXPORTERS",
    "ACCEPTED_PROTOCOLS",
    "DropCountingSpanProcessor",
    "Providers",
    "SpanExportStats",
    "build_providers_from_env",
    "build_resource",
]

_log = logging.getLogger(__name__)

ACCEPTED_EXPORTERS = ("otlp", "console", "none")
ACCEPTED_PROTOCOLS = ("http/protobuf", "grpc")
GRPC_PACKAGE = "opentelemetry-exporter-otlp-proto-grpc"

DEFAULT_MAX_QUEUE_SIZE = 2048
DEFAULT_MAX_EXPORT_BATCH_SIZE = 512
DEFAULT_SCHEDULE_DELAY_MS = 1000
DEFAULT_EXPORT_TIMEOUT_MS = 2000
DEFAULT_METRIC_EXPORT_INTERVAL_MS = 60000

# (resource attribute, env variables in order of preference): the downward-API names that
# Kubernetes manifests conventionally use (k8s/ sets the K8S_* ones).
_K8S_ENV = (
    (K8S_POD_NAME, ("K8S_POD_NAME", "POD_NAME")),
    (K8S_NODE_NAME, ("K8S_NODE_NAME", "NODE_NAME")),
    (K8S_NAMESPACE_NAME, ("K8S_NAMESPACE", "POD_NAMESPACE")),
)


@dataclass(frozen=True, slots=True)
class SpanExportStats:
    """What happened to the sampled spans that ended on one (or all) batch processors.

    Each is exactly one of: ``dropped`` (queue full, or ended after shutdown), ``pending``
    (queued), in flight (handed to the exporter, which has not returned), ``exported``, or
    ``failed`` (the exporter failed). After a flush nothing is pending or in flight.
    """

    dropped: int
    pending: int
    exported: int
    failed: int
    export_failures: int  # failed export calls (batches), including exceptions


class _CountingExporter(SpanExporter):
    """Delegates to an exporter, reporting each batch taken and counting the outcomes."""

    def __init__(self, inner: SpanExporter, on_take: Callable[[int], None]) -> None:
        self.inner = inner
        self._on_take = on_take
        self._lock = threading.Lock()
        self.exported = 0
        self.failed = 0
        self.export_failures = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._on_take(len(spans))
        try:
            result = self.inner.export(spans)
        except Exception:
            with self._lock:
                self.failed += len(spans)
                self.export_failures += 1
            raise
        with self._lock:
            if result is SpanExportResult.SUCCESS:
                self.exported += len(spans)
            else:
                self.failed += len(spans)
                self.export_failures += 1
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class DropCountingSpanProcessor(SpanProcessor):
    """A bounded ``BatchSpanProcessor`` that counts exactly what it drops.

    The SDK's batch processor drops silently when its deque is full; its internal drop
    metric (SDK 1.45, behind ``OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED``) checks the length
    and appends without a lock, so it over-counts when the worker pops in between. Instead,
    this wrapper admits a span only while fewer than ``max_queue_size`` are *pending*
    (admitted, not yet handed to the exporter) and counts the others as dropped. Pending
    bounds the SDK's queue length, so the SDK itself never drops. Only public SDK
    interfaces are used.

    ``on_end`` never blocks: a short lock, then the SDK's deque append; a worker thread
    exports. ``shutdown`` takes at most about (queued batches + 1) x the exporter's timeout.
    """

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
        max_export_batch_size: int = DEFAULT_MAX_EXPORT_BATCH_SIZE,
        schedule_delay_millis: float = DEFAULT_SCHEDULE_DELAY_MS,
    ) -> None:
        self._lock = threading.Lock()
        self._max_pending = max_queue_size
        self._pending = 0
        self._dropped = 0
        self._closed = False
        self._exporter = _CountingExporter(exporter, self._taken)
        self._bsp = BatchSpanProcessor(
            self._exporter,
            max_queue_size=max_queue_size,
            schedule_delay_millis=schedule_delay_millis,
            max_export_batch_size=min(max_export_batch_size, max_queue_size),
        )
        if hasattr(os, "register_at_fork"):  # the SDK empties its queue in a forked child
            ref = weakref.ref(self)

            def _after_fork() -> None:
                if (me := ref()) is not None:
                    me._lock = threading.Lock()
                    me._pending = 0

            os.register_at_fork(after_in_child=_after_fork)

    def _taken(self, count: int) -> None:
        with self._lock:
            self._pending = max(0, self._pending - count)

    @property
    def exporter(self) -> SpanExporter:
        """The wrapped exporter (not the counting shim)."""
        return self._exporter.inner

    def stats(self) -> SpanExportStats:
        with self._lock:
            dropped, pending = self._dropped, self._pending
        return SpanExportStats(
            dropped=dropped,
            pending=pending,
            exported=self._exporter.exported,
            failed=self._exporter.failed,
            export_failures=self._exporter.export_failures,
        )

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self._bsp.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if not (span.context and span.context.trace_flags.sampled):
            return  # the SDK's processor ignores these too
        with self._lock:
            if self._closed or self._pending >= self._max_pending:
                self._dropped += 1
                first = self._dropped == 1
            else:
                self._pending += 1
                first = None
        if first is None:
            self._bsp.on_end(span)
        elif first and not self._closed:
            _log.warning(
                "span export queue full (max_queue_size=%d): dropping spans, counted in "
                "Providers.span_stats()",
                self._max_pending,
            )

    def shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._bsp.shutdown()
        with self._lock:  # whatever the final export did not take is lost
            self._dropped += self._pending
            self._pending = 0

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export what is queued. The SDK ignores the timeout: the exporter's timeout bounds it."""
        return self._bsp.force_flush(timeout_millis)


@dataclass(slots=True)
class Providers:
    """Providers built from the environment; ``None`` means that signal is off (no-op)."""

    tracer_provider: TracerProvider | None
    meter_provider: MeterProvider | None
    span_processors: list[DropCountingSpanProcessor] = field(default_factory=list)
    _closed: bool = field(default=False, init=False, repr=False)

    def span_stats(self) -> SpanExportStats:
        """Counters summed over this provider's batch processors."""
        stats = [p.stats() for p in self.span_processors]
        return SpanExportStats(
            dropped=sum(s.dropped for s in stats),
            pending=sum(s.pending for s in stats),
            exported=sum(s.exported for s in stats),
            failed=sum(s.failed for s in stats),
            export_failures=sum(s.export_failures for s in stats),
        )

    def force_flush(self, timeout_millis: int = 10000) -> bool:
        ok = True
        if self.tracer_provider is not None:
            ok = self.tracer_provider.force_flush(timeout_millis) and ok
        if self.meter_provider is not None:
            ok = self.meter_provider.force_flush(timeout_millis) and ok
        return ok

    def shutdown(self, timeout_millis: int = 10000) -> None:
        """Flush and stop exporting. Idempotent; bounded by the exporters' timeouts."""
        if self._closed:
            return
        self._closed = True
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown(timeout_millis=timeout_millis)

    def __enter__(self) -> Providers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


def _exporter_names(env: Mapping[str, str], var: str) -> list[str]:
    raw = env.get(var, "").strip()
    if not raw:
        return []
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    bad = [n for n in names if n not in ACCEPTED_EXPORTERS]
    if bad:
        raise ValueError(
            f"{var}={raw!r}: unknown exporter {bad[0]!r}; accepted values: "
            f"{', '.join(ACCEPTED_EXPORTERS)} (comma-separated)"
        )
    if "none" in names:
        if len(names) > 1:
            raise ValueError(f"{var}={raw!r}: 'none' cannot be combined with other exporters")
        return []
    return list(dict.fromkeys(names))  # de-duplicated, order kept


def _int_var(env: Mapping[str, str], var: str, default: int, *, minimum: int = 1) -> int:
    raw = env.get(var, "").strip()
    if not raw:
        return default
    try:
        value = int(float(raw))
    except ValueError:
        raise ValueError(f"{var}={raw!r}: expected an integer") from None
    if value < minimum:
        raise ValueError(f"{var}={raw!r}: must be >= {minimum}")
    return value


def _protocol(env: Mapping[str, str], signal: str) -> str:
    var = f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL"
    raw = env.get(var, "").strip()
    if not raw:
        var = "OTEL_EXPORTER_OTLP_PROTOCOL"
        raw = env.get(var, "").strip()
    proto = raw.lower() or "http/protobuf"
    if proto not in ACCEPTED_PROTOCOLS:
        raise ValueError(
            f"{var}={raw!r}: unsupported OTLP protocol; accepted values: "
            f"{', '.join(ACCEPTED_PROTOCOLS)}"
        )
    return proto


def _endpoint(env: Mapping[str, str], signal: str, proto: str) -> str:
    specific = env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT", "").strip()
    if specific:
        return specific
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if proto == "grpc":
        return base or "http://localhost:4317"
    return f"{(base or 'http://localhost:4318').rstrip('/')}/v1/{signal}"


def _headers(env: Mapping[str, str], signal: str) -> dict[str, str]:
    raw = env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_HEADERS") or env.get(
        "OTEL_EXPORTER_OTLP_HEADERS", ""
    )
    return dict(parse_env_headers(raw, liberal=True)) if raw else {}


def _import_otlp(module: str, cls: str, proto: str) -> Any:
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        package = GRPC_PACKAGE if proto == "grpc" else "opentelemetry-exporter-otlp-proto-http"
        raise ImportError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={proto} needs the {package!r} package: "
            f"pip install {package}"
        ) from exc


def _otlp_span_exporter(env: Mapping[str, str], timeout_s: float) -> SpanExporter:
    proto = _protocol(env, "traces")
    endpoint = _endpoint(env, "traces", proto)
    headers = _headers(env, "traces")
    if proto == "grpc":
        cls = _import_otlp(
            "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", "OTLPSpanExporter", proto
        )
    else:
        cls = _import_otlp(
            "opentelemetry.exporter.otlp.proto.http.trace_exporter", "OTLPSpanExporter", proto
        )
    exporter: SpanExporter = cls(endpoint=endpoint, headers=headers or None, timeout=timeout_s)
    return exporter


def _otlp_metric_exporter(env: Mapping[str, str], timeout_s: float) -> MetricExporter:
    proto = _protocol(env, "metrics")
    endpoint = _endpoint(env, "metrics", proto)
    headers = _headers(env, "metrics")
    if proto == "grpc":
        cls = _import_otlp(
            "opentelemetry.exporter.otlp.proto.grpc.metric_exporter", "OTLPMetricExporter", proto
        )
    else:
        cls = _import_otlp(
            "opentelemetry.exporter.otlp.proto.http.metric_exporter", "OTLPMetricExporter", proto
        )
    exporter: MetricExporter = cls(endpoint=endpoint, headers=headers or None, timeout=timeout_s)
    return exporter


def _parse_resource_attributes(raw: str) -> dict[str, str]:
    """``key=value,key=value`` with URL-decoded values, as the SDK's OTELResourceDetector."""
    attrs: dict[str, str] = {}
    for item in raw.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            _log.warning("OTEL_RESOURCE_ATTRIBUTES: ignoring malformed item %r", item)
            continue
        attrs[key.strip()] = unquote(value.strip())
    return attrs


def build_resource(
    env: Mapping[str, str] | None = None, *, service_name_default: str = "quic-supervisor"
) -> Resource:
    """The resource for ``env``: later sources win.

    Order: SDK attributes < ``service.name`` default < Kubernetes names
    < ``OTEL_RESOURCE_ATTRIBUTES`` < ``OTEL_SERVICE_NAME`` (the spec gives it precedence).
    """
    env = os.environ if env is None else env
    try:
        sdk_version = version("opentelemetry-sdk")
    except PackageNotFoundError:  # pragma: no cover - vendored SDK
        sdk_version = "unknown"
    attrs: dict[str, Any] = {
        TELEMETRY_SDK_LANGUAGE: "python",
        TELEMETRY_SDK_NAME: "opentelemetry",
        TELEMETRY_SDK_VERSION: sdk_version,
        SERVICE_NAME: service_name_default,
    }
    for key, names in _K8S_ENV:
        for name in names:
            value = env.get(name, "").strip()
            if value:
                attrs[key] = value
                break
    attrs.update(_parse_resource_attributes(env.get("OTEL_RESOURCE_ATTRIBUTES", "")))
    service_name = env.get("OTEL_SERVICE_NAME", "").strip()
    if service_name:
        attrs[SERVICE_NAME] = service_name
    return Resource(attrs)


def build_providers_from_env(
    env: Mapping[str, str] | None = None,
    *,
    service_name_default: str = "quic-supervisor",
    max_queue_size: int | None = None,
    export_timeout_millis: int | None = None,
    extra_span_processors: Sequence[SpanProcessor] = (),
    extra_metric_readers: Sequence[MetricReader] = (),
) -> Providers:
    """Build providers from ``OTEL_*`` variables (see the module docstring). Never global.

    Explicit arguments win over the environment. Bad values raise ``ValueError`` naming the
    variable; a ``grpc`` protocol without its package raises ``ImportError`` naming it.
    ``extra_*`` are added as given (e.g. an in-memory exporter in tests); they force the
    provider to exist even when the exporter variable says ``none``.
    """
    env = os.environ if env is None else env
    trace_names = _exporter_names(env, "OTEL_TRACES_EXPORTER")
    metric_names = _exporter_names(env, "OTEL_METRICS_EXPORTER")
    queue = (
        max_queue_size
        if max_queue_size is not None
        else _int_var(env, "OTEL_BSP_MAX_QUEUE_SIZE", DEFAULT_MAX_QUEUE_SIZE)
    )
    timeout_ms = (
        export_timeout_millis
        if export_timeout_millis is not None
        else _int_var(env, "OTEL_BSP_EXPORT_TIMEOUT", DEFAULT_EXPORT_TIMEOUT_MS)
    )
    batch = _int_var(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", DEFAULT_MAX_EXPORT_BATCH_SIZE)
    delay = _int_var(env, "OTEL_BSP_SCHEDULE_DELAY", DEFAULT_SCHEDULE_DELAY_MS)
    interval = _int_var(env, "OTEL_METRIC_EXPORT_INTERVAL", DEFAULT_METRIC_EXPORT_INTERVAL_MS)
    timeout_s = timeout_ms / 1000.0

    # Build every exporter before any provider so a config error leaves no thread behind.
    span_exporters: list[SpanExporter] = []
    for name in trace_names:
        if name == "otlp":
            span_exporters.append(_otlp_span_exporter(env, timeout_s))
        else:  # console; bind the current sys.stdout (the SDK's default is bound at import)
            span_exporters.append(ConsoleSpanExporter(out=sys.stdout))
    metric_exporters: list[MetricExporter] = []
    for name in metric_names:
        if name == "otlp":
            metric_exporters.append(_otlp_metric_exporter(env, timeout_s))
        else:
            metric_exporters.append(ConsoleMetricExporter(out=sys.stdout))

    resource = build_resource(env, service_name_default=service_name_default)
    providers = Providers(tracer_provider=None, meter_provider=None)
    if span_exporters or extra_span_processors:
        tp = TracerProvider(resource=resource)
        for exporter in span_exporters:
            processor = DropCountingSpanProcessor(
                exporter,
                max_queue_size=queue,
                max_export_batch_size=batch,
                schedule_delay_millis=delay,
            )
            providers.span_processors.append(processor)
            tp.add_span_processor(processor)
        for extra in extra_span_processors:
            tp.add_span_processor(extra)
        providers.tracer_provider = tp
    if metric_exporters or extra_metric_readers:
        readers: list[MetricReader] = [
            PeriodicExportingMetricReader(
                exporter, export_interval_millis=interval, export_timeout_millis=timeout_ms
            )
            for exporter in metric_exporters
        ]
        readers.extend(extra_metric_readers)
        providers.meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    return providers
