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


Sample = Callable[[], Awaitable[Any]]


async def _interleaved(
    n: int, ops: dict[str, Sample], block: int = 10, warmup: int = 0
) -> dict[str, list[float]]:
    """``n`` timed calls of each op, taken in alternating blocks of ``block``, so a load change
    on this shared host falls on both sides of a comparison alike."""
    for op in ops.values():
        for _ in range(warmup):
            await op()
    out: dict[str, list[float]] = {name: [] for name in ops}
    while any(len(v) < n for v in out.values()):
        for name, op in ops.items():
            for _ in range(min(block, n - len(out[name]))):
                t0 = time.perf_counter()
                await op()
                out[name].append(time.perf_counter() - t0)
    return out


class _Switcher:
    """Switches one connection back and forth between its dialled path and one on 127.0.0.2,
    keeping each switch's ``confirmation_s`` (the part spent on the wire and in the process
    that owns the connection)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.order: list[Any] = []
        self.confirmations: list[float] = []

    async def ready(self) -> _Switcher:
        mc = self.conn.as_migratable()
        extra = await mc.add_path("/ip4/127.0.0.2/udp/0/quic-v1")
        await extra.probe()
        paths = mc.paths()
        assert len(paths) == 2, paths
        self.order = [extra, next(p for p in paths if p.info().active)]
        return self

    async def __call__(self) -> None:
        target = self.order[len(self.confirmations) % 2]
        self.confirmations.append((await target.switch()).confirmation_s)


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
        # The dialer keeps its desired state, as a fleet's agents do (persist=True).
        dialer = fleet.start_agent(label="dialer")
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
            async with Supervisor(enable_experimental_connection_migration=True) as local_sup:
                remote = await dialer.dial(target, alpn_protocols=["echo"], verify=False)
                local = await local_sup.dial(target, alpn_protocols=["echo"], verify=False)
                call = await _interleaved(
                    calls,
                    {
                        "handle": lambda: dialer.ask(SnapshotRequest(remote.conn_id)),
                        "in_process": lambda: local_sup.ask(SnapshotRequest(local.conn_id)),
                    },
                    warmup=20,
                )
                switchers = {
                    "handle": await _Switcher(remote).ready(),
                    "in_process": await _Switcher(local).ready(),
                }
                mig = await _interleaved(migrations, dict(switchers), warmup=2)
                await remote.close()
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

    conf = {k: s.confirmations[2:] for k, s in switchers.items()}  # without the warm-up
    return {
        "ray_version": ray.__version__,
        "cpus": os.cpu_count(),
        "ray_init_s": round(ray_init, 3),
        "agent_start_s": round(agent_start, 3),
        "call": compare(call["handle"], call["in_process"]),
        "migration": compare(mig["handle"], mig["in_process"]),
        "confirmation": compare(conf["handle"], conf["in_process"]),
    }


def main(calls: int = 500, migrations: int = 50) -> dict[str, Any]:
    return asyncio.run(_run(calls, migrations))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--migrations", type=int, default=50)
    args = parser.parse_args()
    print(json.dumps(main(args.calls, args.migrations), indent=2))
