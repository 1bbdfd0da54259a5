"""``quic-supervisor ctl`` and ``quic-supervisor fleet`` speak one vocabulary.

The same listing through a real control socket and a real local Ray cluster gives the same
columns and the same JSON keys; ids are accepted as they are printed (unique prefixes too, an
ambiguous one is a one-line error naming the candidates); a drain closes the drained path in
both unless ``--keep-drained``; tables are whole when piped; every error is one line, exit 2;
``--timeout`` bounds a silent socket and a dead or refusing Ray address; Ray's warnings appear
only with ``--log-level``.

The ``ctl`` tests need no Ray. The ``fleet`` tests share one local Ray cluster for the module
(as ``tests/test_ray_backend.py`` does: ray.init in this process, agents in worker processes,
every actor left in the namespace killed at the end); commands run in-process with
``--address local`` (this process's cluster), except where a fresh process is the point (the
timeout of joining, Ray's warnings), which run the console script.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor import Supervisor
from supervisor.cli import main
from supervisor.cli.tables import LS_COLUMNS, PATH_COLUMNS
from supervisor.remote.control import ControlServer
from tests.rig.aioquic_server import RigServer, echo_server
from tests.rig.certs import generate_cert
from tests.support import addr_of, dial_echo, echo_roundtrip, local_ray_fleet

SECOND = "/ip4/127.0.0.2/udp/0/quic-v1"
THIRD = "/ip4/127.0.0.3/udp/0/quic-v1"
NOT_HERE = "/ip4/203.0.113.77/udp/0/quic-v1"  # TEST-NET-3: never an address of this host
SCRIPT = Path(sys.executable).with_name("quic-supervisor")


# ------------------------------------------------------------------------------ helpers


async def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``quic-supervisor ARGV`` in-process (a thread: ``main`` runs its own loop)."""
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _headers(out: str) -> list[list[str]]:
    """The column names of every table in ``out`` (the line above each header rule)."""
    lines = out.splitlines()
    return [
        re.split(r"\s{2,}", lines[i - 1].strip())
        for i, line in enumerate(lines)
        if i and line.strip() and set(line.strip()) == {"─"}
    ]


def _rows(out: str) -> list[str]:
    """Table body lines: after a header rule, up to the next blank line or title."""
    rows, inside = [], False
    for line in out.splitlines():
        if line.strip() and set(line.strip()) == {"─"}:
            inside = True
        elif inside and line.strip():
            rows.append(line)
        else:
            inside = False
    return rows


def _ip(local_addr: object) -> str:
    return addr_of(local_addr)[0]


def _error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"quic-supervisor {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _unique_prefix(ids: list[str], conn_id: str) -> str:
    """The shortest prefix of ``conn_id`` no other id starts with."""
    for n in range(1, len(conn_id) + 1):
        if not any(o != conn_id and o.startswith(conn_id[:n]) for o in ids):
            return conn_id[:n]
    return conn_id


# ------------------------------------------------------------------------------ ctl


@pytest.fixture
def sock(tmp_path: Path) -> str:
    return str(tmp_path / "ctl.sock")


async def test_ctl_paths_table_is_whole_when_piped(
    sup: Supervisor, echo: RigServer, sock: str, capsys: pytest.CaptureFixture[str]
) -> None:
    conn = await dial_echo(sup, echo)
    path = await conn.as_migratable().add_path(SECOND)
    await path.probe(timeout=5.0)
    async with ControlServer(sup, sock):
        code, out, _ = await _cli(capsys, "ctl", "paths", "--socket", sock)
    assert code == 0
    assert _headers(out) == [list(PATH_COLUMNS)], out
    rows = _rows(out)
    assert len(rows) == 2, out  # one line per path: nothing wrapped
    snap = sup.live_snapshot(conn.conn_id)
    assert snap is not None
    for row, p in zip(rows, snap.paths, strict=True):
        cells = row.split()
        assert p.local_addr in cells and p.remote_addr in cells, (row, p)
        assert str(p.state) in cells
    assert rows[0].split()[:2] == [conn.conn_id, "out"]
    assert max(len(line.rstrip()) for line in out.splitlines()) > 80  # not cut to a terminal's


async def test_ctl_ids_as_printed_and_an_ambiguous_prefix_names_the_candidates(
    sup: Supervisor, echo: RigServer, sock: str, capsys: pytest.CaptureFixture[str]
) -> None:
    conns = []
    while True:  # 17 connections at most: two of them then share their first hex digit
        conns.append(await dial_echo(sup, echo))
        firsts = [c.conn_id[0] for c in conns]
        shared = next((f for f in firsts if firsts.count(f) > 1), None)
        if shared is not None:
            break
    twins = sorted(c.conn_id for c in conns if c.conn_id[0] == shared)
    target = next(c for c in conns if c.conn_id == twins[0])
    ids = [c.conn_id for c in conns]
    async with ControlServer(sup, sock):
        code, _, err = await _cli(
            capsys, "ctl", "migrate", shared, "--to", SECOND, "--socket", sock
        )
        assert code == 2
        line = _error_line(err, "ctl migrate")
        assert f"connection {shared!r} is ambiguous" in line and "more characters" in line
        assert all(t in line for t in twins), line

        code, _, err = await _cli(
            capsys, "ctl", "migrate", "zzzz", "--to", SECOND, "--socket", sock
        )
        assert code == 2
        line = _error_line(err, "ctl migrate")
        assert "no connection 'zzzz'" in line and "quic-supervisor ctl paths" in line

        prefix = _unique_prefix(ids, target.conn_id)
        code, out, err = await _cli(
            capsys, "ctl", "migrate", prefix, "--to", SECOND, "--socket", sock, "--json"
        )
        assert code == 0, err
    moved = json.loads(out)
    assert moved["conn_id"] == target.conn_id
    assert [_ip(p["local_addr"]) for p in moved["paths"] if p["active"]] == ["127.0.0.2"]
    assert {p["state"] for p in moved["paths"]} == {"active", "standby"}
    await echo_roundtrip(target)


async def test_ctl_drain_closes_the_drained_path_unless_keep_drained(
    sup: Supervisor, echo: RigServer, sock: str, capsys: pytest.CaptureFixture[str]
) -> None:
    conn = await dial_echo(sup, echo)
    await conn.as_migratable().add_path(SECOND)
    await conn.as_migratable().add_path(THIRD)
    async with ControlServer(sup, sock):
        argv = ("ctl", "drain", "--socket", sock)
        code, out, _ = await _cli(capsys, *argv, "--local-addr", "127.0.0.1", "--keep-drained")
        assert code == 0 and "(drained path kept)" in out, out
        snap = sup.live_snapshot(conn.conn_id)
        assert snap is not None and len(snap.paths) == 3  # the drained one is standby

        code, out, _ = await _cli(capsys, *argv, "--local-addr", _active_ip(sup, conn))
        assert code == 0 and "(drained path closed)" in out, out
        assert out.splitlines()[-1].startswith("moved 1, failed 0, untouched 0 in "), out
    snap = sup.live_snapshot(conn.conn_id)
    assert snap is not None and len(snap.paths) == 2
    await echo_roundtrip(conn)


def _active_ip(sup: Supervisor, conn: Any) -> str:
    snap = sup.live_snapshot(conn.conn_id)
    assert snap is not None
    return _ip(next(p.local_addr for p in snap.paths if p.active))


async def test_ctl_timeout_bounds_a_silent_supervisor(
    sock: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A socket that accepts and never answers (a stopped process): exit 2 after --timeout."""
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_unix_server(silent, sock)
    try:
        started = time.monotonic()
        code, _, err = await _cli(capsys, "ctl", "paths", "--socket", sock, "--timeout", "0.5")
        took = time.monotonic() - started
    finally:
        server.close()
        for writer in held:
            writer.close()
    print(f"ctl paths --timeout 0.5 against a silent socket returned after {took:.2f} s")
    assert code == 2
    line = _error_line(err, "ctl paths")
    assert "did not answer within 0.5 s" in line and "raise --timeout" in line


# ------------------------------------------------------------------------------ fleet


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[tuple[Any, str]]:
    """One local Ray cluster for the module: (Fleet, its GCS address)."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install '.[ray]'")
    with local_ray_fleet("qs-vocab") as fleet:
        yield fleet, ray.get_runtime_context().gcs_address


@pytest.fixture
def fleet(ray_cluster: tuple[Any, str]) -> Any:
    return ray_cluster[0]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RigServer]:
    cert = generate_cert(tmp_path)
    async with echo_server(certfile=cert.certfile, keyfile=cert.keyfile) as srv:
        yield srv


def _remote(server: RigServer) -> str:
    return f"/ip4/127.0.0.1/udp/{server.port}/quic-v1"


async def _agent(fleet: Any, label: str | None, **kwargs: Any) -> Any:
    sup = fleet.start_agent(label=label, **kwargs)
    await sup.info()  # its worker process is up and has restored what it had
    return sup


def _fleet_argv(fleet: Any, command: str, *argv: str) -> list[str]:
    return ["fleet", command, *argv, "--address", "local", "--namespace", fleet.namespace]


@pytest.mark.ray
async def test_paths_stats_and_drain_read_the_same_through_ctl_and_fleet(
    fleet: Any,
    server: RigServer,
    sup: Supervisor,
    sock: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    agent = await _agent(fleet, f"same-{uuid.uuid4().hex[:6]}", persist=False)
    remote = await agent.dial(_remote(server), alpn_protocols=["echo"], verify=False)
    await (await remote.as_migratable().add_path(SECOND)).probe(timeout=5.0)
    local = await dial_echo(sup, server)
    await (await local.as_migratable().add_path(SECOND)).probe(timeout=5.0)
    node = ("--node", agent.label)

    async with ControlServer(sup, sock):
        ctl = ("--socket", sock)
        _, ctl_table, _ = await _cli(capsys, "ctl", "paths", *ctl)
        _, ctl_json, _ = await _cli(capsys, "ctl", "paths", *ctl, "--json")
        _, ctl_stats, _ = await _cli(capsys, "ctl", "stats", *ctl, "--json")
        _, ctl_drain, _ = await _cli(
            capsys, "ctl", "drain", *ctl, "--local-addr", "127.0.0.9", "--json"
        )
    _, fleet_table, _ = await _cli(capsys, *_fleet_argv(fleet, "paths", *node))
    _, fleet_json, _ = await _cli(capsys, *_fleet_argv(fleet, "paths", *node, "--json"))
    _, fleet_stats, _ = await _cli(capsys, *_fleet_argv(fleet, "stats", *node, "--json"))
    _, fleet_drain, _ = await _cli(
        capsys, *_fleet_argv(fleet, "drain", *node, "--local-addr", "127.0.0.9", "--json")
    )

    assert _headers(ctl_table) == [list(PATH_COLUMNS)], ctl_table
    assert _headers(fleet_table) == _headers(ctl_table), fleet_table
    assert fleet_table.splitlines()[0].startswith(f"{agent.label}: 1 connection(s)")
    assert remote.conn_id in fleet_table and local.conn_id in ctl_table

    (ctl_conn,) = json.loads(ctl_json)
    (fleet_conn,) = json.loads(fleet_json)[agent.label]
    assert fleet_conn.keys() == ctl_conn.keys()
    assert [p.keys() for p in fleet_conn["paths"]] == [p.keys() for p in ctl_conn["paths"]]
    assert [p["state"] for p in fleet_conn["paths"]] == ["active", "standby"]
    assert json.loads(fleet_stats)[agent.label].keys() == json.loads(ctl_stats).keys()
    drained = json.loads(fleet_drain)[agent.label]
    assert drained.keys() == json.loads(ctl_drain).keys()
    assert drained["counts"] == {"moved": 0, "failed": 0, "untouched": 1}
    await remote.close()
    agent.kill()


@pytest.mark.ray
async def test_fleet_takes_ids_as_it_prints_them(
    fleet: Any, server: RigServer, capsys: pytest.CaptureFixture[str]
) -> None:
    tag = uuid.uuid4().hex[:6]
    by_node = await _agent(fleet, None, persist=False)  # labelled by its 56-hex node id
    twins = [await _agent(fleet, f"ids-{c}-{tag}", persist=False) for c in "ab"]
    conn = await by_node.dial(_remote(server), alpn_protocols=["echo"], verify=False)

    code, out, err = await _cli(capsys, *_fleet_argv(fleet, "ls"))
    assert code == 0, err
    assert _headers(out) == [list(LS_COLUMNS)], out
    shown = {row.split()[0] for row in _rows(out)}
    printed = next(s for s in shown if by_node.label.startswith(s))
    assert 12 <= len(printed) < len(by_node.label) == 56, printed
    assert {t.label for t in twins} <= shown  # short labels print whole

    code, out, err = await _cli(capsys, *_fleet_argv(fleet, "paths", "--node", printed))
    assert code == 0 and conn.conn_id in out, err

    code, _, err = await _cli(capsys, *_fleet_argv(fleet, "paths", "--node", "ids-"))
    assert code == 2
    line = _error_line(err, "fleet paths")
    assert "node 'ids-' is ambiguous" in line and all(t.label in line for t in twins), line

    code, _, err = await _cli(capsys, *_fleet_argv(fleet, "migrate", "zzzz", "--to", SECOND))
    assert code == 2
    line = _error_line(err, "fleet migrate")
    assert "no connection 'zzzz'" in line and "quic-supervisor fleet paths" in line

    code, out, err = await _cli(
        capsys, *_fleet_argv(fleet, "migrate", conn.conn_id[:6], "--to", SECOND)
    )
    assert code == 0, err
    assert out.strip().startswith(f"{conn.conn_id}: active path /ip4/127.0.0.2/udp/"), out
    snap = await conn.refresh()
    assert [_ip(p.local_addr) for p in snap.paths if p.active] == ["127.0.0.2"]
    await conn.close()
    for agent in (by_node, *twins):
        agent.kill()


@pytest.mark.ray
async def test_fleet_listen_and_dial_then_migrate(
    fleet: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    tag = uuid.uuid4().hex[:6]
    srv = await _agent(fleet, f"srv-{tag}", persist=False)
    cli = await _agent(fleet, f"cli-{tag}", persist=False)

    code, _, err = await _cli(capsys, *_fleet_argv(fleet, "listen", "/ip4/127.0.0.1/udp/0/quic-v1"))
    assert code == 2  # which agent? the namespace has several
    assert "give --node" in _error_line(err, "fleet listen")

    argv = _fleet_argv(fleet, "listen", "/ip4/127.0.0.1/udp/0/quic-v1", "--node", srv.label)
    code, out, err = await _cli(capsys, *argv, "--json")  # no --cert: the agent makes one
    assert code == 0, err
    listening = json.loads(out)
    assert listening["node"] == srv.label and listening["handler"] == "echo"
    addr = listening["multiaddr"]
    assert addr.startswith("/ip4/127.0.0.1/udp/") and not addr.endswith("/udp/0/quic-v1")

    argv = _fleet_argv(fleet, "dial", addr, "--node", cli.label, "--insecure")
    code, _, err = await _cli(capsys, *argv, "--path", NOT_HERE)
    assert code == 2 and "203.0.113.77" in _error_line(err, "fleet dial")
    assert await cli.snapshot() == []  # the failed dial left nothing in the agent

    code, out, err = await _cli(capsys, *argv, "--path", SECOND)
    assert code == 0, err
    first, second = out.strip().splitlines()
    match = re.fullmatch(r"connected (\S+) -> (\S+) \(connection (\w+) on (\S+)\)", first)
    assert match is not None and match.group(2) == addr and match.group(4) == cli.label, first
    conn_id = match.group(3)
    assert second.startswith("path /ip4/127.0.0.2/udp/") and "validated" in second, second

    code, out, err = await _cli(capsys, *_fleet_argv(fleet, "migrate", conn_id, "--to", SECOND))
    assert code == 0, err
    job = await cli.echo(conn_id, 100_000)
    assert (await cli.echo_wait(job)).intact  # echoed by the listener's built-in handler
    (listener,) = await srv.listeners()
    info = await listener.refresh()  # the addresses its streams' datagrams came from
    assert {_ip(a) for a in info.peer_addresses} == {"127.0.0.1", "127.0.0.2"}, info

    # The server's agent lists the accepted connection as `ctl paths` on a server does.
    code, out, err = await _cli(capsys, *_fleet_argv(fleet, "paths", "--node", srv.label))
    assert code == 0, err
    # The failed dial's connection may still be listed until the server has seen it close.
    migrated = [r.split()[:4] for r in _rows(out) if "/ip4/127.0.0.2/" in r]
    assert len(migrated) == 1, out
    inbound_id, direction, listening_on, _ = migrated[0]
    assert (direction, listening_on) == ("in", addr), out
    code, _, err = await _cli(
        capsys, *_fleet_argv(fleet, "migrate", inbound_id, "--to", THIRD, "--node", srv.label)
    )
    assert code == 2 and "inbound" in _error_line(err, "fleet migrate")
    srv.kill()
    cli.kill()


@pytest.mark.ray
async def test_fleet_drain_closes_the_drained_path_and_a_restart_restores_that(
    fleet: Any, server: RigServer, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = await _agent(fleet, f"drain-{uuid.uuid4().hex[:6]}")  # desired state recorded
    conn = await agent.dial(_remote(server), alpn_protocols=["echo"], verify=False)
    await conn.as_migratable().add_path(SECOND)
    node = ("--node", agent.label)

    code, out, err = await _cli(
        capsys, *_fleet_argv(fleet, "drain", *node, "--local-addr", "127.0.0.1")
    )
    assert code == 0, err
    assert "(drained path closed)" in out and f"{agent.label}: moved 1, failed 0" in out, out
    snap = await conn.refresh()
    assert [(_ip(p.local_addr), p.active) for p in snap.paths] == [("127.0.0.2", True)]

    first = await agent.info()
    agent.kill(no_restart=False)
    async with asyncio.timeout(60):
        while True:
            with_restart = await _info_or_none(agent)
            if with_restart is not None and with_restart.pid != first.pid:
                break
            await asyncio.sleep(0.2)  # polled: a restarting actor has no readiness event
    (restored,) = with_restart.restored
    assert restored.ok and restored.paths == 1, restored  # the closed handshake path stays shut
    assert restored.active is not None and _ip(restored.active) == "127.0.0.2"

    again = await agent.connection(conn.conn_id)
    await again.as_migratable().add_path(THIRD)
    code, out, err = await _cli(
        capsys,
        *_fleet_argv(fleet, "drain", *node, "--local-addr", "127.0.0.2", "--keep-drained"),
    )
    assert code == 0 and "(drained path kept)" in out, (out, err)
    snap = await again.refresh()
    assert sorted((_ip(p.local_addr), str(p.state)) for p in snap.paths) == [
        ("127.0.0.2", "standby"),
        ("127.0.0.3", "active"),
    ]
    await again.close()
    agent.kill()


async def _info_or_none(agent: Any) -> Any:
    from supervisor.remote.fleet import SupervisorUnavailableError

    try:
        return await agent.info()
    except SupervisorUnavailableError:
        return None


@pytest.mark.ray
async def test_fleet_listings_without_agents_and_unknown_nodes(
    fleet: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = ["--address", "local", "--namespace", f"nobody-{uuid.uuid4().hex[:6]}"]
    for command in ("ls", "paths", "stats", "network"):
        code, out, _ = await _cli(capsys, "fleet", command, *empty)
        assert code == 0 and out.startswith("no agents in namespace"), (command, out)
        code, out, _ = await _cli(capsys, "fleet", command, *empty, "--json")
        assert code == 0 and json.loads(out) in ([], {}), (command, out)
    code, _, err = await _cli(capsys, *_fleet_argv(fleet, "stats", "--node", "nosuch"))
    assert code == 2
    assert "no node 'nosuch'" in _error_line(err, "fleet stats")


# ------------------------------------------------------------------------------ fresh processes


def _script() -> Path:
    if not SCRIPT.exists():
        pytest.skip(f"{SCRIPT} missing: run .venv/bin/pip install -e '.[dev,cli]'")
    return SCRIPT


def _run(argv: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [str(_script()), *argv], capture_output=True, text=True, timeout=120, env=env
    )
    return done, time.monotonic() - started


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    return {**env, **extra}


@pytest.mark.ray
def test_a_dead_address_fails_within_the_timeout() -> None:
    pytest.importorskip("ray", reason="the ray extra is not installed")
    done, took = _run(["fleet", "ls", "--address", "127.0.0.1:1", "--timeout", "5"], _env())
    print(f"fleet ls --address 127.0.0.1:1 --timeout 5 returned after {took:.2f} s")
    assert done.returncode == 2, done
    line = _error_line(done.stderr, "fleet ls")
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in line and "ray start --head" in line
    assert done.stdout == ""


@pytest.mark.ray
def test_a_refusing_cluster_is_bounded_by_the_timeout(ray_cluster: tuple[Any, str]) -> None:
    """An explicit address of a token-authenticated cluster, without the token: Ray retries
    for 20 s and more; --timeout ends it with the fix."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        pytest.skip("this cluster runs without token authentication (RAY_AUTH_MODE=disabled)")
    _, gcs = ray_cluster
    done, took = _run(["fleet", "ls", "--address", gcs, "--timeout", "3"], _env())
    print(f"fleet ls --address {gcs} (no token) --timeout 3 returned after {took:.2f} s")
    assert done.returncode == 2, done
    line = _error_line(done.stderr, "fleet ls")
    assert f"cannot reach the Ray cluster at {gcs}" in line and "RAY_AUTH_MODE=token" in line


@pytest.mark.ray
def test_rays_warnings_only_with_log_level(tmp_path: Path) -> None:
    """Ray warns about token authentication whenever it picks the token itself (a cluster
    found by "auto", or a new one): here a new one in the command's own process."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    argv = ["fleet", "ls", "--address", "local", "--namespace", "nobody", "--timeout", "60"]
    quiet, took = _run(argv, _env())
    print(f"fleet ls --address local (a new cluster) took {took:.2f} s")
    assert quiet.returncode == 0, quiet
    assert quiet.stdout.startswith("no agents in namespace 'nobody'"), quiet.stdout
    assert quiet.stderr == "", quiet.stderr
    loud, _ = _run([*argv, "--log-level", "info"], _env())
    assert loud.returncode == 0, loud
    assert "Token authentication is enabled" in loud.stderr, loud.stderr
