"""The command line's one contract (issue 18): help and defaults on every option, ``--version``,
``python -m supervisor``, every error one line ``quic-supervisor CMD: error: WHAT: FIX`` with
exit status 2 (never a raw OS error), every ``--timeout`` bounding the handshake too,
third-party logs only with ``--log-level info``, ``serve --cert-dir``, and a library core that
imports neither rich nor matplotlib.

Everything is real: sockets on 127.0.0.1, our ``serve`` in a subprocess, the rig's HTTP/3
server in the test's loop. Durations are printed (measurements), never asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import io
import json
import os
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.cli import main
from supervisor.cli.demo import self_signed_cert, stable_cert
from tests.rig.aioquic_server import h3_file_server
from tests.rig.certs import CertPair

pytest_plugins = ["tests.rig.fixtures"]

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name("quic-supervisor")
#: WHAT: FIX after the command's prefix, on one line.
ERROR_LINE = re.compile(r"^quic-supervisor(?: [a-z]+)+: error: \S.*: \S.*$")


def _one_error_line(err: str, command: str) -> str:
    """The single stderr line of a failed command, checked against the contract."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"quic-supervisor {command}: error: "), line
    assert ERROR_LINE.match(line), line
    assert "Traceback" not in err and "Errno" not in line, line
    return line


@pytest.fixture
def silent_udp() -> Iterator[int]:
    """A UDP port on 127.0.0.1 that is bound (no ICMP unreachable) and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


# ------------------------------------------------------------------------------ help, version

#: Every command main.py defines (ctl and fleet are theirs, supervisor/cli/ctl.py and fleet.py).
COMMANDS = [[], ["serve"], ["dial"], ["get"], ["ping"], ["demo"], ["journal", "show"]]
COMMANDS += [["journal", "plot"]]


def _option_entries(help_text: str) -> dict[str, str]:
    """``--help`` output -> {the option's flags: its help text}, wrapped lines joined."""
    entries: dict[str, str] = {}
    current: str | None = None
    for line in help_text.splitlines():
        if re.match(r"^  -", line):
            flags, _, text = line.strip().partition("  ")
            current = flags
            entries[current] = text.strip()
        elif current is not None and line.startswith("    ") and line.strip():
            entries[current] = f"{entries[current]} {line.strip()}".strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "main")
def test_every_option_has_help_and_shows_its_default(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*command, "--help"]) == 0
    entries = _option_entries(capsys.readouterr().out)
    checked = {f: t for f, t in entries.items() if not f.startswith(("-h", "--version"))}
    assert checked or command == ["journal", "show"], entries  # show takes only FILE
    for flags, text in checked.items():
        assert text and not text.startswith("(default"), f"{command}: {flags} has no help"
        assert "default" in text.lower(), f"{command}: {flags} hides its default: {text!r}"
    if command in (["dial"], ["get"], ["ping"]):
        timeout = next(t for f, t in checked.items() if f.startswith("--timeout"))
        assert "handshake" in timeout and "(default: " in timeout, timeout


def test_version_and_python_dash_m(capsys: pytest.CaptureFixture[str]) -> None:
    expected = f"quic-supervisor {importlib.metadata.version('quic-supervisor')}"
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == expected

    run = [sys.executable, "-m", "supervisor"]
    shown = subprocess.run([*run, "--version"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and shown.stdout.strip() == expected, shown.stderr
    bad = subprocess.run([*run, "dial", "nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "'nope'" in _one_error_line(bad.stderr, "dial")


# ------------------------------------------------------------------------------ one error line


@pytest.mark.parametrize(
    ("argv", "command", "named"),
    [
        (["dial"], "dial", "MULTIADDR"),
        (["dial", "/ip4/127.0.0.1/udp/9/quic-v1", "--bogus"], "dial", "--bogus"),
        (["demo", "--duration", "-1"], "demo", "--duration"),
        (["journal", "show", "x", "--nope"], "journal show", "--nope"),
        (["ctl", "paths", "--nope"], "ctl paths", "--nope"),
        (["get", "https://localhost:1/x", "--migrate-after", "1"], "get", "--migrate-after"),
        (["get", f"https://{'a' * 64}.example/x"], "get", "not a valid host name"),
        (["get", "https://127.0.0.1:1/x", "--header", "nocolon"], "get", "'nocolon'"),
        (["dial", "x", "--operator-hold", "1"], "dial", "--operator-hold"),
        (["dial", "x", "--migrate-every", "1"], "dial", "--path MULTIADDR"),
        (["serve", "--key", "k.pem"], "serve", "--key needs a certificate"),
        (
            ["ping", "/ip4/127.0.0.1/udp/9/quic-v1/p2p/x", "-c", "2", "--migrate-after", "1"],
            "ping",
            "--path MULTIADDR",
        ),
    ],
)
def test_usage_errors_are_one_line_naming_the_input(
    argv: list[str], command: str, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert named in _one_error_line(capsys.readouterr().err, command)


def test_os_errors_name_the_flag_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """FileNotFoundError/NotADirectoryError never reach the user raw: the line names the flag,
    the path and what to do."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    missing = tmp_path / "missing"
    dead = ["dial", "/ip4/127.0.0.1/udp/9/quic-v1", "--timeout", "1", "--insecure"]
    cert = missing / "c.pem"
    cases = [
        ([*dead, "--qlog-dir", str(blocker / "qlog")], "dial", "--qlog-dir", blocker),
        ([*dead, "--trace-file", str(missing / "t.jsonl")], "dial", "--trace-file", missing),
        ([*dead, "--journal", str(blocker / "j")], "dial", "journal path", blocker),
        ([*dead, "--control-socket", str(missing / "c.sock")], "dial", "--control-socket", missing),
        (["get", "https://127.0.0.1:9/x", "-o", str(missing / "b")], "get", "--output", missing),
        (["serve", "--cert", str(cert), "--key", str(cert)], "serve", "certfile", cert),
        (["journal", "show", str(missing / "j")], "journal", "no journal at", missing),
    ]
    for argv, command, flag, path in cases:
        assert main(argv) == 2, argv
        line = _one_error_line(capsys.readouterr().err, command)
        assert flag in line and str(path) in line, line
        assert not re.search(r"\b\w+Error:", line), line  # no exception type names


def test_busy_listen_and_path_ports_name_the_address(capsys: pytest.CaptureFixture[str]) -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    busy = f"/ip4/127.0.0.1/udp/{holder.getsockname()[1]}/quic-v1"
    try:
        assert main(["serve", "--listen", busy]) == 2
        line = _one_error_line(capsys.readouterr().err, "serve")
        assert busy in line and "in use" in line and "port 0" in line
        assert main(["demo", "--duration", "1", "--second-path", busy]) == 2
        line = _one_error_line(capsys.readouterr().err, "demo")
        assert busy in line and "in use" in line
    finally:
        holder.close()


# ------------------------------------------------------------------------------ --timeout


def test_get_timeout_bounds_the_handshake(
    silent_udp: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Against a bound but silent UDP port, ``get --timeout 2`` gives up after ~2 s (it used to
    wait dial's own 10 s), naming the address and --timeout."""
    started = time.monotonic()
    rc = main(["get", f"https://127.0.0.1:{silent_udp}/file", "--timeout", "2", "--insecure"])
    took = time.monotonic() - started
    line = _one_error_line(capsys.readouterr().err, "get")
    print(f"get --timeout 2 against a silent port returned after {took:.2f} s")
    assert rc == 2
    assert f"/ip4/127.0.0.1/udp/{silent_udp}/quic-v1" in line and "--timeout 2 s" in line


@pytest.mark.parametrize("command", ["dial", "ping"])
def test_dial_and_ping_timeout_name_the_flag(
    command: str, silent_udp: int, capsys: pytest.CaptureFixture[str]
) -> None:
    addr = f"/ip4/127.0.0.1/udp/{silent_udp}/quic-v1"
    if command == "ping":
        addr += "/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
    started = time.monotonic()
    rc = main([command, addr, "--timeout", "1", *(["--insecure"] if command == "dial" else [])])
    took = time.monotonic() - started
    line = _one_error_line(capsys.readouterr().err, command)
    print(f"{command} --timeout 1 against a silent port returned after {took:.2f} s")
    assert rc == 2 and "within --timeout 1 s" in line and "raise --timeout" in line


async def test_get_timeout_bounds_the_response(rig_cert: CertPair) -> None:
    """A body that cannot arrive within --timeout: the line says how much did."""
    async with h3_file_server(
        certfile=rig_cert.certfile, keyfile=rig_cert.keyfile, size_mb=128
    ) as server:
        argv = [f"https://127.0.0.1:{server.port}/file", "--cafile", str(rig_cert.certfile)]
        out, err = io.StringIO(), io.StringIO()
        started = time.monotonic()
        rc = await asyncio.to_thread(_captured, ["get", *argv, "--timeout", "1.5"], out, err)
        print(f"get --timeout 1.5 of 128 MB returned after {time.monotonic() - started:.2f} s")
    line = _one_error_line(err.getvalue(), "get")
    assert rc == 2
    assert "response was not complete within --timeout 1.5 s" in line, line
    assert re.search(r"\([\d,]+ bytes received\)", line), line


def _captured(argv: list[str], out: io.StringIO, err: io.StringIO) -> int:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        return main(argv)


# ------------------------------------------------------------------------------ logging


def _closed_tcp_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()  # nothing listens there now: connection refused
    return port


@pytest.mark.parametrize("level", ["warning", "info"])
def test_third_party_logs_only_with_log_level_info(
    level: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """OpenTelemetry's exporter warns (its own logger) when the collector is down: hidden at
    the default level, shown with --log-level info (as aioquic's own records are)."""
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{_closed_tcp_port()}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    main(["--log-level", level, "demo", "--duration", "0.6", "--interval", "0.2", "--plain"])
    err = capsys.readouterr().err
    third_party = [
        line
        for line in err.splitlines()
        if re.match(r"^(WARNING|ERROR|INFO) (opentelemetry|quic|urllib3)", line)
    ]
    if level == "warning":
        assert third_party == [], err
        assert err == "", err
    else:
        assert any(
            line.startswith(("WARNING opentelemetry", "ERROR opentelemetry"))
            for line in third_party
        ), err
        assert any(line.startswith("INFO quic") for line in third_party), err


# ------------------------------------------------------------------------------ the cli extra


def _modules_after(code: str) -> list[str]:
    script = textwrap.dedent(code) + textwrap.dedent(
        """
        import json, sys
        print(json.dumps(sorted(
            m for m in sys.modules if m.split(".")[0] in ("rich", "matplotlib")
        )))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_the_library_imports_neither_rich_nor_matplotlib(tmp_path: Path) -> None:
    """``import supervisor`` and a real listen + dial + echo + journal render: neither rich
    nor matplotlib is loaded (they are the ``cli`` extra's); the CLI does load rich."""
    used = _modules_after(
        f"""
        import asyncio
        import supervisor
        from supervisor import Supervisor
        from telemetry.timeline import render_text
        from tests.rig.certs import generate_cert

        async def echo(stream):
            while data := await stream.read(65536):
                await stream.write(data)
            await stream.close()

        async def run():
            pair = generate_cert({str(tmp_path)!r})
            async with Supervisor(enable_experimental_connection_migration=True) as sup:
                listener = await sup.listen(
                    "/ip4/127.0.0.1/udp/0/quic-v1", certfile=str(pair.certfile),
                    keyfile=str(pair.keyfile), alpn_protocols=["echo"], handler=echo)
                conn = await sup.dial(listener.multiaddr, alpn_protocols=["echo"],
                                      server_name="localhost", cafile=str(pair.certfile))
                stream = await conn.open_stream()
                await stream.write(b"hello")
                assert await stream.read(5) == b"hello"
                await conn.close()
            render_text([])

        asyncio.run(run())
        """
    )
    assert used == []
    assert "rich" in _modules_after("import supervisor.cli.main")  # the check sees an import


def _without(module: str, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter where ``module`` cannot be imported (as when the
    ``cli`` extra is not installed)."""
    script = f"import sys\nsys.modules[{module!r}] = None\n" + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_without_the_cli_extra_the_command_says_what_to_install(tmp_path: Path) -> None:
    no_rich = _without("rich", "from supervisor.cli import main\nsys.exit(main(['demo']))")
    assert no_rich.returncode == 2, no_rich.stderr
    assert no_rich.stderr.strip() == (
        "quic-supervisor: error: the command line needs the Python package rich, which is not "
        "installed: pip install 'quic-supervisor[cli]'"
    )
    journal, png = tmp_path / "j", tmp_path / "t.png"
    no_matplotlib = _without(
        "matplotlib",
        f"""
        import asyncio
        from supervisor import Supervisor
        from supervisor.cli import main

        async def record():
            async with Supervisor(journal={str(journal)!r}):
                pass

        asyncio.run(record())
        sys.exit(main(["journal", "plot", {str(journal)!r}, "-o", {str(png)!r}]))
        """,
    )
    assert no_matplotlib.returncode == 2, no_matplotlib.stderr
    line = _one_error_line(no_matplotlib.stderr, "journal")
    assert "matplotlib" in line and "pip install 'quic-supervisor[cli]'" in line
    assert not png.exists()


# ------------------------------------------------------------------------------ serve --cert-dir


def _start_serve(*argv: str, err: Path) -> tuple[subprocess.Popen[str], str]:
    if not SCRIPT.exists():
        pytest.skip(f"{SCRIPT} missing: run .venv/bin/pip install -e '.[dev,cli]'")
    proc = subprocess.Popen(
        [str(SCRIPT), "serve", "--listen", "/ip4/127.0.0.1/udp/0/quic-v1", *argv],
        stdout=subprocess.PIPE,
        stderr=err.open("w"),
        text=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline() if ready else ""
    match = re.match(r"listening on (\S+)", line)
    if not match:
        proc.kill()
        proc.wait()
    assert match, f"serve did not start: {line!r} {err.read_text()}"
    return proc, match.group(1)


def _stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def test_serve_cert_dir_makes_a_certificate_once_and_reuses_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs = tmp_path / "certs"
    pem = certs / "cert.pem"
    first_pem = b""
    for run, how in enumerate(("made", "reused")):
        err = tmp_path / f"serve{run}.err"
        proc, addr = _start_serve("--cert-dir", str(certs), err=err)
        try:
            said = err.read_text()
            assert f"{how} the certificate {pem}" in said and f"--cafile {pem}" in said, said
            assert stat.S_IMODE((certs / "key.pem").stat().st_mode) == 0o600
            assert stat.S_IMODE(certs.stat().st_mode) == 0o700
            if run == 0:
                first_pem = pem.read_bytes()
            assert pem.read_bytes() == first_pem  # the same certificate: clients keep trusting
            # A client verifying against the printed --cafile (no --insecure):
            rc = main(["dial", addr, "--cafile", str(pem), "--bytes", "100k"])
            assert rc == 0, capsys.readouterr()
            assert "(all verified)" in capsys.readouterr().out
        finally:
            assert _stop(proc) == 0
        assert "Traceback" not in err.read_text()


def test_cert_dir_refuses_what_it_cannot_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    half = tmp_path / "half"
    self_signed_cert(half)
    (half / "key.pem").unlink()
    loose = tmp_path / "loose"
    self_signed_cert(loose)
    (loose / "key.pem").chmod(0o644)
    afile = tmp_path / "afile"
    afile.write_text("x")
    garbled = tmp_path / "garbled"
    self_signed_cert(garbled)
    (garbled / "cert.pem").write_text("not a certificate\n")
    cases = [
        (["--cert-dir", str(garbled)], f"{garbled / 'cert.pem'} holds no PEM certificate"),
        (["--cert-dir", str(half)], f"remove {half / 'cert.pem'}"),
        (["--cert-dir", str(loose)], f"chmod 600 {loose / 'key.pem'}"),
        (["--cert-dir", str(afile)], "not a directory"),
        (["--cert-dir", str(half), "--cert", "c.pem"], "either --cert-dir or --cert/--key"),
        (["--cert-dir", str(half), "--libp2p"], "leave out --cert/--cert-dir"),
    ]
    for extra, named in cases:
        assert main(["serve", "--listen", "/ip4/127.0.0.1/udp/0/quic-v1", *extra]) == 2
        line = _one_error_line(capsys.readouterr().err, "serve")
        assert named in line, line
    assert not (half / "key.pem").exists()  # nothing was made over half a pair


def test_cert_dir_renews_an_expired_certificate(tmp_path: Path) -> None:
    self_signed_cert(tmp_path, valid_days=0)  # expires as it is made
    old = (tmp_path / "cert.pem").read_bytes()
    cert, key, how = stable_cert(tmp_path)
    assert how == "renewed" and cert.read_bytes() != old
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stable_cert(tmp_path)[2] == "reused"
