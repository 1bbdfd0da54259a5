"""An orderly stop (issue 19 item 6): ``Supervisor.shutdown`` and SIGTERM to ``serve``/``dial``.

What an operator (and Kubernetes, which sends SIGTERM and waits its grace period) relies on:
new clients are refused at once, open streams may finish within the deadline, every connection
ends with CONNECTION_CLOSE NO_ERROR "shutting down" (never an idle timeout at the peer),
streams still open at the deadline are cut and counted, and the process exits 0. Everything
is real: sockets on loopback, subprocesses of the installed console script, real signals.
Durations are printed; only the deadlines the feature promises (plus a generous margin) are
asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from actors.errors import (
    ConnectionClosedError,
    HandshakeError,
    InvalidArgumentError,
    SupervisorClosedError,
)
from supervisor import ShutdownReport, Supervisor
from supervisor.cli import main
from supervisor.cli.demo import echo_handler
from supervisor.core.handles import Connection
from supervisor.libp2p.keys import Identity
from supervisor.server import Listener
from tests.rig.certs import CertPair
from tests.rig.waiting import poll_until
from tests.support import ChecksummedStream, addr_of, dial_echo, fd_count, other_tasks

SCRIPT = Path(sys.executable).with_name("quic-supervisor")
needs_script = pytest.mark.skipif(
    not SCRIPT.exists(), reason=f"{SCRIPT} missing: run .venv/bin/pip install -e '.[dev,cli]'"
)
LISTEN = "/ip4/127.0.0.1/udp/0/quic-v1"
#: What the peer of a connection an orderly stop closed reads (aioquic: phrase and code).
SHUT_DOWN = "shutting down (error code 0)"
#: What a client refused by a stopping listener reads: CONNECTION_REFUSED (0x2).
REFUSED = "server shutting down (error code 2)"
#: Far beyond any deadline used here: a process that has not exited by then hangs.
MARGIN = 30.0


# ------------------------------------------------------------------------------ helpers


async def _listen(sup: Supervisor, cert: CertPair) -> Listener:
    return await sup.listen(
        LISTEN,
        certfile=cert.certfile,
        keyfile=cert.keyfile,
        alpn_protocols=["echo"],
        handler=echo_handler,
    )


async def _closed_reason(conn: Connection, timeout: float = 10.0) -> str:
    """How the connection ended, as its peer (this side) saw it; waits for the end."""
    with pytest.raises(ConnectionClosedError) as info:
        async with asyncio.timeout(timeout):
            await conn.accept_stream()  # returns only when the connection ends
    return str(info.value.reason)


async def _refused(client: Supervisor, listener: Any) -> str:
    """A new dial to a stopping listener: its one-line error (refused, not a timeout)."""
    started = time.monotonic()
    with pytest.raises(HandshakeError) as info:
        await dial_echo(client, addr_of(listener), timeout=5)
    print(f"new dial refused in {time.monotonic() - started:.2f} s")
    return str(info.value)


# ------------------------------------------------------------------------------ library


async def test_shutdown_waits_for_open_streams_and_closes_each_connection_when_quiet(
    cert: CertPair,
) -> None:
    """An idle connection is closed at once; one with a stream mid-transfer runs until the
    stream ends, every byte echoed; a new client is refused meanwhile."""
    async with Supervisor() as server, Supervisor() as client:
        listener = await _listen(server, cert)
        busy = await dial_echo(client, addr_of(listener.multiaddr))
        idle = await dial_echo(client, addr_of(listener.multiaddr))
        stream = await ChecksummedStream(busy).start()
        await stream.advance()
        stopping = asyncio.create_task(server.shutdown(deadline=30))

        assert REFUSED in await _refused(client, listener.multiaddr)
        assert await _closed_reason(idle) == SHUT_DOWN
        assert not stopping.done()  # the busy stream holds it
        await stream.advance()  # data still flows both ways during the stop
        sent = await stream.finish()  # FIN: the echo ends, every byte back
        report = await asyncio.wait_for(stopping, MARGIN)
        print(f"\n{sent:,} bytes echoed during the stop; {report}")
        assert await _closed_reason(busy) == SHUT_DOWN
        assert (report.connections, report.streams_cut, report.deadline_hit) == (2, 0, False)
        assert listener.connections == {}
        assert server.inbound_connections() == []


async def test_shutdown_cuts_a_stream_that_never_ends_at_the_deadline(cert: CertPair) -> None:
    async with Supervisor() as server, Supervisor() as client:
        listener = await _listen(server, cert)
        conn = await dial_echo(client, addr_of(listener.multiaddr))
        stream = await conn.open_stream()
        await stream.write(b"never finished")  # no FIN: the server's handler waits for ever
        assert await stream.read(100) == b"never finished"

        report = await server.shutdown(deadline=0.5)
        print(f"\n{report}")
        assert (report.connections, report.streams_cut, report.deadline_hit) == (1, 1, True)
        assert 0.5 <= report.elapsed < 0.5 + MARGIN
        assert await _closed_reason(conn) == SHUT_DOWN


async def test_shutdown_of_dialled_connections(cert: CertPair) -> None:
    """The dialling side stops in order too: a connection whose streams are done closes at
    once, one with an open stream is cut at the deadline, and the server reads NO_ERROR."""
    async with Supervisor() as server, Supervisor() as client:
        listener = await _listen(server, cert)
        done = await dial_echo(client, addr_of(listener.multiaddr))
        stream = await ChecksummedStream(done).start()
        await stream.advance()
        await stream.finish()
        held = await dial_echo(client, addr_of(listener.multiaddr))
        hanging = await held.open_stream()
        await hanging.write(b"x")
        assert await hanging.read(1) == b"x"
        accepted = {c.conn_id: c for c in server.inbound_connections()}
        assert len(accepted) == 2

        report = await client.shutdown(deadline=0.3)
        print(f"\n{report}")
        assert (report.connections, report.streams_cut, report.deadline_hit) == (2, 1, True)
        assert client.connections() == []
        with pytest.raises(SupervisorClosedError):
            await dial_echo(client, addr_of(listener.multiaddr))
        # The server saw both go (CONNECTION_CLOSE, not its idle timeout).
        await poll_until(lambda: not listener.connections, timeout=10, what="server side")


@pytest.mark.parametrize(
    ("deadline", "error"),
    [
        (-1, InvalidArgumentError),
        (math.nan, InvalidArgumentError),
        (math.inf, InvalidArgumentError),
        (1e9, InvalidArgumentError),
        ("10", TypeError),
        (None, TypeError),
        (True, TypeError),
    ],
)
async def test_bad_deadline_is_a_typed_error_and_stops_nothing(
    cert: CertPair, deadline: object, error: type[Exception]
) -> None:
    async with Supervisor() as server:
        listener = await _listen(server, cert)
        with pytest.raises(error, match="deadline"):
            await server.shutdown(deadline=deadline)  # type: ignore[arg-type]
        assert not listener.refusing  # still serving
        async with Supervisor() as client:
            conn = await dial_echo(client, addr_of(listener.multiaddr))
            await conn.close()


async def test_shutdown_twice_and_close_after_are_safe(cert: CertPair) -> None:
    async with Supervisor() as server:
        listener = await _listen(server, cert)
        async with Supervisor() as client:
            conn = await dial_echo(client, addr_of(listener.multiaddr))
            first, again = await asyncio.gather(server.shutdown(1), server.shutdown(5))
            assert first == again and first.connections == 1
            assert await server.shutdown() == first  # later: the same report
            await server.close()  # a no-op
            assert await _closed_reason(conn) == SHUT_DOWN  # not "supervisor closing"
        with pytest.raises(SupervisorClosedError):
            await _listen(server, cert)
    async with Supervisor() as closed:
        await closed.close()
        assert await closed.shutdown() == ShutdownReport(0, 0, 0.0, False)


async def test_shutdown_before_start_and_idle_is_immediate() -> None:
    sup = Supervisor()
    report = await sup.shutdown()
    assert (report.connections, report.streams_cut, report.deadline_hit) == (0, 0, False)
    with pytest.raises(SupervisorClosedError):
        await sup.start()


async def test_cancelled_shutdown_closes_everything_at_once(cert: CertPair) -> None:
    """The caller gave up waiting (a second SIGTERM): shutdown() closes at once."""
    async with Supervisor() as server, Supervisor() as client:
        listener = await _listen(server, cert)
        conn = await dial_echo(client, addr_of(listener.multiaddr))
        stream = await conn.open_stream()
        await stream.write(b"x")
        assert await stream.read(1) == b"x"
        stopping = asyncio.create_task(server.shutdown(deadline=60))
        await poll_until(lambda: listener.refusing, timeout=5)
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        assert "supervisor closing" in await _closed_reason(conn)
        assert listener.connections == {} and server.inbound_connections() == []


async def test_shutdown_leaks_nothing(cert: CertPair) -> None:
    """No socket, task or file left by a stop that cut a stream and closed connections."""
    async with Supervisor() as client:
        fds, tasks = fd_count(), other_tasks()
        server = Supervisor()
        await server.start()
        listener = await _listen(server, cert)
        conns = [await dial_echo(client, addr_of(listener.multiaddr)) for _ in range(3)]
        stream = await conns[0].open_stream()
        await stream.write(b"x")
        assert await stream.read(1) == b"x"
        report = await server.shutdown(deadline=0.2)
        assert (report.connections, report.streams_cut) == (3, 1)
        for conn in conns:
            assert await _closed_reason(conn) == SHUT_DOWN
        # The client's side ends when its own close timer fires (aioquic's draining period).
        await poll_until(lambda: not client.connections(), timeout=10, what="client side")
        await poll_until(lambda: fd_count() == fds, timeout=10, what=f"fds back to {fds}")
        await poll_until(lambda: not other_tasks() - tasks, timeout=10, what="tasks ended")


# ------------------------------------------------------------------------------ serve


@contextlib.asynccontextmanager
async def _serve(tmp_path: Path, *argv: str) -> AsyncIterator[tuple[Any, str]]:
    """``quic-supervisor serve`` on a free port; yields (process, listening multiaddr). Left
    running at the end of the block it is killed (the test then has failed already)."""
    if not SCRIPT.exists():
        pytest.skip(f"{SCRIPT} missing: run .venv/bin/pip install -e '.[dev,cli]'")
    err = tmp_path / "serve.err"
    with err.open("w") as stderr:
        proc = await asyncio.create_subprocess_exec(
            str(SCRIPT),
            "serve",
            "--listen",
            LISTEN,
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    try:
        line = await _line(proc, 60)
        match = re.match(r"listening on (\S+)", line)
        assert match, f"serve did not start: {line!r} {err.read_text()}"
        yield proc, match.group(1)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        assert "Traceback" not in err.read_text(), err.read_text()


async def _line(proc: Any, timeout: float = 30.0) -> str:
    async with asyncio.timeout(timeout):
        return str((await proc.stdout.readline()).decode().rstrip("\n"))


async def _until(proc: Any, pattern: str, timeout: float = 30.0) -> str:
    """The next stdout line matching ``pattern`` (earlier lines are skipped)."""
    async with asyncio.timeout(timeout):
        while line := await _line(proc, timeout):
            if re.search(pattern, line):
                return line
    raise AssertionError(f"stdout ended before {pattern!r}")


async def _term_and_wait(proc: Any, limit: float) -> tuple[int, float]:
    """SIGTERM, then (exit status, seconds it took), killed after ``limit``."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(limit):
        status = await proc.wait()
    return status, time.monotonic() - started


@needs_script
@pytest.mark.slow  # a real subprocess per test, signalled
async def test_serve_sigterm_lets_the_open_stream_finish_and_refuses_new_clients(
    tmp_path: Path,
) -> None:
    stop_timeout = 20.0
    async with (
        _serve(tmp_path, "--stop-timeout", f"{stop_timeout:g}") as (proc, addr),
        Supervisor() as client,
    ):
        conn = await dial_echo(client, addr_of(addr))
        stream = await ChecksummedStream(conn).start()
        await stream.advance()
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await _line(proc) == f"stopping: 1 connection(s), deadline {stop_timeout:g} s"
        assert REFUSED in await _refused(client, addr)
        await stream.advance()  # the open stream still flows
        sent = await stream.finish()  # every byte echoed
        assert await _closed_reason(conn) == SHUT_DOWN
        stopped = await _line(proc)
        async with asyncio.timeout(stop_timeout + MARGIN):
            status = await proc.wait()
        took = time.monotonic() - started
        print(f"\n{sent:,} bytes echoed after SIGTERM; serve exited {took:.2f} s after it")
        print(stopped)
        assert re.fullmatch(r"stopped: 1 closed, 0 streams cut in [\d.]+ s", stopped), stopped
        assert status == 0


@needs_script
@pytest.mark.slow  # a real subprocess per test, signalled
async def test_serve_sigterm_cuts_a_stream_at_the_stop_timeout(tmp_path: Path) -> None:
    async with _serve(tmp_path, "--stop-timeout", "1") as (proc, addr), Supervisor() as client:
        conn = await dial_echo(client, addr_of(addr))
        stream = await conn.open_stream()
        await stream.write(b"held open")
        assert await stream.read(100) == b"held open"
        status, took = await _term_and_wait(proc, 1 + MARGIN)
        lines = [await _line(proc), await _line(proc)]
        print(f"\nserve --stop-timeout 1 exited {took:.2f} s after SIGTERM: {lines}")
        assert lines[0] == "stopping: 1 connection(s), deadline 1 s"
        assert re.fullmatch(r"stopped: 1 closed, 1 streams cut in [\d.]+ s", lines[1]), lines
        assert status == 0
        assert await _closed_reason(conn) == SHUT_DOWN
        assert took >= 1.0  # it did give the stream its time


@needs_script
@pytest.mark.slow  # a real subprocess per test, signalled
async def test_serve_idle_sigterm_exits_0_at_once(tmp_path: Path) -> None:
    async with _serve(tmp_path) as (proc, _):
        status, took = await _term_and_wait(proc, MARGIN)
        lines = [await _line(proc), await _line(proc)]
    print(f"\nidle serve exited {took:.2f} s after SIGTERM")
    assert lines[0] == "stopping: 0 connection(s), deadline 10 s"
    assert re.fullmatch(r"stopped: 0 closed, 0 streams cut in [\d.]+ s", lines[1]), lines
    assert status == 0


@needs_script
@pytest.mark.slow  # a real subprocess per test, signalled
async def test_serve_libp2p_sigterm_closes_its_connections(tmp_path: Path) -> None:
    async with (
        _serve(tmp_path, "--libp2p") as (proc, addr),
        Supervisor(identity=Identity.generate()) as client,
    ):
        conn = await client.dial(addr)  # libp2p: its streams (identify) end by themselves
        status, took = await _term_and_wait(proc, 10 + MARGIN)
        lines = [await _line(proc), await _line(proc)]
        print(f"\nserve --libp2p exited {took:.2f} s after SIGTERM: {lines}")
        assert lines[0] == "stopping: 1 connection(s), deadline 10 s"
        assert re.fullmatch(r"stopped: 1 closed, 0 streams cut in [\d.]+ s", lines[1]), lines
        assert status == 0
        # A libp2p connection has no accept_stream(): gone from the list, then its reason.
        await poll_until(lambda: not client.connections(), timeout=10, what="client side")
        with pytest.raises(ConnectionClosedError) as info:
            await conn.open_stream()
        assert info.value.reason == SHUT_DOWN


@needs_script
@pytest.mark.slow  # a real subprocess per test, signalled
async def test_serve_second_signal_closes_at_once(tmp_path: Path) -> None:
    async with _serve(tmp_path, "--stop-timeout", "600") as (proc, addr), Supervisor() as client:
        conn = await dial_echo(client, addr_of(addr))
        stream = await conn.open_stream()
        await stream.write(b"held open")
        assert await stream.read(100) == b"held open"
        proc.send_signal(signal.SIGTERM)
        assert await _line(proc) == "stopping: 1 connection(s), deadline 600 s"
        status, took = await _term_and_wait(proc, MARGIN)
        print(f"\nserve exited {took:.2f} s after a second SIGTERM")
        assert await _line(proc) == "stopped at once: a second signal came before the deadline"
        assert status == 0
        assert "supervisor closing" in await _closed_reason(conn)


# ------------------------------------------------------------------------------ dial


async def _dial(addr: str, tmp_path: Path, *argv: str) -> Any:
    return await asyncio.create_subprocess_exec(
        str(SCRIPT),
        "dial",
        addr,
        "--insecure",
        "--bytes",
        "100G",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=(tmp_path / "dial.err").open("w"),
    )


def _ctl_paths(sock: Path) -> list[Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["ctl", "--socket", str(sock), "paths", "--json"]) == 0, out.getvalue()
    conns = json.loads(out.getvalue())
    assert isinstance(conns, list)
    return conns


SUMMARY = re.compile(
    r"sent ([\d,]+) bytes, echoed ([\d,]+), verified ([\d,]+) \((.*?)\); migrations .*"
)


@needs_script
@pytest.mark.slow  # a real subprocess per test, signalled
async def test_dial_sigterm_verifies_what_was_sent_closes_and_exits_0(tmp_path: Path) -> None:
    sock = tmp_path / "serve.sock"
    async with _serve(tmp_path, "--control-socket", str(sock)) as (_, addr):
        dial = await _dial(addr, tmp_path, "--plain")
        try:
            await _until(dial, r"^t=")  # data flows
            assert len(await asyncio.to_thread(_ctl_paths, sock)) == 1
            status, took = await _term_and_wait(dial, 10 + MARGIN)
            out = (await dial.stdout.read()).decode().splitlines()
        finally:
            if dial.returncode is None:
                dial.kill()
                await dial.wait()
        print(f"\ndial exited {took:.2f} s after SIGTERM: {out[-1]}")
        assert any(line.startswith("stopping: no new data; waiting up to 10 s") for line in out)
        match = SUMMARY.fullmatch(out[-1])
        assert match, out
        sent, echoed, verified = (int(match.group(i).replace(",", "")) for i in (1, 2, 3))
        assert sent == echoed == verified > 0
        assert match.group(4) == "all verified; stopped by SIGTERM"
        assert status == 0, (out, (tmp_path / "dial.err").read_text())
        # The server saw the client's CONNECTION_CLOSE: gone long before its idle timeout.
        started = time.monotonic()
        async with asyncio.timeout(5):
            while await asyncio.to_thread(_ctl_paths, sock):
                await asyncio.sleep(0.05)  # a check period, as poll_until's
        print(f"the server dropped the connection {time.monotonic() - started:.2f} s later")


@needs_script
@pytest.mark.slow  # a real subprocess per test, signalled
async def test_dial_sigterm_with_a_silent_server_cuts_at_the_stop_timeout(
    tmp_path: Path,
) -> None:
    """The server stops answering (SIGSTOP): after --stop-timeout the dial closes, says how
    much was not echoed and exits 1 (its check failed); a second SIGTERM does not wait."""
    async with _serve(tmp_path) as (serve, addr):
        for second in (False, True):
            dial = await _dial(addr, tmp_path, "--plain", "--stop-timeout", "1")
            try:
                await _until(dial, r"^t=")
                serve.send_signal(signal.SIGSTOP)
                dial.send_signal(signal.SIGTERM)
                await _until(dial, r"^stopping: ")
                if second:
                    dial.send_signal(signal.SIGTERM)
                async with asyncio.timeout(1 + MARGIN):
                    status = await dial.wait()
                out = (await dial.stdout.read()).decode().splitlines()
            finally:
                serve.send_signal(signal.SIGCONT)
                if dial.returncode is None:
                    dial.kill()
                    await dial.wait()
            print(f"\nsecond SIGTERM {second}: exit {status}: {out[-1]}")
            if second:
                assert status == 130, out
                assert re.fullmatch(
                    r"interrupted after [\d.]+ s: sent [\d,]+ bytes, echoed [\d,]+, verified "
                    r"[\d,]+; migrations 0 confirmed, 0 not done",
                    out[-1],
                ), out
            else:
                assert status == 1, out
                match = SUMMARY.fullmatch(out[-1])
                assert match, out
                sent, echoed = (int(match.group(i).replace(",", "")) for i in (1, 2))
                assert sent > echoed
                assert match.group(4) == (
                    f"NOT verified: {sent - echoed:,} bytes not echoed within --stop-timeout "
                    "1 s of the SIGTERM"
                )
            assert "Traceback" not in (tmp_path / "dial.err").read_text()


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
@pytest.mark.parametrize("command", ["serve", "dial /ip4/127.0.0.1/udp/9/quic-v1"])
def test_bad_stop_timeout_is_one_line(
    command: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*command.split(), "--stop-timeout", value]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--stop-timeout" in line and value in line, line


def test_help_says_what_stop_timeout_bounds(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("serve", "dial"):
        assert main([command, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "--stop-timeout SECONDS on SIGTERM" in text, text
        assert "(default: 10.0)" in text.split("--stop-timeout", 1)[1], text
