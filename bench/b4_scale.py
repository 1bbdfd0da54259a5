"""B4 scale: thousands of connections x 2 paths in one supervisor process, at rest.

    python -m bench.b4_scale [--quick] [--connections N] [--budget S] [--clients a,b]

Every client runs in a fresh process (``multiprocessing`` spawn), so its RSS and CPU are its
own, against a fresh server process: the stock aioquic echo server (``bench._server``), or
100 of them in one process on 127.0.1.1 ... 127.0.1.100 (``bench._many_servers``). A client
sends its figures back, then leaves without closing anything (``os._exit``; its server is
stopped next): closing thousands of connections is no part of B4. Our clients dial with
``idle_timeout=120`` and telemetry on (a ``TracerProvider`` with a batch processor into a
discarding exporter, a ``MeterProvider`` with an in-memory reader); each connection gets a
second path from 127.0.0.2, probed to standby; ``FailoverPolicy()`` at its defaults
(keep-alive interval 1 s per health group, NAT keep-alive 30 s per standby path). The
servers' idle timeout is 30 s, so an idle connection PINGs every 10 s (a third into
min(both idle timeouts)): ~N/10 round trips per second, the work left at rest. Dials run
``PARALLEL`` at a time (64 made probes time out once thousands of connections were open).

Clients, in this order (N = 1,000; ``--quick``: 100); each publishes the JSON when it ends:

- ``raw``: N raw aioquic connections (``aioquic.asyncio.connect``), then 4N more: raw
  aioquic's dial time of N and its RSS slope (its server's idle timeout is 120 s: raw aioquic
  sends no keep-alive, and its 5N must outlive their dial);
- ``rest``: N x 2, failover on: dial + probe time; a ``cProfile`` (process-CPU clock) of a
  short quiet window; the quiet window proper (split in 4 for a spread): CPU, tasks per
  connection, keep-alives per second by kind (``Supervisor.health_status()`` deltas),
  datagrams per second (the paths' counters), the server's CPU; ``drain()`` of all N from
  127.0.0.1 to 127.0.0.2 and back, targets warm, ``close_drained=False`` (informative: node
  scale 2's figure);
- ``rest_nofailover``: the same N x 2 without a failover policy (``rest``'s same-run
  baseline), then 4N more: the RSS slope without a policy;
- ``servers100``: ``rest``'s first part against the 100 servers, N spread evenly: 200
  health groups (2 local addresses x 100 peers) instead of 2;
- ``tracemalloc``: N x 2, then ``tracemalloc.start(1)`` and N/2 more: where a connection's
  bytes go, by line and by package (Python allocations only, not OpenSSL's);
- ``scale``: failover on, N, then 4N more (the RSS slope with a policy), then up to 10N
  (RLIMIT_NOFILE raised; one UDP socket per path, so capped by it) and a quiet window at the
  count reached. Last, because its steps after N stop dialing when ``--budget`` (330 s:
  ``python -m bench`` allows B4 450 s) runs out; a longer budget reaches further.

RSS is read from /proc/self/status after ``gc.collect()`` and a 2 s settle. The RSS figure is
a slope: a step's RSS growth per connection (N -> 5N), ours minus raw aioquic's, so start-up
and one-off costs drop out; ours with failover on (``scale``) when that step went through,
else without a policy (``rest_nofailover``). Failed dials leave bytes behind: a step with
over 1 % of its dials failed, a crashed supervisor, or under N/2 connections added gives no
slope.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing as mp
import os
import ssl
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection as Pipe
from typing import Any

from bench._common import (
    Deadline,
    Figure,
    Report,
    open_fds,
    proc_cpu_s,
    raise_nofile,
    rss_bytes,
    run,
    summary,
    write_result,
)
from bench._many_servers import ManySpec, loopback_hosts, many_servers_process
from bench._server import ServerInfo, ServerSpec, die_with_parent, make_cert, server_process

SECOND = "/ip4/127.0.0.2/udp/0/quic-v1"
PARALLEL = 32  # dials in flight (raw and ours alike: the dial figure)
SERVER_IDLE_S = 30.0  # the peers' idle timeout: idle PING every 10 s per connection
CLIENT_IDLE_S = 120.0
RAW_SERVER_IDLE_S = 120.0
SETTLE_S = 2.0  # after each dial step, before RSS and tasks are read
BUDGET_S = 330.0  # ``python -m bench`` allows B4 450 s: the 10N step stops dialing in time


@dataclass(frozen=True)
class Plan:
    """What one client process does; ``steps`` are cumulative connection counts.

    After the first step: a profile, a quiet window, drains; then the other steps (the
    first traced when ``tracemalloc``), and a quiet window after the last (``quiet_last_s``).
    """

    kind: str
    steps: tuple[int, ...]
    failover: bool = True
    quiet_s: float = 0.0
    profile_s: float = 0.0
    drains: int = 0
    tracemalloc: bool = False
    quiet_last_s: float = 0.0
    #: time.time() by which the bench must be done: the steps after the first start no
    #: dial after ``deadline_at - reserve_s`` (what the client does after its last step).
    deadline_at: float | None = None
    reserve_s: float = 0.0


# ---------------------------------------------------------------------------- client side


async def _settle(seconds: float) -> int:
    await asyncio.sleep(seconds)
    gc.collect()
    return rss_bytes()


def _tasks() -> int:
    return len(asyncio.all_tasks())


def _fd_budget(limit: int, fds_per_conn: float, have: int) -> int:
    """Connections that still fit under RLIMIT_NOFILE (128 fds spare)."""
    return max(0, int((limit - open_fds() - 128) / max(fds_per_conn, 1.0))) + have


async def _raw_client(plan: Plan, servers: list[ServerInfo]) -> dict[str, Any]:
    from aioquic.asyncio import connect
    from aioquic.quic.configuration import QuicConfiguration

    import supervisor.orchestration.supervisor  # noqa: F401 - same imports as our clients, same baseline

    rss0 = await _settle(0.2)
    held: list[Any] = []
    steps: list[dict[str, Any]] = []

    async def one(i: int, gate: asyncio.Semaphore) -> None:
        server = servers[i % len(servers)]
        config = QuicConfiguration(
            is_client=True, alpn_protocols=["echo"], idle_timeout=CLIENT_IDLE_S
        )
        config.verify_mode = ssl.CERT_NONE
        async with gate:
            cm = connect(server.host, server.quic_port, configuration=config)
            # Hold the context manager too: collected, its generator closes the connection.
            held.append((cm, await cm.__aenter__()))

    done = 0
    for target in plan.steps:
        gate = asyncio.Semaphore(PARALLEL)
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, gate) for i in range(done, target)))
        dial_s = time.perf_counter() - t0
        done = target
        rss = await _settle(SETTLE_S)
        alive = sum(1 for _, p in held if p._quic._close_event is None)
        steps.append(
            {
                "n": target,
                "dial_s": round(dial_s, 3),
                "rss_before": steps[-1]["rss"] if steps else rss0,
                "rss": rss,
                "alive": alive,
            }
        )
        print(f"b4 raw: {steps[-1]}", file=sys.stderr, flush=True)
    return {"kind": plan.kind, "rss0": rss0, "steps": steps, **_slope(steps, rss0)}


def _slope(steps: list[dict[str, Any]], rss0: int) -> dict[str, Any]:
    """RSS per connection from zero at the first step, and over the second step: its RSS
    growth (from just before it, after whatever ran at the first count) per connection."""
    out: dict[str, Any] = {}
    if steps and steps[0]["n"]:
        first = steps[0]
        out["rss_per_conn_kib_first"] = round((first["rss"] - rss0) / first["n"] / 1024, 2)
    if len(steps) >= 2:
        a, b = steps[0], steps[1]
        if b["n"] - a["n"] < a["n"] / 2:
            out["slope_invalid"] = f"{b['n'] - a['n']} connections added: too few"
            return out
        slope = round((b["rss"] - b["rss_before"]) / (b["n"] - a["n"]) / 1024, 2)
        failed = b.get("failures", 0) - a.get("failures", 0)
        dead = b.get("verdicts", {}).get("dead", 0) - a.get("verdicts", {}).get("dead", 0)
        if failed > 0.01 * (b["n"] - a["n"]) or dead or b.get("crashed"):
            out["slope_kib_unchecked"] = slope
            # What failed dials left behind, or the state of mass failovers (groups judged
            # dead: a loop too busy to read its answers), would count as connections' bytes.
            out["slope_invalid"] = (
                f"{failed} dials failed in the step, {dead} groups judged dead"
                + (f"; the supervisor crashed: {b['crashed']}" if b.get("crashed") else "")
            )
            return out
        out["slope_kib"] = slope
        out["slope_between"] = [a["n"], b["n"]]
    return out


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


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def _package(filename: str) -> str:
    name = _short(filename)
    head = name.split("/", 1)[0]
    return head if "/" in name else name


def _alloc_table(before: Any, after: Any, n: int, top: int = 15) -> dict[str, Any]:
    """Where the traced bytes of ``n`` connections went: top lines and packages, per conn."""
    lines = after.compare_to(before, "lineno")
    rows = [
        {
            "where": f"{_short(s.traceback[0].filename)}:{s.traceback[0].lineno}",
            "kib_per_conn": round(s.size_diff / n / 1024, 3),
            "blocks_per_conn": round(s.count_diff / n, 2),
        }
        for s in sorted(lines, key=lambda s: -s.size_diff)[:top]
    ]
    ours = [
        {
            "where": f"{_short(s.traceback[0].filename)}:{s.traceback[0].lineno}",
            "kib_per_conn": round(s.size_diff / n / 1024, 3),
            "blocks_per_conn": round(s.count_diff / n, 2),
        }
        for s in sorted(lines, key=lambda s: -s.size_diff)
        if _short(s.traceback[0].filename).startswith(("actors/", "supervisor/", "telemetry/"))
    ][:top]
    packages: dict[str, float] = {}
    for s in after.compare_to(before, "filename"):
        key = _package(s.traceback[0].filename)
        packages[key] = packages.get(key, 0.0) + s.size_diff
    by_pkg = {
        k: round(v / n / 1024, 2)
        for k, v in sorted(packages.items(), key=lambda kv: -kv[1])
        if abs(v) / n >= 64
    }
    total = sum(s.size_diff for s in lines)
    return {
        "connections": n,
        "traced_kib_per_conn": round(total / n / 1024, 2),
        "top_lines": rows,
        "top_lines_ours": ours,
        "by_package_kib_per_conn": by_pkg,
    }


def _profile_top(prof: Any, wall: float, top: int = 10) -> dict[str, Any]:
    """Top functions by own CPU time (cProfile on the process-CPU clock), % of one core, and
    ours (actors, supervisor) by cumulative time. cProfile's clock reads inflate the totals
    several times over: the shares are what to read."""
    import pstats

    stats = pstats.Stats(prof)
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in entries.values())
    rows = []
    by_pkg: dict[str, float] = {}
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in entries.items():
        key = _package(filename) if filename != "~" else "builtins"
        by_pkg[key] = by_pkg.get(key, 0.0) + tt
        rows.append(
            {
                "function": f"{_short(filename)}:{line}({func})" if filename != "~" else func,
                "calls_per_s": round(nc / wall, 1),
                "own_pct_core": round(tt / wall * 100, 3),
                "cum_pct_core": round(ct / wall * 100, 3),
            }
        )
    ours = sorted(
        (r for r in rows if r["function"].startswith(("actors/", "supervisor/"))),
        key=lambda r: -r["cum_pct_core"],
    )
    rows.sort(key=lambda r: -r["own_pct_core"])
    return {
        "window_s": round(wall, 2),
        "profiled_pct_core": round(total / wall * 100, 2),
        "top_own": rows[:top],
        "top_cumulative_ours": ours[:top],
        "by_package_pct_core": {
            k: round(v / wall * 100, 3)
            for k, v in sorted(by_pkg.items(), key=lambda kv: -kv[1])[:8]
        },
    }


def _datagrams(sup: Any, conns: list[Any]) -> tuple[int, int]:
    sent = received = 0
    for conn in conns:
        for sample in sup.path_samples(conn.conn_id).values():
            sent += sample.datagrams_sent
            received += sample.datagrams_received
    return sent, received


async def _rest(sup: Any, conns: list[Any], quiet_s: float, server_pid: int) -> dict[str, Any]:
    """CPU, keep-alives by kind and datagrams over a quiet window (4 sub-windows)."""
    h0 = await sup.health_status()
    d0 = _datagrams(sup, conns)
    s0 = proc_cpu_s(server_pid)
    fractions: list[float] = []
    t_all, c_all = time.perf_counter(), time.process_time()
    for _ in range(4):
        c0, t0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(quiet_s / 4)
        fractions.append((time.process_time() - c0) / (time.perf_counter() - t0))
    wall = time.perf_counter() - t_all
    cpu = time.process_time() - c_all
    s1 = proc_cpu_s(server_pid)
    d1 = _datagrams(sup, conns)
    h1 = await sup.health_status()
    kinds = sorted(set(h0.keepalives) | set(h1.keepalives))
    per_s = {k: round((h1.keepalives.get(k, 0) - h0.keepalives.get(k, 0)) / wall, 2) for k in kinds}
    return {
        "window_s": round(wall, 2),
        "open": len(sup.connections()),
        "cpu_pct": summary(fractions, 100, 3),
        "cpu_pct_whole": round(cpu / wall * 100, 3),
        "us_per_conn_s": round(cpu / wall / max(len(conns), 1) * 1e6, 2),
        "keepalives_per_s": per_s,
        "keepalives_per_s_total": round(sum(per_s.values()), 2),
        "datagrams_sent_per_s": round((d1[0] - d0[0]) / wall, 1),
        "datagrams_received_per_s": round((d1[1] - d0[1]) / wall, 1),
        "server_cpu_pct": round((s1 - s0) / wall * 100, 2),
        "groups": h1.groups,
        "members": h1.members,
        "timers": h1.timers,
        "verdicts": h1.verdicts,
        "loop_lag_s": h1.loop_lag_s,
        "tasks": _tasks(),
    }


async def _ours_client(
    plan: Plan, servers: list[ServerInfo], finish: Callable[[dict[str, Any]], None]
) -> None:
    """Measure inside the supervisor, then ``finish`` (send and leave) before it closes:
    closing thousands of connections is no part of B4."""
    from supervisor import FailoverPolicy, Supervisor

    limit = raise_nofile(4 * plan.steps[-1] + 1024)
    tracer, meter = _providers()
    rss0 = await _settle(0.2)
    policy = FailoverPolicy() if plan.failover else None
    out: dict[str, Any] = {"kind": plan.kind, "failover": plan.failover, "nofile": limit}
    async with Supervisor(
        enable_experimental_connection_migration=True,
        failover=policy,
        tracer_provider=tracer,
        meter_provider=meter,
    ) as sup:
        try:
            await _measure(sup, plan, servers, limit, rss0, out)
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
            out["traceback"] = traceback.format_exc()[-2000:]
        finish(out)


async def _measure(
    sup: Any, plan: Plan, servers: list[ServerInfo], limit: int, rss0: int, out: dict[str, Any]
) -> None:
    import tracemalloc

    tasks0, fds0 = _tasks(), open_fds()
    conns: list[Any] = []
    failures: list[str] = []
    skipped = 0
    stop_at: float | None = None

    async def one(i: int, gate: asyncio.Semaphore) -> None:
        nonlocal skipped
        server = servers[i % len(servers)]
        async with gate:
            if stop_at is not None and time.time() > stop_at:
                skipped += 1
                return
            try:
                conn = await sup.dial(
                    server.quic_maddr,
                    alpn_protocols=["echo"],
                    verify=False,
                    idle_timeout=CLIENT_IDLE_S,
                )
                path = await conn.as_migratable().add_path(SECOND)
                await path.probe()
            except Exception as exc:  # counted and reported, not fatal
                failures.append(f"{type(exc).__name__}: {exc}"[:200])
                return
            conns.append(conn)

    steps: list[dict[str, Any]] = []
    out["steps"] = steps
    out["rss0"] = rss0
    snap0 = None
    done = 0
    for k, planned in enumerate(plan.steps):
        target, note = planned, ""
        if steps:
            fds_per_conn = steps[-1]["fds"] / max(steps[-1]["n"], 1)
            fit = _fd_budget(limit, fds_per_conn, len(conns))
            if fit < target:
                note = f"capped by RLIMIT_NOFILE {limit} ({fds_per_conn:.2f} fds/conn)"
                target = fit
        if k >= 1 and plan.deadline_at is not None:
            stop_at = plan.deadline_at - plan.reserve_s
        rss_before = rss_bytes() if k == 0 else await _settle(SETTLE_S)
        tracing = k == 1 and plan.tracemalloc
        if tracing:
            tracemalloc.start(1)
            snap0 = tracemalloc.take_snapshot()
        gate = asyncio.Semaphore(PARALLEL // 2 if tracing else PARALLEL)
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, gate) for i in range(done, target)))
        dial_s = time.perf_counter() - t0
        done = target
        rss = await _settle(SETTLE_S)
        steps.append(
            {
                "planned": planned,
                "n": len(conns),
                "open": len(sup.connections()),
                "dial_and_probe_s": round(dial_s, 3),
                "rss_before": rss_before,
                "rss": rss,
                "tasks": _tasks() - tasks0,
                "fds": open_fds() - fds0,
                "failures": len(failures),
                "skipped_by_budget": skipped,
                **({"note": note} if note else {}),
            }
        )
        verdicts, crashed = await _verdicts(sup)
        steps[-1]["verdicts"] = verdicts
        if crashed:
            steps[-1]["crashed"] = out["supervisor_crashed"] = crashed
        print(f"b4 {plan.kind}: {steps[-1]}", file=sys.stderr, flush=True)
        out["failure_sample"] = failures[:3]
        out.update(_slope(steps, rss0))
        if crashed:
            return
        if k == 0:
            out["tasks_per_conn"] = round((_tasks() - tasks0) / max(len(conns), 1), 3)
            await _at_rest(sup, plan, conns, servers, tasks0, out)
        if snap0 is not None:
            gc.collect()
            snap1 = tracemalloc.take_snapshot()
            tracemalloc.stop()
            out["tracemalloc"] = _alloc_table(snap0, snap1, len(conns) - steps[0]["n"])
            del snap1
            snap0 = None
        if skipped:
            break
    if len(steps) > 1 and plan.quiet_last_s:
        n = len(conns)
        out["rest_last"] = await _rest(sup, conns, plan.quiet_last_s, servers[0].pid)
        out["tasks_per_conn_last"] = round((out["rest_last"]["tasks"] - tasks0) / max(n, 1), 3)
        print(f"b4 {plan.kind}: rest at {n} {out['rest_last']}", file=sys.stderr, flush=True)


async def _verdicts(sup: Any) -> tuple[dict[str, int], str | None]:
    """The health groups' verdicts so far, and why the supervisor stopped (it answers
    nothing any more) or None while it runs."""
    try:
        status = await sup.health_status()
    except Exception as exc:
        return {}, f"{type(exc).__name__}: {exc}"[:300]
    return dict(status.verdicts), None


async def _at_rest(
    sup: Any,
    plan: Plan,
    conns: list[Any],
    servers: list[ServerInfo],
    tasks0: int,
    out: dict[str, Any],
) -> None:
    """After the first step: a profile, then the quiet window (NAT keep-alives start 24-36 s
    after a path's validation: the later the window, the closer to their steady rate), then
    the warm drains."""
    import cProfile

    if plan.profile_s:
        prof = cProfile.Profile(time.process_time)
        t0 = time.perf_counter()
        prof.enable()
        await asyncio.sleep(plan.profile_s)
        prof.disable()
        out["profile"] = _profile_top(prof, time.perf_counter() - t0)
    if plan.quiet_s:
        out["rest"] = await _rest(sup, conns, plan.quiet_s, servers[0].pid)
        out["tasks_per_conn"] = round((out["rest"]["tasks"] - tasks0) / max(len(conns), 1), 3)
        print(f"b4 {plan.kind}: rest {out['rest']}", file=sys.stderr, flush=True)
    if plan.drains:
        out.update(await _drains(sup, plan.drains))


async def _drains(sup: Any, count: int) -> dict[str, Any]:
    """Warm drains: every connection off 127.0.0.1, then back off 127.0.0.2, ..."""
    times: list[float] = []
    cpu_ms: list[float] = []
    moved: list[int] = []
    failed: list[int] = []
    why: list[str] = []
    for i in range(count):
        src = "/ip4/127.0.0.1" if i % 2 == 0 else "/ip4/127.0.0.2"
        await asyncio.sleep(1.5)  # keep-alives revalidate the paths just left (warm)
        t, c = time.perf_counter(), time.process_time()
        report = await sup.drain(local_addr=src, close_drained=False)
        # The client process's CPU (all threads: the span exporter's too) over the drain.
        cpu = time.process_time() - c
        times.append(time.perf_counter() - t)
        moved.append(sum(1 for o in report.outcomes if o.result == "moved"))
        failed.append(sum(1 for o in report.outcomes if o.result == "failed"))
        cpu_ms.append(cpu * 1000 / max(moved[-1], 1))
        why += [o.error or "" for o in report.outcomes if o.result == "failed"][:2]
    return {
        "drain_s": [round(t, 3) for t in times],
        "drain_cpu_ms_per_migration": [round(x, 3) for x in cpu_ms],
        "drain_moved": moved,
        "drain_failed": failed,
        "drain_failure_sample": why[:4],
    }


def _client_main(plan: Plan, servers: list[ServerInfo], pipe: Pipe) -> None:
    """The client process: run, send the figures, leave without tearing down (os._exit)."""
    import logging

    die_with_parent()
    logging.disable(logging.WARNING)

    def finish(res: dict[str, Any]) -> None:
        pipe.send(res)
        pipe.close()
        sys.stderr.flush()
        os._exit(0)

    try:
        if plan.kind == "raw":
            raise_nofile(4 * plan.steps[-1] + 1024)
            finish(run(lambda: _raw_client(plan, servers)))
        run(lambda: _ours_client(plan, servers, finish))
        finish({"kind": plan.kind, "error": "the client returned without its figures"})
    except Exception as exc:
        finish(
            {
                "kind": plan.kind,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-2000:],
            }
        )


def _client(plan: Plan, servers: list[ServerInfo], timeout: float) -> dict[str, Any]:
    """One client process (spawned) against ``servers``; its figures, or why there are none."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_client_main, args=(plan, servers, child), daemon=True)
    t0 = time.monotonic()
    proc.start()
    child.close()
    try:
        if parent.poll(timeout):
            res: dict[str, Any] = parent.recv()
        else:
            res = {"kind": plan.kind, "error": f"no result within {timeout:.0f} s"}
    except EOFError:
        res = {"kind": plan.kind, "error": f"client process died ({proc.exitcode})"}
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        parent.close()
    res["process_s"] = round(time.monotonic() - t0, 1)
    print(f"b4 {plan.kind}: done in {res['process_s']} s", file=sys.stderr, flush=True)
    return res


# ---------------------------------------------------------------------------- the bench


def _med(res: dict[str, Any], *keys: str) -> float | None:
    """``res[k1][k2]...`` if every key is there (a client that failed has fewer)."""
    cur: Any = res
    for key in keys:
        if not isinstance(cur, dict) or key not in cur:
            return None
        cur = cur[key]
    if isinstance(cur, dict):
        return cur.get("median")
    return None if cur is None else float(cur)


def _intervals() -> str:
    from supervisor import FailoverPolicy

    p = FailoverPolicy()
    idle = min(SERVER_IDLE_S, CLIENT_IDLE_S)
    return (
        f"server idle_timeout {SERVER_IDLE_S:g} s, client idle_timeout {CLIENT_IDLE_S:g} s: "
        f"idle PING every {idle / 3:g} s per connection (a third into min(both)); "
        f"FailoverPolicy() defaults: keepalive_interval {p.keepalive_interval:g} s per group "
        f"(jitter {p.jitter:g}), nat_keepalive {p.nat_keepalive:g} s per standby path "
        f"(jittered), failures_to_fail {p.failures_to_fail}, probe_timeout "
        f"{p.probe_timeout:g} s"
    )


def _expected(n: int, groups: int | None) -> dict[str, float]:
    from supervisor import FailoverPolicy

    p = FailoverPolicy()
    out = {"idle": round(n / (min(SERVER_IDLE_S, CLIENT_IDLE_S) / 3), 1)}
    if p.nat_keepalive:
        out["nat"] = round(n / p.nat_keepalive, 1)
    if groups is not None:
        out["representative"] = round(groups / p.keepalive_interval, 1)
    return out


def _figures(report: Report, n: int, res: dict[str, dict[str, Any]]) -> None:
    raw, rest, base = res.get("raw", {}), res.get("rest", {}), res.get("rest_nofailover", {})
    many, traced, scale = (res.get(k, {}) for k in ("servers100", "tracemalloc", "scale"))
    intervals = _intervals()
    r, b, m = rest.get("rest", {}), base.get("rest", {}), many.get("rest", {})

    cpu = _med(rest, "rest", "cpu_pct")
    report.add(
        Figure(
            "B4",
            f"CPU at rest, {n} conns x 2 paths, failover on (1 server)",
            "<= 5 % of one core",
            "% core",
            r.get("cpu_pct"),
            baseline={"same, no failover policy %": _med(base, "rest", "cpu_pct")},
            met=None if cpu is None else cpu <= 5,
            note=f"{intervals}; quiet window {r.get('window_s')} s (4 parts) after a "
            f"{SETTLE_S:g} s settle; {r.get('us_per_conn_s')} us CPU per connection-second, "
            f"{_per_keepalive(r)} us per keep-alive (no policy: {_per_keepalive(b)}); "
            f"{r.get('datagrams_sent_per_s')} datagrams/s sent, "
            f"{r.get('datagrams_received_per_s')} received; server process "
            f"{r.get('server_cpu_pct')} % core; loop lag {r.get('loop_lag_s')} s/min",
        )
    )
    report.add(
        Figure(
            "B4",
            f"keep-alive datagrams per second by kind, {n} x 2, failover on",
            "informative (~N/10 idle + N/30 nat + groups/s)",
            "/s",
            {**r.get("keepalives_per_s", {}), "all datagrams sent": r.get("datagrams_sent_per_s")}
            if r
            else None,
            baseline={
                "no failover": {
                    **b.get("keepalives_per_s", {}),
                    "all datagrams sent": b.get("datagrams_sent_per_s"),
                }
            }
            if b
            else None,
            note=f"expected steady state {_expected(n, r.get('groups'))} ({r.get('groups')} "
            f"groups, {r.get('members')} members, {r.get('timers')} timers); NAT keep-alives "
            f"start 24-36 s after a path's validation, so a window that begins right after "
            f"the dial sees fewer than N/30",
        )
    )
    tpc = rest.get("tasks_per_conn")
    report.add(
        Figure(
            "B4",
            f"tasks per idle connection, 2 paths, failover on ({n} conns)",
            "<= 2",
            "tasks",
            tpc,
            baseline={"no failover policy": base.get("tasks_per_conn")},
            met=None if tpc is None else tpc <= 2,
            note=f"(len(asyncio.all_tasks()) at rest - before the first dial) / N; at rest: "
            f"{r.get('tasks')} tasks in the process",
        )
    )
    # With failover on (scale) when that step went through; else without (rest_nofailover).
    slope_from = scale if scale.get("slope_kib") is not None else base
    ours_slope, raw_slope = slope_from.get("slope_kib"), raw.get("slope_kib")
    a, b = slope_from.get("slope_between") or [n, 5 * n]
    extra = None if ours_slope is None or raw_slope is None else round(ours_slope - raw_slope, 2)
    tm = traced.get("tracemalloc", {})
    top = "; ".join(f"{t['where']} {t['kib_per_conn']}" for t in tm.get("top_lines", [])[:5])
    report.add(
        Figure(
            "B4",
            f"RSS per connection beyond raw aioquic, slope {a} -> {b} conns x 2 paths",
            "<= 16 KiB (24 at most)",
            "KiB",
            extra,
            baseline={
                "raw aioquic slope KiB/conn": raw_slope,
                "ours, failover on": _slope_text(scale),
                "ours, no failover policy": _slope_text(base),
                f"raw from zero at {n}": raw.get("rss_per_conn_kib_first"),
                f"ours from zero at {n}": slope_from.get("rss_per_conn_kib_first"),
            },
            met=None if extra is None else extra <= 16,
            note=f"result: ours {'with' if slope_from is scale else 'WITHOUT'} a failover "
            f"policy (client {'scale' if slope_from is scale else 'rest_nofailover'}), "
            f"telemetry on; the step's RSS growth per connection, RSS read after gc.collect() "
            f"and a {SETTLE_S:g} s settle (raw: {raw.get('slope_between')}); tracemalloc "
            f"(another process, "
            f"{tm.get('connections')} more after {n}): "
            f"{tm.get('traced_kib_per_conn')} KiB/conn traced, by package "
            f"{tm.get('by_package_kib_per_conn')}; top lines KiB/conn: {top}",
        )
    )
    raw_dial = _first(raw, "dial_s")
    dials = [d for d in (_first(x, "dial_and_probe_s") for x in (rest, base, traced, scale)) if d]
    ratio = round(statistics.median(dials) / raw_dial, 2) if dials and raw_dial else None
    report.add(
        Figure(
            "B4",
            f"dial + add_path + probe of {n} vs raw aioquic dial of {n}",
            "<= 2x",
            "x",
            ratio,
            baseline={"raw aioquic dial s": raw_dial, "ours dial+probe s": dials},
            met=None if ratio is None else ratio <= 2,
            note=f"{PARALLEL} in flight, one server; ours: median of the clients rest, "
            f"rest_nofailover, tracemalloc (before it traces) and scale, telemetry on",
        )
    )
    servers = many.get("servers")
    report.add(
        Figure(
            "B4",
            f"CPU at rest, {n} x 2 against {servers} servers on distinct loopback addresses",
            "informative (1 probe per group per s by design; 1 server: <= 5 %)",
            "% core",
            m.get("cpu_pct"),
            baseline={"1 server %": cpu},
            note=f"{m.get('groups')} health groups; window {m.get('window_s')} s; "
            f"{_per_keepalive(m)} us CPU per keep-alive; "
            f"{m.get('datagrams_sent_per_s')} datagrams/s sent; server process "
            f"{m.get('server_cpu_pct')} % core; {intervals}",
        )
    )
    report.add(
        Figure(
            "B4",
            f"keep-alive datagrams per second by kind, {servers} servers",
            "informative",
            "/s",
            m.get("keepalives_per_s"),
            baseline={"1 server": r.get("keepalives_per_s")},
            note=f"expected steady state {_expected(n, m.get('groups'))}",
        )
    )
    groups = m.get("groups")
    report.add(
        Figure(
            "B4",
            f"health groups, {servers} servers x 2 local addresses",
            f"{2 * (servers or 0)}",
            "groups",
            groups,
            baseline={"1 server": r.get("groups")},
            met=None if groups is None or not servers else groups == 2 * servers,
            note=f"members {m.get('members')}, timers {m.get('timers')}",
        )
    )
    steps = scale.get("steps", [])
    big = steps[-1] if len(steps) >= 2 else None
    s = scale.get("rest_last", {})
    big_res: dict[str, Any] | None = None
    if big is not None:
        prev = steps[-2]
        big_res = {
            "connections": big["n"],
            "open at the end": (s or big).get("open"),
            "RSS KiB/conn from zero": round((big["rss"] - scale["rss0"]) / big["n"] / 1024, 2),
            "tasks/conn": scale.get("tasks_per_conn_last"),
            "CPU % core": _med(scale, "rest_last", "cpu_pct"),
            "keep-alives/s": s.get("keepalives_per_s_total"),
        }
        if big["n"] - prev["n"] >= n / 2:
            big_res[f"RSS slope {prev['n']}->{big['n']} KiB/conn"] = round(
                (big["rss"] - big["rss_before"]) / (big["n"] - prev["n"]) / 1024, 2
            )
    first = steps[0] if steps else None
    report.add(
        Figure(
            "B4",
            f"up to {10 * n} conns x 2 paths, failover on (as far as RLIMIT_NOFILE and the "
            f"time budget allow)",
            "informative",
            "",
            big_res,
            baseline={
                f"RSS KiB/conn from zero at {first['n']}": scale.get("rss_per_conn_kib_first"),
                f"tasks/conn at {first['n']}": round(first["tasks"] / max(first["n"], 1), 3),
                f"CPU % at {n} (rest)": cpu,
            }
            if first
            else None,
            note=_scale_note(scale),
        )
    )
    drain_ms = [t * 1000 for t in rest.get("drain_s", [])]
    drain_cpu = rest.get("drain_cpu_ms_per_migration", [])
    drain_failed = rest.get("drain_failed") or []
    report.add(
        Figure(
            "B4",
            f"warm drain of {n} connections to the other path",
            "<= 600 ms, 0 failed (node scale 2)",
            "ms",
            summary(drain_ms) if drain_ms else None,
            met=None
            if not drain_ms
            else statistics.median(drain_ms) <= 600 and not any(drain_failed),
            note=f"moved per drain: {rest.get('drain_moved')}, failed: {drain_failed}"
            f"; client CPU per migration (ms): {drain_cpu}; switches paced by herd control "
            "(64 in flight)",
        )
    )
    cpu_med = statistics.median(drain_cpu) if drain_cpu else None
    report.add(
        Figure(
            "B4",
            f"client CPU per migration in a warm drain of {n}",
            "<= 0.6 ms (node scale 2)",
            "ms",
            summary(drain_cpu) if drain_cpu else None,
            baseline={"drain wall ms": summary(drain_ms) if drain_ms else None},
            met=None if cpu_med is None else cpu_med <= 0.6,
            note="time.process_time() of the client process (every thread: the span "
            "exporter's too) over each drain() call, divided by the connections it moved; "
            f"failed per drain {rest.get('drain_failed')}",
        )
    )


def _slope_text(res: dict[str, Any]) -> float | str | None:
    """A client's slope, or what it measured and why it is not used."""
    if res.get("slope_kib") is not None or "slope_invalid" not in res:
        return res.get("slope_kib")
    return f"{res.get('slope_kib_unchecked')} (not used: {res['slope_invalid']})"


def _per_keepalive(rest: dict[str, Any]) -> float | None:
    """The window's whole CPU over its keep-alives (idle PINGs included): per round trip."""
    rate = rest.get("keepalives_per_s_total")
    if not rate or rest.get("cpu_pct_whole") is None:
        return None
    return round(rest["cpu_pct_whole"] / 100 / rate * 1e6)


def _first(res: dict[str, Any], key: str) -> float | None:
    steps = res.get("steps") or []
    return steps[0].get(key) if steps else None


def _scale_note(scale: dict[str, Any]) -> str:
    if "error" in scale:
        return f"error: {scale['error']}"
    steps = scale.get("steps", [])
    parts = [
        f"{s['n']} conns ({s.get('open')} open): dial+probe {s['dial_and_probe_s']} s for "
        f"the step, "
        f"{s['fds']} fds, {s['failures']} failed, {s['skipped_by_budget']} skipped (budget)"
        + (f", {s['note']}" if s.get("note") else "")
        + (f", the supervisor crashed: {s['crashed']}" if s.get("crashed") else "")
        for s in steps
    ]
    r = scale.get("rest_last", {})
    if r:
        parts.append(
            f"at rest at {steps[-1]['n']}: window {r.get('window_s')} s, keep-alives/s "
            f"{r.get('keepalives_per_s')}, "
            f"server {r.get('server_cpu_pct')} % core, loop lag {r.get('loop_lag_s')} s/min"
        )
    return "; ".join(parts)


def _notes(report: Report, res: dict[str, dict[str, Any]]) -> None:
    for kind in ("rest", "rest_nofailover", "servers100"):
        prof = res.get(kind, {}).get("profile")
        if not prof:
            continue
        top = ", ".join(f"{row['function']} {row['own_pct_core']} %" for row in prof["top_own"][:6])
        report.notes.append(
            f"cProfile of {kind} at rest ({prof['window_s']} s before its quiet window, "
            f"process-CPU clock): {prof['profiled_pct_core']} % core in the loop thread; by "
            f"package {prof['by_package_pct_core']}; top own time: {top}"
        )
    tm = res.get("tracemalloc", {}).get("tracemalloc")
    if tm:
        top = ", ".join(f"{t['where']} {t['kib_per_conn']}" for t in tm["top_lines"][:8])
        report.notes.append(
            f"tracemalloc, {tm['connections']} connections x 2 paths added: "
            f"{tm['traced_kib_per_conn']} KiB/conn traced (Python allocations only); "
            f"KiB/conn by line: {top}"
        )
    for kind, r in res.items():
        if "error" in r:
            report.notes.append(f"{kind}: {r['error']}")
        if "supervisor_crashed" in r:
            at = r["steps"][-1]["n"] if r.get("steps") else "?"
            report.notes.append(
                f"{kind}: the supervisor crashed at {at} connections ({r['supervisor_crashed']});"
                f" the client log has the traceback, the later steps of this client are lost"
            )


CLIENTS = ("raw", "rest", "rest_nofailover", "servers100", "tracemalloc", "scale")


def main(
    quick: bool = False,
    connections: int | None = None,
    budget: float = BUDGET_S,
    clients: tuple[str, ...] = CLIENTS,
) -> dict[str, Any]:
    """Run ``clients`` (all: B4, written to the results; a subset: printed only)."""
    n = connections or (100 if quick else 1000)
    quiet = 6.0 if quick else 30.0
    quiet_last = 4.0 if quick else 12.0
    profile_s = 3.0 if quick else 6.0
    n_servers = 10 if quick else 100
    deadline = Deadline(budget)
    res: dict[str, dict[str, Any]] = {}

    def publish() -> Report:
        """Write what is measured so far: a run cut short (the suite's timeout) keeps it."""
        report = Report("b4_scale", quick=quick)
        report.detail.update(res)
        report.detail["budget_s"] = budget
        report.detail["elapsed_s"] = round(budget - deadline.left(), 1)
        _figures(report, n, res)
        _notes(report, res)
        if set(clients) >= set(CLIENTS):
            write_result(report)
        return report

    def timeout() -> float:
        return max(45.0, min(400.0, deadline.left() + 20))

    def short(full: float) -> float:
        """The later clients' windows: shortened when the budget runs low."""
        return full if quick or deadline.left() > 100 else max(8.0, full / 2)

    with tempfile.TemporaryDirectory(prefix="qs-bench-") as tmp:
        cert = make_cert(tmp)

        def against_one(plan: Plan, idle: float = SERVER_IDLE_S) -> None:
            with server_process(ServerSpec("127.0.0.1", *cert, idle_timeout=idle)) as server:
                res[plan.kind] = _client(plan, [server], timeout())
            publish()

        if "raw" in clients:
            against_one(Plan("raw", (n, 5 * n)), RAW_SERVER_IDLE_S)
        if "rest" in clients:
            against_one(
                Plan("rest", (n,), quiet_s=quiet, profile_s=profile_s, drains=2 if quick else 4)
            )
        if "rest_nofailover" in clients:
            against_one(
                Plan(
                    "rest_nofailover",
                    (n, 5 * n),
                    failover=False,
                    quiet_s=short(20.0 if not quick else 4.0),
                    profile_s=short(profile_s / 2),
                )
            )
        if "servers100" in clients:
            spec = ManySpec(loopback_hosts(n_servers), *cert, idle_timeout=SERVER_IDLE_S)
            with many_servers_process(spec) as servers:
                plan = Plan(
                    "servers100",
                    (n,),
                    quiet_s=short(20.0 if not quick else 4.0),
                    profile_s=short(profile_s),
                )
                res[plan.kind] = _client(plan, servers, timeout())
                res[plan.kind]["servers"] = len(servers)
            publish()
        if "tracemalloc" in clients:
            against_one(Plan("tracemalloc", (n, n + n // 2), tracemalloc=True))
        # Last, with what is left of the budget: its steps after N stop dialing in time
        # for its quiet window and the report.
        if "scale" in clients:
            against_one(
                Plan(
                    "scale",
                    (n, 5 * n, 10 * n),
                    quiet_last_s=quiet_last,
                    deadline_at=time.time() + deadline.left(),
                    reserve_s=quiet_last + 2 * SETTLE_S + 12,
                )
            )
    return publish().as_dict()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--connections", type=int, default=None, help="N (default 1000)")
    parser.add_argument(
        "--budget", type=float, default=BUDGET_S, help="seconds; the 10N step stops in time"
    )
    parser.add_argument(
        "--clients",
        default=",".join(CLIENTS),
        help="comma-separated subset (printed, not written), e.g. scale --budget 500",
    )
    args = parser.parse_args()
    chosen = tuple(c for c in args.clients.split(",") if c)
    unknown = set(chosen) - set(CLIENTS)
    if unknown:
        parser.error(f"unknown clients {sorted(unknown)}; known: {', '.join(CLIENTS)}")
    print(json.dumps(main(args.quick, args.connections, args.budget, chosen), indent=2))
