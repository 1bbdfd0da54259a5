"""Helpers shared by the migration test suites (fixtures live in conftest.py).

Nothing here sleeps to synchronise: waits are on events or conditions with a deadline.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import itertools
import os
import random
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from supervisor import Supervisor
from supervisor.core.events import Event
from supervisor.core.handles import Connection

ECHO_ALPN = ["echo"]


def fd_count() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


def other_tasks() -> set[asyncio.Task[Any]]:
    """Every task of the running loop except the caller's."""
    me = asyncio.current_task()
    return {t for t in asyncio.all_tasks() if t is not me and not t.done()}


def addr_of(multiaddr: Any) -> tuple[str, int]:
    """(ip, port) of a ``/ip4|ip6/ADDR/udp/PORT/quic-v1`` multiaddr."""
    parts = str(multiaddr).split("/")
    return parts[2], int(parts[4])


async def dial_echo(sup: Supervisor, server: Any, **kwargs: Any) -> Connection:
    """Dial a rig echo server (``server.addr``) or any ``(host, port)``."""
    host, port = server.addr if hasattr(server, "addr") else server
    proto = "ip6" if ":" in host else "ip4"
    kwargs.setdefault("alpn_protocols", ECHO_ALPN)
    kwargs.setdefault("verify", False)
    return await sup.dial(f"/{proto}/{host}/udp/{port}/quic-v1", **kwargs)


async def echo_roundtrip(conn: Connection, size: int = 4096, timeout: float = 10.0) -> None:
    """Open a stream, send ``size`` random bytes and FIN, and check the echo (proves the
    connection usable; also a barrier of at least one round trip)."""
    payload = os.urandom(size)
    stream = await conn.open_stream()
    async with asyncio.timeout(timeout):
        await stream.write(payload)
        await stream.close()
        got = bytearray()
        while chunk := await stream.read(65536):
            got += chunk
    assert bytes(got) == payload


@dataclass
class ChecksummedStream:
    """A bidirectional echo stream kept busy by a writer task; the reader hashes what returns.

    ``finish()`` sends FIN, waits for the echo to end and checks that every byte came back in
    order (sha256 and length of both directions).
    """

    conn: Connection
    chunk: int = 16 * 1024
    seed: int = 0
    sent: int = 0
    received: int = 0
    _tx: Any = field(default_factory=hashlib.sha256)
    _rx: Any = field(default_factory=hashlib.sha256)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _progress: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    limit: int | None = None

    async def start(self) -> ChecksummedStream:
        self.stream = await self.conn.open_stream()
        self._rng = random.Random(self.seed)
        self._tasks = [
            asyncio.create_task(self._write(), name="checksum-writer"),
            asyncio.create_task(self._read(), name="checksum-reader"),
        ]
        return self

    async def _write(self) -> None:
        while not self._stop.is_set() and (self.limit is None or self.sent < self.limit):
            data = self._rng.randbytes(self.chunk)
            self._tx.update(data)
            self.sent += len(data)
            await self.stream.write(data)
        await self.stream.close()

    async def _read(self) -> None:
        while chunk := await self.stream.read(65536):
            self._rx.update(chunk)
            self.received += len(chunk)
            self._progress.set()

    async def wait_received(self, at_least: int, timeout: float = 10.0) -> None:
        """Wait until the echo has returned ``at_least`` bytes in total."""
        async with asyncio.timeout(timeout):
            while self.received < at_least:
                if self._tasks[1].done():
                    self._tasks[1].result()
                    raise AssertionError("echo ended early")
                self._progress.clear()
                await self._progress.wait()

    async def advance(self, nbytes: int = 64 * 1024, timeout: float = 10.0) -> None:
        """Wait until ``nbytes`` more echoed bytes arrived (data flowed on the current path)."""
        await self.wait_received(self.received + nbytes, timeout)

    async def finish(self, timeout: float = 30.0) -> int:
        self._stop.set()
        async with asyncio.timeout(timeout):
            await asyncio.gather(*self._tasks)
        assert self.received == self.sent, (self.received, self.sent)
        assert self._rx.hexdigest() == self._tx.hexdigest()
        return self.sent

    async def abort(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@dataclass
class TimedStream(ChecksummedStream):
    """A ChecksummedStream that also timestamps every echo delivery (loop clock)."""

    arrivals: list[float] = field(default_factory=list)

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while chunk := await self.stream.read(65536):
            self.arrivals.append(loop.time())
            self._rx.update(chunk)
            self.received += len(chunk)
            self._progress.set()

    def max_gap(self, since: float, until: float | None = None) -> float:
        """Largest gap between consecutive deliveries from the last one before ``since`` on
        (the gap spanning the fault counts) up to ``until``: the stall the application saw."""
        start = max(bisect.bisect_left(self.arrivals, since) - 1, 0)
        window = [t for t in self.arrivals[start:] if until is None or t <= until]
        return max((b - a for a, b in itertools.pairwise(window)), default=0.0)


class EventLog:
    """Collects events of the given types from a supervisor's bus in a background task."""

    def __init__(self, sup: Supervisor, *types: type[Event]) -> None:
        self.events: list[Event] = []
        self._sub = sup.events.subscribe(*types)
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="event-log")

    async def _run(self) -> None:
        with contextlib.suppress(Exception):
            async for evt in self._sub:
                self.events.append(evt)
                self._changed.set()

    def of(self, *types: type[Event], conn_id: str | None = None) -> list[Event]:
        return [
            e
            for e in self.events
            if (not types or isinstance(e, types)) and (conn_id is None or e.conn_id == conn_id)
        ]

    async def wait_for(self, predicate: Callable[[], object], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def event_log(sup: Supervisor, *types: type[Event]) -> AsyncIterator[EventLog]:
    log = EventLog(sup, *types)  # subscribed at once: nothing published later is missed
    try:
        yield log
    finally:
        await log.close()


# -- test-only introspection ------------------------------------------------------------------
# Library code above actors/ holds ActorRefs and published views only (an import-linter
# contract keeps it so). Tests that assert protocol internals no view shows (CIDs per path,
# DF bits, congestion state) look inside here, in one place.


def connection_actor(conn: Any) -> Any:
    """The ConnectionActor behind a ``Connection`` handle (via its data-plane port)."""
    return conn._port._conn


def path_actor(conn: Any, path_id: int) -> Any:
    """One PathActor of a connection (owns the socket and its counters)."""
    return connection_actor(conn)._paths[path_id].actor


def supervisor_actor(sup: Any) -> Any:
    """The SupervisorActor of a running ``Supervisor`` (via its ActorRef's cell)."""
    return sup._ref._cell.actor


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM (the orderly stop a server is asked for), then SIGKILL if it has not exited
    within ``timeout``; always reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def local_ray_fleet(prefix: str) -> Iterator[Any]:
    """A local Ray cluster (2 CPUs, no dashboard) and a ``Fleet`` in a fresh namespace, for one
    test module. On the way out every named actor left in the namespace is killed (agents are
    detached: they would outlive this driver) and Ray is shut down."""
    import ray

    from supervisor.remote.fleet import Fleet

    namespace = f"{prefix}-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    ray.init(
        include_dashboard=False,
        num_cpus=2,
        namespace=namespace,
        logging_level="warning",
        log_to_driver=False,
    )
    print(f"\nray.init took {time.monotonic() - started:.2f}s")
    try:
        yield Fleet(namespace, timeout=30)
    finally:
        started = time.monotonic()
        left = [
            ray.get_actor(a["name"], namespace=namespace)
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == namespace
        ]
        for handle in left:
            ray.kill(handle, no_restart=True)
        ray.shutdown()
        assert not ray.is_initialized()
        print(
            f"killed {len(left)} leftover actor(s); ray.shutdown took "
            f"{time.monotonic() - started:.2f}s"
        )
