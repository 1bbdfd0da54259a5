"""``quic-supervisor``: the command line (serve, dial, get, ping, demo, journal, ctl, fleet).

One contract for every command: every option has help and shows its default in ``--help``;
``--version``; ``python -m supervisor`` is the same command. Library errors a user can cause (a
bad address, a path that cannot be validated, a server that does not answer, a file that is not
there) end the command with ONE line on stderr, ``quic-supervisor CMD: error: WHAT: FIX``, and
exit status 2, never a traceback or a raw OS error: they are answers, not crashes. Exit status 1
means the command ran but its check failed (bytes not verified, an HTTP error status); 0 means
everything checked out; 130 an interrupt (Ctrl-C), after a partial summary on stdout. SIGTERM
asks ``serve`` and ``dial`` for an orderly stop within ``--stop-timeout`` (``StopSignals``):
exit 0 when nothing was lost; a second SIGTERM stops at once.

Logging (``--log-level``, default warning): our own loggers (``quic_supervisor``,
``supervisor``, ``actors``, ``telemetry``) at that level on stderr; third-party libraries'
records (aioquic, asyncio, Ray, OpenTelemetry, ...) and Python warnings only with ``info`` or
``debug``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import errno
import functools
import hashlib
import importlib.metadata
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar
from urllib.parse import urlsplit

from aioquic.h3.connection import H3_ALPN

from actors.errors import DialTimeoutError, InvalidArgumentError, MigrationError
from actors.factory import MAX_PATHS
from supervisor.addresses import parse_quic_multiaddr, to_multiaddr
from supervisor.cli.ctl import add_ctl_commands, run_ctl_command
from supervisor.cli.demo import (
    DemoOptions,
    MigrationRecord,
    Rotator,
    TransferProgress,
    VerifiedEcho,
    caller_tracer,
    echo_handler,
    journal_stats,
    run_demo,
    self_signed_cert,
    stable_cert,
)
from supervisor.cli.fleet import add_fleet_commands, run_fleet_command
from supervisor.cli.tables import not_negative
from supervisor.core.config import NetworkPolicy, PathPolicy
from supervisor.core.events import EvtPeerAddressChanged
from supervisor.h3 import H3Error, H3Response, http3_get
from supervisor.libp2p.keys import Identity
from supervisor.libp2p.peer_calls import identify_peer, ping_peer
from supervisor.orchestration.network.netns import resolve_netns
from supervisor.orchestration.supervisor import Supervisor
from supervisor.remote.control import ControlServer
from telemetry.journal import JournalFormatError, journal_files, read_journal
from telemetry.otlp_json import OtlpJsonFileSpanExporter
from telemetry.providers import DropCountingSpanProcessor, Providers, build_providers_from_env
from telemetry.timeline import plot, record_time, render_text, select, start_time, untimed

__all__ = ["CliParser", "build_parser", "main"]

PROG = "quic-supervisor"
DEFAULT_LISTEN = "/ip4/127.0.0.1/udp/4433/quic-v1"

#: Errors that are the user's input or the network's answer: one line, exit 2.
USER_ERRORS = (MigrationError, H3Error, ValueError, OSError)

#: The protocol `serve --libp2p` echoes on (ping and identify come with every libp2p listener).
ECHO_PROTOCOL = "/echo/1.0.0"

#: Our loggers: shown at --log-level. Everything else is third-party: shown only at info/debug.
OWN_LOGGERS = ("quic_supervisor", "supervisor", "actors", "telemetry")

#: Ray logs through its own handler, not the root's, so the filter above never sees its
#: records: its token-authentication notice is silenced by this logger's level unless
#: --log-level is info or debug (``fleet`` also joins Ray at logging level ERROR then).
RAY_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"

log = logging.getLogger("quic_supervisor.cli")

T = TypeVar("T")


class UsageError(ValueError):
    """A combination of arguments that cannot work (exit 2, like argparse's own errors)."""


def package_version() -> str:
    """The installed distribution's version (``--version``)."""
    try:
        return importlib.metadata.version("quic-supervisor")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (or says it is required), unless the help
    already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            not action.option_strings
            or action.default is argparse.SUPPRESS
            or "default" in text.lower()
        ):
            return text
        if action.required:
            return text if "required" in text.lower() else f"{text} (required)"
        default = action.default
        if isinstance(default, bool):
            shown = "on" if default else "off"
        elif default is None or default == []:
            shown = "none"
        else:
            shown = "%(default)s"
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


class CliParser(argparse.ArgumentParser):
    """argparse with our contract: the help formatter above, and a usage error is one line,
    ``PROG CMD: error: WHAT: see PROG CMD --help``, exit 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:
        text = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {text}: see `{self.prog} --help`\n")


# ------------------------------------------------------------------------------ parser


def _global_flags(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Global flags, accepted before or after the subcommand."""
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--log-level",
        default=argparse.SUPPRESS if suppress else "warning",
        choices=["debug", "info", "warning", "error"],
        help="threshold of our own log messages on stderr; third-party libraries' logs and "
        "Python warnings (aioquic, asyncio, Ray) are shown only with info or debug "
        "(default: warning)",
    )
    parser.add_argument(
        "--qlog-dir",
        type=Path,
        default=default,
        metavar="DIR",
        help="write aioquic's qlog of each connection here, DIR/CONN_ID.qlog, for qvis "
        "(default: no qlog)",
    )
    parser.add_argument(
        "--trace-file",
        type=Path,
        default=default,
        metavar="FILE",
        help="also write every span here as OTLP JSON, one ExportTraceServiceRequest a line "
        "(default: spans go only where OTEL_TRACES_EXPORTER says)",
    )
    parser.add_argument(
        "--journal",
        type=Path,
        default=default,
        metavar="FILE",
        help="record every control message and event here, see `journal show|plot` "
        "(default: no journal)",
    )


def _tls_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--cafile",
        metavar="PEM",
        help="the CA (or self-signed certificate) to trust, e.g. the cert.pem of "
        "`serve --cert-dir` (default: the system's CAs)",
    )
    group.add_argument(
        "--insecure", action="store_true", help="do not verify the server's certificate"
    )


def _plain_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--plain",
        action="store_true",
        help=f"{what} as plain lines even on a terminal (they are plain lines anyway when "
        "stdout is not a terminal)",
    )


def _probe_timeout_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--probe-timeout",
        type=_positive,
        default=2.0,
        metavar="SECONDS",
        help="how long a path's probe waits for its PATH_RESPONSE",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog=PROG,
        description="Client-side QUIC connection migration, run as asyncio actors.",
        epilog="Exit status: 0 ok, 1 check failed, 2 usage or library error, 130 interrupted.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {package_version()}",
        help="print the version and exit",
    )
    _global_flags(parser, suppress=False)
    common = CliParser(add_help=False)
    _global_flags(common, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="run an echo server until SIGTERM (an orderly stop) or SIGINT",
        description="Echo every stream back. The first stdout line is 'listening on MULTIADDR'; "
        "the certificate clients should trust is named on stderr. SIGTERM stops in order: new "
        "clients are refused, open streams may finish within --stop-timeout, every connection "
        "is closed (NO_ERROR), one line says what was cut, exit 0. SIGINT closes at once.",
    )
    serve.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="MULTIADDR",
        help="address to listen on (port 0: any free port, printed)",
    )
    serve.add_argument(
        "--cert",
        metavar="PEM",
        help="certificate chain (default: a fresh self-signed one for localhost, in a "
        "temporary directory removed at exit; see --cert-dir for one that stays)",
    )
    serve.add_argument(
        "--key",
        metavar="FILE",
        help="the certificate's private key; with --libp2p the libp2p identity file, made "
        "(mode 0600) when missing (default: inside --cert, or generated)",
    )
    serve.add_argument(
        "--cert-dir",
        type=Path,
        metavar="DIR",
        help="keep a stable self-signed certificate for localhost in DIR (cert.pem, key.pem "
        "mode 0600): made once, reused after; clients use --cafile DIR/cert.pem "
        "(default: none)",
    )
    serve.add_argument("--alpn", default="echo", help="ALPN protocol(s), comma-separated")
    serve.add_argument(
        "--libp2p",
        action="store_true",
        help="a libp2p listener (ping, identify, echo on /echo/1.0.0); --key is then the "
        "libp2p identity file (made, mode 0600, when missing); prints its /p2p/ address",
    )
    _stop_timeout_flag(
        serve,
        "on SIGTERM, how long connections may finish their open streams (new clients are "
        "refused at once) before the rest are closed and their streams cut; 0: no waiting. "
        "A second SIGTERM or a SIGINT closes at once",
    )
    _control_flag(serve)
    serve.set_defaults(func=cmd_serve)

    dial = sub.add_parser(
        "dial",
        parents=[common],
        help="stream verified data through an echo server, migrating on a schedule",
        description="Write --bytes of deterministic data on one stream, check every echoed "
        "byte, and (with --migrate-every) move between the paths meanwhile. Shows progress "
        "(bytes, rate, ETA); Ctrl-C prints what was done so far and exits 130. SIGTERM stops "
        "in order: no new data, the echo of what was sent awaited (--stop-timeout), the "
        "connection closed, the usual summary; exit 0 when every byte sent was verified.",
    )
    dial.add_argument("addr", metavar="MULTIADDR", help="e.g. /ip4/127.0.0.1/udp/4433/quic-v1")
    dial.add_argument(
        "--path",
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="add a local path (repeatable), e.g. /ip4/127.0.0.2/udp/0/quic-v1",
    )
    dial.add_argument(
        "--migrate-every",
        type=_positive,
        metavar="SECONDS",
        help="rotate the active path among all paths on this schedule; paused while an "
        "operator (ctl/fleet migrate or drain) moves the connection (default: no schedule)",
    )
    dial.add_argument(
        "--operator-hold",
        type=_positive,
        metavar="SECONDS",
        help="with --migrate-every: how long the schedule stays paused after an operator's "
        "migration ended (default: 2 x --migrate-every, at least 5 s)",
    )
    dial.add_argument(
        "--bytes",
        type=_byte_count,
        default=10_000_000,
        metavar="N",
        help="bytes to send and verify; k/M/G suffixes (default: 10M)",
    )
    dial.add_argument("--alpn", default="echo", help="ALPN protocol(s), comma-separated")
    dial.add_argument("--server-name", default="localhost", help="TLS name to verify")
    _probe_timeout_flag(dial)
    dial.add_argument(
        "--timeout",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="bounds every wait for the server: the handshake, and any stretch without an "
        "echoed byte",
    )
    _plain_flag(dial, "progress")
    _stop_timeout_flag(
        dial,
        "on SIGTERM, how long to wait for the echo of the bytes already sent (no new ones "
        "are) before closing the connection; 0: no waiting. A second SIGTERM stops at once",
    )
    _network_flags(dial)
    _control_flag(dial)
    _tls_flags(dial)
    dial.set_defaults(func=cmd_dial)

    ping = sub.add_parser(
        "ping",
        parents=[common],
        help="ping a libp2p peer over QUIC, optionally migrating between pings",
        description="Dial /ip4/ADDR/udp/PORT/quic-v1/p2p/PEER_ID, check the peer's certificate "
        "proves that peer id, and ping it (/ipfs/ping/1.0.0); with --path and "
        "--migrate-after, the connection moves to the first --path after that many pings. "
        "Prints what the peer's identify says it observes of us before and after.",
    )
    ping.add_argument("addr", metavar="MULTIADDR", help="ends in /p2p/PEER_ID")
    ping.add_argument("-c", "--count", type=int, default=5, metavar="N", help="pings to send")
    ping.add_argument(
        "--interval", type=_positive, default=0.5, metavar="SECONDS", help="between pings"
    )
    ping.add_argument(
        "--path",
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="add a local path (repeatable)",
    )
    ping.add_argument(
        "--migrate-after",
        type=int,
        metavar="N",
        help="switch to the first --path after N pings (default: no migration)",
    )
    ping.add_argument(
        "--key",
        metavar="FILE",
        help="libp2p identity key file (made, Ed25519, mode 0600, when missing; default: a "
        "fresh identity)",
    )
    _probe_timeout_flag(ping)
    ping.add_argument(
        "--timeout",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="bounds every wait for the peer: the handshake, each ping and identify",
    )
    ping.set_defaults(func=cmd_ping)

    get = sub.add_parser(
        "get",
        parents=[common],
        help="HTTP/3 GET, optionally migrating mid-transfer",
        description="Prints status, bytes and sha256 of the body; shows progress (bytes, "
        "rate) meanwhile; Ctrl-C prints what arrived so far and exits 130.",
    )
    get.add_argument("url", metavar="URL", help="https://HOST[:PORT]/PATH")
    get.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="FILE",
        help="save the body here (default: only count and hash it)",
    )
    get.add_argument(
        "--path",
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="add a local path (repeatable), e.g. /ip4/127.0.0.2/udp/0/quic-v1",
    )
    get.add_argument(
        "--migrate-after",
        type=_positive,
        metavar="SECONDS",
        help="switch to the first --path this long after the request starts "
        "(default: no migration)",
    )
    get.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="add a request header (repeatable)",
    )
    _probe_timeout_flag(get)
    get.add_argument(
        "--timeout",
        type=_positive,
        default=60.0,
        metavar="SECONDS",
        help="bounds the whole request: handshake, path validation and the response",
    )
    _plain_flag(get, "progress")
    _tls_flags(get)
    get.set_defaults(func=cmd_get)

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="the main job: local echo server, two loopback paths, migrating back and forth",
    )
    demo.add_argument(
        "--duration", type=_positive, default=10.0, metavar="SECONDS", help="how long to stream"
    )
    demo.add_argument(
        "--interval", type=_positive, default=1.0, metavar="SECONDS", help="between migrations"
    )
    _plain_flag(demo, "the live table")
    demo.add_argument(
        "--second-path",
        default="/ip4/127.0.0.2/udp/0/quic-v1",
        metavar="MA",
        help="the second client path",
    )
    demo.set_defaults(func=cmd_demo)

    journal = sub.add_parser(
        "journal",
        help="read a journal written with --journal: a text timeline or a PNG",
        description="FILE's rotated backups (FILE.1, FILE.2, ...) are read too, oldest first.",
    )
    journal_sub = journal.add_subparsers(dest="journal_command", metavar="ACTION", required=True)
    show_cmd = journal_sub.add_parser(
        "show",
        help="print the timeline, one record per line (wrapped at 120 columns)",
        description="Times are seconds after the journal's first record. Filters combine "
        "(a record must pass all of them); repeat --conn or --type to accept several.",
    )
    show_cmd.add_argument("file", type=Path, metavar="FILE", help="the journal")
    show_cmd.add_argument(
        "--conn",
        action="append",
        default=[],
        metavar="ID",
        help="only this connection (its id as printed, or a prefix of it; default: all)",
    )
    show_cmd.add_argument(
        "--type",
        action="append",
        default=[],
        dest="types",
        metavar="TYPE",
        help="only records of this type, e.g. MigrationCompleted or "
        "EvtConnectionMigrationCompleted (default: all)",
    )
    show_cmd.add_argument(
        "--since",
        type=_journal_time,
        metavar="T",
        help=f"only records at or after T: {_JOURNAL_TIME_HELP} (default: from the start)",
    )
    show_cmd.add_argument(
        "--until",
        type=_journal_time,
        metavar="T",
        help=f"only records at or before T: {_JOURNAL_TIME_HELP} (default: to the end)",
    )
    show_cmd.add_argument(
        "--no-stats",
        action="store_true",
        help="hide the periodic Stats records (byte counters) (default: shown)",
    )
    show_cmd.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per record and line, every field in full (default: a table)",
    )
    show_cmd.set_defaults(func=cmd_journal_show, telemetry=False)
    plot_cmd = journal_sub.add_parser(
        "plot",
        help="draw it: a lane per path, probes, switches with reason and ms, tx/rx goodput, RTT",
    )
    plot_cmd.add_argument("file", type=Path, metavar="FILE", help="the journal")
    plot_cmd.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("timeline.png"),
        metavar="PNG",
        help="the image to write",
    )
    plot_cmd.add_argument(
        "--from",
        dest="start",
        type=_zoom_seconds,
        metavar="SECONDS",
        help="zoom: start the picture this many seconds after the journal's first record "
        "(default: 0)",
    )
    plot_cmd.add_argument(
        "--to",
        dest="end",
        type=_zoom_seconds,
        metavar="SECONDS",
        help="zoom: end it this many seconds after the first record (default: the last record)",
    )
    plot_cmd.set_defaults(func=cmd_journal_plot, telemetry=False)

    add_fleet_commands(sub)  # fleet ls|paths|network|drain|migrate, agent (supervisor/cli/fleet.py)
    add_ctl_commands(sub)  # ctl paths|stats|network|drain|migrate (supervisor/cli/ctl.py)
    return parser


def _network_flags(parser: argparse.ArgumentParser) -> None:
    """dial's network policy: auto-discovered paths, the namespace, the monitor."""
    parser.add_argument(
        "--auto-paths",
        action="append",
        default=[],
        metavar="DEVICE_OR_CIDR",
        help="add a path on each usable address of this interface (e.g. eth1), or in this "
        "prefix if it has a '/' (e.g. 10.0.0.0/8), as addresses come and go (repeatable)",
    )
    parser.add_argument(
        "--max-paths",
        type=int,
        metavar="N",
        help="with --auto-paths: at most N paths, the dialled one included (default: 2)",
    )
    parser.add_argument(
        "--netns",
        metavar="NAME",
        help="bind sockets and hear interface events in this network namespace (a name from "
        "`ip netns`, or a path; default: this process's)",
    )
    parser.add_argument(
        "--no-network-monitor",
        action="store_true",
        help="turn the network monitor off: no reactions to interface or route changes "
        "(it runs with --auto-paths)",
    )


def _control_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--control-socket",
        type=Path,
        metavar="PATH",
        help="serve a local control socket here (mode 0600) for `quic-supervisor ctl` "
        "(default: none)",
    )


def _stop_timeout_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--stop-timeout",
        type=not_negative,
        default=10.0,
        metavar="SECONDS",
        help=what,
    )


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _byte_count(text: str) -> int:
    units = {"k": 10**3, "m": 10**6, "g": 10**9}
    scale = units.get(text[-1:].lower(), 1)
    try:
        value = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


# ------------------------------------------------------------------------------ entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (the console script passes it to sys.exit)."""
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (status 2, one line)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if extras:  # named after the subcommand they were given to, not the top-level parser
        where = " ".join(
            [PROG]
            + [
                str(getattr(args, attr))
                for attr in ("command", "ctl_command", "fleet_command", "journal_command")
                if getattr(args, attr, None)
            ]
        )
        print(
            f"{where}: error: unrecognized arguments: {' '.join(extras)}: see `{where} --help`",
            file=sys.stderr,
        )
        return 2
    with _cli_logging(args.log_level):
        if hasattr(args, "_fleet_run"):
            return run_fleet_command(args)
        if hasattr(args, "_ctl_run"):
            return run_ctl_command(args)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    func: Callable[[argparse.Namespace], Any] = args.func
    providers: Providers | None = None
    #: Set by a command once it has something to summarise: printed if Ctrl-C ends it.
    args.partial_summary = None
    try:
        if getattr(args, "telemetry", True):
            providers = args.providers = _build_providers(args)
        return int(asyncio.run(func(args)))
    except KeyboardInterrupt:
        summary: Callable[[], str] | None = args.partial_summary
        if summary is not None:
            print(summary(), flush=True)
        return 130
    except BrokenPipeError:
        # The reader left (`journal show | head`): not an error, as for cat(1). Python would
        # complain again when it flushes stdout at exit, so stdout goes to /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left
    except (*USER_ERRORS, ImportError) as exc:
        log.debug("%s failed", args.command, exc_info=True)
        print(f"{PROG} {args.command}: error: {_error_line(exc, args)}", file=sys.stderr)
        return 2
    finally:
        if providers is not None:
            # Flush what is queued; bounded by the exporters' timeouts (a dead collector
            # costs at most OTEL_BSP_EXPORT_TIMEOUT per batch, never a hang).
            providers.shutdown()


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to the current ``sys.stderr`` (tests swap it) and only what the filter allows."""

    def __init__(self, level: int, verbose: bool) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.threshold = level
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.threshold:
            return False
        own = record.name.split(".", 1)[0] in OWN_LOGGERS
        return own or self.verbose

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


@contextlib.contextmanager
def _cli_logging(level_name: str) -> Iterator[None]:
    """Our loggers at ``level_name``; third-party logs and Python warnings only when it is
    info or debug. Everything is put back on exit (``main`` may run in-process, e.g. tests)."""
    level = getattr(logging, level_name.upper())
    verbose = level <= logging.INFO
    root = logging.getLogger()
    handler = _StderrHandler(level, verbose)
    saved_level = root.level
    ray_token = logging.getLogger(RAY_TOKEN_LOGGER)
    saved_ray_token = ray_token.level
    root.addHandler(handler)
    root.setLevel(level)
    if not verbose:
        ray_token.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        if verbose:
            logging.captureWarnings(True)
        else:
            warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.captureWarnings(False)
            root.removeHandler(handler)
            root.setLevel(saved_level)
            ray_token.setLevel(saved_ray_token)


def _build_providers(args: argparse.Namespace) -> Providers:
    """Providers from the OTEL_* variables, plus the --trace-file exporter (batched too)."""
    extra: list[DropCountingSpanProcessor] = []
    if getattr(args, "trace_file", None) is not None:
        extra.append(DropCountingSpanProcessor(OtlpJsonFileSpanExporter(args.trace_file)))
    try:
        return build_providers_from_env(extra_span_processors=extra)
    except BaseException:
        for processor in extra:
            processor.shutdown()
        raise


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (MigrationError, UsageError, JournalFormatError)):
        return text
    return f"{type(exc).__name__}: {text}"


#: What to do about an OS error, by errno (the WHAT is the file or address it concerns).
_OS_FIXES = {
    errno.ENOENT: "no such file or directory: check the path (its directory must exist)",
    errno.EACCES: "permission denied: choose a path you may use, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a path you may use, or fix its permissions",
    errno.EISDIR: "is a directory: give a file",
    errno.ENOTDIR: "a part of the path is not a directory: check the path",
    errno.EROFS: "read-only file system: choose a writable path",
    errno.ENOSPC: "no space left on the device: free some space, or choose another path",
    errno.EEXIST: "already exists: remove it, or choose another path",
    errno.EADDRINUSE: "address already in use: choose another port (0 lets the OS pick one), "
    "or stop what holds it",
    errno.EADDRNOTAVAIL: "address not available on this host: use one of its addresses",
    errno.ENETUNREACH: "network unreachable: check the routes to it",
    errno.EHOSTUNREACH: "host unreachable: check the routes to it",
    errno.ECONNREFUSED: "connection refused: check that it is running",
}

#: Flags whose value is a file or directory: an OS error about that file names the flag.
_FILE_FLAGS = {
    "qlog_dir": "--qlog-dir",
    "trace_file": "--trace-file",
    "journal": "--journal",
    "output": "--output",
    "control_socket": "--control-socket",
    "cert": "--cert",
    "key": "--key",
    "cert_dir": "--cert-dir",
    "cafile": "--cafile",
    "file": "FILE",
}


def _error_line(exc: BaseException, args: argparse.Namespace) -> str:
    """``WHAT: FIX`` for an error that ends a command: never a raw OS error or type name
    where we can say what it concerns and what to do."""
    if isinstance(exc, ImportError):
        return _missing_module(exc)
    if isinstance(exc, OSError) and not isinstance(exc, MigrationError):
        return _os_error(exc, args)
    return _one_line(exc)


def _os_error(exc: OSError, args: argparse.Namespace) -> str:
    if exc.errno is None or exc.strerror is None:  # raised with a message of its own
        text = " ".join(str(exc).split())
        return text or f"{type(exc).__name__}: check the system's state and retry"
    fix = _OS_FIXES.get(exc.errno, f"{exc.strerror.lower()}: check it and retry")
    filename = exc.filename
    if filename is None:
        return " ".join(exc.strerror.split()) if exc.errno not in _OS_FIXES else fix
    shown = os.fsdecode(filename) if isinstance(filename, bytes | os.PathLike) else str(filename)
    for attr, flag in _FILE_FLAGS.items():
        value = getattr(args, attr, None)
        if value is not None and _same_path(value, shown):
            return f"{flag} {shown}: {fix}"
    return f"{shown}: {fix}"


def _same_path(value: object, shown: str) -> bool:
    try:
        given = Path(os.fspath(value))  # type: ignore[call-overload]
    except TypeError:
        return False
    return given == Path(shown) or Path(shown) in given.parents or given in Path(shown).parents


def _missing_module(exc: ImportError) -> str:
    name = (exc.name or "").split(".", 1)[0]
    extra = {"rich": "cli", "matplotlib": "cli", "ray": "ray", "pyroute2": "netlink"}.get(name)
    if extra is None:
        return _one_line(exc)
    return (
        f"this command needs the Python package {name}, which is not installed: "
        f"pip install 'quic-supervisor[{extra}]'"
    )


def _supervisor_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The Supervisor's telemetry: providers built by main() from OTEL_*, journal, qlog."""
    providers: Providers | None = getattr(args, "providers", None)
    kwargs: dict[str, Any] = {}
    if providers is not None:
        kwargs["tracer_provider"] = providers.tracer_provider
        kwargs["meter_provider"] = providers.meter_provider
    if getattr(args, "journal", None) is not None:
        kwargs["journal"] = args.journal
    if getattr(args, "qlog_dir", None) is not None:
        kwargs["qlog_dir"] = args.qlog_dir
    return kwargs


def _network_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The Supervisor's ``network`` and ``netns`` from dial's flags.

    Checked here, before anything is bound, so a bad value is one line naming the flag.
    """
    kwargs: dict[str, Any] = {}
    if args.netns is not None:
        try:
            resolve_netns(args.netns)
        except InvalidArgumentError as exc:
            raise UsageError(f"--netns {args.netns!r}: {exc.reason}") from None
        kwargs["netns"] = args.netns
    if args.no_network_monitor:
        if args.auto_paths:
            raise UsageError(
                "--auto-paths needs the network monitor (it finds the addresses): "
                "drop --no-network-monitor"
            )
        kwargs["network"] = False
    if not args.auto_paths:
        if args.max_paths is not None:
            raise UsageError(
                "--max-paths needs --auto-paths (it caps what auto-discovery adds): add "
                "--auto-paths DEVICE_OR_CIDR, or drop --max-paths"
            )
        return kwargs
    devices: list[str] = []
    prefixes: list[str] = []
    for value in args.auto_paths:
        if "/" in value:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise UsageError(
                    f"--auto-paths {value!r} is not a CIDR prefix: give one such as "
                    "10.0.0.0/8 or fd00::/8, or an interface name such as eth1"
                ) from None
            prefixes.append(value)
        elif not 0 < len(value) < 16:
            raise UsageError(
                f"--auto-paths {value!r} is not an interface name (1-15 characters, e.g. "
                "eth1): give a device, or a CIDR prefix such as 10.0.0.0/8"
            )
        else:
            devices.append(value)
    max_paths = 2 if args.max_paths is None else args.max_paths
    if not 1 <= max_paths <= MAX_PATHS:
        raise UsageError(
            f"--max-paths {max_paths} is out of range: give 1 to {MAX_PATHS} (the dialled "
            "path counts, so 2 adds at most one path; default: 2)"
        )
    try:
        paths = PathPolicy(
            devices=tuple(dict.fromkeys(devices)),
            prefixes=tuple(dict.fromkeys(prefixes)),
            max_paths=max_paths,
        )
    except (ValueError, TypeError) as exc:  # anything the checks above did not foresee
        raise UsageError(f"--auto-paths/--max-paths: {_one_line(exc)}") from None
    kwargs["network"] = NetworkPolicy(paths=paths)
    return kwargs


def _migration_note(record: MigrationRecord) -> str | None:
    """The migration's trace id, when tracing is on (look it up in the tracing backend)."""
    return f"trace {record.trace_id}" if record.trace_id else None


# ------------------------------------------------------------------------------ serve


def _serve_credentials(
    args: argparse.Namespace, stack: contextlib.ExitStack
) -> tuple[str, str, str | None]:
    """(certfile, keyfile, what to tell the user once listening) from --cert/--key,
    --cert-dir, or a temporary self-signed pair. The notice waits for a successful listen, so
    that a failed one stays a single error line."""
    if args.cert_dir is not None:
        if args.cert is not None or args.key is not None:
            raise UsageError(
                "--cert-dir keeps its own certificate and key: give either --cert-dir or "
                "--cert/--key"
            )
        cert, key, how = stable_cert(args.cert_dir)
        notice = (
            f"{PROG} serve: {how} the certificate {cert} for localhost (key {key}, mode 0600); "
            f"clients: --cafile {cert}"
        )
        return str(cert), str(key), notice
    if args.cert is not None:
        return args.cert, args.key, None
    if args.key is not None:
        raise UsageError(
            "--key needs a certificate: give --cert too, or --cert-dir DIR for a kept pair"
        )
    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="qs-serve-"))
    cert, key = self_signed_cert(tmp)
    notice = (
        f"{PROG}: no --cert given: generated a self-signed certificate for localhost at "
        f"{cert} (clients: --cafile {cert}, or --insecure; --cert-dir DIR keeps one)"
    )
    return str(cert), str(key), notice


class StopSignals:
    """The stop signals of a long-running command, one handler for all: the first asks for a
    stop (``first`` says which), any later one for an immediate stop (``hurry``).

    Installed on the running loop for the ``with`` block; signals not given keep their
    handling (asyncio's SIGINT: KeyboardInterrupt, the partial summary, exit 130)."""

    def __init__(self, *signals: signal.Signals) -> None:
        self.signals = signals
        self.first: signal.Signals | None = None
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()
        self._installed: list[signal.Signals] = []

    def _received(self, sig: signal.Signals) -> None:
        if self.first is None:
            self.first = sig
            self.stop.set()
        else:
            self.hurry.set()

    def __enter__(self) -> StopSignals:
        loop = asyncio.get_running_loop()
        for sig in self.signals:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self._received, sig)
                self._installed.append(sig)
        return self

    def __exit__(self, *exc: object) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._installed:
            loop.remove_signal_handler(sig)
        self._installed.clear()

    async def unless_hurried(self, awaitable: Awaitable[T]) -> T | None:
        """Its result, or None when a later signal came first (it is then cancelled)."""
        task = asyncio.ensure_future(awaitable)
        hurry = asyncio.create_task(self.hurry.wait())
        try:
            await asyncio.wait({task, hurry}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurry.cancel()
            if not task.done():
                task.cancel()
            await asyncio.gather(task, hurry, return_exceptions=True)
        return None if task.cancelled() else task.result()


async def _serve_until_stopped(sup: Supervisor, signals: StopSignals, stop_timeout: float) -> None:
    """Serve until a signal; SIGTERM then stops in order (``Supervisor.shutdown``), saying so
    in two lines; SIGINT, or a second signal meanwhile, closes at once."""
    await signals.stop.wait()
    if signals.first != signal.SIGTERM:
        return  # SIGINT: closed at once by the Supervisor's exit
    count = len(sup.inbound_connections()) + len(sup.connections())
    print(f"stopping: {count} connection(s), deadline {stop_timeout:g} s", flush=True)
    report = await signals.unless_hurried(sup.shutdown(stop_timeout))
    if report is None:  # cancelled: shutdown() closed everything at once
        print("stopped at once: a second signal came before the deadline", flush=True)
        return
    print(
        f"stopped: {report.connections} closed, {report.streams_cut} streams cut in "
        f"{report.elapsed:.2f} s",
        flush=True,
    )


@contextlib.asynccontextmanager
async def _control(sup: Supervisor, path: Path | None) -> AsyncIterator[None]:
    """``--control-socket``: said on stderr once it listens; an OS error while opening it is
    one line naming the flag and the fix."""
    if path is None:
        yield
        return
    async with contextlib.AsyncExitStack() as stack:
        try:
            await stack.enter_async_context(ControlServer(sup, path))
        except OSError as exc:
            if isinstance(exc, MigrationError):
                raise
            reason = _os_error(exc, argparse.Namespace())
            raise UsageError(f"--control-socket {path}: {reason}") from None
        print(f"control socket at {path}", file=sys.stderr, flush=True)
        yield


async def cmd_serve(args: argparse.Namespace) -> int:
    parse_quic_multiaddr(args.listen, what="listen address")  # before making a certificate
    if args.libp2p:
        return await _serve_libp2p(args)
    with contextlib.ExitStack() as stack:
        certfile, keyfile, notice = _serve_credentials(args, stack)
        alpn = [a.strip() for a in args.alpn.split(",") if a.strip()]
        signals = stack.enter_context(StopSignals(signal.SIGTERM, signal.SIGINT))
        async with (
            Supervisor(**_supervisor_kwargs(args)) as sup,
            _control(sup, args.control_socket),
        ):
            listener = await sup.listen(
                args.listen,
                certfile=certfile,
                keyfile=keyfile,
                alpn_protocols=alpn,
                handler=echo_handler,
            )
            print(f"listening on {listener.multiaddr} (alpn {','.join(alpn)})", flush=True)
            if notice is not None:
                print(notice, file=sys.stderr, flush=True)
            async with _serving(sup, listener):
                await _serve_until_stopped(sup, signals, args.stop_timeout)
        log.info("stopped")
    return 0


def _identity_from(path: str | None) -> Identity | None:
    """The identity in ``path``, made there (0600) when the file does not exist yet."""
    if path is None:
        return None
    if Path(path).exists():
        return Identity.load(path)
    identity = Identity.generate()
    identity.save(path)
    print(f"{PROG}: made a new libp2p identity in {path} (mode 0600)", file=sys.stderr)
    return identity


async def _serve_libp2p(args: argparse.Namespace) -> int:
    if args.cert is not None or args.cert_dir is not None:
        raise UsageError(
            "--libp2p presents the identity's own certificate: leave out --cert/--cert-dir"
        )
    identity = _identity_from(args.key)
    with StopSignals(signal.SIGTERM, signal.SIGINT) as signals:
        async with (
            Supervisor(identity=identity, **_supervisor_kwargs(args)) as sup,
            _control(sup, args.control_socket),
        ):
            listener = await sup.listen(
                args.listen, libp2p=True, handlers={ECHO_PROTOCOL: echo_handler}
            )
            print(f"listening on {listener.multiaddr} (libp2p)", flush=True)
            async with _serving(sup, listener):
                await _serve_until_stopped(sup, signals, args.stop_timeout)
    return 0


async def cmd_ping(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise UsageError(f"--count must be at least 1, got {args.count}: give -c N with N >= 1")
    if args.migrate_after is not None and not args.path:
        raise UsageError("--migrate-after needs a --path to move to: add --path MULTIADDR")
    if args.migrate_after is not None and not 1 <= args.migrate_after < args.count:
        raise UsageError(
            f"--migrate-after must be between 1 and {args.count - 1} (--count - 1): move "
            "after an earlier ping, or raise --count"
        )
    identity = _identity_from(args.key)
    started = time.monotonic()
    sent = answered = 0

    def partial() -> str:
        return (
            f"interrupted after {time.monotonic() - started:.2f} s: {answered}/{sent} pings "
            "answered"
        )

    args.partial_summary = partial
    async with Supervisor(
        enable_experimental_connection_migration=True,
        identity=identity,
        **_supervisor_kwargs(args),
    ) as sup:
        t0 = time.perf_counter()
        conn = await _dial(sup, args.addr, args.timeout, timeout=args.timeout)
        took = time.perf_counter() - t0
        print(
            f"connected to {conn.remote_peer_id} in {took * 1000:.1f} ms "
            f"(libp2p TLS verified; we are {conn.local_peer_id})",
            flush=True,
        )
        mc = conn.as_migratable()
        await _add_paths(mc, args.path, args.probe_timeout)
        await _print_observed(conn, args.timeout)
        for n in range(1, args.count + 1):
            sent += 1
            try:
                async with asyncio.timeout(args.timeout):  # the stream's set-up and the round
                    (rtt,) = await ping_peer(conn, timeout=args.timeout)
                answered += 1
                print(
                    f"ping {n}: {rtt * 1000:.2f} ms via {mc.active_path().local_addr}",
                    flush=True,
                )
            except (ConnectionError, TimeoutError) as exc:
                print(f"ping {n}: no answer ({_no_answer(exc, args.timeout)})", flush=True)
            if n == args.migrate_after:
                target = next(
                    p for p in mc.paths() if str(p.local_addr) != str(mc.active_path().local_addr)
                )
                result = await target.switch(probe_timeout=args.probe_timeout)
                print(
                    f"migrated {result.from_addr} -> {result.to_addr} "
                    f"(confirmed in {result.confirmation_s * 1000:.2f} ms)",
                    flush=True,
                )
                await _print_observed(conn, args.timeout)
            if n < args.count:
                await asyncio.sleep(args.interval)  # the pace of pings, as ping(8) has
        await conn.close()
    print(f"{answered}/{args.count} pings answered")
    return 0 if answered == args.count else 1


async def _print_observed(conn: Any, timeout: float) -> None:
    """What the peer's identify says of us; a peer without identify is not an error."""
    try:
        async with asyncio.timeout(timeout):
            info = await identify_peer(conn, timeout=timeout)
    except (ConnectionError, TimeoutError) as exc:
        print(f"identify: no answer ({_no_answer(exc, timeout)})", flush=True)
        return
    print(f"peer observes us at {info.observed_addr} ({info.agent_version})", flush=True)


def _no_answer(exc: BaseException, timeout: float) -> str:
    """Why a ping or identify got no answer; a bare timeout names --timeout."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"nothing within --timeout {timeout:g} s"
    return _one_line(exc)


async def _log_connections(listener: Any) -> None:
    while True:
        conn = await listener.accept()
        log.info("connection %s from %s", conn.conn_id, conn.remote_multiaddr)


async def _print_peer_moves(sup: Supervisor) -> None:
    """One stdout line per change of a client's address (it migrated, or a NAT rebound it:
    the server cannot tell which), so that ``serve`` shows the other side of a migration."""
    async with sup.events.subscribe(EvtPeerAddressChanged) as moves:
        async for evt in moves:
            assert isinstance(evt, EvtPeerAddressChanged)
            print(
                f"connection {evt.conn_id}: peer moved {evt.old_remote_addr} -> "
                f"{evt.new_remote_addr}",
                flush=True,
            )


@contextlib.asynccontextmanager
async def _serving(sup: Supervisor, listener: Any) -> AsyncIterator[None]:
    """serve's companions while it listens: the connection log and the peer-move lines."""
    tasks = [
        asyncio.create_task(_log_connections(listener), name="accept"),
        asyncio.create_task(_print_peer_moves(sup), name="peer-moves"),
    ]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _dial(sup: Supervisor, addr: object, flag_value: float, **kwargs: Any) -> Any:
    """``sup.dial`` whose handshake timeout names --timeout (the CLI's knob) in its fix."""
    try:
        return await sup.dial(addr, **kwargs)
    except DialTimeoutError as exc:
        raise UsageError(
            f"no answer from {exc.addr} within --timeout {flag_value:g} s: check that a QUIC "
            "server listens there and that UDP to it is not filtered, or raise --timeout"
        ) from None


# ------------------------------------------------------------------------------ dial


async def _add_paths(mc: Any, paths: Sequence[str], timeout: float) -> None:
    for addr in paths:
        path = await mc.add_path(addr)
        await path.probe(timeout=timeout)
        rtt = path.info().rtt
        print(
            f"path {path.info().local_addr} validated"
            + (f" (probe RTT {rtt * 1000:.2f} ms)" if rtt is not None else ""),
            flush=True,
        )


def _print_migration(record: MigrationRecord) -> None:
    if record.ok:
        assert record.confirmation is not None
        line = (
            f"migration {record.number}: {record.from_addr} -> {record.to_addr} "
            f"confirmed in {record.confirmation * 1000:.2f} ms"
        )
    else:
        line = f"migration {record.number}: {record.from_addr} -> {record.to_addr} NOT done: "
        line += record.error or "?"
    extra = _migration_note(record)
    print(line + (f" {extra}" if extra else ""), flush=True)


def _live(args: argparse.Namespace) -> bool:
    """A rich progress bar only on a terminal, and not with --plain."""
    return not args.plain and sys.stdout.isatty()


async def _stall_guard(echoed: Callable[[], int], timeout: float) -> None:
    """Raise when no echoed byte arrived for ``timeout`` s (dial's --timeout bounds every wait
    for the server, not only the handshake). Runs until cancelled."""
    last, since = echoed(), time.monotonic()
    while True:
        await asyncio.sleep(min(1.0, timeout / 4))  # a check period, not a synchronisation
        now, seen = time.monotonic(), echoed()
        if seen != last:
            last, since = seen, now
        elif now - since >= timeout:
            raise UsageError(
                f"no echoed byte for --timeout {timeout:g} s ({seen:,} echoed so far): the "
                "server stopped answering; check it, or raise --timeout"
            )


async def cmd_dial(args: argparse.Namespace) -> int:
    if args.migrate_every is not None and not (args.path or args.auto_paths):
        raise UsageError(
            "--migrate-every needs another path to rotate to: add --path MULTIADDR "
            "(or --auto-paths)"
        )
    if args.operator_hold is not None and args.migrate_every is None:
        raise UsageError(
            "--operator-hold pauses the --migrate-every schedule, and there is none: add "
            "--migrate-every SECONDS, or drop --operator-hold"
        )
    network = _network_kwargs(args)
    started = time.monotonic()
    echo: VerifiedEcho | None = None
    rotator: Rotator | None = None

    def migrations() -> str:
        if rotator is None:
            return "migrations 0 confirmed, 0 not done"
        return f"migrations {rotator.succeeded} confirmed, {rotator.failed} not done"

    def partial() -> str:
        figures = (
            "nothing sent"
            if echo is None
            else f"sent {echo.sent:,} bytes, echoed {echo.echoed:,}, verified {echo.verified:,}"
        )
        return f"interrupted after {time.monotonic() - started:.2f} s: {figures}; {migrations()}"

    args.partial_summary = partial
    # SIGTERM only: SIGINT stays asyncio's (KeyboardInterrupt: the partial summary, 130).
    with StopSignals(signal.SIGTERM) as signals:
        async with (
            Supervisor(
                enable_experimental_connection_migration=True,
                **network,
                **_supervisor_kwargs(args),
            ) as sup,
            _control(sup, args.control_socket),
        ):
            conn = await _dial(
                sup,
                args.addr,
                args.timeout,
                alpn_protocols=[a for a in args.alpn.split(",") if a] or None,
                server_name=args.server_name,
                cafile=args.cafile,
                verify=not args.insecure,
                timeout=args.timeout,
            )
            mc = conn.as_migratable()
            print(f"connected {conn.local_multiaddr} -> {conn.remote_multiaddr}", flush=True)
            await _add_paths(mc, args.path, args.probe_timeout)
            echo = VerifiedEcho(await conn.open_stream())
            rotator = Rotator(
                mc,
                probe_timeout=args.probe_timeout,
                on_migration=_print_migration,
                tracer=caller_tracer(sup),
                events=sup.events,
                hold=args.operator_hold,
                on_operator=lambda line: print(line, flush=True),
            )
            live_echo, rotating = echo, rotator  # non-optional names for the closures below
            progress = TransferProgress("echoed", total=args.bytes, live=_live(args))

            def note() -> str:
                text = f"migrations {rotating.succeeded}"
                return text + (" (paused for the operator)" if rotating.paused else "")

            done = asyncio.Event()
            transfer: asyncio.Future[Any] = asyncio.gather(
                echo.write(total=args.bytes, stop=signals.stop), echo.read()
            )
            helpers = [
                asyncio.create_task(journal_stats(sup), name="journal-stats"),
                asyncio.create_task(progress.run(lambda: live_echo.echoed, note), name="progress"),
            ]
            guard: asyncio.Future[Any] = asyncio.create_task(
                _stall_guard(lambda: live_echo.echoed, args.timeout)
            )
            # Ends (the transfer is then cut) when --stop-timeout passed after a SIGTERM, or
            # at a second SIGTERM.
            stopping = asyncio.create_task(
                _dial_stopping(signals, done, live_echo, args.stop_timeout), name="stopping"
            )
            rotation = (
                asyncio.create_task(rotator.run(args.migrate_every, stop=done))
                if args.migrate_every is not None
                else None
            )
            try:
                await asyncio.wait({transfer, guard, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if guard.done():
                    guard.result()  # raises the stall
                if transfer.done():
                    transfer.result()
            finally:
                done.set()  # the rotation ends after its migration in progress, if any
                for task in (transfer, guard, stopping, *helpers):
                    task.cancel()
                await asyncio.gather(transfer, guard, stopping, *helpers, return_exceptions=True)
                outcome = (
                    await asyncio.gather(rotation, return_exceptions=True)
                    if rotation is not None
                    else [None]
                )
            if isinstance(outcome[0], Exception):
                raise outcome[0]
            if signals.hurry.is_set():
                print(partial(), flush=True)  # a second SIGTERM: no waiting for anything
                return 130
            await conn.close()
    elapsed = (echo.finished or time.monotonic()) - echo.started
    if signals.first is None:
        verdict = (
            "all verified" if echo.ok else f"NOT verified (first bad byte {echo.first_mismatch})"
        )
        ok = echo.ok
    else:
        verdict, ok = _stopped_verdict(echo, args.stop_timeout)
    print(
        f"sent {echo.sent:,} bytes, echoed {echo.echoed:,}, verified {echo.verified:,} "
        f"({verdict}); {migrations()}; {elapsed:.2f} s, {echo.throughput / 1e6:.2f} MB/s"
    )
    return 0 if ok else 1


async def _dial_stopping(
    signals: StopSignals, done: asyncio.Event, echo: VerifiedEcho, stop_timeout: float
) -> None:
    """After a SIGTERM: no new migration, one line, then return (cutting the transfer) when
    ``stop_timeout`` passed or at a second SIGTERM."""
    await signals.stop.wait()
    done.set()
    print(
        f"stopping: no new data; waiting up to {stop_timeout:g} s for the echo of "
        f"{echo.sent - echo.echoed:,} byte(s)",
        flush=True,
    )
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(stop_timeout):
            await signals.hurry.wait()


def _stopped_verdict(echo: VerifiedEcho, stop_timeout: float) -> tuple[str, bool]:
    """The summary's verdict after a SIGTERM, and whether it is a success: every byte sent
    came back intact (fewer than --bytes is what was asked for)."""
    if echo.first_mismatch is not None:
        return f"NOT verified (first bad byte {echo.first_mismatch}); stopped by SIGTERM", False
    if echo.verified == echo.sent == echo.echoed and echo.sent_sha.digest() == (
        echo.echo_sha.digest()
    ):
        return "all verified; stopped by SIGTERM", True
    return (
        f"NOT verified: {echo.sent - echo.echoed:,} bytes not echoed within --stop-timeout "
        f"{stop_timeout:g} s of the SIGTERM",
        False,
    )


# ------------------------------------------------------------------------------ get


def _parse_url(url: str) -> tuple[str, int, str, str]:
    """``https://host[:port]/path`` -> (host, port, path with query, authority)."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise UsageError(f"{url!r} is not an https URL: give https://HOST[:PORT]/PATH")
    try:
        port = parts.port or 443
    except ValueError:
        raise UsageError(f"bad port in URL {url!r}: give a number from 1 to 65535") from None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, port, path, parts.netloc


def _resolve(host: str, port: int, prefer_v6: bool) -> str:
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as exc:  # UnicodeError: not a valid DNS name
        why = exc.strerror if isinstance(exc, socket.gaierror) else "not a valid host name"
        raise UsageError(
            f"cannot resolve host {host!r} ({why}): check the name, or put an IP address in the URL"
        ) from None
    families = [socket.AF_INET6, socket.AF_INET] if prefer_v6 else [socket.AF_INET, socket.AF_INET6]
    for family in families:
        for info in infos:
            if info[0] == family:
                return str(info[4][0])
    raise UsageError(f"host {host!r} has no IPv4 or IPv6 address: put an IP address in the URL")


async def cmd_get(args: argparse.Namespace) -> int:
    host, port, url_path, authority = _parse_url(args.url)
    if args.migrate_after is not None and not args.path:
        raise UsageError("--migrate-after needs a --path to migrate to: add --path MULTIADDR")
    headers = []
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise UsageError(
                f"--header {item!r} is not 'NAME: VALUE': give e.g. --header 'accept: */*'"
            )
        headers.append((name.strip(), value.strip()))
    ip = _resolve(host, port, prefer_v6=any(p.startswith("/ip6/") for p in args.path))
    digest = hashlib.sha256()
    received = 0
    start = time.monotonic()
    rotator: Rotator | None = None

    def partial() -> str:
        moved = rotator.succeeded if rotator is not None else 0
        return (
            f"interrupted after {time.monotonic() - start:.2f} s: received {received:,} bytes "
            f"(incomplete: no sha256); migrations {moved}"
        )

    args.partial_summary = partial
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(args.output, "wb")) if args.output else None

        def sink(chunk: bytes) -> None:
            nonlocal received
            received += len(chunk)
            digest.update(chunk)
            if out is not None:
                out.write(chunk)

        async with Supervisor(
            enable_experimental_connection_migration=True, **_supervisor_kwargs(args)
        ) as sup:
            deadline = asyncio.timeout(args.timeout)  # bounds everything: handshake included
            phase = "handshake"
            try:
                async with deadline:
                    conn = await _dial(
                        sup,
                        to_multiaddr(ip, port),
                        args.timeout,
                        alpn_protocols=list(H3_ALPN),
                        server_name=host,
                        cafile=args.cafile,
                        verify=not args.insecure,
                        timeout=args.timeout,
                    )
                    phase = "path validation"
                    mc = conn.as_migratable()
                    await _add_paths(mc, args.path, args.probe_timeout)
                    phase = "response"
                    rotator = Rotator(
                        mc,
                        probe_timeout=args.probe_timeout,
                        on_migration=_print_migration,
                        tracer=caller_tracer(sup),
                    )
                    response, elapsed = await _get_body(
                        args, conn, rotator, url_path, authority, headers, sink, lambda: received
                    )
            except TimeoutError:
                if not deadline.expired():
                    raise
                raise UsageError(_get_timeout(args, phase, ip, port, received)) from None
            await conn.close()
    print(
        f"status {response.status}, {received:,} bytes, sha256 {digest.hexdigest()}, "
        f"{elapsed:.2f} s ({received / max(elapsed, 1e-9) / 1e6:.2f} MB/s), "
        f"migrations {rotator.succeeded}" + (f", saved to {args.output}" if args.output else "")
    )
    return 0 if response.status < 400 else 1


def _get_timeout(args: argparse.Namespace, phase: str, ip: str, port: int, received: int) -> str:
    if phase == "handshake":
        return (
            f"no answer from {to_multiaddr(ip, port)} within --timeout {args.timeout:g} s: "
            "check that an HTTP/3 server listens there and that UDP to it is not filtered, "
            "or raise --timeout"
        )
    if phase == "path validation":
        return (
            f"the --path(s) were not validated within --timeout {args.timeout:g} s: check "
            "them, or raise --timeout"
        )
    return (
        f"the response was not complete within --timeout {args.timeout:g} s ({received:,} "
        "bytes received): raise --timeout"
    )


async def _get_body(
    args: argparse.Namespace,
    conn: Any,
    rotator: Rotator,
    url_path: str,
    authority: str,
    headers: list[tuple[str, str]],
    sink: Callable[[bytes], None],
    received: Callable[[], int],
) -> tuple[H3Response, float]:
    """The request with its progress and the --migrate-after move: (response, seconds)."""
    start = time.monotonic()
    progress = TransferProgress("received", total=None, live=_live(args))
    shown = asyncio.create_task(
        progress.run(received, lambda: f"migrations {rotator.succeeded}"), name="progress"
    )
    migration = (
        asyncio.create_task(_migrate_after(rotator, args.migrate_after))
        if args.migrate_after is not None
        else None
    )
    complete = False
    try:
        response = await http3_get(
            conn,
            url_path,
            authority=authority,
            headers=headers,
            sink=sink,
            on_headers=functools.partial(_announce_length, progress),
        )
        complete = True
    finally:
        shown.cancel()
        await asyncio.gather(shown, return_exceptions=True)
        if migration is not None:
            if not migration.done():
                migration.cancel()
                if complete:
                    print("no migration: the body was complete before --migrate-after")
            with contextlib.suppress(asyncio.CancelledError):
                await migration
    return response, time.monotonic() - start


def _announce_length(progress: TransferProgress, headers: list[tuple[bytes, bytes]]) -> None:
    """The body's size from content-length, when the server gives one: bar and ETA."""
    length = dict(headers).get(b"content-length", b"")
    if length.isdigit():
        progress.total = int(length)


async def _migrate_after(rotator: Rotator, delay: float) -> None:
    await asyncio.sleep(delay)  # the user's schedule
    await rotator.migrate_once()


# ------------------------------------------------------------------------------ demo


async def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(force_terminal=False) if args.plain else Console()
    result = await run_demo(
        DemoOptions(
            duration=args.duration,
            interval=args.interval,
            second_path=args.second_path,
            live=False if args.plain else None,
        ),
        console,
        supervisor_kwargs=_supervisor_kwargs(args),
        on_migration=_migration_note,
    )
    return 0 if result.ok else 1


# ------------------------------------------------------------------------------ journal


_MAX_WARNINGS = 5


def _journal_records(path: Path) -> list[dict[str, Any]]:
    """The records of ``path`` and its rotated backups, oldest file first.

    A damaged record costs only itself (or, for corrupt bytes, the rest of its file): it is
    skipped with a one-line warning on stderr, so the rest of a flight record stays readable.
    """
    files = journal_files(path)
    if not files:
        raise UsageError(
            f"no journal at {path}: check the path (the file given to --journal; its rotated "
            "backups FILE.1, ... are read with it)"
        )
    problems: list[JournalFormatError] = []
    records = [
        record for file in files for record in read_journal(file, on_invalid=problems.append)
    ]
    for problem in problems[:_MAX_WARNINGS]:
        print(f"{PROG} journal: warning: skipped: {_one_line(problem)}", file=sys.stderr)
    if len(problems) > _MAX_WARNINGS:
        more = len(problems) - _MAX_WARNINGS
        print(f"{PROG} journal: warning: skipped {more} more bad record(s)", file=sys.stderr)
    return records


_JOURNAL_TIME_HELP = (
    "seconds after the journal's first record (e.g. 2.5) or an ISO 8601 time compared with "
    "the records' wall clock (e.g. 2026-12-04T10:00:05; local time unless it has an offset)"
)


def _journal_time(text: str) -> tuple[str, float, str]:
    """``--since``/``--until``: ("rel", seconds after the start, text) or ("wall", Unix time,
    text)."""
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds) or seconds < 0:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a time: give seconds >= 0 after the journal's start, e.g. 2.5"
            )
        return ("rel", seconds, text)
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: give seconds after the journal's start (e.g. 2.5) or an "
            "ISO 8601 time (e.g. 2026-12-04T10:00:05)"
        ) from None
    return ("wall", when.timestamp(), text)


def _zoom_seconds(text: str) -> float:
    """``--from``/``--to``: seconds after the journal's first record."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: give seconds >= 0 after the journal's first record, e.g. 2.5"
        )
    return seconds


def _bounds(args: argparse.Namespace) -> dict[str, float]:
    """The --since/--until of ``args`` as :func:`telemetry.timeline.select` arguments."""
    out: dict[str, float] = {}
    for flag in ("since", "until"):
        bound: tuple[str, float, str] | None = getattr(args, flag)
        if bound is not None:
            out[flag if bound[0] == "rel" else f"{flag}_wall"] = bound[1]
    for rel in ("", "_wall"):
        lo, hi = out.get(f"since{rel}"), out.get(f"until{rel}")
        if lo is not None and hi is not None and lo > hi:
            raise UsageError(
                f"--since {args.since[2]} is after --until {args.until[2]}: "
                "give a --since at or before --until"
            )
    return out


def _check_known(records: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """A --conn or --type that matches no record is a typo more often than a question: say
    what the journal has instead of printing nothing."""
    conns = sorted({str(r.get("conn")) for r in records if r.get("conn")})
    for wanted in args.conn:
        matches = [c for c in conns if c.startswith(wanted)]
        if not matches:
            have = ", ".join(conns[:8]) + (", ..." if len(conns) > 8 else "") or "none"
            raise UsageError(
                f"--conn {wanted}: no connection with that id in the journal: "
                f"give one of its ids ({have})"
            )
    types = sorted({str(r.get("type")) for r in records if r.get("type")})
    for wanted in args.types:
        if not select(records, types=[wanted]):
            raise UsageError(
                f"--type {wanted}: no record of that type in the journal: "
                f"give one of its types ({', '.join(types) or 'none'})"
            )


def _json_value(value: Any) -> Any:
    """JSON for what msgpack can hold that JSON cannot: bytes as hex, anything else as text."""
    return value.hex() if isinstance(value, bytes) else str(value)


async def cmd_journal_show(args: argparse.Namespace) -> int:
    records = _journal_records(args.file)
    _check_known(records, args)
    shown = select(
        records, conns=args.conn, types=args.types, stats=not args.no_stats, **_bounds(args)
    )
    t0 = start_time(records)
    if args.json:
        for record in shown:
            t = record_time(record)
            line = {"t": None if t is None or t0 is None else round(t - t0, 6), **record}
            sys.stdout.write(json.dumps(line, default=_json_value) + "\n")
        return 0
    sys.stdout.write(render_text(shown, t0=t0))
    hidden = len(records) - len(shown)
    if hidden:
        print(f"({hidden} of {len(records)} record(s) filtered out)")
    return 0


async def cmd_journal_plot(args: argparse.Namespace) -> int:
    if args.start is not None and args.end is not None and args.start >= args.end:
        raise UsageError(
            f"--from {args.start:g} is not before --to {args.end:g}: give --from < --to"
        )
    records = _journal_records(args.file)
    plot(records, args.output, start=args.start, end=args.end)
    skipped = untimed(records)
    note = f", {skipped} without a usable time not drawn" if skipped else ""
    print(f"wrote {args.output} ({len(records)} records{note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
