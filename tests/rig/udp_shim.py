"""In-process UDP forwarding shim between clients on loopback and one upstream server.

Why: rollback tests need a path that validates (the PATH_RESPONSE gets through) and then dies. The
shim sits on one loopback address; every client source address gets its own upstream socket, so the
server sees one distinct address per client path, and replies are relayed back to the client
address they belong to. Drop rules decide per datagram, per direction, per client address:

    shim.drop_server_to_client(new_addr, after_n=1)  # let the PATH_RESPONSE through, then drop

Counters per client address say what was forwarded and dropped. `wait_for` re-checks its predicate
after every relayed or dropped datagram. Everything is closed on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from .aioquic_server import Addr, normalize_addr
from .waiting import Notifier

__all__ = ["DropRule", "FlowStats", "UdpShim", "udp_shim"]

Direction = Literal["c2s", "s2c"]


@dataclass
class FlowStats:
    """Datagram counts for one client address."""

    forwarded_c2s: int = 0
    dropped_c2s: int = 0
    forwarded_s2c: int = 0
    dropped_s2c: int = 0


@dataclass(eq=False)
class DropRule:
    """Drops datagrams of `direction` for `client` (None: any client).

    The rule arms when `when(stats)` first holds (None: at once); once armed it lets `after_n`
    more matching datagrams through, then drops every further one until removed.
    """

    direction: Direction
    client: Addr | None = None
    after_n: int = 0
    when: Callable[[FlowStats], bool] | None = None
    armed: bool = False
    passed: int = 0
    dropped: int = 0

    def matches(self, direction: Direction, client: Addr) -> bool:
        return direction == self.direction and self.client in (None, client)

    def decide(self, stats: FlowStats) -> bool:
        """True to drop this (matching) datagram."""
        if not self.armed:
            if self.when is not None and not self.when(stats):
                return False
            self.armed = True
        if self.passed < self.after_n:
            self.passed += 1
            return False
        self.dropped += 1
        return True


class _ListenProtocol(asyncio.DatagramProtocol):
    def __init__(self, shim: UdpShim) -> None:
        self._shim = shim

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._shim._from_client(data, addr)


class _RelayProtocol(asyncio.DatagramProtocol):
    def __init__(self, shim: UdpShim, client: Any) -> None:
        self._shim = shim
        self._client = client

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._shim._from_server(data, self._client)


@dataclass
class _Relay:
    client_raw: Any  # the client address as the listening socket reports it (for sendto)
    sock: socket.socket
    transport: asyncio.DatagramTransport | None = None
    pending: list[bytes] = field(default_factory=list)


class UdpShim:
    """See the module docstring; create with `udp_shim(upstream)`."""

    def __init__(self, upstream: Addr, listen_host: str) -> None:
        self.upstream = upstream
        self.listen_host = listen_host
        self.listen_addr: Addr = (listen_host, 0)
        self.stats: dict[Addr, FlowStats] = {}
        #: Client addresses in the order they were first seen.
        self.clients: list[Addr] = []
        self.rules: list[DropRule] = []
        self._relays: dict[Addr, _Relay] = {}
        #: server->client datagrams for the key are delivered to the value instead.
        self.redirects: dict[Addr, Addr] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._listen: asyncio.DatagramTransport | None = None
        self._notifier = Notifier()

    # ---- controls ---------------------------------------------------------------------------

    def add_rule(self, rule: DropRule) -> DropRule:
        self.rules.append(rule)
        return rule

    def remove_rule(self, rule: DropRule) -> None:
        with contextlib.suppress(ValueError):
            self.rules.remove(rule)

    def clear_rules(self) -> None:
        self.rules.clear()

    def drop_server_to_client(self, dst: Addr | None = None, *, after_n: int = 0) -> DropRule:
        """From now on, drop server->client datagrams to `dst` after letting `after_n` through."""
        return self.add_rule(DropRule("s2c", _norm(dst), after_n))

    def drop_client_to_server(self, src: Addr | None = None, *, after_n: int = 0) -> DropRule:
        """From now on, drop client->server datagrams from `src` after letting `after_n` through."""
        return self.add_rule(DropRule("c2s", _norm(src), after_n))

    def drop_to(
        self, client: Addr, *, after: Callable[[FlowStats], bool] | None = None, after_n: int = 0
    ) -> DropRule:
        """Drop server->client datagrams to `client` once `after(stats of client)` holds."""
        return self.add_rule(DropRule("s2c", _norm(client), after_n, when=after))

    def redirect_to(self, client: Addr, instead: Addr) -> None:
        """From now on, deliver what the server sends to ``client`` to ``instead`` (another
        client socket): a peer answering on the wrong path, as msquic does (it sends its
        PATH_RESPONSE on its active path). ``clear_redirect`` undoes it."""
        self.redirects[normalize_addr(client)] = normalize_addr(instead)

    def clear_redirect(self, client: Addr) -> None:
        self.redirects.pop(normalize_addr(client), None)

    # ---- observation ------------------------------------------------------------------------

    def stats_for(self, client: Addr) -> FlowStats:
        return self.stats.setdefault(normalize_addr(client), FlowStats())

    def upstream_addr(self, client: Addr) -> Addr:
        """The shim's address facing the server for `client` (what the server sees)."""
        return normalize_addr(self._relays[normalize_addr(client)].sock.getsockname())

    async def wait_for(
        self, predicate: Callable[[], object], timeout: float = 5.0, what: str = ""
    ) -> None:
        await self._notifier.wait_for(predicate, timeout, what)

    # ---- datapath ---------------------------------------------------------------------------

    def _dropped(self, direction: Direction, client: Addr, stats: FlowStats) -> bool:
        drop = False
        for rule in list(self.rules):
            if rule.matches(direction, client) and rule.decide(stats):
                drop = True
        return drop

    def _from_client(self, data: bytes, addr: Any) -> None:
        client = normalize_addr(addr)
        stats = self.stats_for(client)
        relay = self._relays.get(client)
        if relay is None:
            relay = self._new_relay(client, addr)
        if self._dropped("c2s", client, stats):
            stats.dropped_c2s += 1
        else:
            stats.forwarded_c2s += 1
            if relay.transport is None:
                relay.pending.append(data)
            else:
                relay.transport.sendto(data)
        self._notifier.changed()

    def _from_server(self, data: bytes, client: Addr) -> None:
        stats = self.stats_for(client)
        if self._dropped("s2c", client, stats) or self._listen is None:
            stats.dropped_s2c += 1
        else:
            stats.forwarded_s2c += 1
            target = self.redirects.get(client)
            dest = self._relays[client].client_raw if target is None else target
            self._listen.sendto(data, dest)
        self._notifier.changed()

    def _new_relay(self, client: Addr, raw: Any) -> _Relay:
        family = socket.AF_INET6 if ":" in self.upstream[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.bind((self.listen_host, 0))
            sock.connect(self.upstream)
        except BaseException:
            sock.close()
            raise
        relay = _Relay(client_raw=raw, sock=sock)
        self._relays[client] = relay
        self.clients.append(client)
        task = asyncio.get_running_loop().create_task(self._open_relay(client, relay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return relay

    async def _open_relay(self, client: Addr, relay: _Relay) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _RelayProtocol(self, client), sock=relay.sock
        )
        relay.transport = transport
        for data in relay.pending:
            transport.sendto(data)
        relay.pending.clear()

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.listen_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((self.listen_host, 0))
        except BaseException:
            sock.close()
            raise
        self._listen, _ = await loop.create_datagram_endpoint(
            lambda: _ListenProtocol(self), sock=sock
        )
        self.listen_addr = normalize_addr(sock.getsockname())

    async def _close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for relay in self._relays.values():
            if relay.transport is not None:
                relay.transport.close()
            else:
                relay.sock.close()
        if self._listen is not None:
            self._listen.close()
            self._listen = None


def _norm(addr: Addr | None) -> Addr | None:
    return None if addr is None else normalize_addr(addr)


@contextlib.asynccontextmanager
async def udp_shim(upstream: Addr, listen_host: str = "127.0.0.1") -> AsyncIterator[UdpShim]:
    """Run a shim forwarding to `upstream`; clients send to `shim.listen_addr`."""
    shim = UdpShim(normalize_addr(upstream), listen_host)
    try:
        await shim._start()
        yield shim
    finally:
        await shim._close()
