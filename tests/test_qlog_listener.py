"""The listener's qlog keeps its clients' migrations: the server side of item 3 of issue 19.

Our client migrating against our listener (``Supervisor(qlog_dir=...)``) on loopback
(127.0.0.1 <-> 127.0.0.2), a NAT rebinding through a relay that swaps its source port, and a
real aioquic client/server pair driven datagram by datagram for a move abandoned before its
validation. The files are checked against what qvis reads: ``qlog_format``/``qlog_version``,
``traces[].events[]`` of ``time``/``name``/``data`` in time order (qvis re-sorts and warns
otherwise), a server ``vantage_point``.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from actors.quic_adapter import connection_trace
from supervisor import Supervisor
from supervisor.server import InboundConnection, Listener
from telemetry.qlog import (
    DEFAULT_MAX_EVENTS,
    DEFAULT_WINDOW,
    DEFAULT_WINDOW_EVENTS,
    BoundedTrace,
    PeerMoves,
    QlogWriter,
    is_packet_event,
)
from tests.rig.certs import CertPair
from tests.rig.loopback_nat import Rebinder, sockname
from tests.rig.waiting import poll_until
from tests.support import addr_of, echo_roundtrip

MIGRATIONS = 10
MIGRATION = "connectivity:migration_state_updated"


async def _echo(stream: Any) -> None:
    while data := await stream.read(65536):
        await stream.write(data)
    await stream.close()


@pytest.fixture
async def server(cert: CertPair, tmp_path: Path) -> AsyncIterator[tuple[Supervisor, Listener]]:
    async with Supervisor(qlog_dir=tmp_path / "qlog") as sup:
        listener = await sup.listen(
            "/ip4/127.0.0.1/udp/0/quic-v1",
            certfile=cert.certfile,
            keyfile=cert.keyfile,
            alpn_protocols=["echo"],
            handler=_echo,
        )
        yield sup, listener


def _server_qlog(directory: Path) -> dict[str, Any]:
    """The one ``server-*.qlog`` file, checked against the shape qvis loads."""
    (path,) = directory.glob("server-*.qlog")
    qlog = json.loads(path.read_text())
    assert qlog["qlog_format"] == "JSON" and qlog["qlog_version"] == "0.3"
    (trace,) = qlog["traces"]
    assert trace["vantage_point"]["type"] == "server"
    times = [e["time"] for e in trace["events"]]
    assert times == sorted(times)  # qvis needs them in order
    assert all(set(e) == {"time", "name", "data"} for e in trace["events"])
    return dict(trace)


def _named(trace: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [e for e in trace["events"] if e["name"] == name]


def _frames(event: dict[str, Any]) -> set[str]:
    return {f["frame_type"] for f in event["data"].get("frames", ())}


def _ep(host: str, port: int) -> dict[str, Any]:
    return {"ip_v4": host, "port_v4": port}


def _moves(inbound: InboundConnection) -> PeerMoves:
    moves = inbound._proto.moves  # the listener's protocol: no view shows its qlog
    assert moves is not None
    return moves


# ------------------------------------------------------------------ our client migrating


async def test_ten_client_migrations_are_in_the_listeners_qlog_with_addresses(
    server: tuple[Supervisor, Listener], tmp_path: Path
) -> None:
    """Each of 10 switches is one ``migration_started`` in the server's file with the client's
    old and new address and the DCID, is completed, and has packet events either side; the
    server's own path validation (PATH_CHALLENGE out, PATH_RESPONSE in) is kept; memory
    stays within the windows' bound under traffic that overflows the event cap."""
    sup, listener = server
    srv_host, srv_port = addr_of(listener.multiaddr)
    async with Supervisor(enable_experimental_connection_migration=True) as client:
        conn = await client.dial(str(listener.multiaddr), alpn_protocols=["echo"], verify=False)
        inbound = await asyncio.wait_for(listener.accept(), 5)
        trace = _moves(inbound).trace
        assert isinstance(trace, BoundedTrace)
        mc = conn.as_migratable()
        (first,) = mc.paths()
        second = await mc.add_path("/ip4/127.0.0.2/udp/0/quic-v1")
        await second.probe()
        homes = [addr_of(p.info().local_addr) for p in (first, second)]
        await echo_roundtrip(conn, size=512 * 1024)
        for i in range(MIGRATIONS):
            await (second if i % 2 == 0 else first).switch()
            await echo_roundtrip(conn, size=512 * 1024)
        await poll_until(lambda: inbound.snapshot().migrations == MIGRATIONS, 5, what="moves")
        held, windows_now = trace.packet_events, trace.window_count
        await conn.close()
    await sup.close()  # writes the listener's traces
    bound = (1 + 3 * MIGRATIONS + 1) * DEFAULT_WINDOW_EVENTS
    print(f"held {held} packet events in {windows_now} windows (bound {bound})")
    assert 1 <= windows_now <= 1 + MIGRATIONS and held <= bound

    written = _server_qlog(tmp_path / "qlog")
    common = written["common_fields"]
    assert len(written["events"]) + common["dropped_events"] > DEFAULT_MAX_EVENTS
    assert common["windows"] <= MIGRATIONS + 2
    packet_times = [e["time"] for e in written["events"] if is_packet_event(e)]
    assert len(packet_times) <= bound
    print(f"kept {len(written['events'])} events, dropped {common['dropped_events']}")

    local = _ep(srv_host, srv_port)
    assigned = [e["data"] for e in _named(written, "connectivity:path_assigned")]
    assert [(a["path_id"], a["path_remote"]["ip_v4"]) for a in assigned] == [
        (0, "127.0.0.1"),
        (1, "127.0.0.2"),
    ]  # a return to an address keeps its path id
    assert all(a["path_local"] == local for a in assigned)
    moves = _named(written, MIGRATION)
    started = [e for e in moves if e["data"]["state"] == "migration_started"]
    complete = [e for e in moves if e["data"]["state"] == "migration_complete"]
    assert len(started) == len(complete) == MIGRATIONS  # one per peer address change
    assert not [e for e in moves if e["data"]["state"] == "migration_abandoned"]
    window_ms = DEFAULT_WINDOW * 1000
    for n, (start, done) in enumerate(zip(started, complete, strict=True)):
        data = start["data"]
        old, new = (homes[0], homes[1]) if n % 2 == 0 else (homes[1], homes[0])
        assert data["old_path_remote"] == _ep(*old)
        assert data["path_remote"] == {**_ep(*new), "connection_ids": [data["dcid"]]}
        assert data["path_local"] == data["old_path_local"] == local
        assert (data["old"], data["new"]) == ((0, 1) if n % 2 == 0 else (1, 0))
        assert data["path_id"] == data["new"]
        assert done["time"] >= start["time"]
        assert done["data"]["path_remote"] == data["path_remote"]
        t = start["time"]
        assert any(t - window_ms <= p <= t for p in packet_times), f"nothing before #{n + 1}"
        assert any(t < p <= t + window_ms for p in packet_times), f"nothing after #{n + 1}"

    # The server's own validation of the client's second address, kept as key events.
    sent = _named(written, "transport:packet_sent")
    received = _named(written, "transport:packet_received")
    assert any("path_challenge" in _frames(e) for e in sent)
    assert any("path_response" in _frames(e) for e in received)


# ------------------------------------------------------------------ a NAT rebinding


async def test_a_rebinding_is_logged_with_the_servers_validation_and_new_dcid(
    server: tuple[Supervisor, Listener], tmp_path: Path
) -> None:
    """The client keeps its CID and address; the server sees a new source port. Logged in
    order: the server's PATH_CHALLENGE to the new address (sent while aioquic handles the
    datagram that moved it, so just before) and ``migration_started`` (old and new port), the
    client's PATH_RESPONSE, ``migration_complete``; the fresh DCID the listener moved to
    (``connection_id_updated``) is the one the challenge and the migration events carry."""
    sup, listener = server
    nat = await Rebinder(addr_of(listener.multiaddr)).start()
    try:
        async with Supervisor() as client:
            assert nat.front is not None
            host, port = sockname(nat.front)
            conn = await client.dial(
                f"/ip4/{host}/udp/{port}/quic-v1", alpn_protocols=["echo"], verify=False
            )
            inbound = await asyncio.wait_for(listener.accept(), 5)
            await echo_roundtrip(conn)
            assert nat.back is not None
            mappings = [sockname(nat.back)]
            for _ in range(2):
                mappings.append(await nat.rebind())
                await echo_roundtrip(conn)  # the client sends; the server sees a new source
                await poll_until(
                    lambda: inbound.snapshot().migrations == len(mappings) - 1, 5, what="move"
                )
                await poll_until(lambda: not _moves(inbound).pending, 5, what="validated")
            await conn.close()
    finally:
        nat.close()
    await sup.close()

    written = _server_qlog(tmp_path / "qlog")
    events = written["events"]
    moves = _named(written, MIGRATION)
    assert [e["data"]["state"] for e in moves] == ["migration_started", "migration_complete"] * 2
    cid_updates = [e["data"] for e in _named(written, "connectivity:connection_id_updated")]
    assert len(cid_updates) == 2
    assert all(u["owner"] == "remote" and u["old"] != u["new"] for u in cid_updates)
    previous_done = 0
    for n in range(2):
        start, done = moves[2 * n], moves[2 * n + 1]
        assert start["data"]["old_path_remote"] == _ep(*mappings[n])
        assert start["data"]["path_remote"]["port_v4"] == mappings[n + 1][1]
        assert start["data"]["dcid"] == done["data"]["dcid"] == cid_updates[n]["new"]
        new_dcid = cid_updates[n]["new"]
        challenges = [
            i
            for i, e in enumerate(events[previous_done : events.index(done)], previous_done)
            if e["name"] == "transport:packet_sent"
            and "path_challenge" in _frames(e)
            and e["data"]["header"]["dcid"] == new_dcid
        ]
        assert challenges, f"no challenge to the new address #{n + 1}"
        responses = [
            i
            for i, e in enumerate(events[challenges[0] : events.index(done)], challenges[0])
            if e["name"] == "transport:packet_received" and "path_response" in _frames(e)
        ]
        assert responses, f"no answer from the new address #{n + 1}"
        assert events.index(start) < responses[0]
        print(
            f"rebinding #{n + 1}: challenge {start['time'] - events[challenges[0]]['time']:.3f}"
            f" ms before migration_started, complete {done['time'] - start['time']:.3f} ms after"
        )
        previous_done = events.index(done)


# ------------------------------------------------------------------ datagram by datagram


def _pair(cert: CertPair, qlog: Path) -> tuple[QuicConnection, QuicConnection]:
    """A real aioquic client and server, handshake done in memory (no sockets)."""
    server_config = QuicConfiguration(is_client=False, quic_logger=QlogWriter(qlog, prefix="s-"))
    server_config.load_cert_chain(cert.certfile, cert.keyfile)
    client_config = QuicConfiguration(is_client=True, verify_mode=ssl.CERT_NONE)
    client = QuicConnection(configuration=client_config)
    srv = QuicConnection(
        configuration=server_config,
        original_destination_connection_id=client.original_destination_connection_id,
    )
    client.connect(("127.0.0.9", 443), now=0.0)
    now = 0.0
    for _ in range(10):
        now += 0.001
        _deliver(client, srv, ("127.0.0.1", 5000), now)
        _deliver(srv, client, ("127.0.0.9", 443), now)
    assert srv.get_peer_address() == ("127.0.0.1", 5000)
    return client, srv


def _deliver(src: QuicConnection, dst: QuicConnection, addr: tuple[str, int], now: float) -> int:
    datagrams = src.datagrams_to_send(now)
    for data, _ in datagrams:
        dst.receive_datagram(data, addr, now)
    return len(datagrams)


def test_a_move_superseded_before_validation_is_abandoned(cert: CertPair, tmp_path: Path) -> None:
    """Client datagrams from B, then from C before the server's challenge to B is answered:
    B's move is abandoned, C's started, and completed when the answer from C arrives. Path
    ids follow addresses; past ``MAX_PATH_IDS`` an address gets a fresh id, unremembered."""
    client, srv = _pair(cert, tmp_path)
    moves = PeerMoves.attach(srv, ("127.0.0.9", 443), ("127.0.0.1", 5000))
    assert moves is not None and moves.trace is connection_trace(srv)
    now = 1.0
    for addr in (("127.0.0.2", 6000), ("127.0.0.3", 7000)):
        old = srv.get_peer_address()
        assert old is not None
        client.send_ping(1)
        _deliver(client, srv, addr, now)
        assert srv.get_peer_address() == addr
        moves.moved(old, addr)
        assert moves.pending  # its challenge is not answered yet
        _deliver(srv, client, ("127.0.0.9", 443), now)  # challenges, not back yet
        now += 0.001
    _deliver(client, srv, ("127.0.0.3", 7000), now)  # PATH_RESPONSE (to C's challenge) from C
    moves.check()
    assert not moves.pending
    trace = connection_trace(srv)
    assert isinstance(trace, BoundedTrace)
    written = trace.to_dict()
    states = [(e["data"]["state"], e["data"]["path_id"]) for e in _named(written, MIGRATION)]
    assert states == [
        ("migration_started", 1),
        ("migration_abandoned", 1),
        ("migration_started", 2),
        ("migration_complete", 2),
    ]
    abandoned = _named(written, MIGRATION)[1]["data"]
    assert abandoned["old_path_remote"] == _ep("127.0.0.1", 5000)
    assert abandoned["path_remote"]["port_v4"] == 6000

    # Bounded memory for a client that never stops moving: ids stop being remembered.
    moves.MAX_PATH_IDS = 3
    moves.moved(("127.0.0.3", 7000), ("127.0.0.4", 8000))  # a 4th address: id 3, unremembered
    moves.moved(("127.0.0.4", 8000), ("127.0.0.1", 5000))  # remembered: id 0 again
    moves.moved(("127.0.0.1", 5000), ("127.0.0.4", 8000))  # forgotten: a fresh id
    ids = [e["data"]["path_id"] for e in _named(trace.to_dict(), "connectivity:path_assigned")]
    assert ids == [0, 1, 2, 3, 4]
