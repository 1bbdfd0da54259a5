"""Asking a libp2p peer something over a connection: one stream per call, closed after it."""

from __future__ import annotations

import contextlib
from typing import Any

from supervisor.libp2p import identify, ping
from supervisor.libp2p.identify import IdentifyInfo

__all__ = ["identify_peer", "ping_peer"]


async def ping_peer(conn: Any, count: int = 1, *, timeout: float = 10.0) -> list[float]:
    """Round-trip times (s) of ``count`` pings (``/ipfs/ping/1.0.0``) on one new stream."""
    stream = await conn.new_stream([ping.PROTOCOL], timeout=timeout)
    try:
        return await ping.ping(stream, count=count)
    finally:
        with contextlib.suppress(Exception):
            await stream.close()


async def identify_peer(conn: Any, *, timeout: float = 10.0) -> IdentifyInfo:
    """What the peer says of itself and of us (``observed_addr``: where it sees us now)."""
    stream = await conn.new_stream([identify.PROTOCOL], timeout=timeout)
    try:
        return await identify.read_identify(stream)
    finally:
        with contextlib.suppress(Exception):
            await stream.close()
