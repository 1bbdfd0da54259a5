"""The bench's QUIC peer: a stock aioquic echo server (plus a plain UDP echo) in its own process.

Why a process: on a 2-core machine a server sharing the client's event loop would add its
packet processing to every figure the client measures (switch time, CPU per packet, RSS).
Both sides of a comparison (our stack and raw aioquic) talk to this same server. The UDP echo
answers each datagram with itself: the "true RTT" of a path, measured without QUIC.

The child binds its sockets itself: on loopback or inside a ``qs-`` namespace
(``create_socket_in_netns``). It stops when told to, or when the parent's end of the pipe
closes (parent died), so it never outlives the bench.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


@dataclass(frozen=True)
class ServerSpec:
    host: str
    certfile: str
    keyfile: str
    netns: str | None = None
    loop: str = "asyncio"
    idle_timeout: float = 60.0
    #: The QUIC socket's receive buffer (SO_RCVBUFFORCE, root), or the kernel default: 1,000
    #: connections' first flights (or their moves at once) overflow the default.
    rcvbuf: int | None = None


@dataclass
class ServerInfo:
    host: str
    quic_port: int
    udp_port: int
    pid: int

    @property
    def quic_maddr(self) -> str:
        proto = "ip6" if ":" in self.host else "ip4"
        return f"/{proto}/{self.host}/udp/{self.quic_port}/quic-v1"


def answer_pipe(pipe: Connection, stop: asyncio.Event) -> Callable[[], None]:
    """The child's side of :class:`ChildProcess` (a loop reader on ``pipe``): "cpu" is
    answered with its process CPU seconds; "stop", EOF or a broken pipe set ``stop``."""

    def on_pipe() -> None:
        try:
            msg = pipe.recv()
        except (EOFError, OSError):
            stop.set()
            return
        if msg == "cpu":
            pipe.send(time.process_time())
        else:
            stop.set()

    return on_pipe


def die_with_parent() -> None:
    """SIGKILL this process when the bench's process dies (the suite's timeout kills it):
    Linux's PR_SET_PDEATHSIG; a child must not go on for nobody."""
    import ctypes
    import signal

    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before that
        os._exit(1)


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)


def _socket(spec: ServerSpec) -> socket.socket:
    family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
    if spec.netns is not None:
        from tests.rig.netns import create_socket_in_netns

        return create_socket_in_netns(spec.netns, family, spec.host, 0)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((spec.host, 0))
    return sock


async def _serve(spec: ServerSpec, pipe: Connection) -> None:
    from tests.rig.aioquic_server import echo_server

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    on_pipe = answer_pipe(pipe, stop)

    udp_sock = _socket(spec)
    udp_transport, _ = await loop.create_datagram_endpoint(_UdpEcho, sock=udp_sock)
    try:
        quic_sock = _socket(spec)
        if spec.rcvbuf is not None:
            quic_sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, spec.rcvbuf)
        async with echo_server(
            sock=quic_sock,
            certfile=spec.certfile,
            keyfile=spec.keyfile,
            idle_timeout=spec.idle_timeout,
        ) as server:
            loop.add_reader(pipe.fileno(), on_pipe)
            pipe.send((server.port, int(udp_sock.getsockname()[1]), os.getpid()))
            await stop.wait()
            loop.remove_reader(pipe.fileno())
    finally:
        udp_transport.close()


def _child(spec: ServerSpec, pipe: Connection) -> None:
    import logging

    logging.disable(logging.WARNING)
    from bench._common import run

    with contextlib.suppress(KeyboardInterrupt):
        run(lambda: _serve(spec, pipe), spec.loop)


class ChildProcess:
    """A spawned bench process on a pipe: it sends one start-up message, then answers "cpu"
    (its process CPU seconds) and "stop"."""

    def __init__(self, target: Callable[[Any, Connection], None], spec: Any, what: str) -> None:
        ctx = mp.get_context("spawn")
        self._pipe, child_end = ctx.Pipe()
        self._proc = ctx.Process(target=target, args=(spec, child_end), daemon=True)
        self._proc.start()
        child_end.close()
        if not self._pipe.poll(60):
            self.stop()
            raise RuntimeError(f"{what} did not start within 60 s")
        self.started: Any = self._pipe.recv()

    def cpu(self) -> float:
        """The process's CPU seconds so far (user + system)."""
        self._pipe.send("cpu")
        return float(self._pipe.recv())

    def stop(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self._pipe.send("stop")
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._pipe.close()


class ServerProcess(ChildProcess):
    """Handle on a running server process; ``cpu()`` asks for its process CPU time."""

    def __init__(self, spec: ServerSpec) -> None:
        super().__init__(_child, spec, "bench server process")
        quic_port, udp_port, pid = self.started
        self.info = ServerInfo(spec.host, quic_port, udp_port, pid)


@contextlib.contextmanager
def server_process(spec: ServerSpec) -> Iterator[ServerInfo]:
    proc = ServerProcess(spec)
    try:
        yield proc.info
    finally:
        proc.stop()


def make_cert(directory: str | Path) -> tuple[str, str]:
    """A self-signed certificate for the bench server (clients do not verify it)."""
    from tests.rig.certs import generate_cert
    from tests.rig.netns import TwoPathTopology

    pair = generate_cert(
        Path(directory), extra_ips=(TwoPathTopology.SERVER_V4, TwoPathTopology.SERVER_V6)
    )
    return str(pair.certfile), str(pair.keyfile)


@contextlib.contextmanager
def added_rtt(topo: Any, rtt: float) -> Iterator[None]:
    """Make every round trip over ``topo``'s links ``rtt`` seconds longer.

    The rig's NFQUEUE delayer (``tests.rig.faults.nfq_delay``: iptables NFQUEUE target and a
    userspace delayer inside the server namespace; ``tc netem`` and nftables' ``queue`` are not
    in this kernel) holds every datagram the server sends on each link for ``rtt``: addresses
    are untouched, so the QUIC paths are the real ones.
    """
    from tests.rig.faults import nfq_delay

    with contextlib.ExitStack() as stack:
        for i, path in enumerate(topo.paths):
            stack.enter_context(nfq_delay(topo.server, path.server_if, rtt, queue=17 + i))
        yield
