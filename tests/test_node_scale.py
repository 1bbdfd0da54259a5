"""Cost per connection at rest, on loopback: what a node with thousands of connections pays.

Counts, not durations (bench B4 measures CPU and memory): asyncio tasks per idle connection,
health groups per (local address, server), and that an idle node's health traffic is one
question per group and interval rather than one per path.
"""

from __future__ import annotations

import asyncio

from supervisor import FailoverPolicy, Supervisor
from supervisor.core.handles import Connection
from tests.rig.aioquic_server import RigServer
from tests.rig.waiting import poll_until
from tests.support import dial_echo, echo_roundtrip

N = 20
SECOND = "/ip4/127.0.0.2/udp/0/quic-v1"


async def _idle_node(sup: Supervisor, echo: RigServer) -> list[Connection]:
    conns: list[Connection] = []
    for _ in range(N):
        conn = await dial_echo(sup, echo)
        path = await conn.as_migratable().add_path(SECOND)
        await path.probe()
        conns.append(conn)
    return conns


async def test_an_idle_connection_with_two_paths_costs_at_most_two_tasks(
    echo: RigServer,
) -> None:
    """Three actors per connection (the connection and two paths) but no task sleeps for them:
    mailboxes park when empty, keep-alives and liveness looks are deadlines on the node's one
    timer. Counted at rest with failover on."""
    policy = FailoverPolicy(keepalive_interval=0.2)
    async with Supervisor(enable_experimental_connection_migration=True, failover=policy) as sup:
        before = len(asyncio.all_tasks())
        conns = await _idle_node(sup, echo)

        def per_connection() -> float:
            return (len(asyncio.all_tasks()) - before) / N

        await poll_until(lambda: per_connection() <= 2, timeout=10, what="tasks settle")
        status = await sup.health_status()
        # Two groups: (127.0.0.1, server) holds the active paths, (127.0.0.2, server) the
        # standby ones; one question per group and interval, whatever N is.
        assert status.groups == 2 and status.members == 2 * N
        before_asked = sum(status.keepalives.values())
        start = asyncio.get_running_loop().time()
        await asyncio.sleep(2.0)  # the window the traffic is counted over, not a sync wait
        elapsed = asyncio.get_running_loop().time() - start
        after = await sup.health_status()
        asked = sum(after.keepalives.values()) - before_asked
        # 2 groups at 5/s (jitter 20 %, and a starved loop fires late, never more often):
        # per-path keep-alives would be 2 x N x 5/s = 200/s.
        assert 0 < asked <= 2 * elapsed / 0.2 * 1.25 + 2, after.keepalives
        assert after.verdicts == {}
        assert per_connection() <= 2
        for conn in conns:
            await echo_roundtrip(conn)  # parked actors wake for work
