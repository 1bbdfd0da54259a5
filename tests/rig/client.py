"""Small stock-aioquic clients for rig tests: raw streams (echo) and HTTP/3 GET.

`stock_client` is `aioquic.asyncio.connect` plus ``sock=``: a socket made elsewhere (inside a test
namespace) is wrapped with `loop.create_datagram_endpoint`, as `connect` does with its own socket.
These clients never migrate; they check the servers, not the library.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.logger import QuicLogger

from .aioquic_server import keylog_file

__all__ = ["H3ClientProtocol", "H3Response", "client_configuration", "echo", "stock_client"]


def _require_loopback(host: str) -> None:
    """Without a namespace socket the rig client runs in the root namespace: loopback only."""
    if host == "localhost":
        return
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"{host!r}: from the root namespace the rig only talks to loopback")


def client_configuration(
    *,
    alpn: Sequence[str] | None = ("echo",),
    cadata: bytes | None = None,
    server_name: str = "localhost",
    quic_logger: QuicLogger | None = None,
    idle_timeout: float = 30.0,
) -> QuicConfiguration:
    """A client configuration trusting `cadata` (the rig certificate).

    `stock_client` adds the SSLKEYLOGFILE key log when the variable is set.
    """
    return QuicConfiguration(
        is_client=True,
        alpn_protocols=list(alpn) if alpn is not None else None,
        cadata=cadata,
        server_name=server_name,
        quic_logger=quic_logger,
        idle_timeout=idle_timeout,
    )


@contextlib.asynccontextmanager
async def stock_client(
    host: str,
    port: int,
    *,
    configuration: QuicConfiguration,
    sock: socket.socket | None = None,
    create_protocol: type[QuicConnectionProtocol] = QuicConnectionProtocol,
    handshake_timeout: float = 5.0,
) -> AsyncIterator[QuicConnectionProtocol]:
    """Connected aioquic client; closes the connection and its socket on exit.

    Without `sock`, this is `aioquic.asyncio.connect` (dual-stack socket on ::); with it, the
    given bound socket is used (and owned from then on). When SSLKEYLOGFILE is set and the
    configuration has no key log yet, secrets are appended there for the connection's life.
    """
    async with contextlib.AsyncExitStack() as stack:
        if configuration.secrets_log_file is None:
            keylog = keylog_file()
            if keylog is not None:
                stack.callback(keylog.close)
                configuration.secrets_log_file = keylog
        protocol = await stack.enter_async_context(
            _connect(host, port, configuration, sock, create_protocol, handshake_timeout)
        )
        yield protocol


@contextlib.asynccontextmanager
async def _connect(
    host: str,
    port: int,
    configuration: QuicConfiguration,
    sock: socket.socket | None,
    create_protocol: type[QuicConnectionProtocol],
    handshake_timeout: float,
) -> AsyncIterator[QuicConnectionProtocol]:
    if sock is None:
        _require_loopback(host)
        cm = connect(
            host, port, configuration=configuration, create_protocol=create_protocol,
            wait_connected=False,
        )
        async with cm as protocol:
            protocol.transmit()  # connect() sends nothing itself when wait_connected=False
            await asyncio.wait_for(protocol.wait_connected(), handshake_timeout)
            yield protocol
        return

    loop = asyncio.get_running_loop()
    quic = QuicConnection(configuration=configuration)
    try:
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: create_protocol(quic), sock=sock
        )
    except BaseException:
        sock.close()
        raise
    try:
        protocol.connect((host, port))
        await asyncio.wait_for(protocol.wait_connected(), handshake_timeout)
        yield protocol
    finally:
        protocol.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(protocol.wait_closed(), 2.0)
        transport.close()


async def echo(client: QuicConnectionProtocol, data: bytes, timeout: float = 10.0) -> bytes:
    """Send `data` and FIN on a new bidirectional stream; return everything read back to EOF."""
    reader, writer = await client.create_stream()
    writer.write(data)
    writer.write_eof()
    return await asyncio.wait_for(reader.read(), timeout)


@dataclass
class H3Response:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


class H3ClientProtocol(QuicConnectionProtocol):
    """Minimal HTTP/3 client (GET only), after aioquic's examples/http3_client.py."""

    def __init__(self, quic: QuicConnection, **kwargs: Any) -> None:
        super().__init__(quic, **kwargs)
        self._h3 = H3Connection(quic)
        self._quic_conn = quic
        self._pending: dict[int, tuple[H3Response, asyncio.Future[H3Response]]] = {}

    async def get(
        self, path: str, authority: str = "localhost", timeout: float = 60.0
    ) -> H3Response:
        stream_id = self._quic_conn.get_next_available_stream_id()
        waiter: asyncio.Future[H3Response] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = (H3Response(), waiter)
        self._h3.send_headers(
            stream_id,
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", authority.encode()),
                (b":path", path.encode()),
            ],
            end_stream=True,
        )
        self.transmit()
        try:
            return await asyncio.wait_for(waiter, timeout)
        finally:
            self._pending.pop(stream_id, None)

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ConnectionTerminated):
            for _, waiter in self._pending.values():
                if not waiter.done():
                    waiter.set_exception(ConnectionError(f"connection closed: {event}"))
            return
        for h3_event in self._h3.handle_event(event):
            if not isinstance(h3_event, HeadersReceived | DataReceived):
                continue
            entry = self._pending.get(h3_event.stream_id)
            if entry is None:
                continue
            response, waiter = entry
            if isinstance(h3_event, HeadersReceived):
                response.headers.extend(h3_event.headers)
                status = dict(h3_event.headers).get(b":status")
                if status is not None:
                    response.status = int(status)
            else:
                response.body += h3_event.data
            if h3_event.stream_ended and not waiter.done():
                waiter.set_result(response)


H3_CLIENT_ALPN: tuple[str, ...] = tuple(H3_ALPN)
