"""Client-side measuring tools shared by the benchmarks: true RTT, paced and bulk echo traffic.

Stall, as the issue defines it, is the largest gap in delivered data; ``PacedEcho`` records
the arrival time of every echoed chunk so a gap can be read off afterwards for any window.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import Sequence
from typing import Any

from supervisor.core.handles import Connection


class _Echoes(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.waiter: asyncio.Future[float] | None = None

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(time.perf_counter())


async def udp_rtts(
    dst: tuple[str, int],
    n: int,
    *,
    local_ip: str | None = None,
    sock: socket.socket | None = None,
    size: int = 1200,
    timeout: float = 1.0,
) -> list[float]:
    """``n`` round trips of a ``size``-byte datagram to a UDP echo, in this event loop.

    Same loop, same datagram size as a PATH_CHALLENGE (1200 bytes, padded): the difference to
    a probe RTT is the QUIC processing on both ends, not the measuring method.
    """
    loop = asyncio.get_running_loop()
    if sock is None:
        sock = socket.socket(
            socket.AF_INET6 if ":" in dst[0] else socket.AF_INET, socket.SOCK_DGRAM
        )
        sock.bind((local_ip or "", 0))
    transport, protocol = await loop.create_datagram_endpoint(_Echoes, sock=sock)
    payload = b"\0" * size
    out: list[float] = []
    try:
        for _ in range(n):
            protocol.waiter = loop.create_future()
            t0 = time.perf_counter()
            transport.sendto(payload, dst)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    out.append(await protocol.waiter - t0)
    finally:
        transport.close()
    return out


class PacedEcho:
    """A stream that sends ``chunk`` bytes every ``interval`` and timestamps what comes back.

    Paced, not bulk: the gap between arrivals is then the interval while the path works, and
    the stall when it does not, instead of congestion-control noise.
    """

    def __init__(self, conn: Connection, chunk: int = 1024, interval: float = 0.002) -> None:
        self.conn = conn
        self.chunk = chunk
        self.interval = interval
        self.arrivals: list[float] = []  # time.time() of each read that returned data
        self.sent = 0
        self.received = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._progress = asyncio.Event()

    async def start(self) -> PacedEcho:
        self.stream = await self.conn.open_stream()
        self._tasks = [
            asyncio.create_task(self._write(), name="paced-writer"),
            asyncio.create_task(self._read(), name="paced-reader"),
        ]
        return self

    async def _write(self) -> None:
        data = b"\xa5" * self.chunk
        while True:
            await self.stream.write(data)
            self.sent += len(data)
            await asyncio.sleep(self.interval)

    async def _read(self) -> None:
        while chunk := await self.stream.read(65536):
            self.received += len(chunk)
            self.arrivals.append(time.time())
            self._progress.set()

    async def wait_flowing(self, after: float, count: int = 3, timeout: float = 10.0) -> float:
        """Wait until ``count`` reads arrived after wall time ``after``; returns the first."""
        async with asyncio.timeout(timeout):
            while True:
                later = [t for t in self.arrivals[-count - 1 :] if t > after]
                if len(later) >= count:
                    return next(t for t in self.arrivals if t > after)
                if any(t.done() for t in self._tasks):
                    for t in self._tasks:
                        if t.done():
                            t.result()
                    raise RuntimeError("echo ended early")
                self._progress.clear()
                await self._progress.wait()

    def largest_gap(self, start: float, end: float) -> float:
        """Largest gap between consecutive arrivals that overlaps ``[start, end]`` (seconds)."""
        return largest_gap(self.arrivals, start, end)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def largest_gap(times: Sequence[float], start: float, end: float) -> float:
    """Largest difference between consecutive ``times`` whose interval overlaps [start, end]."""
    gap = 0.0
    for a, b in itertools.pairwise(times):
        if b >= start and a <= end:
            gap = max(gap, b - a)
    return gap
