"""Drain, the local control socket and ``quic-supervisor ctl``, on loopback with a stock aioquic
echo server.

127.0.0.1 and 127.0.0.2 are both on ``lo``: a drain by *address* moves connections between
them; a drain by *device* ``lo`` finds no path off ``lo``, so every connection on it is reported
``failed`` (it was on the drained device and is still there) and stays usable. Waits are on
events and conditions, never sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from actors.envelope import decode, encode
from actors.errors import ConnectionClosedError, InvalidAddressError, PathNotValidatedError
from actors.path_state import PathState
from supervisor import Supervisor
from supervisor.cli import main
from supervisor.core.events import (
    EvtConnectionMigrationCompleted,
    EvtConnectionMigrationFailed,
    EvtConnectionMigrationStarted,
    EvtPathRemoved,
)
from supervisor.core.handles import Connection
from supervisor.core.messages import DialRequest, SnapshotRequest, SwitchRequest
from supervisor.orchestration.drain import DrainReport, drain
from supervisor.remote.control import (
    MAX_FRAME,
    ControlClient,
    ControlServer,
    ControlSocketError,
    frame,
)
from supervisor.remote.protocol import ErrorReply
from telemetry.journal import read_journal
from tests.rig.aioquic_server import RigServer
from tests.support import ChecksummedStream, addr_of, dial_echo, echo_roundtrip, event_log

SECOND = "/ip4/127.0.0.2/udp/0/quic-v1"
THIRD = "/ip4/127.0.0.3/udp/0/quic-v1"
NOT_HERE = "/ip4/203.0.113.77/udp/0/quic-v1"  # TEST-NET-3: never an address of this host
SCRIPT = Path(sys.executable).with_name("quic-supervisor")

MIGRATION_EVENTS = (
    EvtConnectionMigrationStarted,
    EvtConnectionMigrationCompleted,
    EvtConnectionMigrationFailed,
)


def _ip(local_addr: object) -> str:
    return addr_of(local_addr)[0]


async def _with_second_path(conn: Connection, *, probe: bool) -> None:
    path = await conn.as_migratable().add_path(SECOND)
    if probe:
        await path.probe(timeout=5.0)


def _active_ip(sup: Supervisor, conn: Connection) -> str:
    snap = sup.live_snapshot(conn.conn_id)
    assert snap is not None
    return _ip(next(p.local_addr for p in snap.paths if p.active))


async def _ctl(*argv: str) -> int:
    """``quic-supervisor ctl ...`` in-process; in a thread, since ``main`` runs its own loop."""
    return await asyncio.to_thread(main, ["ctl", *argv])


# ------------------------------------------------------------------------------ drain


async def test_drain_moves_every_connection_off_the_address(
    sup: Supervisor, echo: RigServer
) -> None:
    conns = [await dial_echo(sup, echo) for _ in range(5)]
    for i, conn in enumerate(conns):
        # Three standby paths, two never probed: the drain probes those itself.
        await _with_second_path(conn, probe=i < 3)
    stream = await ChecksummedStream(conns[0]).start()
    await stream.advance()
    async with event_log(sup, *MIGRATION_EVENTS, EvtPathRemoved) as log:
        report = await sup.drain(local_addr="/ip4/127.0.0.1")
        ids = {c.conn_id for c in conns}
        await log.wait_for(
            lambda: (
                {e.conn_id for e in log.of(EvtConnectionMigrationCompleted)} == ids
                and {e.conn_id for e in log.of(EvtPathRemoved)} == ids
            )
        )
        assert report.counts == {"moved": 5, "failed": 0, "untouched": 0}, report
        assert report.ok and report.local_addr == "/ip4/127.0.0.1"
        for outcome in report.outcomes:
            assert _ip(outcome.from_addr) == "127.0.0.1" and _ip(outcome.to_addr) == "127.0.0.2"
            assert outcome.closed_drained and outcome.error is None
        for conn in conns:
            assert _active_ip(sup, conn) == "127.0.0.2"
            snap = sup.live_snapshot(conn.conn_id)
            assert snap is not None and [_ip(p.local_addr) for p in snap.paths] == ["127.0.0.2"]
        started = log.of(EvtConnectionMigrationStarted)
        completed = log.of(EvtConnectionMigrationCompleted)
        assert sorted(e.conn_id for e in started) == sorted(ids)
        assert {e.reason for e in started + completed} == {"drain"}  # type: ignore[attr-defined]
        assert not log.of(EvtConnectionMigrationFailed)
        assert {_ip(e.local_addr) for e in log.of(EvtPathRemoved)} == {"127.0.0.1"}  # type: ignore[attr-defined]
    await stream.advance()  # data flows on the new path
    assert await stream.finish() > 0  # every byte back, in order (sha256)
    assert any(host == "127.0.0.2" for host, _ in echo.peer_addresses())
    for conn in conns[1:]:
        await echo_roundtrip(conn)


async def test_connection_without_another_path_fails_clearly_and_stays_usable(
    sup: Supervisor, echo: RigServer
) -> None:
    lone = await dial_echo(sup, echo)
    other = await dial_echo(sup, echo)
    await _with_second_path(other, probe=True)
    async with event_log(sup, *MIGRATION_EVENTS) as log:
        report = await drain(sup, local_addr="127.0.0.1", close_drained=False)
        await log.wait_for(lambda: log.of(EvtConnectionMigrationCompleted))
        assert not log.of(conn_id=lone.conn_id)  # nothing was attempted on it
    by_conn = {o.conn_id: o for o in report.outcomes}
    failed = by_conn[lone.conn_id]
    assert failed.result == "failed" and failed.to_addr is None
    assert failed.error is not None and "no path off 127.0.0.1" in failed.error
    assert by_conn[other.conn_id].result == "moved"
    assert not by_conn[other.conn_id].closed_drained  # close_drained=False keeps it (standby)
    assert not report.ok and report.counts == {"moved": 1, "failed": 1, "untouched": 0}
    snap = sup.live_snapshot(other.conn_id)
    assert snap is not None and {p.state for p in snap.paths} == {
        PathState.ACTIVE,
        PathState.STANDBY,
    }
    await echo_roundtrip(lone)
    await echo_roundtrip(other)


async def test_drain_with_a_port_moves_only_that_path(sup: Supervisor, echo: RigServer) -> None:
    a = await dial_echo(sup, echo)
    b = await dial_echo(sup, echo)
    for conn in (a, b):
        await _with_second_path(conn, probe=True)
    report = await sup.drain(local_addr=a.local_multiaddr)  # /ip4/127.0.0.1/udp/PORT/quic-v1
    by_conn = {o.conn_id: o.result for o in report.outcomes}
    assert by_conn == {a.conn_id: "moved", b.conn_id: "untouched"}
    assert _active_ip(sup, a) == "127.0.0.2" and _active_ip(sup, b) == "127.0.0.1"


async def test_drain_by_device_lo_reports_failed_and_moves_nothing(
    sup: Supervisor, echo: RigServer
) -> None:
    """Every path here is on ``lo`` (all of 127.0.0.0/8 is), so no connection can leave it."""
    conns = [await dial_echo(sup, echo) for _ in range(2)]
    await _with_second_path(conns[0], probe=True)
    async with event_log(sup, *MIGRATION_EVENTS) as log:
        report = await sup.drain(device="lo")
        await echo_roundtrip(conns[0])  # a barrier: any event would have been seen by now
        assert not log.events
    assert report.device == "lo"
    assert [o.result for o in report.outcomes] == ["failed", "failed"]
    assert all("no path off device lo" in (o.error or "") for o in report.outcomes)
    for conn in conns:
        assert _active_ip(sup, conn) == "127.0.0.1"
        await echo_roundtrip(conn)


async def test_device_bound_path_reports_its_device(sup: Supervisor, echo: RigServer) -> None:
    conn = await dial_echo(sup, echo)
    try:
        await conn.as_migratable().add_path(device="lo")
    except PermissionError:
        pytest.skip("SO_BINDTODEVICE needs CAP_NET_RAW")
    snap = sup.live_snapshot(conn.conn_id)
    assert snap is not None
    assert [p.device for p in snap.paths] == [None, "lo"]


@pytest.mark.parametrize(
    ("kwargs", "error", "named"),
    [
        ({}, ValueError, "exactly one"),
        ({"local_addr": "127.0.0.1", "device": "lo"}, ValueError, "exactly one"),
        ({"local_addr": "/ip4/127.0.0.1/tcp/80"}, InvalidAddressError, "/ip4/127.0.0.1/tcp/80"),
        ({"local_addr": "not-an-address"}, InvalidAddressError, "not-an-address"),
        ({"device": "nosuchdev0"}, InvalidAddressError, "nosuchdev0"),
        ({"device": "lo", "probe_timeout": 0}, ValueError, "probe_timeout"),
    ],
)
async def test_drain_argument_errors_name_the_input(
    sup: Supervisor,
    echo: RigServer,
    kwargs: dict[str, object],
    error: type[Exception],
    named: str,
) -> None:
    conn = await dial_echo(sup, echo)
    with pytest.raises(error, match=re.escape(named)):
        await sup.drain(**kwargs)  # type: ignore[arg-type]
    assert _active_ip(sup, conn) == "127.0.0.1"


# ------------------------------------------------------------------------------ control socket


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "ctl.sock"


async def test_socket_is_0600_replaces_stale_refuses_others(
    sup: Supervisor, sock_path: Path
) -> None:
    # A stale socket (bound, never unlinked) is replaced.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()
    async with ControlServer(sup, sock_path):
        st = os.stat(sock_path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        with pytest.raises(FileExistsError, match="in use"):
            await ControlServer(sup, sock_path).start()
        assert await ControlClient(sock_path).snapshot() == ()  # the first one still serves
    assert not sock_path.exists()
    sock_path.write_text("not a socket")
    with pytest.raises(FileExistsError, match="not a socket"):
        await ControlServer(sup, sock_path).start()
    assert sock_path.read_text() == "not a socket"


async def test_ctl_paths_json_lists_connections(
    sup: Supervisor, echo: RigServer, sock_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conns = [await dial_echo(sup, echo) for _ in range(2)]
    await _with_second_path(conns[0], probe=True)
    async with ControlServer(sup, sock_path):
        assert await _ctl("--socket", str(sock_path), "paths", "--json") == 0
        listed = json.loads(capsys.readouterr().out)
        assert await _ctl("paths", "--socket", str(sock_path)) == 0  # the table, flag after
        table = capsys.readouterr().out
    assert {c["conn_id"] for c in listed} == {c.conn_id for c in conns}
    first = next(c for c in listed if c["conn_id"] == conns[0].conn_id)
    assert [(_ip(p["local_addr"]), p["state"], p["active"]) for p in first["paths"]] == [
        ("127.0.0.1", "active", True),
        ("127.0.0.2", "standby", False),
    ]
    assert conns[0].conn_id in table and "127.0.0.2" in table and "standby" in table


async def test_ctl_drain_via_the_socket(
    sup: Supervisor, echo: RigServer, sock_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conns = [await dial_echo(sup, echo) for _ in range(3)]
    for conn in conns:
        await _with_second_path(conn, probe=False)
    stream = await ChecksummedStream(conns[1]).start()
    await stream.advance()
    async with ControlServer(sup, sock_path):
        argv = ["--socket", str(sock_path), "drain", "--local-addr", "/ip4/127.0.0.1", "--json"]
        assert await _ctl(*argv) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["counts"] == {"moved": 3, "failed": 0, "untouched": 0}
        # Nothing left to move to: every connection fails, exit 1, and says so per line.
        assert await _ctl("--socket", str(sock_path), "drain", "--local-addr", "127.0.0.2") == 1
        out = capsys.readouterr().out
    assert out.count("FAILED") == 3 and "moved 0, failed 3, untouched 0" in out
    for conn in conns:
        assert _active_ip(sup, conn) == "127.0.0.2"
    await stream.advance()
    await stream.finish()


async def test_ctl_migrate_adds_probes_and_switches(
    sup: Supervisor, echo: RigServer, sock_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conn = await dial_echo(sup, echo)
    stream = await ChecksummedStream(conn).start()
    await stream.advance()
    async with (
        ControlServer(sup, sock_path),
        event_log(sup, EvtConnectionMigrationCompleted) as log,
    ):
        assert await _ctl("--socket", str(sock_path), "migrate", conn.conn_id, "--to", THIRD) == 0
        assert "active path /ip4/127.0.0.3/udp/" in capsys.readouterr().out
        assert _active_ip(sup, conn) == "127.0.0.3"
        # Back to the handshake path by its full address, through the client API.
        async with ControlClient(sock_path) as client:
            snap = await client.migrate(conn.conn_id, conn.local_multiaddr)
        assert [_ip(p.local_addr) for p in snap.paths if p.active] == ["127.0.0.1"]
        await log.wait_for(lambda: len(log.events) == 2)
        assert {e.reason for e in log.events} == {"manual"}  # type: ignore[attr-defined]
    await stream.advance()
    await stream.finish()


async def test_operators_migrations_and_drains_are_recorded_as_theirs(
    echo: RigServer, tmp_path: Path
) -> None:
    """DESIGN §3: a migration asked through the control socket, or a drain, carries
    ``initiator="operator"`` on the quic.migration span, in the journal (the request and the
    events) and on the events; the application's own ``switch()`` stays ``application``."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    journal = tmp_path / "sup.journal"
    sock = tmp_path / "ctl.sock"
    async with (
        Supervisor(
            enable_experimental_connection_migration=True,
            tracer_provider=provider,
            journal=journal,
        ) as sup,
        ControlServer(sup, sock),
        ControlClient(sock, timeout=30) as ctl,
    ):
        app = await dial_echo(sup, echo)
        path = await app.as_migratable().add_path(THIRD)
        await path.probe(timeout=5.0)
        await path.switch()  # the application's own
        operator = await dial_echo(sup, echo)
        await ctl.migrate(operator.conn_id, THIRD)  # `quic-supervisor ctl migrate`
        drained = await dial_echo(sup, echo)
        await _with_second_path(drained, probe=True)
        report = await ctl.drain(local_addr="/ip4/127.0.0.1")  # `ctl drain`
        assert [o.conn_id for o in report.moved] == [drained.conn_id]
        sub = sup.events.subscribe(
            EvtConnectionMigrationStarted, EvtConnectionMigrationCompleted, since=0
        )
        events = [sub._queue.popleft() for _ in range(sub.pending)]
    want = {app.conn_id: "application", operator.conn_id: "operator", drained.conn_id: "operator"}

    by_event: dict[tuple[str, str], str] = {}
    for evt in events:
        assert isinstance(evt, EvtConnectionMigrationStarted | EvtConnectionMigrationCompleted)
        by_event[(type(evt).__name__, evt.conn_id)] = evt.initiator
    assert by_event == {
        (kind, conn_id): who
        for conn_id, who in want.items()
        for kind in ("EvtConnectionMigrationStarted", "EvtConnectionMigrationCompleted")
    }
    spans = [s for s in exporter.get_finished_spans() if s.name == "quic.migration"]
    assert spans and s_attrs(spans) == want

    records = list(read_journal(journal))
    requests = {
        r["conn"]: r["body"]["initiator"]
        for r in records
        if r["kind"] == "msg" and r["type"] == "SwitchRequest"
    }
    assert requests == want  # the request as recorded says who asked, not None
    done = {
        r["conn"]: r["body"]["initiator"]
        for r in records
        if r["kind"] == "event" and r["type"] == "ConnectionMigrationCompleted"
    }
    assert done == want


def s_attrs(spans: list[Any]) -> dict[str, str]:
    """conn id -> quic.migration.initiator of each migration span (one per connection)."""
    out: dict[str, str] = {}
    for span in spans:
        attrs = span.attributes or {}
        conn_id = str(attrs["quic.connection.id"])
        assert conn_id not in out, "one migration per connection in this test"
        out[conn_id] = str(attrs["quic.migration.initiator"])
    return out


async def test_typed_errors_cross_the_socket(
    sup: Supervisor, echo: RigServer, sock_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conn = await dial_echo(sup, echo)
    new = await conn.as_migratable().add_path(SECOND)
    async with ControlServer(sup, sock_path), ControlClient(sock_path) as client:
        with pytest.raises(InvalidAddressError) as bad_addr:
            await client.migrate(conn.conn_id, NOT_HERE)
        assert bad_addr.value.addr == "203.0.113.77" and "not an address of this host" in str(
            bad_addr.value
        )
        with pytest.raises(ConnectionClosedError) as closed:
            await client.migrate("0123456789ab", SECOND)
        assert closed.value.conn_id == "0123456789ab"
        path_id = next(
            p.path_id
            for p in (await client.connection(conn.conn_id)).paths
            if _ip(p.local_addr) == "127.0.0.2"
        )
        with pytest.raises(PathNotValidatedError) as not_validated:
            await client.request(SwitchRequest(conn.conn_id, path_id))
        assert not_validated.value.state == "new"
        with pytest.raises(InvalidAddressError, match="nosuchdev0"):
            await client.drain(device="nosuchdev0")
        # The CLI: one line, exit 2, the typed error's own text.
        assert (
            await _ctl("--socket", str(sock_path), "migrate", conn.conn_id, "--to", NOT_HERE) == 2
        )
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "203.0.113.77" in err and "Traceback" not in err
    # The failed migrate left nothing behind and the connection is untouched.
    assert new.info().state is PathState.NEW
    snap = sup.live_snapshot(conn.conn_id)
    assert snap is not None and len(snap.paths) == 2
    await echo_roundtrip(conn)


async def _raw_exchange(path: Path, data: bytes) -> tuple[ErrorReply | object, bytes]:
    """Send raw bytes; return the decoded reply and whatever follows it before EOF."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(data)
        await writer.drain()
        size = int.from_bytes(await reader.readexactly(4), "big")
        body = decode(await reader.readexactly(size)).body
        return body, await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_garbage_and_oversized_frames_get_an_error_and_the_server_keeps_serving(
    sup: Supervisor, echo: RigServer, sock_path: Path
) -> None:
    conn = await dial_echo(sup, echo)
    async with ControlServer(sup, sock_path):
        cases = [
            (frame(b"\xc1garbage"), "EnvelopeError", "malformed"),
            ((MAX_FRAME + 1).to_bytes(4, "big") + b"x" * 16, "FrameError", "exceeds"),
            (b"GET / HTTP/1.1\r\n\r\n", "FrameError", "exceeds"),
        ]
        for data, kind, text in cases:
            reply, rest = await _raw_exchange(sock_path, data)
            assert isinstance(reply, ErrorReply) and reply.type == kind, reply
            assert text in reply.message
            assert rest == b""  # and the server hung up
        # A well-formed message that is not a control request: an error, the connection stays.
        reader, writer = await asyncio.open_unix_connection(str(sock_path))
        writer.write(frame(encode(DialRequest("/ip4/127.0.0.1/udp/1/quic-v1"))))
        writer.write(frame(encode(SnapshotRequest(conn.conn_id))))
        await writer.drain()
        replies = []
        for _ in range(2):
            size = int.from_bytes(await reader.readexactly(4), "big")
            replies.append(decode(await reader.readexactly(size)).body)
        writer.close()
        assert isinstance(replies[0], ErrorReply) and replies[0].type == "TypeError"
        assert "not a control-socket request" in replies[0].message
        assert getattr(replies[1], "conn_id", None) == conn.conn_id
        snaps = await ControlClient(sock_path).snapshot()
        assert [s.conn_id for s in snaps] == [conn.conn_id]


async def test_no_server_or_no_socket_is_a_clear_error(
    sock_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ControlSocketError, match="no supervisor is serving"):
        await ControlClient(sock_path).snapshot()
    assert await _ctl("--socket", str(sock_path), "paths") == 2
    assert "no supervisor is serving" in capsys.readouterr().err
    monkeypatch.delenv("QUIC_SUPERVISOR_SOCKET", raising=False)
    assert await _ctl("paths") == 2
    assert "no control socket given: pass --socket PATH" in capsys.readouterr().err


async def test_drain_report_round_trips_the_envelope(sup: Supervisor, echo: RigServer) -> None:
    await dial_echo(sup, echo)
    report = await sup.drain(device="lo")
    again = decode(encode(report)).body
    assert isinstance(again, DrainReport) and again == report


# ------------------------------------------------------------------------------ subprocesses


def _readline(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


def _stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@pytest.fixture
def console_script() -> Path:
    if not SCRIPT.exists():
        pytest.skip(f"{SCRIPT} missing: run .venv/bin/pip install -e '.[dev,cli]'")
    return SCRIPT


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        _stop(proc)


def test_serve_and_dial_expose_a_control_socket_for_ctl(
    console_script: Path, tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    def start(*argv: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [str(console_script), *argv],
            stdout=subprocess.PIPE,
            stderr=(tmp_path / f"{argv[0]}.err").open("w"),
            text=True,
        )
        processes.append(proc)
        return proc

    def ctl(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(console_script), "ctl", *argv], capture_output=True, text=True, timeout=60
        )

    serve_sock, dial_sock = tmp_path / "serve.sock", tmp_path / "dial.sock"
    serve = start(
        "serve", "--listen", "/ip4/127.0.0.1/udp/0/quic-v1", "--control-socket", str(serve_sock)
    )
    match = re.match(r"listening on (\S+)", _readline(serve))
    assert match, (tmp_path / "serve.err").read_text()
    listed = ctl("--socket", str(serve_sock), "paths", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr  # inbound only

    dial = start(
        "dial",
        match.group(1),
        "--insecure",
        "--path",
        SECOND,
        "--bytes",
        "100G",
        "--control-socket",
        str(dial_sock),
    )
    assert _readline(dial).startswith("connected"), (tmp_path / "dial.err").read_text()
    assert "validated" in _readline(dial), (tmp_path / "dial.err").read_text()
    assert stat.S_IMODE(os.stat(dial_sock).st_mode) == 0o600
    listed = ctl("--socket", str(dial_sock), "paths", "--json")
    assert listed.returncode == 0, listed.stderr
    (conn,) = json.loads(listed.stdout)
    assert [_ip(p["local_addr"]) for p in conn["paths"]] == ["127.0.0.1", "127.0.0.2"]
    moved = ctl("--socket", str(dial_sock), "migrate", conn["conn_id"], "--to", SECOND)
    assert moved.returncode == 0 and "active path /ip4/127.0.0.2/" in moved.stdout, moved.stderr
    drained = ctl("--socket", str(dial_sock), "drain", "--local-addr", "127.0.0.2")
    assert drained.returncode == 0 and "moved 1, failed 0" in drained.stdout, drained.stderr
    stats = ctl("--socket", str(dial_sock), "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    figures = json.loads(stats.stdout)
    assert figures["completed"] == 2 and figures["failed"] == {}
    assert figures["success_rate"] == 1.0
    # Herd control and the false-failover indicator, for operators: nothing queued now.
    assert figures["in_flight"] == figures["queued"] == figures["suspect_failovers"] == 0
    line = ctl("--socket", str(dial_sock), "stats")
    assert "2 migrations, 2 completed (100.0%)" in line.stdout, line.stderr
    assert dial.poll() is None  # still streaming, verified, through all of it
    assert _stop(dial, signal.SIGINT) == 130
    assert not dial_sock.exists()  # removed on the way out
    assert _stop(serve) == 0 and not serve_sock.exists()
    assert "Traceback" not in (tmp_path / "dial.err").read_text()
