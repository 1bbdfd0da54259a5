"""Client-side migration over real links: two veth paths between a client and a server namespace.

The topology (tests/rig/netns.py, `TwoPathTopology`) puts the client and the server in their own
``qs-*`` namespaces, joined by two veth links (net0: 10.77.1.0/24 + fd77:1::/64, net1:
10.77.2.0/24 + fd77:2::/64; the server address 10.77.0.1 / fd77::1 sits on its loopback). pytest
runs in the root namespace: every socket is created inside its namespace by a helper thread and
handed over with ``sock=`` (client paths to `Supervisor.dial` / `add_path`, the server's to the
rig's aioquic echo server), so one event loop drives both ends. All traffic stays inside the
namespaces, which are deleted after each test (even on failure).

Faults are real: nftables drops for a black hole, ``ip link set down`` for a dead interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import random
import socket
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import Any

import pytest
import pytest_asyncio

from actors.path_state import PathState
from supervisor import Supervisor
from supervisor.core.errors import ProbeTimeoutError
from tests.rig.aioquic_server import ConnectionInfo, RigServer, echo_server
from tests.rig.certs import CertPair, generate_cert
from tests.rig.netns import (
    Filters,
    TwoPathTopology,
    blackhole,
    cleanup_stale,
    netns_available,
)
from tests.support import connection_actor

pytestmark = pytest.mark.netns

V4, V6 = socket.AF_INET, socket.AF_INET6
#: The tests' own guards are several times the probe timeout (no tighter timing asserts).
PROBE_TIMEOUT = 0.5
GUARD = 6 * PROBE_TIMEOUT


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def topo() -> Iterator[TwoPathTopology]:
    """A fresh two-path topology; namespaces (and their nft tables) are deleted afterwards."""
    ok, reason = netns_available()
    if not ok:
        pytest.skip(reason)
    cleanup_stale()
    with TwoPathTopology(ipv6=True) as topology:
        yield topology


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> CertPair:
    """Self-signed "localhost" certificate (the client verifies it by name, cafile=)."""
    ips = (TwoPathTopology.SERVER_V4, TwoPathTopology.SERVER_V6)
    return generate_cert(tmp_path_factory.mktemp("netns-cert"), extra_ips=ips)


@contextlib.asynccontextmanager
async def _server(topo: TwoPathTopology, cert: CertPair, family: int) -> AsyncIterator[RigServer]:
    async with echo_server(
        sock=topo.server_socket(socket.AddressFamily(family)),
        certfile=cert.certfile,
        keyfile=cert.keyfile,
    ) as server:
        yield server


@pytest_asyncio.fixture
async def server4(topo: TwoPathTopology, cert: CertPair) -> AsyncIterator[RigServer]:
    """aioquic echo server on 10.77.0.1 (server namespace), socket made in its namespace."""
    async with _server(topo, cert, V4) as server:
        yield server


@pytest_asyncio.fixture
async def server6(topo: TwoPathTopology, cert: CertPair) -> AsyncIterator[RigServer]:
    """aioquic echo server on fd77::1 (server namespace)."""
    async with _server(topo, cert, V6) as server:
        yield server


@pytest_asyncio.fixture
async def sup() -> AsyncIterator[Supervisor]:
    async with Supervisor(enable_experimental_connection_migration=True) as supervisor:
        yield supervisor


# ---- helpers -----------------------------------------------------------------------------------


def _maddr(host: str, port: int) -> str:
    return f"/ip6/{host}/udp/{port}/quic-v1" if ":" in host else f"/ip4/{host}/udp/{port}/quic-v1"


async def _dial(sup: Supervisor, server: RigServer, sock: socket.socket, cert: CertPair) -> Any:
    return await sup.dial(
        _maddr(server.host, server.port),
        alpn_protocols=["echo"],
        cafile=str(cert.certfile),
        sock=sock,
    )


async def _echo(conn: Any, payload: bytes) -> bytes:
    """Send `payload` on a new stream, FIN, and read back everything the server echoes."""
    stream = await conn.open_stream()
    await stream.write(payload)
    await stream.close()
    got = bytearray()
    while chunk := await stream.read(65536):
        got += chunk
    return bytes(got)


async def _wait(predicate: Any, timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
    assert predicate(), what


def _peer_is(conn: ConnectionInfo, addr: tuple[str, int]) -> bool:
    return conn.current_peer() == addr


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _addr(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return str(host), int(port)


# ---- 1. black-holed path -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _blackholed_net1(
    topo: TwoPathTopology, server: RigServer, sup: Supervisor, cert: CertPair
) -> AsyncIterator[tuple[Any, Any, Filters, tuple[str, int]]]:
    """A connection on net0 with a second path on net1, net1 silently dropped by the server
    namespace (nft input hook, match the client's net1 address: nobody gets an error)."""
    net1 = topo.paths[1]
    sock0 = topo.client_socket(0)
    addr0 = _addr(sock0)
    conn = await _dial(sup, server, sock0, cert)
    assert await _echo(conn, b"before" * 1000) == b"before" * 1000
    path = await conn.as_migratable().add_path(sock=topo.client_socket(1))
    assert str(path.info().local_addr).startswith(f"/ip4/{net1.client_v4}/udp/")
    with Filters(
        [blackhole(topo.server.name, net1.client_v4, direction="in", match="src")]
    ) as hole:
        yield conn, path, hole, addr0
    await conn.close()


async def _probe_expecting_timeout(path: Any) -> ProbeTimeoutError:
    with pytest.raises(ProbeTimeoutError) as failure:
        async with asyncio.timeout(GUARD):  # the test's guard, several times the timeout
            await path.probe(timeout=PROBE_TIMEOUT)
    return failure.value


async def test_blackholed_path_probe_times_out_and_path_is_closable(
    topo: TwoPathTopology, server4: RigServer, sup: Supervisor, cert: CertPair
) -> None:
    async with _blackholed_net1(topo, server4, sup, cert) as (conn, path, hole, addr0):
        mc = conn.as_migratable()
        error = await _probe_expecting_timeout(path)
        assert error.timeout == PROBE_TIMEOUT
        assert error.__cause__ is None  # silence, not an ICMP error
        assert hole.dropped() >= 1, "the challenges must have left on net1 (and been dropped)"
        assert path.info().state is PathState.FAILED
        assert path.info().rtt is None
        assert mc.active_path().local_addr == conn.local_multiaddr

        await path.close()
        assert path.info().state is PathState.CLOSED
        assert len(mc.available_paths()) == 1
        assert await _echo(conn, b"after" * 1000) == b"after" * 1000
        # Nothing from net1 ever reached the server; the connection stayed on net0.
        assert set(server4.connections[0].datagrams_from) == {addr0}


async def test_blackholed_probe_leaves_active_congestion_window_unchanged(
    topo: TwoPathTopology, server4: RigServer, sup: Supervisor, cert: CertPair
) -> None:
    async with _blackholed_net1(topo, server4, sup, cert) as (conn, path, _hole, _addr0):
        quic = connection_actor(conn).quic  # test-only introspection: the MigratingQuicConnection
        await _wait(lambda: quic.bytes_in_flight == 0, 5, "connection idle before the probe")
        cwnd_before = quic.congestion_window
        await _probe_expecting_timeout(path)
        await _wait(lambda: quic.bytes_in_flight == 0, 5, "connection idle after the probe")
        assert quic.congestion_window == cwnd_before, "probes fed the active path's cc"


# ---- 2. migration over the two veth links ------------------------------------------------------


async def test_stream_survives_migration_net0_net1_net0(
    topo: TwoPathTopology, server4: RigServer, sup: Supervisor, cert: CertPair
) -> None:
    sock0, sock1 = topo.client_socket(0), topo.client_socket(1)
    addr0, addr1 = _addr(sock0), _addr(sock1)
    conn = await _dial(sup, server4, sock0, cert)
    mc = conn.as_migratable()
    p0 = mc.paths()[0]
    p1 = await mc.add_path(sock=sock1)
    srv = await server4.wait_connection()

    stream = await conn.open_stream()
    rng = random.Random(2)
    sent = hashlib.sha256()
    received = hashlib.sha256()
    counts = {"sent": 0, "received": 0}
    stop = asyncio.Event()

    async def writer() -> None:
        while not stop.is_set() or counts["sent"] < 2_000_000:
            chunk = rng.randbytes(16_384)
            await stream.write(chunk)
            sent.update(chunk)
            counts["sent"] += len(chunk)
        await stream.close()

    async def reader() -> None:
        while chunk := await stream.read(65536):
            received.update(chunk)
            counts["received"] += len(chunk)

    async def progressed(by: int) -> None:
        mark = counts["received"] + by
        await _wait(lambda: counts["received"] >= mark, 10, f"{by} more bytes echoed")

    tasks = [asyncio.create_task(writer()), asyncio.create_task(reader())]
    try:
        await progressed(200_000)
        async with asyncio.timeout(10):
            await p1.probe(timeout=2.0)
        assert p1.info().state is PathState.STANDBY and p1.info().rtt is not None

        for target, local in ((p1, addr1), (p0, addr0)):
            async with asyncio.timeout(10):
                await target.switch()
            assert mc.active_path().local_addr == target.info().local_addr
            assert target.info().active
            await server4.wait_for(partial(_peer_is, srv, local), 5, f"server sends to {local}")
            before = srv.datagrams_from[local]
            await progressed(300_000)  # the stream keeps flowing on the new path
            assert srv.datagrams_from[local] > before
        stop.set()
        async with asyncio.timeout(30):
            await asyncio.gather(*tasks)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    assert counts["received"] == counts["sent"] >= 2_000_000
    assert received.hexdigest() == sent.hexdigest(), "bytes lost or reordered"
    assert {addr0, addr1} <= set(srv.datagrams_from)
    assert srv.current_peer() == addr0
    assert mc.active_path().local_addr == conn.local_multiaddr
    await p1.close()
    await conn.close()


# ---- 3. IPv6 migration between two nodad addresses ---------------------------------------------


@pytest.mark.parametrize("second", ["other-link", "same-link"])
async def test_ipv6_migration_between_nodad_addresses(
    topo: TwoPathTopology,
    server6: RigServer,
    sup: Supervisor,
    cert: CertPair,
    second: str,
) -> None:
    net0 = topo.paths[0]
    if second == "other-link":
        # The rig's fd77:2::2 on c1 (added with nodad), source-routed over net1.
        sock1 = topo.client_socket(1, V6)
    else:
        # A second address on net0's interface, added here with nodad (usable at once).
        extra = "fd77:1::3"
        topo.client.run(["ip", "-6", "addr", "add", f"{extra}/64", "dev", net0.client_if, "nodad"])
        sock1 = topo.client.socket(V6, extra)
    sock0 = topo.client_socket(0, V6)
    addr0, addr1 = _addr(sock0), _addr(sock1)
    assert addr0[0] == net0.client_v6 and addr0[0] != addr1[0]

    conn = await _dial(sup, server6, sock0, cert)
    mc = conn.as_migratable()
    assert str(conn.local_multiaddr) == _maddr(*addr0)
    assert str(mc.active_path().remote_addr) == _maddr(topo.SERVER_V6, server6.port)
    path = await mc.add_path(sock=sock1)
    assert str(path.info().local_addr) == _maddr(*addr1)

    async with asyncio.timeout(10):
        await path.probe(timeout=2.0)
        await path.switch()
    active = mc.active_path()
    assert str(active.local_addr) == _maddr(*addr1)
    assert str(active.local_addr).startswith("/ip6/")

    payload = os.urandom(500_000)
    assert await _echo(conn, payload) == payload
    srv = await server6.wait_connection()
    assert srv.current_peer() == addr1
    assert {addr0, addr1} <= srv.peer_addresses
    await conn.close()


# ---- 4. link down on the standby path ----------------------------------------------------------


async def test_link_down_on_standby_path_fails_probe_typed_and_leaks_nothing(
    topo: TwoPathTopology, server4: RigServer, sup: Supervisor, cert: CertPair
) -> None:
    conn = await _dial(sup, server4, topo.client_socket(0), cert)
    mc = conn.as_migratable()
    assert await _echo(conn, b"x" * 10_000) == b"x" * 10_000
    tasks_before = len(asyncio.all_tasks())
    fds_before = _fd_count()

    path = await mc.add_path(sock=topo.client_socket(1))
    topo.link_down(1)  # client side: routes gone, sendto from 10.77.2.2 -> ENETUNREACH

    with pytest.raises(ProbeTimeoutError) as failure:
        async with asyncio.timeout(GUARD):
            await path.probe(timeout=PROBE_TIMEOUT)
    # sendto() from the downed link's address fails at once (the rig's "from ADDR unreachable"
    # rule); asyncio hands the OSError to error_received and the probe fails without waiting.
    cause = failure.value.__cause__
    assert isinstance(cause, OSError) and cause.errno == errno.ENETUNREACH, cause
    assert path.info().state is PathState.FAILED

    await path.close()
    assert path.info().state is PathState.CLOSED
    assert _fd_count() == fds_before, "the failed path's socket leaked"
    await _wait(lambda: len(asyncio.all_tasks()) <= tasks_before, 2, "path tasks ended")
    assert await _echo(conn, b"y" * 10_000) == b"y" * 10_000
    assert mc.active_path().local_addr == conn.local_multiaddr

    await conn.close()
