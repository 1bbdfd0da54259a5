"""ConnectionActor: one outbound QUIC connection, the only code that builds or parses its packets.

It owns the aioquic connection (through ``MigratingQuicConnection``), its timer, its streams
and, as children, one PathActor per local socket. Datagrams arrive by direct synchronous call
from the paths and are answered in one batch per event-loop turn. Control messages (connect,
add/probe/switch/close a path, close) arrive through the mailbox; the long ones run as owned
tasks answered with :class:`Later`, so the mailbox never waits on the network.

Rules kept here (DESIGN section 4): no probe before the handshake is confirmed; each path sends
with its own peer CID; probes stay outside loss recovery; a switch starts fresh RTT/congestion
state, sends a non-probing packet at once and is confirmed by a non-probing packet from the peer
on the new path within 3 x PTO, or rolled back; the peer's ``disable_active_migration`` forbids
any other local address; its ``preferred_address`` is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration

from actors.errors import (
    ActivePathCloseError,
    ConnectionClosedError,
    DialTimeoutError,
    HandshakeError,
    MigrationNotSupportedError,
    MigrationRolledBackError,
    NoConnectionIdError,
    PathClosedError,
    PathLimitError,
    PathNotValidatedError,
)
from actors.flag import Flag
from actors.health import ActiveLiveness, HealthConfig, Liveness
from actors.messages import (
    ActivePathDead,
    AddPath,
    Close,
    ClosePath,
    Connect,
    ConnectionEnded,
    EmitChallenge,
    Probe,
    StartProbe,
    Switch,
    SwitchResult,
)
from actors.path import UNREACHABLE_ERRNOS, PathActor, ProbeSchedule
from actors.path_state import PathState
from actors.quic_adapter import MigratingQuicConnection, PathAddr
from actors.runtime import Actor, ActorRef, ChildFailed, Later
from actors.streams import DEFAULT_STREAM_BUFFER, Stream

log = logging.getLogger(__name__)

#: The clock of every time handed to aioquic (and compared with its times). Not loop.time():
#: uvloop's is cached per loop turn at 1 ms resolution, which made sub-millisecond probe RTTs
#: measure 0.0 (and ACK RTT samples coarse). Under plain asyncio the two are the same clock.
_now = time.monotonic

#: Paths per connection, the handshake path included. Each needs its own peer CID and aioquic
#: keeps at most 8 network paths (evicting silently beyond): 7 leaves one spare CID in hand.
MAX_PATHS = 7


@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    """Tunables of a connection actor (defaults suit loopback and LAN paths alike)."""

    stream_buffer: int = DEFAULT_STREAM_BUFFER
    probe_schedule: ProbeSchedule = field(default_factory=ProbeSchedule)
    #: A standby path validated longer ago than this is re-probed before a switch to it.
    stale_after: float = 30.0
    #: Lower bound of the switch confirmation window (3 x PTO can be a few ms on loopback, less
    #: than one scheduling hiccup of a busy Python process).
    min_confirmation_window: float = 0.2
    #: Path health (keep-alives on standby paths, liveness of the active path); None: off.
    #: Set from ``FailoverPolicy`` by the Supervisor.
    health: HealthConfig | None = None


class ConnectionActor(Actor):
    """Owns one client QUIC connection and its paths."""

    def __init__(
        self,
        *,
        conn_id: str,
        configuration: QuicConfiguration,
        remote: tuple[Any, ...],
        first_socket: socket.socket,
        sockets: dict[int, socket.socket],
        notify: Callable[[object], None],
        options: ConnectionOptions | None = None,
    ) -> None:
        self.conn_id = conn_id
        self.remote = remote
        self.options = options or ConnectionOptions()
        # A stream's first window must not exceed its buffer either (see StreamCredit).
        configuration.max_stream_data = min(
            configuration.max_stream_data, self.options.stream_buffer
        )
        self.quic = MigratingQuicConnection(configuration=configuration)
        self._first_socket = first_socket
        self._sockets = sockets  # handed-over sockets, by key (see AddPath)
        self._notify = notify
        self.paths: dict[int, PathActor] = {}
        self._path_refs: dict[int, ActorRef] = {}
        self._path_ids = itertools.count()
        self._ping_ids = itertools.count(1)
        self.streams: dict[int, Stream] = {}
        # Streams the peer opened, made on first use: an asyncio.Queue costs ~2.5 KiB and most
        # client connections never see one (bench B4 counts RSS per connection).
        self._incoming: asyncio.Queue[Stream] | None = None
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None  # the deadline ``_timer`` was armed for
        self._flush_scheduled = False
        self._handshake_done = Flag()
        self._confirmed = Flag()
        self._changed = Flag()  # set after every input batch: wakes condition waiters
        self.closed = False
        self.close_reason: str | None = None
        self.close_error: ConnectionClosedError | None = None
        self._terminated = Flag()
        self.alpn: str | None = None
        self.app_handler: Callable[[qe.QuicEvent], bool] | None = None
        self.migrations = 0
        self._ops: set[asyncio.Task[Any]] = set()  # probe/switch tasks (see busy_tasks)
        self.bytes_by_state: dict[str, int] = {}
        self._unreachable: set[int] = set()  # paths with a fresh ICMP unreachable
        self._health_wake = Flag()
        self._watch_idle = False  # the active-path watcher sleeps until traffic resumes
        self._dead_reported: int | None = None  # active path already reported dead

    # ------------------------------------------------------------------ lifecycle

    async def on_start(self) -> None:
        path_id = next(self._path_ids)
        self._start_path(path_id, self._first_socket, PathState.NEW)
        if self.options.health is not None:
            self.spawn(self._watch_active(self.options.health), name="watch-active")

    async def on_stop(self) -> None:
        if not self.closed:
            self._terminate(ConnectionClosedError(self.conn_id, reason="connection actor stopped"))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        keylog = self.quic.configuration.secrets_log_file
        if keylog is not None:
            keylog.close()  # SSLKEYLOGFILE, opened for this connection

    def _start_path(self, path_id: int, sock: socket.socket, state: PathState) -> PathActor:
        path = PathActor(
            path_id=path_id,
            sock=sock,
            remote=self.remote,
            sink=self,
            conn=self.ref,
            on_state=self._path_state_changed,
            initial_state=state,
            schedule=self.options.probe_schedule,
            health=self.options.health,
        )
        self.paths[path_id] = path
        self._path_refs[path_id] = self.spawn_child(path, name=f"{self.conn_id}/path{path_id}")
        return path

    def _path_state_changed(self, path_id: int, old: PathState, new: PathState) -> None:
        from actors.messages import PathStateReport

        self._notify(PathStateReport(path_id=path_id, old=old, new=new))

    # ------------------------------------------------------------------ data plane

    def datagram_received(self, path_id: int, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.closed:
            return
        self.quic.receive_datagram(data, PathAddr(addr, path_id), _now())
        if self._unreachable:
            self._unreachable.discard(path_id)  # it delivers again
        self._after_input()

    def path_error(self, path_id: int, exc: OSError) -> None:
        if exc.errno in UNREACHABLE_ERRNOS:
            self._unreachable.add(path_id)
            self._health_wake.set()  # the active path may have just died: judge now
        self._changed.set()

    def path_failed(self, path_id: int) -> None:
        """A standby path's keep-alives failed: switch() must re-validate it first."""
        if self.quic.has_path(path_id):
            self.quic.invalidate_path(path_id)

    def _after_input(self) -> None:
        quic = self.quic
        while (event := quic.next_event()) is not None:
            self._handle_event(event)
        for response in quic.take_path_responses():
            path = self.paths.get(response.path_id)
            if path is not None:
                path.path_response(response.rtt)
        if quic.handshake_confirmed and not self._confirmed.is_set():
            self._confirmed.set()
        self._changed.set()
        self._schedule_flush()

    def _handle_event(self, event: qe.QuicEvent) -> None:
        if self.app_handler is not None and self.app_handler(event):
            return
        if isinstance(event, qe.StreamDataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                stream = self._new_stream(event.stream_id)
                self._accepted().put_nowait(stream)
            stream.feed(event.data, event.end_stream)
            self.quic.set_receive_backlog(
                event.stream_id, stream.receive_backlog, self.options.stream_buffer, due=False
            )
        elif isinstance(event, qe.StreamReset):
            from actors.streams import StreamResetError

            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.fail(StreamResetError(event.stream_id, event.error_code))
        elif isinstance(event, qe.HandshakeCompleted):
            self.alpn = event.alpn_protocol
            self._handshake_done.set()
        elif isinstance(event, qe.ConnectionTerminated):
            by_peer = event.reason_phrase != "Idle timeout"
            self._terminate(
                ConnectionClosedError(
                    self.conn_id,
                    reason=f"{event.reason_phrase or 'closed'} (error code {event.error_code})",
                ),
                error_code=event.error_code,
                by_peer=by_peer,
            )

    def transmit_soon(self) -> None:
        """Send what aioquic has queued, once, later in this event-loop turn.

        For code that calls ``quic.send_*`` outside the input path (an application protocol such
        as HTTP/3 sending a request): input batches already end with a flush.
        """
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and not self.closed:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Send everything aioquic has for us, each datagram from its path's socket."""
        self._flush_scheduled = False
        if self.closed and not self.quic.close_pending:
            return
        now = _now()
        if self._watch_idle:
            self._watch_idle = False
            self._health_wake.set()  # sending again: silence means something from now on
        active = self.quic.active_path_id if self.quic.path_count else None
        for data, addr in self.quic.datagrams_to_send(now):
            path = self.paths.get(getattr(addr, "path_id", active if active is not None else -1))
            if path is not None:
                path.send(data)
        for stream_id, stream in list(self.streams.items()):
            stream.poke_writable()
            if stream.finished and not self.quic.has_stream(stream_id):
                del self.streams[stream_id]  # done both ways; the caller's handle still reads
        self._arm_timer()

    def _arm_timer(self) -> None:
        when = None if self.closed else self.quic.get_timer()
        if self._timer is not None:
            if when == self._timer_at:
                # Most flushes leave the deadline as it was (bench B3: ~60 %): keep the handle
                # rather than cancel it and push a new one on the loop's heap every flush.
                return
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            # aioquic's deadline is on _now()'s clock: arm the loop's timer by delay.
            self._timer = self._loop.call_later(max(0.0, when - _now()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.quic.handle_timer(_now())
        self._after_input()

    # ------------------------------------------------------------------ streams (data plane)

    def _new_stream(self, stream_id: int) -> Stream:
        stream = Stream(self, stream_id, self.options.stream_buffer)
        self.streams[stream_id] = stream
        return stream

    def _accepted(self) -> asyncio.Queue[Stream]:
        if self._incoming is None:
            self._incoming = asyncio.Queue()
        return self._incoming

    def open_stream(self) -> Stream:
        self.check_open()
        stream_id = self.quic.get_next_available_stream_id()
        return self._new_stream(stream_id)

    async def accept_stream(self) -> Stream:
        self.check_open()
        return await self._accepted().get()

    def stream_send(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        self.check_open()
        self.quic.send_stream_data(stream_id, data, end_stream)
        self._schedule_flush()

    def stream_send_backlog(self, stream_id: int) -> int:
        return self.quic.send_backlog(stream_id)

    def stream_consumed(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        backlog = stream.receive_backlog if stream is not None else 0
        if self.quic.set_receive_backlog(stream_id, backlog, self.options.stream_buffer):
            self._schedule_flush()

    def check_open(self) -> None:
        if self.closed:
            raise self.close_error or ConnectionClosedError(self.conn_id)

    # ------------------------------------------------------------------ control plane

    async def receive(self, msg: object) -> object:
        if isinstance(msg, EmitChallenge):
            return Later(self.spawn(self._emit_challenge(msg), name="emit-challenge"))
        if isinstance(msg, Connect):
            return Later(self.spawn(self._connect(msg.timeout), name="connect"))
        if isinstance(msg, AddPath):
            return self._add_path(msg)
        if isinstance(msg, Probe):
            return Later(self._op(self._probe(msg.path_id, msg.timeout), "probe"))
        if isinstance(msg, Switch):
            return Later(self._op(self._switch(msg), "switch"))
        if isinstance(msg, ClosePath):
            return await self._close_path(msg.path_id)
        if isinstance(msg, Close):
            self._close(msg.error_code, msg.reason)
            return None
        if isinstance(msg, ChildFailed):
            # A path that crashed is a failed path, never a failed connection.
            for path_id, ref in list(self._path_refs.items()):
                if ref is msg.ref:
                    self._forget_path(path_id)
            return None
        return await super().receive(msg)

    def _op(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = self.spawn(coro, name=name)
        self._ops.add(task)
        task.add_done_callback(self._ops.discard)
        return task

    def busy_tasks(self) -> set[asyncio.Task[Any]]:
        """Probes and switches in progress (including the paths' probe loops)."""
        busy = {t for t in self._ops if not t.done()}
        for path in self.paths.values():
            task = path.probe_task
            if task is not None and not task.done():
                busy.add(task)
        return busy

    async def _watch_active(self, config: HealthConfig) -> None:
        """Judge the active path from what arrives while data is outstanding (no probes).

        Degraded and back is a state change; dead is reported once to the supervisor, whose
        failover policy decides what to do. When idle, a PING now and then keeps the
        judgement meaningful (the PING is non-probing, which is fine on the active path).
        """
        judge = ActiveLiveness(config)
        await self._wait_confirmed()
        wait = 0.0
        while not self.closed:
            self._health_wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._health_wake.wait()
            self._watch_idle = False
            pto = self.quic.probe_timeout()
            wait = min(max(pto / 2, 0.02), 0.1)
            if self.closed:
                return
            active = self.quic.active_path_id
            path = self.paths.get(active)
            if path is None:
                continue
            now = _now()
            last = self.quic.last_rx(active)
            outstanding = self.quic.outstanding_since()
            if judge.needs_keepalive(now=now, last_receive=last, outstanding_since=outstanding):
                self.quic.send_ping(next(self._ping_ids))
                self._schedule_flush()
                continue
            if outstanding is None and active not in self._unreachable:
                # Idle: nothing to judge until the keep-alive is due, or until we send
                # something (_flush wakes us), so idle connections cost no wake-ups.
                since = last if last is not None else now
                wait = max(since + config.active_keepalive - now, wait)
                self._watch_idle = True
                if path.state is PathState.DEGRADED:
                    path.set_state(PathState.ACTIVE)
                continue
            verdict = judge.judge(
                now=now,
                last_receive=last,
                outstanding_since=outstanding,
                pto=pto,
                unreachable=active in self._unreachable,
            )
            if verdict is Liveness.ACTIVE:
                self._dead_reported = None
                if path.state is PathState.DEGRADED:
                    path.set_state(PathState.ACTIVE)
            elif verdict is Liveness.DEGRADED:
                if path.state is PathState.ACTIVE:
                    path.set_state(PathState.DEGRADED)
            elif self._dead_reported != active:
                self._dead_reported = active
                if path.state is PathState.ACTIVE:
                    path.set_state(PathState.DEGRADED)
                reason = "unreachable" if active in self._unreachable else "silent"
                self._notify(ActivePathDead(self.conn_id, active, reason))

    async def _connect(self, timeout: float) -> None:
        deadline = self._loop.time() + timeout
        # The path hands its socket to asyncio in its own on_start: an Initial flushed before
        # that is dropped, and the handshake then waits a whole PTO (~200 ms) to resend it.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.paths[0].wait_ready()
        self.quic.connect(PathAddr(self.remote, 0), now=_now())
        self.quic.attach_initial_path(0)
        self._flush()
        done = asyncio.ensure_future(self._handshake_done.wait())
        ended = asyncio.ensure_future(self._terminated.wait())
        try:
            await asyncio.wait(
                {done, ended},
                timeout=max(0.0, deadline - self._loop.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            done.cancel()
            ended.cancel()
        if self._handshake_done.is_set():
            self.paths[0].set_state(PathState.ACTIVE)
            self.paths[0].validated_at = self._loop.time()
            return
        if self.closed:
            raise HandshakeError(_fmt(self.remote), self.close_reason or "connection closed")
        self._close(0, "handshake timeout")
        raise DialTimeoutError(_fmt(self.remote), timeout=timeout)

    def _require_migratable(self) -> None:
        if self.quic.peer_disabled_active_migration:
            raise MigrationNotSupportedError("disable_active_migration", conn_id=self.conn_id)

    def _add_path(self, msg: AddPath) -> int:
        sock = self._sockets.pop(msg.socket_key)
        try:
            self.check_open()
            self._require_migratable()
            if len(self.paths) >= MAX_PATHS:
                raise PathLimitError(MAX_PATHS, conn_id=self.conn_id)
            path_id = next(self._path_ids)
            self.quic.add_path(path_id, self.remote)
        except BaseException:
            sock.close()
            raise
        self._start_path(path_id, sock, PathState.NEW)
        return path_id

    def path(self, path_id: int) -> PathActor:
        path = self.paths.get(path_id)
        if path is None or path.state is PathState.CLOSED:
            raise PathClosedError(None)
        return path

    async def _wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds after some input, at most ``timeout`` seconds."""
        if predicate():
            return True
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._changed.clear()
                    await self._changed.wait()
                    self.check_open()
        except TimeoutError:
            return predicate()
        return True

    async def _wait_confirmed(self) -> None:
        """Probes wait for the handshake to be confirmed (HANDSHAKE_DONE), RFC 9000 §9."""
        while not self._confirmed.is_set():
            self.check_open()
            ended = asyncio.ensure_future(self._terminated.wait())
            confirmed = asyncio.ensure_future(self._confirmed.wait())
            try:
                await asyncio.wait({ended, confirmed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended.cancel()
                confirmed.cancel()
        self.check_open()

    async def _emit_challenge(self, msg: EmitChallenge) -> list[bytes]:
        await self._wait_confirmed()
        self._require_migratable()
        path = self.path(msg.path_id)
        if not self.quic.reserve_peer_cid(msg.path_id):
            # A replenishment may be in flight (we retired a CID): wait one RTT for it.
            rtt = self.quic.smoothed_rtt or self.quic.probe_timeout()
            if not await self._wait_until(lambda: self.quic.spare_peer_cids > 0, rtt):
                raise NoConnectionIdError(_fmt(path.local))
            self.quic.reserve_peer_cid(msg.path_id)
        if msg.nudge and self.quic.ack_now(_now()):
            self._flush()
        datagrams = self.quic.emit_challenge(msg.path_id, _now())
        return [data for data, _ in datagrams]

    async def _probe(self, path_id: int, timeout: float) -> float:
        path = self.path(path_id)
        if path_id == self.quic.active_path_id:
            # The active path is proven by the traffic it carries; report its RTT instead.
            return self.quic.smoothed_rtt or 0.0
        try:
            result = await self._path_refs[path_id].ask(StartProbe(timeout))
        except asyncio.CancelledError:
            self.quic.forget_challenges(path_id)
            raise
        except BaseException:
            if self.quic.has_path(path_id):
                self.quic.forget_challenges(path_id)
                self.quic.invalidate_path(path_id)
            raise
        assert isinstance(result, float)
        del path
        return result

    async def _switch(self, msg: Switch) -> SwitchResult:
        """Make ``msg.path_id`` active; confirmed by the peer within 3 x PTO or rolled back."""
        path = self.path(msg.path_id)
        active = self.quic.active_path_id
        if msg.path_id == active:
            return SwitchResult(active, active, path.rtt, 0.0, None, None, False)
        self._require_migratable()
        if path.state not in (PathState.STANDBY,):
            raise PathNotValidatedError(_fmt(path.local), state=path.state)
        reprobed = False
        now = self._loop.time()
        if path.validated_at is None or now - path.validated_at > self.options.stale_after:
            await self._probe(msg.path_id, msg.probe_timeout)
            reprobed = True
        old = self.paths[active]
        t0 = _now()
        pto_old = self.quic.probe_timeout()
        failover = msg.old_path_dead
        token = self.quic.switch_path(
            msg.path_id,
            t0,
            seed_rtt=path.rtt,
            ping_uid=next(self._ping_ids),
            old_path_dead=failover,
        )
        window = max(
            3 * max(pto_old, self.quic.probe_timeout()), self.options.min_confirmation_window
        )
        path.set_state(PathState.ACTIVE)
        old.rollback_target = True  # not failed by its own evidence until this is settled
        old.set_state(PathState.STANDBY)
        self._flush()
        confirmed = False
        try:
            confirmed = await self._wait_until(
                lambda: (self.quic.last_non_probing_rx(msg.path_id) or -1.0) >= t0, window
            )
        finally:
            old.rollback_target = False
            if not confirmed and not self.closed:
                # Rolled back (or cancelled): the old path carries the connection again.
                self.quic.rollback_switch(token, _now(), ping_uid=next(self._ping_ids))
                old.set_state(PathState.ACTIVE)
                path.set_state(PathState.STANDBY)
                self._flush()
                if failover:
                    # Back on a path judged dead: judge it afresh, so it is reported (degraded,
                    # ActivePathDead) again if it still is, and the failover keeps looking.
                    self._dead_reported = None
                    self._health_wake.set()
        if not confirmed:
            self.check_open()
            path.set_state(PathState.FAILED)
            self.quic.invalidate_path(msg.path_id)
            raise MigrationRolledBackError(
                _fmt(old.local),
                _fmt(path.local),
                timeout=window,
                reason="the peer did not reach us on the new path",
            )
        self.migrations += 1
        path.validated_at = self._loop.time()
        if failover:
            # Failed over from: its keep-alives tell when (if) it comes back.
            old.set_state(PathState.FAILED)
            if old.health is not None:
                if active in self._unreachable:
                    old.health.on_unreachable()
                else:
                    old.health.on_lost()
            self.quic.invalidate_path(active)
            self._dead_reported = None
        return SwitchResult(
            from_path=token.from_path,
            to_path=token.to_path,
            probe_rtt=path.rtt,
            confirmation_time=_now() - t0,
            cid_sequence_before=token.cid_sequence_before,
            cid_sequence_after=token.cid_sequence_after,
            reprobed=reprobed,
        )

    async def _close_path(self, path_id: int) -> bool:
        path = self.paths.get(path_id)
        if path is None or path.state is PathState.CLOSED:
            return False  # idempotent
        if not self.closed and path_id == self.quic.active_path_id:
            raise ActivePathCloseError(_fmt(path.local))
        if self.quic.has_path(path_id) and not self.closed:
            self.quic.close_path(path_id)
            self._schedule_flush()  # sends RETIRE_CONNECTION_ID on the active path
        ref = self._path_refs.pop(path_id)
        await ref.stop()
        self.paths.pop(path_id, None)
        return True

    def _forget_path(self, path_id: int) -> None:
        if self.quic.has_path(path_id) and path_id != self.quic.active_path_id:
            self.quic.close_path(path_id)
        self._path_refs.pop(path_id, None)
        self.paths.pop(path_id, None)

    def _close(self, error_code: int, reason: str) -> None:
        if self.closed:
            return
        self.quic.close(error_code=error_code, reason_phrase=reason)
        self._flush()  # CONNECTION_CLOSE leaves on the active path before we stop
        self._terminate(
            ConnectionClosedError(self.conn_id, reason=reason or "closed locally"),
            error_code=error_code,
            by_peer=False,
        )

    def _terminate(
        self, error: ConnectionClosedError, *, error_code: int = 0, by_peer: bool = False
    ) -> None:
        """End everything once: waiters fail, paths stop, the supervisor is told."""
        if self.closed:
            return
        self.closed = True
        self.close_error = error
        self.close_reason = str(error)
        self._terminated.set()
        self._changed.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for stream in self.streams.values():
            stream.fail(error)
        for path in self.paths.values():
            path.connection_closed(error)
        self._notify(ConnectionEnded(self.conn_id, error_code, error.reason or "", by_peer))
        self.ref.request_stop()


def _fmt(addr: tuple[Any, ...]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
