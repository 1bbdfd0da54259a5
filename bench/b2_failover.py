"""B2 failover: how long data stalls when the active path dies, and what recovery costs.

    python -m bench.b2_failover [--quick]

Stall = the largest gap between deliveries of echoed data (a ``PacedEcho``: 1 KiB every 2 ms).
One ``TwoPathTopology`` (tests/rig/netns.py) is reused for every trial: the connection fails
over from the dead path to the other one, the fault is lifted, the old path comes back to
standby through its keep-alives, and the next trial kills the path now active.

- (a) client-side link down (``ip link set down``: sends fail at once with ENETUNREACH);
- (b) black hole (nft drops on both ends: silence), up to 100 trials within a time budget;
- (c) recovery after detection, from ``EvtConnectionMigrationStarted`` of the failover: to the
  peer confirmed on the new path (``...Completed``), and to the first in-order echoed byte,
  vs the baseline detect-then-reconnect: a new connection over the surviving path (handshake
  done), resending what was in flight at detection (first echoed byte); on the plain
  topology and with 20 ms added RTT (NFQUEUE delayer, ``tests.rig.faults``);
- (d) the server-side gap of a migration during an HTTP/3 download from ngtcp2's
  ``gtlsserver``: our client vs ngtcp2's ``gtlsclient --change-local-addr``, both measured
  the same way (largest gap between server->client datagrams in a ``dumpcap`` capture, in the
  window around the migration), with the same download without migration as a reference.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from actors.path_state import PathState
from bench._client import PacedEcho, largest_gap
from bench._common import Deadline, Figure, Report, run, summary, write_result
from bench._server import ServerInfo, ServerSpec, added_rtt, make_cert, server_process
from supervisor import FailoverPolicy, Supervisor
from supervisor.core.events import (
    Event,
    EvtConnectionMigrationCompleted,
    EvtConnectionMigrationFailed,
    EvtConnectionMigrationStarted,
)
from supervisor.core.handles import Connection
from supervisor.core.handles import Path as QuicPath
from tests.rig.netns import Filters, TwoPathTopology, cleanup_stale, netns_available

#: Keep-alives every 0.3 s bring a lifted path back to standby sooner between trials; the
#: active path's death is judged from its own traffic (dead after 3 PTOs, >= 0.1 s) either way.
POLICY = FailoverPolicy(keepalive_interval=0.3)
Fault = Literal["link_down", "blackhole"]


@dataclass
class Trial:
    fault_at: float
    stall: float
    detect: float  # fault -> failover started
    switched: float  # failover started -> switch confirmed by the peer on the new path
    recovery: float  # failover started -> first echoed byte after it
    in_flight: int  # bytes sent but not echoed when the failover started


@dataclass
class _Events:
    items: list[Event] = field(default_factory=list)
    #: ``gauge()`` read as each event arrives (the paced echo's unanswered bytes).
    readings: list[int] = field(default_factory=list)
    gauge: Callable[[], int] = lambda: 0


@contextlib.asynccontextmanager
async def _collect(sup: Supervisor) -> AsyncIterator[_Events]:
    box = _Events()
    sub = sup.events.subscribe(
        EvtConnectionMigrationStarted, EvtConnectionMigrationCompleted, EvtConnectionMigrationFailed
    )

    async def pump() -> None:
        async for evt in sub:
            box.items.append(evt)
            box.readings.append(box.gauge())

    task = asyncio.create_task(pump())
    try:
        yield box
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _wait(predicate: Any, timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(step)
    return True


class _Rig:
    """A connection with one path per link of the topology, a paced echo, and fault switches."""

    def __init__(self, topo: TwoPathTopology, server: ServerInfo, sup: Supervisor) -> None:
        self.topo = topo
        self.server = server
        self.sup = sup

    async def open(self) -> None:
        self.conn: Connection = await self.sup.dial(
            self.server.quic_maddr,
            alpn_protocols=["echo"],
            verify=False,
            sock=self.topo.client_socket(0),
        )
        mc = self.conn.as_migratable()
        second = await mc.add_path(sock=self.topo.client_socket(1))
        await second.probe()
        first = next(p for p in mc.paths() if p.path_id != second.path_id)
        self.paths: list[QuicPath] = [first, second]
        self.echo = await PacedEcho(self.conn).start()
        await self.echo.wait_flowing(time.time())

    def active(self) -> int:
        active = self.conn.as_migratable().active_path().local_addr
        return 0 if self.paths[0].info().local_addr == active else 1

    async def close(self) -> None:
        await self.echo.stop()
        with contextlib.suppress(Exception):
            await self.conn.close()


async def _fault_trial(rig: _Rig, events: _Events, fault: Fault) -> Trial | None:
    idx = rig.active()
    other = 1 - idx
    if not await _wait(lambda: rig.paths[other].info().state is PathState.STANDBY, 10):
        return None
    await rig.echo.wait_flowing(time.time())
    seen = len(events.items)
    fault_at = time.time()
    hole: Filters | None = None
    if fault == "link_down":
        rig.topo.link_down(idx, "client")
    else:
        hole = rig.topo.blackhole(idx)
    try:

        def done() -> bool:
            return any(
                isinstance(e, EvtConnectionMigrationCompleted) and e.reason == "failover"
                for e in events.items[seen:]
            )

        if not await _wait(done, 10):
            return None
        completed = next(
            e
            for e in events.items[seen:]
            if isinstance(e, EvtConnectionMigrationCompleted) and e.reason == "failover"
        )
        k, started = next(
            (k, e)
            for k, e in enumerate(events.items[seen:], seen)
            if isinstance(e, EvtConnectionMigrationStarted) and e.reason == "failover"
        )
        in_flight = events.readings[k]
        flowing = await rig.echo.wait_flowing(time.time())
        first_after = next(t for t in rig.echo.arrivals if t > started.time)
        stall = largest_gap(rig.echo.arrivals, fault_at, flowing)
    finally:
        if hole is not None:
            hole.close()
        if fault == "link_down":
            rig.topo.link_up(idx, "client")
    return Trial(
        fault_at,
        stall,
        started.time - fault_at,
        completed.time - started.time,
        first_after - started.time,
        in_flight,
    )


async def _reconnect_baseline(
    topo: TwoPathTopology, server: ServerInfo, path: int, resend: int
) -> tuple[float, float]:
    """Detect-then-reconnect: dial over ``path`` (new handshake), resend ``resend`` bytes.
    Returns (handshake done, first echoed byte), seconds from the start."""
    async with Supervisor() as sup:
        t0 = time.perf_counter()
        conn = await sup.dial(
            server.quic_maddr, alpn_protocols=["echo"], verify=False, sock=topo.client_socket(path)
        )
        handshake = time.perf_counter() - t0
        stream = await conn.open_stream()
        await stream.write(b"\xa5" * max(1, resend))
        await stream.read(1)
        elapsed = time.perf_counter() - t0
        await conn.close()
    return handshake, elapsed


async def _failover_series(
    topo: TwoPathTopology,
    server: ServerInfo,
    fault: Fault,
    trials: int,
    budget: float,
    baselines: int = 0,
) -> dict[str, Any]:
    deadline = Deadline(budget)
    out: list[Trial] = []
    lost = 0
    base: list[tuple[float, float]] = []
    sup = Supervisor(enable_experimental_connection_migration=True, failover=POLICY)
    async with sup, _collect(sup) as events:
        rig = _Rig(topo, server, sup)
        await rig.open()
        events.gauge = lambda: max(0, rig.echo.sent - rig.echo.received)
        try:
            while len(out) < trials and not deadline.expired():
                if rig.conn.is_closed:
                    await rig.close()
                    rig = _Rig(topo, server, sup)
                    await rig.open()
                trial = await _fault_trial(rig, events, fault)
                if trial is None:
                    lost += 1
                    if lost > 5:
                        break
                    continue
                out.append(trial)
                if len(base) < baselines:
                    resend = int(statistics.median(t.in_flight for t in out))
                    base.append(await _reconnect_baseline(topo, server, rig.active(), resend))
        finally:
            await rig.close()
    return {
        "fault": fault,
        "trials": len(out),
        "trials_asked": trials,
        "unfinished": lost,
        "budget_s": budget,
        "stall_ms": summary([t.stall for t in out], 1000),
        "detect_ms": summary([t.detect for t in out], 1000),
        "switched_ms": summary([t.switched for t in out], 1000),
        "recovery_ms": summary([t.recovery for t in out], 1000),
        "in_flight_bytes": summary([t.in_flight for t in out], 1, 0),
        "reconnect_handshake_ms": summary([b[0] for b in base], 1000) if base else None,
        "reconnect_ms": summary([b[1] for b in base], 1000) if base else None,
    }


async def _true_rtt(topo: TwoPathTopology, server: ServerInfo) -> float:
    from bench._client import udp_rtts

    samples = await udp_rtts((server.host, server.udp_port), 20, sock=topo.client_socket(1))
    return statistics.median(samples)


# ------------------------------------------------------------------------------------- (d)


@contextlib.contextmanager
def _dumpcap(port: int, pcap: Path) -> Iterator[None]:
    """Capture ``udp port PORT`` on lo with dumpcap (no live decoding: cheap on 2 cores)."""
    proc = subprocess.Popen(
        ["dumpcap", "-q", "-i", "lo", "-f", f"udp port {port}", "-w", str(pcap)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # dumpcap says "Capturing on" on stderr even with -q? Not reliably: wait for the file.
        deadline = time.monotonic() + 10
        while not pcap.exists() or pcap.stat().st_size == 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dumpcap did not start: {proc.stderr and proc.stderr.read()}")
            time.sleep(0.02)
        time.sleep(0.3)  # the file header is written just before the capture really starts
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _server_flows(pcap: Path, port: int) -> list[tuple[float, tuple[str, int], int]]:
    """(time, client address, length) of each datagram the server (``port``) sent."""
    out = subprocess.run(
        [
            "tshark",
            "-n",
            "-r",
            str(pcap),
            "-Y",
            f"udp.srcport=={port}",
            "-T",
            "fields",
            "-e",
            "frame.time_epoch",
            "-e",
            "ip.dst",
            "-e",
            "udp.dstport",
            "-e",
            "udp.length",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    flows = []
    for line in out.splitlines():
        ts, ip, dport, length = line.split("\t")
        flows.append((float(ts), (ip, int(dport)), int(length or 0)))
    return flows


def _migration_gap(
    flows: list[tuple[float, tuple[str, int], int]], window: float = 0.02
) -> dict[str, Any] | None:
    """The largest server->client gap that overlaps ``window`` s around the switchover (the
    last datagram the server sent to the first client address, when it later sent to another).

    Without a migration: the largest gap over the middle 80 % of the transfer (a reference for
    the ordinary pauses of that client's download).
    """
    if not flows:
        return None
    first_addr = flows[0][1]
    times = [t for t, _, _ in flows]
    if all(addr == first_addr for _, addr, _ in flows):
        span = times[-1] - times[0]
        lo, hi = times[0] + 0.1 * span, times[-1] - 0.1 * span
        return {"migrated": False, "largest_gap_ms": round(largest_gap(times, lo, hi) * 1000, 3)}
    switch = max(t for t, addr, _ in flows if addr == first_addr)
    after = sum(1 for t, _, _ in flows if t > switch)
    if after < 0.1 * len(flows):
        # Moved at the very end: not a migration during the transfer, not comparable.
        return {"migrated": False, "late": True}
    return {
        "migrated": True,
        "gap_ms": round(largest_gap(times, switch - window, switch + window) * 1000, 3),
        "duration_s": round(times[-1] - times[0], 3),
    }


async def _ours_download(server_port: int, cafile: str, migrate_after: int, path_addr: str) -> None:
    from supervisor.h3 import http3_get

    async with Supervisor(enable_experimental_connection_migration=True) as sup:
        conn = await sup.dial(
            f"/ip4/127.0.0.1/udp/{server_port}/quic-v1", alpn_protocols=["h3"], cafile=cafile
        )
        received = 0
        midway = asyncio.Event()

        def sink(chunk: bytes) -> None:
            nonlocal received
            received += len(chunk)
            if migrate_after and received >= migrate_after:
                midway.set()

        task: asyncio.Task[None] | None = None
        if migrate_after:
            mc = conn.as_migratable()
            new = await mc.add_path(path_addr)
            await new.probe()

            async def migrate() -> None:
                await midway.wait()
                await new.switch()

            task = asyncio.create_task(migrate())
        await asyncio.wait_for(
            http3_get(conn, "/file", authority=f"localhost:{server_port}", sink=sink), 120
        )
        if task is not None:
            await asyncio.wait_for(task, 10)
        await conn.close()


def _ngtcp2_download(server_port: int, change_after: float | None) -> None:
    argv = ["gtlsclient", "-q", "--exit-on-all-streams-close"]
    if change_after is not None:
        argv.append(f"--change-local-addr={int(change_after * 1000)}ms")
    argv += ["127.0.0.1", str(server_port), f"https://localhost:{server_port}/file"]
    subprocess.run(argv, check=False, capture_output=True, timeout=120)


async def _vs_ngtcp2(cert: tuple[str, str], repeats: int, size_mb: int) -> dict[str, Any]:
    from tests.rig.ngtcp2 import gtlsserver

    if shutil.which("gtlsserver") is None or shutil.which("gtlsclient") is None:
        return {"skipped": "ngtcp2-server / ngtcp2-client not installed"}
    if shutil.which("dumpcap") is None or shutil.which("tshark") is None:
        return {"skipped": "dumpcap / tshark not installed"}
    if os.geteuid() != 0:
        return {"skipped": "packet capture needs root"}
    certfile, keyfile = cert
    rows: dict[str, list[dict[str, Any]]] = {
        "ours": [],
        "ngtcp2": [],
        "ours_no_mig": [],
        "ngtcp2_no_mig": [],
    }
    size = size_mb * 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="qs-bench-d-") as tmp:
        async with gtlsserver(
            certfile=certfile, keyfile=keyfile, size_mb=size_mb, extra_args=["-q"]
        ) as server:
            for i in range(repeats):
                for kind in ("ours", "ngtcp2", "ours_no_mig", "ngtcp2_no_mig"):
                    pcap = Path(tmp) / f"{kind}-{i}.pcapng"
                    with _dumpcap(server.port, pcap):
                        if kind.startswith("ours"):
                            # Same IP, new port: what --change-local-addr does.
                            await _ours_download(
                                server.port,
                                certfile,
                                size // 4 if kind == "ours" else 0,
                                "/ip4/127.0.0.1/udp/0/quic-v1",
                            )
                        else:
                            await asyncio.to_thread(
                                _ngtcp2_download, server.port, 0.1 if kind == "ngtcp2" else None
                            )
                    gap = _migration_gap(_server_flows(pcap, server.port))
                    if gap is not None:
                        rows[kind].append(gap)
                    pcap.unlink(missing_ok=True)

    def gaps(kind: str, key: str) -> list[float]:
        return [r[key] for r in rows[kind] if key in r]

    return {
        "size_mb": size_mb,
        "repeats": repeats,
        "ours_gap_ms": summary(gaps("ours", "gap_ms")),
        "ngtcp2_gap_ms": summary(gaps("ngtcp2", "gap_ms")),
        "ours_no_migration_largest_gap_ms": summary(gaps("ours_no_mig", "largest_gap_ms")),
        "ngtcp2_no_migration_largest_gap_ms": summary(gaps("ngtcp2_no_mig", "largest_gap_ms")),
        "ours_duration_s": summary(gaps("ours", "duration_s")),
        "ngtcp2_duration_s": summary(gaps("ngtcp2", "duration_s")),
        "migrated": {k: sum(1 for r in v if r.get("migrated")) for k, v in rows.items()},
    }


# ------------------------------------------------------------------------------------- all


async def _run_all(quick: bool) -> Report:
    report = Report("b2_failover", quick=quick)
    report.detail["policy"] = {
        "keepalive_interval": POLICY.keepalive_interval,
        "dead_after_ptos": POLICY.dead_after_ptos,
        "min_silence": POLICY.min_silence,
    }
    ok, why = netns_available()
    with tempfile.TemporaryDirectory(prefix="qs-bench-") as tmp:
        cert = make_cert(tmp)
        if not ok:
            report.notes.append(f"(a)-(c) skipped: {why}")
        else:
            cleanup_stale()
            with TwoPathTopology(ipv6=False) as topo:
                spec = ServerSpec(topo.SERVER_V4, *cert, netns=topo.server.name)
                with server_process(spec) as server:
                    rtt = await _true_rtt(topo, server)
                    a = await _failover_series(
                        topo, server, "link_down", 3 if quick else 10, 30 if quick else 40
                    )
                    b = await _failover_series(
                        topo,
                        server,
                        "blackhole",
                        5 if quick else 100,
                        20 if quick else 150,
                        baselines=3 if quick else 20,
                    )
                    with added_rtt(topo, 0.020):
                        rtt_d = await _true_rtt(topo, server)
                        c = await _failover_series(
                            topo,
                            server,
                            "blackhole",
                            3 if quick else 10,
                            20 if quick else 40,
                            baselines=3 if quick else 10,
                        )
            report.detail.update(
                {
                    "true_rtt_ms": round(rtt * 1000, 3),
                    "link_down": a,
                    "blackhole": b,
                    "delayed_true_rtt_ms": round(rtt_d * 1000, 3),
                    "blackhole_delayed": c,
                }
            )
            report.add(
                Figure(
                    "B2",
                    "(a) link down (ENETUNREACH): stall",
                    "<= 50 ms",
                    "ms",
                    a["stall_ms"],
                    met=_le(a["stall_ms"], "median", 50),
                )
            )
            note = (
                ""
                if b["trials"] >= 100
                else f"{b['trials']} trials fit the {b['budget_s']} s budget"
            )
            report.add(
                Figure(
                    "B2",
                    "(b) black hole: stall p50",
                    "<= 300 ms",
                    "ms",
                    b["stall_ms"],
                    met=_le(b["stall_ms"], "median", 300),
                    note=note,
                )
            )
            report.add(
                Figure(
                    "B2",
                    "(b) black hole: stall p99",
                    "<= 600 ms",
                    "ms",
                    b["stall_ms"].get("p99"),
                    met=_le(b["stall_ms"], "p99", 600),
                    note=note,
                )
            )
            for label, res, r in (("", b, rtt), (" +20 ms RTT", c, rtt_d)):
                goal = round(r * 1000 + 5, 3)
                report.add(
                    Figure(
                        "B2",
                        f"(c) recovery after detection: new path confirmed{label}",
                        f"<= 1 RTT + 5 ms = {goal} ms",
                        "ms",
                        res["switched_ms"],
                        baseline={"reconnect: handshake done ms": res["reconnect_handshake_ms"]},
                        met=_le(res["switched_ms"], "median", goal),
                    )
                )
                report.add(
                    Figure(
                        "B2",
                        f"(c) recovery after detection: first in-order echoed byte{label}",
                        "vs reconnect (informative)",
                        "ms",
                        res["recovery_ms"],
                        baseline={"reconnect + resend: first echoed byte ms": res["reconnect_ms"]},
                        note="in-order delivery also waits for the server to resend what it "
                        "lost on the dead path (its own loss recovery)",
                    )
                )
        d = await _vs_ngtcp2(cert, 2 if quick else 8, 32)
        report.detail["vs_ngtcp2"] = d
        if "skipped" in d:
            report.notes.append(f"(d) skipped: {d['skipped']}")
        else:
            ng = d["ngtcp2_gap_ms"].get("median")
            report.add(
                Figure(
                    "B2",
                    "(d) server-side gap at migration, ours vs gtlsclient",
                    "no worse than ngtcp2",
                    "ms",
                    d["ours_gap_ms"],
                    baseline={"gtlsclient ms": d["ngtcp2_gap_ms"]},
                    met=None if ng is None else d["ours_gap_ms"].get("median", 1e9) <= ng,
                )
            )
    return report


def _le(s: dict[str, Any] | None, key: str, limit: float) -> bool | None:
    if not s or key not in s:
        return None
    return bool(s[key] <= limit)


def main(quick: bool = False) -> dict[str, Any]:
    report = run(lambda: _run_all(quick))
    write_result(report)
    return report.as_dict()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(main(args.quick), indent=2))
