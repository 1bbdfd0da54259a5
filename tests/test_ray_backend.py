"""The Ray backend on a real local Ray cluster: handles, traces, drain, restart, lookup errors,
listen, metrics and the streamed events.

One ``ray.init`` per module (~4 s on a 2-core machine; printed by the fixture). The QUIC echo
server runs in this test process on loopback; each agent is a separate worker process that
dials it, so every datagram goes between two processes, never through Ray. The fixture kills
every actor left in its namespace (a failed test does not reach its own ``kill``) and shuts Ray
down, so nothing detached outlives the module.
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
from supervisor.core.events import (  # noqa: E402
    EvtConnectionMigrationCompleted,
    EvtConnectionMigrationStarted,
)
from supervisor.remote.fleet import (  # noqa: E402
    Fleet,
    HandlerNotRemoteError,
    RemoteSupervisor,
    SocketNotTransferableError,
    StreamsNotRemoteError,
    SupervisorNotFoundError,
    SupervisorUnavailableError,
)
from supervisor.remote.protocol import ErrorReply  # noqa: E402
from supervisor.remote.ray_agent import KV_NAMESPACE, Restored, kv_prefix  # noqa: E402
from tests.rig.aioquic_server import RigServer, echo_server  # noqa: E402
from tests.rig.certs import generate_cert  # noqa: E402
from tests.rig.waiting import poll_until  # noqa: E402
from tests.support import local_ray_fleet  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with local_ray_fleet("qs-test") as fleet:
        yield fleet


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
    # Switch mid-transfer: once echoed bytes are back (echo_wait returns progress on timeout).
    while (progress := await sup.echo_wait(job, timeout=0.05)).received == 0:
        assert not progress.done, progress
    assert not progress.done and progress.received < nbytes, progress

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

    bad_reply = msgpack.packb({"v": 99, "type": "remote.Ok", "body": {}}, use_bin_type=True)
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
    assert "no path off" in (rb.failed[0].error or "")

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
    events = await sup.events_since()
    assert any(isinstance(e, Restored) and e.conn_id == conn.conn_id for e in events.events)
    await again.close()  # forgets the desired state too
    sup.kill()


def _record_of(sup: RemoteSupervisor, conn_id: str) -> dict[str, Any] | None:
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(
        kv_prefix(sup.namespace, sup.label) + conn_id, namespace=KV_NAMESPACE
    )
    return None if raw is None else dict(msgpack.unpackb(raw, raw=False))


def test_the_ray_internals_the_desired_state_writes_with_exist(fleet: Fleet) -> None:
    """DesiredState writes through these (Ray's own async KV calls): a Ray upgrade that renames
    them must fail here, not silently stop recording."""
    from ray.experimental import internal_kv

    client = internal_kv.global_gcs_client
    for name in ("async_internal_kv_put", "async_internal_kv_del"):
        assert callable(getattr(client, name, None)), name


async def test_desired_state_follows_each_change_written_behind_the_reply(
    fleet: Fleet, server: RigServer
) -> None:
    sup = await _started(fleet, "behind")
    conn = await sup.dial(_remote(server), alpn_protocols=["echo"], verify=False)
    mc = conn.as_migratable()
    extra = await mc.add_path("/ip4/127.0.0.2/udp/0/quic-v1")
    await extra.probe()
    dialled = next(p for p in mc.paths() if p.info().active)
    for target, index in ((extra, 1), (dialled, 0), (extra, 1)):
        await target.switch()
        await poll_until(
            lambda index=index: (_record_of(sup, conn.conn_id) or {}).get("active") == index,
            timeout=10,
            what=f"the recorded active path to become {index}",
        )
    record = _record_of(sup, conn.conn_id)
    assert record is not None and [p["index"] for p in record["paths"]] == [0, 1]
    await conn.close()
    await poll_until(
        lambda: _record_of(sup, conn.conn_id) is None, timeout=10, what="the record deleted"
    )
    sup.kill()


async def test_migrate_by_address_is_one_request(fleet: Fleet, server: RigServer) -> None:
    """``RemoteSupervisor.migrate`` adds, probes and switches in the agent: one Ray call."""
    sup = await _started(fleet, "one-call")
    conn = await sup.dial(_remote(server), alpn_protocols=["echo"], verify=False)
    calls: list[str] = []
    real = sup._remote

    async def counted(method: str, *args: Any, timeout: float | None = None) -> Any:
        calls.append(method)
        return await real(method, *args, timeout=timeout)

    sup._remote = counted  # type: ignore[method-assign]
    snap = await sup.migrate(conn.conn_id, "/ip4/127.0.0.2/udp/0/quic-v1")
    assert calls == ["ask"]
    assert "/127.0.0.2/" in next(p for p in snap.paths if p.active).local_addr
    assert snap.conn_id == conn.conn_id  # the stable id the client holds
    with pytest.raises(ValueError, match="migration target"):
        await sup.migrate(conn.conn_id, "/ip4/127.0.0.2/tcp/1")
    assert calls == ["ask"]  # refused here, before any call
    await conn.close()
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


async def test_listen_via_handle_then_dial_from_another_agent_and_migrate(
    fleet: Fleet, tmp_path: Path
) -> None:
    cert = generate_cert(tmp_path)  # files on this node, which is the agents' node too
    srv = await _started(fleet, "listen", persist=False)
    cli = await _started(fleet, "dialer", persist=False)
    with pytest.raises(HandlerNotRemoteError, match="cannot be sent"):
        await srv.listen("/ip4/127.0.0.1/udp/0/quic-v1", certfile=cert.certfile, handler=print)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a built-in stream handler"):
        await srv.listen("/ip4/127.0.0.1/udp/0/quic-v1", certfile=cert.certfile, handler="nope")

    lst = await srv.listen(
        "/ip4/127.0.0.1/udp/0/quic-v1",
        certfile=cert.certfile,
        keyfile=cert.keyfile,
        alpn_protocols=["echo"],
    )
    assert str(lst.multiaddr).startswith("/ip4/127.0.0.1/udp/")
    assert int(str(lst.multiaddr).split("/")[4]) > 0  # the bound port, not 0
    assert (await srv.info()).listeners == 1

    conn = await cli.dial(lst.multiaddr, alpn_protocols=["echo"], verify=False)
    mc = conn.as_migratable()
    path = await mc.add_path("/ip4/127.0.0.2/udp/0/quic-v1")
    await path.probe(timeout=5.0)
    nbytes = 1_000_000
    job = await cli.echo(conn.conn_id, nbytes, chunk=16384, pace=0.002)  # ~0.15 s of data
    await path.switch()  # while the echo runs: the listener's echo handler sees both paths
    report = await cli.echo_wait(job, timeout=60)
    assert report.done and report.intact and report.received == nbytes, report

    info = await lst.refresh()
    assert info.connections == 1 and info.handler == "echo"
    ports = {a.split("/")[2]: a for a in info.peer_addresses}
    assert set(ports) == {"127.0.0.1", "127.0.0.2"}, info.peer_addresses
    assert ports["127.0.0.2"] == str(path.info().local_addr)

    await conn.close()
    await lst.close()
    assert (await srv.info()).listeners == 0 and await srv.listeners() == []
    srv.kill()
    cli.kill()


async def test_metrics_reflect_a_migration_through_the_handle(
    fleet: Fleet, server: RigServer
) -> None:
    sup = await _started(fleet, "metrics", persist=False)
    before = await sup.metrics()
    assert before.connections == 0 and before.migrations == {} and before.probe_rtt.count == 0
    assert before.migration_stats.ended == 0 and before.migration_stats.success_rate is None

    conn = await sup.dial(_remote(server), alpn_protocols=["echo"], verify=False)
    path = await conn.as_migratable().add_path("/ip4/127.0.0.2/udp/0/quic-v1")
    await path.probe(timeout=5.0)
    await path.switch()
    job = await sup.echo(conn.conn_id, 100_000)  # bytes on the new path
    assert (await sup.echo_wait(job)).intact

    m = await sup.metrics()
    assert m.label == sup.label and m.since == (await sup.info()).started
    assert m.connections == 1
    assert m.paths_by_state == {"active": 1, "standby": 1}, m.paths_by_state
    assert m.migrations == {"manual": {"completed": 1}}, m.migrations
    assert m.migration_stats.completed == 1 and m.migration_stats.success_rate == 1.0
    assert m.rollbacks == {} and m.probe_failures == {}
    rtt = m.probe_rtt
    assert rtt.count >= 1 and rtt.min is not None and rtt.max is not None
    assert 0 < rtt.min <= (rtt.mean or 0) <= rtt.max < 1.0
    assert rtt.p50 is not None and rtt.p99 is not None and rtt.p50 <= rtt.p99 <= rtt.max
    by_addr = {p.local_addr: p for p in m.paths}
    assert set(by_addr) == {str(conn.local_multiaddr), str(path.info().local_addr)}
    new = by_addr[str(path.info().local_addr)]
    assert new.active and new.conn_id == conn.conn_id and new.rtt is not None
    assert new.bytes_sent >= 100_000 and new.bytes_received >= 100_000
    assert all(p.bytes_sent > 0 and p.bytes_received > 0 for p in m.paths)
    await conn.close()
    assert (await sup.metrics()).connections == 0
    sup.kill()


async def test_events_stream_yields_a_migration_in_order_and_ends_on_cancel(
    fleet: Fleet, server: RigServer
) -> None:
    sup = await _started(fleet, "events", persist=False)
    conn = await sup.dial(_remote(server), alpn_protocols=["echo"], verify=False)
    path = await conn.as_migratable().add_path("/ip4/127.0.0.2/udp/0/quic-v1")
    await path.probe(timeout=5.0)

    stream = sup.events(EvtConnectionMigrationStarted, EvtConnectionMigrationCompleted)
    await path.switch()
    started = await anext(stream)
    completed = await anext(stream)
    assert isinstance(started, EvtConnectionMigrationStarted), started
    assert isinstance(completed, EvtConnectionMigrationCompleted), completed
    for evt in (started, completed):
        assert evt.conn_id == conn.conn_id and evt.reason == "manual"
        assert str(evt.to_local_addr) == str(path.info().local_addr)
    assert started.time <= completed.time and completed.probe_rtt is not None
    assert stream.cursor > 0 and stream.lost == 0
    assert (await sup.info()).event_streams == 1

    # A consumer cancelled while it waits (nothing more happens) cancels the agent's generator.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(stream), timeout=0.5)
    await stream.aclose()  # returns once the remote generator has ended
    assert (await sup.info()).event_streams == 0
    assert [e async for e in stream] == []

    # The cursor variant resumes where the stream stopped; nothing happened since.
    batch = await sup.events_since(stream.cursor)
    assert batch.events == () and batch.cursor == stream.cursor
    async with sup.events(cursor=0) as again:  # replays the log from the start
        first = await anext(again)
        assert first is not None
    assert (await sup.info()).event_streams == 0
    await conn.close()
    sup.kill()


def test_start_up_cost_is_reported(fleet: Fleet) -> None:
    """Keeps the module's ray.init cost in the -s output next to the tests that use it."""
    assert ray.is_initialized()
    assert os.environ.get("RAY_ADDRESS") is None or fleet.namespace
