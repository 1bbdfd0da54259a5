"""The command line, in-process (``main([...])``) and as the installed console script.

Servers are real (our ``serve`` in a subprocess, the rig's aioquic HTTP/3 server in the test's
loop); readiness is the server's first stdout line, never a sleep.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from supervisor.cli import main
from supervisor.cli.demo import DemoOptions, run_demo
from tests.rig.aioquic_server import h3_file_server
from tests.rig.certs import CertPair

pytest_plugins = ["tests.rig.fixtures"]

SCRIPT = Path(sys.executable).with_name("quic-supervisor")
needs_script = pytest.mark.skipif(
    not SCRIPT.exists(), reason=f"{SCRIPT} missing: run .venv/bin/pip install -e '.[dev]'"
)
SECOND_PATH = "/ip4/127.0.0.2/udp/0/quic-v1"
MIGRATE_2MB = ["--migrate-every", "0.3", "--bytes", "2000000"]


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
        pytest.skip(f"{SCRIPT} missing: run .venv/bin/pip install -e '.[dev]'")
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
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
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
    """Enough bytes that several scheduled migrations happen while data flows."""
    _, addr = serve_process
    rc = main(
        f"dial {addr} --insecure --path {SECOND_PATH} --migrate-every 0.1 --bytes 20M".split()
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "(all verified)" in out
    confirmed = int(re.search(r"migrations (\d+) confirmed", out).group(1))  # type: ignore[union-attr]
    assert confirmed >= 2, out
    assert "0 not done" in out


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
