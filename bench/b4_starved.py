"""B4 continued: a starved host and a black hole under 1,000 connections.

    python -m bench.b4_starved [--quick] [--connections N] [--window S] [--quiet S]

Issue 13 ("A node with thousands of connections (2)"), item 6. Everything happens in one
``TwoPathTopology`` (tests/rig/netns.py, IPv4): a client namespace with two addresses, the
primary 10.77.1.2 (veth c0) and the failover address 10.77.2.2 (c1), and a server namespace
with the stock aioquic echo server on 10.77.0.1 (its own process; its one socket's receive
buffer raised to 16 MiB with SO_RCVBUFFORCE, as ``tests/test_node_health_netns.py`` does:
1,000 connections' flights overflow the kernel default). The client is its own process too,
living in the client namespace (so the supervisor binds its addresses as a user's program
would), with ``FailoverPolicy()`` at its defaults and telemetry on (a batch span processor
into a discarding exporter, as in B4). Each connection is dialled from the primary address
and gets a validated standby path from the failover address.

In this order, each figure beside a baseline of the same run:

1. **Baseline, one connection** (quiet host): a single connection x 2 paths with a paced echo
   stream; the primary address is black-holed (nft drops on the receiving side of both ends,
   ``tests.rig.netns.blackhole``: silence, no error anywhere) at a random phase of the
   stream's pacing; time from the drop to its failover ``EvtConnectionMigrationStarted``
   (detection) and ``...Completed`` (detection + failover). Repeated, a fresh supervisor each.
2. **Black hole under N (1,000)**: N x 2 paths in one supervisor, every connection carrying a
   paced echo stream (``CHUNK`` bytes every ``PERIOD`` s: 1 KiB/s, phases spread evenly);
   the primary address is black-holed the same way: time from the drop until the last
   connection moved (its failover ``Completed``), moved / failed counts; goal: within the
   one-connection time + 1.0 s. The drop is lifted and the primary paths come back to standby.
3. **Contention windows** (the N connections stay open, now on the failover address with the
   primary as standby; ``--paced`` of them, 500 by default, go on pacing: why not 1,000 is
   measured and said at ``WINDOW_PACED``): a quiet window (the same-run baseline), then ``--window``
   s (60) with 3 CPU-burning processes beside the client and server on the 2 cores, then
   ``--window`` s with the client process alone in a cgroup with a CPU quota of 50 % (cgroup
   v2 ``cpu.max``; where the v2 hierarchy has no cpu controller, as on this host's hybrid
   layout, v1's ``cpu.cfs_quota_us``: the same CFS bandwidth control; or "unavailable: why").
   Per window: false failovers (failover migrations started on connections nothing was done
   to), rollbacks (``outcome == "rolled_back"``, any connection), paths marked failed or
   degraded on those connections, the loop lag (``Supervisor.health_status().loop_lag_s``,
   stalls within the last minute, sampled every 5 s), client and server CPU, echo gaps; and
   the positive control: at t = window / 2 (30 s) one connection's active path is black-holed
   (nft drops on its local port, both ends) and must fail over: its detection + failover time
   beside the one-connection time of (1).

Durations are measurements, never asserts. The bench's own process owns everything it creates
(namespaces, server, client, busy processes, cgroup) and removes it in ``finally`` (Ctrl-C and
SIGTERM included; stale namespaces and empty ``qs-bench-*`` cgroups of a killed run are removed
at the next start; the busy processes and the client die with the bench: PR_SET_PDEATHSIG).
Results: ``bench/results/b4_starved.json`` (``--quick``: ``bench/results/quick/``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import json
import multiprocessing as mp
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

from bench._common import Figure, Report, proc_cpu_s, raise_nofile, summary, write_result
from bench._server import ChildProcess, answer_pipe, die_with_parent

NAME = "b4_starved"
SERVER_V4 = "10.77.0.1"
PRIMARY = "10.77.1.2"  # TwoPathTopology path 0 (c0)
FAILOVER = "10.77.2.2"  # TwoPathTopology path 1 (c1)
CHUNK = 1024  # bytes per write of each paced echo stream ...
PERIOD = 1.0  # ... every PERIOD seconds: 1 KiB/s per connection
PARALLEL = 32  # dials in flight
SERVER_RCVBUF = 16 * 1024 * 1024
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SERVER_IDLE_S = 60.0
CLIENT_IDLE_S = 60.0
BURNERS = 3
QUOTA_PCT = 50
#: Paced connections in the contention windows. 1,000 is too many for this 2-core machine
#: under contention: its paced streams alone take ~45 % of a core in the client (and ~35-40 %
#: in the server); with 3 busy processes the client got ~26 % (echo gaps of 5-7 s instead of
#: 1 s: the loop never caught up) and under the 50 % quota it was throttled in 89 % of the
#: periods (gaps ~2 s). Measured 2026-12-04 (first full run). 500 (the second) still does
#: not fit beside 3 busy processes: the client got ~24 % of a core, its loop was late 52 s of
#: 60 and echo gaps were ~4 s; under the quota it was throttled in 45 % of the periods, gaps
#: ~2 s. A smaller N that keeps up there is still to be found (``--paced``); 500 is kept so
#: the windows stay comparable run to run. All N connections stay open (and in their health
#: groups) during the windows.
WINDOW_PACED = 500
SLACK_S = 1.0  # the issue's goal: all moved within one connection's time + 1.0 s
LAG_SAMPLE_S = 5.0
CONTROL_GRACE_S = 20.0  # how long after its window the positive control may still move
CGROUP_PREFIX = "qs-bench-"
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class Plan:
    """What the client process does (picklable: it crosses the spawn)."""

    client_ns: str
    server_port: int
    server_pid: int
    n: int
    #: Connections whose streams go on pacing in the contention windows (the rest stay open,
    #: idle): ``WINDOW_PACED``, see there.
    paced_in_windows: int
    baseline_reps: int
    quiet_s: float
    window_s: float
    settle_s: float
    chunk: int = CHUNK
    period: float = PERIOD


# ================================================================ the server process


@dataclass(frozen=True)
class _ServerSpec:
    netns: str
    certfile: str
    keyfile: str
    idle_timeout: float = SERVER_IDLE_S
    rcvbuf: int = SERVER_RCVBUF


async def _serve(spec: _ServerSpec, pipe: Pipe) -> None:
    from tests.rig.aioquic_server import echo_server
    from tests.rig.netns import create_socket_in_netns

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    on_pipe = answer_pipe(pipe, stop)

    sock = create_socket_in_netns(spec.netns, socket.AF_INET, SERVER_V4, 0)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, spec.rcvbuf)
    rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    async with echo_server(
        sock=sock, certfile=spec.certfile, keyfile=spec.keyfile, idle_timeout=spec.idle_timeout
    ) as server:
        loop.add_reader(pipe.fileno(), on_pipe)
        pipe.send((server.port, os.getpid(), rcvbuf))
        await stop.wait()
        loop.remove_reader(pipe.fileno())


def _server_child(spec: _ServerSpec, pipe: Pipe) -> None:
    import logging

    die_with_parent()
    logging.disable(logging.WARNING)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(spec, pipe))


# ================================================================ client side


def _enter_netns(name: str) -> None:
    """Move this (still single-threaded) process into namespace ``name``: threads made later
    inherit it, so the supervisor binds and routes as a program living there would."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    with open(f"/run/netns/{name}") as f:
        if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {name}: {os.strerror(err)}")


def _maddr(ip: str, port: int = 0) -> str:
    return f"/ip4/{ip}/udp/{port}/quic-v1"


def _ip_port(maddr: Any) -> tuple[str, int]:
    parts = str(maddr).split("/")
    return parts[2], int(parts[4])


class _Events:
    """Every event of a supervisor, timestamped, collected by one task (a large queue: a
    mass failover publishes several thousand events within a second)."""

    def __init__(self, sup: Any) -> None:
        self.items: list[Any] = []
        self._sub = sup.events.subscribe(maxsize=500_000)
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._pump(), name="bench-events")

    async def _pump(self) -> None:
        with contextlib.suppress(Exception):
            async for evt in self._sub:
                self.items.append(evt)
                self._changed.set()

    @property
    def dropped(self) -> int:
        return int(self._sub.dropped)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._changed.clear()
                    await self._changed.wait()
                return True
        return predicate()

    def close(self) -> None:
        self._sub.close()
        self._task.cancel()


def _kind(evt: Any) -> str:
    return type(evt).__name__


def _failover(evt: Any, kind: str) -> bool:
    return _kind(evt) == kind and getattr(evt, "reason", None) == "failover"


class _Paced:
    """One echo stream: ``chunk`` bytes every ``period`` s from ``phase`` on (a starved loop
    skips the writes it missed instead of bursting them), bytes echoed back counted, and the
    largest gap between receipts since ``reset_gap()``."""

    def __init__(self, stream: Any, chunk: int, period: float, phase: float, data: bytes):
        self.stream = stream
        self.chunk, self.period = chunk, period
        self.sent = self.received = 0
        self.error: str | None = None
        loop = asyncio.get_running_loop()
        self.last_rx = loop.time()
        self.max_gap = 0.0
        self._data = data
        self._tasks = [
            asyncio.create_task(self._write(phase)),
            asyncio.create_task(self._read()),
        ]

    async def _write(self, phase: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + phase
        try:
            while True:
                await asyncio.sleep(max(0.0, due - loop.time()))
                due += self.period
                if due < loop.time():
                    due = loop.time() + self.period
                await self.stream.write(self._data)
                self.sent += len(self._data)
        except Exception as exc:
            self.error = self.error or f"write: {type(exc).__name__}: {exc}"[:200]

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while chunk := await self.stream.read(65536):
                now = loop.time()
                self.max_gap = max(self.max_gap, now - self.last_rx)
                self.last_rx = now
                self.received += len(chunk)
        except Exception as exc:
            self.error = self.error or f"read: {type(exc).__name__}: {exc}"[:200]

    def reset_gap(self) -> None:
        self.last_rx = asyncio.get_running_loop().time()
        self.max_gap = 0.0

    def gap_now(self) -> float:
        """The largest gap so far, the one still open included."""
        return max(self.max_gap, asyncio.get_running_loop().time() - self.last_rx)

    def stop(self) -> None:
        for t in self._tasks:
            t.cancel()


class _LagProbe:
    """An independent look at the loop's stalls (beside the library's ``loop_lag_s``): a task
    that sleeps ``step`` s and records how late it woke (over 5 ms: a stall)."""

    def __init__(self, step: float = 0.05) -> None:
        self.step = step
        self.stalls: list[tuple[float, float]] = []  # (loop time it was due, seconds late)
        self._task = asyncio.create_task(self._run(), name="bench-lag-probe")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.step
            await asyncio.sleep(self.step)
            late = loop.time() - due
            if late > 0.005:
                self.stalls.append((due, late))

    def between(self, t0: float, t1: float) -> dict[str, Any]:
        xs = [(due, late) for due, late in self.stalls if t0 <= due < t1]
        top = sorted(xs, key=lambda x: -x[1])[:5]
        return {
            "stalled_s": round(sum(late for _, late in xs), 3),
            "max_s": round(max((late for _, late in xs), default=0.0), 3),
            "over_100ms": sum(1 for _, late in xs if late > 0.1),
            "top": [{"at_s": round(due - t0, 2), "late_s": round(late, 3)} for due, late in top],
        }

    def stop(self) -> None:
        self._task.cancel()


def _providers() -> tuple[Any, Any]:
    from bench.b4_scale import _providers as b4_providers

    return b4_providers()


def _supervisor(telemetry: bool = True) -> Any:
    from supervisor import FailoverPolicy, Supervisor

    tracer, meter = _providers() if telemetry else (None, None)
    return Supervisor(
        enable_experimental_connection_migration=True,
        failover=FailoverPolicy(),
        tracer_provider=tracer,
        meter_provider=meter,
    )


class _Drop:
    """Silent loss made with nft on the input hook of both ends. The (empty) tables are made
    beforehand, so the drop itself is one rule per side; the client side goes first: from
    the moment its rule is in, the client hears nothing on that path (``t`` is that moment,
    wall clock like the events' ``time``), and the server side follows."""

    def __init__(self, client_ns: str, server_ns: str) -> None:
        from tests.rig.netns import NftTable

        self.client = NftTable(client_ns)
        try:
            self.server = NftTable(server_ns)
        except BaseException:
            self.client.close()
            raise
        self.t: float | None = None
        self.nft_s: float | None = None

    def _apply(self, client_rule: str, server_rule: str) -> float:
        t0 = time.perf_counter()
        self.client.add("input", client_rule)
        self.t = time.time()
        self.nft_s = round(time.perf_counter() - t0, 4)
        self.server.add("input", server_rule)
        return self.t

    def address(self, ip: str) -> float:
        """Everything to and from ``ip``."""
        return self._apply(
            f"ip daddr {ip} meta l4proto udp counter drop",
            f"ip saddr {ip} meta l4proto udp counter drop",
        )

    def port(self, ip: str, port: int) -> float:
        """One path: datagrams to ``ip:port`` and from it."""
        return self._apply(
            f"ip daddr {ip} udp dport {port} counter drop",
            f"ip saddr {ip} udp sport {port} counter drop",
        )

    def close(self) -> None:
        for table in (self.client, self.server):
            with contextlib.suppress(Exception):
                table.close()

    @classmethod
    async def make(cls, client_ns: str, server_ns: str) -> _Drop:
        return await asyncio.to_thread(cls, client_ns, server_ns)

    async def lift(self) -> None:
        await asyncio.to_thread(self.close)


async def _dial_one(sup: Any, plan: Plan) -> Any:
    conn = await sup.dial(
        _maddr(SERVER_V4, plan.server_port),
        alpn_protocols=["echo"],
        verify=False,
        local_addr=_maddr(PRIMARY),
        idle_timeout=CLIENT_IDLE_S,
        timeout=30.0,
    )
    path = await conn.as_migratable().add_path(_maddr(FAILOVER))
    await path.probe(timeout=30.0)
    return conn


def _active(conn: Any) -> tuple[str, int] | None:
    try:
        return _ip_port(conn.as_migratable().active_path().local_addr)
    except Exception:
        return None


async def _single(plan: Plan, server_ns: str, rep: int) -> dict[str, Any]:
    """One connection x 2 paths with a paced stream; the primary address black-holed at a
    random phase of the pacing: detection and detection + failover times."""
    out: dict[str, Any] = {"rep": rep}
    async with _supervisor() as sup:
        events = _Events(sup)
        conn = await _dial_one(sup, plan)
        stream = await conn.open_stream()
        paced = _Paced(stream, plan.chunk, plan.period, 0.0, os.urandom(plan.chunk))
        drop = await _Drop.make(plan.client_ns, server_ns)
        # Warm (RTT estimate, group membership), then a random phase of the pacing.
        await asyncio.sleep(2.0 + random.uniform(0.0, plan.period))
        try:
            t_drop = await asyncio.to_thread(drop.address, PRIMARY)
            out["nft_s"] = drop.nft_s
            ok = await events.wait_for(
                lambda: (
                    any(_failover(e, "EvtConnectionMigrationCompleted") for e in events.items)
                    or any(_failover(e, "EvtConnectionMigrationFailed") for e in events.items)
                ),
                timeout=20.0,
            )
        finally:
            await drop.lift()
        started = [e for e in events.items if _failover(e, "EvtConnectionMigrationStarted")]
        done = [e for e in events.items if _failover(e, "EvtConnectionMigrationCompleted")]
        failed = [e for e in events.items if _failover(e, "EvtConnectionMigrationFailed")]
        out["moved"] = bool(done)
        if started:
            out["detect_s"] = round(started[0].time - t_drop, 4)
        if done:
            out["failover_s"] = round(done[0].time - t_drop, 4)
        if failed:
            out["failed"] = f"{failed[0].outcome}: {failed[0].error}"[:200]
        if not ok:
            out["timeout"] = "no failover within 20 s"
        paced.stop()
        events.close()
        with contextlib.suppress(Exception):
            await conn.close()
    return out


class _Parent:
    """The client's line to the bench process (busy processes, cgroup): one request, one
    reply, off the loop."""

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe

    def _ask(self, msg: dict[str, Any]) -> Any:
        self.pipe.send(msg)
        return self.pipe.recv()

    async def ask(self, **msg: Any) -> Any:
        return await asyncio.to_thread(self._ask, msg)


async def _many(plan: Plan, server_ns: str, parent: _Parent, out: dict[str, Any]) -> None:
    """The N connections: dial, streams, black hole, then the windows."""
    loop = asyncio.get_running_loop()
    async with _supervisor() as sup:
        events = _Events(sup)
        probe = _LagProbe()
        conns: list[Any] = []
        failures: list[str] = []
        gate = asyncio.Semaphore(PARALLEL)

        async def one() -> None:
            async with gate:
                try:
                    conns.append(await _dial_one(sup, plan))
                except Exception as exc:
                    failures.append(f"{type(exc).__name__}: {exc}"[:200])

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(plan.n)))
        out["dial"] = {
            "n": len(conns),
            "dial_and_probe_s": round(time.perf_counter() - t0, 2),
            "failed": len(failures),
            "failure_sample": failures[:3],
        }
        print(f"b4_starved: dialled {out['dial']}", file=sys.stderr, flush=True)
        data = os.urandom(plan.chunk)
        streams = await asyncio.gather(*(c.open_stream() for c in conns))
        paced = [
            _Paced(s, plan.chunk, plan.period, plan.period * i / max(len(conns), 1), data)
            for i, s in enumerate(streams)
        ]
        await asyncio.sleep(plan.settle_s)
        status = await sup.health_status()
        out["settled"] = {"groups": status.groups, "members": status.members}

        # ---- 2. black hole of the primary address under N
        out["blackhole"] = await _blackhole(plan, server_ns, sup, events, probe, conns)
        print(f"b4_starved: black hole {out['blackhole']}", file=sys.stderr, flush=True)
        out["revived"] = await _revived(conns, PRIMARY, timeout=30.0)

        # ---- 3. windows: the first ``paced_in_windows`` connections go on pacing
        m = min(plan.paced_in_windows, len(conns))
        for p in paced[m:]:
            p.stop()
        out["paced_in_windows"] = m
        windows: list[dict[str, Any]] = []
        out["windows"] = windows
        kinds = [("quiet", plan.quiet_s), ("burners", plan.window_s), ("cpu_quota", plan.window_s)]
        used: set[int] = set()
        for w, (kind, length) in enumerate(kinds):
            await asyncio.sleep(plan.settle_s)
            pick = _pick_control(conns[:m], paced[:m], used, w)
            res = await _window(
                plan, server_ns, sup, events, probe, conns, paced, parent, kind, length, pick
            )
            windows.append(res)
            print(f"b4_starved: window {kind}: {_brief(res)}", file=sys.stderr, flush=True)
        out["echo"] = {
            "sent": sum(p.sent for p in paced),
            "received": sum(p.received for p in paced),
            "errors": sum(1 for p in paced if p.error),
            "error_sample": [p.error for p in paced if p.error][:3],
        }
        out["events_dropped"] = events.dropped
        out["migration_stats"] = dataclasses.asdict(await sup.migration_stats())
        out["health_status"] = dataclasses.asdict(await sup.health_status())
        out["elapsed_loop_s"] = round(loop.time(), 1)


def _pick_control(conns: list[Any], paced: list[_Paced], used: set[int], w: int) -> int:
    """A connection for the positive control: not used before, its stream healthy."""
    n = len(conns)
    for k in range(n):
        i = (n // 4 * (w + 1) + 7 * k) % n
        if i not in used and paced[i].error is None and _active(conns[i]) is not None:
            used.add(i)
            return i
    return 0


async def _blackhole(
    plan: Plan, server_ns: str, sup: Any, events: _Events, probe: _LagProbe, conns: list[Any]
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    on_primary = {c.conn_id for c in conns if (_active(c) or ("", 0))[0] == PRIMARY}
    drop = await _Drop.make(plan.client_ns, server_ns)
    mark = len(events.items)
    c0, s0, w0 = time.process_time(), proc_cpu_s(plan.server_pid), loop.time()
    t_drop = await asyncio.to_thread(drop.address, PRIMARY)

    def new() -> list[Any]:
        return events.items[mark:]

    def settled() -> bool:
        done = {e.conn_id for e in new() if _failover(e, "EvtConnectionMigrationCompleted")}
        closed = {
            e.conn_id
            for e in new()
            if _failover(e, "EvtConnectionMigrationFailed") and e.connection_closed
        }
        return on_primary <= done | closed

    try:
        ok = await events.wait_for(settled, timeout=60.0)
    finally:
        cpu, server_cpu = time.process_time() - c0, proc_cpu_s(plan.server_pid) - s0
        wall = loop.time() - w0
        await drop.lift()
    evs = new()
    started = [e for e in evs if _failover(e, "EvtConnectionMigrationStarted")]
    done = [e for e in evs if _failover(e, "EvtConnectionMigrationCompleted")]
    failed = [e for e in evs if _failover(e, "EvtConnectionMigrationFailed")]
    moved = {e.conn_id for e in done} & on_primary
    rolled = [e for e in evs if _kind(e) == "EvtConnectionMigrationFailed"]
    status = await sup.health_status()
    stats = await sup.migration_stats()
    began = {e.conn_id: e.time for e in started}
    return {
        "client_cpu_pct": round(100 * cpu / max(wall, 1e-9), 1),
        "server_cpu_pct": round(100 * server_cpu / max(wall, 1e-9), 1),
        "client_cpu_ms_per_migration": round(1000 * cpu / max(len(done), 1), 3),
        "migration_s": summary([e.time - began[e.conn_id] for e in done if e.conn_id in began]),
        "herd": {
            "waited": stats.waited,
            "max_wait_s": stats.max_wait_s,
            "max_queued": stats.max_queued,
        },
        "on_primary": len(on_primary),
        "moved": len(moved),
        "not_moved": len(on_primary - moved),
        "failed_attempts": len(failed),
        "failed_outcomes": _count(getattr(e, "outcome", "?") for e in rolled),
        "failed_sample": [f"{e.outcome}: {e.error}"[:160] for e in failed[:3]],
        "first_started_s": round(min(e.time for e in started) - t_drop, 3) if started else None,
        "first_moved_s": round(min(e.time for e in done) - t_drop, 3) if done else None,
        "all_moved_s": round(max(e.time for e in done) - t_drop, 3) if done else None,
        "started_spread": summary([e.time - t_drop for e in started]),
        "moved_spread": summary([e.time - t_drop for e in done]),
        "timed_out": not ok,
        "nft_s": drop.nft_s,
        "verdicts": dict(status.verdicts),
        "loop_lag_s": status.loop_lag_s,
        "probe_stalls": probe.between(t0, loop.time()),
    }


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[str(x)] = out.get(str(x), 0) + 1
    return out


async def _revived(conns: list[Any], ip: str, timeout: float) -> dict[str, Any]:
    """Wait (bounded) until every connection's path from ``ip`` is standby again."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    def states() -> dict[str, int]:
        counts: dict[str, int] = {}
        for c in conns:
            with contextlib.suppress(Exception):
                for p in c.as_migratable().available_paths():
                    if _ip_port(p.local_addr)[0] == ip:
                        counts[str(p.state)] = counts.get(str(p.state), 0) + 1
        return counts

    while loop.time() - t0 < timeout:
        s = states()
        if s.get("standby", 0) + s.get("active", 0) >= len(conns):
            break
        await asyncio.sleep(0.25)
    return {"s": round(loop.time() - t0, 2), "states": states()}


async def _window(
    plan: Plan,
    server_ns: str,
    sup: Any,
    events: _Events,
    probe: _LagProbe,
    conns: list[Any],
    paced: list[_Paced],
    parent: _Parent,
    kind: str,
    length: float,
    control: int,
) -> dict[str, Any]:
    """One window: set up the contention, a positive control half-way, count what moved."""
    loop = asyncio.get_running_loop()
    out: dict[str, Any] = {"kind": kind, "window_s": length, "loadavg": os.getloadavg()[0]}
    t_setup = loop.time()
    if kind == "burners":
        out["setup"] = await parent.ask(op="burn", count=BURNERS)
    elif kind == "cpu_quota":
        out["setup"] = await parent.ask(op="quota", pct=QUOTA_PCT)
    unavailable = isinstance(out.get("setup"), dict) and out["setup"].get("unavailable")
    if unavailable:
        out["unavailable"] = unavailable
        return out
    mark = len(events.items)
    stats0 = await sup.migration_stats()
    h0 = await sup.health_status()
    for p in paced:
        p.reset_gap()
    c0, s0, t0 = time.process_time(), proc_cpu_s(plan.server_pid), loop.time()
    wall0 = time.time()
    lags: list[tuple[float, float]] = []  # (s into the window, loop_lag_s)
    control_conn = conns[control]
    ctrl: dict[str, Any] = {"index": control, "conn_id": control_conn.conn_id}
    drop = await _Drop.make(plan.client_ns, server_ns)
    t_drop: float | None = None
    try:
        half = t0 + length / 2
        while loop.time() < half:
            await asyncio.sleep(min(LAG_SAMPLE_S, max(0.0, half - loop.time())))
            lags.append((round(loop.time() - t0, 1), (await sup.health_status()).loop_lag_s))
        where = _active(control_conn)
        ctrl["path"] = f"{where[0]}:{where[1]}" if where else None
        if where is not None:
            t_drop = await asyncio.to_thread(drop.port, *where)
            ctrl["at_s"] = round(t_drop - wall0, 2)
            ctrl["nft_s"] = drop.nft_s
        end = t0 + length
        while loop.time() < end:
            await asyncio.sleep(min(LAG_SAMPLE_S, max(0.0, end - loop.time())))
            lags.append((round(loop.time() - t0, 1), (await sup.health_status()).loop_lag_s))
    finally:
        if kind == "burners":
            out["teardown"] = await parent.ask(op="unburn")
        elif kind == "cpu_quota":
            out["teardown"] = await parent.ask(op="unquota")
    wall = loop.time() - t0
    cpu, server_cpu = time.process_time() - c0, proc_cpu_s(plan.server_pid) - s0
    cid = control_conn.conn_id

    def control_done() -> bool:
        return any(
            e.conn_id == cid and _kind(e) == "EvtConnectionMigrationCompleted"
            for e in events.items[mark:]
        )

    # The tail: what the window set off shows up within a few seconds of its end; the
    # control, if it has not moved yet, gets CONTROL_GRACE_S more (its figure says so).
    await asyncio.sleep(plan.settle_s)
    if t_drop is not None and not control_done():
        await events.wait_for(control_done, timeout=CONTROL_GRACE_S)
    await drop.lift()
    out["probe_stalls_setup"] = probe.between(t_setup, t0)
    out["probe_stalls_after"] = probe.between(t0 + wall, loop.time())
    evs = events.items[mark:]

    def innocent(e: Any) -> bool:
        return e.conn_id != cid or t_drop is None or e.time < t_drop

    false_started = [
        e for e in evs if _failover(e, "EvtConnectionMigrationStarted") and innocent(e)
    ]
    rollbacks = [
        e for e in evs if _kind(e) == "EvtConnectionMigrationFailed" and e.outcome == "rolled_back"
    ]
    other_failed = [
        e for e in evs if _kind(e) == "EvtConnectionMigrationFailed" and e.outcome != "rolled_back"
    ]
    path_changes = [e for e in evs if _kind(e) == "EvtPathStateChanged" and innocent(e)]
    mine = [e for e in evs if e.conn_id == cid and t_drop is not None and e.time >= t_drop]
    started = [e for e in mine if _failover(e, "EvtConnectionMigrationStarted")]
    done = [e for e in mine if _failover(e, "EvtConnectionMigrationCompleted")]
    if t_drop is not None:
        ctrl["detect_s"] = round(started[0].time - t_drop, 4) if started else None
        ctrl["failover_s"] = round(done[0].time - t_drop, 4) if done else None
        ctrl["moved"] = bool(done)
        ctrl["moved_before_window_end"] = bool(done) and done[0].time < wall0 + wall
        ctrl["events"] = [
            f"{_kind(e)}:{getattr(e, 'reason', getattr(e, 'new', ''))}" for e in mine
        ][:8]
    stats1 = await sup.migration_stats()
    h1 = await sup.health_status()
    gaps = [p.gap_now() for i, p in enumerate(paced[: plan.paced_in_windows]) if i != control]
    out.update(
        {
            "measured_s": round(wall, 2),
            "false_failovers": len(false_started),
            "false_failover_conns": len({e.conn_id for e in false_started}),
            "false_failover_sample": [
                {
                    "conn": e.conn_id,
                    "at_s": round(e.time - wall0, 2),
                    "from": str(e.from_local_addr),
                    "to": str(e.to_local_addr),
                }
                for e in false_started[:5]
            ],
            "rollbacks": len(rollbacks),
            "rollback_sample": [f"{e.reason}: {e.error}"[:160] for e in rollbacks[:3]],
            "other_failed": _count(f"{e.reason}/{e.outcome}" for e in other_failed),
            "path_changes_innocent": _count(f"{e.old}->{e.new}" for e in path_changes),
            "completed_delta": stats1.completed - stats0.completed,
            "failed_delta": {
                k: v - stats0.failed.get(k, 0)
                for k, v in stats1.failed.items()
                if v - stats0.failed.get(k, 0)
            },
            "loop_lag_s": {
                "before": h0.loop_lag_s,
                "samples": lags,
                "max": max(v for _, v in lags) if lags else None,
                "at_end": lags[-1][1] if lags else None,
            },
            "probe_stalls": probe.between(t0, t0 + wall),
            "client_cpu_pct": round(cpu / wall * 100, 1),
            "server_cpu_pct": round(server_cpu / wall * 100, 1),
            "echo_gap_s": summary(gaps),
            "verdicts_delta": {
                k: v - h0.verdicts.get(k, 0)
                for k, v in h1.verdicts.items()
                if v - h0.verdicts.get(k, 0)
            },
            "keepalives_per_s": {
                k: round((v - h0.keepalives.get(k, 0)) / wall, 1) for k, v in h1.keepalives.items()
            },
            "control": ctrl,
        }
    )
    return out


def _brief(res: dict[str, Any]) -> str:
    if "unavailable" in res:
        return f"unavailable: {res['unavailable']}"
    c = res.get("control", {})
    return (
        f"false failovers {res.get('false_failovers')}, rollbacks {res.get('rollbacks')}, "
        f"lag {res.get('loop_lag_s', {}).get('at_end')}, probe {res.get('probe_stalls')}, "
        f"client cpu {res.get('client_cpu_pct')} "
        f"%, control {c.get('failover_s')} s, paths {res.get('path_changes_innocent')}"
    )


async def _client_async(plan: Plan, server_ns: str, pipe: Pipe) -> dict[str, Any]:
    import logging

    logging.disable(logging.WARNING)
    raise_nofile(4 * plan.n + 1024)
    parent = _Parent(pipe)
    out: dict[str, Any] = {"plan": dataclasses.asdict(plan)}
    singles: list[dict[str, Any]] = []
    out["single"] = singles
    try:
        for rep in range(plan.baseline_reps):
            singles.append(await _single(plan, server_ns, rep))
            print(f"b4_starved: single {singles[-1]}", file=sys.stderr, flush=True)
        await _many(plan, server_ns, parent, out)
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()[-3000:]
    return out


def _client_main(plan: Plan, server_ns: str, pipe: Pipe) -> None:
    """The client process: enter the client namespace, measure, send, leave at once
    (closing N connections is no part of this bench)."""
    die_with_parent()
    try:
        _enter_netns(plan.client_ns)
        res = asyncio.run(_client_async(plan, server_ns, pipe))
    except BaseException as exc:
        res = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    with contextlib.suppress(Exception):
        pipe.send({"op": "result", "result": res})
    sys.stderr.flush()
    os._exit(0)


# ================================================================ bench side: contention


BURN = """
import ctypes, os, signal, time
ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))
if os.getppid() == 1:
    raise SystemExit
end = time.monotonic() + {limit}
x = 0
while time.monotonic() < end:
    for _ in range(200000):
        x += 1
"""


class Burners:
    """CPU-burning processes (children of the bench; they die with it and after ``limit``)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, count: int, limit: float) -> dict[str, Any]:
        for _ in range(count):
            self.procs.append(subprocess.Popen([sys.executable, "-c", BURN.format(limit=limit)]))
        return {"pids": [p.pid for p in self.procs], "count": count}

    def stop(self) -> dict[str, Any]:
        cpu = {}
        for p in self.procs:
            with contextlib.suppress(Exception):
                cpu[p.pid] = round(proc_cpu_s(p.pid), 1)
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.procs.clear()
        return {"cpu_s": cpu}


def _mounts() -> list[tuple[str, str, list[str]]]:
    """(mount point, fs type, super options) of every cgroup mount."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        fstype, _source, superopts = right.split()[:3]
        if fstype in ("cgroup", "cgroup2"):
            out.append((left.split()[4], fstype, superopts.split(",")))
    return out


def _cgroup_of(pid: int, v2: bool) -> str:
    """The cgroup path of ``pid`` in the v2 hierarchy, or in v1's cpu hierarchy."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        num, ctrls, path = line.split(":", 2)
        if v2 and num == "0" and ctrls == "":
            return path
        if not v2 and "cpu" in ctrls.split(","):
            return path
    return "/"


class CpuQuota:
    """A child cgroup with a CPU quota of ``pct`` % of one CPU for one process; ``leave()``
    moves the process back and removes the cgroup (idempotent)."""

    def __init__(self) -> None:
        self.dir: Path | None = None
        self.back: Path | None = None
        self.pid: int | None = None
        self.version = 0
        self._enabled_cpu_in: Path | None = None

    @staticmethod
    def cleanup_stale() -> list[str]:
        removed = []
        for mount, _fstype, _opts in _mounts():
            with contextlib.suppress(OSError):
                for d in Path(mount).glob(f"{CGROUP_PREFIX}*"):
                    with contextlib.suppress(OSError):
                        if not (d / "cgroup.procs").read_text().strip():
                            d.rmdir()
                            removed.append(str(d))
        return removed

    def _where(self) -> tuple[int, Path, str]:
        """(version, mount, why v2 was not used)."""
        why_not_v2 = "no cgroup2 mount"
        for mount, fstype, _opts in _mounts():
            if fstype != "cgroup2":
                continue
            ctrls = (Path(mount) / "cgroup.controllers").read_text().split()
            if "cpu" in ctrls:
                return 2, Path(mount), ""
            why_not_v2 = (
                f"the cgroup2 hierarchy at {mount} has no cpu controller (controllers: "
                f"{' '.join(ctrls) or 'none'}; cpu is bound to a v1 hierarchy)"
            )
        for mount, fstype, opts in _mounts():
            if fstype == "cgroup" and "cpu" in opts:
                return 1, Path(mount), why_not_v2
        raise OSError(f"{why_not_v2}; no cgroup v1 cpu hierarchy either")

    def enter(self, pid: int, pct: int) -> dict[str, Any]:
        if os.geteuid() != 0:
            return {"unavailable": "a cgroup needs root"}
        try:
            version, mount, why_not_v2 = self._where()
        except OSError as exc:
            return {"unavailable": str(exc)}
        self.version, self.pid = version, pid
        period = 100_000
        quota = period * pct // 100
        try:
            if version == 2:
                subtree = mount / "cgroup.subtree_control"
                if "cpu" not in subtree.read_text().split():
                    subtree.write_text("+cpu")
                    self._enabled_cpu_in = subtree
            self.back = mount / _cgroup_of(pid, version == 2).lstrip("/")
            self.dir = mount / f"{CGROUP_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
            self.dir.mkdir()
            if version == 2:
                (self.dir / "cpu.max").write_text(f"{quota} {period}")
                limit = (self.dir / "cpu.max").read_text().strip()
            else:
                (self.dir / "cpu.cfs_period_us").write_text(str(period))
                (self.dir / "cpu.cfs_quota_us").write_text(str(quota))
                limit = (
                    f"cpu.cfs_quota_us={(self.dir / 'cpu.cfs_quota_us').read_text().strip()} "
                    f"cpu.cfs_period_us={(self.dir / 'cpu.cfs_period_us').read_text().strip()}"
                )
            (self.dir / "cgroup.procs").write_text(str(pid))
            info = {
                "cgroup": str(self.dir),
                "version": version,
                "limit": limit,
                "pct_of_one_cpu": pct,
                "cpu_stat_before": self._stat(),
            }
            if why_not_v2:
                info["v2_not_used"] = why_not_v2
            return info
        except OSError as exc:
            self.leave()
            return {"unavailable": f"cgroup v{version} at {mount}: {exc}"}

    def _stat(self) -> dict[str, int]:
        if self.dir is None:
            return {}
        out = {}
        with contextlib.suppress(OSError):
            for line in (self.dir / "cpu.stat").read_text().splitlines():
                k, v = line.split()
                out[k] = int(v)
        return out

    def leave(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.dir is not None:
            out["cpu_stat"] = self._stat()
            if self.pid is not None and self.back is not None:
                with contextlib.suppress(OSError):  # the process may be gone
                    (self.back / "cgroup.procs").write_text(str(self.pid))
            error = ""
            for _ in range(50):  # the move back may take a moment to show
                try:
                    self.dir.rmdir()
                    break
                except OSError as exc:
                    error = str(exc)
                    time.sleep(0.1)
            if self.dir.exists():
                out["left_behind"] = f"{self.dir}: {error}"
            self.dir = None
        if self._enabled_cpu_in is not None:
            with contextlib.suppress(OSError):
                self._enabled_cpu_in.write_text("-cpu")
            self._enabled_cpu_in = None
        self.pid = None
        return out


# ================================================================ the bench


def _serve_client(
    proc: Any, pipe: Pipe, burners: Burners, quota: CpuQuota, timeout: float, limit: float
) -> dict[str, Any]:
    """Answer the client's requests until it sends its result (or dies, or time is up)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not pipe.poll(1.0):
            if not proc.is_alive():
                return {"error": f"client process died ({proc.exitcode})"}
            continue
        try:
            msg = pipe.recv()
        except EOFError:
            return {"error": f"client process died ({proc.exitcode})"}
        op = msg.get("op")
        if op == "result":
            return dict(msg["result"])
        if op == "burn":
            pipe.send(burners.start(int(msg["count"]), limit))
        elif op == "unburn":
            pipe.send(burners.stop())
        elif op == "quota":
            pipe.send(quota.enter(proc.pid, int(msg["pct"])))
        elif op == "unquota":
            pipe.send(quota.leave())
        else:
            pipe.send({"error": f"unknown op {op!r}"})
    return {"error": f"no result within {timeout:.0f} s"}


def _sigterm(_signum: int, _frame: Any) -> None:
    raise SystemExit(143)


def measure(plan_args: dict[str, Any], quick: bool) -> dict[str, Any]:
    """Set up, run the client, clean up; the client's figures plus the bench's own."""
    from bench._server import make_cert
    from tests.rig.netns import TwoPathTopology, cleanup_stale, netns_available

    ok, why = netns_available()
    if not ok:
        return {"unavailable": why}
    cleanup_stale()
    stale_cgroups = CpuQuota.cleanup_stale()
    burners, quota = Burners(), CpuQuota()
    previous = signal.signal(signal.SIGTERM, _sigterm)
    t_start = time.monotonic()
    res: dict[str, Any] = {}
    proc = None
    try:
        with (
            tempfile.TemporaryDirectory(prefix="qs-bench-") as tmp,
            TwoPathTopology(ipv6=False) as topo,
        ):
            cert = make_cert(tmp)
            server = ChildProcess(
                _server_child, _ServerSpec(topo.server.name, *cert), "b4_starved server"
            )
            try:
                port, server_pid, rcvbuf = server.started
                plan = Plan(
                    client_ns=topo.client.name,
                    server_port=port,
                    server_pid=server_pid,
                    **plan_args,
                )
                budget = (
                    plan.baseline_reps * 10
                    + plan.quiet_s
                    + 2 * plan.window_s
                    + 5 * plan.settle_s
                    + plan.n * 0.06
                    + 150
                )
                ctx = mp.get_context("spawn")
                parent_end, child_end = ctx.Pipe(duplex=True)
                proc = ctx.Process(
                    target=_client_main, args=(plan, topo.server.name, child_end), daemon=True
                )
                proc.start()
                child_end.close()
                try:
                    res = _serve_client(
                        proc, parent_end, burners, quota, budget, plan.window_s + 60
                    )
                finally:
                    burners.stop()
                    quota.leave()
                    proc.join(10)
                    if proc.is_alive():
                        proc.kill()
                        proc.join(5)
                    parent_end.close()
                res["server"] = {"rcvbuf": rcvbuf, "pid": server_pid}
            finally:
                server.stop()
    finally:
        burners.stop()
        quota.leave()
        signal.signal(signal.SIGTERM, previous)
    res["stale_cgroups_removed"] = stale_cgroups
    res["elapsed_s"] = round(time.monotonic() - t_start, 1)
    return res


# ================================================================ figures


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 4) if xs else None


def _figures(report: Report, res: dict[str, Any]) -> None:
    plan = res.get("plan", {})
    n = plan.get("n", "?")
    singles = res.get("single", [])
    base_fo = [s["failover_s"] for s in singles if s.get("failover_s") is not None]
    base_det = [s["detect_s"] for s in singles if s.get("detect_s") is not None]
    base = _median(base_fo)
    base_summary = {
        "one connection, drop -> moved s": summary(base_fo) if base_fo else None,
        "detection s": _median(base_det),
    }
    if "unavailable" in res or ("error" in res and not res.get("blackhole")):
        why = res.get("unavailable") or res.get("error")
        report.add(
            Figure(
                "B4s",
                f"black hole under {n} conns",
                "all moved within one connection's time + 1.0 s",
                "s",
                {"unavailable": why},
            )
        )
        return
    bh = res.get("blackhole", {})
    all_s = bh.get("all_moved_s")
    met = (
        None
        if all_s is None or base is None
        else all_s <= base + SLACK_S and bh.get("not_moved") == 0
    )
    report.add(
        Figure(
            "B4s",
            f"black hole of the primary address under {bh.get('on_primary')} conns x 2 paths "
            f"(paced 1 KiB/s echo each): drop -> last moved",
            "<= one connection's + 1.0 s, all moved, 0 failed",
            "s",
            all_s,
            baseline=base_summary,
            met=met,
            note=f"moved {bh.get('moved')}/{bh.get('on_primary')}, failed attempts "
            f"{bh.get('failed_attempts')} {bh.get('failed_outcomes')}; first failover started "
            f"{bh.get('first_started_s')} s, first moved {bh.get('first_moved_s')} s; moved at "
            f"(s after the drop) {_fmt_spread(bh.get('moved_spread'))}; verdicts "
            f"{bh.get('verdicts')}; one connection: detection {base_det}, moved {base_fo} s "
            f"(fresh supervisor each, the same drop, a random phase of its pacing); "
            f"each failover took {_fmt_spread(bh.get('migration_s'))} s from Started to "
            f"Completed, herd {bh.get('herd')}; client CPU {bh.get('client_cpu_pct')} % of a "
            f"core ({bh.get('client_cpu_ms_per_migration')} ms per failover, the paced "
            f"streams and the retransmissions into the black hole included), server "
            f"{bh.get('server_cpu_pct')} %; "
            f"dial+probe of {res.get('dial', {}).get('n')}: "
            f"{res.get('dial', {}).get('dial_and_probe_s')} s",
        )
    )
    windows = {w["kind"]: w for w in res.get("windows", [])}
    quiet = windows.get("quiet", {})
    for kind, label in (("burners", f"{BURNERS} busy processes"), ("cpu_quota", "CPU quota 50 %")):
        w = windows.get(kind)
        if w is None:
            continue
        if "unavailable" in w:
            report.add(
                Figure(
                    "B4s",
                    f"false failovers / rollbacks, {label}",
                    "0 / 0",
                    "",
                    {"unavailable": w["unavailable"]},
                )
            )
            continue
        ff, rb = w.get("false_failovers"), w.get("rollbacks")
        setup = w.get("setup", {})
        report.add(
            Figure(
                "B4s",
                f"false failovers / rollbacks in {w.get('measured_s')} s, {n} conns open, "
                f"{res.get('paced_in_windows')} of them with paced 1 KiB/s echo, {label}",
                "0 / 0",
                "",
                {"false failovers": ff, "rollbacks": rb},
                baseline={
                    f"quiet {quiet.get('measured_s')} s": {
                        "false failovers": quiet.get("false_failovers"),
                        "rollbacks": quiet.get("rollbacks"),
                    }
                },
                met=None if ff is None or rb is None else ff == 0 and rb == 0,
                note=f"connections falsely failed over {w.get('false_failover_conns')}; path "
                f"changes on untouched connections {w.get('path_changes_innocent')}; other "
                f"failed migrations {w.get('other_failed')}; verdicts {w.get('verdicts_delta')};"
                f" loop lag max {w.get('loop_lag_s', {}).get('max')} s/min (quiet "
                f"{quiet.get('loop_lag_s', {}).get('max')}); client CPU "
                f"{w.get('client_cpu_pct')} % (quiet {quiet.get('client_cpu_pct')} %), server "
                f"{w.get('server_cpu_pct')} %; largest echo gap per connection "
                f"{_fmt_spread(w.get('echo_gap_s'))} s"
                + (
                    f"; cgroup v{setup.get('version')} {setup.get('limit')}"
                    f"{' (' + setup['v2_not_used'] + ')' if setup.get('v2_not_used') else ''};"
                    f" throttled {_throttle(w)}"
                    if kind == "cpu_quota"
                    else ""
                ),
            )
        )
        c = w.get("control", {})
        got = c.get("failover_s")
        report.add(
            Figure(
                "B4s",
                f"positive control, {label}: one connection's active path black-holed at "
                f"t = {c.get('at_s')} s, drop -> moved",
                "fails over within one connection's quiet time + 1.0 s",
                "s",
                got,
                baseline={
                    "one connection, quiet host s": base,
                    "same conns, quiet window s": quiet.get("control", {}).get("failover_s"),
                },
                met=None if base is None else got is not None and got <= base + SLACK_S,
                note=f"detection {c.get('detect_s')} s; moved before the window ended: "
                f"{c.get('moved_before_window_end')} (it may move up to {CONTROL_GRACE_S:g} s "
                f"after); path {c.get('path')}; events "
                f"{c.get('events')}",
            )
        )

    def lag(w: dict[str, Any]) -> dict[str, Any]:
        stalls = w.get("probe_stalls", {})
        return {
            "loop_lag_s at end": w.get("loop_lag_s", {}).get("at_end"),
            "probe stalled s": stalls.get("stalled_s"),
            "probe max stall s": stalls.get("max_s"),
        }

    measured = {k: w for k, w in windows.items() if "loop_lag_s" in w}
    report.add(
        Figure(
            "B4s",
            "loop lag: the library's (health_status().loop_lag_s, stalled s within the last "
            "minute, at the window's end) and the bench's own probe (stalled s in the window)",
            "informative",
            "s",
            {k: lag(w) for k, w in measured.items() if k != "quiet"},
            baseline={"quiet": lag(quiet)} if "quiet" in measured else None,
            note="; ".join(
                f"{k}: loop_lag_s samples (s into the window, value) "
                f"{w.get('loop_lag_s', {}).get('samples')}, probe's largest stalls "
                f"{w.get('probe_stalls', {}).get('top')}, client CPU {w.get('client_cpu_pct')} "
                f"%, keep-alives/s {w.get('keepalives_per_s')}"
                for k, w in measured.items()
            ),
        )
    )


def _fmt_spread(s: dict[str, Any] | None) -> str:
    if not s or not s.get("n"):
        return "-"
    return f"median {s['median']} [p25 {s['p25']} - p75 {s['p75']}, max {s['max']}] n={s['n']}"


def _throttle(w: dict[str, Any]) -> str:
    after = w.get("teardown", {}).get("cpu_stat", {})
    before = w.get("setup", {}).get("cpu_stat_before", {})
    periods = after.get("nr_periods", 0) - before.get("nr_periods", 0)
    thr = after.get("nr_throttled", 0) - before.get("nr_throttled", 0)
    if "throttled_usec" in after:
        secs = (after["throttled_usec"] - before.get("throttled_usec", 0)) / 1e6
    else:
        secs = (after.get("throttled_time", 0) - before.get("throttled_time", 0)) / 1e9
    return f"{thr}/{periods} periods, {secs:.1f} s"


def main(
    quick: bool = False,
    connections: int | None = None,
    window: float | None = None,
    quiet: float | None = None,
    paced: int | None = None,
) -> dict[str, Any]:
    plan_args = {
        "n": connections or (100 if quick else 1000),
        "paced_in_windows": paced or (connections or 100 if quick else WINDOW_PACED),
        "baseline_reps": 2 if quick else 5,
        "quiet_s": quiet if quiet is not None else (6.0 if quick else 20.0),
        "window_s": window if window is not None else (12.0 if quick else 60.0),
        "settle_s": 2.0 if quick else 3.0,
    }
    res = measure(plan_args, quick)
    report = Report(NAME, quick=quick)
    report.detail.update(res)
    _figures(report, res)
    if "error" in res:
        report.notes.append(f"error: {res['error']}")
    report.notes.append(
        f"run took {res.get('elapsed_s')} s; server socket SO_RCVBUF "
        f"{res.get('server', {}).get('rcvbuf')}; echo {res.get('echo')}"
    )
    write_result(report)
    return report.as_dict()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--connections", type=int, default=None, help="N (default 1000)")
    parser.add_argument("--window", type=float, default=None, help="contention window s (60)")
    parser.add_argument("--quiet", type=float, default=None, help="quiet window s (20)")
    parser.add_argument(
        "--paced",
        type=int,
        default=None,
        help=f"connections pacing in the contention windows (default {WINDOW_PACED})",
    )
    args = parser.parse_args()
    print(
        json.dumps(
            main(args.quick, args.connections, args.window, args.quiet, args.paced), indent=2
        )
    )
