"""``quic-supervisor ctl paths|stats|network|drain|migrate|health|stop``: drive a running
supervisor via its control socket.

Wired into the main CLI by ``add_ctl_commands(subparsers)`` + ``run_ctl_command(args)``. The
supervisor side is ``serve``/``dial --control-socket PATH`` (:func:`control_socket`), or any
program that runs ``ControlServer(sup, PATH)``. The arguments, tables, lines and errors are
those of ``quic-supervisor fleet`` (:mod:`supervisor.cli.tables`): ``fleet`` shows per agent
what ``ctl`` shows for its one supervisor.

Exit status: 0 done, 1 a drain left some connection on the drained address, 2 a usage error or
an error the supervisor answered with (one line on stderr, ``quic-supervisor ctl CMD: error:
WHAT: FIX``), 130 interrupted. ``health`` is a probe (kubelet's exec probes call it): 0 healthy,
1 not or no answer at all, one line on stdout saying why.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table

from actors.errors import MigrationError
from actors.path_state import PathState
from supervisor.cli.tables import (
    IdError,
    add_deadline_argument,
    add_drain_arguments,
    add_health_choice,
    add_json,
    add_log_level,
    add_migrate_arguments,
    add_timeout,
    drain_json,
    drain_lines,
    health_line,
    health_ok,
    make_console,
    migrate_line,
    one_line,
    paths_table,
    resolve_id,
    snapshot_json,
    stats_json,
    stop_json,
    stop_line,
)
from supervisor.core.messages import ConnectionSnapshot
from supervisor.orchestration.network.monitor import NetworkStatus, PeerRoute
from supervisor.remote.control import ControlClient, ControlServer
from supervisor.remote.protocol import RemoteError

if TYPE_CHECKING:
    from supervisor.orchestration.supervisor import Supervisor

__all__ = [
    "add_ctl_commands",
    "control_socket",
    "network_data",
    "paths_by_interface",
    "print_network",
    "run_ctl_command",
]

PROG = "quic-supervisor ctl"

#: The user's input or the supervisor's answer: one line, exit 2 (bugs still get a traceback).
_USER_ERRORS = (MigrationError, IdError, ValueError, TypeError, OSError, RemoteError)


def control_socket(
    sup: Supervisor, path: str | os.PathLike[str] | None
) -> AbstractAsyncContextManager[object]:
    """A :class:`ControlServer` for ``--control-socket PATH``, or nothing when not given."""
    if path is None:
        return contextlib.nullcontext()
    print(f"control socket at {os.fspath(path)}", file=sys.stderr, flush=True)
    return ControlServer(sup, path)


def _socket_flag(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """``--socket``, accepted before or after the ctl subcommand."""
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=argparse.SUPPRESS if suppress else os.environ.get("QUIC_SUPERVISOR_SOCKET"),
        help="the supervisor's --control-socket (default: $QUIC_SUPERVISOR_SOCKET)",
    )


def _command(sub: Any, name: str, run: Callable[..., Awaitable[int]], **kw: Any) -> Any:
    """A ctl subcommand with the flags every one takes: --socket, --timeout, --json."""
    parser = sub.add_parser(name, **kw)
    _socket_flag(parser, suppress=True)
    add_timeout(parser, "the control socket")
    add_json(parser)
    add_log_level(parser)
    parser.set_defaults(_ctl_run=run)
    return parser


def add_ctl_commands(subparsers: Any) -> None:
    """Add ``ctl`` (with paths/stats/network/drain/migrate) to a subparsers object."""
    ctl = subparsers.add_parser(
        "ctl",
        help="drive a running supervisor through its control socket",
        description="List paths or the network, drain an address or interface, or migrate one "
        "connection of a running `serve`/`dial --control-socket PATH`. The same commands, "
        "arguments and tables as `quic-supervisor fleet`, for one supervisor.",
    )
    _socket_flag(ctl, suppress=False)
    sub = ctl.add_subparsers(dest="ctl_command", metavar="COMMAND", required=True)

    _command(sub, "paths", _paths, help="every connection and its paths")
    _command(
        sub, "stats", _stats, help="how the supervisor's migrations ended: success rate, outcomes"
    )
    _command(
        sub,
        "network",
        _network,
        help="what the network monitor sees: interfaces, routes, paths per interface",
        description="Interfaces (link, MTU, addresses, paths on them), default routes, the "
        "kernel's route to each peer, and what the network policy did. When the monitor is "
        "not running, says why (exit 0).",
    )
    drain = _command(
        sub,
        "drain",
        _drain,
        help="move every connection off a local address or interface",
        description="Each connection whose active path is there switches to its best other "
        "path; the drained path is then closed (--keep-drained keeps it). Exit 1 when some "
        "connection could not be moved (listed as FAILED).",
    )
    add_drain_arguments(drain)
    migrate = _command(
        sub,
        "migrate",
        _migrate,
        help="switch one connection to the path on a local address (added when missing)",
    )
    add_migrate_arguments(migrate)
    health = _command(
        sub,
        "health",
        _health,
        help="is the supervisor ready and live? (exit 0 yes, 1 no: a probe)",
        description="Ready: started, desired state restored (an agent), not stopping. Live: its "
        "event loop answers. Exit 1, with one line saying why, when the asked state does not "
        "hold or the socket does not answer within --timeout.",
    )
    add_health_choice(health)
    stop = _command(
        sub,
        "stop",
        _stop,
        help="stop a Ray agent in order: not ready, streams finish or the deadline, closed",
        description="The agent behind the socket (`agent --control-socket`) turns not ready, "
        "its listeners stop accepting, its connections run until no stream is open or "
        "--deadline, then every one is closed with CONNECTION_CLOSE. Its desired state is kept. "
        "This is the pod's preStop.",
    )
    add_deadline_argument(stop)


def run_ctl_command(args: argparse.Namespace) -> int:
    """Run the command ``add_ctl_commands`` parsed; returns the exit status."""
    run: Callable[[argparse.Namespace, ControlClient], Awaitable[int]] = args._ctl_run
    where = f"{PROG} {args.ctl_command}"
    if not args.socket:
        print(
            f"{where}: error: no control socket given: pass --socket PATH (the supervisor's "
            "--control-socket) or set QUIC_SUPERVISOR_SOCKET",
            file=sys.stderr,
        )
        return 2

    async def main() -> int:
        async with ControlClient(args.socket, timeout=args.timeout) as client:
            return await run(args, client)

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 130
    except TimeoutError:
        print(
            f"{where}: error: the supervisor at {args.socket} did not answer within "
            f"{args.timeout:g} s: raise --timeout, or check that its process is running "
            "(not stopped)",
            file=sys.stderr,
        )
        return 2
    except _USER_ERRORS as exc:
        print(f"{where}: error: {one_line(exc)}", file=sys.stderr)
        return 2


# -- commands -------------------------------------------------------------------------------------


def _json(data: object) -> None:
    print(json.dumps(data, indent=2, default=str))


async def _stats(args: argparse.Namespace, client: ControlClient) -> int:
    stats = await client.migration_stats()
    if args.json:
        _json(stats_json(stats))
    else:
        print(stats.summary())
    return 0


async def _paths(args: argparse.Namespace, client: ControlClient) -> int:
    snaps = await client.snapshot()
    if args.json:
        _json([snapshot_json(s) for s in snaps])
    elif not snaps:
        print("no connections")
    else:
        make_console().print(paths_table(snaps))
    return 0


async def _drain(args: argparse.Namespace, client: ControlClient) -> int:
    report = await client.drain(
        local_addr=args.local_addr,
        device=args.device,
        probe_timeout=args.probe_timeout,
        close_drained=not args.keep_drained,
    )
    if args.json:
        _json(drain_json(report))
    else:
        print("\n".join(drain_lines(report)))
    return 0 if report.ok else 1


async def _migrate(args: argparse.Namespace, client: ControlClient) -> int:
    known = [s.conn_id for s in await client.snapshot()]
    conn_id = resolve_id(
        args.conn_id, known, what="connection", listing="quic-supervisor ctl paths"
    )
    snap = await client.migrate(conn_id, args.to, probe_timeout=args.probe_timeout)
    if args.json:
        _json(snapshot_json(snap))
    else:
        print(migrate_line(snap))
    return 0


async def _health(args: argparse.Namespace, client: ControlClient) -> int:
    which = "ready" if args.ready else "live" if args.live else "both"
    try:
        health = await client.health()
    except Exception as exc:  # a probe: no answer is an answer (exit 1), never a traceback
        if isinstance(exc, TimeoutError):
            text = f"no answer within {args.timeout:g} s"
        else:
            text = one_line(exc)
        print(f"NOT HEALTHY: {text}")
        return 1
    if args.json:
        _json(dataclasses.asdict(health))
    else:
        print(health_line(health, which))
    return 0 if health_ok(health, which) else 1


async def _stop(args: argparse.Namespace, client: ControlClient) -> int:
    report = await client.stop(args.deadline)
    if args.json:
        _json(stop_json(report))
    else:
        print(stop_line(report))
    return 0


async def _network(args: argparse.Namespace, client: ControlClient) -> int:
    status = await client.network_status()
    snaps = await client.snapshot() if status.available else ()
    if args.json:
        _json(network_data(status, snaps))
    else:
        print_network(make_console(), status, snaps)
    return 0


# -- network status: shared by `ctl network` and `fleet network` ------------------------------


_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def _bare_ip(text: str) -> _IP | None:
    """The IP of a path's local multiaddr (scope id dropped)."""
    parts = text.split("/")
    try:
        return ipaddress.ip_address(parts[2].partition("%")[0]) if len(parts) > 2 else None
    except ValueError:
        return None


def _interface_of(ip: _IP, owners: list[tuple[_Net, _IP, str]]) -> str | None:
    """The interface holding ``ip``; else the one whose prefix holds it, longest first
    (127.0.0.2 is local through lo's 127.0.0.1/8)."""
    for _, address, name in owners:
        if address == ip:
            return name
    inside = [(net.prefixlen, name) for net, _, name in owners if ip in net]
    return max(inside)[1] if inside else None


def paths_by_interface(
    status: NetworkStatus, snaps: Sequence[ConnectionSnapshot]
) -> dict[str, dict[str, int]]:
    """Open paths of open connections counted per interface: ``{name: {paths, active}}``.

    A path belongs to the interface holding its local address or, failing that, the prefix
    it lies in (the monitor's inventory); else to the device its socket is bound to; else to
    ``"-"`` (an address no interface has any more: a path the network took away).
    """
    owners: list[tuple[_Net, _IP, str]] = []
    for iface in status.interfaces:
        for address in iface.addresses:  # "10.0.0.2/24", "fe80::1/64 tentative"
            with contextlib.suppress(ValueError):
                found = ipaddress.ip_interface(address.partition(" ")[0])
                owners.append((found.network, found.ip, iface.name))
    counts: dict[str, dict[str, int]] = {}
    for snap in snaps:
        if snap.closed:
            continue
        for p in snap.paths:
            if p.state is PathState.CLOSED:
                continue
            ip = _bare_ip(p.local_addr)
            name = (_interface_of(ip, owners) if ip is not None else None) or p.device or "-"
            row = counts.setdefault(name, {"paths": 0, "active": 0})
            row["paths"] += 1
            row["active"] += int(p.active)
    return counts


def network_data(status: NetworkStatus, snaps: Sequence[ConnectionSnapshot]) -> dict[str, Any]:
    """``--json``: the status as plain data, plus the paths counted per interface."""
    return {**dataclasses.asdict(status), "paths_by_interface": paths_by_interface(status, snaps)}


def _paths_cell(row: dict[str, int] | None) -> str:
    return f"{row['paths']} ({row['active']} active)" if row else "0"


def _route_name(route: PeerRoute) -> str:
    if route.peer.startswith("default/ip"):
        return f"default (IPv{route.peer.removeprefix('default/ip')})"
    return route.peer


def _line(console: Console, text: str) -> None:
    """One line as given: no markup, no colouring, never wrapped (scripts grep it)."""
    console.print(text, highlight=False, markup=False, soft_wrap=True)


def print_network(
    console: Console,
    status: NetworkStatus,
    snaps: Sequence[ConnectionSnapshot],
    *,
    label: str | None = None,
) -> None:
    """The tables of ``ctl network`` (and, one block per agent ``label``, ``fleet network``)."""
    who = f"{label}: " if label else ""
    where = f"network namespace {status.netns}" if status.netns else "its own network namespace"
    if not status.available:
        why = status.unavailable_reason or "it is starting (no inventory yet): ask again"
        _line(console, f"{who}network monitor not running: {why}")
        return
    _line(
        console,
        f"{who}network monitor in {where}: {status.events} kernel event(s), "
        f"{status.resyncs} resync(s)",
    )
    counts = paths_by_interface(status, snaps)
    interfaces = Table(
        "interface",
        "link",
        "mtu",
        "addresses",
        "paths",
        title="interfaces",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    interfaces.columns[3].no_wrap = True
    for iface in status.interfaces:
        link = "up" if iface.up and iface.carrier else "up, no carrier" if iface.up else "down"
        interfaces.add_row(
            iface.name,
            link,
            str(iface.mtu),
            "\n".join(iface.addresses) or "-",
            _paths_cell(counts.get(iface.name)),
        )
    known = {iface.name for iface in status.interfaces}
    for name, row in counts.items():  # "-", or a bound device the inventory does not list
        if name not in known:
            interfaces.add_row(name, "", "", "(not in the inventory)", _paths_cell(row))
    console.print(interfaces)
    routes = Table(
        "to",
        "interface",
        "source",
        title="routes",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    routes.columns[0].no_wrap = True
    for route in (*status.default_routes, *status.routes):
        routes.add_row(_route_name(route), route.interface or "unreachable", route.source or "-")
    if status.default_routes or status.routes:
        console.print(routes)
    else:
        _line(console, "routes: none (no default route, no peer)")
    done = ", ".join(f"{kind} {n}" for kind, n in sorted(status.reactions.items()))
    _line(console, f"reactions: {done or 'none'}")
