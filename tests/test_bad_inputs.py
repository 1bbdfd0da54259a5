"""Bad inputs: each raises a typed error naming the input, leaks nothing (file descriptors,
tasks) and leaves the connection usable (an echo round trip afterwards)."""

from __future__ import annotations

import contextlib
import math
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from actors.path_state import PathState
from supervisor import Supervisor
from supervisor.core.errors import (
    ActivePathCloseError,
    AddressInUseError,
    ConnectionClosedError,
    DialTimeoutError,
    InvalidAddressError,
    MigrationNotEnabledError,
    MigrationNotSupportedError,
    NoConnectionIdError,
    PathAlreadyExistsError,
    PathClosedError,
    PathLimitError,
    PathNotValidatedError,
    ProbeTimeoutError,
)
from supervisor.core.handles import Connection
from tests.rig.aioquic_server import RigServer, echo_server
from tests.rig.certs import CertPair
from tests.rig.udp_shim import udp_shim
from tests.support import (
    addr_of,
    connection_actor,
    dial_echo,
    echo_roundtrip,
    fd_count,
    other_tasks,
)


@contextlib.asynccontextmanager
async def unchanged(conn: Connection, server: RigServer | None = None) -> AsyncIterator[None]:
    """Around a failing call: no fd or task leaked, no datagram from a new client address,
    and the connection still echoes."""
    fds, tasks = fd_count(), other_tasks()
    seen = server.peer_addresses() if server is not None else None
    yield
    assert fd_count() == fds, "file descriptors leaked"
    assert other_tasks() - tasks == set(), "tasks leaked"
    await echo_roundtrip(conn)
    if server is not None:
        assert server.peer_addresses() == seen, "something was sent from a new address"


@pytest.fixture
async def conn(sup: Supervisor, echo: RigServer) -> Connection:
    return await dial_echo(sup, echo)


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ("127.0.0.2:4433", "not a multiaddr"),
        ("/ip4/127.0.0.2/tcp/0", "TCP"),
        ("/ip4/127.0.0.2/udp/0", "quic-v1"),
        ("/ip4/127.0.0.2/udp/0/quic", "draft-29"),
        ("/dns4/localhost/udp/0/quic-v1", "DNS"),
    ],
)
async def test_malformed_local_address(
    conn: Connection, echo: RigServer, bad: str, needle: str
) -> None:
    async with unchanged(conn, echo):
        with pytest.raises(InvalidAddressError) as err:
            await conn.as_migratable().add_path(bad)
    assert bad in str(err.value) and needle in str(err.value)
    assert err.value.addr == bad


async def test_not_a_string(conn: Connection) -> None:
    async with unchanged(conn):
        with pytest.raises(TypeError, match="local_addr"):
            await conn.as_migratable().add_path(12345)  # type: ignore[arg-type]


async def test_address_not_on_this_host(conn: Connection, echo: RigServer) -> None:
    bad = "/ip4/192.0.2.1/udp/0/quic-v1"
    async with unchanged(conn, echo):
        with pytest.raises(InvalidAddressError, match="not an address of this host") as err:
            await conn.as_migratable().add_path(bad)
    assert "192.0.2.1" in str(err.value)
    assert len(conn.as_migratable().available_paths()) == 1


async def test_ip_family_unlike_the_peers(conn: Connection, echo: RigServer) -> None:
    bad = "/ip6/::1/udp/0/quic-v1"
    async with unchanged(conn, echo):
        with pytest.raises(InvalidAddressError, match="family") as err:
            await conn.as_migratable().add_path(bad)
    assert bad in str(err.value)


async def test_port_in_use(conn: Connection, echo: RigServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.2", 0))
        port = holder.getsockname()[1]
        bad = f"/ip4/127.0.0.2/udp/{port}/quic-v1"
        async with unchanged(conn, echo):
            with pytest.raises(AddressInUseError, match="already in use") as err:
                await conn.as_migratable().add_path(bad)
        assert bad in str(err.value)


async def test_duplicate_path(conn: Connection, echo: RigServer) -> None:
    mc = conn.as_migratable()
    first = await mc.add_path("/ip4/127.0.0.2/udp/0/quic-v1")
    bound = str(first.info().local_addr)
    for bad in ("/ip4/127.0.0.2/udp/0/quic-v1", bound, str(conn.local_multiaddr)):
        async with unchanged(conn, echo):
            with pytest.raises(PathAlreadyExistsError) as err:
                await mc.add_path(bad)
        assert bad in str(err.value)
    assert len(mc.available_paths()) == 2
    # Once closed, the address may be used again.
    await first.close()
    again = await mc.add_path(bound)
    assert str(again.info().local_addr) == bound


async def test_eighth_path(conn: Connection, echo: RigServer) -> None:
    mc = conn.as_migratable()
    paths = [await mc.add_path(f"/ip4/127.0.0.{i}/udp/0/quic-v1") for i in range(2, 8)]
    assert len(mc.available_paths()) == 7
    async with unchanged(conn, echo):
        with pytest.raises(PathLimitError, match="7 paths"):
            await mc.add_path("/ip4/127.0.0.8/udp/0/quic-v1")
    # All seven are real paths: each probes with its own CID.
    for path in paths:
        await path.probe()
    assert len(set(connection_actor(conn).quic.path_cids().values())) == 7


async def test_add_path_on_a_closed_connection(conn: Connection) -> None:
    mc = conn.as_migratable()
    await conn.close()
    fds = fd_count()
    with pytest.raises(ConnectionClosedError):
        await mc.add_path("/ip4/127.0.0.2/udp/0/quic-v1")
    assert fd_count() == fds
    assert mc.supports_migration() is False
    assert mc.available_paths() == []


async def test_switch_to_a_path_that_is_not_validated(sup: Supervisor, echo: RigServer) -> None:
    async with udp_shim(echo.addr) as shim:
        conn = await dial_echo(sup, shim.listen_addr)
        mc = conn.as_migratable()
        unprobed = await mc.add_path("/ip4/127.0.0.2/udp/0/quic-v1")
        async with unchanged(conn):
            with pytest.raises(PathNotValidatedError, match="new") as err:
                await unprobed.switch()
        assert str(unprobed.info().local_addr).split("/")[2] in str(err.value)

        failing = await mc.add_path("/ip4/127.0.0.3/udp/0/quic-v1")
        shim.drop_client_to_server(addr_of(failing.info().local_addr))
        with pytest.raises(ProbeTimeoutError) as timeout_err:
            await failing.probe(timeout=0.3)
        assert timeout_err.value.timeout == 0.3
        assert failing.info().state is PathState.FAILED
        async with unchanged(conn):
            with pytest.raises(PathNotValidatedError, match="failed"):
                await failing.switch()

        closed = await mc.add_path("/ip4/127.0.0.4/udp/0/quic-v1")
        await closed.probe()
        await closed.close()
        async with unchanged(conn):
            with pytest.raises(PathClosedError):
                await closed.switch()
            with pytest.raises(PathClosedError):
                await closed.probe()
        assert mc.active_path().local_addr == conn.local_multiaddr


async def test_close_the_active_path(conn: Connection, echo: RigServer) -> None:
    [active] = conn.as_migratable().paths()
    async with unchanged(conn, echo):
        with pytest.raises(ActivePathCloseError) as err:
            await active.close()
    assert str(active.info().local_addr).split("/")[2] in str(err.value)
    assert active.info().state is PathState.ACTIVE


async def test_double_close_is_idempotent(conn: Connection) -> None:
    mc = conn.as_migratable()
    path = await mc.add_path("/ip4/127.0.0.2/udp/0/quic-v1")
    await path.probe()
    await path.close()
    async with unchanged(conn):
        await path.close()
    assert path.info().state is PathState.CLOSED
    await conn.close()
    await conn.close()
    await path.close()  # a path of a closed connection: still nothing to do
    assert conn.is_closed


@pytest.mark.parametrize("timeout", [0, -1.0, math.nan])
async def test_probe_timeout_must_be_positive(conn: Connection, timeout: float) -> None:
    path = await conn.as_migratable().add_path("/ip4/127.0.0.2/udp/0/quic-v1")
    async with unchanged(conn):
        with pytest.raises(ValueError, match="timeout"):
            await path.probe(timeout=timeout)
    assert path.info().state is PathState.NEW


async def test_no_spare_connection_id(sup: Supervisor, echo: RigServer) -> None:
    conn = await dial_echo(sup, echo)
    quic = connection_actor(conn).quic
    # The rig emulates a peer that never replenishes the CIDs it issued (the 7 spares a stock
    # aioquic server hands out are all there is).
    server_quic: Any = echo.connections[0].quic
    server_quic._replenish_connection_ids = lambda: None
    mc = conn.as_migratable()
    await echo_roundtrip(conn)
    assert mc.spare_connection_ids() == quic.spare_peer_cids == 7
    while quic.spare_peer_cids:
        path = await mc.add_path("/ip4/127.0.0.2/udp/0/quic-v1")
        await path.probe()
        assert mc.spare_connection_ids() == quic.spare_peer_cids  # read-your-writes
        await path.close()
    assert mc.spare_connection_ids() == 0
    last = await mc.add_path("/ip4/127.0.0.3/udp/0/quic-v1")
    async with unchanged(conn, echo):
        with pytest.raises(NoConnectionIdError) as err:
            await last.probe(timeout=5)
    assert "127.0.0.3" in str(err.value)
    assert err.value.spare == 0 and err.value.in_use == 1  # the handshake path's
    assert "0 spare, 1 held by paths" in str(err.value)
    assert last.info().state is PathState.NEW
    await last.close()


@pytest.mark.parametrize("listening", [False, True], ids=["port-unreachable", "silent-peer"])
async def test_dial_with_no_server(sup: Supervisor, listening: bool) -> None:
    # A closed port answers with ICMP port unreachable on loopback; a bound socket that never
    # answers is silent. Both end in the same clear timeout error.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        if not listening:
            sock.close()
        fds, tasks = fd_count(), other_tasks()
        with pytest.raises(DialTimeoutError) as err:
            await sup.dial(
                f"/ip4/127.0.0.1/udp/{port}/quic-v1", alpn_protocols=["echo"], timeout=0.5
            )
        assert f"127.0.0.1:{port}" in str(err.value) and err.value.timeout == 0.5
        assert fd_count() == fds and other_tasks() - tasks == set()
        assert sup.connections() == []


async def test_peer_disabled_active_migration(sup: Supervisor, cert: CertPair) -> None:
    async with echo_server(
        certfile=cert.certfile, keyfile=cert.keyfile, disable_active_migration=True
    ) as server:
        conn = await dial_echo(sup, server)
        mc = conn.as_migratable()
        assert mc.supports_migration() is False
        async with unchanged(conn, server):
            with pytest.raises(MigrationNotSupportedError, match="disable_active_migration"):
                await mc.add_path("/ip4/127.0.0.2/udp/0/quic-v1")
            # Checked before the duplicate address.
            with pytest.raises(MigrationNotSupportedError):
                await mc.add_path(str(conn.local_multiaddr))
        assert len(mc.available_paths()) == 1
        assert server.peer_addresses() == {addr_of(conn.local_multiaddr)}


async def test_argument_errors_come_before_state_errors(echo: RigServer) -> None:
    async with Supervisor(enable_experimental_connection_migration=False) as sup:
        conn = await dial_echo(sup, echo)
        mc = conn.as_migratable()
        async with unchanged(conn, echo):
            with pytest.raises(InvalidAddressError):
                await mc.add_path("/ip4/127.0.0.2/tcp/0")
            with pytest.raises(MigrationNotEnabledError):  # before the duplicate address
                await mc.add_path(str(conn.local_multiaddr))
        await conn.close()
        with pytest.raises(InvalidAddressError):
            await mc.add_path("not-an-address")
