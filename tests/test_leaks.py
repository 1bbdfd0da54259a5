"""Nothing leaks: open fds, asyncio tasks and spare peer CIDs return to their baseline after
1,000 add/probe/close cycles on one connection."""

from __future__ import annotations

import asyncio

from supervisor import Supervisor
from tests.rig.aioquic_server import RigServer
from tests.support import connection_actor, dial_echo, echo_roundtrip, fd_count, other_tasks

CYCLES = 1000


async def test_thousand_add_probe_close_cycles_leak_nothing(
    sup: Supervisor, echo: RigServer
) -> None:
    conn = await dial_echo(sup, echo)
    mc = conn.as_migratable()
    [home] = mc.paths()
    actor = connection_actor(conn)
    quic = actor.quic
    await echo_roundtrip(conn)  # every CID the server issued has arrived
    fds, tasks, spare = fd_count(), other_tasks(), quic.spare_peer_cids
    assert spare == 7

    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(CYCLES):
        path = await mc.add_path(f"/ip4/127.0.0.{2 + i % 2}/udp/0/quic-v1")
        await path.probe(timeout=5)
        await path.close()
    elapsed = loop.time() - started
    print(
        f"\n{CYCLES} add/probe/close cycles: {elapsed:.2f}s ({elapsed / CYCLES * 1000:.2f} ms each)"
    )

    # The peer replenishes each retired CID one round trip after our RETIRE_CONNECTION_ID.
    async with asyncio.timeout(10):
        while quic.spare_peer_cids != spare or quic.pending_retires:
            await echo_roundtrip(conn, size=16)
    assert fd_count() == fds
    assert other_tasks() - tasks == set()
    assert len(actor._paths) == 1 and quic.path_count == 1
    assert len(mc.available_paths()) == 1
    # Nothing piles up per cycle in the bookkeeping either.
    assert [p.path_id for p in sup.live_snapshot(conn.conn_id).paths] == [home.path_id]
    del path
    assert list(mc._paths) == [home.path_id]  # no handle of a closed path is kept alive
    await echo_roundtrip(conn)
