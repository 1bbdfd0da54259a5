"""Probe RTTs under an event loop whose clock is coarse (uvloop's moves in 1 ms steps).

A loopback probe is answered in well under a millisecond: measured with such a loop clock it
came out as 0.0. The connection keeps every time it hands aioquic on a precise clock.
"""

from __future__ import annotations

import asyncio
import math

from supervisor import Supervisor
from tests.rig.aioquic_server import echo_server
from tests.rig.certs import CertPair
from tests.support import dial_echo


class CoarseClockLoop(asyncio.SelectorEventLoop):
    """``loop.time()`` in 1 ms steps, as uvloop's (libuv's cached ``uv_now``)."""

    def time(self) -> float:
        return math.floor(super().time() * 1000) / 1000


def test_probe_rtt_is_measured_below_the_loop_clock_resolution(cert: CertPair) -> None:
    async def main() -> list[float | None]:
        async with (
            echo_server(certfile=cert.certfile, keyfile=cert.keyfile) as server,
            Supervisor(enable_experimental_connection_migration=True) as sup,
        ):
            conn = await dial_echo(sup, server)
            path = await conn.as_migratable().add_path("/ip4/127.0.0.2/udp/0/quic-v1")
            rtts = []
            for _ in range(10):
                await path.probe()
                rtts.append(path.info().rtt)
            return rtts

    with asyncio.Runner(loop_factory=CoarseClockLoop) as runner:
        rtts = runner.run(main())
    assert all(rtt is not None and 0 < rtt < 1.0 for rtt in rtts), rtts
