"""B4 scale: 1,000 connections x 2 paths in one supervisor process.

    python -m bench.b4_scale [--quick] [--connections N]

Each client runs in a fresh process (``multiprocessing`` spawn), so its RSS and CPU are its own;
the QUIC server (stock aioquic echo) is one more process (``bench._server``). Three clients:

- ``raw``: N raw aioquic connections (``aioquic.asyncio.connect``), held open: the baseline
  RSS per connection;
- ``ours``: a ``Supervisor`` with telemetry on (a ``TracerProvider`` with a batch processor
  into a discarding exporter, a ``MeterProvider`` with an in-memory reader) and
  ``FailoverPolicy(keepalive_interval=1.0)``: N connections, each with a second path on
  127.0.0.2 probed to standby. RSS per connection; CPU over a quiet window (standby
  keep-alives at 1 probe/s per path, plus the active-path liveness checks); then ``drain()``
  of all N from 127.0.0.1 to 127.0.0.2 and back, with the targets warm (validated by their
  keep-alives), ``close_drained=False``;
- ``ours_idle``: the same N x 2 paths without a failover policy: the CPU of N quiet
  connections with no keep-alives, to tell the keep-alive cost from the rest.

RSS is read from /proc/self/status after ``gc.collect()``; per connection = (after - before) / N.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import multiprocessing as mp
import ssl
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from bench._common import Figure, Report, raise_nofile, rss_bytes, run, summary, write_result
from bench._server import ServerInfo, ServerSpec, make_cert, server_process

SECOND = "/ip4/127.0.0.2/udp/0/quic-v1"
PARALLEL = 32  # dials in flight at once


async def _settle(seconds: float) -> int:
    await asyncio.sleep(seconds)
    gc.collect()
    return rss_bytes()


async def _raw_client(server: ServerInfo, n: int) -> dict[str, Any]:
    from aioquic.asyncio import connect
    from aioquic.quic.configuration import QuicConfiguration

    import supervisor.api  # noqa: F401 - same imports as the other clients, same baseline

    before = await _settle(0.2)
    gate = asyncio.Semaphore(PARALLEL)
    held: list[Any] = []

    async def one() -> None:
        config = QuicConfiguration(is_client=True, alpn_protocols=["echo"], idle_timeout=120)
        config.verify_mode = ssl.CERT_NONE
        async with gate:
            cm = connect(server.host, server.quic_port, configuration=config)
            await cm.__aenter__()
            held.append(cm)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(one() for _ in range(n)))
        dial_s = time.perf_counter() - t0
        after = await _settle(1.0)
    finally:
        # Each close waits out its draining period (3 PTOs): close them all at once.
        await asyncio.gather(*(cm.__aexit__(None, None, None) for cm in held))
    return {
        "n": n,
        "rss_before": before,
        "rss_after": after,
        "dial_s": round(dial_s, 3),
        "rss_per_conn_kib": round((after - before) / n / 1024, 2),
    }


def _census() -> Counter[str]:
    gc.collect()
    return Counter(type(o).__qualname__ for o in gc.get_objects())


def _per_conn(after: Counter[str], before: Counter[str], n: int) -> dict[str, float]:
    """Objects the connections added, per connection, biggest counts first (where RSS goes)."""
    grown = {k: (after[k] - before[k]) / n for k in after if after[k] - before[k] >= n}
    return {k: round(v, 1) for k, v in sorted(grown.items(), key=lambda kv: -kv[1])[:15]}


def _providers() -> tuple[Any, Any]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class _Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tracer = TracerProvider()
    tracer.add_span_processor(BatchSpanProcessor(_Discard()))
    return tracer, MeterProvider(metric_readers=[InMemoryMetricReader()])


async def _ours_client(
    server: ServerInfo, n: int, failover: bool, quiet_s: float, drains: int
) -> dict[str, Any]:
    from supervisor import FailoverPolicy, Supervisor

    tracer, meter = _providers() if failover else (None, None)
    before = await _settle(0.2)
    types_before = _census()
    policy = FailoverPolicy(keepalive_interval=1.0) if failover else None
    out: dict[str, Any] = {"n": n, "failover": failover}
    async with Supervisor(
        enable_experimental_connection_migration=True,
        failover=policy,
        tracer_provider=tracer,
        meter_provider=meter,
    ) as sup:
        gate = asyncio.Semaphore(PARALLEL)
        conns = []

        failures: list[str] = []

        async def one() -> None:
            async with gate:
                try:
                    conn = await sup.dial(
                        server.quic_maddr, alpn_protocols=["echo"], verify=False, idle_timeout=120
                    )
                    path = await conn.as_migratable().add_path(SECOND)
                    await path.probe()
                except Exception as exc:  # counted and reported, not fatal
                    failures.append(f"{type(exc).__name__}: {exc}"[:200])
                    return
                conns.append(conn)

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        out["dial_and_probe_s"] = round(time.perf_counter() - t0, 3)
        out["setup_failures"] = len(failures)
        out["setup_failure_sample"] = failures[:3]
        after = await _settle(1.0 if not failover else 2.0)
        out.update(
            rss_before=before,
            rss_after=after,
            rss_per_conn_kib=round((after - before) / n / 1024, 2),
            objects_per_conn=_per_conn(_census(), types_before, n),
        )

        def probes() -> int:
            return sum(
                p.probes_sent for c in conns for p in sup.path_samples(c.conn_id).values()
            )

        def rounds() -> int:
            return sum(1 for _ in asyncio.all_tasks())

        # The quiet period in 4 windows: a median and a spread, not one number.
        fractions: list[float] = []
        p0, t_all = probes(), time.perf_counter()
        for _ in range(4):
            c0, t0 = time.process_time(), time.perf_counter()
            await asyncio.sleep(quiet_s / 4)
            fractions.append((time.process_time() - c0) / (time.perf_counter() - t0))
        wall = time.perf_counter() - t_all
        out.update(
            quiet_s=round(wall, 2),
            quiet_cpu_fraction=round(statistics.median(fractions), 4),
            quiet_cpu_pct=summary(fractions, 100, 2),
            probes_per_s=round((probes() - p0) / wall, 1),
            tasks=rounds(),
        )
        times: list[float] = []
        moved: list[int] = []
        why: list[str] = []
        for i in range(drains):
            src = "/ip4/127.0.0.1" if i % 2 == 0 else "/ip4/127.0.0.2"
            await asyncio.sleep(1.5)  # keep-alives revalidate the paths just left (warm)
            t = time.perf_counter()
            report = await sup.drain(local_addr=src, close_drained=False)
            times.append(time.perf_counter() - t)
            moved.append(sum(1 for o in report.outcomes if o.result == "moved"))
            why += [o.error or "" for o in report.outcomes if o.result == "failed"][:2]
        out.update(drain_s=times, drain_moved=moved, drain_failure_sample=why[:4])
        for conn in conns:
            with contextlib.suppress(Exception):
                await conn.close()
    if tracer is not None:
        tracer.shutdown()
    return out


def _child(kind: str, server: ServerInfo, n: int, quiet_s: float, drains: int) -> dict[str, Any]:
    import logging

    logging.disable(logging.WARNING)
    raise_nofile(4 * n + 1024)
    if kind == "raw":
        return run(lambda: _raw_client(server, n))
    return run(lambda: _ours_client(server, n, kind == "ours", quiet_s, drains))


def _in_child(
    kind: str, cert: tuple[str, str], n: int, quiet_s: float, drains: int
) -> dict[str, Any]:
    """One client in a fresh process, against a fresh server process (no state carried over)."""
    spec = ServerSpec("127.0.0.1", *cert, idle_timeout=120)
    with (
        server_process(spec) as server,
        ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool,
    ):
        res = pool.submit(_child, kind, server, n, quiet_s, drains).result(timeout=600)
    print(f"b4 {kind}: {json.dumps(res)}", file=sys.stderr, flush=True)
    return res


def main(quick: bool = False, connections: int | None = None) -> dict[str, Any]:
    n = connections or (100 if quick else 1000)
    quiet = 5.0 if quick else 20.0
    drains = 2 if quick else 4
    report = Report("b4_scale", quick=quick)
    raise_nofile(4 * n + 1024)
    with tempfile.TemporaryDirectory(prefix="qs-bench-") as tmp:
        cert = make_cert(tmp)
        raw = _in_child("raw", cert, n, quiet, drains)
        ours = _in_child("ours", cert, n, quiet, drains)
        idle = _in_child("ours_idle", cert, n, quiet / 2, 0)
    report.detail.update(raw=raw, ours=ours, ours_idle=idle)
    extra = round(ours["rss_per_conn_kib"] - raw["rss_per_conn_kib"], 2)
    report.add(
        Figure(
            "B4",
            f"RSS per connection beyond raw aioquic ({n} conns x 2 paths, telemetry on)",
            "<= 32 KiB",
            "KiB",
            extra,
            baseline={
                "raw aioquic KiB/conn": raw["rss_per_conn_kib"],
                "ours KiB/conn": ours["rss_per_conn_kib"],
            },
            met=extra <= 32,
        )
    )
    frac = ours["quiet_cpu_fraction"] * 100
    cpu_pct = ours.get("quiet_cpu_pct") or round(frac, 2)
    report.add(
        Figure(
            "B4",
            f"CPU, {n} standby paths probed at 1/s (+ active-path liveness)",
            "<= 10% of one core",
            "% core",
            cpu_pct,
            baseline={"same conns, no keep-alives %": round(idle["quiet_cpu_fraction"] * 100, 2)},
            met=frac <= 10,
            note=f"{ours['probes_per_s']} probes/s over {ours['quiet_s']} s; "
            f"{frac * 10_000 / n:.0f} us CPU per connection-second",
        )
    )
    drain_ms = [t * 1000 for t in ours["drain_s"]]
    report.add(
        Figure(
            "B4",
            f"warm drain of {n} connections to the other path",
            "<= 250 ms",
            "ms",
            summary(drain_ms),
            met=bool(drain_ms) and summary(drain_ms)["median"] <= 250,
            note=f"moved per drain: {ours['drain_moved']}",
        )
    )
    write_result(report)
    return report.as_dict()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--connections", type=int, default=None)
    args = parser.parse_args()
    print(json.dumps(main(args.quick, args.connections), indent=2))
