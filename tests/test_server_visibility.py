"""The server side is visible: our client migrating against our listener, on loopback.

The listener emits one ``EvtPeerAddressChanged`` per change of the address it sends to (not
per datagram, not for a probe), with the client's old and new addresses, on the bus of the
Supervisor that owns it and in its journal; ``ctl paths`` over a real control socket lists the
inbound connection (``inbound=True``) at the client's current address; path requests for an
inbound connection fail typed. 127.0.0.1-3 are all on ``lo``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from multiaddr import Multiaddr

from actors.errors import MigrationNotSupportedError
from actors.path_state import PathState
from supervisor import Supervisor
from supervisor.core.events import EvtPeerAddressChanged
from supervisor.core.handles import Connection
from supervisor.remote.control import ControlClient, ControlServer
from supervisor.server import Listener
from telemetry.journal import read_journal
from tests.rig.certs import CertPair
from tests.rig.loopback_nat import Rebinder
from tests.rig.waiting import poll_until
from tests.support import ChecksummedStream, EventLog, echo_roundtrip, event_log

SECOND = "/ip4/127.0.0.2/udp/0/quic-v1"
THIRD = "/ip4/127.0.0.3/udp/0/quic-v1"


async def _echo(stream: Any) -> None:
    while data := await stream.read(65536):
        await stream.write(data)
    await stream.close()


@dataclass
class Pair:
    server: Supervisor
    listener: Listener
    client: Supervisor
    conn: Connection
    inbound_id: str
    journal: Path


@pytest.fixture
async def pair(cert: CertPair, tmp_path: Path) -> AsyncIterator[Pair]:
    """Our listener (with a journal) and our client connected to it, handshake done."""
    journal = tmp_path / "server.journal"
    async with Supervisor(journal=journal) as server:
        listener = await server.listen(
            "/ip4/127.0.0.1/udp/0/quic-v1",
            certfile=cert.certfile,
            keyfile=cert.keyfile,
            alpn_protocols=["echo"],
            handler=_echo,
        )
        async with Supervisor(enable_experimental_connection_migration=True) as client:
            conn = await client.dial(str(listener.multiaddr), alpn_protocols=["echo"], verify=False)
            inbound = await asyncio.wait_for(listener.accept(), 5)
            yield Pair(server, listener, client, conn, inbound.conn_id, journal)


def _text(addr: object) -> str:
    return str(Multiaddr(str(addr)))


def _ma(sockaddr: tuple[str, int]) -> str:
    return f"/ip4/{sockaddr[0]}/udp/{sockaddr[1]}/quic-v1"


def _changes(log: EventLog) -> list[EvtPeerAddressChanged]:
    out = [e for e in log.events if isinstance(e, EvtPeerAddressChanged)]
    assert len(out) == len(log.events)
    return out


async def test_one_event_per_switch_with_the_old_and_new_address(pair: Pair) -> None:
    mc = pair.conn.as_migratable()
    home = mc.active_path()
    stream = await ChecksummedStream(pair.conn).start()
    await stream.advance()
    async with event_log(pair.server, EvtPeerAddressChanged) as log:
        # Probing alone moves nothing: the listener keeps sending to the old address.
        second = await mc.add_path(SECOND)
        third = await mc.add_path(THIRD)
        await second.probe(timeout=5.0)
        await third.probe(timeout=5.0)
        await stream.advance()
        assert log.events == []

        hops = [second, third, mc.paths()[0], second]
        for n, target in enumerate(hops, 1):
            before = mc.active_path().local_addr
            result = await target.switch()
            await log.wait_for(lambda n=n: len(log.events) >= n)  # type: ignore[misc]
            await stream.advance()  # data keeps flowing, through many datagrams on the new path
            evt = _changes(log)[-1]
            assert evt.conn_id == pair.inbound_id
            assert _text(evt.old_remote_addr) == _text(before) == result.from_addr
            assert _text(evt.new_remote_addr) == _text(target.info().local_addr) == result.to_addr
            assert evt.remote_addr == evt.new_remote_addr and evt.seq > 0
        await echo_roundtrip(pair.conn)  # a round trip after the last change: nothing more came
        assert len(log.events) == len(hops), log.events  # exactly one per switch
        assert [e.seq for e in log.events] == sorted(e.seq for e in log.events)
    assert await stream.finish() > 0
    changes = _changes(log)
    assert _text(changes[2].new_remote_addr) == _text(home.local_addr)  # back home
    inbound = pair.listener.connections[pair.inbound_id]
    assert _text(inbound.remote_multiaddr) == _text(second.info().local_addr)

    # In the server's journal too, with the bus's numbers.
    await pair.server.close()
    records = [
        r
        for r in read_journal(pair.journal)
        if r["kind"] == "event" and r["type"] == "PeerAddressChanged"
    ]
    assert [r["body"]["seq"] for r in records] == [e.seq for e in changes]
    assert [r["body"]["new_remote_addr"] for r in records] == [
        _text(e.new_remote_addr) for e in changes
    ]
    assert {r["conn"] for r in records} == {pair.inbound_id}


async def test_a_nat_rebinding_is_one_event_too(cert: CertPair) -> None:
    """The server cannot tell a rebinding from a migration: each new mapping is one event,
    old -> new, and the connection goes on (the listener re-validates the new address)."""
    async with Supervisor() as server:
        listener = await server.listen(
            "/ip4/127.0.0.1/udp/0/quic-v1",
            certfile=cert.certfile,
            keyfile=cert.keyfile,
            alpn_protocols=["echo"],
            handler=_echo,
        )
        host, port = str(listener.bound).split("/")[2], int(str(listener.bound).split("/")[4])
        nat = await Rebinder((host, port)).start()
        try:
            async with Supervisor() as client, event_log(server, EvtPeerAddressChanged) as log:
                conn = await client.dial(nat.address, alpn_protocols=["echo"], verify=False)
                await echo_roundtrip(conn)
                assert nat.back is not None
                mappings = [_ma(nat.back.get_extra_info("sockname"))]
                for n in (1, 2):
                    mappings.append(_ma(await nat.rebind()))
                    await echo_roundtrip(conn)  # the client sends; the server sees a new source
                    await log.wait_for(lambda n=n: len(log.events) >= n)  # type: ignore[misc]
                await echo_roundtrip(conn)
                seen = [(_text(e.old_remote_addr), _text(e.new_remote_addr)) for e in _changes(log)]
                assert seen == list(itertools.pairwise(mappings))  # exactly one per mapping
                [snap] = server.inbound_connections()
                assert snap.migrations == 2 and snap.remote_addr == mappings[-1]
        finally:
            nat.close()


async def test_a_late_server_subscriber_gets_the_change_replayed(pair: Pair) -> None:
    mc = pair.conn.as_migratable()
    path = await mc.add_path(SECOND)
    await path.probe(timeout=5.0)
    await path.switch()
    await echo_roundtrip(pair.conn)
    sub = pair.server.events.subscribe(EvtPeerAddressChanged, since=0)
    evt = await asyncio.wait_for(anext(aiter(sub)), 5)
    assert isinstance(evt, EvtPeerAddressChanged)
    assert _text(evt.new_remote_addr) == _text(path.info().local_addr)


async def test_ctl_paths_lists_the_inbound_connection_at_its_current_address(
    pair: Pair, tmp_path: Path
) -> None:
    sock = str(tmp_path / "server.sock")
    async with ControlServer(pair.server, sock), ControlClient(sock, timeout=10) as ctl:
        [before] = await ctl.snapshot()
        assert before.conn_id == pair.inbound_id and before.inbound
        assert before.remote_addr == _text(pair.conn.as_migratable().active_path().local_addr)
        assert before.migrations == 0

        mc = pair.conn.as_migratable()
        path = await mc.add_path(SECOND)
        await path.probe(timeout=5.0)
        await path.switch()
        await echo_roundtrip(pair.conn)

        [snap] = await ctl.snapshot()
        now = _text(path.info().local_addr)
        assert snap.conn_id == pair.inbound_id and snap.inbound and not snap.closed
        assert snap.remote_addr == now and snap.migrations == 1
        assert not snap.supports_migration
        [only] = snap.paths
        assert only.active and only.state is PathState.ACTIVE and only.remote_addr == now
        assert only.local_addr == str(pair.listener.bound)
        assert await ctl.connection(pair.inbound_id) == snap

        # The client's side, through its own control socket, lists its outbound one only.
        client_sock = str(tmp_path / "client.sock")
        async with (
            ControlServer(pair.client, client_sock),
            ControlClient(client_sock, timeout=10) as client_ctl,
        ):
            [out] = await client_ctl.snapshot()
            assert out.conn_id == pair.conn.conn_id and not out.inbound

        # Path requests for an inbound connection: typed, naming the connection and why.
        with pytest.raises(MigrationNotSupportedError, match="inbound") as err:
            await ctl.migrate(pair.inbound_id, THIRD)
        assert err.value.conn_id == pair.inbound_id
        [still] = await ctl.snapshot()
        assert still.remote_addr == now  # nothing moved


async def test_closed_inbound_connection_leaves_the_listing(pair: Pair, tmp_path: Path) -> None:
    sock = str(tmp_path / "server.sock")
    async with ControlServer(pair.server, sock), ControlClient(sock, timeout=10) as ctl:
        assert [s.conn_id for s in await ctl.snapshot()] == [pair.inbound_id]
        await pair.conn.close()
        await poll_until(
            lambda: pair.inbound_id not in pair.listener.connections,
            what="the listener saw the close",
        )
        assert await ctl.snapshot() == ()
