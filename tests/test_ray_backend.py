"""The Ray backend on a real local Ray cluster: handles, traces, drain, restart, lookup errors.

One ``ray.init`` per module (it costs ~7 s on a 2-core machine; printed by the fixture). The
QUIC echo server runs in this test process on loopback; each agent is a separate worker
process that dials it, so every datagram goes between two processes, never through Ray.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

from actors.envelope import EnvelopeError, decode  # noqa: E402
from actors.errors import PathNotValidatedError  # noqa: E402
from supervisor.fleet import (  # noqa: E402
    Fleet,
    RemoteSupervisor,
    SocketNotTransferableError,
    StreamsNotRemoteError,
    SupervisorNotFoundError,
    SupervisorUnavailableError,
)
from supervisor.ray_backend import ErrorReply, Restored  # noqa: E402
from tests.rig.aioquic_server import RigServer, echo_server  # noqa: E402
from tests.rig.certs import generate_cert  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    namespace = f"qs-test-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    ray.init(
        include_dashboard=False,
        num_cpus=2,
        namespace=namespace,
        logging_level="warning",
        log_to_driver=False,
    )
    print(f"\nray.init took {time.monotonic() - started:.2f}s")
    try:
        yield Fleet(namespace, timeout=30)
    finally:
        started = time.monotonic()
        ray.shutdown()
        print(f"ray.shutdown took {time.monotonic() - started:.2f}s")


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RigServer]:
    cert = generate_cert(tmp_path)
    async with echo_server(certfile=cert.certfile, keyfile=cert.keyfile) as srv:
        yield srv


def _remote(server: RigServer) -> str:
    return f"/ip4/127.0.0.1/udp/{server.port}/quic-v1"


async def _started(fleet: Fleet, label: str, **kwargs: Any) -> RemoteSupervisor:
    sup = fleet.start_agent(label=f"{label}-{uuid.uuid4().hex[:6]}", **kwargs)
    await sup.info()  # waits for the worker process and its restore pass
    return sup


async def test_migrate_through_handle_loses_nothing_and_is_one_trace(
    fleet: Fleet, server: RigServer
) -> None:
    sup = await _started(fleet, "mig", capture_spans=True)
    conn = await sup.dial(_remote(server), alpn_protocols=["echo"], verify=False)
    mc = conn.as_migratable()
    assert mc.supports_migration()
    assert str(mc.active_path().local_addr).startswith("/ip4/127.0.0.1/udp/")
    path = await mc.add_path("/ip4/127.0.0.2/udp/0/quic-v1")
    await path.probe(timeout=5.0)
    assert path.info().rtt is not None

    nbytes = 2_000_000
    job = await sup.echo(conn.conn_id, nbytes, chunk=16384, pace=0.002)
    await asyncio.sleep(0.2)  # mid-transfer

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span("caller") as caller:
        await path.switch()
    assert path.info().active
    assert str(mc.active_path().local_addr).startswith("/ip4/127.0.0.2/udp/")

    report = await sup.echo_wait(job, timeout=60)
    assert report.done and report.intact, report
    assert report.sent == report.received == nbytes
    assert ("127.0.0.2", int(str(path.info().local_addr).split("/")[4])) in server.peer_addresses()

    spans = await sup.finished_spans()
    migration = [s for s in spans if s["name"] == "quic.migration"]
    assert len(migration) == 1, [s["name"] for s in spans]
    ctx = caller.get_span_context()
    assert migration[0]["trace_id"] == f"{ctx.trace_id:032x}"
    assert migration[0]["parent_span_id"] == f"{ctx.span_id:016x}"

    with pytest.raises(StreamsNotRemoteError):
        await conn.open_stream()
    with pytest.raises(SocketNotTransferableError):
        await mc.add_path(sock=object())
    await conn.close()
    assert await sup.snapshot() == []
    sup.kill()


async def test_typed_errors_and_version_skew_cross_ray(fleet: Fleet, server: RigServer) -> None:
    sup = await _started(fleet, "err", persist=False)
    conn = await sup.dial(_remote(server), alpn_protocols=["echo"], verify=False)
    path = await conn.as_migratable().add_path("/ip4/127.0.0.2/udp/0/quic-v1")
    with pytest.raises(PathNotValidatedError) as err:
        await path.switch()  # never probed
    assert "127.0.0.2" in str(err.value)

    newer = msgpack.packb({"v": 99, "type": "sup.Snapshot", "body": {}}, use_bin_type=True)
    reply = decode(await sup.call(newer)).body
    assert isinstance(reply, ErrorReply) and reply.type == "EnvelopeError"
    assert "newer than this receiver" in reply.message

    bad_reply = msgpack.packb({"v": 99, "type": "fleet.Ok", "body": {}}, use_bin_type=True)
    with pytest.raises(EnvelopeError, match="newer than this receiver"):
        decode(bad_reply)
    sup.kill()


async def test_fleet_drain_across_two_agents(fleet: Fleet, server: RigServer) -> None:
    a = await _started(fleet, "drain-a", persist=False, capture_spans=True)
    b = await _started(fleet, "drain-b", persist=False)
    conns = {}
    for sup, other in ((a, "127.0.0.3"), (b, "127.0.0.4")):
        conn = await sup.dial(_remote(server), alpn_protocols=["echo"], verify=False)
        await conn.as_migratable().add_path(f"/ip4/{other}/udp/0/quic-v1")  # probed by drain
        conns[sup.label] = conn
    lone = await b.dial(_remote(server), alpn_protocols=["echo"], verify=False)  # no other path

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span("drain") as caller:
        reports = await fleet.drain(local_addr="127.0.0.1")
    assert set(reports) >= {a.label, b.label}
    ra, rb = reports[a.label], reports[b.label]
    assert not isinstance(ra, BaseException) and not isinstance(rb, BaseException)
    assert [m.conn_id for m in ra.moved] == [conns[a.label].conn_id]
    assert ra.moved[0].to_addr is not None and "/127.0.0.3/" in ra.moved[0].to_addr
    assert [m.conn_id for m in rb.moved] == [conns[b.label].conn_id]
    assert [m.conn_id for m in rb.failed] == [lone.conn_id]
    assert "no other path" in (rb.failed[0].error or "")

    for label, conn in conns.items():
        snap = await conn.refresh()  # type: ignore[attr-defined]
        active = next(p for p in snap.paths if p.active)
        assert "/127.0.0.1/" not in active.local_addr, (label, active)
    spans = [s for s in await a.finished_spans() if s["name"] == "quic.migration"]
    assert [s["attributes"].get("quic.migration.reason") for s in spans] == ["drain"]
    assert spans[0]["parent_span_id"] == f"{caller.get_span_context().span_id:016x}"
    a.kill()
    b.kill()


async def test_killed_agent_restarts_and_restores_its_connections(
    fleet: Fleet, server: RigServer
) -> None:
    sup = await _started(fleet, "restart")
    first = await sup.info()
    conn = await sup.dial(_remote(server), alpn_protocols=["echo"], verify=False)
    path = await conn.as_migratable().add_path("/ip4/127.0.0.2/udp/0/quic-v1")
    await path.probe()
    await path.switch()

    sup.kill(no_restart=False)
    deadline = time.monotonic() + 60
    info = None
    while time.monotonic() < deadline:
        try:
            info = await sup.info()
            if info.pid != first.pid:
                break
        except SupervisorUnavailableError:
            pass
        await asyncio.sleep(0.2)
    assert info is not None and info.pid != first.pid, "the agent did not restart"
    assert [r.conn_id for r in info.restored] == [conn.conn_id]
    restored = info.restored[0]
    assert restored.ok and restored.paths == 2, restored
    assert restored.active is not None and "/127.0.0.2/" in restored.active

    again = await sup.connection(conn.conn_id)  # the same id the client held
    snap = await again.refresh()
    assert not snap.closed and len(snap.paths) == 2
    assert "/127.0.0.2/" in next(p for p in snap.paths if p.active).local_addr
    events = await sup.events()
    assert any(isinstance(e, Restored) and e.conn_id == conn.conn_id for e in events.events)
    await again.close()  # forgets the desired state too
    sup.kill()


async def test_missing_and_dead_supervisors_fail_clearly(fleet: Fleet) -> None:
    with pytest.raises(SupervisorNotFoundError, match=fleet.namespace) as err:
        fleet.get_supervisor("no-such-node")
    assert "no-such-node" in str(err.value)

    sup = await _started(fleet, "dead", persist=False)
    assert sup.label in fleet.labels()
    sup.kill(no_restart=True)
    with pytest.raises(SupervisorUnavailableError, match=sup.name):
        for _ in range(50):
            await sup.info()
            await asyncio.sleep(0.1)
    deadline = time.monotonic() + 10
    while sup.label in fleet.labels() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    with pytest.raises(SupervisorNotFoundError):
        fleet.get_supervisor(sup.label)


def test_start_up_cost_is_reported(fleet: Fleet) -> None:
    """Keeps the module's ray.init cost in the -s output next to the tests that use it."""
    assert ray.is_initialized()
    assert os.environ.get("RAY_ADDRESS") is None or fleet.namespace
