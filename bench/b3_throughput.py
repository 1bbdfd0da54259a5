"""B3 throughput: bulk echo through the actor stack vs raw aioquic, and client CPU per packet.

    python -m bench.b3_throughput [--quick] [--profile]

Same layout for every variant: the client in this process, the stock aioquic echo server in
its own process (``bench._server``), loopback. A windowed pump writes 64 KiB chunks while at
most 1 MiB is unechoed (our streams bound their buffers at 1 MiB; raw aioquic's do not, so the
window keeps the two comparable) and times ``SIZE`` bytes there and back.

- ``raw``: ``aioquic.asyncio.connect`` + ``create_stream`` (aioquic's own protocol);
- ``ours``: ``Supervisor.dial`` + ``open_stream`` (actors, one path);
- ``ours_migrating``: the same with a second path and a ``switch()`` every 100 ms.

Variants take turns within each repeat (machine noise hits all alike); ratios are per repeat.
CPU per packet: this process's CPU time (``time.process_time``) over the transfer, divided by
the datagrams it sent and received (counted on the ``QuicConnection`` of either stack, the same
way). Hardware counters (``perf stat -e instructions``) are not exposed in this VM. Run once on
the default asyncio loop and once on uvloop (client and server alike).

``--profile`` samples an ``ours`` transfer with py-spy (or pyinstrument) and writes the top
entries to ``bench/results/profile_b3.txt``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._common import Figure, Report, results_dir, run, summary, write_result
from bench._server import ServerInfo, ServerSpec, make_cert, server_process

CHUNK = 64 * 1024
WINDOW = 1 << 20
MIGRATE_EVERY = 0.1


@dataclass
class Sample:
    nbytes: int  # echoed, each way
    seconds: float
    cpu: float
    packets: int
    migrations: int = 0

    @property
    def mbps(self) -> float:
        return 0.0 if self.seconds <= 0 else self.nbytes / self.seconds / 1e6

    @property
    def us_per_packet(self) -> float:
        return self.cpu / max(1, self.packets) * 1e6


SIZE = 16 * 1024 * 1024  # bytes echoed per transfer (each way)


class _Counted:
    """Counts datagrams in and out of one ``QuicConnection`` (wraps two bound methods)."""

    def __init__(self, quic: Any) -> None:
        self.sent = 0
        self.received = 0
        to_send = quic.datagrams_to_send
        receive = quic.receive_datagram

        def datagrams_to_send(*args: Any, **kwargs: Any) -> Any:
            out = to_send(*args, **kwargs)
            self.sent += len(out)
            return out

        def receive_datagram(*args: Any, **kwargs: Any) -> Any:
            self.received += 1
            return receive(*args, **kwargs)

        quic.datagrams_to_send = datagrams_to_send
        quic.receive_datagram = receive_datagram

    @property
    def packets(self) -> int:
        return self.sent + self.received


async def _pump(
    write: Callable[[bytes], Awaitable[None]],
    read: Callable[[], Awaitable[bytes]],
    size: int,
) -> None:
    """Write ``size`` bytes in chunks, at most WINDOW unechoed, until all came back."""
    received = 0
    progress = asyncio.Event()
    data = b"\x5a" * CHUNK

    async def reader() -> None:
        nonlocal received
        while received < size:
            chunk = await read()
            if not chunk:
                raise RuntimeError(f"echo ended after {received} of {size} bytes")
            received += len(chunk)
            progress.set()

    task = asyncio.create_task(reader())
    try:
        sent = 0
        while sent < size:
            while sent - received >= WINDOW and not task.done():
                progress.clear()
                await progress.wait()
            if task.done():
                break
            n = min(CHUNK, size - sent)
            await write(data[:n])
            sent += n
        await task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _raw(server: ServerInfo, size: int) -> Sample:
    from aioquic.asyncio import connect
    from aioquic.quic.configuration import QuicConfiguration

    config = QuicConfiguration(is_client=True, alpn_protocols=["echo"], idle_timeout=30.0)
    config.verify_mode = ssl.CERT_NONE
    async with connect(server.host, server.quic_port, configuration=config) as proto:
        counted = _Counted(proto._quic)
        reader, writer = await proto.create_stream()

        async def write(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        t0, c0, p0 = time.perf_counter(), time.process_time(), counted.packets
        await _pump(write, lambda: reader.read(65536), size)
        sample = Sample(
            size, time.perf_counter() - t0, time.process_time() - c0, counted.packets - p0
        )
        writer.write_eof()
    return sample


async def _ours(server: ServerInfo, size: int, migrate: bool) -> Sample:
    from supervisor.orchestration.supervisor import Supervisor

    async with Supervisor(enable_experimental_connection_migration=True) as sup:
        conn = await sup.dial(server.quic_maddr, alpn_protocols=["echo"], verify=False)

        def packets() -> int:
            # Datagrams through our path sockets (the baseline counts on its QuicConnection).
            return sum(
                p.datagrams_sent + p.datagrams_received
                for p in sup.path_samples(conn.conn_id).values()
            )

        mc = conn.as_migratable()
        paths = mc.paths()
        if migrate:
            second = await mc.add_path("/ip4/127.0.0.2/udp/0/quic-v1")
            await second.probe()
            paths = [paths[0], second]
        stream = await conn.open_stream()
        migrations = 0
        stop = asyncio.Event()

        async def migrator() -> None:
            nonlocal migrations
            i = 1
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), MIGRATE_EVERY)
                if stop.is_set():
                    return
                await paths[i % 2].switch()
                migrations += 1
                i += 1

        t0, c0, p0 = time.perf_counter(), time.process_time(), packets()
        mig = asyncio.create_task(migrator()) if migrate else None
        try:
            await _pump(stream.write, lambda: stream.read(65536), size)
        finally:
            stop.set()
            if mig is not None:
                await mig
        sample = Sample(
            size,
            time.perf_counter() - t0,
            time.process_time() - c0,
            packets() - p0,
            migrations,
        )
        await stream.close()
        await conn.close()
    return sample


VARIANTS = ("raw", "ours", "ours_migrating")


async def _series(server: ServerInfo, size: int, repeats: int) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {v: [] for v in VARIANTS}
    await _raw(server, size // 4)  # warm-up: imports, first handshake, server caches
    await _ours(server, size // 4, migrate=False)
    for r in range(repeats):
        order = VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))
        for variant in order:
            if variant == "raw":
                out[variant].append(await _raw(server, size))
            else:
                out[variant].append(await _ours(server, size, variant == "ours_migrating"))
    return out


def _digest(samples: dict[str, list[Sample]]) -> dict[str, Any]:
    raw = samples["raw"]
    res: dict[str, Any] = {
        "size_mib": raw[0].nbytes / 1024 / 1024 if raw else None,
        "repeats": len(raw),
    }
    for variant, xs in samples.items():
        res[variant] = {
            "MBps": summary([s.mbps for s in xs], 1, 2),
            "cpu_us_per_packet": summary([s.us_per_packet for s in xs], 1, 2),
            "packets": summary([s.packets for s in xs], 1, 0),
        }
        if variant != "raw":
            res[variant]["throughput_ratio"] = summary(
                [s.mbps / r.mbps for s, r in zip(xs, raw, strict=True)], 1, 3
            )
            res[variant]["cpu_us_per_packet_extra"] = summary(
                [s.us_per_packet - r.us_per_packet for s, r in zip(xs, raw, strict=True)], 1, 2
            )
    res["ours_migrating"]["migrations"] = summary(
        [s.migrations for s in samples["ours_migrating"]], 1, 0
    )
    return res


def _measure(loop: str, repeats: int, cert: tuple[str, str], size: int) -> dict[str, Any]:
    with server_process(ServerSpec("127.0.0.1", *cert, loop=loop)) as server:
        samples = run(lambda: _series(server, size, repeats), loop)
    return _digest(samples)


# ---------------------------------------------------------------------------------- profile


def _profile(cert: tuple[str, str], size: int = SIZE, quick: bool = False) -> str:
    """Sample the client of ``ours`` transfers with py-spy; returns the report text."""
    out = results_dir(quick) / "profile_b3.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    with server_process(ServerSpec("127.0.0.1", *cert)) as server:

        async def work() -> list[Sample]:
            await _ours(server, size // 4, migrate=False)
            return [await _ours(server, size, migrate=False) for _ in range(2)]

        raw_file = Path(tempfile.mkdtemp(prefix="qs-prof-")) / "stacks.txt"
        spy = None
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        with contextlib.suppress(FileNotFoundError):
            spy = subprocess.Popen(
                [
                    exe,
                    "record",
                    "--pid",
                    str(os.getpid()),
                    "--rate",
                    "250",
                    "--format",
                    "raw",
                    "--output",
                    str(raw_file),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        if spy is not None:
            time.sleep(1.0)  # py-spy attaches
            samples = run(work)
            spy.send_signal(2)
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
            text = _top_from_stacks(raw_file, samples)
        else:
            text = _pyinstrument(lambda: run(work))
    out.write_text(text)
    return text


def _frame_name(frame: str) -> str:
    # py-spy raw frames: "function (path/to/file.py:LINE)"
    name, _, where = frame.rpartition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})"


OUR_CODE = ("actors/", "supervisor/", "telemetry/")


def _top_from_stacks(raw_file: Path, samples: list[Sample], top: int = 30) -> str:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    by_module: Counter[str] = Counter()
    n = 0
    for line in raw_file.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        n += count
        own[frames[-1]] += count
        leaf_path = frames[-1].rsplit("(", 1)[-1].rstrip(")")
        by_module[leaf_path] += count
        for f in set(frames):
            total[f] += count
    lines = [
        "B3 profile: the client of two 'ours' bulk echo transfers (actor stack, one path)",
        f"py-spy record --rate 250 --nonblocking; {n} samples; "
        f"throughput {statistics.median(s.mbps for s in samples):.1f} MB/s, "
        f"{statistics.median(s.us_per_packet for s in samples):.1f} us CPU/packet",
        "",
        "Top by own time (leaf frame), % of samples:",
    ]
    lines += [f"  {c / n * 100:5.1f}%  {f}" for f, c in own.most_common(top)]
    lines += ["", "Top by total time (frame anywhere on the stack), % of samples:"]
    lines += [f"  {c / n * 100:5.1f}%  {f}" for f, c in total.most_common(top)]
    lines += ["", "Own time by file:"]
    lines += [f"  {c / n * 100:5.1f}%  {m}" for m, c in by_module.most_common(15)]
    ours = [(f, c) for f, c in own.most_common() if f.rsplit("(", 1)[-1].startswith(OUR_CODE)]
    lines += ["", "Own time in our code (actors/, supervisor/, telemetry/):"]
    lines += [f"  {c / n * 100:5.1f}%  {f}" for f, c in ours[:top]]
    return "\n".join(lines) + "\n"


def _pyinstrument(work: Callable[[], Any]) -> str:
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.001)
    profiler.start()
    work()
    profiler.stop()
    return str(profiler.output_text(unicode=False, color=False, show_all=False))


# ---------------------------------------------------------------------------------- main


def _figures(report: Report, res: dict[str, Any], loop: str) -> None:
    goals = (("ours", ">= 0.95x raw", 0.95), ("ours_migrating", ">= 0.9x raw", 0.9))
    for variant, goal, limit in goals:
        ratio = res[variant]["throughput_ratio"]
        what = "alone" if variant == "ours" else "switch every 100 ms"
        report.add(
            Figure(
                "B3",
                f"throughput ratio, {what} ({loop})",
                goal,
                "x",
                ratio,
                baseline={"raw aioquic MB/s": res["raw"]["MBps"]},
                met=ratio["median"] >= limit,
                note=f"ours {res[variant]['MBps']['median']} MB/s",
            )
        )
    extra = res["ours"]["cpu_us_per_packet_extra"]
    report.add(
        Figure(
            "B3",
            f"client CPU per packet, extra vs raw ({loop})",
            "<= +5 us",
            "us",
            extra,
            baseline={"raw us/packet": res["raw"]["cpu_us_per_packet"]},
            met=extra["median"] <= 5,
            note=f"ours {res['ours']['cpu_us_per_packet']['median']} us/packet",
        )
    )


def main(quick: bool = False, profile: bool = True, uvloop: bool = True) -> dict[str, Any]:
    report = Report("b3_throughput", quick=quick)
    size = 4 * 1024 * 1024 if quick else SIZE
    repeats = 2 if quick else 7
    with tempfile.TemporaryDirectory(prefix="qs-bench-") as tmp:
        cert = make_cert(tmp)
        loops = ["asyncio"]
        if uvloop:
            try:
                import uvloop as _uv  # noqa: F401

                loops.append("uvloop")
            except ImportError:
                report.notes.append("uvloop not installed: pip install -e '.[bench]'")
        for loop in loops:
            res = _measure(loop, repeats, cert, size)
            report.detail[loop] = res
            _figures(report, res, loop)
        if profile:
            text = _profile(cert, size, quick)
            report.detail["profile_top"] = text.splitlines()[:14]
    write_result(report)
    return report.as_dict()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args()
    print(json.dumps(main(args.quick, not args.no_profile, not args.no_uvloop), indent=2))
    sys.exit(0)
