"""build_providers_from_env: exporter selection, errors, resource; never the global provider."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from telemetry.providers import (
    DropCountingSpanProcessor,
    Providers,
    SpanExportStats,
    build_providers_from_env,
    build_resource,
)
from telemetry.tracing import Tracing

Make = Callable[..., Providers]


@pytest.fixture
def make() -> Iterator[Make]:
    """build_providers_from_env, shutting every result down after the test."""
    built: list[Providers] = []

    def _make(env: Mapping[str, str], **kw: object) -> Providers:
        p = build_providers_from_env(env, **kw)  # type: ignore[arg-type]
        built.append(p)
        return p

    yield _make
    for p in built:
        p.shutdown(timeout_millis=2000)


def test_default_is_none_for_both_signals(make: Make) -> None:
    p = make({})
    assert p.tracer_provider is None
    assert p.meter_provider is None
    assert p.span_processors == []
    # The library's no-op path accepts it.
    with Tracing(p.tracer_provider).migration_span("c", "manual", "a", "b", ("::1", 1)) as span:
        assert not span.is_recording()


def test_none_explicitly(make: Make) -> None:
    p = make({"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": " NONE "})
    assert p.tracer_provider is None and p.meter_provider is None


def test_console_exporter_prints_spans(make: Make, capsys: pytest.CaptureFixture[str]) -> None:
    p = make({"OTEL_TRACES_EXPORTER": "console"})
    assert p.tracer_provider is not None
    assert [type(sp.exporter) for sp in p.span_processors] == [ConsoleSpanExporter]
    with Tracing(p.tracer_provider).child_span("quic.path.probe"):
        pass
    assert p.force_flush()
    assert '"name": "quic.path.probe"' in capsys.readouterr().out


def test_comma_list_builds_one_processor_each(make: Make) -> None:
    p = make({"OTEL_TRACES_EXPORTER": "otlp, console,otlp"})
    names = [type(sp.exporter).__module__ for sp in p.span_processors]
    assert len(names) == 2  # de-duplicated
    assert names[0].startswith("opentelemetry.exporter.otlp.proto.http")
    assert isinstance(p.span_processors[1].exporter, ConsoleSpanExporter)


def test_metrics_console_builds_meter_provider(make: Make) -> None:
    p = make({"OTEL_METRICS_EXPORTER": "console"})
    assert p.meter_provider is not None
    assert p.tracer_provider is None


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("OTEL_TRACES_EXPORTER", "zipkin"),
        ("OTEL_TRACES_EXPORTER", "otlp,jaeger"),
        ("OTEL_METRICS_EXPORTER", "prometheus"),
    ],
)
def test_unknown_exporter_names_variable_and_choices(var: str, value: str) -> None:
    with pytest.raises(ValueError) as err:
        build_providers_from_env({var: value})
    msg = str(err.value)
    assert var in msg
    assert "otlp, console, none" in msg


def test_none_cannot_be_combined() -> None:
    with pytest.raises(ValueError, match=r"OTEL_TRACES_EXPORTER.*'none' cannot be combined"):
        build_providers_from_env({"OTEL_TRACES_EXPORTER": "none,console"})


def test_unsupported_protocol_is_named() -> None:
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
    with pytest.raises(ValueError, match=r"OTEL_EXPORTER_OTLP_PROTOCOL.*http/protobuf, grpc"):
        build_providers_from_env(env)


def test_signal_specific_protocol_wins() -> None:
    env = {
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "thrift",
    }
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"):
        build_providers_from_env(env)


def test_bad_integer_variable_is_named() -> None:
    with pytest.raises(ValueError, match="OTEL_BSP_MAX_QUEUE_SIZE"):
        build_providers_from_env(
            {"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_MAX_QUEUE_SIZE": "x"}
        )


def test_grpc_protocol_uses_grpc_exporter(make: Make) -> None:
    grpc_mod = pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
    }
    p = make(env)
    assert isinstance(p.span_processors[0].exporter, grpc_mod.OTLPSpanExporter)


def test_grpc_without_its_package_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", None)
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}
    with pytest.raises(ImportError, match="opentelemetry-exporter-otlp-proto-grpc"):
        build_providers_from_env(env)


def test_resource_service_name_default_and_override() -> None:
    assert build_resource({}).attributes["service.name"] == "quic-supervisor"
    assert build_resource({}, service_name_default="qs-agent").attributes["service.name"] == (
        "qs-agent"
    )
    env = {
        "OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs,deployment.environment=ci,x=a%20b",
        "OTEL_SERVICE_NAME": "from-service-name",
    }
    attrs = build_resource(env).attributes
    assert attrs["service.name"] == "from-service-name"  # OTEL_SERVICE_NAME wins
    assert attrs["deployment.environment"] == "ci"
    assert attrs["x"] == "a b"  # URL-decoded like the SDK does
    assert attrs["telemetry.sdk.language"] == "python"
    only_attrs = build_resource({"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs"})
    assert only_attrs.attributes["service.name"] == "from-attrs"


def test_resource_kubernetes_names() -> None:
    env = {"POD_NAME": "pod-a", "NODE_NAME": "node-1", "POD_NAMESPACE": "ns"}
    attrs = build_resource(env).attributes
    assert attrs["k8s.pod.name"] == "pod-a"
    assert attrs["k8s.node.name"] == "node-1"
    assert attrs["k8s.namespace.name"] == "ns"
    # K8S_* spellings are preferred; OTEL_RESOURCE_ATTRIBUTES overrides both.
    env |= {"K8S_POD_NAME": "pod-b", "K8S_NAMESPACE": "ns2"}
    env["OTEL_RESOURCE_ATTRIBUTES"] = "k8s.namespace.name=ns3"
    attrs = build_resource(env).attributes
    assert attrs["k8s.pod.name"] == "pod-b"
    assert attrs["k8s.namespace.name"] == "ns3"
    assert "k8s.pod.name" not in build_resource({}).attributes


def test_resource_reaches_the_provider(make: Make) -> None:
    mem = InMemorySpanExporter()
    p = make(
        {"OTEL_SERVICE_NAME": "svc", "K8S_NODE_NAME": "n1"},
        extra_span_processors=[SimpleSpanProcessor(mem)],
    )
    with Tracing(p.tracer_provider).child_span("x"):
        pass
    (span,) = mem.get_finished_spans()
    assert span.resource.attributes["service.name"] == "svc"
    assert span.resource.attributes["k8s.node.name"] == "n1"


def test_never_sets_the_global_provider(make: Make) -> None:
    before = trace.get_tracer_provider()
    p = make({"OTEL_TRACES_EXPORTER": "console", "OTEL_METRICS_EXPORTER": "console"})
    assert trace.get_tracer_provider() is before
    assert trace.get_tracer_provider() is not p.tracer_provider


def test_two_providers_do_not_see_each_others_spans(make: Make) -> None:
    mem_a, mem_b = InMemorySpanExporter(), InMemorySpanExporter()
    a = make({}, extra_span_processors=[SimpleSpanProcessor(mem_a)])
    b = make({}, extra_span_processors=[SimpleSpanProcessor(mem_b)])
    assert isinstance(a.tracer_provider, TracerProvider)
    tracing_a, tracing_b = Tracing(a.tracer_provider), Tracing(b.tracer_provider)
    with (
        tracing_a.migration_span("ca", "manual", "x", "y", ("127.0.0.1", 1)),
        tracing_b.child_span("quic.path.probe"),
    ):
        pass
    assert [s.name for s in mem_a.get_finished_spans()] == ["quic.migration"]
    assert [s.name for s in mem_b.get_finished_spans()] == ["quic.path.probe"]
    # Context is shared (one process, one contextvar), so b's span still parents on a's span:
    (probe,) = mem_b.get_finished_spans()
    (mig,) = mem_a.get_finished_spans()
    assert probe.parent is not None and probe.parent.span_id == mig.context.span_id


class GatedExporter(SpanExporter):
    """Exports into a list, but only once the gate is open (a stalled collector)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.gate.wait()
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def test_drop_accounting_is_exact_with_concurrent_producers() -> None:
    exporter = GatedExporter()
    processor = DropCountingSpanProcessor(exporter, max_queue_size=32, max_export_batch_size=8)
    tp = TracerProvider()
    tp.add_span_processor(processor)
    tracer = tp.get_tracer("t")
    threads, per_thread = 4, 500

    def produce() -> None:
        for _ in range(per_thread):
            tracer.start_span("s").end()

    workers = [threading.Thread(target=produce) for _ in range(threads)]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()  # span ends return although the exporter is stuck
        stalled = processor.stats()
        assert stalled.pending <= 32
        assert stalled.dropped >= threads * per_thread - 32 - 8
        exporter.gate.set()
        assert processor.force_flush()
        stats = processor.stats()
    finally:
        exporter.gate.set()
        tp.shutdown()
    assert stats.pending == 0 and stats.failed == 0
    assert stats.exported == len(exporter.spans)
    assert stats.exported + stats.dropped == threads * per_thread


def test_unsampled_spans_are_not_counted() -> None:
    exporter = GatedExporter()
    exporter.gate.set()
    processor = DropCountingSpanProcessor(exporter, max_queue_size=4)
    tp = TracerProvider(sampler=ALWAYS_OFF)
    tp.add_span_processor(processor)
    for _ in range(10):
        tp.get_tracer("t").start_span("s").end()
    tp.shutdown()
    assert processor.stats() == SpanExportStats(0, 0, 0, 0, 0)


def test_spans_ended_after_shutdown_count_as_dropped(make: Make) -> None:
    p = make({"OTEL_TRACES_EXPORTER": "console"})
    tp = p.tracer_provider
    assert tp is not None
    tp.shutdown()  # nothing is exported after this: every span end is a counted drop
    tracer = tp.get_tracer("t")
    for _ in range(3):
        tracer.start_span("late").end()
    assert p.span_stats().dropped == 3


def test_shutdown_is_idempotent(make: Make) -> None:
    p = make({"OTEL_TRACES_EXPORTER": "console", "OTEL_METRICS_EXPORTER": "console"})
    p.shutdown()
    p.shutdown()
    with p:
        pass
