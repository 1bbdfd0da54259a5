"""A standby path's NAT keep-alive: a small probing packet that asks nothing.

NAT bindings are per 5-tuple and refreshed by outbound traffic (RFC 4787 REQ-6), so a standby
path needs bytes out now and then, not an answer. The keep-alive is a PADDING-only 1-RTT
packet on the path's own CID: probing (RFC 9000 §9.1: the server must not migrate to it) and
not ack-eliciting (no reply, no ACK). Checked against the stock aioquic server and ngtcp2.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from actors.health_groups import ProbeReason
from supervisor import Supervisor
from supervisor.core.handles import Connection
from supervisor.h3 import http3_get
from tests.rig.aioquic_server import RigServer
from tests.rig.certs import CertPair
from tests.rig.ngtcp2 import gtlsserver, gtlsserver_available
from tests.support import connection_actor, dial_echo, echo_roundtrip, path_actor

pytest_plugins = ["tests.rig.fixtures"]

_NGTCP2, _NO_NGTCP2 = gtlsserver_available()
P2 = "/ip4/127.0.0.2/udp/0/quic-v1"
KEEPALIVES = 5


async def _keepalives_on_a_standby(conn: Connection) -> Callable[[], None]:
    """Add a standby path and send NAT keep-alives on it (small: not padded to 1200 bytes
    like a PATH_CHALLENGE); returns the check to run once traffic has flowed: nothing came
    back on that path, and the server did not migrate (the first path is still active)."""
    mc = conn.as_migratable()
    [first] = mc.paths()
    second = await mc.add_path(P2)
    await second.probe()
    stats = path_actor(conn, second.path_id).stats
    received, sent, size = stats.datagrams_received, stats.datagrams_sent, stats.bytes_sent
    actor = connection_actor(conn)
    for _ in range(KEEPALIVES):
        assert actor.health_probe(second.path_id, ProbeReason.NAT)
    assert stats.datagrams_sent - sent == KEEPALIVES
    assert stats.bytes_sent - size <= KEEPALIVES * 64

    def nothing_moved() -> None:
        assert stats.datagrams_received == received
        assert mc.active_path().local_addr == first.info().local_addr

    return nothing_moved


async def test_a_nat_keepalive_is_small_unanswered_and_moves_nothing(echo: RigServer) -> None:
    async with Supervisor(enable_experimental_connection_migration=True) as sup:
        conn = await dial_echo(sup, echo)
        nothing_moved = await _keepalives_on_a_standby(conn)
        await echo_roundtrip(conn)  # a round trip later: any reply would have arrived
        await echo_roundtrip(conn)
        nothing_moved()


@pytest.mark.skipif(not _NGTCP2, reason=_NO_NGTCP2)
@pytest.mark.interop
async def test_ngtcp2_takes_a_nat_keepalive_without_migrating(
    rig_cert: CertPair, tmp_path: Path
) -> None:
    async with (
        gtlsserver(
            certfile=rig_cert.certfile,
            keyfile=rig_cert.keyfile,
            cadata=rig_cert.cert_pem,
            size_mb=1,
            log_path=tmp_path / "gtlsserver.log",
        ) as server,
        Supervisor(enable_experimental_connection_migration=True) as sup,
    ):
        conn = await sup.dial(
            f"/ip4/127.0.0.1/udp/{server.port}/quic-v1",
            alpn_protocols=["h3"],
            cafile=str(rig_cert.certfile),
        )
        nothing_moved = await _keepalives_on_a_standby(conn)
        response = await http3_get(conn, "/file", authority=f"localhost:{server.port}")
        assert len(response.body) == 1024 * 1024
        nothing_moved()
