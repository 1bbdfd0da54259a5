"""The Ray agent's health and orderly stop on a real local Ray cluster: the control-socket
probes (``ctl health``), the stop request (``ctl stop`` and ``RemoteSupervisor.stop``), and a
real SIGTERM to the agent's worker process.

One ``ray.init`` per module. The QUIC server is the rig's echo server in this process; the
agents dial it from their own worker processes, so "closed by the peer" means the server's
aioquic connection received a CONNECTION_CLOSE frame (not its idle timeout, which is 60 s).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")

from actors.errors import InvalidArgumentError  # noqa: E402
from supervisor.remote.control import ControlClient, ControlSocketError  # noqa: E402
from supervisor.remote.fleet import Fleet, RemoteSupervisor  # noqa: E402
from supervisor.remote.ray_agent import kv_prefix  # noqa: E402
from tests.rig.aioquic_server import ConnectionInfo, RigServer, echo_server  # noqa: E402
from tests.rig.certs import generate_cert  # noqa: E402
from tests.rig.waiting import poll_until  # noqa: E402
from tests.support import local_ray_fleet  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(120)]

CLI = [os.path.join(os.path.dirname(sys.executable), "quic-supervisor")]


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with local_ray_fleet("qs-stop") as fleet:
        yield fleet


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RigServer]:
    cert = generate_cert(tmp_path)
    async with echo_server(certfile=cert.certfile, keyfile=cert.keyfile) as srv:
        yield srv


@pytest.fixture
def sock_dir() -> Iterator[str]:
    """A short directory: a Unix socket path must fit in 107 bytes."""
    path = tempfile.mkdtemp(prefix="qs-", dir="/tmp")
    yield path
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


async def _agent(fleet: Fleet, sock: str, **kwargs: Any) -> RemoteSupervisor:
    sup = fleet.start_agent(label=f"stop-{uuid.uuid4().hex[:6]}", control_socket=sock, **kwargs)
    await sup.info()  # the worker runs and has started (the socket first)
    return sup


def _recorded(fleet: Fleet, sup: RemoteSupervisor) -> list[Any]:
    keys: list[Any] = ray.experimental.internal_kv._internal_kv_list(
        kv_prefix(fleet.namespace, sup.label), namespace="quic-supervisor"
    )
    return keys


def _closed_by_peer(info: ConnectionInfo) -> bool:
    """The server's connection received CONNECTION_CLOSE (aioquic's idle timeout and other
    local closes carry frame type PADDING and their own reason)."""
    event = info.quic._close_event
    return event is not None and event.reason_phrase != "Idle timeout"


def _probe(sock: str, *flags: str) -> tuple[int, str, float, int]:
    """Run ``ctl health`` as kubelet would: exit status, its line, wall seconds, max RSS KiB."""
    with tempfile.NamedTemporaryFile("r") as rss:
        started = time.monotonic()
        proc = subprocess.run(
            [
                "/usr/bin/time",
                "-f",
                "%M",
                "-o",
                rss.name,
                *CLI,
                "ctl",
                "--socket",
                sock,
                "health",
                *flags,
                "--timeout",
                "5",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        wall = time.monotonic() - started
        kib = int(rss.read().split()[-1])
    return proc.returncode, (proc.stdout + proc.stderr).strip(), wall, kib


async def test_health_probes_and_stop_request_close_with_connection_close(
    fleet: Fleet, server: RigServer, sock_dir: str
) -> None:
    sock = os.path.join(sock_dir, "agent.sock")
    sup = await _agent(fleet, sock, persist=True)
    conn = await sup.dial(
        f"/ip4/127.0.0.1/udp/{server.port}/quic-v1", alpn_protocols=["echo"], verify=False
    )
    seen = await server.wait_connection(0)
    await poll_until(lambda: len(_recorded(fleet, sup)) == 1, timeout=10, what="the record")

    for flags in ((), ("--ready",), ("--live",)):
        status, line, wall, rss = await asyncio.to_thread(_probe, sock, *flags)
        print(
            f"probe ctl health {' '.join(flags)}: {wall * 1000:.0f} ms, max RSS {rss} KiB: {line}"
        )
        assert status == 0, line
        assert line.startswith("live" if flags == ("--live",) else "ready"), line
    health = await sup.health()  # the same answer through Ray
    assert health.ready and health.live and health.connections == 1, health

    # A stream stays open (a paced echo), so the stop waits for the deadline and cuts it.
    job = await sup.echo(conn.conn_id, 50_000_000, chunk=1000, pace=0.01)
    async with ControlClient(sock, timeout=10) as ctl, ControlClient(sock, timeout=10) as probe:
        stopping = asyncio.ensure_future(ctl.stop(deadline=2.0))
        while not (h := await probe.health()).stopping:  # each answer is one round trip
            assert not stopping.done()
        assert not h.ready and h.why == "stopping" and h.live, h
        status, line, _, _ = await asyncio.to_thread(_probe, sock, "--ready")
        assert status == 1 and line.startswith("NOT READY: stopping"), line
        report = await stopping
        print(f"stop: {report}")
        assert report.connections == 1 and report.deadline_hit and report.streams_cut >= 1
        assert 2.0 <= report.elapsed < 10.0, report
        assert (await ctl.stop(deadline=1.0)).already
        assert not (await probe.health()).ready
    await server.wait_for(lambda: _closed_by_peer(seen), timeout=5, what="CONNECTION_CLOSE")
    del job

    assert len(_recorded(fleet, sup)) == 1  # the desired state is kept for a restart
    sup.kill()


async def test_sigterm_to_worker_runs_the_stop_before_the_process_ends(
    fleet: Fleet, server: RigServer, sock_dir: str
) -> None:
    sock = os.path.join(sock_dir, "term.sock")
    sup = await _agent(fleet, sock, persist=False, max_restarts=0)
    await sup.dial(
        f"/ip4/127.0.0.1/udp/{server.port}/quic-v1", alpn_protocols=["echo"], verify=False
    )
    seen = await server.wait_connection(0)
    pid = (await sup.info()).pid
    assert os.path.exists(sock)

    started = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    # The stop at exit has a 5 s deadline (no stream open: it closes at once).
    await server.wait_for(lambda: _closed_by_peer(seen), timeout=5, what="CONNECTION_CLOSE")
    closed_after = time.monotonic() - started

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    await poll_until(gone, timeout=20, interval=0.05, what="the worker process to end")
    print(
        f"SIGTERM: CONNECTION_CLOSE seen after {closed_after:.3f} s, process gone after "
        f"{time.monotonic() - started:.3f} s"
    )
    assert not os.path.exists(sock)  # the control socket was closed and removed


async def test_bad_input_is_refused_in_one_line(
    fleet: Fleet, sock_dir: str, tmp_path: Path
) -> None:
    with pytest.raises(InvalidArgumentError, match="deadline"):
        await ControlClient(os.path.join(sock_dir, "x.sock")).stop(deadline=-1)
    missing = os.path.join(sock_dir, "missing.sock")
    with pytest.raises(ControlSocketError, match="no supervisor is serving there"):
        async with ControlClient(missing) as ctl:
            await ctl.health()
    status, line, _, _ = await asyncio.to_thread(_probe, missing)
    assert status == 1 and line.startswith("NOT HEALTHY: control socket") and "\n" not in line
    proc = await asyncio.to_thread(
        subprocess.run,
        [*CLI, "ctl", "--socket", missing, "stop", "--deadline", "-1"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--deadline" in proc.stderr and ">= 0" in proc.stderr
    proc = await asyncio.to_thread(
        subprocess.run, [*CLI, "ctl", "--socket", missing, "stop"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no supervisor is serving" in proc.stderr
    sup = fleet.start_agent(label=f"bad-{uuid.uuid4().hex[:6]}", persist=False)
    with pytest.raises(InvalidArgumentError, match="deadline"):
        await sup.stop(deadline=float("nan"))
    sup.kill()


async def test_fleet_health_and_stop_commands(
    fleet: Fleet, server: RigServer, capsys: pytest.CaptureFixture[str]
) -> None:
    from supervisor.cli.fleet import main

    sup = fleet.start_agent(label=f"cli-{uuid.uuid4().hex[:6]}", persist=False)
    await sup.dial(
        f"/ip4/127.0.0.1/udp/{server.port}/quic-v1", alpn_protocols=["echo"], verify=False
    )
    seen = await server.wait_connection(0)
    flags = ["--namespace", fleet.namespace, "--node", sup.label]
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["fleet", "health", "--ready", *flags]) == 0
    assert capsys.readouterr().out.strip() == f"{sup.label}: ready (1 connection(s))"

    code = await asyncio.to_thread(main, ["fleet", "stop", "--namespace", fleet.namespace])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "fleet stop needs --node" in err, err

    assert await asyncio.to_thread(main, ["fleet", "stop", "--deadline", "1", *flags]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"{sup.label}: stopped: 1 connection(s) closed, every stream had ended")
    await server.wait_for(lambda: _closed_by_peer(seen), timeout=5, what="CONNECTION_CLOSE")
    assert await asyncio.to_thread(main, ["fleet", "health", "--ready", *flags]) == 1
    assert capsys.readouterr().out.strip() == f"{sup.label}: NOT READY: stopped (0 connection(s))"
    sup.kill()
