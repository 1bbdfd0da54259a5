"""The local control socket: drive a running supervisor from another process on the same host.

Why a Unix socket: ``quic-supervisor serve``/``dial`` (or an agent) hold their connections in
their own process; an operator needs to list paths, drain an interface or move one connection
without restarting it. A Unix stream socket created with mode 0600 limits that to the user who
runs the supervisor (and root), with no port and no authentication scheme to get wrong.

Wire: each frame is a 4-byte big-endian length and that many bytes of one envelope
(``actors.envelope``, msgpack) of the one remote protocol (:mod:`supervisor.remote.protocol`,
shared with the Ray agent). Requests: ``sup.Snapshot``, ``sup.Switch``, ``sup.Probe``,
``sup.ClosePath``, ``sup.AddPath`` (without ``sock=``), ``sup.Stats``, ``net.StatusRequest``,
``remote.Drain`` and ``remote.Health`` (ready and live while the supervisor answers). A Ray
agent serving the socket (``agent --control-socket``) answers with its own dispatcher instead:
every agent request, ``remote.Stop`` and its own health included, which is what kubelet's
probes and preStop call. ``sup.Snapshot`` lists the connections the supervisor's listeners accepted
too (``inbound=True``, the peer's current address: a server's ``ctl paths``); path requests for
one of those fail with ``MigrationNotSupportedError`` (the client migrates them). A migration
asked here is recorded with ``initiator="operator"`` (the protocol's
:class:`~supervisor.remote.protocol.Dispatcher`). Each gets exactly one reply, in order: the
result (a ``ConnectionSnapshot``,
``remote.Snapshots``, ``sup.DrainReport``, ``net.Status`` or ``remote.Ok``) or a
``remote.Error`` that :class:`ControlClient` raises as the original typed exception. A frame
over 1 MiB, or bytes that are not an envelope (anything :func:`actors.envelope.decode` refuses:
garbage, nesting deeper than its ``MAX_DEPTH``, unknown types), get a ``FrameError`` or
``EnvelopeError`` reply and the connection is closed (the stream cannot be trusted after that);
the server keeps serving everyone else. No frame content can make the server fail without
replying.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import struct
from typing import TYPE_CHECKING, Any

from multiaddr import Multiaddr

from actors.envelope import EnvelopeError, decode, encode
from actors.errors import MigrationNotSupportedError
from actors.lifecycle import Closing, Service
from supervisor.core.messages import (
    AddPathRequest,
    ClosePathRequest,
    ConnectionSnapshot,
    MigrationStats,
    ProbeRequest,
    SnapshotRequest,
    StatsRequest,
    SwitchRequest,
    expect,
)
from supervisor.core.validate import duration
from supervisor.orchestration.drain import DrainReport
from supervisor.orchestration.network.monitor import NetworkStatus, NetworkStatusRequest
from supervisor.remote.protocol import (
    Dispatcher,
    DrainRequest,
    ErrorReply,
    Health,
    HealthRequest,
    StopReport,
    StopRequest,
    ask_migrate,
    encode_error,
    rebuild_error,
    reply_body,
)
from telemetry.propagation import current_trace_fields

if TYPE_CHECKING:
    from supervisor.orchestration.supervisor import Supervisor

__all__ = [
    "MAX_FRAME",
    "ControlClient",
    "ControlServer",
    "ControlSocketError",
    "FrameError",
]

log = logging.getLogger(__name__)

#: Largest request frame the server accepts (replies may be larger: see ControlClient).
MAX_FRAME = 1 << 20
_HEADER = struct.Struct(">I")
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux


_FORWARDED = (
    SwitchRequest,
    ProbeRequest,
    ClosePathRequest,
    AddPathRequest,
    StatsRequest,
    NetworkStatusRequest,
)


class FrameError(ValueError):
    """A frame that breaks the control protocol (too large, truncated)."""


class ControlSocketError(ConnectionError):
    """The control socket cannot be reached, or it went away mid-request."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"control socket {path}: {reason}")


# -- framing -------------------------------------------------------------------------------------


async def read_frame(reader: asyncio.StreamReader, limit: int) -> bytes | None:
    """One frame's payload; None at a clean end of stream (between frames)."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise FrameError("the stream ended inside a frame header") from None
    (size,) = _HEADER.unpack(header)
    if size > limit:
        raise FrameError(
            f"frame of {size} bytes exceeds the {limit}-byte limit: a control frame is a 4-byte "
            "big-endian length and one msgpack envelope (is this a quic-supervisor ctl client?)"
        )
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise FrameError(f"the stream ended inside a {size}-byte frame") from None


def frame(data: bytes) -> bytes:
    return _HEADER.pack(len(data)) + data


# -- server --------------------------------------------------------------------------------------


def _check_path(path: str) -> None:
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ValueError(
            f"control socket path {path!r} is longer than {_SUN_PATH_MAX} bytes (the Unix "
            "socket limit): use a shorter path, e.g. under /run or /tmp"
        )


def _claim(path: str) -> None:
    """Make ``path`` free for a new socket: remove a stale socket, refuse anything else.

    Never follows a symlink and never removes a file that is not a socket, nor a socket that
    some process still accepts on (another supervisor).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(
            errno.EEXIST,
            f"control socket path {path} exists and is not a socket: choose another path "
            "(it is never removed for you)",
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale: left behind by a process that did not clean up
            return
        except OSError as exc:
            raise FileExistsError(
                errno.EEXIST, f"control socket path {path} exists and cannot be checked ({exc})"
            ) from exc
    raise FileExistsError(
        errno.EEXIST,
        f"control socket {path} is in use by another process: stop it, or choose another path",
    )


class ControlServer(Service):
    """Serve ``sup`` on a Unix socket at ``path`` (mode 0600) while the context is open.

        async with Supervisor(...) as sup, ControlServer(sup, "/run/qs.sock"):
            ...

    The socket file is removed on close (only if it is still ours). ``dispatcher`` answers
    instead of the supervisor's own (the Ray agent passes its own: one protocol, two carriers).
    """

    def __init__(
        self,
        sup: Supervisor,
        path: str | os.PathLike[str],
        *,
        max_frame: int = MAX_FRAME,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        self.sup = sup
        self.path = os.fspath(path)
        self.max_frame = max_frame
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._clients: set[asyncio.Task[Any]] = set()
        self.dispatcher = dispatcher or Dispatcher(
            handlers={SnapshotRequest: self._snapshot, HealthRequest: self._health},
            forwarded=_FORWARDED,
            forward=self._forward,
            asks=sup,
            name="control-socket",
        )

    async def start(self) -> None:
        if self._server is not None:
            return
        _check_path(self.path)
        _claim(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            try:
                # Before listen(): until then nobody can connect, so no one ever sees a
                # wider mode (no process-wide umask change needed).
                os.chmod(self.path, 0o600)
                st = os.stat(self.path)
                self._inode = (st.st_dev, st.st_ino)
                sock.listen(64)
                sock.setblocking(False)
                self._server = await asyncio.start_unix_server(
                    self._serve_client, sock=sock, limit=self.max_frame + _HEADER.size
                )
            except BaseException:
                os.unlink(self.path)
                raise
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        """Stop accepting, end every client connection (cancelling its request), remove the
        socket file."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        await server.wait_closed()
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            while True:
                try:
                    data = await read_frame(reader, self.max_frame)
                    if data is None:
                        return
                    env = decode(data)
                except (FrameError, EnvelopeError) as exc:
                    # The byte stream cannot be trusted any more: answer, then hang up.
                    await self._send(writer, encode_error(exc))
                    return
                except Exception as exc:  # decode raises only EnvelopeError: a bug, still answered
                    log.warning("control frame could not be decoded", exc_info=True)
                    await self._send(writer, encode_error(exc))
                    return
                await self._send(writer, await self.dispatcher.answer(env))
        except ConnectionError:
            return  # the client went away
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(frame(data))
        await writer.drain()

    async def _forward(self, msg: object) -> object:
        if isinstance(msg, AddPathRequest) and msg.socket_key is not None:
            raise ValueError("sock= cannot cross the control socket: pass local_addr or device")
        conn_id = getattr(msg, "conn_id", None)
        if isinstance(conn_id, str) and self.sup.inbound_snapshot(conn_id) is not None:
            raise MigrationNotSupportedError("inbound", conn_id=conn_id)
        return await self.sup.ask(msg)

    async def _health(self, _msg: HealthRequest) -> Health:
        """Ready and live while the supervisor's actor answers (this reply ran on its loop)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await self.sup.ask(StatsRequest())
        except Exception as exc:
            return Health(ready=False, live=True, why=f"the supervisor does not answer: {exc}")
        return Health(
            ready=True,
            live=True,
            why="ready",
            loop_lag=loop.time() - started,
            connections=len(self.sup.connections()) + len(self.sup.inbound_connections()),
        )

    async def _snapshot(self, msg: SnapshotRequest) -> object:
        """Outbound connections from the supervisor, then the listeners' inbound ones."""
        if msg.conn_id is not None:
            inbound = self.sup.inbound_snapshot(msg.conn_id)
            return inbound if inbound is not None else await self.sup.ask(msg)
        outbound = expect(await self.sup.ask(msg), tuple)
        return (*outbound, *self.sup.inbound_connections())


# -- client --------------------------------------------------------------------------------------


class ControlClient(Closing):
    """Talk to a :class:`ControlServer`: one connection, one request at a time, typed errors.

        async with ControlClient("/run/qs.sock") as ctl:
            report = await ctl.drain(device="eth0")

    The connection opens on first use and reopens after a failure or timeout.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float | None = 120.0,
        max_reply: int = 64 * MAX_FRAME,
    ) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.max_reply = max_reply
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(
                    self.path, limit=self.max_reply + _HEADER.size
                )
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise ControlSocketError(
                    self.path,
                    f"no supervisor is serving there ({exc.strerror}): start one with "
                    "`quic-supervisor serve|dial|agent --control-socket PATH`",
                ) from exc
            except PermissionError as exc:
                raise ControlSocketError(
                    self.path,
                    "permission denied: the socket is mode 0600, run as the user that "
                    "started the supervisor",
                ) from exc
        return self._reader, self._writer

    async def request(self, msg: object) -> object:
        """Send one request; return its result or raise the error the supervisor raised."""
        data = encode(msg, **current_trace_fields())
        async with self._lock:
            try:
                async with asyncio.timeout(self.timeout):
                    reader, writer = await self._connect()
                    writer.write(frame(data))
                    with contextlib.suppress(ConnectionError):
                        # The server may have answered and hung up already (it does after a
                        # frame it cannot read): its reply is still in the reader.
                        await writer.drain()
                    reply = await read_frame(reader, self.max_reply)
            except BaseException:
                await self.close()  # mid-request: the stream's state is unknown
                raise
            if reply is None:
                await self.close()
                raise ControlSocketError(self.path, "the supervisor closed the connection")
        body = decode(reply).body
        if isinstance(body, ErrorReply) and isinstance(rebuild_error(body), EnvelopeError):
            # The server hangs up after a frame it could not read: the next request must
            # not find this connection dead.
            await self.close()
        return reply_body(body)

    async def migration_stats(self) -> MigrationStats:
        """How the supervisor's migrations ended (see ``Supervisor.migration_stats``)."""
        reply = expect(await self.request(StatsRequest()), MigrationStats)
        return reply

    async def network_status(self) -> NetworkStatus:
        """What the supervisor's NetworkMonitor knows (see ``Supervisor.network_status``)."""
        reply = expect(await self.request(NetworkStatusRequest()), NetworkStatus)
        return reply

    async def snapshot(self) -> tuple[ConnectionSnapshot, ...]:
        """Every connection of the supervisor with its paths: the ones it dialled, then the
        ones its listeners accepted (``inbound=True``, one path to the peer's current
        address)."""
        reply = expect(await self.request(SnapshotRequest(None)), tuple)
        return reply

    async def connection(self, conn_id: str) -> ConnectionSnapshot:
        reply = expect(await self.request(SnapshotRequest(conn_id)), ConnectionSnapshot)
        return reply

    async def drain(
        self,
        *,
        local_addr: str | Multiaddr | None = None,
        device: str | None = None,
        probe_timeout: float = 2.0,
        close_drained: bool = True,
    ) -> DrainReport:
        """:func:`supervisor.orchestration.drain.drain`, run by the supervisor behind the socket."""
        reply = await self.request(
            DrainRequest(
                None if local_addr is None else str(local_addr),
                device,
                probe_timeout,
                close_drained,
            )
        )
        assert isinstance(reply, DrainReport)
        return reply

    async def migrate(
        self, conn_id: str, to_local_addr: str | Multiaddr, *, probe_timeout: float = 2.0
    ) -> ConnectionSnapshot:
        """Make the path on ``to_local_addr`` the active one (reason ``"manual"``): see
        ``protocol.migrate_to``."""
        return await ask_migrate(self.request, conn_id, to_local_addr, probe_timeout=probe_timeout)

    async def health(self) -> Health:
        """Readiness and liveness of the process behind the socket (see ``remote.Health``)."""
        return expect(await self.request(HealthRequest()), Health)

    async def stop(self, deadline: float = 10.0) -> StopReport:
        """The orderly stop of a Ray agent behind the socket (``remote.Stop``); this client
        waits up to ``deadline`` plus its own timeout for the report."""
        deadline = duration("deadline", deadline, allow_zero=True)
        saved = self.timeout
        if saved is not None:
            self.timeout = saved + deadline
        try:
            return expect(await self.request(StopRequest(deadline)), StopReport)
        finally:
            self.timeout = saved
