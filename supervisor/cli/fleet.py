"""``quic-supervisor fleet ls|paths|stats|network|drain|migrate|dial|listen|health|stop`` and
``quic-supervisor agent``.

Wired into the main CLI by ``add_fleet_commands(subparsers)`` + ``run_fleet_command(args)``;
also runnable alone (``python -m supervisor.cli.fleet fleet drain --device net1``), which is
what the k8s manifests call, so they do not depend on how the main CLI is assembled.

``fleet`` speaks ``ctl``'s vocabulary (:mod:`supervisor.cli.tables`): the same subcommands,
arguments, tables, units and defaults, one block per agent where ``ctl`` has its one
supervisor, and ``--json`` as ``{node: <what ctl --json prints>}``. Agents are named as
``fleet ls`` prints them (a node id's unique prefix); ``--node`` narrows any command to one.

Every error is one line, ``quic-supervisor fleet CMD: error: WHAT: FIX``, exit 2; 1 means the
command ran but some agent could not answer or some connection could not be drained; 130 an
interrupt. ``--timeout`` bounds joining the Ray cluster as well as each call, and Ray's own
warnings (its token-authentication notice, its connection retries, the agents' logs) appear
only with ``--log-level info`` or ``debug``.

The commands build OTel providers from ``OTEL_*`` and run under one span, so a drain started
from a RayJob is one trace from this process to every agent's migration spans.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from actors.errors import MigrationError
from supervisor.cli.ctl import network_data, print_network
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
    ls_table,
    make_console,
    migrate_line,
    one_line,
    paths_table,
    positive,
    resolve_id,
    short_ids,
    snapshot_json,
    stats_json,
    stop_json,
    stop_line,
)
from supervisor.remote.ray_agent import DEFAULT_NAMESPACE

if TYPE_CHECKING:
    from supervisor.remote.fleet import Fleet, RemoteSupervisor

__all__ = ["add_fleet_commands", "main", "run_fleet_command"]

PROG = "quic-supervisor"
DEFAULT_LISTEN = "/ip4/127.0.0.1/udp/4433/quic-v1"
_LS = "quic-supervisor fleet ls"
_PATHS = "quic-supervisor fleet paths"

log = logging.getLogger("quic_supervisor.cli")


# -- arguments ------------------------------------------------------------------------------------


def _cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default="auto",
        metavar="ADDR",
        help="the Ray cluster: auto (this host's, or $RAY_ADDRESS), HOST:PORT of its GCS, or "
        "local (start one in this process) (default: auto)",
    )
    p.add_argument(
        "--namespace",
        default=DEFAULT_NAMESPACE,
        help=f"Ray namespace of the agents (default: {DEFAULT_NAMESPACE})",
    )
    add_timeout(p, "the Ray cluster")
    add_json(p)
    add_log_level(p)


def _command(
    sub: Any, name: str, run: Callable[[argparse.Namespace], Awaitable[int]], **kw: Any
) -> argparse.ArgumentParser:
    """A fleet subcommand with the flags every one takes (and ``--node``)."""
    parser: argparse.ArgumentParser = sub.add_parser(name, **kw)
    _cluster_flags(parser)
    parser.add_argument(
        "--node",
        metavar="NODE",
        help=f"only this agent: its node id or label as `{_LS}` prints it (a unique prefix "
        "is enough; default: every agent)",
    )
    parser.set_defaults(_fleet_run=run)
    return parser


def add_fleet_commands(subparsers: Any) -> None:
    """Add ``fleet`` (ls/paths/stats/network/drain/migrate/dial/listen) and ``agent`` to a
    subparsers object."""
    fleet = subparsers.add_parser(
        "fleet",
        help="drive the supervisors of a Ray cluster",
        description="The commands of `quic-supervisor ctl`, with the same arguments and tables, "
        "for every agent of a Ray cluster (one block per agent), plus ls, dial and listen.",
    )
    sub = fleet.add_subparsers(dest="fleet_command", metavar="COMMAND", required=True)

    _command(sub, "ls", _ls, help="list the agents (one per node) and their counters")
    _command(sub, "paths", _paths, help="every connection and its paths, per agent")
    _command(sub, "stats", _stats, help="how each agent's migrations ended: success rate, outcomes")
    _command(
        sub,
        "network",
        _network,
        help="each agent's network monitor: interfaces, routes, paths per interface",
        description="The tables of `ctl network`, one block per agent (agents run the monitor "
        "when started with `agent --network`).",
    )
    drain = _command(
        sub,
        "drain",
        _drain,
        help="move every connection off a local address or interface, on every agent",
        description="As `ctl drain`, on every agent in parallel: the drained path is then "
        "closed (--keep-drained keeps it). Exit 1 when some connection could not be moved "
        "(FAILED) or some agent did not answer.",
    )
    add_drain_arguments(drain)
    migrate = _command(
        sub,
        "migrate",
        _migrate,
        help="switch one connection to the path on a local address (added when missing)",
        description="The agent holding CONN_ID is found by asking every agent (--node narrows it).",
    )
    add_migrate_arguments(migrate)

    dial = _command(
        sub,
        "dial",
        _dial,
        help="dial a QUIC server from an agent; the connection stays in the agent",
        description="The agent (--node, needed when there are several) dials MULTIADDR, adds "
        "and probes each --path, and keeps the connection (a restarted agent re-dials it). "
        "Files are paths on the agent's node. Prints the connection id `fleet migrate` takes.",
    )
    dial.add_argument("addr", metavar="MULTIADDR", help="e.g. /ip4/10.0.0.5/udp/4433/quic-v1")
    dial.add_argument(
        "--path",
        action="append",
        default=[],
        metavar="MA",
        help="add and probe a local path (repeatable), e.g. /ip4/10.0.1.5/udp/0/quic-v1",
    )
    dial.add_argument("--alpn", default="echo", help="ALPN protocol(s), comma-separated")
    dial.add_argument(
        "--server-name", default="localhost", help="TLS name to verify (default: localhost)"
    )
    dial.add_argument(
        "--probe-timeout",
        type=positive,
        default=2.0,
        metavar="SECONDS",
        help="how long each --path's probe may take (default: 2)",
    )
    tls = dial.add_mutually_exclusive_group()
    tls.add_argument("--cafile", help="PEM file of the CA to trust (a path on the agent's node)")
    tls.add_argument(
        "--insecure", action="store_true", help="do not verify the server's certificate"
    )

    listen = _command(
        sub,
        "listen",
        _listen,
        help="serve QUIC (echo) from an agent",
        description="The agent (--node, needed when there are several) listens on MULTIADDR "
        "until it stops; streams are echoed (or left unread: --handler none). Files are paths "
        "on the agent's node; without --cert the agent makes a self-signed one, as `serve` does.",
    )
    listen.add_argument(
        "addr",
        nargs="?",
        default=DEFAULT_LISTEN,
        metavar="MULTIADDR",
        help=f"where to listen (default: {DEFAULT_LISTEN}; port 0: any free port)",
    )
    listen.add_argument("--cert", help="PEM certificate (default: a self-signed one)")
    listen.add_argument("--key", help="PEM private key (default: inside --cert, or made)")
    listen.add_argument("--alpn", default="echo", help="ALPN protocol(s), comma-separated")
    listen.add_argument(
        "--handler",
        choices=["echo", "none"],
        default="echo",
        help="what the agent does with each stream (default: echo)",
    )

    health = _command(
        sub,
        "health",
        _health,
        help="is each agent ready and live? (exit 1 when one is not)",
        description="As `ctl health`, through Ray, one line per agent. For kubelet's probes use "
        "`ctl health` on the agent's --control-socket (no Ray client).",
    )
    add_health_choice(health)
    stop = _command(
        sub,
        "stop",
        _stop,
        help="stop one agent (--node) in order, as `ctl stop` does",
        description="As `ctl stop`, through Ray: the agent (--node is required) turns not ready, "
        "its connections run until no stream is open or --deadline, then every one is "
        "closed with CONNECTION_CLOSE; its desired state is kept.",
    )
    add_deadline_argument(stop)

    agent = subparsers.add_parser(
        "agent", help="start this node's supervisor agent in a running Ray cluster"
    )
    _cluster_flags(agent)
    agent.add_argument("--node-id", help="node to pin the agent to (default: this node)")
    agent.add_argument("--label", help="agent name suffix (default: the node id)")
    agent.add_argument(
        "--max-restarts",
        type=int,
        default=-1,
        help="how often Ray restarts the agent's process (default: -1, always)",
    )
    agent.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="retry joining the cluster for this long (default: 0, once)",
    )
    agent.add_argument(
        "--network",
        action="store_true",
        help="run the network monitor and react to interface and route changes "
        "(NetworkPolicy defaults; default: off)",
    )
    agent.add_argument(
        "--control-socket",
        metavar="PATH",
        help="the agent also serves the control socket at PATH (a path on its node) for "
        "`ctl health` probes and `ctl stop` (the pod's preStop) (default: none)",
    )
    agent.set_defaults(_fleet_run=_agent)


# -- running --------------------------------------------------------------------------------------


def _verbose(args: argparse.Namespace) -> bool:
    return getattr(args, "log_level", "warning") in ("debug", "info")


def run_fleet_command(args: argparse.Namespace) -> int:
    """Run the command ``add_fleet_commands`` parsed; returns the exit code."""
    run: Callable[[argparse.Namespace], Awaitable[int]] = args._fleet_run
    command = getattr(args, "fleet_command", None)
    where = f"{PROG} fleet {command}" if command else f"{PROG} agent"
    from telemetry.providers import build_providers_from_env

    providers = build_providers_from_env()
    try:
        return asyncio.run(_traced(run, args, providers.tracer_provider))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line, never a Ray traceback
        log.debug("%s failed", where, exc_info=True)
        print(f"{where}: error: {_error_text(exc)}", file=sys.stderr)
        return 2
    finally:
        providers.shutdown()


def _error_text(exc: BaseException) -> str:
    from supervisor.remote.fleet import FleetError
    from supervisor.remote.protocol import RemoteError

    if isinstance(exc, ImportError) and (exc.name or "").split(".")[0] == "ray":
        return "Ray is not installed: pip install -e '.[ray]' (the fleet runs on Ray)"
    if isinstance(exc, FleetError | MigrationError | IdError):
        return one_line(exc)  # says what failed and the fix
    if isinstance(exc, ValueError | TypeError | LookupError | OSError | RemoteError):
        return one_line(exc)  # the input's check, or the agent's answer, names it
    return f"{one_line(exc)}: run again with --log-level debug to see where it came from"


async def _traced(
    run: Callable[[argparse.Namespace], Awaitable[int]], args: argparse.Namespace, tp: Any
) -> int:
    if tp is None:
        return await run(args)
    name = f"quic-supervisor {getattr(args, 'fleet_command', None) or 'agent'}"
    with tp.get_tracer("quic-supervisor.cli").start_as_current_span(name):
        return await run(args)


@contextlib.contextmanager
def _native_stderr_muted(muted: bool) -> Iterator[None]:
    """fd 2 to /dev/null while Ray joins the cluster: its native client logs connection retries
    there before any logging level reaches it (``--log-level info`` leaves them).

    When joining fails, Ray may still be retrying in its thread: fd 2 then stays muted and
    ``sys.stderr`` (our one error line) moves to the real stderr.
    """
    if not muted:
        yield
        return
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 at all
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    except BaseException:
        if _writes_to_fd2(sys.stderr):
            sys.stderr = os.fdopen(saved, "w", buffering=1)
        else:
            os.dup2(saved, 2)
            os.close(saved)
        raise
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


def _writes_to_fd2(stream: Any) -> bool:
    try:
        return bool(stream.fileno() == 2)
    except (AttributeError, OSError, ValueError):  # a test's capture, a closed stream
        return False


def _connect(args: argparse.Namespace) -> Fleet:
    import ray

    from supervisor.remote.fleet import connect

    address = None if args.address in ("", "local") else args.address
    if ray.is_initialized():
        return connect(address, args.namespace, timeout=args.timeout)
    verbose = _verbose(args)
    level = logging.getLevelName(args.log_level.upper()) if verbose else logging.ERROR
    with _native_stderr_muted(not verbose):
        return connect(
            address,
            args.namespace,
            timeout=args.timeout,
            logging_level=level,
            log_to_driver=verbose,  # the agents' own logs stay in theirs
        )


def _json(data: object) -> None:
    print(json.dumps(data, indent=2, default=str))


def _agents(
    args: argparse.Namespace, fleet: Fleet
) -> tuple[list[RemoteSupervisor], dict[str, str]]:
    """The agents a command acts on (every one, or ``--node``'s) and how labels print."""
    from supervisor.remote.fleet import SupervisorNotFoundError

    labels = fleet.labels()
    shown = short_ids(labels)
    if args.node is not None:
        labels = [resolve_id(args.node, labels, what="node", listing=_LS)]
    sups = []
    for label in labels:
        try:
            sups.append(fleet.get_supervisor(label))
        except SupervisorNotFoundError:
            if args.node is not None:
                raise
    return sups, shown


def _one_agent(args: argparse.Namespace, fleet: Fleet) -> tuple[RemoteSupervisor, str]:
    """The agent a dial or listen runs in: ``--node``'s, or the only one."""
    from supervisor.remote.fleet import SupervisorNotFoundError

    sups, shown = _agents(args, fleet)
    if len(sups) == 1:
        return sups[0], shown.get(sups[0].label, sups[0].label)
    if not sups:
        raise SupervisorNotFoundError("", fleet.namespace)
    names = ", ".join(shown.get(s.label, s.label) for s in sups)
    raise IdError(
        f"{len(sups)} agents in namespace {fleet.namespace!r} ({names}): give --node, one of "
        f"them as `{_LS}` prints it"
    )


def _none_line(namespace: str) -> str:
    return (
        f"no agents in namespace {namespace!r}: start one with `quic-supervisor agent` on each node"
    )


# -- listings ------------------------------------------------------------------------------------


async def _ls(args: argparse.Namespace) -> int:
    sups, shown = _agents(args, _connect(args))

    async def row(sup: RemoteSupervisor) -> dict[str, Any]:
        try:
            info, metrics = await asyncio.gather(sup.info(), sup.metrics())
        except Exception as exc:
            return {"label": sup.label, "error": one_line(exc)}
        stats = metrics.migration_stats
        return {
            "label": sup.label,
            "node_id": info.node_id,
            "host": info.hostname,
            "pid": info.pid,
            "connections": info.connections,
            "listeners": info.listeners,
            "restored": len(info.restored),
            "migrations": stats.ended,
            "success_rate": stats.success_rate,
            "failed": dict(stats.failed),
        }

    rows = list(await asyncio.gather(*(row(s) for s in sups)))
    if args.json:
        _json(rows)
    elif not rows:
        print(_none_line(args.namespace))
    else:
        make_console().print(ls_table(rows, shown))
    return 1 if any("error" in r for r in rows) else 0


async def _paths(args: argparse.Namespace) -> int:
    fleet = _connect(args)
    sups, shown = _agents(args, fleet)
    found = await fleet.snapshots(sups)
    data: dict[str, Any] = {}
    console = make_console()
    for label, snaps in found.items():
        name = shown.get(label, label)
        if isinstance(snaps, BaseException):
            data[label] = {"error": one_line(snaps)}
            if not args.json:
                print(f"{name}: error: {one_line(snaps)}")
            continue
        data[label] = [snapshot_json(s) for s in snaps]
        if args.json:
            continue
        if snaps:
            console.print(paths_table(snaps, title=f"{name}: {len(snaps)} connection(s)"))
        else:
            print(f"{name}: no connections")
    if args.json:
        _json(data)
    elif not found:
        print(_none_line(args.namespace))
    return 1 if any("error" in v for v in data.values() if isinstance(v, dict)) else 0


async def _stats(args: argparse.Namespace) -> int:
    sups, shown = _agents(args, _connect(args))
    results = await asyncio.gather(*(s.migration_stats() for s in sups), return_exceptions=True)
    data: dict[str, Any] = {}
    lines = []
    for sup, stats in zip(sups, results, strict=True):
        name = shown.get(sup.label, sup.label)
        if isinstance(stats, BaseException):
            data[sup.label] = {"error": one_line(stats)}
            lines.append(f"{name}: error: {one_line(stats)}")
        else:
            data[sup.label] = stats_json(stats)
            lines.append(f"{name}: {stats.summary()}")
    if args.json:
        _json(data)
    else:
        print("\n".join(lines or [_none_line(args.namespace)]))
    return 1 if any("error" in v for v in data.values()) else 0


async def _network(args: argparse.Namespace) -> int:
    fleet = _connect(args)
    sups, shown = _agents(args, fleet)
    statuses, snapshots = await asyncio.gather(fleet.network_status(sups), fleet.snapshots(sups))
    data: dict[str, Any] = {}
    console = make_console()
    for n, (label, status) in enumerate(statuses.items()):
        name = shown.get(label, label)
        if n and not args.json:
            print()  # one block per agent
        if isinstance(status, BaseException):
            data[label] = {"error": one_line(status)}
            if not args.json:
                print(f"{name}: error: {one_line(status)}")
            continue
        snaps = snapshots.get(label)
        listed = snaps if isinstance(snaps, list) else []
        data[label] = network_data(status, listed)
        if not args.json:
            print_network(console, status, listed, label=name)
    if args.json:
        _json(data)
    elif not statuses:
        print(_none_line(args.namespace))
    return 1 if any("error" in v for v in data.values()) else 0


# -- actions -------------------------------------------------------------------------------------


async def _drain(args: argparse.Namespace) -> int:
    fleet = _connect(args)
    sups, shown = _agents(args, fleet)
    started = time.monotonic()
    reports = await fleet.drain(
        device=args.device,
        local_addr=args.local_addr,
        probe_timeout=args.probe_timeout,
        close_drained=not args.keep_drained,
        supervisors=sups,
    )
    data: dict[str, Any] = {}
    lines = []
    for label, report in reports.items():
        name = shown.get(label, label)
        if isinstance(report, BaseException):
            data[label] = {"error": one_line(report)}
            lines.append(f"{name}: error: {one_line(report)}")
        else:
            data[label] = drain_json(report)
            lines += drain_lines(report, prefix=f"{name}: ")
    if args.json:
        _json(data)
    elif reports:
        lines.append(f"{len(reports)} node(s) in {time.monotonic() - started:.3f} s")
        print("\n".join(lines))
    else:
        print(_none_line(args.namespace))
    bad = any(isinstance(r, BaseException) or not r.ok for r in reports.values())
    return 1 if bad else 0


async def _migrate(args: argparse.Namespace) -> int:
    from supervisor.cli.tables import AmbiguousIdError

    fleet = _connect(args)
    sups, shown = _agents(args, fleet)
    found = await fleet.snapshots(sups)
    holders: dict[str, list[str]] = {}
    for label, snaps in found.items():
        for snap in snaps if isinstance(snaps, list) else ():
            holders.setdefault(snap.conn_id, []).append(label)
    conn_id = resolve_id(args.conn_id, holders, what="connection", listing=_PATHS)
    if len(holders[conn_id]) > 1:
        raise AmbiguousIdError(
            "connection",
            args.conn_id,
            [f"{conn_id} on {shown.get(label, label)}" for label in holders[conn_id]],
        )
    sup = next(s for s in sups if s.label == holders[conn_id][0])
    snap = await sup.migrate(conn_id, args.to, probe_timeout=args.probe_timeout)
    if args.json:
        _json(snapshot_json(snap))
    else:
        print(migrate_line(snap))
    return 0


async def _health(args: argparse.Namespace) -> int:
    sups, shown = _agents(args, _connect(args))
    which = "ready" if args.ready else "live" if args.live else "both"
    results = await asyncio.gather(*(s.health() for s in sups), return_exceptions=True)
    data: dict[str, Any] = {}
    lines = []
    ok = True
    for sup, health in zip(sups, results, strict=True):
        name = shown.get(sup.label, sup.label)
        if isinstance(health, BaseException):
            ok = False
            data[sup.label] = {"error": one_line(health)}
            lines.append(f"{name}: NOT HEALTHY: {one_line(health)}")
        else:
            ok = ok and health_ok(health, which)
            data[sup.label] = dataclasses.asdict(health)
            lines.append(health_line(health, which, prefix=f"{name}: "))
    if args.json:
        _json(data)
    else:
        print("\n".join(lines) if lines else _none_line(args.namespace))
    return 0 if ok else 1


async def _stop(args: argparse.Namespace) -> int:
    if args.node is None:
        raise IdError(
            "fleet stop needs --node: it stops one agent (a node leaving), never the whole "
            f"fleet at once; give the node as `{_LS}` prints it"
        )
    sup, name = _one_agent(args, _connect(args))
    report = await sup.stop(args.deadline)
    if args.json:
        _json({sup.label: stop_json(report)})
    else:
        print(stop_line(report, prefix=f"{name}: "))
    return 0


def _alpn(text: str) -> list[str] | None:
    return [a for a in text.split(",") if a] or None


async def _dial(args: argparse.Namespace) -> int:
    sup, name = _one_agent(args, _connect(args))
    conn = await sup.dial(
        args.addr,
        alpn_protocols=_alpn(args.alpn),
        server_name=args.server_name,
        cafile=args.cafile,
        verify=not args.insecure,
        timeout=args.timeout,
    )
    lines = [
        f"connected {conn.local_multiaddr} -> {conn.remote_multiaddr} "
        f"(connection {conn.conn_id} on {name})"
    ]
    mc = conn.as_migratable()
    try:
        for addr in args.path:
            path = await mc.add_path(addr)
            await path.probe(timeout=args.probe_timeout)
            rtt = path.info().rtt
            lines.append(
                f"path {path.info().local_addr} validated"
                + (f" (probe RTT {rtt * 1000:.2f} ms)" if rtt is not None else "")
            )
    except BaseException:
        with contextlib.suppress(Exception):  # a failed dial leaves nothing in the agent
            await conn.close()
        raise
    snap = await conn.refresh()
    if args.json:
        _json({"node": sup.label, **snapshot_json(snap)})
    else:
        print("\n".join(lines))
    return 0


async def _listen(args: argparse.Namespace) -> int:
    sup, name = _one_agent(args, _connect(args))
    listener = await sup.listen(
        args.addr,
        certfile=args.cert,
        keyfile=args.key,
        alpn_protocols=_alpn(args.alpn),
        handler=None if args.handler == "none" else args.handler,
    )
    info = listener.info
    if args.json:
        _json({"node": sup.label, **dataclasses.asdict(info)})
    else:
        print(
            f"listening on {info.multiaddr} (alpn {args.alpn}, handler {args.handler}, "
            f"listener {info.listener_id} on {name})"
        )
    return 0


async def _agent(args: argparse.Namespace) -> int:
    """Start (or find) this node's agent; retries while the node's raylet is starting."""
    deadline = time.monotonic() + max(args.wait, 0.0)
    while True:
        try:
            fleet = _connect(args)
            break
        except Exception as exc:  # raylet not up yet (pod start): retry until --wait runs out
            if time.monotonic() >= deadline:
                raise
            print(f"waiting for the Ray node: {one_line(exc)}", file=sys.stderr)
            await asyncio.sleep(2.0)  # the retry's pace, not a synchronisation
    socket_path = os.path.abspath(args.control_socket) if args.control_socket else None
    sup = fleet.start_agent(
        args.node_id,
        label=args.label,
        max_restarts=args.max_restarts,
        network=args.network,
        control_socket=socket_path,
    )
    info = await sup.info()
    if args.json:
        _json(
            {"name": sup.name, "namespace": sup.namespace, "node_id": info.node_id, "pid": info.pid}
        )
    else:
        print(f"agent {sup.name} running on node {info.node_id} (pid {info.pid})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG)
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="logging threshold (stderr; default: warning)",
    )
    add_fleet_commands(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or argparse's own usage error (status 2)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return run_fleet_command(args)


if __name__ == "__main__":
    sys.exit(main())
