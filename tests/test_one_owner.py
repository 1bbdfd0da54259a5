"""One owner per fact: the connection decides, orders and publishes; callers read what it did.

Concurrent add_path calls get their own handles (the reply names the path made); a switch
cancelled anywhere leaves one active path and nothing leaked (the cancellation waits for the
rollback); the re-probe of a stale target uses the caller's (or the failover policy's)
timeout, decided once, in the connection.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path as FsPath

import pytest

from actors.factory import ConnectionOptions
from actors.path_state import PathState
from supervisor import FailoverPolicy, Supervisor
from supervisor.core.errors import ConnectionClosedError, ProbeTimeoutError
from supervisor.core.events import EvtConnectionMigrationCompleted
from telemetry.journal import read_journal
from tests.rig.aioquic_server import RigServer
from tests.rig.udp_shim import udp_shim
from tests.support import (
    ChecksummedStream,
    addr_of,
    connection_actor,
    dial_echo,
    echo_roundtrip,
    event_log,
    fd_count,
    other_tasks,
    supervisor_actor,
)

P2 = "/ip4/127.0.0.2/udp/0/quic-v1"
P3 = "/ip4/127.0.0.3/udp/0/quic-v1"


async def test_concurrent_add_paths_get_their_own_handles(
    sup: Supervisor, echo: RigServer
) -> None:
    conn = await dial_echo(sup, echo)
    mc = conn.as_migratable()
    for _ in range(1000):
        a, b = await asyncio.gather(mc.add_path(P2), mc.add_path(P3))
        assert a.path_id != b.path_id
        assert a.info().local_addr.value_for_protocol("ip4") == "127.0.0.2"
        assert b.info().local_addr.value_for_protocol("ip4") == "127.0.0.3"
        await asyncio.gather(a.close(), b.close())
    assert len(mc.available_paths()) == 1
    await echo_roundtrip(conn)


async def test_concurrent_duplicate_port0_add_paths_make_one_path(
    sup: Supervisor, echo: RigServer
) -> None:
    """Both pass the supervisor's check from the same view; the connection's queue decides."""
    conn = await dial_echo(sup, echo)
    mc = conn.as_migratable()
    fds = fd_count()
    results = await asyncio.gather(mc.add_path(P2), mc.add_path(P2), return_exceptions=True)
    made = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(made) == 1 and len(refused) == 1
    assert type(refused[0]).__name__ == "PathAlreadyExistsError"
    assert len(mc.available_paths()) == 2
    assert fd_count() == fds + 1  # the refused socket was closed


async def test_cancelled_switches_leave_one_active_path_and_nothing_leaked(
    sup: Supervisor, echo: RigServer
) -> None:
    rng = random.Random(9)
    conn = await dial_echo(sup, echo)
    mc = conn.as_migratable()
    stream = await ChecksummedStream(conn).start()
    paths = [mc.paths()[0], await mc.add_path(P2), await mc.add_path(P3)]
    for p in paths[1:]:
        await p.probe()
    await stream.advance()
    quic = connection_actor(conn).quic
    fds, tasks, spare = fd_count(), other_tasks(), quic.spare_peer_cids
    cancelled = completed = 0
    for _ in range(200):
        target = rng.choice([p for p in paths if not p.info().active])
        switch = asyncio.ensure_future(target.switch())
        for _ in range(rng.randrange(0, 400)):  # cancel at a random point of the switch
            await asyncio.sleep(0)
        switch.cancel()
        try:
            await switch
            completed += 1
        except asyncio.CancelledError:
            cancelled += 1
        # The cancellation returned after the rollback: views already agree, no polling.
        infos = mc.available_paths()
        assert [i.state for i in infos].count(PathState.ACTIVE) == 1
        assert sum(i.active for i in infos) == 1
        snap = sup.live_snapshot(conn.conn_id)
        assert snap is not None
        assert [(p.local_addr, p.state) for p in snap.paths] == [
            (str(i.local_addr), i.state) for i in infos
        ]
        assert all(i.state in (PathState.ACTIVE, PathState.STANDBY) for i in infos)
    print(f"\n200 switches: {cancelled} cancelled, {completed} completed before the cancel")
    assert cancelled > 0 and completed > 0
    await stream.advance()
    await stream.finish()
    async with asyncio.timeout(10):  # retired CIDs come back one round trip later
        while quic.spare_peer_cids != spare:
            await echo_roundtrip(conn, size=16)
    assert fd_count() == fds
    assert other_tasks() - tasks == set()


async def test_stale_target_reprobe_uses_the_callers_timeout(echo: RigServer) -> None:
    """A stale target that answers slowly: the caller's probe_timeout decides, not a default."""
    options = ConnectionOptions(stale_after=0.0)  # every target is stale: always re-probed
    async with (
        udp_shim(echo.addr) as shim,
        Supervisor(enable_experimental_connection_migration=True, options=options) as sup,
    ):
        conn = await dial_echo(sup, shim.listen_addr)
        mc = conn.as_migratable()
        path = await mc.add_path(P2)
        await path.probe()
        # The path goes quiet for a while: its re-probe is answered only once this lifts.
        rule = shim.drop_client_to_server(addr_of(path.info().local_addr))
        with pytest.raises(ProbeTimeoutError) as caught:
            await path.switch(probe_timeout=0.25)
        assert caught.value.timeout == 0.25
        assert path.info().state is PathState.FAILED
        assert mc.active_path().local_addr == conn.local_multiaddr
        shim.remove_rule(rule)
        await path.probe()
        result = await path.switch(probe_timeout=3.0)
        assert result.reprobed
        assert result.to_addr == str(path.info().local_addr)
        assert mc.active_path().local_addr == path.info().local_addr
        await echo_roundtrip(conn)


async def test_failover_reprobe_uses_the_policys_timeout(echo: RigServer, tmp_path: FsPath) -> None:
    policy = FailoverPolicy(keepalive_interval=0.2, failures_to_fail=2, probe_timeout=0.7)
    journal = tmp_path / "j.msgpack"
    async with (
        udp_shim(echo.addr) as shim,
        Supervisor(
            enable_experimental_connection_migration=True,
            failover=policy,
            options=ConnectionOptions(stale_after=0.0),
            journal=journal,
        ) as sup,
    ):
        conn = await dial_echo(sup, shim.listen_addr)
        mc = conn.as_migratable()
        second = await mc.add_path(P2)
        await second.probe()
        async with event_log(sup, EvtConnectionMigrationCompleted) as log:
            stream = await ChecksummedStream(conn).start()
            await stream.advance()
            first = addr_of(conn.local_multiaddr)
            shim.drop_client_to_server(first)
            shim.drop_server_to_client(first)
            await log.wait_for(lambda: log.of(EvtConnectionMigrationCompleted), timeout=10)
            await stream.advance()
            await stream.finish()
    switches = [
        r["body"] for r in read_journal(journal) if r.get("type") == "SwitchRequest"
    ]
    assert switches and all(s["probe_timeout"] == 0.7 for s in switches), switches
    assert all(s["reason"] == "failover" for s in switches)


async def test_a_crashed_supervisor_actor_is_logged_and_fails_every_later_call(
    echo: RigServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with Supervisor(enable_experimental_connection_migration=True) as sup:
        conn = await dial_echo(sup, echo)
        actor = supervisor_actor(sup)
        actor.ref.tell(object())  # a message it has no handler for: the actor fails
        await actor.ref.wait_stopped()
        assert "the supervisor actor crashed" in caplog.text
        with pytest.raises(ConnectionClosedError, match="it crashed"):
            await dial_echo(sup, echo)
        with pytest.raises(ConnectionClosedError, match="it crashed"):
            await conn.as_migratable().add_path(P2)
