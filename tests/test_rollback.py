"""Rollback: the peer answers the probe on the new path but then never reaches us there.

A UDP forwarding shim sits between client and server; once the PATH_RESPONSE to the new client
address has gone through, it drops every further server->client datagram to that address. The
switch must not be confirmed: it rolls back to the old path within 3 x PTO, raises
MigrationRolledBackError, emits EvtConnectionMigrationFailed, and no stream byte is lost.
"""

from __future__ import annotations

from actors.path_state import PathState
from supervisor import Supervisor
from supervisor.core.errors import MigrationRolledBackError
from supervisor.core.events import (
    EvtConnectionMigrationCompleted,
    EvtConnectionMigrationFailed,
    EvtConnectionMigrationStarted,
)
from tests.rig.aioquic_server import RigServer
from tests.rig.udp_shim import udp_shim
from tests.support import ChecksummedStream, addr_of, dial_echo, event_log


async def test_switch_rolls_back_when_the_peer_never_reaches_the_new_path(
    sup: Supervisor, echo: RigServer
) -> None:
    async with udp_shim(echo.addr) as shim:
        conn = await dial_echo(sup, shim.listen_addr)
        mc = conn.as_migratable()
        [old] = mc.paths()
        stream = await ChecksummedStream(conn).start()
        await stream.advance()
        new = await mc.add_path("/ip4/127.0.0.2/udp/0/quic-v1")
        new_addr = addr_of(new.info().local_addr)
        # Let the first server->client datagram to the new address (the PATH_RESPONSE) through,
        # then drop everything else to it.
        rule = shim.drop_to(new_addr, after=lambda stats: stats.forwarded_s2c >= 1)
        await new.probe()
        assert new.info().state is PathState.STANDBY
        await stream.advance()

        async with event_log(
            sup,
            EvtConnectionMigrationStarted,
            EvtConnectionMigrationCompleted,
            EvtConnectionMigrationFailed,
        ) as log:
            try:
                await new.switch()
            except MigrationRolledBackError as exc:
                error = exc
            else:
                raise AssertionError("the switch was confirmed on a dead path")
            await log.wait_for(lambda: len(log.events) == 2)
        assert error.to_local_addr is not None and str(new_addr[1]) in str(error.to_local_addr)
        assert rule.dropped > 0, "the server did answer on the new path (and was dropped)"
        assert shim.stats_for(new_addr).forwarded_c2s > 1  # the client did send there

        started, failed = log.events
        assert isinstance(started, EvtConnectionMigrationStarted)
        assert isinstance(failed, EvtConnectionMigrationFailed)
        assert (failed.from_local_addr, failed.to_local_addr) == (
            old.info().local_addr,
            new.info().local_addr,
        )
        assert failed.reason == "manual" and failed.connection_closed is False
        assert failed.error

        # Back on the old path, which carries the stream on.
        assert mc.active_path().local_addr == old.info().local_addr
        assert old.info().state is PathState.ACTIVE
        assert new.info().state is PathState.FAILED
        relay_of_old = shim.upstream_addr(addr_of(old.info().local_addr))
        info = echo.connections[0]
        await stream.advance(256 * 1024)
        await echo.wait_for(lambda: info.current_peer() == relay_of_old, 5, "server back")
        assert shim.stats_for(new_addr).forwarded_s2c == 1
        await stream.advance()

        # The path works once the network does: re-probe, switch, and still nothing is lost.
        shim.remove_rule(rule)
        await new.probe()
        await new.switch()
        await stream.advance()
        assert mc.active_path().local_addr == new.info().local_addr
        await stream.finish()
