"""Many stock aioquic echo servers in one process, one per loopback address (bench B4).

Why one process: a hundred peers on distinct IPs make a hundred health groups per local
address on the client; a hundred server processes would cost a hundred interpreters (~30 MB
and a start-up each) on a 2-core machine, for nothing the client could tell apart. Each
server is ``tests.rig.aioquic_server.echo_server`` on its own socket (127.0.1.1, 127.0.1.2,
... all on the loopback interface: Linux routes the whole 127.0.0.0/8 there), on the same
UDP port when it is free on every address (else on any port).

Like ``bench._server``, the child stops when told to or when the parent's end of the pipe
closes, so it never outlives the bench.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from bench._server import ChildProcess, ServerInfo, answer_pipe


@dataclass(frozen=True)
class ManySpec:
    hosts: tuple[str, ...]
    certfile: str
    keyfile: str
    idle_timeout: float = 30.0
    loop: str = "asyncio"


def loopback_hosts(n: int, prefix: str = "127.0.1.") -> tuple[str, ...]:
    """``n`` loopback addresses ``prefix``1 ... ``prefix``n (at most 254)."""
    if not 1 <= n <= 254:
        raise ValueError("between 1 and 254 addresses")
    return tuple(f"{prefix}{i}" for i in range(1, n + 1))


def _one(spec: ManySpec, host: str, port: int) -> Any:
    from tests.rig.aioquic_server import echo_server

    return echo_server(
        host, port, certfile=spec.certfile, keyfile=spec.keyfile, idle_timeout=spec.idle_timeout
    )


async def _serve(spec: ManySpec, pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    on_pipe = answer_pipe(pipe, stop)

    async with contextlib.AsyncExitStack() as stack:
        bound: list[tuple[str, int]] = []
        port = 0
        for host in spec.hosts:
            try:
                server = await stack.enter_async_context(_one(spec, host, port))
            except OSError:  # that port is taken on this address: any port will do
                server = await stack.enter_async_context(_one(spec, host, 0))
            port = port or server.port
            bound.append((server.host, server.port))
        loop.add_reader(pipe.fileno(), on_pipe)
        pipe.send((bound, os.getpid()))
        await stop.wait()
        loop.remove_reader(pipe.fileno())


def _child(spec: ManySpec, pipe: Connection) -> None:
    import logging

    logging.disable(logging.WARNING)
    from bench._common import run

    with contextlib.suppress(KeyboardInterrupt):
        run(lambda: _serve(spec, pipe), spec.loop)


class ManyServersProcess(ChildProcess):
    """Handle on the process; ``infos`` has one :class:`ServerInfo` per address (same pid)."""

    def __init__(self, spec: ManySpec) -> None:
        super().__init__(_child, spec, "bench servers process")
        bound, pid = self.started
        self.infos = [ServerInfo(host, port, 0, pid) for host, port in bound]


@contextlib.contextmanager
def many_servers_process(spec: ManySpec) -> Iterator[list[ServerInfo]]:
    proc = ManyServersProcess(spec)
    try:
        yield proc.infos
    finally:
        proc.stop()
