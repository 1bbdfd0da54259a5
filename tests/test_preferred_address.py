"""The server's preferred address (RFC 9000 §9.6): ignored by default, followed on request.

The interop runner's ``connectionmigration`` case is this one. ngtcp2's ``gtlsserver
--preferred-ipv4-addr`` serves on the address it advertises; stock aioquic 1.7.2 servers cannot
advertise one, so the rig's aioquic server adds the transport parameter (with a listening-only
sink, or nothing at all for addresses a client must refuse).
"""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from supervisor import Supervisor
from supervisor.core.errors import InvalidArgumentError
from supervisor.core.events import EvtConnectionMigrationCompleted
from supervisor.h3 import http3_get
from tests.rig.aioquic_server import echo_server
from tests.rig.certs import CertPair
from tests.rig.ngtcp2 import free_udp_port, gtlsserver, gtlsserver_available
from tests.support import addr_of, connection_actor, dial_echo, echo_roundtrip, event_log

pytest_plugins = ["tests.rig.fixtures"]

PREFERRED_HOST = "127.0.0.5"


def _skip_without_ngtcp2() -> None:
    ok, reason = gtlsserver_available()
    if not ok:
        pytest.skip(reason)


@pytest.mark.interop
@pytest.mark.parametrize("mode", ["follow", "ignore"])
async def test_ngtcp2_preferred_address(rig_cert: CertPair, mode: str) -> None:
    _skip_without_ngtcp2()
    preferred_port = free_udp_port(PREFERRED_HOST)
    async with (
        gtlsserver(
            certfile=rig_cert.certfile,
            keyfile=rig_cert.keyfile,
            cadata=rig_cert.cert_pem,
            size_mb=1,
            extra_args=[f"--preferred-ipv4-addr={PREFERRED_HOST}:{preferred_port}"],
        ) as server,
        Supervisor(enable_experimental_connection_migration=True, preferred_address=mode) as sup,
    ):
        async with event_log(sup, EvtConnectionMigrationCompleted) as log:
            conn = await sup.dial(
                f"/ip4/127.0.0.1/udp/{server.port}/quic-v1",
                alpn_protocols=["h3"],
                cafile=str(rig_cert.certfile),
            )
            mc = conn.as_migratable()
            if mode == "follow":
                await log.wait_for(lambda: log.of(EvtConnectionMigrationCompleted), 10)
                (done,) = log.of(EvtConnectionMigrationCompleted)
                assert done.reason == "preferred_address"
        response = await http3_get(conn, "/file", authority=f"localhost:{server.port}")
        assert response.status == 200
        assert hashlib.sha256(response.body).hexdigest() == server.sha256["file"]
        stats = await sup.migration_stats()
        active = mc.active_path()
        if mode == "follow":
            assert stats.preferred_address == {"followed": 1}
            assert addr_of(active.remote_addr) == (PREFERRED_HOST, preferred_port)
            # The dialled path was closed; the one left is first-class in the path table.
            assert [addr_of(p.remote_addr) for p in mc.available_paths()] == [
                (PREFERRED_HOST, preferred_port)
            ]
            # A fresh CID (not the handshake's, sequence 0) on the new 4-tuple.
            quic = connection_actor(conn).quic
            (seq,) = quic.path_cid_sequences().values()
            assert seq is not None and seq > 0
            assert f"local=[{PREFERRED_HOST}]:{preferred_port}" in server.log()
        else:
            assert stats.preferred_address == {"ignored": 1} and stats.ended == 0
            assert addr_of(active.remote_addr) == ("127.0.0.1", server.port)
            assert f"local=[{PREFERRED_HOST}]:{preferred_port}" not in server.log()


async def test_a_preferred_address_nobody_serves_is_not_followed(cert: CertPair) -> None:
    async with (
        echo_server(
            certfile=cert.certfile,
            keyfile=cert.keyfile,
            preferred_address=(PREFERRED_HOST, 0),  # a sink that never answers
        ) as server,
        Supervisor(
            enable_experimental_connection_migration=True, preferred_address="follow"
        ) as sup,
    ):
        conn = await dial_echo(sup, server)
        await server.wait_for(lambda: server.preferred_address_datagrams, 10)  # it was probed
        async with asyncio.timeout(10):
            while (await sup.migration_stats()).preferred_address != {"unreachable": 1}:
                await echo_roundtrip(conn, size=16)
        mc = conn.as_migratable()
        assert mc.active_path().local_addr == conn.local_multiaddr
        assert len(mc.available_paths()) == 1  # the failed path was closed
        assert (await sup.migration_stats()).ended == 0
        await echo_roundtrip(conn)


@pytest.mark.parametrize("unsafe", [("10.0.0.9", 4434), ("224.0.0.251", 4434)])
async def test_unsafe_preferred_addresses_are_refused_and_counted(
    cert: CertPair, unsafe: tuple[str, int]
) -> None:
    """A loopback dial told to go to a private or multicast address: refused, nothing sent
    there (the rig advertises it with nothing listening)."""
    async with (
        echo_server(
            certfile=cert.certfile,
            keyfile=cert.keyfile,
            preferred_address=unsafe,
            preferred_sink=False,
        ) as server,
        Supervisor(
            enable_experimental_connection_migration=True, preferred_address="follow"
        ) as sup,
    ):
        conn = await dial_echo(sup, server)
        async with asyncio.timeout(10):
            while (await sup.migration_stats()).preferred_address != {"refused": 1}:
                await echo_roundtrip(conn, size=16)
        assert len(conn.as_migratable().available_paths()) == 1


def test_preferred_address_option_is_checked() -> None:
    with pytest.raises(InvalidArgumentError, match="preferred_address"):
        Supervisor(preferred_address="sometimes")
    with pytest.raises(InvalidArgumentError, match="enable_experimental_connection_migration"):
        Supervisor(preferred_address="follow")
