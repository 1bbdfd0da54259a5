"""A fleet on a real multi-node Ray cluster on one host: a head and two worker nodes.

``ray.cluster_utils.Cluster`` runs three raylets (``num_cpus=1`` each, no dashboard, all on
127.0.0.1) for the whole module; the driver (this process) joins the head. One agent is pinned
to each node, and the QUIC echo server runs in this process on loopback, so every agent dials
it from another process. The tests run in file order: the destructive ones last (a worker node
removed, then ``ray.shutdown()``). The fixture kills what is left and shuts the cluster down.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")

from ray.cluster_utils import Cluster  # noqa: E402

from supervisor.cli.main import main  # noqa: E402
from supervisor.remote.fleet import (  # noqa: E402
    Fleet,
    FleetDisconnectedError,
    RemoteSupervisor,
    SupervisorNodeLostError,
    SupervisorNotFoundError,
    SupervisorUnavailableError,
)
from tests.rig.aioquic_server import RigServer, echo_server  # noqa: E402
from tests.rig.certs import generate_cert  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(120)]

SECOND = "/ip4/127.0.0.2/udp/0/quic-v1"
THIRD = "/ip4/127.0.0.3/udp/0/quic-v1"


@dataclass
class Nodes:
    cluster: Cluster
    fleet: Fleet
    head: str  # node ids
    workers: list[str]
    worker_nodes: list[Any]  # the Cluster's node objects, for remove_node
    agents: dict[str, RemoteSupervisor]  # by node id, filled by the first test
    conns: dict[str, str]  # node id -> the connection its agent dialled


@pytest.fixture(scope="module")
def nodes() -> Iterator[Nodes]:
    # On a host whose eth0 has an address Ray would rewrite 127.0.0.1 to it without this: the
    # variable for the nodes' processes, the constant it was read into for this one.
    from ray._private import ray_constants

    saved = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    saved_constant = ray_constants.ENABLE_RAY_CLUSTER
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    namespace = f"qs-multi-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    args: dict[str, Any] = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**args, "include_dashboard": False})
    try:
        workers = [cluster.add_node(**args) for _ in range(2)]
        ray.init(
            address=cluster.address,
            namespace=namespace,
            logging_level="warning",
            log_to_driver=False,
        )
        cluster.wait_for_nodes()
        assert cluster.head_node is not None
        print(f"\n3-node cluster up in {time.monotonic() - started:.2f}s")
        yield Nodes(
            cluster,
            Fleet(namespace, timeout=30),
            cluster.head_node.node_id,
            [w.node_id for w in workers],
            workers,
            {},
            {},
        )
    finally:
        started = time.monotonic()
        if ray.is_initialized():
            for a in ray.util.list_named_actors(all_namespaces=True):
                if a["namespace"] == namespace:  # detached: they would outlive this driver
                    ray.kill(ray.get_actor(a["name"], namespace=namespace), no_restart=True)
            ray.shutdown()
        cluster.shutdown()  # every node's processes, the agents' workers included
        current = Path("/tmp/ray/ray_current_cluster")  # would point later ray.init()s here
        if current.exists() and current.read_text().strip() == cluster.address:
            current.unlink()
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved
        print(f"cluster down in {time.monotonic() - started:.2f}s")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RigServer]:
    cert = generate_cert(tmp_path_factory.mktemp("cert"))
    async with echo_server(certfile=cert.certfile, keyfile=cert.keyfile) as srv:
        yield srv


async def _cli(capsys: pytest.CaptureFixture[str], nodes: Nodes, *argv: str) -> tuple[int, str]:
    """``quic-supervisor fleet ARGV`` in-process (a thread: ``main`` runs its own loop) on this
    process's cluster."""
    ns = ("--address", "local", "--namespace", nodes.fleet.namespace)
    capsys.readouterr()  # what the test printed before is not the command's
    code = await asyncio.to_thread(main, ["fleet", *argv, *ns])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out if code == 0 else out + err


def _ip(local_addr: object) -> str:
    return str(local_addr).split("/")[2]


def _active(conn_json: dict[str, Any]) -> list[str]:
    return [_ip(p["local_addr"]) for p in conn_json["paths"] if p["state"] == "active"]


@pytest.mark.asyncio(loop_scope="module")
async def test_an_agent_per_node_and_the_fleet_commands_across_nodes(
    nodes: Nodes, server: RigServer, capsys: pytest.CaptureFixture[str]
) -> None:
    every = [nodes.head, *nodes.workers]
    for node in every:
        nodes.agents[node] = nodes.fleet.start_agent(node)
    infos = {node: await nodes.agents[node].info() for node in every}
    assert {n: i.node_id for n, i in infos.items()} == {n: n for n in every}
    assert len({i.pid for i in infos.values()}) == 3  # three worker processes, one per node
    assert sorted(nodes.fleet.labels()) == sorted(every)

    remote = f"/ip4/127.0.0.1/udp/{server.port}/quic-v1"
    for node in every:
        conn = await nodes.agents[node].dial(remote, alpn_protocols=["echo"], verify=False)
        await (await conn.as_migratable().add_path(SECOND)).probe(timeout=5.0)
        nodes.conns[node] = conn.conn_id

    code, out = await _cli(capsys, nodes, "ls", "--json")
    assert code == 0, out
    rows = {r["node_id"]: r for r in json.loads(out)}
    assert rows.keys() == set(every) and all(r["connections"] == 1 for r in rows.values()), rows

    # migrate finds the agent holding the connection by asking every node; the API too.
    head_conn, w1_conn, w2_conn = (nodes.conns[n] for n in every)
    code, out = await _cli(capsys, nodes, "migrate", w1_conn, "--to", SECOND)
    assert code == 0 and out.startswith(f"{w1_conn}: active path /ip4/127.0.0.2/"), out
    await nodes.agents[nodes.workers[1]].migrate(w2_conn, SECOND)

    code, out = await _cli(capsys, nodes, "paths", "--json")
    assert code == 0, out
    paths = json.loads(out)
    assert {label: [_active(c) for c in conns] for label, conns in paths.items()} == {
        nodes.head: [["127.0.0.1"]],
        nodes.workers[0]: [["127.0.0.2"]],
        nodes.workers[1]: [["127.0.0.2"]],
    }

    # A fleet-wide drain through the API moves the head's connection off 127.0.0.1 ...
    reports = await nodes.fleet.drain(local_addr="/ip4/127.0.0.1")
    assert reports.keys() == set(every)
    assert all(not isinstance(r, BaseException) for r in reports.values()), reports
    assert [o.conn_id for o in reports[nodes.head].moved] == [head_conn]  # type: ignore[union-attr]
    # ... and one through the CLI moves every node's connection to a third path at once.
    for node in every:
        conn = await nodes.agents[node].connection(nodes.conns[node])
        await (await conn.as_migratable().add_path(THIRD)).probe(timeout=5.0)
    code, out = await _cli(capsys, nodes, "drain", "--local-addr", "127.0.0.2", "--json")
    assert code == 0, out
    drained = json.loads(out)
    assert {label: r["counts"]["moved"] for label, r in drained.items()} == dict.fromkeys(every, 1)
    for node in every:
        snap = await (await nodes.agents[node].connection(nodes.conns[node])).refresh()
        assert [_ip(p.local_addr) for p in snap.paths if p.active] == ["127.0.0.3"]
        assert "127.0.0.2" not in {_ip(p.local_addr) for p in snap.paths}  # drained: closed


@pytest.mark.asyncio(loop_scope="module")
async def test_a_worker_nodes_agent_killed_is_restored_there(nodes: Nodes) -> None:
    node = nodes.workers[0]
    agent = nodes.agents[node]
    first = await agent.info()
    before = await (await agent.connection(nodes.conns[node])).refresh()
    agent.kill(no_restart=False)
    async with asyncio.timeout(60):
        while True:
            try:
                again = await agent.info()
                if again.pid != first.pid:
                    break
            except SupervisorUnavailableError as exc:
                assert not isinstance(exc, SupervisorNodeLostError), exc  # the node is alive
            await asyncio.sleep(0.1)  # polled: a restarting actor has no readiness event
    assert again.node_id == node  # pinned: restarted on its own node
    (restored,) = again.restored
    assert restored.conn_id == nodes.conns[node] and restored.ok, restored
    assert restored.paths == len(before.paths), (restored, before)
    assert restored.active is not None and _ip(restored.active) == "127.0.0.3"
    after = await (await agent.connection(nodes.conns[node])).refresh()
    assert sorted(_ip(p.local_addr) for p in after.paths) == sorted(
        _ip(p.local_addr) for p in before.paths
    )


@pytest.mark.asyncio(loop_scope="module")
async def test_a_removed_nodes_handles_fail_at_once_with_a_typed_error(
    nodes: Nodes, capsys: pytest.CaptureFixture[str]
) -> None:
    gone, alive = nodes.workers[1], nodes.workers[0]
    agent = nodes.agents[gone]
    conn = await agent.connection(nodes.conns[gone])
    path = conn.as_migratable().paths()[0]
    looked_up = nodes.fleet.get_supervisor(gone)  # a handle made before the node left
    nodes.cluster.remove_node(nodes.worker_nodes[1])

    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "info": agent.info,
        "snapshot": agent.snapshot,
        "connections": agent.connections,
        "connection": lambda: agent.connection(nodes.conns[gone]),
        "metrics": agent.metrics,
        "migration_stats": agent.migration_stats,
        "network_status": agent.network_status,
        "listeners": agent.listeners,
        "events_since": agent.events_since,
        "finished_spans": agent.finished_spans,
        "drain": lambda: agent.drain(local_addr="127.0.0.3"),
        "migrate": lambda: agent.migrate(nodes.conns[gone], SECOND),
        "dial": lambda: agent.dial("/ip4/127.0.0.1/udp/9/quic-v1", verify=False),
        "listen": lambda: agent.listen("/ip4/127.0.0.1/udp/0/quic-v1"),
        "conn.refresh": conn.refresh,
        "conn.close": conn.close,
        "path.probe": path.probe,
        "looked_up.info": looked_up.info,
        "events stream": lambda: anext(aiter(agent.events())),
    }
    took = {}
    for name, call in calls.items():
        started = time.monotonic()
        with pytest.raises(SupervisorNodeLostError) as caught:
            await call()
        took[name] = time.monotonic() - started
        assert caught.value.node_id == gone, name
        assert gone in str(caught.value) and "quic-supervisor agent" in str(caught.value), name
    print(f"\nfailures after the node left: max {max(took.values()) * 1000:.1f} ms", took)
    assert max(took.values()) < 5.0, took  # at once: nothing waits for the 30 s timeout

    survivor = nodes.agents[alive]
    reports = await nodes.fleet.drain(local_addr="127.0.0.9", supervisors=[agent, survivor])
    assert isinstance(reports[gone], SupervisorNodeLostError), reports
    assert not isinstance(reports[alive], BaseException), reports

    # The fleet no longer lists the lost agent; the others carry on.
    assert sorted(nodes.fleet.labels()) == sorted([nodes.head, alive])
    with pytest.raises(SupervisorNotFoundError):
        nodes.fleet.get_supervisor(gone)
    code, out = await _cli(capsys, nodes, "ls", "--json")
    rows = {r["label"]: r for r in json.loads(out)}
    assert code == 0 and rows.keys() == {nodes.head, alive}, out
    assert rows[alive]["node_id"] == alive and rows[alive]["connections"] == 1, out


@pytest.mark.asyncio(loop_scope="module")
async def test_an_open_event_stream_never_starts_ray_after_shutdown(nodes: Nodes) -> None:
    agent = nodes.agents[nodes.head]
    stream = agent.events()
    first = await anext(stream)  # the generator runs in the agent
    assert first is not None
    other = agent.events()  # another one, never read
    ray.shutdown()
    del stream, other
    gc.collect()  # their finalizers run now, without Ray
    assert not ray.is_initialized()

    late = RemoteSupervisor(agent.handle, label="late", namespace=nodes.fleet.namespace)
    for call in (late.info, late.finished_spans):
        with pytest.raises(FleetDisconnectedError, match="not connected to Ray"):
            await call()
    with pytest.raises(FleetDisconnectedError):
        late.kill()
    with pytest.raises(FleetDisconnectedError):
        late.events()
    with pytest.raises(FleetDisconnectedError):
        nodes.fleet.labels()
    with pytest.raises(FleetDisconnectedError):
        nodes.fleet.start_agent(nodes.head)
    assert not ray.is_initialized()
