"""End to end against the stock aioquic echo server (tests/rig): go-libp2p's cases and the
migration contract of DESIGN §3-§4, over real UDP sockets on loopback."""

from __future__ import annotations

import asyncio
import re
import socket
from typing import Any

import pytest

from actors.path_state import PathState
from supervisor import Supervisor
from supervisor.addresses import df_bit_set
from supervisor.core.errors import (
    ConnectionClosedError,
    MigrationNotEnabledError,
    MigrationNotSupportedError,
)
from supervisor.core.events import (
    EvtConnectionMigrationCompleted,
    EvtConnectionMigrationFailed,
    EvtConnectionMigrationStarted,
    EvtPathAdded,
    EvtPathRemoved,
    EvtPathStateChanged,
)
from tests.rig.aioquic_server import RigServer, echo_server
from tests.rig.certs import CertPair
from tests.rig.server_tap import PROBING_FRAMES, FrameTap, HandshakeDoneGate
from tests.rig.udp_shim import udp_shim
from tests.rig.waiting import poll_until
from tests.support import (
    ChecksummedStream,
    addr_of,
    connection_actor,
    dial_echo,
    echo_roundtrip,
    event_log,
    fd_count,
    other_tasks,
    path_actor,
)

P2 = "/ip4/127.0.0.2/udp/0/quic-v1"
P3 = "/ip4/127.0.0.3/udp/0/quic-v1"

#: Figures measured on loopback, printed at the end of the run that measured them (pytest -s).
MEASURED: dict[str, list[float]] = {"probe_rtt_ms": [], "switch_ms": []}


def _record(kind: str, seconds: float | None) -> None:
    if seconds is not None:
        MEASURED[kind].append(seconds * 1000)


async def _switch_timed(path: Any) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await path.switch()
    _record("switch_ms", loop.time() - t0)


def teardown_module() -> None:
    for kind, values in MEASURED.items():
        if values:
            values = sorted(values)
            print(
                f"\n{kind}: n={len(values)} median={values[len(values) // 2]:.2f} "
                f"min={values[0]:.2f} max={values[-1]:.2f}"
            )


# ------------------------------------------------------------------ go-libp2p's cases


async def test_migration_disabled_by_default(echo: RigServer) -> None:
    async with Supervisor() as sup:
        conn = await dial_echo(sup, echo)
        mc = conn.as_migratable()
        assert mc.supports_migration() is False
        with pytest.raises(MigrationNotEnabledError):
            await mc.add_path(P2)
        await echo_roundtrip(conn)


async def test_migration_enabled_with_the_option(sup: Supervisor, echo: RigServer) -> None:
    conn = await dial_echo(sup, echo)
    assert conn.as_migratable().supports_migration() is True


@pytest.mark.parametrize("enabled", [True, False])
async def test_server_side_connection_does_not_support_migration(
    cert: CertPair, enabled: bool
) -> None:
    async def echo_handler(stream: Any) -> None:
        while data := await stream.read(65536):
            await stream.write(data)
        await stream.close()

    async with Supervisor(enable_experimental_connection_migration=enabled) as server_sup:
        listener = await server_sup.listen(
            "/ip4/127.0.0.1/udp/0/quic-v1",
            certfile=cert.certfile,
            keyfile=cert.keyfile,
            alpn_protocols=["echo"],
            handler=echo_handler,
        )
        async with Supervisor(enable_experimental_connection_migration=True) as client_sup:
            client = await client_sup.dial(
                str(listener.multiaddr), alpn_protocols=["echo"], verify=False
            )
            inbound = await asyncio.wait_for(listener.accept(), 5)
            mc = inbound.as_migratable()
            assert mc.supports_migration() is False
            expected = MigrationNotSupportedError if enabled else MigrationNotEnabledError
            with pytest.raises(expected):
                await mc.add_path(P2)
            # The dialling side of the same connection does migrate.
            assert client.as_migratable().supports_migration() is True
            await echo_roundtrip(client)


async def test_add_path_without_the_option(echo: RigServer) -> None:
    async with Supervisor(enable_experimental_connection_migration=False) as sup:
        conn = await dial_echo(sup, echo)
        before = fd_count()
        with pytest.raises(MigrationNotEnabledError):
            await conn.as_migratable().add_path(P2)
        assert fd_count() == before
        assert echo.peer_addresses() == {addr_of(conn.local_multiaddr)}


async def test_available_paths_initially_one_active_path(sup: Supervisor, echo: RigServer) -> None:
    conn = await dial_echo(sup, echo)
    mc = conn.as_migratable()
    [only] = mc.available_paths()
    assert only.active and only.state is PathState.ACTIVE
    assert only.local_addr == conn.local_multiaddr
    assert only.remote_addr == conn.remote_multiaddr
    assert re.fullmatch(r"/ip4/127\.0\.0\.1/udp/[1-9]\d*/quic-v1", str(only.local_addr))
    assert only.rtt is not None and only.rtt > 0
    assert mc.active_path() == only
    assert len(mc.paths()) == 1


# ------------------------------------------------------------------ end to end


async def test_probe_switch_close_old_with_a_checksummed_stream(
    sup: Supervisor, echo: RigServer
) -> None:
    conn = await dial_echo(sup, echo)
    mc = conn.as_migratable()
    stream = await ChecksummedStream(conn).start()
    await stream.advance()
    [old] = mc.paths()
    new = await mc.add_path(P2)
    new_addr = addr_of(new.info().local_addr)
    await new.probe()
    _record("probe_rtt_ms", new.info().rtt)
    await stream.advance()
    await _switch_timed(new)
    await stream.advance()
    await old.close()
    await stream.advance()
    info = echo.connections[0]
    await echo.wait_for(lambda: info.current_peer() == new_addr, 5, "server on the new path")
    assert echo.peer_addresses() == {addr_of(conn.local_multiaddr), new_addr}
    await stream.finish()
    assert [p.local_addr for p in mc.available_paths()] == [new.info().local_addr]
    # The dialled address stays the connection's; the active path shows where it is now.
    assert conn.local_multiaddr == old.info().local_addr != mc.active_path().local_addr


async def test_switch_back_to_the_handshake_path(sup: Supervisor, echo: RigServer) -> None:
    conn = await dial_echo(sup, echo)
    mc = conn.as_migratable()
    stream = await ChecksummedStream(conn).start()
    [handshake] = mc.paths()
    other = await mc.add_path(P2)
    await other.probe()
    await _switch_timed(other)
    await stream.advance()
    assert handshake.info().state is PathState.STANDBY
    assert [p.path_id for p in mc.paths()] == [handshake.path_id, other.path_id]
    await _switch_timed(handshake)
    await stream.advance()
    info = echo.connections[0]
    home = addr_of(conn.local_multiaddr)
    await echo.wait_for(lambda: info.current_peer() == home, 5, "server back on the handshake path")
    assert mc.active_path().local_addr == conn.local_multiaddr
    await other.close()
    await stream.finish()


async def test_fifty_migrations_on_one_stream_lose_nothing(
    sup: Supervisor, echo: RigServer
) -> None:
    conn = await dial_echo(sup, echo)
    mc = conn.as_migratable()
    stream = await ChecksummedStream(conn).start()
    [a] = mc.paths()
    b = await mc.add_path(P2)
    await b.probe()
    _record("probe_rtt_ms", b.info().rtt)
    info = echo.connections[0]
    for i in range(50):
        target = b if i % 2 == 0 else a
        await _switch_timed(target)
        assert mc.active_path().local_addr == target.info().local_addr
        await stream.advance(32 * 1024)  # bytes crossed the new path
        want = addr_of(target.info().local_addr)
        await echo.wait_for(lambda w=want: info.current_peer() == w, 5, f"server follows #{i}")
    total = await stream.finish()
    assert total > 50 * 32 * 1024
    assert conn._snapshot().migrations == 50


async def test_each_path_has_its_own_dcid(sup: Supervisor, echo: RigServer) -> None:
    conn = await dial_echo(sup, echo)
    mc = conn.as_migratable()
    quic = connection_actor(conn).quic
    paths = [await mc.add_path(f"/ip4/127.0.0.{i}/udp/0/quic-v1") for i in (2, 3, 4)]
    for path in paths:
        await path.probe()
    cids = quic.path_cids()
    assert len(cids) == 4 and None not in cids.values()
    assert len(set(cids.values())) == 4, cids
    await paths[1].switch()
    after = quic.path_cids()
    assert len(set(after.values())) == 4, after
    assert after == cids  # a switch moves no CID from one path to another


async def test_no_probe_before_handshake_done(sup: Supervisor, cert: CertPair) -> None:
    async with echo_server(certfile=cert.certfile, keyfile=cert.keyfile) as server:
        gate = HandshakeDoneGate(server)
        conn = await dial_echo(sup, server)
        mc = conn.as_migratable()
        path = await mc.add_path(P2)
        new_addr = addr_of(path.info().local_addr)
        home = addr_of(conn.local_multiaddr)
        probe = asyncio.create_task(path.probe(timeout=10))
        info = server.connections[0]
        # HANDSHAKE_DONE is held back: the client's handshake is complete, not confirmed.
        # Let it retransmit twice (its own timers) so the probe had every chance to go out.
        seen = info.datagrams_from[home]
        await server.wait_for(lambda: info.datagrams_from[home] >= seen + 2, 10, "client PTOs")
        assert gate.held > 0
        assert info.datagrams_from[new_addr] == 0
        assert not probe.done()
        gate.open()
        await asyncio.wait_for(probe, 10)
        assert info.datagrams_from[new_addr] > 0
        assert path.info().state is PathState.STANDBY


async def test_standby_paths_carry_only_probing_frames(sup: Supervisor, echo: RigServer) -> None:
    conn = await dial_echo(sup, echo)
    mc = conn.as_migratable()
    tap = FrameTap(echo.connections[0].quic)
    stream = await ChecksummedStream(conn).start()
    [home] = mc.paths()
    standby = await mc.add_path(P2)
    target = await mc.add_path(P3)
    await standby.probe()
    await target.probe()
    await stream.advance()
    await target.switch()
    after_switch = len(tap.packets)
    await stream.advance(256 * 1024)
    await standby.probe()  # a standby path re-probed
    await home.probe()  # the handshake path, now standby, probed too
    await stream.advance()
    await stream.finish()

    standby_packets = tap.from_addr(addr_of(standby.info().local_addr))
    assert standby_packets, "the probes of the standby path reached the server"
    for packet in standby_packets:
        assert set(packet.frames) <= PROBING_FRAMES and packet.is_probing, packet
    home_addr = addr_of(home.info().local_addr)
    late = [p for p in tap.packets[after_switch:] if p.src == home_addr]
    assert late, "the re-probe of the former active path reached the server"
    for packet in late:
        assert set(packet.frames) <= PROBING_FRAMES and packet.is_probing, packet
    assert any("stream" in p.frames for p in tap.from_addr(addr_of(target.info().local_addr)))


async def test_add_path_sends_nothing(sup: Supervisor, echo: RigServer) -> None:
    conn = await dial_echo(sup, echo)
    path = await conn.as_migratable().add_path(P2)
    new_addr = addr_of(path.info().local_addr)
    assert path.info().state is PathState.NEW and path.info().rtt is None
    await echo_roundtrip(conn)  # a round trip later
    assert echo.peer_addresses() == {addr_of(conn.local_multiaddr)}
    assert echo.connections[0].datagrams_from[new_addr] == 0
    assert path_actor(conn, path.path_id).stats.datagrams_sent == 0


async def test_every_path_socket_has_df_set(sup: Supervisor, echo: RigServer) -> None:
    conn = await dial_echo(sup, echo)
    mc = conn.as_migratable()
    await mc.add_path(P2)
    await mc.add_path("/ip4/127.0.0.3/udp/0/quic-v1")
    socks = [f.actor.sock for f in connection_actor(conn)._paths.values()]
    assert len(socks) == 3
    assert all(df_bit_set(s) for s in socks)


async def test_events_exactly_per_contract(sup: Supervisor, echo: RigServer) -> None:
    async with event_log(sup) as log:
        conn = await dial_echo(sup, echo)
        mc = conn.as_migratable()
        [p0] = mc.paths()
        p1 = await mc.add_path(P2)
        a0, a1 = p0.info().local_addr, p1.info().local_addr
        await p1.probe()
        await p1.switch()
        await p0.close()
        await conn.close()
        await log.wait_for(lambda: len(log.of(EvtPathRemoved)) == 2)

    remote = conn.remote_multiaddr
    got = [e for e in log.events if e.conn_id == conn.conn_id]
    assert all(e.remote_addr == remote and e.time > 0 for e in got)

    def shape(e: Any) -> tuple[Any, ...]:
        if isinstance(e, EvtPathStateChanged):
            return ("state", e.local_addr, e.old, e.new)
        if isinstance(e, EvtPathAdded | EvtPathRemoved):
            return (type(e).__name__, e.local_addr)
        if isinstance(e, EvtConnectionMigrationStarted):
            return ("started", e.from_local_addr, e.to_local_addr, e.reason)
        if isinstance(e, EvtConnectionMigrationCompleted):
            return ("completed", e.from_local_addr, e.to_local_addr, e.reason)
        raise AssertionError(f"unexpected event {e!r}")

    S = PathState
    assert [shape(e) for e in got] == [
        ("EvtPathAdded", a0),
        ("state", a0, S.NEW, S.ACTIVE),
        ("EvtPathAdded", a1),
        ("state", a1, S.NEW, S.VALIDATING),
        ("state", a1, S.VALIDATING, S.STANDBY),
        ("started", a0, a1, "manual"),
        ("state", a1, S.STANDBY, S.ACTIVE),
        ("state", a0, S.ACTIVE, S.STANDBY),
        ("completed", a0, a1, "manual"),
        ("state", a0, S.STANDBY, S.CLOSED),
        ("EvtPathRemoved", a0),
        ("state", a1, S.ACTIVE, S.CLOSED),
        ("EvtPathRemoved", a1),
    ]
    [completed] = [e for e in got if isinstance(e, EvtConnectionMigrationCompleted)]
    assert completed.probe_rtt is not None and completed.probe_rtt > 0


async def test_snapshots_are_read_your_writes(sup: Supervisor, echo: RigServer) -> None:
    conn = await dial_echo(sup, echo)
    mc = conn.as_migratable()
    [p0] = mc.paths()
    p1 = await mc.add_path(P2)
    assert p1.info().state is PathState.NEW and p1.info().rtt is None
    assert len(mc.available_paths()) == 2
    await p1.probe()
    info = p1.info()
    assert info.state is PathState.STANDBY and info.rtt is not None and not info.active
    _record("probe_rtt_ms", info.rtt)  # an idle connection
    await _switch_timed(p1)
    assert mc.active_path().local_addr == p1.info().local_addr
    assert p1.info().active and p1.info().state is PathState.ACTIVE
    assert not p0.info().active and p0.info().state is PathState.STANDBY
    await p0.close()
    assert p0.info().state is PathState.CLOSED
    assert [p.local_addr for p in mc.available_paths()] == [p1.info().local_addr]
    # A switch to the active path returns at once and starts no migration.
    async with event_log(sup, EvtConnectionMigrationStarted) as log:
        await p1.switch()
        await echo_roundtrip(conn)
    assert log.events == [] and conn._snapshot().migrations == 1


async def test_two_concurrent_switches_end_with_one_active_path(
    sup: Supervisor, echo: RigServer
) -> None:
    conn = await dial_echo(sup, echo)
    mc = conn.as_migratable()
    stream = await ChecksummedStream(conn).start()
    p1 = await mc.add_path(P2)
    p2 = await mc.add_path(P3)
    await p1.probe()
    await p2.probe()
    for _ in range(3):
        await asyncio.gather(p1.switch(), p2.switch())
        active = [p for p in mc.available_paths() if p.active]
        states = [p.state for p in mc.available_paths()]
        assert len(active) == 1 and states.count(PathState.ACTIVE) == 1
        assert active[0].local_addr == p2.info().local_addr  # the last one asked
        await stream.advance()
    await stream.finish()


async def test_cancelled_probe_leaves_no_trace(sup: Supervisor, echo: RigServer) -> None:
    async with udp_shim(echo.addr) as shim:
        conn = await dial_echo(sup, shim.listen_addr)
        mc = conn.as_migratable()
        path = await mc.add_path(P2)
        shim.drop_client_to_server(addr_of(path.info().local_addr))  # probes go unanswered
        async with event_log(sup, EvtPathStateChanged) as log:
            probe = asyncio.create_task(path.probe(timeout=30))
            await log.wait_for(lambda: any(e.new is PathState.VALIDATING for e in log.events))
            await shim.wait_for(lambda: sum(s.dropped_c2s for s in shim.stats.values()) >= 2)
            probe.cancel()
            with pytest.raises(asyncio.CancelledError):
                await probe
        info = path.info()
        assert info.state is PathState.NEW and info.rtt is None
        assert connection_actor(conn).quic.active_path_id == mc.paths()[0].path_id
        await echo_roundtrip(conn)
        # The path is usable afterwards.
        shim.clear_rules()
        await path.probe(timeout=5)
        assert path.info().state is PathState.STANDBY


async def test_cancelled_switch_rolls_back(sup: Supervisor, echo: RigServer) -> None:
    async with udp_shim(echo.addr) as shim:
        conn = await dial_echo(sup, shim.listen_addr)
        mc = conn.as_migratable()
        stream = await ChecksummedStream(conn).start()
        [home] = mc.paths()
        path = await mc.add_path(P2)
        await path.probe()
        await stream.advance()
        # The peer never reaches us on the new path: the switch waits for confirmation.
        shim.drop_server_to_client(addr_of(path.info().local_addr))
        async with event_log(sup, EvtPathStateChanged, EvtConnectionMigrationFailed) as log:
            switch = asyncio.create_task(path.switch())
            await log.wait_for(
                lambda: any(
                    isinstance(e, EvtPathStateChanged) and e.new is PathState.ACTIVE
                    for e in log.events
                )
            )
            switch.cancel()
            with pytest.raises(asyncio.CancelledError):
                await switch
            await log.wait_for(lambda: log.of(EvtConnectionMigrationFailed))
            [failed] = log.of(EvtConnectionMigrationFailed)
            assert "cancelled" in failed.error and failed.connection_closed is False
        # Rolled back, at once: read-your-writes after the cancelled call returned.
        assert mc.active_path().local_addr == home.info().local_addr
        assert home.info().state is PathState.ACTIVE
        assert path.info().state is PathState.STANDBY
        await stream.advance()
        await stream.finish()
        await echo_roundtrip(conn)


@pytest.mark.parametrize("closer", ["local", "peer"])
async def test_connection_closed_during_a_probe(
    sup: Supervisor, echo: RigServer, closer: str
) -> None:
    fds = fd_count()
    tasks = other_tasks()
    async with udp_shim(echo.addr) as shim:
        conn = await dial_echo(sup, shim.listen_addr)
        mc = conn.as_migratable()
        path = await mc.add_path(P2)
        shim.drop_client_to_server(addr_of(path.info().local_addr))
        probe = asyncio.create_task(path.probe(timeout=30))
        await shim.wait_for(lambda: sum(s.dropped_c2s for s in shim.stats.values()) >= 1)
        if closer == "local":
            await conn.close()
        else:
            echo.connections[0].protocol.close()
        async with asyncio.timeout(5):  # guard only: "quickly" is well under the 30 s timeout
            with pytest.raises(ConnectionClosedError):
                await probe
        await echo.wait_for(lambda: echo.connections[0].closed, 5)
        await conn.close()  # idempotent; returns once everything of the connection stopped
        assert sup.connections() == []
        with pytest.raises(ConnectionClosedError):
            await mc.add_path(P3)
    # Our sockets are closed when close() returns; the shim's close a loop turn after its exit.
    await poll_until(lambda: fd_count() == fds, 2, what="fds back to baseline")
    assert other_tasks() - tasks == set()


async def test_sslkeylogfile_is_honoured(
    sup: Supervisor, echo: RigServer, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    keylog = tmp_path / "keys.log"
    monkeypatch.setenv("SSLKEYLOGFILE", str(keylog))
    fds = fd_count()
    conn = await dial_echo(sup, echo)
    await echo_roundtrip(conn)
    await conn.close()
    lines = keylog.read_text().splitlines()
    labels = {line.split()[0] for line in lines}
    assert {"CLIENT_HANDSHAKE_TRAFFIC_SECRET", "CLIENT_TRAFFIC_SECRET_0"} <= labels
    assert all(re.fullmatch(r"[A-Z_0-9]+ [0-9a-f]{64} [0-9a-f]+", line) for line in lines)
    assert fd_count() == fds  # the key log file is closed with the connection


async def test_closing_a_path_retires_its_cid(sup: Supervisor, echo: RigServer) -> None:
    conn = await dial_echo(sup, echo)
    quic = connection_actor(conn).quic
    tap = FrameTap(echo.connections[0].quic)
    mc = conn.as_migratable()
    path = await mc.add_path(P2)
    await path.probe()
    cid = quic.path_cids()[path.path_id]
    sequence = quic.path_cid_sequences()[path.path_id]
    spare = quic.spare_peer_cids
    await path.close()
    await echo.wait_for(
        lambda: any("retire_connection_id" in p.frames for p in tap.packets), 5, "RETIRE sent"
    )
    assert cid not in quic.path_cids().values() and sequence is not None
    # The peer replenishes: the spare count is back to what it was before the path took one.
    async with asyncio.timeout(5):
        while quic.spare_peer_cids != spare + 1:
            await echo_roundtrip(conn, size=16)


async def test_datagrams_from_strangers_are_dropped_and_counted(
    sup: Supervisor, echo: RigServer
) -> None:
    conn = await dial_echo(sup, echo)
    mc = conn.as_migratable()
    path = await mc.add_path(P2)
    await path.probe()
    targets = [path_actor(conn, p.path_id) for p in mc.paths()]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        stranger.bind(("127.0.0.5", 0))
        for target in targets:
            stranger.sendto(b"\x40" + bytes(1199), target.local[:2])
        await echo_roundtrip(conn)  # the stray datagrams were queued before the echo's replies
        assert [t.stats.dropped_off_path for t in targets] == [1, 1]
    await path.switch()
    await echo_roundtrip(conn)


async def test_connection_closed_during_a_switch(sup: Supervisor, echo: RigServer) -> None:
    async with udp_shim(echo.addr) as shim:
        conn = await dial_echo(sup, shim.listen_addr)
        path = await conn.as_migratable().add_path(P2)
        await path.probe()
        new_addr = addr_of(path.info().local_addr)
        shim.drop_server_to_client(new_addr)  # the switch waits for a confirmation
        async with event_log(sup, EvtConnectionMigrationFailed) as log:
            switch = asyncio.create_task(path.switch())
            await shim.wait_for(lambda: shim.stats_for(new_addr).dropped_s2c > 0)
            await conn.close()
            with pytest.raises(ConnectionClosedError):
                await asyncio.wait_for(switch, 5)
            await log.wait_for(lambda: log.events)
        [failed] = log.events
        assert failed.connection_closed is True
        assert path.info().state is PathState.CLOSED
