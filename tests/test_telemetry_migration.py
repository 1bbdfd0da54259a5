"""The span tree a migration produces, against a real aioquic server on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from actors.path_state import PathState
from actors.quic_adapter import connection_trace
from supervisor import Supervisor
from supervisor.core.errors import (
    ConnectionClosedError,
    MigrationRolledBackError,
    PathNotValidatedError,
    ProbeTimeoutError,
)
from supervisor.core.events import EvtPathStateChanged
from supervisor.core.handles import Connection
from telemetry.qlog import BoundedTrace, QlogDirectory, is_packet_event
from tests.rig.aioquic_server import RigServer, echo_server
from tests.rig.certs import CertPair, generate_cert
from tests.rig.udp_shim import udp_shim
from tests.support import connection_actor, echo_roundtrip, event_log


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> CertPair:
    return generate_cert(tmp_path_factory.mktemp("cert"))


@pytest.fixture
async def server(cert: CertPair) -> AsyncIterator[RigServer]:
    async with echo_server(certfile=cert.certfile, keyfile=cert.keyfile) as srv:
        yield srv


@pytest.fixture
def exporter() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exp = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    yield provider, exp
    provider.shutdown()


def _by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


async def _dial(sup: Supervisor, server: RigServer) -> Connection:
    return await sup.dial(
        f"/ip4/127.0.0.1/udp/{server.port}/quic-v1", alpn_protocols=["echo"], verify=False
    )


async def test_successful_migration_is_one_trace(
    server: RigServer, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exp = exporter
    async with Supervisor(
        enable_experimental_connection_migration=True, tracer_provider=provider
    ) as sup:
        conn = await sup.dial(
            f"/ip4/127.0.0.1/udp/{server.port}/quic-v1", alpn_protocols=["echo"], verify=False
        )
        mc = conn.as_migratable()
        path = await mc.add_path("/ip4/127.0.0.2/udp/0/quic-v1")
        await path.probe()
        exp.clear()
        await path.switch()
        spans = exp.get_finished_spans()
        (migration,) = _by_name(spans, "quic.migration")
        (switch,) = _by_name(spans, "quic.path.switch")
        assert migration.parent is None  # a root span: no caller span
        assert switch.parent is not None and switch.parent.span_id == migration.context.span_id
        attrs = dict(migration.attributes or {})
        assert attrs["quic.connection.id"] == conn.conn_id
        assert attrs["quic.migration.reason"] == "manual"
        assert attrs["quic.migration.result"] == "completed"
        assert attrs["network.transport"] == "quic"
        assert attrs["network.type"] == "ipv4"
        assert "/ip4/127.0.0.2/" in str(attrs["quic.path.to.local_address"])
        assert "/ip4/127.0.0.1/" in str(attrs["quic.path.from.local_address"])
        sattrs = dict(switch.attributes or {})
        assert sattrs["quic.switch.rolled_back"] is False
        assert sattrs["quic.cid.sequence.before"] != sattrs["quic.cid.sequence.after"]
        assert float(str(sattrs["quic.switch.confirmation_ms"])) >= 0
        assert migration.status.status_code is not StatusCode.ERROR


async def test_caller_span_parents_the_migration(
    server: RigServer, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exp = exporter
    tracer = provider.get_tracer("test")
    async with Supervisor(
        enable_experimental_connection_migration=True, tracer_provider=provider
    ) as sup:
        conn = await sup.dial(
            f"/ip4/127.0.0.1/udp/{server.port}/quic-v1", alpn_protocols=["echo"], verify=False
        )
        path = await conn.as_migratable().add_path("/ip4/127.0.0.2/udp/0/quic-v1")
        await path.probe()
        with tracer.start_as_current_span("caller") as caller:
            await path.switch()
        (migration,) = _by_name(exp.get_finished_spans(), "quic.migration")
        assert migration.parent is not None
        assert migration.parent.span_id == caller.get_span_context().span_id
        assert migration.context.trace_id == caller.get_span_context().trace_id


async def test_standalone_probe_timeout_span(
    server: RigServer, cert: CertPair, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exp = exporter
    async with (
        udp_shim(server.addr) as shim,
        Supervisor(enable_experimental_connection_migration=True, tracer_provider=provider) as sup,
    ):
        conn = await sup.dial(
            f"/ip4/127.0.0.1/udp/{shim.listen_addr[1]}/quic-v1",
            alpn_protocols=["echo"],
            verify=False,
        )
        path = await conn.as_migratable().add_path("/ip4/127.0.0.2/udp/0/quic-v1")
        local = path.info().local_addr
        shim.drop_client_to_server(
            src=(local.value_for_protocol("ip4"), int(local.value_for_protocol("udp")))
        )
        with pytest.raises(ProbeTimeoutError):
            await path.probe(timeout=0.3)
        (probe,) = _by_name(exp.get_finished_spans(), "quic.path.probe")
        assert probe.parent is None
        assert probe.status.status_code is StatusCode.ERROR
        assert any(e.name == "exception" for e in probe.events)
        # Each try is an event, numbered, at the time its challenge left, inside the span.
        tries = [e for e in probe.events if e.name == "quic.probe.try"]
        tries_attr = int(str(dict(probe.attributes or {})["quic.probe.tries"]))
        assert len(tries) == tries_attr >= 2
        assert [dict(e.attributes or {})["quic.probe.try"] for e in tries] == list(
            range(1, tries_attr + 1)
        )
        times = [e.timestamp for e in tries]
        assert times == sorted(times)
        assert probe.start_time is not None and probe.end_time is not None
        assert probe.start_time <= times[0] and times[-1] <= probe.end_time


async def test_switch_to_unvalidated_path_fails_the_migration_span(
    server: RigServer, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exp = exporter
    async with Supervisor(
        enable_experimental_connection_migration=True, tracer_provider=provider
    ) as sup:
        conn = await sup.dial(
            f"/ip4/127.0.0.1/udp/{server.port}/quic-v1", alpn_protocols=["echo"], verify=False
        )
        path = await conn.as_migratable().add_path("/ip4/127.0.0.2/udp/0/quic-v1")
        with pytest.raises(PathNotValidatedError):
            await path.switch()
        (migration,) = _by_name(exp.get_finished_spans(), "quic.migration")
        assert migration.status.status_code is StatusCode.ERROR
        assert dict(migration.attributes or {})["quic.migration.result"] == "failed"


async def test_two_supervisors_keep_their_spans_apart(server: RigServer, tmp_path: Path) -> None:
    exporters = []
    sups = []
    for _ in range(2):
        exp = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exp))
        exporters.append(exp)
        sups.append(
            Supervisor(enable_experimental_connection_migration=True, tracer_provider=provider)
        )
    conn_ids = []
    for sup in sups:
        await sup.start()
        conn = await sup.dial(
            f"/ip4/127.0.0.1/udp/{server.port}/quic-v1", alpn_protocols=["echo"], verify=False
        )
        path = await conn.as_migratable().add_path("/ip4/127.0.0.2/udp/0/quic-v1")
        await path.probe()
        await path.switch()
        conn_ids.append(conn.conn_id)
    for sup in sups:
        await sup.close()
    for exp, conn_id in zip(exporters, conn_ids, strict=True):
        ids = {
            dict(s.attributes or {}).get("quic.connection.id")
            for s in exp.get_finished_spans()
            if s.name == "quic.migration"
        }
        assert ids == {conn_id}


# ------------------------------------------------------------------------------ span trees


def _tree(spans: tuple[ReadableSpan, ...]) -> dict[str, list[str]]:
    """Span name -> sorted names of its children (every span of one trace)."""
    names = {s.context.span_id: s.name for s in spans}
    tree: dict[str, list[str]] = {s.name: [] for s in spans}
    for s in spans:
        if s.parent is not None and s.parent.span_id in names:
            tree[names[s.parent.span_id]].append(s.name)
    return {k: sorted(v) for k, v in tree.items()}


def _state_events(span: ReadableSpan) -> list[tuple[str, str, str]]:
    """(local address, old, new) of each quic.path.state_changed event of ``span``."""
    out = []
    for e in span.events:
        if e.name == "quic.path.state_changed":
            a = dict(e.attributes or {})
            out.append(
                (
                    str(a["quic.path.local_address"]),
                    str(a["quic.path.state.old"]),
                    str(a["quic.path.state.new"]),
                )
            )
    return out


async def test_successful_migration_carries_path_state_events(
    server: RigServer, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """Path state changes are events of the open migration span, not spans of their own."""
    provider, exp = exporter
    async with Supervisor(
        enable_experimental_connection_migration=True, tracer_provider=provider
    ) as sup:
        conn = await _dial(sup, server)
        mc = conn.as_migratable()
        old = mc.active_path().local_addr
        path = await mc.add_path("/ip4/127.0.0.2/udp/0/quic-v1")
        await path.probe()
        (probe,) = _by_name(exp.get_finished_spans(), "quic.path.probe")
        new = str(path.info().local_addr)
        assert _state_events(probe) == [(new, "new", "validating"), (new, "validating", "standby")]
        exp.clear()
        await path.switch()
        spans = exp.get_finished_spans()
        assert _tree(spans) == {"quic.migration": ["quic.path.switch"], "quic.path.switch": []}
        (migration,) = _by_name(spans, "quic.migration")
        assert _state_events(migration) == [
            (new, "standby", "active"),
            (str(old), "active", "standby"),
        ]


async def test_rollback_span_tree(
    server: RigServer, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """The peer answers the probe, then never reaches us on the new path: rolled back."""
    provider, exp = exporter
    async with (
        udp_shim(server.addr) as shim,
        Supervisor(enable_experimental_connection_migration=True, tracer_provider=provider) as sup,
    ):
        conn = await sup.dial(
            f"/ip4/127.0.0.1/udp/{shim.listen_addr[1]}/quic-v1",
            alpn_protocols=["echo"],
            verify=False,
        )
        mc = conn.as_migratable()
        old = str(mc.active_path().local_addr)
        path = await mc.add_path("/ip4/127.0.0.2/udp/0/quic-v1")
        local = path.info().local_addr
        new_addr = (local.value_for_protocol("ip4"), int(local.value_for_protocol("udp")))
        # The PATH_RESPONSE to the new address goes through; everything after it is dropped.
        shim.drop_to(new_addr, after=lambda stats: stats.forwarded_s2c >= 1)
        await path.probe()
        exp.clear()
        tracer = provider.get_tracer("test")
        with (
            tracer.start_as_current_span("caller") as caller,
            pytest.raises(MigrationRolledBackError),
        ):
            await path.switch()
        spans = exp.get_finished_spans()
        assert _tree(spans) == {
            "caller": ["quic.migration"],
            "quic.migration": ["quic.path.switch"],
            "quic.path.switch": [],
        }
        (migration,) = _by_name(spans, "quic.migration")
        (switch,) = _by_name(spans, "quic.path.switch")
        assert migration.parent is not None
        assert migration.parent.span_id == caller.get_span_context().span_id
        assert {s.context.trace_id for s in spans} == {caller.get_span_context().trace_id}
        attrs = dict(migration.attributes or {})
        assert attrs["quic.migration.result"] == "rolled_back"
        assert attrs["quic.migration.reason"] == "manual"
        assert dict(switch.attributes or {})["quic.switch.rolled_back"] is True
        for span in (migration, switch):
            assert span.status.status_code is StatusCode.ERROR
            (exc_event,) = [e for e in span.events if e.name == "exception"]
            assert dict(exc_event.attributes or {})["exception.type"].endswith(
                "MigrationRolledBackError"
            )
        new = str(local)
        assert _state_events(migration) == [
            (new, "standby", "active"),
            (old, "active", "standby"),
            (old, "standby", "active"),  # rolled back: the old path carries the connection again
            (new, "active", "standby"),
            (new, "standby", "failed"),
        ]


async def test_connection_closed_mid_probe_fails_the_probe_span(
    server: RigServer, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exp = exporter
    async with (
        udp_shim(server.addr) as shim,
        Supervisor(enable_experimental_connection_migration=True, tracer_provider=provider) as sup,
    ):
        conn = await sup.dial(
            f"/ip4/127.0.0.1/udp/{shim.listen_addr[1]}/quic-v1",
            alpn_protocols=["echo"],
            verify=False,
        )
        path = await conn.as_migratable().add_path("/ip4/127.0.0.2/udp/0/quic-v1")
        local = path.info().local_addr
        shim.drop_client_to_server(
            src=(local.value_for_protocol("ip4"), int(local.value_for_protocol("udp")))
        )
        async with event_log(sup, EvtPathStateChanged) as log:
            probe = asyncio.create_task(path.probe(timeout=10))
            await log.wait_for(lambda: any(e.new is PathState.VALIDATING for e in log.events))
        await conn.close()
        with pytest.raises(ConnectionClosedError):
            await probe
        (span,) = _by_name(exp.get_finished_spans(), "quic.path.probe")
        assert span.parent is None
        assert span.status.status_code is StatusCode.ERROR
        (exc_event,) = [e for e in span.events if e.name == "exception"]
        assert dict(exc_event.attributes or {})["exception.type"].endswith("ConnectionClosedError")


async def test_path_close_is_a_short_span_child_of_the_caller(
    server: RigServer, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exp = exporter
    tracer = provider.get_tracer("test")
    async with Supervisor(
        enable_experimental_connection_migration=True, tracer_provider=provider
    ) as sup:
        conn = await _dial(sup, server)
        path = await conn.as_migratable().add_path("/ip4/127.0.0.2/udp/0/quic-v1")
        local = str(path.info().local_addr)
        exp.clear()
        with tracer.start_as_current_span("caller") as caller:
            await path.close()
        await path.close()  # idempotent: a root span that removed nothing
        first, second = _by_name(exp.get_finished_spans(), "quic.path.close")
        assert first.parent is not None
        assert first.parent.span_id == caller.get_span_context().span_id
        assert second.parent is None
        for span, removed in ((first, True), (second, False)):
            attrs = dict(span.attributes or {})
            assert attrs["quic.connection.id"] == conn.conn_id
            assert attrs.get("quic.path.local_address") == (local if removed else None)
            assert attrs["quic.path.close.removed"] is removed
            assert span.status.status_code is not StatusCode.ERROR
        assert [e.name for e in first.events] == ["quic.path.state_changed", "quic.path.removed"]
        assert _state_events(first) == [(local, "new", "closed")]
        assert second.events == ()


# ------------------------------------------------------------------------------ qlog


async def test_qlog_files_are_named_by_conn_id(server: RigServer, tmp_path: Path) -> None:
    qlog_dir = tmp_path / "qlog"
    async with Supervisor(enable_experimental_connection_migration=True, qlog_dir=qlog_dir) as sup:
        conns = [await _dial(sup, server) for _ in range(2)]
        for conn in conns:
            await echo_roundtrip(conn)
        await conns[0].close()
        first = qlog_dir / f"{conns[0].conn_id}.qlog"
        assert first.exists()  # written when the connection ends, not at supervisor close
    names = sorted(p.name for p in qlog_dir.iterdir())
    assert names == sorted(f"{c.conn_id}.qlog" for c in conns)
    for conn in conns:
        doc = json.loads((qlog_dir / f"{conn.conn_id}.qlog").read_text())
        (trace,) = doc["traces"]
        assert trace["vantage_point"]["type"] == "client"
        assert trace["title"] == f"quic-supervisor connection {conn.conn_id}"
        names_seen = {e["name"] for e in trace["events"]}
        assert {"transport:packet_sent", "transport:packet_received"} <= names_seen
        assert isinstance(trace["common_fields"]["dropped_events"], int)  # said, even if 0


async def test_qlog_memory_is_capped(server: RigServer, tmp_path: Path) -> None:
    """Without a migration only the start's and the end's packet events are kept (at most
    ``window_events`` each, half the cap here): the rest are counted in the file, and the
    close is kept."""
    async with Supervisor(
        enable_experimental_connection_migration=True, qlog_dir=tmp_path, qlog_max_events=40
    ) as sup:
        conn = await _dial(sup, server)
        trace = connection_trace(connection_actor(conn).quic)
        assert isinstance(trace, BoundedTrace)
        assert trace.window_events == 20
        await echo_roundtrip(conn, size=256 * 1024)
        assert trace.packet_events <= 2 * 20 and trace.dropped > 0
        await conn.close()
    (doc,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.qlog")]
    (written,) = doc["traces"]
    dropped = written["common_fields"]["dropped_events"]
    assert dropped >= trace.dropped > 0
    assert f"{dropped} events dropped" in written["description"]
    packets = [e for e in written["events"] if is_packet_event(e)]
    assert len(packets) <= 2 * 20
    times = [e["time"] for e in written["events"]]
    assert times == sorted(times)
    frames = [f for e in written["events"] for f in e["data"].get("frames", [])]
    assert any(f["frame_type"] == "connection_close" for f in frames)  # the end kept


def test_qlog_writer_end_trace_and_close_are_idempotent(tmp_path: Path) -> None:
    writer = QlogDirectory(tmp_path, max_events=3).connection_logger("abc")
    trace = writer.start_trace(is_client=True, odcid=b"\x01\x02")
    for i in range(5):
        trace.log_event(category="transport", event="x", data={"i": i})
    writer.end_trace(trace)
    writer.end_trace(trace)  # aioquic's own end after ours: nothing more
    writer.close()
    assert writer.written == [tmp_path / "abc.qlog"]
    (written,) = json.loads((tmp_path / "abc.qlog").read_text())["traces"]
    assert [e["data"]["i"] for e in written["events"]] == [2, 3, 4]
    assert not list(tmp_path.glob(".*.tmp"))


async def test_qlog_shows_our_path_challenges(server: RigServer, tmp_path: Path) -> None:
    """Probes are built outside aioquic's send path; they must still appear in the qlog."""
    async with Supervisor(enable_experimental_connection_migration=True, qlog_dir=tmp_path) as sup:
        conn = await _dial(sup, server)
        path = await conn.as_migratable().add_path("/ip4/127.0.0.2/udp/0/quic-v1")
        await path.probe()
        await conn.close()
    (trace,) = json.loads((tmp_path / f"{conn.conn_id}.qlog").read_text())["traces"]
    sent_frames = [
        frame["frame_type"]
        for e in trace["events"]
        if e["name"] == "transport:packet_sent"
        for frame in e["data"]["frames"]
    ]
    assert "path_challenge" in sent_frames


async def test_path_bytes_offpath_drops_and_spare_cids_are_measured(server: RigServer) -> None:
    import socket

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])

    def points(name: str) -> list[object]:
        data = reader.get_metrics_data()
        return [
            pt
            for rm in (data.resource_metrics if data else [])
            for sm in rm.scope_metrics
            for m in sm.metrics
            if m.name == name
            for pt in m.data.data_points
        ]

    async with Supervisor(
        enable_experimental_connection_migration=True, meter_provider=provider
    ) as sup:
        conn = await _dial(sup, server)
        # The spare-CID gauge reads the live connection: a stock aioquic server gives 7.
        assert [pt.value for pt in points("quic.cid.spare")] == [7]  # type: ignore[attr-defined]
        local = conn.as_migratable().active_path().local_addr
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stray:
            stray.bind(("127.0.0.1", 0))
            for _ in range(3):
                stray.sendto(
                    b"not from the peer",
                    (local.value_for_protocol("ip4"), int(local.value_for_protocol("udp"))),
                )
            # Queued before the echo's answers on the same socket: read before it completes.
            await echo_roundtrip(conn, size=100_000)
        await conn.close()  # the paths leave their state: their traffic is reported
    dropped = points("quic.datagrams.dropped_offpath")
    assert sum(pt.value for pt in dropped) == 3  # type: ignore[attr-defined]
    by_key = {
        (
            dict(pt.attributes)["quic.path.state"],
            dict(pt.attributes)["network.io.direction"],
        ):  # type: ignore[attr-defined]
        pt.value  # type: ignore[attr-defined]
        for pt in points("quic.path.bytes")
    }
    assert by_key[("active", "transmit")] > 100_000
    assert by_key[("active", "receive")] > 100_000
    provider.shutdown()


async def test_journal_migration_records_carry_the_migration_trace(
    server: RigServer,
    tmp_path: Path,
    exporter: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    from telemetry.journal import read_journal

    provider, exp = exporter
    journal = tmp_path / "run.journal"
    async with Supervisor(
        enable_experimental_connection_migration=True, tracer_provider=provider, journal=journal
    ) as sup:
        conn = await _dial(sup, server)
        path = await conn.as_migratable().add_path("/ip4/127.0.0.2/udp/0/quic-v1")
        await path.probe()
        await path.switch()
    (migration,) = _by_name(exp.get_finished_spans(), "quic.migration")
    trace_id = format(migration.context.trace_id, "032x")
    records = {r["type"]: r for r in read_journal(journal) if r.get("kind") == "event"}
    for kind in ("ConnectionMigrationStarted", "ConnectionMigrationCompleted"):
        assert records[kind]["trace_id"] == trace_id, kind
