"""libp2p ping (/ipfs/ping/1.0.0, libp2p specs ping/ping.md): 32 random bytes, echoed back.

Runs on a stream that multistream-select already gave this protocol.
"""

from __future__ import annotations

import os
import time

from supervisor.libp2p.multistream import ByteStream, deadline

__all__ = [
    "MAX_ROUNDS",
    "PAYLOAD_SIZE",
    "PROTOCOL",
    "ROUND_TIMEOUT",
    "PingError",
    "ping",
    "serve_ping",
]

PROTOCOL = "/ipfs/ping/1.0.0"
PAYLOAD_SIZE = 32
# Rounds one inbound stream may ask of us, so the work a peer gets per stream is bounded.
# js-libp2p opens a stream per ping; go-libp2p's pinger loops on one stream, and its round
# 1025 fails with the stream's end (it has to open a new stream to go on).
MAX_ROUNDS = 1024
# js-libp2p's ping timeout, per round on both sides.
ROUND_TIMEOUT = 10.0


class PingError(ConnectionError):
    """The peer's echo was wrong, or the stream ended before it came back."""


async def _read_block(stream: ByteStream) -> bytes:
    """Up to ``PAYLOAD_SIZE`` bytes: fewer only when the stream ended."""
    block = b""
    while len(block) < PAYLOAD_SIZE:
        chunk = await stream.read(PAYLOAD_SIZE - len(block))
        if not chunk:
            break
        block += chunk
    return block


async def ping(
    stream: ByteStream, count: int = 1, *, timeout: float | None = ROUND_TIMEOUT
) -> list[float]:
    """Ping ``count`` times; the round-trip time of each round in seconds.

    Closes our side of the stream after the last payload, as the spec asks of the dialler.
    ``timeout`` bounds each round.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    rtts: list[float] = []
    for i in range(count):
        payload = os.urandom(PAYLOAD_SIZE)
        async with deadline(PROTOCOL, timeout, f"ping round {i + 1} of {count}"):
            start = time.perf_counter()
            await stream.write(payload)
            if i == count - 1:
                await stream.close()
            echo = await _read_block(stream)
            rtt = time.perf_counter() - start
        if len(echo) < PAYLOAD_SIZE:
            raise PingError(
                f"ping round {i + 1}: the stream ended after {len(echo)} of the "
                f"{PAYLOAD_SIZE} echoed bytes"
            )
        if echo != payload:
            raise PingError(f"ping round {i + 1}: the peer echoed {echo.hex()} for {payload.hex()}")
        rtts.append(rtt)
    return rtts


async def serve_ping(
    stream: ByteStream,
    *,
    max_rounds: int = MAX_ROUNDS,
    round_timeout: float | None = ROUND_TIMEOUT,
) -> int:
    """Echo 32-byte blocks until the peer ends its side; return how many were echoed.

    A partial block at the end is dropped (not echoed). Stops after ``max_rounds`` blocks,
    and raises ``ProtocolTimeoutError`` when a block takes longer than ``round_timeout`` to
    arrive. Our side of the stream is closed in every case.
    """
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    rounds = 0
    try:
        while rounds < max_rounds:
            async with deadline(PROTOCOL, round_timeout, "waiting for a ping"):
                block = await _read_block(stream)
            if len(block) < PAYLOAD_SIZE:
                break
            await stream.write(block)
            rounds += 1
    finally:
        await stream.close()
    return rounds
