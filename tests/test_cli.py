"""The command line, in-process (``main([...])``) and as the installed console script.

Servers are real (our ``serve`` in a subprocess, the rig's aioquic HTTP/3 server in the test's
loop); readiness is the server's first stdout line, never a sleep. Subprocesses are interrupted
(SIGINT, as Ctrl-C) only after the line that shows what they are doing, and a terminal is a
real pseudo-terminal. The CLI's contract (help, errors, timeouts, logging) is in
tests/test_cli_contract.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import json
import os
import pty
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from supervisor.cli import main
from supervisor.cli.demo import DemoOptions, run_demo
from tests.rig.aioquic_server import h3_file_server
from tests.rig.certs import CertPair
from tests.support import stop_process

pytest_plugins = ["tests.rig.fixtures"]

SCRIPT = Path(sys.executable).with_name("quic-supervisor")
needs_script = pytest.mark.skipif(
    not SCRIPT.exists(), reason=f"{SCRIPT} missing: run .venv/bin/pip install -e '.[dev,cli]'"
)
SECOND_PATH = "/ip4/127.0.0.2/udp/0/quic-v1"
THIRD_PATH = "/ip4/127.0.0.3/udp/0/quic-v1"
MIGRATE_2MB = ["--migrate-every", "0.3", "--bytes", "2000000"]
PROGRESS_LINE = re.compile(r"^t=\s*[\d.]+s echoed [\d.]+ [kMG]?B of 100\.0 GB \(\d+%\), .*/s")


def _summary_value(out: str, name: str) -> str:
    """The value cell of a row of the demo's summary table."""
    match = re.search(rf"^\W*{re.escape(name)}\W+([^│|\n]*?)\s*[│|]?\s*$", out, re.M)
    assert match, f"no {name!r} row in:\n{out}"
    return match.group(1)


# ------------------------------------------------------------------------------ demo


def test_demo_exits_0_with_migrations_and_verified_bytes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Also the non-terminal check: captured stdout gets plain progress lines, no escapes."""
    assert main(["demo", "--duration", "3", "--interval", "0.5"]) == 0
    out = capsys.readouterr().out
    assert int(_summary_value(out, "migrations")) >= 2
    assert "(verified)" in _summary_value(out, "bytes verified")
    assert int(_summary_value(out, "rollbacks")) == 0
    assert re.search(r"^t=\s*\d", out, re.M), out  # plain progress lines
    # ... with the progress towards --duration and each path's rate
    assert re.search(r"^t=\s*[\d.]+s of 3s \(\d+%\) ", out, re.M), out
    assert re.search(r"rates: 127\.0\.0\.1:\d+ [\d.]+ [kMG]?B/s, 127\.0\.0\.2:\d+ ", out), out
    assert "\x1b[" not in out  # no terminal control sequences when stdout is not a TTY
    assert "OK: every byte verified" in out
    sent = int(_summary_value(out, "bytes sent").replace(",", ""))
    assert sent > 0 and _summary_value(out, "bytes echoed").replace(",", "") == str(sent)


async def test_demo_live_table_on_a_terminal() -> None:
    """On a terminal the path table is drawn live (cursor movement) and ends in the summary."""
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    result = await run_demo(DemoOptions(duration=1.2, interval=0.4), console)
    out = buf.getvalue()
    assert result.ok, out
    assert "local -> remote" in out and "\x1b[" in out
    assert "127.0.0.2:" in out
    assert re.search(r"\brate\b", out) and re.search(r"[\d.]+ [kMG]?B/s", out), out  # per path
    assert "/ 1.2 s" in out  # the progress towards --duration
    assert result.migrations >= 1 and result.bytes_verified == result.bytes_sent


@needs_script
def test_demo_console_script() -> None:
    proc = subprocess.run(
        [str(SCRIPT), "demo", "--duration", "1.5", "--interval", "0.5", "--plain"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert int(_summary_value(proc.stdout, "migrations")) >= 2
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------ serve + dial


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``quic-supervisor serve`` on a free port; yields (process, listening multiaddr)."""
    if not SCRIPT.exists():
        pytest.skip(f"{SCRIPT} missing: run .venv/bin/pip install -e '.[dev,cli]'")
    stderr = (tmp_path / "serve.err").open("w")
    proc = subprocess.Popen(
        [str(SCRIPT), "serve", "--listen", "/ip4/127.0.0.1/udp/0/quic-v1"],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if ready else ""
        match = re.match(r"listening on (\S+)", line)
        assert match, f"serve did not start: {line!r} {(tmp_path / 'serve.err').read_text()}"
        yield proc, match.group(1)
    finally:
        stop_process(proc)
        stderr.close()


def test_serve_and_dial_subprocess_with_migrations(
    serve_process: tuple[subprocess.Popen[str], str], tmp_path: Path
) -> None:
    proc, addr = serve_process
    dial = subprocess.run(
        [str(SCRIPT), "dial", addr, "--insecure", "--path", SECOND_PATH, *MIGRATE_2MB],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dial.returncode == 0, dial.stdout + dial.stderr
    assert "verified 2,000,000 (all verified)" in dial.stdout
    # serve stops cleanly on SIGTERM
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert "Traceback" not in (tmp_path / "serve.err").read_text()


def test_dial_in_process_migrates_during_the_transfer(
    serve_process: tuple[subprocess.Popen[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Enough bytes that several scheduled migrations happen while data flows; ``serve``
    prints each move of its client (the server side of the same migrations)."""
    serve, addr = serve_process
    rc = main(
        f"dial {addr} --insecure --path {SECOND_PATH} --migrate-every 0.1 --bytes 20M".split()
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "(all verified)" in out
    confirmed = int(re.search(r"migrations (\d+) confirmed", out).group(1))  # type: ignore[union-attr]
    assert confirmed >= 2, out
    assert "0 not done" in out
    served = Lines(serve)
    moves = [served.until(r"peer moved", timeout=30) for _ in range(confirmed)]
    hosts = []
    for line in moves:
        match = re.fullmatch(
            r"connection \S+: peer moved /ip4/(127\.0\.0\.[12])/udp/\d+/quic-v1 -> "
            r"/ip4/(127\.0\.0\.[12])/udp/\d+/quic-v1",
            line,
        )
        assert match and match.group(1) != match.group(2), moves
        hosts.append(match.group(2))
    assert hosts[0] == "127.0.0.2" and len(set(hosts)) == 2, moves  # there and back


# ------------------------------------------------------------------------------ progress, Ctrl-C


class Lines:
    """A subprocess's stdout, line by line, read by a thread: waits on the next line with a
    deadline (select() on a buffered text pipe can miss lines already read ahead)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        stdout = proc.stdout

        def pump() -> None:
            for line in stdout:
                self._queue.put(line.rstrip("\n"))
            self._queue.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def until(self, pattern: str, timeout: float = 60.0) -> str:
        """The first line (from now on) matching ``pattern``; every line read is in ``seen``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no line matching {pattern!r} within {timeout}s: {self.seen}"
                ) from None
            if line is None:
                raise AssertionError(f"stdout ended before {pattern!r}: {self.seen}")
            self.seen.append(line)
            if re.search(pattern, line):
                return line

    def rest(self, timeout: float = 30.0) -> list[str]:
        """Every line until the process closes stdout."""
        lines: list[str] = []
        while (line := self._queue.get(timeout=timeout)) is not None:
            lines.append(line)
        self.seen += lines
        return lines


def _popen(*argv: str, err: Path) -> subprocess.Popen[str]:
    if not SCRIPT.exists():
        pytest.skip(f"{SCRIPT} missing: run .venv/bin/pip install -e '.[dev,cli]'")
    return subprocess.Popen(
        [str(SCRIPT), *argv], stdout=subprocess.PIPE, stderr=err.open("w"), text=True
    )


def _interrupt(proc: subprocess.Popen[str]) -> int:
    """Ctrl-C: SIGINT, then the exit status (killed after 30 s: the test then fails)."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def test_dial_progress_lines_and_ctrl_c_partial_summary(
    serve_process: tuple[subprocess.Popen[str], str], tmp_path: Path
) -> None:
    """Piped, ``dial`` prints a progress line a second (bytes, of the total, rate, ETA); Ctrl-C
    after the first one prints what was done so far and exits 130."""
    _, addr = serve_process
    err = tmp_path / "dial.err"
    dial = _popen(
        "dial", addr, "--insecure", "--path", SECOND_PATH, "--migrate-every", "0.3",
        "--bytes", "100G", err=err,
    )  # fmt: skip
    lines = Lines(dial)
    try:
        progress = lines.until(r"^t=")
        assert PROGRESS_LINE.match(progress) and ", ETA " in progress, progress
        assert re.search(r"; migrations \d+$", progress), progress
    finally:
        status = _interrupt(dial)
    tail = lines.rest()
    assert status == 130, (tail, err.read_text())
    summary = tail[-1]
    match = re.fullmatch(
        r"interrupted after ([\d.]+) s: sent ([\d,]+) bytes, echoed ([\d,]+), verified ([\d,]+); "
        r"migrations (\d+) confirmed, (\d+) not done",
        summary,
    )
    assert match, tail
    sent, echoed, verified = (int(match.group(i).replace(",", "")) for i in (2, 3, 4))
    assert sent >= echoed >= verified > 0
    assert float(match.group(1)) >= 1.0  # it ran past its first progress line
    assert "Traceback" not in err.read_text()


def test_demo_ctrl_c_prints_the_partial_summary(tmp_path: Path) -> None:
    err = tmp_path / "demo.err"
    demo = _popen("demo", "--duration", "60", "--interval", "0.3", "--plain", err=err)
    lines = Lines(demo)
    try:
        lines.until(r"^migration 1: .* confirmed in")
    finally:
        status = _interrupt(demo)
    out = "\n".join(lines.rest())
    assert status == 130, (out, err.read_text())
    assert re.search(
        r"^INTERRUPTED after [\d.]+ s: [\d,]+ bytes verified, \d+ migrations$", out, re.M
    )
    assert int(_summary_value(out, "migrations")) >= 1
    assert int(_summary_value(out, "bytes sent").replace(",", "")) > 0
    assert "Traceback" not in err.read_text()


async def test_get_progress_and_ctrl_c(rig_cert: CertPair, tmp_path: Path) -> None:
    """``get`` of a body too large to finish: a progress line, then Ctrl-C: the bytes so far."""
    if not SCRIPT.exists():
        pytest.skip(f"{SCRIPT} missing: run .venv/bin/pip install -e '.[dev,cli]'")
    async with h3_file_server(
        certfile=rig_cert.certfile, keyfile=rig_cert.keyfile, size_mb=128
    ) as server:
        url = f"https://127.0.0.1:{server.port}/file"
        proc = await asyncio.create_subprocess_exec(
            str(SCRIPT), "get", url, "--cafile", str(rig_cert.certfile), "--timeout", "600",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(60):
                while not (line := (await proc.stdout.readline()).decode()).startswith("t="):
                    assert line, "stdout ended before a progress line"
            # The server's content-length gives the total: share and ETA.
            assert re.match(
                r"^t=\s*[\d.]+s received [\d.]+ [kMG]?B of 134\.2 MB \(\d+%\), "
                r"[\d.]+ [kMG]?B/s(, ETA \d+ s)?",
                line,
            ), line
        finally:
            proc.send_signal(signal.SIGINT)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 130, stdout + stderr
    match = re.search(
        rb"^interrupted after [\d.]+ s: received ([\d,]+) bytes \(incomplete: no sha256\); "
        rb"migrations 0$",
        stdout,
        re.M,
    )
    assert match, stdout
    assert 0 < int(match.group(1).replace(b",", b"")) < 128 * 1024 * 1024
    assert b"Traceback" not in stderr


def _on_a_terminal(argv: list[str], timeout: float = 60.0) -> tuple[int, str]:
    """Run the console script with a pseudo-terminal as stdout; (exit status, what it drew)."""
    if not SCRIPT.exists():
        pytest.skip(f"{SCRIPT} missing: run .venv/bin/pip install -e '.[dev,cli]'")
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [str(SCRIPT), *argv],
        stdout=slave,
        stderr=subprocess.PIPE,
        env={**os.environ, "COLUMNS": "120", "TERM": "xterm"},
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError as exc:  # EIO: the child closed the terminal
                if exc.errno != errno.EIO:
                    raise
                break
            if not data:
                break
            chunks.append(data)
        status = proc.wait(timeout=30)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return status, b"".join(chunks).decode(errors="replace")


def test_dial_draws_a_progress_bar_on_a_terminal(
    serve_process: tuple[subprocess.Popen[str], str],
) -> None:
    _, addr = serve_process
    status, drawn = _on_a_terminal(["dial", addr, "--insecure", "--bytes", "4M"])
    assert status == 0, drawn
    assert "\x1b[" in drawn and "━" in drawn  # a rich bar, redrawn in place
    assert re.search(r"[\d.]+/4\.0 MB", drawn) and re.search(r"[\d.]+ [kMG]?B/s", drawn), drawn
    assert "verified 4,000,000 (all verified)" in drawn
    status, plain = _on_a_terminal(["dial", addr, "--insecure", "--bytes", "4M", "--plain"])
    assert status == 0 and "\x1b[" not in plain and "━" not in plain, plain


def test_dial_timeout_bounds_a_stalled_echo(
    serve_process: tuple[subprocess.Popen[str], str], tmp_path: Path
) -> None:
    """dial's --timeout also bounds the wait for echoed bytes: a server that stops answering
    (SIGSTOP) ends the dial with one line after about that long, not never."""
    serve, addr = serve_process
    err = tmp_path / "dial.err"
    dial = _popen("dial", addr, "--insecure", "--bytes", "100G", "--timeout", "2", err=err)
    lines = Lines(dial)
    try:
        lines.until(r"^t=")  # data flows
        serve.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        status = dial.wait(timeout=60)
        took = time.monotonic() - stopped
    finally:
        serve.send_signal(signal.SIGCONT)
        if dial.poll() is None:
            dial.kill()
            dial.wait()
    print(f"dial --timeout 2 gave up {took:.2f} s after the server stopped")
    assert status == 2, (lines.seen, err.read_text())
    (line,) = err.read_text().strip().splitlines()
    assert re.fullmatch(
        r"quic-supervisor dial: error: no echoed byte for --timeout 2 s \([\d,]+ echoed so far\): "
        r"the server stopped answering; check it, or raise --timeout",
        line,
    ), line


# ------------------------------------------------------------------------------ operators win


def _ctl_json(sock: Path, *argv: str) -> object:
    """``quic-supervisor ctl ... --json`` in-process (fast: no interpreter start-up)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["ctl", "--socket", str(sock), *argv, "--json"]) == 0, out.getvalue()
    return json.loads(out.getvalue())


def _active_ip(sock: Path) -> str:
    (conn,) = _ctl_json(sock, "paths")  # type: ignore[misc]
    (active,) = [p for p in conn["paths"] if p["active"]]
    return str(active["local_addr"]).split("/")[2]


def test_operator_migration_pauses_the_dial_schedule(
    serve_process: tuple[subprocess.Popen[str], str], tmp_path: Path
) -> None:
    """A ``ctl migrate`` while ``dial --migrate-every`` runs: the dial says so, makes no move of
    its own until --operator-hold after the operator's migration completed (it used to undo it
    within one period), then resumes its schedule."""
    _, addr = serve_process
    sock = tmp_path / "dial.sock"
    err = tmp_path / "dial.err"
    dial = _popen(
        "dial", addr, "--insecure", "--path", SECOND_PATH, "--migrate-every", "1",
        "--operator-hold", "3", "--bytes", "100G", "--control-socket", str(sock), err=err,
    )  # fmt: skip
    lines = Lines(dial)
    try:
        # The schedule runs; the operator acts right after one of its ticks (the next is 1 s
        # away), so no move of the schedule's own is already under way.
        lines.until(r"^migration 1: .* confirmed in")
        (conn,) = _ctl_json(sock, "paths")  # type: ignore[misc]
        moved = _ctl_json(sock, "migrate", conn["conn_id"][:8], "--to", THIRD_PATH)
        assert isinstance(moved, dict)
        started = lines.until(r"^operator migration")
        assert re.fullmatch(
            r"operator migration \(manual\) 127\.0\.0\.[12]:\d+ -> 127\.0\.0\.3:\d+ started: "
            r"pausing the migration schedule",
            started,
        ), lines.seen
        completed = lines.until(r"^operator migration .* (completed|failed)")
        held_from = time.monotonic()
        assert re.fullmatch(
            r"operator migration \(manual\) 127\.0\.0\.[12]:\d+ -> 127\.0\.0\.3:\d+ completed: "
            r"the schedule resumes in 3 s",
            completed,
        ), lines.seen
        assert _active_ip(sock) == "127.0.0.3"  # the operator's choice stands
        first = len(lines.seen)
        resumed = lines.until(r"^resuming the migration schedule")
        held = time.monotonic() - held_from
        during = lines.seen[first:-1]
        assert not [line for line in during if re.match(r"^migration \d+:", line)], during
        assert any("(paused for the operator)" in line for line in during), during
        assert "3 s after the operator's last migration ended" in resumed
        lines.until(r"^migration \d+: .* confirmed in")  # the schedule goes on
        print(f"schedule held for {held:.2f} s after the operator's migration (--operator-hold 3)")
    finally:
        status = _interrupt(dial)
    assert status == 130
    assert "Traceback" not in err.read_text()


# ------------------------------------------------------------------------------ user errors


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["dial", "not-a-multiaddr"], "not-a-multiaddr"),
        (["dial", "/ip4/127.0.0.1/tcp/4433"], "/ip4/127.0.0.1/tcp/4433"),
        (["serve", "--listen", "/ip4/999.1.1.1/udp/1/quic-v1"], "/ip4/999.1.1.1/udp/1/quic-v1"),
        (["get", "ftp://example/"], "ftp://example/"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert named in lines[0] and "Traceback" not in captured.err


def test_bad_path_multiaddr_is_named(
    serve_process: tuple[subprocess.Popen[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, addr = serve_process
    assert main(["dial", addr, "--insecure", "--path", "/ip4/127.0.0.2/udp/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "/ip4/127.0.0.2/udp/x" in err


@needs_script
def test_bad_multiaddr_console_script() -> None:
    proc = subprocess.run(
        [str(SCRIPT), "dial", "/dns/nowhere"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "/dns/nowhere" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_argparse_errors_return_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dial"]) == 2
    assert main(["demo", "--duration", "-1"]) == 2
    assert main(["get", "https://localhost:1/x", "--migrate-after", "1"]) == 2
    assert "--migrate-after needs a --path" in capsys.readouterr().err


def test_fleet_commands_are_wired(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["fleet", "--help"], ["fleet", "drain", "--help"], ["agent", "--help"]):
        assert main(argv) == 0
    assert "drain" in capsys.readouterr().out


def test_telemetry_flags_parse_before_or_after_the_subcommand(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--qlog-dir/--trace-file/--journal (tests/test_telemetry_cli.py checks what they write)."""
    argv = ["--trace-file", str(tmp_path / "t.json"), "dial", "nope", "--qlog-dir", str(tmp_path)]
    assert main([*argv, "--journal", str(tmp_path / "j")]) == 2  # the bad address, not the flags
    err = capsys.readouterr().err
    assert "'nope'" in err and "accepted" not in err
    assert (tmp_path / "t.json").read_text() == ""  # opened, and closed with no span in it


# ------------------------------------------------------------------------------ get (HTTP/3)


async def test_get_with_migration_matches_sha256(rig_cert: CertPair, tmp_path: Path) -> None:
    """In-process ``main`` (on a worker thread: it runs its own loop) against the rig's
    aioquic HTTP/3 server; the body is saved with -o and the server sees the new path."""
    async with h3_file_server(
        certfile=rig_cert.certfile, keyfile=rig_cert.keyfile, size_mb=16
    ) as server:
        out = tmp_path / "file"
        url = f"https://localhost:{server.port}/file"
        argv = f"get {url} --cafile {rig_cert.certfile} --path {SECOND_PATH}".split()
        argv += ["--migrate-after", "0.05", "-o", str(out)]
        buf = io.StringIO()
        rc = await asyncio.to_thread(_run_captured, argv, buf)
        text = buf.getvalue()
        assert rc == 0, text
        digest = server.sha256["/file"]
        assert f"sha256 {digest}" in text and "status 200" in text
        assert f"{16 * 1024 * 1024:,} bytes" in text
        assert "migrations 1" in text, text
        assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
        assert any(host == "127.0.0.2" for host, _ in server.peer_addresses())


@needs_script
async def test_get_console_script(rig_cert: CertPair) -> None:
    async with h3_file_server(
        certfile=rig_cert.certfile, keyfile=rig_cert.keyfile, size_mb=16
    ) as server:
        url = f"https://127.0.0.1:{server.port}/file"
        proc = await asyncio.create_subprocess_exec(
            str(SCRIPT),
            *f"get {url} --cafile {rig_cert.certfile} --path {SECOND_PATH}".split(),
            *["--migrate-after", "0.05"],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
        text = stdout.decode()
        assert proc.returncode == 0, text + stderr.decode()
        assert f"sha256 {server.sha256['/file']}" in text
        assert "migrations 1" in text, text
        missing = await asyncio.create_subprocess_exec(
            *[str(SCRIPT), "get", f"https://127.0.0.1:{server.port}/nope", "--insecure"],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, _ = await asyncio.wait_for(missing.communicate(), 60)
        assert missing.returncode == 1 and b"status 404" in stdout


def _run_captured(argv: list[str], buf: io.StringIO) -> int:
    """``main(argv)`` with its stdout in ``buf`` (only this thread prints meanwhile)."""
    from contextlib import redirect_stdout

    with redirect_stdout(buf):
        return main(argv)
