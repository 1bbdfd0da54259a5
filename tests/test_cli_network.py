"""``quic-supervisor ctl network`` and ``dial``'s network flags, on loopback.

The NetworkMonitor runs in this process's own namespace, so ``lo`` with 127.0.0.1/8 is always
in its inventory, and the route to the rig's echo server (127.0.0.1) goes through ``lo``. The
monitor's status has no change notification: tests poll it until it holds, with a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from supervisor import NetworkPolicy, PathPolicy, Supervisor
from supervisor.cli.main import _network_kwargs, build_parser, main
from supervisor.orchestration.network.monitor import NetworkStatus
from supervisor.remote.control import ControlServer
from tests.rig.aioquic_server import RigServer
from tests.rig.certs import CertPair
from tests.support import dial_echo

SECOND = "/ip4/127.0.0.2/udp/0/quic-v1"
GUARD = 10.0


async def _ctl(*argv: str) -> int:
    """``quic-supervisor ctl ...`` in-process; in a thread, since ``main`` runs its own loop."""
    return await asyncio.to_thread(main, ["ctl", *argv])


async def _monitor_knows(sup: Supervisor, peer: str) -> NetworkStatus:
    """The status once the monitor has dumped the namespace and learnt the route to ``peer``."""
    async with asyncio.timeout(GUARD):
        while True:
            status = await sup.network_status()
            if status.available and any(r.peer == peer for r in status.routes):
                return status
            await asyncio.sleep(0.02)  # polled: the status has no change notification


@pytest_asyncio.fixture
async def watched() -> AsyncIterator[Supervisor]:
    """A Supervisor whose NetworkMonitor runs (no auto paths: nothing is added for us)."""
    async with Supervisor(
        enable_experimental_connection_migration=True, network=NetworkPolicy()
    ) as sup:
        yield sup


# ------------------------------------------------------------------------------ ctl network


async def test_ctl_network_shows_lo_routes_and_paths_per_interface(
    watched: Supervisor, echo: RigServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conn = await dial_echo(watched, echo)
    path = await conn.as_migratable().add_path(SECOND)
    await path.probe(timeout=5.0)
    await _monitor_knows(watched, "127.0.0.1")
    sock = str(tmp_path / "ctl.sock")
    async with ControlServer(watched, sock):
        assert await _ctl("--socket", sock, "network") == 0
        table = capsys.readouterr().out
        assert await _ctl("network", "--socket", sock, "--json") == 0
        data = json.loads(capsys.readouterr().out)

    assert "network monitor in its own network namespace" in table
    lo_row = next(line for line in table.splitlines() if line.split()[:1] == ["lo"])
    # Both paths are on lo: 127.0.0.2 through lo's 127.0.0.1/8 prefix.
    assert "127.0.0.1/8" in lo_row and "2 (1 active)" in lo_row, table
    route = next(line for line in table.splitlines() if line.split()[:1] == ["127.0.0.1"])
    assert route.split() == ["127.0.0.1", "lo", "127.0.0.1"], table
    assert "reactions: none" in table

    assert data["available"] is True and data["unavailable_reason"] is None
    lo = next(i for i in data["interfaces"] if i["name"] == "lo")
    assert "127.0.0.1/8" in lo["addresses"] and lo["up"] and lo["carrier"]
    assert {"peer": "127.0.0.1", "interface": "lo", "source": "127.0.0.1"} in data["routes"]
    assert data["paths_by_interface"] == {"lo": {"paths": 2, "active": 1}}
    assert data["resyncs"] == 0 and data["reactions"] == {}


async def test_ctl_network_without_a_monitor_prints_the_reason(
    sup: Supervisor, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = str(tmp_path / "ctl.sock")
    async with ControlServer(sup, sock):
        assert await _ctl("--socket", sock, "network") == 0
        out = capsys.readouterr().out
        assert await _ctl("--socket", sock, "network", "--json") == 0
        data = json.loads(capsys.readouterr().out)
    assert out.strip() == (
        "network monitor not running: no network policy (give FailoverPolicy() or NetworkPolicy())"
    )
    assert data["available"] is False and "no network policy" in data["unavailable_reason"]
    assert data["interfaces"] == [] and data["paths_by_interface"] == {}


# ------------------------------------------------------------------------------ dial flags


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--auto-paths", "10.0.0.0/33"], "--auto-paths '10.0.0.0/33' is not a CIDR prefix"),
        (["--auto-paths", "lo", "--max-paths", "0"], "--max-paths 0 is out of range: give 1"),
        (["--max-paths", "3"], "--max-paths needs --auto-paths"),
        (["--auto-paths", "lo", "--no-network-monitor"], "drop --no-network-monitor"),
    ],
)
def test_dial_network_flag_errors_are_one_line_and_exit_2(
    flags: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dial", "/ip4/127.0.0.1/udp/4433/quic-v1", *flags]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("quic-supervisor dial: error: ") and named in lines[0], lines[0]


def _dial_args(*flags: str) -> argparse.Namespace:
    return build_parser().parse_args(["dial", "/ip4/127.0.0.1/udp/4433/quic-v1", *flags])


def test_dial_network_flags_build_the_policy() -> None:
    """'/' makes a prefix, anything else a device; --max-paths defaults to 2."""
    kwargs = _network_kwargs(_dial_args("--auto-paths", "lo", "--auto-paths", "10.0.0.0/8"))
    assert kwargs == {
        "network": NetworkPolicy(
            paths=PathPolicy(devices=("lo",), prefixes=("10.0.0.0/8",), max_paths=2)
        )
    }
    assert _network_kwargs(_dial_args("--no-network-monitor")) == {"network": False}
    assert _network_kwargs(_dial_args()) == {}  # the Supervisor's own default


async def test_dial_auto_paths_lo_streams_verified_bytes(
    echo: RigServer, cert: CertPair, capsys: pytest.CaptureFixture[str]
) -> None:
    """lo holds only the dialled address here, so discovery adds nothing: the dial must work
    with the monitor and the policy running beside it."""
    argv = [
        "dial",
        f"/ip4/127.0.0.1/udp/{echo.port}/quic-v1",
        "--cafile",
        str(cert.certfile),
        "--auto-paths",
        "lo",
        "--max-paths",
        "2",
        "--bytes",
        "200k",
    ]
    assert await asyncio.to_thread(main, argv) == 0
    captured = capsys.readouterr()
    assert "verified 200,000 (all verified)" in captured.out, captured.out + captured.err
    assert "Traceback" not in captured.err
