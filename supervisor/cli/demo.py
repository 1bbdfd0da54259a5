"""``quic-supervisor demo``: the main job, on the embedded default (one process, plain asyncio).

It starts an echo server (``Supervisor.listen``, a generated self-signed certificate) on
127.0.0.1, dials it, adds a second loopback path (127.0.0.2), streams verified data over one
bidirectional stream while migrating back and forth between the two paths, and shows the paths
live. The exit status says whether every byte came back intact *and* at least one migration was
confirmed: a demo of migration that never migrated has not shown anything.

The pieces the ``dial`` and ``get`` subcommands share live here too: :class:`VerifiedEcho`
(deterministic blocks written, echoed, compared block by block), :class:`Rotator` (probe, then
switch to the next path on a schedule, paused while an operator moves the connection) and
:class:`TransferProgress` (bytes, rate, ETA).

rich is imported only where something is drawn: the certificate and echo helpers (which
``bench`` uses) work without the ``cli`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from multiaddr import Multiaddr
from opentelemetry.trace import INVALID_SPAN_CONTEXT, Status, StatusCode, Tracer

from actors.errors import InvalidArgumentError, MigrationError, MigrationRolledBackError
from actors.streams import Stream
from supervisor.certificates import self_signed_cert
from supervisor.core.events import (
    EventBus,
    EvtConnectionMigrationCompleted,
    EvtConnectionMigrationFailed,
    EvtConnectionMigrationStarted,
    Subscription,
)
from supervisor.core.handles import Connection, MigratableConn
from supervisor.core.handles import Path as QuicPath
from supervisor.core.messages import PathSnapshot
from supervisor.orchestration.supervisor import Supervisor
from telemetry.tracing import ATTR_PATH_FROM_LOCAL_ADDRESS, ATTR_PATH_TO_LOCAL_ADDRESS

if TYPE_CHECKING:
    from rich.console import Console, Group
    from rich.table import Table

__all__ = [
    "BLOCK",
    "DemoOptions",
    "DemoResult",
    "MigrationRecord",
    "Rotator",
    "TransferProgress",
    "VerifiedEcho",
    "echo_handler",
    "journal_stats",
    "operator_hold",
    "render_paths",
    "render_summary",
    "run_demo",
    "self_signed_cert",
    "stable_cert",
]

#: Size of each verified block; the payload of block i is SHAKE-128(seed || i).
BLOCK = 16384


# --------------------------------------------------------------------------------- certificate


#: How long a ``serve --cert-dir`` certificate is valid: long enough to be "stable" for a
#: development setup, short enough that a forgotten one does not live on for years.
STABLE_CERT_DAYS = 365


def stable_cert(directory: str | Path) -> tuple[Path, Path, str]:
    """``DIR/cert.pem`` and ``DIR/key.pem``: made once, then reused (``serve --cert-dir``).

    Returns ``(certfile, keyfile, how)``, ``how`` being ``"made"``, ``"reused"`` or
    ``"renewed"`` (the old one had expired: clients must take the new ``--cafile``). Refuses
    (:class:`InvalidArgumentError` naming the file and the fix) half a pair, a key file that
    group or others can read, and a directory that is not one.
    """
    from cryptography import x509

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InvalidArgumentError(
            "--cert-dir", str(directory), "it is a file, not a directory: give a directory"
        )
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    have = [f.exists() for f in (certfile, keyfile)]
    if not any(have):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self_signed_cert(directory, valid_days=STABLE_CERT_DAYS)
        return certfile, keyfile, "made"
    if not all(have):
        present, missing = (certfile, keyfile) if have[0] else (keyfile, certfile)
        raise InvalidArgumentError(
            "--cert-dir",
            str(directory),
            f"it holds {present.name} but no {missing.name}: remove {present} to make a new "
            "pair, or give --cert and --key",
        )
    mode = keyfile.stat().st_mode & 0o777
    if mode & 0o077:
        raise InvalidArgumentError(
            "--cert-dir",
            str(directory),
            f"{keyfile} is readable by others (mode {mode:04o}): chmod 600 {keyfile}",
        )
    try:
        cert = x509.load_pem_x509_certificate(certfile.read_bytes())
    except ValueError:
        raise InvalidArgumentError(
            "--cert-dir",
            str(directory),
            f"{certfile} holds no PEM certificate: remove {certfile} and {keyfile} to make a "
            "new pair",
        ) from None
    if cert.not_valid_after_utc <= datetime.datetime.now(datetime.UTC):
        self_signed_cert(directory, valid_days=STABLE_CERT_DAYS)
        return certfile, keyfile, "renewed"
    return certfile, keyfile, "reused"


async def echo_handler(stream: Stream) -> None:
    """Server side of the echo protocol: every byte back on the same stream, then FIN."""
    while data := await stream.read(1 << 16):
        await stream.write(data)  # waits while the send buffer is full
    await stream.close()


# --------------------------------------------------------------------------------- traffic


def block(seed: bytes, index: int) -> bytes:
    """Block ``index`` of the stream: reproducible on both ends, incompressible."""
    return hashlib.shake_128(seed + index.to_bytes(8, "big")).digest(BLOCK)


class VerifiedEcho:
    """Writes deterministic blocks on an echo stream and checks each one as it comes back.

    Comparing against regenerated blocks (not a copy of what was sent) keeps memory flat however
    long it runs, and pins a lost, duplicated or reordered byte to its block.
    """

    def __init__(self, stream: Stream, *, seed: bytes = b"quic-supervisor") -> None:
        self.stream = stream
        self.seed = seed
        self.sent = 0
        self.echoed = 0
        self.verified = 0
        self.first_mismatch: int | None = None  # byte offset
        self.sent_sha = hashlib.sha256()
        self.echo_sha = hashlib.sha256()
        self.started = time.monotonic()
        self.finished: float | None = None

    async def write(
        self,
        *,
        total: int | None = None,
        until: float | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        """Write exactly ``total`` bytes, or whole blocks until monotonic time ``until``, then
        FIN; ``stop`` set ends it early after a whole write (every byte counted as sent is on
        the stream, so its echo can be awaited)."""
        index = 0
        while True:
            if total is not None and self.sent >= total:
                break
            if until is not None and time.monotonic() >= until:
                break
            if stop is not None and stop.is_set():
                break
            data = block(self.seed, index)
            if total is not None:
                data = data[: total - self.sent]
            await self.stream.write(data)
            self.sent_sha.update(data)
            self.sent += len(data)
            index += 1
        await self.stream.close()

    async def read(self) -> None:
        """Read the echo to its end, verifying every block."""
        pending = bytearray()
        index = 0
        while data := await self.stream.read(1 << 16):
            self.echoed += len(data)
            self.echo_sha.update(data)
            pending += data
            while len(pending) >= BLOCK:
                if self.first_mismatch is None:
                    if pending[:BLOCK] == block(self.seed, index):
                        self.verified += BLOCK
                    else:
                        self.first_mismatch = index * BLOCK
                del pending[:BLOCK]
                index += 1
        if pending and self.first_mismatch is None:
            # The writer has finished (the echo ended after our FIN): the tail is its last,
            # partial block.
            if pending == block(self.seed, index)[: len(pending)]:
                self.verified += len(pending)
            else:
                self.first_mismatch = index * BLOCK
        self.finished = time.monotonic()

    @property
    def ok(self) -> bool:
        return (
            self.first_mismatch is None
            and self.sent > 0
            and self.verified == self.sent == self.echoed
            and self.sent_sha.digest() == self.echo_sha.digest()
        )

    @property
    def throughput(self) -> float:
        """Verified bytes per second (each byte crossed the connection twice)."""
        end = self.finished or time.monotonic()
        return self.verified / max(end - self.started, 1e-9)


# --------------------------------------------------------------------------------- migrations


@dataclass(frozen=True, slots=True)
class MigrationRecord:
    """One scheduled migration as the caller saw it."""

    number: int
    from_addr: str
    to_addr: str
    ok: bool
    probe_rtt: float | None  # RTT measured by the probe just before the switch
    confirmation: float | None  # seconds from switch() to the peer's confirmation
    error: str | None = None
    #: The trace of this migration (hex), when the Rotator has a tracer: its caller span is the
    #: parent of ``quic.migration``, so this is the migration's trace id.
    trace_id: str | None = None


def operator_hold(every: float) -> float:
    """How long a schedule of period ``every`` stays paused after an operator's migration ends.

    Two periods, so that the operator's choice outlasts at least one whole period of the
    schedule (one period would let the very next tick undo it), and at least 5 s, so that on a
    fast schedule (0.1-1 s) an operator who runs ``ctl paths`` right after ``ctl migrate`` still
    sees the path they chose, and a drain's close of the old path (which follows its switch)
    lands before the schedule moves again.
    """
    return max(2.0 * every, 5.0)


class Rotator:
    """Moves the connection to the next path on a schedule: probe it, then switch to it.

    A rolled-back or failed migration is recorded and the rotation carries on: the connection
    stays on its old path and no stream byte is lost (the library's contract).

    With a ``tracer``, each migration runs inside a caller span (``MIGRATE_SPAN``): the
    library's ``quic.path.probe`` and ``quic.migration`` become its children, which is how a
    caller learns a migration's trace id (``MigrationRecord.trace_id``).

    Operators win: with ``events`` (the supervisor's bus), :meth:`run` watches this
    connection's migrations whose initiator is ``"operator"`` (``ctl``/``fleet`` migrate or
    drain). While one runs, and for ``hold`` seconds after it ended (default
    :func:`operator_hold`), the schedule makes no move of its own; ``on_operator`` gets a line
    for each start, end and resumption.
    """

    MIGRATE_SPAN = "quic-supervisor.migrate"

    def __init__(
        self,
        mc: MigratableConn,
        *,
        probe_timeout: float = 2.0,
        on_migration: Callable[[MigrationRecord], None] | None = None,
        tracer: Tracer | None = None,
        events: EventBus | None = None,
        hold: float | None = None,
        on_operator: Callable[[str], None] | None = None,
    ) -> None:
        self.mc = mc
        self.probe_timeout = probe_timeout
        self.on_migration = on_migration
        self.tracer = tracer
        self.events = events
        self.hold = hold
        self.on_operator = on_operator
        self.records: list[MigrationRecord] = []
        #: Operator migrations of this connection seen starting.
        self.operator_migrations = 0
        self._operator_running = 0  # started and not yet ended
        self._held_until = 0.0  # monotonic time the schedule may move again
        self._operator_changed = asyncio.Event()

    @property
    def paused(self) -> bool:
        """Whether an operator's migration holds the schedule now."""
        return self._operator_running > 0 or time.monotonic() < self._held_until

    def _next_path(self) -> QuicPath | None:
        paths = self.mc.paths()
        active = next((i for i, p in enumerate(paths) if p.info().active), None)
        if active is None or len(paths) < 2:
            return None
        return paths[(active + 1) % len(paths)]

    async def migrate_once(self) -> MigrationRecord | None:
        """One move to the next path; None when there is none, or an operator's move came
        first (it is not undone)."""
        target = self._next_path()
        if target is None or self.paused:
            return None
        src = _hostport(self.mc.active_path().local_addr)
        dst = _hostport(target.info().local_addr)
        if self.tracer is None:
            maybe = await self._migrate(target, src, dst)
        else:
            with self.tracer.start_as_current_span(
                self.MIGRATE_SPAN,
                attributes={ATTR_PATH_FROM_LOCAL_ADDRESS: src, ATTR_PATH_TO_LOCAL_ADDRESS: dst},
            ) as span:
                maybe = await self._migrate(target, src, dst)
                if maybe is not None and not maybe.ok:
                    span.set_status(Status(StatusCode.ERROR, maybe.error))
            if maybe is not None:
                maybe = replace(maybe, trace_id=format(span.get_span_context().trace_id, "032x"))
        if maybe is None:
            return None
        self.records.append(maybe)
        if self.on_migration is not None:
            self.on_migration(maybe)
        return maybe

    async def _migrate(self, target: QuicPath, src: str, dst: str) -> MigrationRecord | None:
        number = len(self.records) + 1
        rtt: float | None = None
        try:
            await target.probe(timeout=self.probe_timeout)
            rtt = target.info().rtt
            if self.paused:  # an operator moved the connection while we probed: theirs stands
                return None
            t0 = time.monotonic()
            await target.switch()
            return MigrationRecord(number, src, dst, True, rtt, time.monotonic() - t0)
        except MigrationRolledBackError as exc:
            return MigrationRecord(number, src, dst, False, rtt, None, str(exc))
        except MigrationError as exc:
            if self.mc.connection.is_closed:
                raise
            return MigrationRecord(number, src, dst, False, rtt, None, str(exc))

    async def run(
        self, every: float, *, until: float | None = None, stop: asyncio.Event | None = None
    ) -> None:
        """Migrate every ``every`` seconds until monotonic time ``until`` or until ``stop``."""
        stop = stop or asyncio.Event()
        hold = operator_hold(every) if self.hold is None else self.hold
        watcher: asyncio.Task[None] | None = None
        if self.events is not None:
            sub = self.events.subscribe(
                EvtConnectionMigrationStarted,
                EvtConnectionMigrationCompleted,
                EvtConnectionMigrationFailed,
            )
            watcher = asyncio.create_task(self._watch_operators(sub, hold), name="operators")
        try:
            next_at = time.monotonic() + every
            while until is None or next_at < until:
                if not await self._sleep_until(next_at, stop):
                    return
                if self.paused:
                    if not await self._wait_unpaused(stop, until):
                        return
                    self._tell(
                        f"resuming the migration schedule ({hold:g} s after the operator's "
                        "last migration ended)"
                    )
                    next_at = time.monotonic()  # the schedule restarts from here
                await self.migrate_once()
                next_at = max(next_at + every, time.monotonic())
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher

    @staticmethod
    async def _sleep_until(when: float, stop: asyncio.Event) -> bool:
        """A schedule, not a synchronisation: wake at ``when`` unless told to stop first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, when - time.monotonic()))
        return not stop.is_set()

    async def _wait_unpaused(self, stop: asyncio.Event, until: float | None) -> bool:
        """Wait while an operator's migration holds the schedule; False on stop or ``until``."""
        while self.paused:
            self._operator_changed.clear()
            wake = self._held_until if self._operator_running == 0 else None
            if until is not None:
                wake = until if wake is None else min(wake, until)
            waits = {
                asyncio.ensure_future(stop.wait()),
                asyncio.ensure_future(self._operator_changed.wait()),
            }
            try:
                await asyncio.wait(
                    waits,
                    timeout=None if wake is None else max(0.0, wake - time.monotonic()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                for waiter in waits:
                    waiter.cancel()
            if stop.is_set() or (until is not None and time.monotonic() >= until):
                return False
        return True

    async def _watch_operators(self, sub: Subscription, hold: float) -> None:
        conn_id = self.mc.connection.conn_id
        async with sub:
            async for evt in sub:
                assert isinstance(
                    evt,
                    EvtConnectionMigrationStarted
                    | EvtConnectionMigrationCompleted
                    | EvtConnectionMigrationFailed,
                )
                if evt.conn_id != conn_id or evt.initiator != "operator":
                    continue
                move = f"{_hostport(evt.from_local_addr)} -> {_hostport(evt.to_local_addr)}"
                if isinstance(evt, EvtConnectionMigrationStarted):
                    self.operator_migrations += 1
                    self._operator_running += 1
                    self._tell(
                        f"operator migration ({evt.reason}) {move} started: pausing the "
                        "migration schedule"
                    )
                else:
                    self._operator_running = max(0, self._operator_running - 1)
                    self._held_until = max(self._held_until, time.monotonic() + hold)
                    how = (
                        "completed"
                        if isinstance(evt, EvtConnectionMigrationCompleted)
                        else f"failed ({evt.outcome})"
                    )
                    self._tell(
                        f"operator migration ({evt.reason}) {move} {how}: the schedule "
                        f"resumes in {hold:g} s"
                    )
                self._operator_changed.set()

    def _tell(self, line: str) -> None:
        if self.on_operator is not None:
            self.on_operator(line)

    @property
    def succeeded(self) -> int:
        return sum(r.ok for r in self.records)

    @property
    def failed(self) -> int:
        return sum(not r.ok for r in self.records)


def caller_tracer(sup: Supervisor) -> Tracer | None:
    """A tracer from the supervisor's own provider (never the global one), if it has one."""
    provider = sup.tracer_provider
    return provider.get_tracer("quic-supervisor.cli") if provider is not None else None


async def journal_stats(sup: Supervisor, every: float = 0.25) -> None:
    """Write each path's cumulative byte counters to the journal every ``every`` seconds.

    ``Stats`` records (``tx_bytes``, ``rx_bytes``, ``state``, ``active``, ``rtt``) on the
    path's lane: what ``journal plot`` turns into goodput and RTT over time. Returns at once
    without a journal; otherwise runs until cancelled (cancel it before the supervisor closes
    its journal).
    """
    journal = sup.journal
    if journal is None:
        return
    while True:
        for snap in sup.connections():
            for p in snap.paths:
                journal.event(
                    "Stats",
                    {
                        "tx_bytes": p.bytes_sent,
                        "rx_bytes": p.bytes_received,
                        "state": p.state.value,
                        "active": p.active,
                        "rtt": p.rtt,  # the plot's RTT panel
                    },
                    conn=snap.conn_id,
                    path=p.local_addr,
                    span_context=INVALID_SPAN_CONTEXT,
                )
        await asyncio.sleep(every)  # a sampling period, not a synchronisation


class TransferProgress:
    """Bytes, rate and ETA of one transfer while it runs.

    On a terminal (``live``) a rich progress bar: bytes, rate, ETA (the ETA needs a known
    ``total``). Anywhere else (a pipe, a log file, ``--plain``) one plain line every ``every``
    seconds, so that a log shows progress without escape codes. :meth:`run` samples ``done()``
    until cancelled, then draws the final state once.
    """

    def __init__(
        self,
        label: str,
        *,
        total: int | None,
        live: bool,
        every: float = 1.0,
        refresh: float = 0.25,
    ) -> None:
        self.label = label
        self.total = total
        self.live = live
        self.every = every
        self.refresh = refresh
        self.started = time.monotonic()

    def line(self, done: int, rate: float, note: str = "") -> str:
        """The plain progress line: ``t=  2.0s echoed 4.1 MB of 10.0 MB (41%), ...``."""
        text = f"t={time.monotonic() - self.started:6.1f}s {self.label} {_bytes(done)}"
        if self.total:
            text += f" of {_bytes(self.total)} ({100 * done / self.total:.0f}%)"
        text += f", {_bytes(int(rate))}/s"
        if self.total and rate > 0 and done < self.total:
            text += f", ETA {(self.total - done) / rate:.0f} s"
        return text + (f"; {note}" if note else "")

    async def run(self, done: Callable[[], int], note: Callable[[], str] = str) -> None:
        """Sample ``done()`` (bytes so far) and ``note()`` (extra text) until cancelled."""
        if self.live:
            await self._run_live(done, note)
            return
        last_t, last_n = self.started, 0
        while True:
            await asyncio.sleep(self.every)  # a reporting period, not a synchronisation
            now, n = time.monotonic(), done()
            rate = (n - last_n) / max(now - last_t, 1e-9)
            last_t, last_n = now, n
            print(self.line(n, rate, note()), flush=True)

    async def _run_live(self, done: Callable[[], int], note: Callable[[], str]) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[note]}"),
            refresh_per_second=1 / self.refresh,
        )
        task = progress.add_task(self.label, total=self.total, note=note())
        with progress:
            try:
                while True:
                    progress.update(task, total=self.total, completed=done(), note=note())
                    await asyncio.sleep(self.refresh)  # a refresh period
            finally:
                progress.update(task, completed=done(), note=note())


# --------------------------------------------------------------------------------- demo


@dataclass(frozen=True, slots=True)
class DemoOptions:
    duration: float = 10.0
    interval: float = 1.0
    listen: str = "/ip4/127.0.0.1/udp/0/quic-v1"
    second_path: str = "/ip4/127.0.0.2/udp/0/quic-v1"
    #: None: a live table when stdout is a terminal, plain lines otherwise.
    live: bool | None = None
    refresh_per_second: float = 4.0
    drain_timeout: float = 30.0


@dataclass
class DemoResult:
    bytes_sent: int = 0
    bytes_echoed: int = 0
    bytes_verified: int = 0
    first_mismatch: int | None = None
    migrations: int = 0  # confirmed (EvtConnectionMigrationCompleted)
    rollbacks: int = 0  # EvtConnectionMigrationFailed
    failed_attempts: int = 0  # scheduled migrations that did not complete, whatever the reason
    probe_rtts: list[float] = field(default_factory=list)
    confirmations: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    throughput: float = 0.0  # verified bytes per second
    sha256: str = ""
    error: str | None = None

    @property
    def all_verified(self) -> bool:
        return (
            self.error is None
            and self.first_mismatch is None
            and self.bytes_sent > 0
            and self.bytes_verified == self.bytes_sent == self.bytes_echoed
        )

    @property
    def ok(self) -> bool:
        return self.all_verified and self.migrations >= 1


async def _count_events(sub: Subscription, result: DemoResult) -> None:
    async for evt in sub:
        if isinstance(evt, EvtConnectionMigrationCompleted):
            result.migrations += 1
        elif isinstance(evt, EvtConnectionMigrationFailed):
            result.rollbacks += 1


async def run_demo(
    options: DemoOptions,
    console: Console,
    *,
    supervisor_kwargs: dict[str, Any] | None = None,
    on_migration: Callable[[MigrationRecord], str | None] | None = None,
) -> DemoResult:
    """Run the demo and return its figures (the caller turns ``result.ok`` into an exit code).

    ``supervisor_kwargs`` reach :class:`Supervisor` (e.g. ``tracer_provider``, ``journal``).
    ``on_migration`` is the hook for extra per-migration detail (the CLI returns the migration's
    trace id): its text is appended to that migration's progress line. With a tracer provider,
    each migration runs in a caller span (see :class:`Rotator`); with a journal, per-path byte
    counters go to it as ``Stats`` records (see :func:`journal_stats`). Cancelled (Ctrl-C), it
    prints the summary of what ran so far, marked INTERRUPTED, and lets the cancellation go on.
    """
    from rich.text import Text

    if options.duration <= 0 or options.interval <= 0:
        raise ValueError("--duration and --interval must be > 0 seconds")
    live = console.is_terminal if options.live is None else options.live
    result = DemoResult()
    notes: list[str] = []
    echo: VerifiedEcho | None = None
    rotator: Rotator | None = None
    start = time.monotonic()

    def note(record: MigrationRecord) -> None:
        extra = on_migration(record) if on_migration is not None else None
        if record.ok:
            assert record.confirmation is not None
            line = (
                f"migration {record.number}: {record.from_addr} -> {record.to_addr} confirmed in "
                f"{_ms(record.confirmation)} (probe RTT {_ms(record.probe_rtt)})"
            )
        else:
            line = (
                f"migration {record.number}: {record.from_addr} -> {record.to_addr} "
                f"NOT done: {record.error}"
            )
        if extra:
            line += f" {extra}"
        notes.append(line)
        if not live:
            console.print(line, highlight=False, soft_wrap=True)

    try:
        with tempfile.TemporaryDirectory(prefix="qs-demo-") as tmp:
            certfile, keyfile = self_signed_cert(tmp)
            async with Supervisor(
                enable_experimental_connection_migration=True, **(supervisor_kwargs or {})
            ) as sup:
                sub = sup.events.subscribe(
                    EvtConnectionMigrationCompleted, EvtConnectionMigrationFailed
                )
                counter = asyncio.create_task(_count_events(sub, result), name="demo-events")
                listener = await sup.listen(
                    options.listen,
                    certfile=certfile,
                    keyfile=keyfile,
                    alpn_protocols=["echo"],
                    handler=echo_handler,
                )
                conn = await sup.dial(
                    listener.multiaddr,
                    alpn_protocols=["echo"],
                    server_name="localhost",
                    cafile=str(certfile),
                )
                mc = conn.as_migratable()
                second = await mc.add_path(options.second_path)
                console.print(
                    f"echo server on {_hostport(listener.multiaddr)}; client paths "
                    f"{_hostport(conn.local_multiaddr)} and "
                    f"{_hostport(second.info().local_addr)}; streaming for "
                    f"{options.duration:g}s, migrating every {options.interval:g}s",
                    highlight=False,
                    soft_wrap=True,
                )
                await second.probe()
                result.probe_rtts.extend(r for r in [second.info().rtt] if r is not None)

                echo = VerifiedEcho(await conn.open_stream())
                rotator = Rotator(mc, on_migration=note, tracer=caller_tracer(sup))
                stats = asyncio.create_task(journal_stats(sup), name="demo-stats")
                start = time.monotonic()
                until = start + options.duration
                reader = asyncio.create_task(echo.read(), name="demo-reader")
                writer = asyncio.create_task(echo.write(until=until), name="demo-writer")
                migrator = asyncio.create_task(
                    rotator.run(options.interval, until=until), name="demo-mig"
                )
                display = asyncio.create_task(
                    _display(console, live, sup, conn, echo, result, notes, start, options, reader),
                    name="demo-display",
                )
                try:
                    await asyncio.gather(writer, migrator)
                    async with asyncio.timeout(options.drain_timeout):
                        await reader
                except TimeoutError:
                    result.error = f"the echo did not complete within {options.drain_timeout:g}s"
                except Exception as exc:
                    result.error = f"{type(exc).__name__}: {exc}"
                finally:
                    for task in (writer, migrator, reader, stats):
                        task.cancel()
                    await asyncio.gather(writer, migrator, reader, stats, return_exceptions=True)
                    await display  # ends once the reader is done; prints the last table
                    result.elapsed = time.monotonic() - start
                    await conn.close()
                    sub.close()
                    await counter
    except asyncio.CancelledError:
        result.elapsed = time.monotonic() - start
        _fill(result, echo, rotator)
        console.print(render_summary(result))
        console.print(
            Text(
                f"INTERRUPTED after {result.elapsed:.1f} s: {result.bytes_verified:,} bytes "
                f"verified, {result.migrations} migrations",
                style="bold yellow",
            ),
            highlight=False,
            soft_wrap=True,
        )
        raise

    _fill(result, echo, rotator)
    console.print(render_summary(result))
    console.print(
        Text(
            "OK: every byte verified, migrations confirmed"
            if result.ok
            else f"FAILED: {_failure(result)}",
            style="bold green" if result.ok else "bold red",
        )
    )
    return result


def _fill(result: DemoResult, echo: VerifiedEcho | None, rotator: Rotator | None) -> None:
    """Copy the echo's and the rotation's figures into ``result`` (whatever ran of them)."""
    if rotator is not None:
        for record in rotator.records:
            if record.ok:
                assert record.confirmation is not None
                result.confirmations.append(record.confirmation)
                if record.probe_rtt is not None:
                    result.probe_rtts.append(record.probe_rtt)
        result.failed_attempts = rotator.failed
    if echo is not None:
        result.bytes_sent, result.bytes_echoed = echo.sent, echo.echoed
        result.bytes_verified, result.first_mismatch = echo.verified, echo.first_mismatch
        result.throughput = echo.throughput
        result.sha256 = echo.echo_sha.hexdigest() if echo.ok else ""


def _failure(result: DemoResult) -> str:
    if result.error:
        return result.error
    if result.first_mismatch is not None:
        return f"echoed data differs from what was sent at byte {result.first_mismatch}"
    if not result.all_verified:
        return (
            f"{result.bytes_verified} of {result.bytes_sent} bytes verified "
            f"({result.bytes_echoed} echoed)"
        )
    return "no migration was confirmed"


class PathRates:
    """Bytes per second of each path (sent + received), over about the last ``window`` s."""

    def __init__(self, window: float = 1.0) -> None:
        self.window = window
        self._samples: list[tuple[float, dict[int, int]]] = []

    def update(self, paths: Sequence[PathSnapshot]) -> dict[int, float]:
        now = time.monotonic()
        counts = {p.path_id: p.bytes_sent + p.bytes_received for p in paths}
        self._samples.append((now, counts))
        # keep the newest sample at least `window` old as the base, drop the older ones
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            del self._samples[0]
        base_t, base = self._samples[0]
        dt = now - base_t
        if dt <= 0:
            return {pid: 0.0 for pid in counts}
        return {pid: max(0, n - base.get(pid, 0)) / dt for pid, n in counts.items()}


async def _display(
    console: Console,
    live: bool,
    sup: Supervisor,
    conn: Connection,
    echo: VerifiedEcho,
    result: DemoResult,
    notes: list[str],
    start: float,
    options: DemoOptions,
    reader: asyncio.Task[None],
) -> None:
    """Refresh the live table (terminal) or print a progress line a second (anything else).

    Both show each path's rate and how far the run is towards ``--duration``.
    """
    rates = PathRates()

    def paths() -> list[PathSnapshot]:
        for snap in sup.connections():
            if snap.conn_id == conn.conn_id:
                return list(snap.paths)
        return []

    rates.update(paths())  # the base the first rates are measured from

    def elapsed() -> float:
        return time.monotonic() - start

    def progress(snaps: list[PathSnapshot], per_path: Mapping[int, float] | None) -> str:
        active = next((p for p in snaps if p.active), None)
        where = _hostport(Multiaddr(active.local_addr)) if active else "-"
        t = elapsed()
        shown = min(t, options.duration)
        line = (
            f"t={t:5.1f}s of {options.duration:g}s ({100 * shown / options.duration:.0f}%) "
            f"active={where} sent={_bytes(echo.sent)} echoed={_bytes(echo.echoed)} "
            f"verified={_bytes(echo.verified)} migrations={result.migrations} "
            f"rollbacks={result.rollbacks}"
        )
        if per_path is None:  # the live table has a rate column
            return line
        each = ", ".join(
            f"{_hostport(Multiaddr(p.local_addr))} {_bytes(int(per_path.get(p.path_id, 0)))}/s"
            for p in snaps
        )
        return f"{line} rates: {each or '-'}"

    def frame() -> Group:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        snaps = paths()
        per_path = rates.update(snaps)
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            ProgressBar(
                total=options.duration, completed=min(elapsed(), options.duration), width=40
            ),
            Text(f"{min(elapsed(), options.duration):.1f} / {options.duration:g} s"),
        )
        return Group(
            render_paths(snaps, title="paths", rates=per_path),
            bar,
            Text(progress(snaps, None)),
            *map(Text, notes[-3:]),
        )

    if live:
        from rich.live import Live

        with Live(frame(), console=console, refresh_per_second=options.refresh_per_second) as view:
            while not reader.done():
                await asyncio.wait({reader}, timeout=1 / options.refresh_per_second)
                view.update(frame())
        return
    while not reader.done():
        await asyncio.wait({reader}, timeout=1.0)
        snaps = paths()
        console.print(progress(snaps, rates.update(snaps)), highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------- rendering


def render_paths(
    paths: Sequence[PathSnapshot],
    *,
    title: str | None = None,
    rates: Mapping[int, float] | None = None,
) -> Table:
    """The path table: one row per path of the connection (bytes: UDP payload per socket).

    With ``rates`` (path id -> bytes/s, sent + received) a ``rate`` column shows them.
    """
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1))
    # Only the address column may wrap (at " -> "): on an 80-column terminal it takes two lines.
    table.add_column("path", justify="right", no_wrap=True)
    table.add_column("local -> remote")
    table.add_column("state", no_wrap=True)
    table.add_column("RTT", justify="right", no_wrap=True)
    table.add_column("active", justify="center", no_wrap=True)
    table.add_column("sent", justify="right", no_wrap=True)
    table.add_column("recv", justify="right", no_wrap=True)
    if rates is not None:
        table.add_column("rate", justify="right", no_wrap=True)
    for p in paths:
        cells = [
            str(p.path_id),
            f"{_hostport(Multiaddr(p.local_addr))} -> {_hostport(Multiaddr(p.remote_addr))}",
            p.state.value,
            _ms(p.rtt),
            "*" if p.active else "",
            _bytes(p.bytes_sent),
            _bytes(p.bytes_received),
        ]
        if rates is not None:
            cells.append(f"{_bytes(int(rates.get(p.path_id, 0)))}/s")
        table.add_row(*cells, style="bold" if p.active else None)
    return table


def render_summary(result: DemoResult) -> Table:
    """The end-of-run summary."""
    from rich.table import Table

    table = Table(title="summary", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    verified = "verified" if result.all_verified else "NOT verified"
    rows = [
        ("bytes sent", f"{result.bytes_sent:,}"),
        ("bytes echoed", f"{result.bytes_echoed:,}"),
        ("bytes verified", f"{result.bytes_verified:,} ({verified})"),
        ("migrations", str(result.migrations)),
        ("rollbacks", str(result.rollbacks)),
        ("failed attempts", str(result.failed_attempts)),
        ("probe RTT min/median/max", _spread(result.probe_rtts)),
        ("switch -> confirmation min/median/max", _spread(result.confirmations)),
        ("throughput (echoed, verified)", f"{result.throughput / 1e6:.2f} MB/s"),
        ("elapsed", f"{result.elapsed:.1f} s"),
    ]
    if result.sha256:
        rows.append(("sha256 (both ways)", result.sha256[:16] + "..."))
    for row in rows:
        table.add_row(*row)
    return table


def _spread(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return " / ".join(_ms(v) for v in (min(values), statistics.median(values), max(values)))


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f} ms"


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _hostport(addr: Multiaddr | str) -> str:
    """``/ip4/127.0.0.1/udp/4433/quic-v1`` -> ``127.0.0.1:4433`` (``[::1]:4433`` for IPv6)."""
    parts = str(addr).split("/")
    with contextlib.suppress(IndexError):
        host, port = parts[2], parts[4]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(addr)
