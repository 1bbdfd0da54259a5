"""Many idle connections against a peer with a short idle timeout (issue "node scale 1").

A js-libp2p peer closes a connection after 10 s without a packet. Each idle connection sends
one PING on its active path a third into its idle period (the smaller of both sides' timeouts:
here the peer's 10 s, ours being 30 s), from its own timer on the node, and the peer's ACK
starts the next period. 50 such connections, failover on (so the health groups also run), are
left idle for 60 s: every one is still open at the end and carries a round trip.

Marked slow: the 60 s are the duration under test. The wait ends early, and the test fails,
as soon as any connection closes on either side.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from supervisor import FailoverPolicy, Supervisor
from supervisor.core.events import EvtPathRemoved
from supervisor.core.handles import Connection
from tests.rig.aioquic_server import ConnectionInfo, RigServer, echo_server
from tests.rig.certs import CertPair
from tests.support import addr_of, dial_echo, echo_roundtrip, event_log

pytestmark = pytest.mark.slow

N = 50
PEER_IDLE = 10.0  # the server's max_idle_timeout; ours stays at the dial default, 30 s
IDLE_FOR = 60.0
PARALLEL = 16
GUARD = 30.0
#: Idle PINGs per connection over IDLE_FOR. One per period, a period lasting a third of
#: PEER_IDLE (3.33 s) plus the ACK's round trip and any lateness of the timer: at most
#: IDLE_FOR / (PEER_IDLE / 3) + 1 = 19 (a group PING only restarts the period, later). At
#: least: with a timer 1 s late every time (4.4 s periods) 13, less up to 2 periods restarted
#: by the failover group's PINGs (the group asks one of the 50 per second: each ~50 s apart),
#: so 11; a PING two thirds into the period (the wrong fraction) would give ~9.
MOST = IDLE_FOR / (PEER_IDLE / 3) + 1
LEAST = 11


def _server_side(srv: RigServer, conn: Connection) -> ConnectionInfo:
    me = addr_of(conn.local_multiaddr)
    (info,) = [c for c in srv.connections if me in c.peer_addresses]
    return info


async def test_50_idle_connections_outlive_a_10s_peer_idle_timeout_for_60s(
    cert: CertPair,
) -> None:
    loop = asyncio.get_running_loop()
    async with (
        echo_server(certfile=cert.certfile, keyfile=cert.keyfile, idle_timeout=PEER_IDLE) as srv,
        Supervisor(
            enable_experimental_connection_migration=True, failover=FailoverPolicy()
        ) as sup,
    ):
        gate = asyncio.Semaphore(PARALLEL)

        async def dial() -> Connection:
            async with gate:
                conn = await dial_echo(sup, srv, timeout=GUARD)
                await echo_roundtrip(conn, timeout=GUARD)
                return conn

        conns = list(await asyncio.gather(*(dial() for _ in range(N))))
        peers = [_server_side(srv, c) for c in conns]
        me = [addr_of(c.local_multiaddr) for c in conns]
        sent_before = [p.datagrams_from[a] for p, a in zip(peers, me, strict=True)]
        idle_before = (await sup.health_status()).keepalives.get("idle", 0)

        async with event_log(sup, EvtPathRemoved) as log:

            def ended() -> bool:
                return bool(log.of(EvtPathRemoved)) or any(p.closed for p in peers)

            t0 = loop.time()
            # The idle period under test; it ends early if a connection closes on either side
            # (the server's notifier wakes on its connections' termination).
            with contextlib.suppress(TimeoutError):
                await srv.wait_for(ended, timeout=IDLE_FOR, what="a connection closed")
            idled = loop.time() - t0

        status = await sup.health_status()
        idle = status.keepalives.get("idle", 0) - idle_before
        sent = [p.datagrams_from[a] - b for p, a, b in zip(peers, me, sent_before, strict=True)]
        print(
            f"\n[idle-many] N={N} idled_s={idled:.1f} idle_pings={idle} "
            f"per_conn={idle / N:.1f} datagrams_per_conn min={min(sent)} max={max(sent)} "
            f"keepalives={status.keepalives} verdicts={status.verdicts} "
            f"lag_s={status.loop_lag_s}"
        )
        assert log.of(EvtPathRemoved) == [], "a connection closed while idle"
        assert not any(p.closed for p in peers), "the peer closed a connection while idle"
        assert idled >= IDLE_FOR - 0.5, idled
        assert not any(c.is_closed for c in conns)
        assert len(sup.connections()) == N
        # Every connection was kept alive by its own datagrams (idle or group PINGs: surviving
        # at all needs one per PEER_IDLE, 6; a third into the period gives ~17).
        assert min(sent) >= LEAST, sent
        assert N * LEAST <= idle <= N * MOST, (idle, N * LEAST, N * MOST)
        assert status.verdicts == {}, status  # nothing was judged dead meanwhile
        await asyncio.gather(*(echo_roundtrip(c, timeout=GUARD) for c in conns))
        for conn in conns:
            await conn.close()
