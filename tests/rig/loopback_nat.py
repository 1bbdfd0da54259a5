"""A NAT in miniature on loopback (the netns one is tests/rig/rebind.py), for listener tests.

The client talks to ``front``; its datagrams reach the server from ``back``; ``rebind()``
swaps ``back`` for a socket on a fresh port and forgets the old one (what a NAT does when its
mapping expires). The client cannot see it happen, so the server meets a new client address
with no migration asked for."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


def sockname(transport: asyncio.DatagramTransport) -> tuple[str, int]:
    host, port = transport.get_extra_info("sockname")[:2]
    return str(host), int(port)


class _Relay(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, Any], None]) -> None:
        self.on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.on_datagram(data, addr)


class Rebinder:
    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.client: Any = None
        self.front: asyncio.DatagramTransport | None = None
        self.back: asyncio.DatagramTransport | None = None

    async def start(self) -> Rebinder:
        self.front, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _Relay(self._from_client), local_addr=("127.0.0.1", 0)
        )
        await self.rebind()
        return self

    async def rebind(self) -> tuple[str, int]:
        """A fresh mapping; returns its address (what the server sees from now on)."""
        old = self.back
        self.back, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _Relay(self._from_server), local_addr=("127.0.0.1", 0)
        )
        if old is not None:
            old.close()
        return sockname(self.back)

    @property
    def address(self) -> str:
        """The multiaddr a client dials."""
        assert self.front is not None
        host, port = sockname(self.front)
        return f"/ip4/{host}/udp/{port}/quic-v1"

    def _from_client(self, data: bytes, addr: Any) -> None:
        self.client = addr
        assert self.back is not None
        self.back.sendto(data, self.server)

    def _from_server(self, data: bytes, _addr: Any) -> None:
        if self.front is not None and self.client is not None:
            self.front.sendto(data, self.client)

    def close(self) -> None:
        for transport in (self.front, self.back):
            if transport is not None:
                transport.close()
