"""B1 planned migration: ``switch()`` -> confirmed, and -> first echoed byte on the new path.

    python -m bench.b1_migration [--quick]

Two paths, switched back and forth, on loopback (127.0.0.1 <-> 127.0.0.2) and on a network
namespace topology (tests/rig/netns.py ``TwoPathTopology``) with 20 ms added round trip
(NFQUEUE delayer in the server namespace, ``tests.rig.faults.nfq_delay``). The echo server runs
in its own process (``bench._server``) next to a plain UDP echo: the path's true RTT is the
median round trip of a 1200-byte datagram through that echo, over the same local address, in
the same event loop.

Per trial: re-probe the standby path (its probe RTT), measure the true RTT, then call
``switch()`` to it and, as soon as the connection has switched (a few loop turns later), write
one byte on an open echo stream: ``confirm`` is when ``switch()`` returned, ``echo`` when that
byte came back (and it came back on the new path's socket). Goal: both <= 1 RTT + 1 ms; probe
RTT within max(10 %, 0.3 ms) of the true RTT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bench._client import udp_rtts
from bench._common import Figure, Report, run, summary, write_result
from bench._server import ServerInfo, ServerSpec, added_rtt, make_cert, server_process
from supervisor.core.handles import Connection, Path
from supervisor.orchestration.supervisor import Supervisor

ADDED_RTT = 0.020


@dataclass
class Scenario:
    label: str
    server: ServerInfo
    #: How to open each path: a local multiaddr or a socket factory (namespace).
    path_args: list[dict[str, Any]]
    #: Local IPs of path 0 and 1 (for the UDP echo sockets), or socket factories.
    udp_socket: list[Any]


async def _switch_and_echo(
    conn: Connection, target: Path, stream: Any
) -> tuple[float, float, bool]:
    """(confirm seconds, first echoed byte seconds, echo arrived on the new path)."""
    sup: Any = conn._client

    def received_on_new() -> int:
        sample = sup.path_samples(conn.conn_id).get(target.path_id)
        return sample.datagrams_received if sample is not None else 0

    def target_active() -> bool:
        snap = sup.live_snapshot(conn.conn_id)
        return any(p.active and p.path_id == target.path_id for p in snap.paths)

    before = received_on_new()

    async def switch() -> float:
        await target.switch()
        return time.perf_counter()

    t0 = time.perf_counter()
    task = asyncio.create_task(switch())
    for _ in range(100_000):  # a few loop turns: supervisor, then connection actor
        if target_active() or task.done():
            break
        await asyncio.sleep(0)
    await stream.write(b"x")
    await stream.readexactly(1)
    echoed = time.perf_counter() - t0
    on_new = received_on_new() > before
    confirmed_at = await task
    return confirmed_at - t0, echoed, on_new


async def _scenario(sc: Scenario, trials: int, udp_n: int) -> dict[str, Any]:
    async with Supervisor(enable_experimental_connection_migration=True) as sup:
        conn = await sup.dial(
            sc.server.quic_maddr, alpn_protocols=["echo"], verify=False, **sc.path_args[0]
        )
        mc = conn.as_migratable()
        second = await mc.add_path(**sc.path_args[1])
        await second.probe()
        first = next(p for p in mc.paths() if p.path_id != second.path_id)
        paths = [first, second]
        stream = await conn.open_stream()
        await stream.write(b"w")  # warm the stream up
        await stream.readexactly(1)
        udp_dst = (sc.server.host, sc.server.udp_port)
        rows: list[dict[str, Any]] = []
        for i in range(trials + 2):  # the first two (one each way) warm up
            target = paths[(i + 1) % 2]
            await target.probe()
            probe_rtt = target.info().rtt or 0.0
            true = await udp_rtts(udp_dst, udp_n, sock=sc.udp_socket[(i + 1) % 2]())
            confirm, echo, on_new = await _switch_and_echo(conn, target, stream)
            if i >= 2:
                rows.append(
                    {
                        "probe_rtt": probe_rtt,
                        "true_rtt": statistics.median(true),
                        "confirm": confirm,
                        "echo": echo,
                        "echo_on_new_path": on_new,
                    }
                )
        await conn.close()

    def col(key: str) -> list[float]:
        return [float(r[key]) for r in rows]

    true_rtt = statistics.median(col("true_rtt"))
    probe_err = [r["probe_rtt"] - r["true_rtt"] for r in rows]
    return {
        "label": sc.label,
        "trials": len(rows),
        "true_rtt_ms": summary(col("true_rtt"), 1000),
        "probe_rtt_ms": summary(col("probe_rtt"), 1000),
        "probe_minus_true_ms": summary(probe_err, 1000),
        "confirm_ms": summary(col("confirm"), 1000),
        "first_echo_ms": summary(col("echo"), 1000),
        "echo_on_new_path": sum(1 for r in rows if r["echo_on_new_path"]),
        "goal_ms": round((true_rtt + 0.001) * 1000, 3),
        "probe_tolerance_ms": round(max(0.1 * true_rtt, 0.0003) * 1000, 3),
    }


@contextlib.contextmanager
def _loopback(cert: tuple[str, str], loop: str) -> Iterator[Scenario]:
    import socket

    def udp(ip: str) -> Any:
        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((ip, 0))
            return s

        return make

    with server_process(ServerSpec("127.0.0.1", *cert, loop=loop)) as server:
        yield Scenario(
            "loopback",
            server,
            [{}, {"local_addr": "/ip4/127.0.0.2/udp/0/quic-v1"}],
            [udp("127.0.0.1"), udp("127.0.0.2")],
        )


@contextlib.contextmanager
def _netns(cert: tuple[str, str], loop: str, rtt: float) -> Iterator[Scenario]:
    from tests.rig.netns import TwoPathTopology, cleanup_stale

    cleanup_stale()
    with TwoPathTopology(ipv6=False) as topo:
        spec = ServerSpec(topo.SERVER_V4, *cert, netns=topo.server.name, loop=loop)
        with (
            server_process(spec) as server,
            added_rtt(topo, rtt),
        ):
            yield Scenario(
                f"netns +{rtt * 1000:.0f} ms",
                server,
                [{"sock": topo.client_socket(0)}, {"sock": topo.client_socket(1)}],
                [lambda: topo.client_socket(0), lambda: topo.client_socket(1)],
            )


def _figures(report: Report, res: dict[str, Any]) -> None:
    label, goal = res["label"], res["goal_ms"]
    rtt = res["true_rtt_ms"]["median"]
    for key, what in (
        ("confirm_ms", "switch() -> confirmed"),
        ("first_echo_ms", "switch() -> first echoed byte"),
    ):
        report.add(
            Figure(
                "B1",
                f"{what} ({label})",
                f"<= 1 RTT + 1 ms = {goal} ms",
                "ms",
                res[key],
                baseline=f"true RTT {rtt} ms",
                met=res[key]["median"] <= goal,
            )
        )
    err = res["probe_minus_true_ms"]
    report.add(
        Figure(
            "B1",
            f"probe RTT - true RTT ({label})",
            f"|diff| <= max(10%, 0.3 ms) = {res['probe_tolerance_ms']} ms",
            "ms",
            err,
            baseline=f"true RTT {rtt} ms, probe RTT {res['probe_rtt_ms']['median']} ms",
            met=abs(err["median"]) <= res["probe_tolerance_ms"],
        )
    )


async def _run_all(quick: bool, loop: str, netns: bool) -> Report:
    report = Report("b1_migration", quick=quick)
    with tempfile.TemporaryDirectory(prefix="qs-bench-") as tmp:
        cert = make_cert(tmp)
        with _loopback(cert, loop) as sc:
            res = await _scenario(sc, trials=10 if quick else 100, udp_n=5)
        report.detail["loopback"] = res
        _figures(report, res)
        if netns:
            from tests.rig.netns import netns_available

            ok, why = netns_available()
            if not ok:
                report.notes.append(f"netns scenario skipped: {why}")
            else:
                with _netns(cert, loop, ADDED_RTT) as sc:
                    res = await _scenario(sc, trials=6 if quick else 40, udp_n=5)
                report.detail["netns_delayed"] = res
                report.detail["delay_method"] = (
                    "NFQUEUE delayer in the server namespace (tests.rig.faults.nfq_delay): every "
                    "datagram the server sends on a link is held for the added RTT"
                )
                _figures(report, res)
    return report


def main(quick: bool = False, loop: str = "asyncio", netns: bool = True) -> dict[str, Any]:
    report = run(lambda: _run_all(quick, loop, netns), loop)
    write_result(report)
    return report.as_dict()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-netns", action="store_true")
    args = parser.parse_args()
    print(json.dumps(main(args.quick, netns=not args.no_netns), indent=2))
