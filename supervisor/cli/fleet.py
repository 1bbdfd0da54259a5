"""``quic-supervisor fleet ls|paths|network|drain|migrate`` and ``quic-supervisor agent``.

Wired into the main CLI by ``add_fleet_commands(subparsers)`` + ``run_fleet_command(args)``;
also runnable alone (``python -m supervisor.cli.fleet fleet drain --device net1``), which is
what the k8s manifests call, so they do not depend on how the main CLI is assembled.

The commands build OTel providers from ``OTEL_*`` and run under one span, so a drain started
from a RayJob is one trace from this process to every agent's migration spans.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from rich.console import Console

from supervisor.cli.ctl import network_data, print_network
from supervisor.orchestration.drain import DrainReport
from supervisor.remote.ray_agent import DEFAULT_NAMESPACE

__all__ = ["add_fleet_commands", "main", "run_fleet_command"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="Ray namespace of the agents")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--timeout", type=float, default=60.0, help="per-call timeout, seconds")


def add_fleet_commands(subparsers: Any) -> None:
    """Add ``fleet`` (with ls/paths/network/drain/migrate) and ``agent`` to a subparsers
    object."""
    fleet = subparsers.add_parser("fleet", help="drive the supervisors of a Ray cluster")
    sub = fleet.add_subparsers(dest="fleet_command", required=True)

    ls = sub.add_parser("ls", help="list the agents (one per node)")
    _common(ls)
    ls.set_defaults(_fleet_run=_ls)

    paths = sub.add_parser("paths", help="every connection and path in the fleet")
    _common(paths)
    paths.set_defaults(_fleet_run=_paths)

    network = sub.add_parser(
        "network",
        help="each agent's network monitor: interfaces, routes, paths per interface",
        description="The tables of `ctl network`, one block per agent (agents run the monitor "
        "when started with `agent --network`).",
    )
    _common(network)
    network.set_defaults(_fleet_run=_network)

    drain = sub.add_parser("drain", help="move connections off an address or device, everywhere")
    _common(drain)
    which = drain.add_mutually_exclusive_group(required=True)
    which.add_argument("--device", help="interface to drain, e.g. net1")
    which.add_argument("--local-addr", help="local IP (or multiaddr) to drain")
    drain.add_argument("--probe-timeout", type=float, default=5.0)
    drain.set_defaults(_fleet_run=_drain)

    migrate = sub.add_parser("migrate", help="switch one connection to a local address")
    _common(migrate)
    migrate.add_argument("--node", required=True, help="node id (or agent label)")
    migrate.add_argument("--conn", required=True, help="connection id")
    migrate.add_argument(
        "--to", required=True, help="local multiaddr of the path (added when missing)"
    )
    migrate.add_argument("--probe-timeout", type=float, default=5.0)
    migrate.set_defaults(_fleet_run=_migrate)

    agent = subparsers.add_parser(
        "agent", help="start this node's supervisor agent in a running Ray cluster"
    )
    _common(agent)
    agent.add_argument("--node-id", help="node to pin the agent to (default: this node)")
    agent.add_argument("--label", help="agent name suffix (default: the node id)")
    agent.add_argument("--max-restarts", type=int, default=-1)
    agent.add_argument(
        "--wait", type=float, default=0.0, help="retry joining the cluster for this long"
    )
    agent.add_argument(
        "--network",
        action="store_true",
        help="run the network monitor and react to interface and route changes "
        "(NetworkPolicy defaults; default: off)",
    )
    agent.set_defaults(_fleet_run=_agent)


def run_fleet_command(args: argparse.Namespace) -> int:
    """Run the command ``add_fleet_commands`` parsed; returns the exit code."""
    run: Callable[[argparse.Namespace], Awaitable[int]] = args._fleet_run
    from telemetry.providers import build_providers_from_env

    providers = build_providers_from_env()
    try:
        return asyncio.run(_traced(run, args, providers.tracer_provider))
    except Exception as exc:  # one clear line, not a Ray traceback
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        providers.shutdown()


async def _traced(
    run: Callable[[argparse.Namespace], Awaitable[int]], args: argparse.Namespace, tp: Any
) -> int:
    if tp is None:
        return await run(args)
    name = f"quic-supervisor {getattr(args, 'fleet_command', None) or 'agent'}"
    with tp.get_tracer("quic-supervisor.cli").start_as_current_span(name):
        return await run(args)


def _connect(args: argparse.Namespace) -> Any:
    from supervisor.remote.fleet import connect

    address = None if args.address in ("", "local") else args.address
    return connect(address, args.namespace, timeout=args.timeout)


def _print(args: argparse.Namespace, data: Any, lines: list[str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print("\n".join(lines))


async def _ls(args: argparse.Namespace) -> int:
    fleet = _connect(args)
    rows = []
    for sup in fleet.list_supervisors():
        try:
            info = await sup.info()
            stats = (await sup.metrics()).migration_stats
            rows.append(
                {
                    "label": sup.label,
                    "node_id": info.node_id,
                    "host": info.hostname,
                    "pid": info.pid,
                    "connections": info.connections,
                    "restored": len(info.restored),
                    "migrations": stats.ended,
                    "success_rate": stats.success_rate,
                    "failed": stats.failed,
                }
            )
        except Exception as exc:
            rows.append({"label": sup.label, "error": str(exc)})
    lines = [
        f"{r['label'][:16]:16}  {r.get('host', '-'):20}  conns={r.get('connections', '-')}"
        + (
            f"  migrations={r['migrations']} ok={r['success_rate']:.0%}"
            if r.get("success_rate") is not None
            else ""
        )
        + (f"  ERROR {r['error']}" if "error" in r else "")
        for r in rows
    ] or [f"no agents in namespace {args.namespace!r}"]
    _print(args, rows, lines)
    return 0


async def _paths(args: argparse.Namespace) -> int:
    fleet = _connect(args)
    data: dict[str, Any] = {}
    lines = []
    for label, snaps in (await fleet.snapshots()).items():
        if isinstance(snaps, BaseException):
            data[label] = {"error": str(snaps)}
            lines.append(f"{label[:16]}: ERROR {snaps}")
            continue
        data[label] = [
            {
                "conn_id": s.conn_id,
                "remote": s.remote_addr,
                "paths": [
                    {"local": p.local_addr, "state": str(p.state), "active": p.active, "rtt": p.rtt}
                    for p in s.paths
                ],
            }
            for s in snaps
        ]
        for s in snaps:
            lines.append(f"{label[:16]}  {s.conn_id}  -> {s.remote_addr}")
            for p in s.paths:
                rtt = f"{p.rtt * 1000:.2f}ms" if p.rtt is not None else "-"
                mark = "*" if p.active else " "
                lines.append(f"    {mark} {p.local_addr:40} {p.state!s:10} rtt={rtt}")
    _print(args, data, lines or ["no connections"])
    return 0


async def _network(args: argparse.Namespace) -> int:
    fleet = _connect(args)
    statuses, snapshots = await asyncio.gather(fleet.network_status(), fleet.snapshots())
    data: dict[str, Any] = {}
    console = Console()
    for n, (label, status) in enumerate(statuses.items()):
        if n and not args.json:
            print()  # one block per agent
        if isinstance(status, BaseException):
            data[label] = {"error": str(status)}
            if not args.json:
                print(f"{label[:16]}: ERROR {status}")
            continue
        snaps = snapshots.get(label)
        listed = snaps if isinstance(snaps, list) else []
        data[label] = network_data(status, listed)
        if not args.json:
            print_network(console, status, listed, label=label[:16])
    if args.json:
        _print(args, data, [])
    elif not statuses:
        print(f"no agents in namespace {args.namespace!r}")
    return 0


def _report_rows(label: str, report: DrainReport | BaseException) -> tuple[Any, list[str]]:
    if isinstance(report, BaseException):
        return {"error": str(report)}, [f"{label[:16]}: ERROR {report}"]
    row = {
        "moved": [[m.conn_id, m.from_addr, m.to_addr] for m in report.moved],
        "failed": [[m.conn_id, m.from_addr, m.error] for m in report.failed],
        "untouched": len(report.untouched),
    }
    lines = [
        f"{label[:16]}: moved {len(report.moved)}, failed {len(report.failed)}, "
        f"untouched {len(report.untouched)}"
    ]
    lines += [f"    {m.conn_id}: {m.from_addr} -> {m.to_addr}" for m in report.moved]
    lines += [f"    {m.conn_id}: FAILED {m.error}" for m in report.failed]
    return row, lines


async def _drain(args: argparse.Namespace) -> int:
    fleet = _connect(args)
    started = time.monotonic()
    reports = await fleet.drain(
        device=args.device, local_addr=args.local_addr, probe_timeout=args.probe_timeout
    )
    data: dict[str, Any] = {}
    lines = []
    for label, report in reports.items():
        data[label], more = _report_rows(label, report)
        lines += more
    lines.append(f"{len(reports)} node(s) in {time.monotonic() - started:.2f}s")
    _print(args, data, lines if reports else [f"no agents in namespace {args.namespace!r}"])
    bad = any(isinstance(r, BaseException) or r.failed for r in reports.values())
    return 1 if bad else 0


async def _migrate(args: argparse.Namespace) -> int:
    fleet = _connect(args)
    sup = fleet.get_supervisor(args.node)
    conn = await sup.connection(args.conn)
    mc = conn.as_migratable()
    target = next((p for p in mc.paths() if str(p.info().local_addr) == args.to), None)
    if target is None:
        target = await mc.add_path(args.to)
    if target.info().rtt is None:
        await target.probe(timeout=args.probe_timeout)
    await target.switch()
    active = mc.active_path()
    _print(
        args,
        {"conn_id": conn.conn_id, "active": str(active.local_addr)},
        [f"{conn.conn_id}: active path {active.local_addr}"],
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
            print(f"waiting for the Ray node: {exc}", file=sys.stderr)
            await asyncio.sleep(2.0)
    sup = fleet.start_agent(
        args.node_id, label=args.label, max_restarts=args.max_restarts, network=args.network
    )
    info = await sup.info()
    _print(
        args,
        {"name": sup.name, "namespace": sup.namespace, "node_id": info.node_id, "pid": info.pid},
        [f"agent {sup.name} running on node {info.node_id} (pid {info.pid})"],
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quic-supervisor")
    add_fleet_commands(parser.add_subparsers(dest="command", required=True))
    return run_fleet_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
