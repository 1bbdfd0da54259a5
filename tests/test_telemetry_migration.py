"""The span tree a migration produces, against a real aioquic server on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from supervisor import Supervisor
from supervisor.errors import PathNotValidatedError, ProbeTimeoutError
from tests.rig.aioquic_server import RigServer, echo_server
from tests.rig.certs import CertPair, generate_cert
from tests.rig.udp_shim import udp_shim


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


async def _dial(sup: Supervisor, server: RigServer) -> object:
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
        assert int(str(dict(probe.attributes or {})["quic.probe.tries"])) >= 2


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
