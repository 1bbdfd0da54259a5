"""``quic-supervisor fleet network`` through real Ray agents (``tests/test_ray_backend.py``'s
module fixtures: one local Ray cluster for this module, the echo server in this process).

The agents run in this host's namespace, so an agent started with ``network=True`` sees ``lo``
and learns the route to the echo server (127.0.0.1) through it; one without says why not.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")

from supervisor.cli import main
from supervisor.remote.fleet import Fleet, RemoteSupervisor
from tests.rig.aioquic_server import RigServer
from tests.test_ray_backend import fleet, server  # noqa: F401  (the module's fixtures)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]

GUARD = 30.0


async def _routed(sup: RemoteSupervisor, peer: str) -> None:
    """Until the agent's monitor has dumped the namespace and learnt the route to ``peer``."""
    async with asyncio.timeout(GUARD):
        while True:
            status = await sup.network_status()
            if status.available and any(r.peer == peer for r in status.routes):
                return
            await asyncio.sleep(0.05)  # polled: the status has no change notification


async def test_fleet_network_shows_each_agents_monitor(
    fleet: Fleet,  # noqa: F811
    server: RigServer,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    tag = uuid.uuid4().hex[:6]
    watched = fleet.start_agent(label=f"net-{tag}", persist=False, network=True)
    plain = fleet.start_agent(label=f"plain-{tag}", persist=False)
    await asyncio.gather(watched.info(), plain.info())
    conn = await watched.dial(
        f"/ip4/127.0.0.1/udp/{server.port}/quic-v1", alpn_protocols=["echo"], verify=False
    )
    await _routed(watched, "127.0.0.1")
    argv = ["fleet", "network", "--address", "local", "--namespace", fleet.namespace]

    assert await asyncio.to_thread(main, argv) == 0
    table = capsys.readouterr().out
    assert await asyncio.to_thread(main, [*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)

    assert f"{watched.label}: network monitor in its own network namespace" in table, table
    assert f"{plain.label}: network monitor not running: no network policy" in table, table
    lo_row = next(line for line in table.splitlines() if line.split()[:1] == ["lo"])
    assert "127.0.0.1/8" in lo_row and "1 (1 active)" in lo_row, table
    route = next(line for line in table.splitlines() if line.split()[:1] == ["127.0.0.1"])
    assert route.split() == ["127.0.0.1", "lo", "127.0.0.1"], table

    assert set(data) == {watched.label, plain.label}
    mine = data[watched.label]
    lo = next(i for i in mine["interfaces"] if i["name"] == "lo")
    assert "127.0.0.1/8" in lo["addresses"]
    assert {"peer": "127.0.0.1", "interface": "lo", "source": "127.0.0.1"} in mine["routes"]
    assert mine["paths_by_interface"] == {"lo": {"paths": 1, "active": 1}}
    assert data[plain.label]["available"] is False
    assert "no network policy" in data[plain.label]["unavailable_reason"]

    await conn.close()
    watched.kill()
    plain.kill()
