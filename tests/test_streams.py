"""Bounded stream buffers: a reader that never reads cannot make the peer fill our memory, and
``write()`` waits while the unacknowledged send buffer is full."""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

from actors.connection import ConnectionOptions
from supervisor import Supervisor
from tests.rig.aioquic_server import RigServer
from tests.rig.udp_shim import udp_shim
from tests.rig.waiting import poll_until
from tests.support import addr_of, connection_actor, dial_echo, echo_roundtrip

LIMIT = 256 * 1024


async def test_receive_buffer_stays_bounded_with_a_reader_that_never_reads(
    echo: RigServer,
) -> None:
    async with Supervisor(options=ConnectionOptions(stream_buffer=LIMIT)) as sup:
        conn = await dial_echo(sup, echo)
        stream = await conn.open_stream()
        payload = os.urandom(8 * LIMIT)
        # The echo server reads everything, so all of it is acknowledged and written; the echo
        # of it is what piles up against our flow control.
        async with asyncio.timeout(20):
            await stream.write(payload)
            await stream.close()
        server_stream: Any = echo.connections[0].quic._streams[stream.stream_id]

        def peer_blocked() -> bool:
            # The peer sent all the credit we granted, and all of it arrived here.
            credit = server_stream.max_stream_data_remote
            return server_stream.sender.next_offset >= credit and stream.receive_backlog == credit

        await poll_until(peer_blocked, 10, what="the echo is blocked by our flow control")
        assert stream.receive_backlog <= LIMIT
        held = stream.receive_backlog
        for _ in range(5):  # time passes, round trips happen: no credit is granted meanwhile
            await echo_roundtrip(conn, size=1024)
        assert stream.receive_backlog == held
        assert server_stream.max_stream_data_remote == held

        # Reading releases credit; everything arrives, in order.
        got = hashlib.sha256()
        total = 0
        async with asyncio.timeout(20):
            while chunk := await stream.read(65536):
                assert stream.receive_backlog <= LIMIT
                got.update(chunk)
                total += len(chunk)
        assert total == len(payload)
        assert got.hexdigest() == hashlib.sha256(payload).hexdigest()


async def test_write_waits_while_the_send_buffer_is_full(echo: RigServer) -> None:
    async with (
        udp_shim(echo.addr) as shim,
        Supervisor(options=ConnectionOptions(stream_buffer=LIMIT)) as sup,
    ):
        conn = await dial_echo(sup, shim.listen_addr)
        stream = await conn.open_stream()
        actor = connection_actor(conn)
        # Nothing we send is acknowledged any more.
        rule = shim.drop_client_to_server(addr_of(conn.local_multiaddr))
        payload = os.urandom(4 * LIMIT)
        writer = asyncio.create_task(stream.write(payload))
        backlog = lambda: actor.stream_send_backlog(stream.stream_id)  # noqa: E731
        await poll_until(lambda: backlog() >= LIMIT, 10, what="send buffer full")
        assert backlog() == LIMIT
        dropped = rule.dropped
        await shim.wait_for(lambda: rule.dropped >= dropped + 2, 10, "client retransmissions")
        assert not writer.done(), "write() returned with the send buffer full"
        assert backlog() == LIMIT

        shim.remove_rule(rule)
        async with asyncio.timeout(30):
            await writer
            await stream.close()
            echoed = bytearray()
            while chunk := await stream.read(65536):
                echoed += chunk
        assert bytes(echoed) == payload


async def test_finished_streams_are_forgotten(sup: Supervisor, echo: RigServer) -> None:
    conn = await dial_echo(sup, echo)
    for _ in range(200):
        await echo_roundtrip(conn, size=100)
    # Streams done both ways leave the connection's table (a long-lived connection would
    # otherwise grow, and every flush walks the table). The last ones go once the peer has
    # acknowledged their FIN: a few more round trips at most.
    async with asyncio.timeout(5):
        while len(connection_actor(conn).streams) > 2:
            await echo_roundtrip(conn, size=100)


async def test_listener_streams_are_bounded_too(cert: Any) -> None:
    from actors.streams import DEFAULT_STREAM_BUFFER

    accepted: list[Any] = []
    go = asyncio.Event()

    async def slow_echo(stream: Any) -> None:
        if not accepted:  # the first stream reads nothing until told; later ones echo at once
            accepted.append(stream)
            await go.wait()
        while data := await stream.read(65536):
            await stream.write(data)
        await stream.close()

    async with (
        Supervisor() as server_sup,
        Supervisor(options=ConnectionOptions(stream_buffer=LIMIT)) as client_sup,
    ):
        listener = await server_sup.listen(
            "/ip4/127.0.0.1/udp/0/quic-v1",
            certfile=cert.certfile,
            keyfile=cert.keyfile,
            alpn_protocols=["echo"],
            handler=slow_echo,
        )
        conn = await client_sup.dial(str(listener.multiaddr), alpn_protocols=["echo"], verify=False)
        stream = await conn.open_stream()
        payload = os.urandom(3 * DEFAULT_STREAM_BUFFER)
        writer = asyncio.create_task(stream.write(payload))
        backlog = lambda: connection_actor(conn).stream_send_backlog(stream.stream_id)  # noqa: E731
        await poll_until(lambda: accepted and backlog() >= LIMIT, 10, what="client blocked")
        [inbound] = accepted
        # All the credit the server granted arrived and waits unread; no more is granted.
        await poll_until(
            lambda: inbound.receive_backlog >= DEFAULT_STREAM_BUFFER, 10, what="server full"
        )
        for _ in range(3):
            await echo_roundtrip(conn, size=100)
        assert inbound.receive_backlog == DEFAULT_STREAM_BUFFER
        assert not writer.done()

        go.set()
        async with asyncio.timeout(30):
            reader = asyncio.ensure_future(_read_all(stream))
            await writer
            await stream.close()
            echoed = await reader
        assert echoed == payload


async def _read_all(stream: Any) -> bytes:
    out = bytearray()
    while chunk := await stream.read(65536):
        out += chunk
    return bytes(out)
