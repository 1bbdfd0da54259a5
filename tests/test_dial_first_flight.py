"""The handshake's first flight leaves only once the path's socket is live.

A path hands its socket to asyncio in its own ``on_start``; an Initial flushed before that was
dropped silently, and every dial then waited one PTO (~200 ms) for the resend.
"""

from __future__ import annotations

import pytest

from actors.path import PathActor
from supervisor import Supervisor
from tests.rig.aioquic_server import RigServer
from tests.support import dial_echo, echo_roundtrip


async def test_no_datagram_is_sent_before_the_path_socket_is_live(
    echo: RigServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    unsent: list[int] = []
    send = PathActor.send

    def spy(self: PathActor, data: bytes) -> None:
        if self._transport is None:
            unsent.append(len(data))
        send(self, data)

    monkeypatch.setattr(PathActor, "send", spy)
    async with Supervisor(enable_experimental_connection_migration=True) as sup:
        conn = await dial_echo(sup, echo)
        second = await conn.as_migratable().add_path("/ip4/127.0.0.2/udp/0/quic-v1")
        await second.probe()
        await echo_roundtrip(conn)
        await conn.close()
    assert unsent == [], f"datagrams dropped before the socket was live: {unsent}"
