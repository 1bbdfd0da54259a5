"""``quic-supervisor``: the command line (serve, dial, get, demo).

Library errors a user can cause (a bad address, a path that cannot be validated, a server that
does not answer) end the command with one line on stderr and exit status 2, never a traceback:
they are answers, not crashes. Exit status 1 means the command ran but its check failed (bytes
not verified, an HTTP error status); 0 means everything checked out; 130 an interrupt.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aioquic.h3.connection import H3_ALPN
from rich.console import Console

from actors.errors import InvalidArgumentError, MigrationError
from actors.factory import MAX_PATHS
from supervisor.addresses import parse_quic_multiaddr, to_multiaddr
from supervisor.cli.ctl import add_ctl_commands, control_socket, run_ctl_command
from supervisor.cli.demo import (
    DemoOptions,
    MigrationRecord,
    Rotator,
    VerifiedEcho,
    caller_tracer,
    echo_handler,
    journal_stats,
    run_demo,
    self_signed_cert,
)
from supervisor.cli.fleet import add_fleet_commands, run_fleet_command
from supervisor.core.config import NetworkPolicy, PathPolicy
from supervisor.h3 import H3Error, http3_get
from supervisor.libp2p.keys import Identity
from supervisor.libp2p.peer_calls import identify_peer, ping_peer
from supervisor.orchestration.network.netns import resolve_netns
from supervisor.orchestration.supervisor import Supervisor
from telemetry.journal import JournalFormatError, journal_files, read_journal
from telemetry.otlp_json import OtlpJsonFileSpanExporter
from telemetry.providers import DropCountingSpanProcessor, Providers, build_providers_from_env
from telemetry.timeline import plot, render_text, untimed

__all__ = ["build_parser", "main"]

PROG = "quic-supervisor"
DEFAULT_LISTEN = "/ip4/127.0.0.1/udp/4433/quic-v1"

#: Errors that are the user's input or the network's answer: one line, exit 2.
USER_ERRORS = (MigrationError, H3Error, ValueError, OSError)

#: The protocol `serve --libp2p` echoes on (ping and identify come with every libp2p listener).
ECHO_PROTOCOL = "/echo/1.0.0"

log = logging.getLogger("quic_supervisor.cli")


class UsageError(ValueError):
    """A combination of arguments that cannot work (exit 2, like argparse's own errors)."""


# ------------------------------------------------------------------------------ parser


def _global_flags(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Global flags, accepted before or after the subcommand."""
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--log-level",
        default=argparse.SUPPRESS if suppress else "warning",
        choices=["debug", "info", "warning", "error"],
        help="logging threshold (stderr; default: warning)",
    )
    parser.add_argument(
        "--qlog-dir",
        type=Path,
        default=default,
        metavar="DIR",
        help="write aioquic's qlog of each connection here, DIR/CONN_ID.qlog (for qvis)",
    )
    parser.add_argument(
        "--trace-file",
        type=Path,
        default=default,
        metavar="FILE",
        help="also write every span here as OTLP JSON, one ExportTraceServiceRequest a line",
    )
    parser.add_argument(
        "--journal",
        type=Path,
        default=default,
        metavar="FILE",
        help="record every control message and event here (see `journal show|plot`)",
    )


def _tls_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cafile", help="PEM file of the CA (or self-signed cert) to trust")
    group.add_argument(
        "--insecure", action="store_true", help="do not verify the server's certificate"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Client-side QUIC connection migration, run as asyncio actors.",
        epilog="Exit status: 0 ok, 1 check failed, 2 usage or library error, 130 interrupted.",
    )
    _global_flags(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_flags(common, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="run an echo server until SIGINT/SIGTERM",
        description="Echo every stream back. The first stdout line is 'listening on MULTIADDR'.",
    )
    serve.add_argument("--listen", default=DEFAULT_LISTEN, metavar="MULTIADDR")
    serve.add_argument("--cert", help="PEM certificate (default: generate a self-signed one)")
    serve.add_argument("--key", help="PEM private key (default: inside --cert, or generated)")
    serve.add_argument("--alpn", default="echo", help="ALPN protocol(s), comma-separated")
    serve.add_argument(
        "--libp2p",
        action="store_true",
        help="a libp2p listener (ping, identify, echo on /echo/1.0.0); --key is then the "
        "libp2p identity file (made, mode 0600, when missing); prints its /p2p/ address",
    )
    _control_flag(serve)
    serve.set_defaults(func=cmd_serve)

    dial = sub.add_parser(
        "dial",
        parents=[common],
        help="stream verified data through an echo server, migrating on a schedule",
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
        help="rotate the active path among all paths on this schedule",
    )
    dial.add_argument("--bytes", type=_byte_count, default=10_000_000, metavar="N")
    dial.add_argument("--alpn", default="echo")
    dial.add_argument("--server-name", default="localhost", help="TLS name to verify")
    dial.add_argument("--probe-timeout", type=_positive, default=2.0, metavar="SECONDS")
    dial.add_argument("--timeout", type=_positive, default=10.0, help="handshake timeout (s)")
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
    ping.add_argument("-c", "--count", type=int, default=5, metavar="N", help="pings (default 5)")
    ping.add_argument(
        "--interval", type=_positive, default=0.5, metavar="SECONDS", help="between pings"
    )
    ping.add_argument("--path", action="append", default=[], metavar="MULTIADDR")
    ping.add_argument(
        "--migrate-after",
        type=int,
        metavar="N",
        help="switch to the first --path after N pings",
    )
    ping.add_argument(
        "--key",
        metavar="FILE",
        help="libp2p identity key file (made, Ed25519, mode 0600, when missing; default: a "
        "fresh identity)",
    )
    ping.add_argument("--probe-timeout", type=_positive, default=2.0, metavar="SECONDS")
    ping.add_argument("--timeout", type=_positive, default=10.0, help="handshake timeout (s)")
    ping.set_defaults(func=cmd_ping)

    get = sub.add_parser(
        "get",
        parents=[common],
        help="HTTP/3 GET, optionally migrating mid-transfer",
        description="Prints status, bytes and sha256 of the body.",
    )
    get.add_argument("url", metavar="URL", help="https://HOST[:PORT]/PATH")
    get.add_argument("-o", "--output", type=Path, metavar="FILE", help="save the body here")
    get.add_argument("--path", action="append", default=[], metavar="MULTIADDR")
    get.add_argument(
        "--migrate-after",
        type=_positive,
        metavar="SECONDS",
        help="switch to the first --path this long after the request starts",
    )
    get.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'")
    get.add_argument("--probe-timeout", type=_positive, default=2.0, metavar="SECONDS")
    get.add_argument("--timeout", type=_positive, default=60.0, help="whole request (s)")
    _tls_flags(get)
    get.set_defaults(func=cmd_get)

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="the main job: local echo server, two loopback paths, migrating back and forth",
    )
    demo.add_argument("--duration", type=_positive, default=10.0, metavar="SECONDS")
    demo.add_argument("--interval", type=_positive, default=1.0, metavar="SECONDS")
    demo.add_argument(
        "--plain", action="store_true", help="progress lines instead of the live table"
    )
    demo.add_argument("--second-path", default="/ip4/127.0.0.2/udp/0/quic-v1", metavar="MA")
    demo.set_defaults(func=cmd_demo)

    journal = sub.add_parser(
        "journal",
        help="read a journal written with --journal: a text timeline or a PNG",
        description="FILE's rotated backups (FILE.1, FILE.2, ...) are read too, oldest first.",
    )
    journal_sub = journal.add_subparsers(dest="journal_command", metavar="ACTION", required=True)
    show_cmd = journal_sub.add_parser("show", help="print the timeline, one line per record")
    show_cmd.add_argument("file", type=Path, metavar="FILE")
    show_cmd.set_defaults(func=cmd_journal_show, telemetry=False)
    plot_cmd = journal_sub.add_parser(
        "plot", help="draw it: a lane per path, probes, switches, rollbacks, throughput"
    )
    plot_cmd.add_argument("file", type=Path, metavar="FILE")
    plot_cmd.add_argument("-o", "--output", type=Path, default=Path("timeline.png"), metavar="PNG")
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
        help="serve a local control socket here (mode 0600) for `quic-supervisor ctl`",
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
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or argparse's own usage error (status 2)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if hasattr(args, "_fleet_run"):
        return run_fleet_command(args)
    if hasattr(args, "_ctl_run"):
        return run_ctl_command(args)
    func: Callable[[argparse.Namespace], Any] = args.func
    providers: Providers | None = None
    try:
        if getattr(args, "telemetry", True):
            providers = args.providers = _build_providers(args)
        return int(asyncio.run(func(args)))
    except KeyboardInterrupt:
        return 130
    except (*USER_ERRORS, ImportError) as exc:
        log.debug("%s failed", args.command, exc_info=True)
        print(f"{PROG} {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    finally:
        if providers is not None:
            # Flush what is queued; bounded by the exporters' timeouts (a dead collector
            # costs at most OTEL_BSP_EXPORT_TIMEOUT per batch, never a hang).
            providers.shutdown()


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
            raise UsageError("--max-paths needs --auto-paths (it caps what auto-discovery adds)")
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


async def cmd_serve(args: argparse.Namespace) -> int:
    parse_quic_multiaddr(args.listen, what="listen address")  # before making a certificate
    if args.libp2p:
        return await _serve_libp2p(args)
    with contextlib.ExitStack() as stack:
        certfile, keyfile = args.cert, args.key
        if certfile is None:
            if keyfile is not None:
                raise UsageError("--key needs --cert")
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="qs-serve-"))
            cert, key = self_signed_cert(tmp)
            certfile, keyfile = str(cert), str(key)
            print(
                f"{PROG}: no --cert given: generated a self-signed certificate for localhost at "
                f"{certfile} (clients: --cafile {certfile}, or --insecure)",
                file=sys.stderr,
            )
        alpn = [a.strip() for a in args.alpn.split(",") if a.strip()]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
                stack.callback(loop.remove_signal_handler, sig)
        async with (
            Supervisor(**_supervisor_kwargs(args)) as sup,
            control_socket(sup, args.control_socket),
        ):
            listener = await sup.listen(
                args.listen,
                certfile=certfile,
                keyfile=keyfile,
                alpn_protocols=alpn,
                handler=echo_handler,
            )
            print(f"listening on {listener.multiaddr} (alpn {','.join(alpn)})", flush=True)
            accepted = asyncio.create_task(_log_connections(listener))
            try:
                await stop.wait()
            finally:
                accepted.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await accepted
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
    if args.cert is not None:
        raise UsageError("--libp2p presents the identity's own certificate: leave out --cert")
    identity = _identity_from(args.key)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.ExitStack() as stack:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
                stack.callback(loop.remove_signal_handler, sig)
        async with (
            Supervisor(identity=identity, **_supervisor_kwargs(args)) as sup,
            control_socket(sup, args.control_socket),
        ):
            listener = await sup.listen(
                args.listen, libp2p=True, handlers={ECHO_PROTOCOL: echo_handler}
            )
            print(f"listening on {listener.multiaddr} (libp2p)", flush=True)
            accepted = asyncio.create_task(_log_connections(listener))
            try:
                await stop.wait()
            finally:
                accepted.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await accepted
    return 0


async def cmd_ping(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise UsageError("--count must be at least 1")
    if args.migrate_after is not None and not args.path:
        raise UsageError("--migrate-after needs a --path to move to")
    if args.migrate_after is not None and not 1 <= args.migrate_after < args.count:
        raise UsageError(f"--migrate-after must be between 1 and {args.count - 1} (--count - 1)")
    identity = _identity_from(args.key)
    async with Supervisor(
        enable_experimental_connection_migration=True,
        identity=identity,
        **_supervisor_kwargs(args),
    ) as sup:
        started = time.perf_counter()
        conn = await sup.dial(args.addr, timeout=args.timeout)
        took = time.perf_counter() - started
        print(
            f"connected to {conn.remote_peer_id} in {took * 1000:.1f} ms "
            f"(libp2p TLS verified; we are {conn.local_peer_id})",
            flush=True,
        )
        mc = conn.as_migratable()
        await _add_paths(mc, args.path, args.probe_timeout)
        await _print_observed(conn)
        failed = 0
        for n in range(1, args.count + 1):
            try:
                (rtt,) = await ping_peer(conn)
                print(
                    f"ping {n}: {rtt * 1000:.2f} ms via {mc.active_path().local_addr}",
                    flush=True,
                )
            except (ConnectionError, TimeoutError) as exc:
                failed += 1
                print(f"ping {n}: no answer ({_one_line(exc)})", flush=True)
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
                await _print_observed(conn)
            if n < args.count:
                await asyncio.sleep(args.interval)  # the pace of pings, as ping(8) has
        await conn.close()
    print(f"{args.count - failed}/{args.count} pings answered")
    return 0 if failed == 0 else 1


async def _print_observed(conn: Any) -> None:
    """What the peer's identify says of us; a peer without identify is not an error."""
    try:
        info = await identify_peer(conn)
    except (ConnectionError, TimeoutError) as exc:
        print(f"identify: no answer ({_one_line(exc)})", flush=True)
        return
    print(f"peer observes us at {info.observed_addr} ({info.agent_version})", flush=True)


async def _log_connections(listener: Any) -> None:
    while True:
        conn = await listener.accept()
        log.info("connection %s from %s", conn.conn_id, conn.remote_multiaddr)


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


async def cmd_dial(args: argparse.Namespace) -> int:
    if args.migrate_every is not None and not (args.path or args.auto_paths):
        raise UsageError("--migrate-every needs at least one --path (or --auto-paths) to rotate to")
    network = _network_kwargs(args)
    async with (
        Supervisor(
            enable_experimental_connection_migration=True,
            **network,
            **_supervisor_kwargs(args),
        ) as sup,
        control_socket(sup, args.control_socket),
    ):
        conn = await sup.dial(
            args.addr,
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
        )
        done = asyncio.Event()
        tasks = [
            asyncio.create_task(echo.write(total=args.bytes)),
            asyncio.create_task(echo.read()),
        ]
        stats = asyncio.create_task(journal_stats(sup), name="journal-stats")
        if args.migrate_every is not None:
            tasks.append(asyncio.create_task(rotator.run(args.migrate_every, stop=done)))
        try:
            await asyncio.gather(*tasks[:2])
        finally:
            done.set()  # the rotation ends after its migration in progress, if any
            for task in [*tasks[:2], stats]:
                task.cancel()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(stats, return_exceptions=True)
        for outcome in outcomes[2:]:
            if isinstance(outcome, Exception):
                raise outcome
        await conn.close()
    elapsed = (echo.finished or time.monotonic()) - echo.started
    verdict = "all verified" if echo.ok else f"NOT verified (first bad byte {echo.first_mismatch})"
    print(
        f"sent {echo.sent:,} bytes, echoed {echo.echoed:,}, verified {echo.verified:,} "
        f"({verdict}); migrations {rotator.succeeded} confirmed, {rotator.failed} not done; "
        f"{elapsed:.2f} s, {echo.throughput / 1e6:.2f} MB/s"
    )
    return 0 if echo.ok else 1


# ------------------------------------------------------------------------------ get


def _parse_url(url: str) -> tuple[str, int, str, str]:
    """``https://host[:port]/path`` -> (host, port, path with query, authority)."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise UsageError(f"URL must look like https://HOST[:PORT]/PATH, got {url!r}")
    try:
        port = parts.port or 443
    except ValueError:
        raise UsageError(f"bad port in URL {url!r}") from None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, port, path, parts.netloc


def _resolve(host: str, port: int, prefer_v6: bool) -> str:
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    families = [socket.AF_INET6, socket.AF_INET] if prefer_v6 else [socket.AF_INET, socket.AF_INET6]
    for family in families:
        for info in infos:
            if info[0] == family:
                return str(info[4][0])
    raise OSError(f"cannot resolve {host!r}")


async def cmd_get(args: argparse.Namespace) -> int:
    host, port, url_path, authority = _parse_url(args.url)
    if args.migrate_after is not None and not args.path:
        raise UsageError("--migrate-after needs a --path to migrate to")
    headers = []
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"--header must be 'NAME: VALUE', got {item!r}")
        headers.append((name.strip(), value.strip()))
    ip = _resolve(host, port, prefer_v6=any(p.startswith("/ip6/") for p in args.path))
    digest = hashlib.sha256()
    received = 0
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
            conn = await sup.dial(
                to_multiaddr(ip, port),
                alpn_protocols=list(H3_ALPN),
                server_name=host,
                cafile=args.cafile,
                verify=not args.insecure,
            )
            mc = conn.as_migratable()
            await _add_paths(mc, args.path, args.probe_timeout)
            rotator = Rotator(
                mc,
                probe_timeout=args.probe_timeout,
                on_migration=_print_migration,
                tracer=caller_tracer(sup),
            )
            start = time.monotonic()
            migration = (
                asyncio.create_task(_migrate_after(rotator, args.migrate_after))
                if args.migrate_after is not None
                else None
            )
            try:
                async with asyncio.timeout(args.timeout):
                    response = await http3_get(
                        conn, url_path, authority=authority, headers=headers, sink=sink
                    )
            finally:
                if migration is not None:
                    if not migration.done():
                        migration.cancel()
                        print("no migration: the body was complete before --migrate-after")
                    with contextlib.suppress(asyncio.CancelledError):
                        await migration
            elapsed = time.monotonic() - start
            await conn.close()
    print(
        f"status {response.status}, {received:,} bytes, sha256 {digest.hexdigest()}, "
        f"{elapsed:.2f} s ({received / max(elapsed, 1e-9) / 1e6:.2f} MB/s), "
        f"migrations {rotator.succeeded}" + (f", saved to {args.output}" if args.output else "")
    )
    return 0 if response.status < 400 else 1


async def _migrate_after(rotator: Rotator, delay: float) -> None:
    await asyncio.sleep(delay)  # the user's schedule
    await rotator.migrate_once()


# ------------------------------------------------------------------------------ demo


async def cmd_demo(args: argparse.Namespace) -> int:
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
        raise FileNotFoundError(f"no journal at {path}")
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


async def cmd_journal_show(args: argparse.Namespace) -> int:
    sys.stdout.write(render_text(_journal_records(args.file)))
    return 0


async def cmd_journal_plot(args: argparse.Namespace) -> int:
    records = _journal_records(args.file)
    plot(records, args.output)
    skipped = untimed(records)
    note = f", {skipped} without a usable time not drawn" if skipped else ""
    print(f"wrote {args.output} ({len(records)} records{note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
