"""An idle connection stays open against a peer with a short idle timeout (DESIGN §8): one
PING on the active path a third into the idle period (the smaller of both sides' timeouts; a
js-libp2p peer uses 10 s), from the connection's own timer, no task."""

from __future__ import annotations

import asyncio

from actors.factory import ConnectionOptions
from supervisor import Supervisor
from supervisor.core.events import EvtPathRemoved
from tests.rig.aioquic_server import echo_server
from tests.rig.certs import CertPair
from tests.support import addr_of, dial_echo, echo_roundtrip, event_log

PEER_IDLE = 1.0  # seconds: the server's max_idle_timeout (ours stays at 30 s)


async def test_an_idle_connection_outlives_the_peers_idle_timeout(cert: CertPair) -> None:
    async with (
        echo_server(certfile=cert.certfile, keyfile=cert.keyfile, idle_timeout=PEER_IDLE) as srv,
        Supervisor() as sup,
    ):
        conn = await dial_echo(sup, srv)
        await echo_roundtrip(conn)
        me = addr_of(conn.local_multiaddr)
        before = srv.connections[0].datagrams_from[me]
        # Idle for four of the peer's idle periods: the time passing is the test, not a wait
        # for something to happen.
        await asyncio.sleep(4 * PEER_IDLE)
        assert not conn.is_closed
        assert not srv.connections[0].closed
        pings = srv.connections[0].datagrams_from[me] - before
        assert 4 <= pings <= 4 * 3 + 2, pings  # about one per third of a period, no storm
        await echo_roundtrip(conn)


async def test_without_the_keepalive_an_idle_connection_ends(cert: CertPair) -> None:
    options = ConnectionOptions(idle_keepalive=False)
    async with (
        echo_server(certfile=cert.certfile, keyfile=cert.keyfile, idle_timeout=PEER_IDLE) as srv,
        Supervisor(options=options) as sup,
    ):
        async with event_log(sup, EvtPathRemoved) as log:
            conn = await dial_echo(sup, srv)
            await echo_roundtrip(conn)
            await log.wait_for(lambda: log.of(EvtPathRemoved), timeout=10 * PEER_IDLE)
        assert conn.is_closed
