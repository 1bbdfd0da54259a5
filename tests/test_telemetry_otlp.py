"""Real OTLP/HTTP export on loopback: spans arrive with parent links; a dead or stalled
collector never blocks span ends, and what is lost is counted."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator

import pytest

from telemetry.metrics import Metrics
from telemetry.providers import Providers, build_providers_from_env
from telemetry.tracing import (
    ATTR_CID_SEQUENCE_AFTER,
    ATTR_CID_SEQUENCE_BEFORE,
    ATTR_PROBE_TRIES,
    SPAN_MIGRATION,
    SPAN_PATH_PROBE,
    SPAN_PATH_SWITCH,
    Tracing,
)
from tests.rig_otlp import OTLPReceiver

SPANS = 1000


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as rx:
        yield rx


@pytest.fixture
def quiet_exporter_logs(caplog: pytest.LogCaptureFixture) -> None:
    # Failed exports log an error per batch: expected here.
    caplog.set_level(logging.CRITICAL, logger="opentelemetry")


def closed_port() -> int:
    """A loopback TCP port with nothing listening (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def flush_in_thread(p: Providers, join_timeout: float = 60.0) -> None:
    """force_flush() ignores its timeout in SDK 1.45: bound the wait from outside."""
    t = threading.Thread(target=p.force_flush, daemon=True)
    t.start()
    t.join(join_timeout)
    assert not t.is_alive(), "force_flush did not return: export is blocking"


def test_spans_reach_collector_with_parent_links(receiver: OTLPReceiver) -> None:
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": "otlp-test",
        "K8S_POD_NAME": "pod-7",
    }
    with build_providers_from_env(env) as p:
        tracing = Tracing(p.tracer_provider)
        with tracing.migration_span(
            "conn-1", "failover", ("127.0.0.2", 5001), ("127.0.0.3", 5002), ("127.0.0.1", 4433)
        ):
            with tracing.child_span(SPAN_PATH_PROBE, **{ATTR_PROBE_TRIES: 2}):
                pass
            with tracing.child_span(
                SPAN_PATH_SWITCH, **{ATTR_CID_SEQUENCE_BEFORE: 1, ATTR_CID_SEQUENCE_AFTER: 3}
            ):
                pass
        assert p.force_flush()
        spans = {s["name"]: s for s in receiver.wait_for_spans(3)}
    mig, probe, switch = spans[SPAN_MIGRATION], spans[SPAN_PATH_PROBE], spans[SPAN_PATH_SWITCH]
    assert mig["parent_span_id"] is None
    assert probe["parent_span_id"] == mig["span_id"]
    assert switch["parent_span_id"] == mig["span_id"]
    assert {probe["trace_id"], switch["trace_id"]} == {mig["trace_id"]}
    assert mig["attributes"]["quic.migration.result"] == "completed"
    assert mig["attributes"]["quic.migration.reason"] == "failover"
    assert mig["attributes"]["network.peer.port"] == 4433
    assert mig["attributes"]["network.transport"] == "quic"
    assert mig["attributes"]["network.type"] == "ipv4"
    assert switch["attributes"]["quic.cid.sequence.after"] == 3
    assert probe["attributes"]["quic.probe.tries"] == 2
    assert mig["resource"]["service.name"] == "otlp-test"
    assert mig["resource"]["k8s.pod.name"] == "pod-7"
    assert mig["scope"] == "quic-supervisor"


def test_signal_specific_endpoint_is_used_as_is(receiver: OTLPReceiver) -> None:
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{receiver.endpoint}/v1/traces",
    }
    with build_providers_from_env(env) as p:
        with Tracing(p.tracer_provider).child_span("quic.path.close"):
            pass
        p.force_flush()
        (span,) = receiver.wait_for_spans(1)
    assert span["name"] == "quic.path.close"


def test_metrics_reach_collector(receiver: OTLPReceiver) -> None:
    env = {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
    with build_providers_from_env(env) as p:
        Metrics(p.meter_provider).migration("manual", "completed")
        p.force_flush()
        receiver.wait_for_metric("quic.migrations")


@pytest.mark.usefixtures("quiet_exporter_logs")
def test_dead_collector_never_blocks_and_failures_are_counted() -> None:
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
        "OTEL_BSP_MAX_QUEUE_SIZE": "64",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "16",
        "OTEL_BSP_EXPORT_TIMEOUT": "500",
    }
    p = build_providers_from_env(env)
    try:
        tracer = Tracing(p.tracer_provider)
        for i in range(SPANS):  # returns: span ends only append to a bounded queue
            with tracer.child_span("quic.path.probe", n=i):
                pass
        flush_in_thread(p)
        stats = p.span_stats()
    finally:
        p.shutdown()
    assert stats.exported == 0 and stats.pending == 0
    assert stats.export_failures >= 1
    # Every span is accounted for: dropped at the queue or failed at the exporter.
    assert stats.dropped + stats.failed == SPANS


@pytest.mark.usefixtures("quiet_exporter_logs")
def test_stalled_collector_drops_are_counted(receiver: OTLPReceiver) -> None:
    queue, batch = 64, 16
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_MAX_QUEUE_SIZE": str(queue),
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": str(batch),
        "OTEL_BSP_EXPORT_TIMEOUT": "30000",
    }
    receiver.stall()  # accepts, reads, never answers until released
    p = build_providers_from_env(env)
    try:
        tracer = Tracing(p.tracer_provider)
        for i in range(SPANS):
            with tracer.child_span("quic.path.probe", n=i):
                pass
        # At most one export (one batch) is in flight while the collector stalls; the queue
        # holds `queue` more; every other span was dropped, and counted, without blocking.
        assert p.span_stats().dropped >= SPANS - queue - batch
        receiver.release()
        flush_in_thread(p)
        stats = p.span_stats()
        assert stats.failed == 0 and stats.pending == 0
        assert stats.exported + stats.dropped == SPANS
        assert len(receiver.wait_for_spans(stats.exported)) == stats.exported
    finally:
        receiver.release()
        p.shutdown()
