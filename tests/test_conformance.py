"""RFC 9000 conformance of client migration (sections 8-9), against real peers and a shim.

Validation by a response on any path (§8.2.2-8.2.3): a peer that answers our PATH_CHALLENGE
on its active path (msquic does) still validates the probed path, flagged asymmetric; the
switch confirmation is then the return-direction check: it completes when the peer follows to
the new path and rolls back when it does not.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from actors.factory import ConnectionOptions
from actors.path_state import PathState
from supervisor import Supervisor
from supervisor.core.errors import (
    MigrationRolledBackError,
    PathNotValidatedError,
    ProbeTimeoutError,
)
from supervisor.core.events import EvtConnectionMigrationFailed, EvtPathStateChanged
from tests.rig.aioquic_server import RigServer
from tests.rig.retire import raise_retire_prior_to
from tests.rig.udp_shim import UdpShim, udp_shim
from tests.support import (
    ChecksummedStream,
    addr_of,
    connection_actor,
    dial_echo,
    echo_roundtrip,
    event_log,
)

P2 = "/ip4/127.0.0.2/udp/0/quic-v1"
P3 = "/ip4/127.0.0.3/udp/0/quic-v1"


@pytest_asyncio.fixture
async def shim(echo: RigServer) -> AsyncIterator[UdpShim]:
    async with udp_shim(echo.addr) as s:
        yield s


async def test_a_response_on_the_old_path_validates_asymmetric(shim: UdpShim) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with Supervisor(
        enable_experimental_connection_migration=True, tracer_provider=provider
    ) as sup:
        conn = await dial_echo(sup, shim.listen_addr)
        mc = conn.as_migratable()
        home = addr_of(conn.local_multiaddr)
        stream = await ChecksummedStream(conn).start()
        await stream.advance()

        # The peer follows: probe answered on the old socket, then the switch confirmed.
        follows = await mc.add_path(P2)
        shim.redirect_to(addr_of(follows.info().local_addr), home)
        await follows.probe(timeout=5)
        info = follows.info()
        assert info.asymmetric and info.rtt is not None
        (probe,) = [s for s in exporter.get_finished_spans() if s.name == "quic.path.probe"]
        assert (probe.attributes or {})["quic.path.validation.asymmetric"] is True
        shim.clear_redirect(addr_of(follows.info().local_addr))
        result = await follows.switch()
        assert result.to_addr == str(follows.info().local_addr)
        assert mc.active_path().local_addr == follows.info().local_addr
        await stream.advance()

        # The peer never reaches the new socket: validated (asymmetric), but rolled back.
        stays = await mc.add_path(P3)
        shim.redirect_to(addr_of(stays.info().local_addr), addr_of(follows.info().local_addr))
        await stays.probe(timeout=5)
        assert stays.info().asymmetric
        with pytest.raises(MigrationRolledBackError):
            await stays.switch()
        assert mc.active_path().local_addr == follows.info().local_addr
        await stream.advance()
        await stream.finish()
        await echo_roundtrip(conn)
    provider.shutdown()


async def test_a_response_on_the_probed_path_is_not_asymmetric(
    sup: Supervisor, echo: RigServer
) -> None:
    conn = await dial_echo(sup, echo)
    path = await conn.as_migratable().add_path(P2)
    await path.probe()
    assert not path.info().asymmetric


# -- outcomes: every migration ends as exactly one ---------------------------------------------


async def test_each_failed_migration_has_one_outcome_on_event_span_and_stats(
    shim: UdpShim,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    options = ConnectionOptions(stale_after=0.0)  # targets re-probed: probe_timeout is reachable
    async with Supervisor(
        enable_experimental_connection_migration=True, tracer_provider=provider, options=options
    ) as sup:
        conn = await dial_echo(sup, shim.listen_addr)
        mc = conn.as_migratable()
        async with event_log(sup, EvtConnectionMigrationFailed) as log:
            # rejected: never probed.
            unprobed = await mc.add_path(P2)
            with pytest.raises(PathNotValidatedError):
                await unprobed.switch()
            # probe_timeout: the re-probe of the stale target is never answered.
            quiet = await mc.add_path(P3)
            await quiet.probe()
            rule = shim.drop_client_to_server(addr_of(quiet.info().local_addr))
            with pytest.raises(ProbeTimeoutError):
                await quiet.switch(probe_timeout=0.3)
            shim.remove_rule(rule)
            # rolled_back: answered probes, but the peer never reaches the new socket.
            mute = await mc.add_path("/ip4/127.0.0.4/udp/0/quic-v1")
            shim.redirect_to(addr_of(mute.info().local_addr), addr_of(conn.local_multiaddr))
            await mute.probe()
            with pytest.raises(MigrationRolledBackError):
                await mute.switch()
            await log.wait_for(lambda: len(log.of(EvtConnectionMigrationFailed)) == 3, 5)
            outcomes = [e.outcome for e in log.of(EvtConnectionMigrationFailed)]
        assert outcomes == ["rejected", "probe_timeout", "rolled_back"]
        spans = [s for s in exporter.get_finished_spans() if s.name == "quic.migration"]
        assert [(s.attributes or {}).get("quic.migration.outcome") for s in spans] == outcomes
        assert [(s.attributes or {}).get("quic.migration.result") for s in spans] == [
            "failed",
            "failed",
            "rolled_back",
        ]
        # And one that completes: 1 of 4 ended well.
        shim.clear_redirect(addr_of(mute.info().local_addr))
        await quiet.probe()
        await quiet.switch()
        stats = await sup.migration_stats()
        assert stats.failed == {"rejected": 1, "probe_timeout": 1, "rolled_back": 1}
        assert stats.completed == 1 and stats.success_rate == 0.25
    provider.shutdown()


async def test_a_cancelled_migration_ends_as_cancelled(shim: UdpShim) -> None:
    async with Supervisor(enable_experimental_connection_migration=True) as sup:
        conn = await dial_echo(sup, shim.listen_addr)
        mc = conn.as_migratable()
        path = await mc.add_path(P2)
        await path.probe()
        # The peer's packets never reach the new socket: the switch waits for its window.
        shim.redirect_to(addr_of(path.info().local_addr), addr_of(conn.local_multiaddr))
        async with event_log(sup, EvtConnectionMigrationFailed, EvtPathStateChanged) as log:
            switching = asyncio.ensure_future(path.switch())
            await log.wait_for(
                lambda: any(
                    e.new is PathState.ACTIVE and e.local_addr == path.info().local_addr
                    for e in log.of(EvtPathStateChanged)
                ),
                5,
            )
            switching.cancel()
            with pytest.raises(asyncio.CancelledError):
                await switching
            (failed,) = log.of(EvtConnectionMigrationFailed)
        assert failed.outcome == "cancelled" and not failed.connection_closed
        assert (await sup.migration_stats()).failed == {"cancelled": 1}


def test_outcome_mapping_covers_every_outcome() -> None:
    from supervisor.core.errors import (
        ConnectionClosedError,
        MigrationNotSupportedError,
        NoConnectionIdError,
    )
    from supervisor.core.events import OUTCOMES
    from supervisor.orchestration.supervisor_actor import outcome_of
    from telemetry.metrics import OUTCOMES as METRIC_OUTCOMES

    cases = {
        asyncio.CancelledError(): "cancelled",
        ConnectionClosedError("c"): "connection_closed",
        MigrationRolledBackError("a", "b", timeout=0.2): "rolled_back",
        ProbeTimeoutError("a", timeout=1.0): "probe_timeout",
        NoConnectionIdError("a"): "no_connection_id",
        MigrationNotSupportedError("disable_active_migration"): "peer_disabled",
        PathNotValidatedError("a"): "rejected",
    }
    assert {outcome_of(e, closed=False) for e in cases} == OUTCOMES == METRIC_OUTCOMES
    for exc, outcome in cases.items():
        assert outcome_of(exc, closed=False) == outcome
    assert outcome_of(MigrationRolledBackError("a", "b", timeout=0.2), closed=True) == (
        "connection_closed"
    )


# -- the CID budget: Retire Prior To mid-connection ---------------------------------------------


async def test_retire_prior_to_gives_every_path_a_fresh_cid(
    sup: Supervisor, echo: RigServer
) -> None:
    """RFC 9000 §5.1.2: the server asks us to retire every CID it issued before; the active
    path moves to a fresh one, each standby gets a fresh one at its next probe, and
    migration goes on (quic-go users saw migrations stall for want of CIDs)."""
    conn = await dial_echo(sup, echo)
    mc = conn.as_migratable()
    stream = await ChecksummedStream(conn).start()
    standby = await mc.add_path(P2)
    await standby.probe()
    quic = connection_actor(conn).quic
    before = dict(quic.path_cids())
    server = echo.connections[0].quic
    first = raise_retire_prior_to(server, fresh=5)
    await stream.advance()  # carries the frames both ways, and our RETIRE_CONNECTION_IDs
    await echo_roundtrip(conn)
    after = quic.path_cids()
    assert after[0] != before[0]  # the active path left the retired CID
    assert after.get(standby.path_id) is None  # retired: a fresh one at the next probe
    await standby.probe()
    fresh = quic.path_cids()[standby.path_id]
    assert fresh is not None and fresh not in before.values()
    assert all(
        cid.sequence_number >= first
        for cid in quic._peer_cid_available  # test-only introspection
    )
    await standby.switch()
    await stream.advance()
    assert mc.active_path().local_addr == standby.info().local_addr
    assert mc.spare_connection_ids() >= 1
    await stream.finish()
