"""The streams a libp2p peer opens, answered as a libp2p host answers them (DESIGN §9).

Every stream the peer opens on a libp2p connection negotiates its protocol first
(multistream-select); ping and identify are answered here and never reach the user, other
protocols go to the handler registered for them, unknown ones get "na". After a migration the
peer is told our new view of things with an identify push.

One service per Supervisor owns every task it starts (a reader per dialled connection, one task
per inbound stream) and ``close()`` cancels and awaits them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from multiaddr import Multiaddr

from actors.errors import ConnectionClosedError
from actors.streams import Stream, StreamResetError
from supervisor.libp2p import identify, multistream, ping
from supervisor.libp2p.identify import IdentifyInfo
from supervisor.libp2p.keys import Identity

__all__ = ["PROTOCOL_VERSION", "Libp2pService", "StreamHandler"]

log = logging.getLogger(__name__)

StreamHandler = Callable[[Stream], Awaitable[None]]

#: What identify says we speak (the value every libp2p implementation sends).
PROTOCOL_VERSION = "ipfs/0.1.0"
AGENT_VERSION = "quic-supervisor/0.1.0"

#: Inbound streams answered at once per connection; more are closed at once (and counted):
#: a peer cannot make us hold unbounded tasks.
MAX_INBOUND_STREAMS = 64

#: The connection-like object the service works on: a ``Connection`` handle, outbound or in.
Conn = Any


class Libp2pService:
    """Answers the peer's streams on a Supervisor's libp2p connections."""

    def __init__(
        self, identity: Callable[[], Identity], listen_addrs: Callable[[], Iterable[Multiaddr]]
    ) -> None:
        self._identity = identity
        self._listen_addrs = listen_addrs
        self.handlers: dict[str, StreamHandler] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._open: dict[str, int] = {}
        #: What each peer last told us with an identify push, by conn id.
        self.pushed: dict[str, IdentifyInfo] = {}
        self.refused_streams = 0
        self._dialled: dict[str, Conn] = {}
        self._closed = False

    # -- what we speak ---------------------------------------------------------------------

    def protocols(self, extra: Iterable[str] = ()) -> list[str]:
        builtin = [ping.PROTOCOL, identify.PROTOCOL, identify.PUSH_PROTOCOL]
        return [*builtin, *self.handlers, *(p for p in extra if p not in self.handlers)]

    def local_info(self, conn: Conn, extra: Iterable[str] = ()) -> IdentifyInfo:
        """Identify's answer on ``conn``: our key, listen addresses, protocols, and where we see
        the peer now (after its migration: its new address)."""
        observed = str(conn.remote_multiaddr).partition("/p2p/")[0]
        return IdentifyInfo(
            protocol_version=PROTOCOL_VERSION,
            agent_version=AGENT_VERSION,
            public_key=self._identity().public_key.to_protobuf(),
            listen_addrs=list(self._listen_addrs()),
            observed_addr=Multiaddr(observed),
            protocols=self.protocols(extra),
        )

    # -- tasks -------------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def serve(self, conn: Conn) -> None:
        """Answer the streams the peer opens on a dialled connection, until it closes; push
        identify to it after each of its migrations."""
        if self._closed:
            return
        self._dialled[conn.conn_id] = conn
        self._spawn(self._accept_loop(conn), f"libp2p-accept:{conn.conn_id}")

    async def _accept_loop(self, conn: Conn) -> None:
        try:
            while True:
                try:
                    stream = await conn._accept_any_stream()
                except ConnectionClosedError:
                    return
                self.accept(conn, stream)
        finally:
            self.pushed.pop(conn.conn_id, None)
            self._dialled.pop(conn.conn_id, None)

    def watch(self, migrations: AsyncIterator[Any]) -> None:
        """Push identify after every completed migration of a dialled libp2p connection
        (``migrations``: the Supervisor's subscription to EvtConnectionMigrationCompleted)."""

        async def follow() -> None:
            async for evt in migrations:
                conn = self._dialled.get(evt.conn_id)
                if conn is not None:
                    self.push_soon(conn)

        if not self._closed:
            self._spawn(follow(), "libp2p-migrations")

    def accept(
        self, conn: Conn, stream: Stream, extra: dict[str, StreamHandler] | None = None
    ) -> None:
        """Negotiate and answer one stream the peer opened (a listener's connections call this
        for each)."""
        if self._closed:
            return
        open_now = self._open.get(conn.conn_id, 0)
        if open_now >= MAX_INBOUND_STREAMS:
            self.refused_streams += 1
            self._spawn(_close_quietly(stream), "libp2p-refuse")
            return
        self._open[conn.conn_id] = open_now + 1
        self._spawn(self._answer(conn, stream, extra or {}), f"libp2p-stream:{conn.conn_id}")

    async def _answer(self, conn: Conn, stream: Stream, extra: dict[str, StreamHandler]) -> None:
        try:
            chosen = await multistream.negotiate(stream, self.protocols(extra))
            stream.protocol = chosen
            if chosen == ping.PROTOCOL:
                await ping.serve_ping(stream)
            elif chosen == identify.PROTOCOL:
                await identify.send_identify(stream, self.local_info(conn, extra))
            elif chosen == identify.PUSH_PROTOCOL:
                self.pushed[conn.conn_id] = await identify.read_identify(stream)
            else:
                handler = extra.get(chosen) or self.handlers[chosen]
                await handler(stream)
        except (
            ConnectionClosedError,
            StreamResetError,
            ConnectionError,  # negotiation refused or cut short: the peer's business
            TimeoutError,
            asyncio.IncompleteReadError,
        ) as exc:
            log.debug("libp2p stream on %s ended: %s", conn.conn_id, exc)
        except Exception:
            log.exception("libp2p stream handler failed on connection %s", conn.conn_id)
        finally:
            self._open[conn.conn_id] -= 1
            if not self._open[conn.conn_id]:
                del self._open[conn.conn_id]
            await _close_quietly(stream)

    async def push_identify(self, conn: Conn) -> None:
        """Tell the peer what changed (a migration: where it sees us from now)."""
        stream = await conn.new_stream([identify.PUSH_PROTOCOL])
        await identify.send_identify(stream, self.local_info(conn))

    def push_soon(self, conn: Conn) -> None:
        async def push() -> None:
            try:
                await self.push_identify(conn)
            except Exception as exc:  # a peer without push, or gone: nothing to repair
                log.debug("identify push on %s not delivered: %s", conn.conn_id, exc)

        if not self._closed:
            self._spawn(push(), f"libp2p-push:{conn.conn_id}")

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _close_quietly(stream: Stream) -> None:
    with contextlib.suppress(Exception):
        await stream.close()
