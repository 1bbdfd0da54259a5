"""What a Ray handle costs: request round trips and migrations, via a handle vs in-process.

    python -m bench.ray_overhead [--calls 500] [--migrations 50]

Starts a local Ray cluster (no dashboard), a listener agent serving echo (the QUIC peer of both
clients, in its own process so neither client shares a loop with it), and a dialer agent. The
in-process client is a ``Supervisor`` in this process dialling the same listener. Prints JSON:
ray.init and agent start-up seconds, then p50/p99/mean in milliseconds of

- ``call``: one snapshot request (``SnapshotRequest(conn_id)``) through ``RemoteSupervisor.ask``
  (envelope + Ray actor call) vs ``Supervisor.ask`` (envelope + in-process mailbox);
- ``migration``: ``Path.switch()`` alternating between two validated paths (the switch waits for
  the peer's confirmation), through the handle vs in-process.

Figures depend on the machine; the JSON records the CPU count and the Ray version.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from supervisor.cli.demo import self_signed_cert
from supervisor.core.handles import Connection
from supervisor.core.messages import SnapshotRequest
from supervisor.orchestration.supervisor import Supervisor


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000

    return {
        "n": len(ordered),
        "p50_ms": round(pct(0.5), 3),
        "p99_ms": round(pct(0.99), 3),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 3),
    }


async def _timed(n: int, op: Callable[[int], Awaitable[Any]], warmup: int = 0) -> list[float]:
    for i in range(warmup):
        await op(i)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await op(i)
        out.append(time.perf_counter() - t0)
    return out


async def _migrations(conn: Connection, n: int) -> list[float]:
    """``n`` switches alternating between the dialled path and one on 127.0.0.2."""
    mc = conn.as_migratable()
    extra = await mc.add_path("/ip4/127.0.0.2/udp/0/quic-v1")
    await extra.probe()
    paths = mc.paths()
    assert len(paths) == 2, paths
    first = next(p for p in paths if p.info().active)
    order = [extra, first]
    return await _timed(n, lambda i: order[i % 2].switch())


async def _run(calls: int, migrations: int) -> dict[str, Any]:
    import ray

    from supervisor.remote.fleet import Fleet

    namespace = f"bench-{os.getpid()}"
    t0 = time.perf_counter()
    ray.init(
        include_dashboard=False,
        namespace=namespace,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    ray_init = time.perf_counter() - t0
    fleet = Fleet(namespace, timeout=60)
    agents = []
    try:
        t0 = time.perf_counter()
        server = fleet.start_agent(label="listener", persist=False)
        await server.info()  # the worker process is up and its supervisor started
        agent_start = time.perf_counter() - t0
        agents.append(server)
        dialer = fleet.start_agent(label="dialer", persist=False)
        agents.append(dialer)
        await dialer.info()

        with tempfile.TemporaryDirectory() as tmp:
            certfile, keyfile = self_signed_cert(tmp)
            listener = await server.listen(
                "/ip4/127.0.0.1/udp/0/quic-v1",
                certfile=certfile,
                keyfile=keyfile,
                alpn_protocols=["echo"],
            )
            target = listener.multiaddr

            remote = await dialer.dial(target, alpn_protocols=["echo"], verify=False)
            remote_call = await _timed(
                calls, lambda _i: dialer.ask(SnapshotRequest(remote.conn_id)), warmup=20
            )
            remote_mig = await _migrations(remote, migrations)
            await remote.close()

            async with Supervisor(enable_experimental_connection_migration=True) as local_sup:
                local = await local_sup.dial(target, alpn_protocols=["echo"], verify=False)
                local_call = await _timed(
                    calls, lambda _i: local_sup.ask(SnapshotRequest(local.conn_id)), warmup=20
                )
                local_mig = await _migrations(local, migrations)
                await local.close()
    finally:
        for agent in agents:
            agent.kill()
        ray.shutdown()

    def compare(handle: list[float], in_process: list[float]) -> dict[str, Any]:
        h, i = _summary(handle), _summary(in_process)
        return {
            "handle": h,
            "in_process": i,
            "overhead_p50_ms": round(h["p50_ms"] - i["p50_ms"], 3),
            "overhead_p99_ms": round(h["p99_ms"] - i["p99_ms"], 3),
        }

    return {
        "ray_version": ray.__version__,
        "cpus": os.cpu_count(),
        "ray_init_s": round(ray_init, 3),
        "agent_start_s": round(agent_start, 3),
        "call": compare(remote_call, local_call),
        "migration": compare(remote_mig, local_mig),
    }


def main(calls: int = 500, migrations: int = 50) -> dict[str, Any]:
    return asyncio.run(_run(calls, migrations))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--migrations", type=int, default=50)
    args = parser.parse_args()
    print(json.dumps(main(args.calls, args.migrations), indent=2))
