"""Migration span helpers and W3C propagation through envelope fields."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import msgpack
import pytest
from opentelemetry import baggage, propagate, trace
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Span, StatusCode

from telemetry.propagation import (
    attached,
    context_from_fields,
    current_trace_fields,
    inject_fields,
)
from telemetry.tracing import (
    ATTR_MIGRATION_RESULT,
    ATTR_SWITCH_ROLLED_BACK,
    SPAN_MIGRATION,
    SPAN_PATH_CLOSE,
    SPAN_PATH_PROBE,
    SPAN_PATH_SWITCH,
    Tracing,
    add_event,
    network_type,
    record_error,
    set_result,
)


class Recorder:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracing = Tracing(self.provider)

    def spans(self) -> dict[str, ReadableSpan]:
        return {s.name: s for s in self.exporter.get_finished_spans()}


@pytest.fixture
def rec() -> Iterator[Recorder]:
    r = Recorder()
    yield r
    r.provider.shutdown()


def migrate(tracing: Tracing, **kw: Any) -> AbstractContextManager[Span]:
    args: dict[str, Any] = {
        "conn_id": "c1",
        "reason": "manual",
        "from_addr": "/ip4/127.0.0.1/udp/5000/quic-v1",
        "to_addr": ("127.0.0.2", 5001),
        "remote_addr": "/ip4/127.0.0.1/udp/4433/quic-v1",
    }
    args.update(kw)
    return tracing.migration_span(**args)


def test_migration_span_attributes_and_children(rec: Recorder) -> None:
    with migrate(rec.tracing):
        with rec.tracing.child_span(SPAN_PATH_PROBE):
            pass
        with rec.tracing.child_span(SPAN_PATH_SWITCH, **{ATTR_SWITCH_ROLLED_BACK: False}):
            pass
        with rec.tracing.child_span(SPAN_PATH_CLOSE):
            pass
    spans = rec.spans()
    mig = spans[SPAN_MIGRATION]
    assert mig.parent is None  # root: no caller span
    assert dict(mig.attributes or {}) == {
        "quic.connection.id": "c1",
        "quic.migration.reason": "manual",
        "quic.path.from.local_address": "/ip4/127.0.0.1/udp/5000/quic-v1",
        "quic.path.to.local_address": "127.0.0.2:5001",
        "network.peer.address": "127.0.0.1",
        "network.peer.port": 4433,
        "network.transport": "quic",
        "network.type": "ipv4",
        "quic.migration.result": "completed",
    }
    for name in (SPAN_PATH_PROBE, SPAN_PATH_SWITCH, SPAN_PATH_CLOSE):
        child = spans[name]
        assert child.parent is not None and child.parent.span_id == mig.context.span_id
        assert child.context.trace_id == mig.context.trace_id
    assert (spans[SPAN_PATH_SWITCH].attributes or {})[ATTR_SWITCH_ROLLED_BACK] is False


@pytest.mark.parametrize(
    ("family", "remote", "expected"),
    [
        ("ipv6", "x", "ipv6"),
        (socket.AF_INET6, ("::1", 1), "ipv6"),
        (socket.AF_INET, ("::1", 1), "ipv4"),
        (None, ("::1", 4433, 0, 0), "ipv6"),
        (None, "/ip6/::1/udp/4433/quic-v1", "ipv6"),
        (None, "[::1]:4433", "ipv6"),
        (None, "10.0.0.1:4433", "ipv4"),
        (None, "not-an-address", None),
    ],
)
def test_network_type(family: str | int | None, remote: object, expected: str | None) -> None:
    assert network_type(family, remote) == expected


def test_ipv6_peer_attributes(rec: Recorder) -> None:
    with migrate(rec.tracing, remote_addr=("::1", 4433, 0, 0), to_addr=("::1", 7)):
        pass
    attrs = rec.spans()[SPAN_MIGRATION].attributes or {}
    assert attrs["network.peer.address"] == "::1"
    assert attrs["network.peer.port"] == 4433
    assert attrs["network.type"] == "ipv6"
    assert attrs["quic.path.to.local_address"] == "[::1]:7"


def test_exception_sets_failed_and_error_status(rec: Recorder) -> None:
    with (
        pytest.raises(RuntimeError),
        migrate(rec.tracing),
        rec.tracing.child_span(SPAN_PATH_SWITCH),
    ):
        raise RuntimeError("peer never confirmed")
    spans = rec.spans()
    for name in (SPAN_MIGRATION, SPAN_PATH_SWITCH):
        span = spans[name]
        assert span.status.status_code is StatusCode.ERROR
        assert [e.name for e in span.events] == ["exception"]
    assert (spans[SPAN_MIGRATION].attributes or {})[ATTR_MIGRATION_RESULT] == "failed"


def test_explicit_result_survives_the_exception(rec: Recorder) -> None:
    with pytest.raises(LookupError), migrate(rec.tracing) as span:
        set_result(span, "rolled_back")
        raise LookupError("rolled back")
    mig = rec.spans()[SPAN_MIGRATION]
    assert (mig.attributes or {})[ATTR_MIGRATION_RESULT] == "rolled_back"
    assert mig.status.status_code is StatusCode.ERROR


def test_set_result_rejects_unknown_values(rec: Recorder) -> None:
    with rec.tracing.child_span("x") as span, pytest.raises(ValueError, match="rolled_back"):
        set_result(span, "maybe")


@pytest.mark.asyncio
async def test_cancellation_is_cancelled_not_error(rec: Recorder) -> None:
    entered = asyncio.Event()

    async def switch() -> None:
        with migrate(rec.tracing):
            entered.set()
            await asyncio.Event().wait()  # until cancelled

    task = asyncio.create_task(switch())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    mig = rec.spans()[SPAN_MIGRATION]
    assert (mig.attributes or {})[ATTR_MIGRATION_RESULT] == "cancelled"
    assert mig.status.status_code is StatusCode.UNSET
    assert [e.name for e in mig.events] == ["cancelled"]


@pytest.mark.asyncio
async def test_concurrent_tasks_keep_their_own_span_across_awaits(rec: Recorder) -> None:
    """Two migrations interleave at every await; each child parents on its own migration."""
    turn = [asyncio.Event(), asyncio.Event()]

    async def one(i: int) -> None:
        with migrate(rec.tracing, conn_id=f"c{i}"):
            turn[i].set()
            await turn[1 - i].wait()  # both migration spans are open now
            await asyncio.sleep(0)
            with rec.tracing.child_span(SPAN_PATH_SWITCH, conn=f"c{i}"):
                await asyncio.sleep(0)

    await asyncio.gather(one(0), one(1))
    spans = rec.exporter.get_finished_spans()
    migs = {
        (s.attributes or {})["quic.connection.id"]: s for s in spans if s.name == SPAN_MIGRATION
    }
    switches = [s for s in spans if s.name == SPAN_PATH_SWITCH]
    assert len(migs) == 2 and len(switches) == 2
    for sw in switches:
        parent = migs[str((sw.attributes or {})["conn"])]
        assert sw.parent is not None and sw.parent.span_id == parent.context.span_id
    assert migs["c0"].context.trace_id != migs["c1"].context.trace_id
    assert trace.get_current_span() is trace.INVALID_SPAN  # nothing leaked into this task


def test_child_of_callers_span(rec: Recorder) -> None:
    tracer = rec.provider.get_tracer("caller")
    with tracer.start_as_current_span("caller") as caller, migrate(rec.tracing):
        pass
    mig = rec.spans()[SPAN_MIGRATION]
    assert mig.parent is not None and mig.parent.span_id == caller.get_span_context().span_id


def test_noop_tracing_without_provider() -> None:
    tracing = Tracing(None)
    assert not tracing.enabled
    with pytest.raises(KeyError), migrate(tracing) as span:
        assert not span.is_recording()
        add_event(span, "x", a=1)
        set_result(span, "failed")
        record_error(span, KeyError("k"))
        with tracing.child_span(SPAN_PATH_PROBE):
            raise KeyError("k")


def test_events_and_record_error(rec: Recorder) -> None:
    with rec.tracing.child_span(SPAN_PATH_PROBE) as span:
        add_event(span, "quic.probe.try", **{"quic.probe.tries": 1, "quic.probe.rtt_ms": 0.25})
        record_error(span, TimeoutError("probe timed out"), "probe timeout")
    probe = rec.spans()[SPAN_PATH_PROBE]
    assert [e.name for e in probe.events] == ["quic.probe.try", "exception"]
    assert dict(probe.events[0].attributes or {}) == {
        "quic.probe.tries": 1,
        "quic.probe.rtt_ms": 0.25,
    }
    assert probe.status.status_code is StatusCode.ERROR
    assert probe.status.description == "probe timeout"


# --- propagation ---------------------------------------------------------------------------


def test_propagation_round_trip_through_msgpack(rec: Recorder) -> None:
    tracer = rec.provider.get_tracer("caller")
    with tracer.start_as_current_span("caller") as caller:
        ctx = baggage.set_baggage("tenant", "acme")
        fields = inject_fields(ctx)
        assert current_trace_fields()["traceparent"] == fields["traceparent"]
    assert set(fields) == {"traceparent", "baggage"}
    wire = msgpack.unpackb(msgpack.packb({"type": "Switch", **fields}), raw=False)

    # The receiving side (another task or process) has no current span.
    parent = context_from_fields(wire)
    assert baggage.get_baggage("tenant", parent) == "acme"
    with migrate(rec.tracing, parent_context=parent), rec.tracing.child_span(SPAN_PATH_SWITCH):
        pass
    spans = rec.spans()
    mig = spans[SPAN_MIGRATION]
    assert mig.context.trace_id == caller.get_span_context().trace_id
    assert mig.parent is not None and mig.parent.span_id == caller.get_span_context().span_id
    assert mig.parent.is_remote
    assert spans[SPAN_PATH_SWITCH].parent.span_id == mig.context.span_id  # type: ignore[union-attr]


def test_tracestate_is_carried() -> None:
    fields = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "vendor=abc",
    }
    ctx = context_from_fields(fields)
    sc = trace.get_current_span(ctx).get_span_context()
    assert f"{sc.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert sc.trace_state.get("vendor") == "abc"
    assert inject_fields(ctx) == fields


def test_no_or_bad_fields_give_a_root_even_inside_a_span(rec: Recorder) -> None:
    tracer = rec.provider.get_tracer("unrelated")
    with tracer.start_as_current_span("unrelated"):
        for fields in ({}, None, {"traceparent": "garbage"}, {"traceparent": None}):
            with migrate(rec.tracing, parent_context=context_from_fields(fields)):
                pass
            assert rec.spans()[SPAN_MIGRATION].parent is None
            rec.exporter.clear()
    assert current_trace_fields() == {}


def test_attached_makes_the_context_current(rec: Recorder) -> None:
    tracer = rec.provider.get_tracer("caller")
    with tracer.start_as_current_span("caller") as caller:
        fields = current_trace_fields()
    with attached(fields), rec.tracing.child_span(SPAN_PATH_PROBE):
        pass
    probe = rec.spans()[SPAN_PATH_PROBE]
    assert probe.parent is not None and probe.parent.span_id == caller.get_span_context().span_id
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_independent_of_the_global_propagator(rec: Recorder) -> None:
    saved = propagate.get_global_textmap()
    propagate.set_global_textmap(CompositePropagator([]))  # an app that disabled propagation
    try:
        with rec.provider.get_tracer("c").start_as_current_span("caller"):
            fields = current_trace_fields()
    finally:
        propagate.set_global_textmap(saved)
    assert "traceparent" in fields
