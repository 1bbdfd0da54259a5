"""PathActor: one local UDP socket of a connection and that path's probe on request.

The socket is read by an asyncio datagram protocol that hands each datagram to the
ConnectionActor with a direct synchronous call (no mailbox hop per datagram: DESIGN section 1).
Control (probe, close) goes through the mailbox. The probe loop decides when to send a challenge
and for how long to wait; the ConnectionActor builds the challenge (it owns all packet building),
hands it back, and tells the path when a PATH_RESPONSE arrived on this socket.

Keep-alives are not the path's: the node's health groups (``actors/node_health.py``) ask one
path per group and interval through the connection, so an idle path has no task, no timer and,
while its mailbox is empty, no reader task either (``parks_when_idle``).
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import socket
import termios
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from actors.errors import ConnectionClosedError, ProbeTimeoutError
from actors.messages import EmitChallenge, StartProbe
from actors.path_state import PathState
from actors.runtime import Actor, ActorRef, Later
from actors.socket_errors import Evidence, enable_error_reports, judge, read_error_queue


class PathOwner(Protocol):
    """The path's ConnectionActor, called synchronously (same loop, no mailbox hop).

    It owns the path's state: the path reports what it saw (datagrams, socket errors, probe
    outcomes) and reads its state back; it never sets it.
    """

    def datagram_received(self, path_id: int, data: bytes, addr: tuple[Any, ...]) -> None: ...

    def path_error(self, path_id: int, exc: OSError, evidence: Evidence | None) -> None: ...

    def path_state(self, path_id: int) -> PathState: ...

    def probe_started(self, path_id: int) -> None: ...

    def probe_answered(self, path_id: int, rtt: float) -> None: ...

    def probe_failed(self, path_id: int, before: PathState, *, timed_out: bool) -> None: ...

    def starved(self, start: float, end: float) -> float:
        """Seconds of ``[start, end]`` (loop clock) the loop could not read (node lag)."""
        ...


@dataclass(slots=True)
class PathStats:
    """Counters a path keeps about its own socket."""

    bytes_sent: int = 0
    bytes_received: int = 0
    datagrams_sent: int = 0
    datagrams_received: int = 0
    dropped_off_path: int = 0
    probes_sent: int = 0
    #: Wall-clock send times of the tries of the latest probe on request (span events).
    probe_try_times: list[float] = field(default_factory=list)
    #: What metrics were last told (bytes and drops are reported as deltas, off the datagram
    #: path: when the path changes state or goes away).
    reported: dict[str, int] = field(default_factory=dict)

    def deltas(self) -> dict[str, int]:
        """Counters grown since the last call (sent, received, dropped off-path)."""
        now = {
            "sent": self.bytes_sent,
            "received": self.bytes_received,
            "dropped": self.dropped_off_path,
        }
        out = {k: v - self.reported.get(k, 0) for k, v in now.items()}
        self.reported = now
        return out


#: A probe on request waits at most this many timeouts of wall time on a starved loop; its
#: timeout is judged again after a short wait while its socket holds unread datagrams.
_PROBE_CAP = 4
_RECHECK_AFTER = 0.005
_MAX_RECHECKS = 20


@dataclass(frozen=True, slots=True)
class ProbeSchedule:
    """When to retry a challenge: first wait, growth factor, cap (the RFC leaves it to us)."""

    first_wait: float = 0.05
    backoff: float = 2.0
    max_wait: float = 1.0


class _PathProtocol(asyncio.DatagramProtocol):
    def __init__(self, path: PathActor) -> None:
        self._path = path
        self.lost = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)  # the transport closed the socket

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._path._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, OSError):
            self._path._on_error(exc)


class PathActor(Actor):
    """Owns one UDP socket; the ConnectionActor is its parent."""

    parks_when_idle = True  # mail is rare (a probe on request): no reader task in between
    __slots__ = (  # slots, not an instance dict: a node holds thousands of paths
        "_conn",
        "_owner",
        "_probe_task",
        "_protocol",
        "_ready",
        "_remote_key",
        "_response",
        "_schedule",
        "_transport",
        "local",
        "path_id",
        "remote",
        "sock",
        "stats",
    )

    def __init__(
        self,
        *,
        path_id: int,
        sock: socket.socket,
        remote: tuple[Any, ...],
        owner: PathOwner,
        conn: ActorRef,
        schedule: ProbeSchedule | None = None,
    ) -> None:
        self.path_id = path_id
        self.sock = sock
        self.local: tuple[Any, ...] = sock.getsockname()
        self.remote = remote
        self._remote_key = _addr_key(remote)
        self._owner = owner
        self._conn = conn
        self._schedule = schedule or ProbeSchedule()
        self._transport: asyncio.DatagramTransport | None = None
        self._protocol: _PathProtocol | None = None
        self._response: asyncio.Future[float] | None = None
        self._probe_task: asyncio.Task[float] | None = None
        self.stats = PathStats()
        # Resolved once asyncio owns the socket (``on_start``): a datagram sent before is lost.
        # A future made on demand, not an Event: most paths never wait, and an Event's deque
        # costs ~0.6 KiB per path (bench B4 counts RSS per connection).
        self._ready: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def on_start(self) -> None:
        enable_error_reports(self.sock)  # ICMP errors are evidence (actors/socket_errors.py)
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _PathProtocol(self), sock=self.sock
        )
        self._transport = transport
        self._protocol = protocol
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    async def on_stop(self) -> None:
        self._fail_response(ConnectionClosedError(reason="path closed"))
        if self._transport is not None and self._protocol is not None:
            self._transport.close()
            # The transport closes the socket one loop turn later: wait, so the socket is gone
            # when close() returns.
            await asyncio.shield(self._protocol.lost)
        else:
            self.sock.close()

    async def wait_ready(self) -> None:
        """Return once the socket is live (its datagram endpoint made)."""
        if self._transport is not None:
            return
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._ready)

    @property
    def state(self) -> PathState:
        """Read from the connection, which owns it."""
        return self._owner.path_state(self.path_id)

    # ------------------------------------------------------------------ data plane

    def send(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        self._transport.sendto(data, self.remote)
        self.stats.bytes_sent += len(data)
        self.stats.datagrams_sent += 1

    def _on_datagram(self, data: bytes, addr: tuple[Any, ...]) -> None:
        # The peer's own tuple compares equal in one step; only other forms (an IPv4-mapped
        # or differently typed address) pay for normalising.
        if addr != self.remote and _addr_key(addr) != self._remote_key:
            # Only the peer's address is ours to process (RFC 9000 §9: clients drop the rest).
            self.stats.dropped_off_path += 1
            return
        self.stats.bytes_received += len(data)
        self.stats.datagrams_received += 1
        self._owner.datagram_received(self.path_id, data, addr)

    def _on_error(self, exc: OSError) -> None:
        # A failed sendto() or an ICMP error (IP_RECVERR, set in on_start). The error queue is
        # read every time: it holds the ICMP details, and unread it keeps epoll waking us.
        reports = read_error_queue(self.sock) if self.sock.fileno() >= 0 else []
        evidence = judge(exc.errno, reports, self._remote_key[0])
        if evidence in (Evidence.UNREACHABLE, Evidence.SEND_FAILED):
            self._fail_response(exc)  # a probe on request fails at once, with this cause
        self._owner.path_error(self.path_id, exc, evidence)  # it decides what this means

    def queued(self) -> bool:
        """Whether the kernel holds datagrams this socket's reader has not taken yet: before
        silence on this path is judged, they must be read (a starved loop is not a dead path)."""
        if self.sock.fileno() < 0:
            return False
        pending = array.array("i", [0])
        try:
            fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, pending, True)
        except OSError:
            return False
        return pending[0] > 0

    def path_response(self, rtt: float) -> None:
        """Called by the connection when a PATH_RESPONSE for this path arrived on its socket
        (the connection also keeps it as evidence for the path's health group)."""
        if self._response is not None and not self._response.done():
            self._response.set_result(rtt)

    def connection_closed(self, exc: BaseException) -> None:
        self._fail_response(exc)

    def _fail_response(self, exc: BaseException) -> None:
        if self._response is not None and not self._response.done():
            self._response.set_exception(exc)

    # ------------------------------------------------------------------ control plane

    async def receive(self, msg: object) -> object:
        if isinstance(msg, StartProbe):
            if self._probe_task is None or self._probe_task.done():
                self._probe_task = self.spawn(self._probe(msg.timeout), name="probe")
            return Later(self._probe_task)
        return await super().receive(msg)

    # ------------------------------------------------------------------ probe on request

    async def _probe(self, timeout: float) -> float:
        """Challenge until answered or ``timeout``; returns the probe RTT."""
        loop = asyncio.get_running_loop()
        self.stats.probe_try_times = []
        before = self.state
        self._owner.probe_started(self.path_id)
        start = loop.time()
        deadline = start + timeout
        wait = self._schedule.first_wait
        tries = rechecks = 0
        reading = False  # the deadline moved only for unread datagrams: no new challenge

        def expired() -> bool:
            """Past the deadline, counting only time the loop could read, with nothing left
            unread in the socket (bounded: at most ``_PROBE_CAP`` timeouts of wall time)."""
            nonlocal deadline, rechecks, reading
            reading = False
            now = loop.time()
            if now < deadline:
                return False
            cap = start + _PROBE_CAP * timeout
            deadline = min(start + timeout + self._owner.starved(start, now), cap)
            if now < deadline:
                return False
            if now < cap and rechecks < _MAX_RECHECKS and self.queued():
                rechecks += 1
                deadline = now + _RECHECK_AFTER
                reading = True
                return False
            return True

        try:
            while True:
                # A fresh future each time: a timeout cancelled the last one. While reading
                # (the deadline moved for unread datagrams) it awaits the same challenge.
                self._response = response = loop.create_future()
                if not reading:
                    tries += 1
                    datagrams = await self._conn.ask(
                        EmitChallenge(self.path_id, nudge=tries == 1), timeout=None
                    )
                    assert isinstance(datagrams, list)
                    for data in datagrams:
                        self.send(data)
                    self.stats.probes_sent += 1
                    self.stats.probe_try_times.append(time.time())
                if expired():
                    raise ProbeTimeoutError(_fmt(self.local), timeout=timeout)
                try:
                    async with asyncio.timeout(min(wait, deadline - loop.time())):
                        rtt = await response
                except TimeoutError:
                    if expired():
                        raise ProbeTimeoutError(_fmt(self.local), timeout=timeout) from None
                    if not reading:
                        wait = min(wait * self._schedule.backoff, self._schedule.max_wait)
                    continue
                self._owner.probe_answered(self.path_id, rtt)
                return rtt
        except (ProbeTimeoutError, OSError) as exc:
            self._owner.probe_failed(self.path_id, before, timed_out=True)
            if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
                raise ProbeTimeoutError(_fmt(self.local), timeout=timeout) from exc
            raise
        except BaseException:
            # Cancelled by the caller, no CID, the connection going: leave no trace.
            self._owner.probe_failed(self.path_id, before, timed_out=False)
            raise
        finally:
            self._response = None


def _addr_key(addr: tuple[Any, ...]) -> tuple[str, int]:
    host = str(addr[0])
    if host.startswith("::ffff:"):
        host = host[7:]
    return host, int(addr[1])


def _fmt(addr: tuple[Any, ...]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
