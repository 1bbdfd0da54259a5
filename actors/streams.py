"""Bidirectional QUIC streams with bounded buffers in both directions.

aioquic raises flow-control credit as bytes arrive, not as the application consumes them, and
buffers whatever is written without limit. So the bounds are ours: ``write()`` waits while the
stream's unacknowledged send buffer is at its limit, and the connection withholds new credit
while a stream's unread receive buffer is at its limit (see ``actors/stream_table.py``).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from actors.flag import Flag

DEFAULT_STREAM_BUFFER = 1 << 20  # 1 MiB each way


class StreamOwner(Protocol):
    """The connection side of a stream: its connection's ``StreamTable``."""

    def stream_send(self, stream_id: int, data: bytes, end_stream: bool) -> None: ...

    def stream_send_backlog(self, stream_id: int) -> int: ...

    def stream_consumed(self, stream_id: int) -> None: ...

    def check_open(self) -> None: ...


class StreamResetError(ConnectionError):
    """The peer reset the stream (RESET_STREAM) before it ended."""

    def __init__(self, stream_id: int, error_code: int) -> None:
        self.stream_id = stream_id
        self.error_code = error_code
        super().__init__(f"stream {stream_id} was reset by the peer (error code {error_code})")


class Stream:
    """A raw bidirectional QUIC stream: ``await write(b)``, ``await read(n)``, ``await close()``."""

    def __init__(self, owner: StreamOwner, stream_id: int, limit: int = DEFAULT_STREAM_BUFFER):
        self._owner = owner
        self.stream_id = stream_id
        self.limit = limit
        self._rx = bytearray()
        self._eof = False
        self._error: BaseException | None = None
        self._readable = Flag()
        self._writable = Flag()
        self._writable.set()
        self._write_closed = False
        #: The protocol negotiated on it (libp2p's multistream-select), None for a raw stream.
        self.protocol: str | None = None

    # -- called by the connection ------------------------------------------------------------

    def feed(self, data: bytes, end_stream: bool) -> None:
        if data:
            self._rx += data
        if end_stream:
            self._eof = True
        if self._rx or self._eof:
            self._readable.set()

    def fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._readable.set()
        self._writable.set()

    def poke_writable(self) -> None:
        """Re-check the send backlog (acknowledgements arrived)."""
        if self._owner.stream_send_backlog(self.stream_id) < self.limit:
            self._writable.set()

    @property
    def receive_backlog(self) -> int:
        """Bytes received and not read yet (at most ``limit``: credit waits for reads)."""
        return len(self._rx)

    @property
    def send_backlog(self) -> int:
        """Bytes written and not acknowledged yet (``write()`` waits while at ``limit``)."""
        return self._owner.stream_send_backlog(self.stream_id)

    # -- user API ------------------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        """Queue ``data``; waits while the unacknowledged send buffer is full."""
        if self._write_closed:
            raise ValueError(f"stream {self.stream_id} was closed for writing")
        view = memoryview(bytes(data))
        while view:
            await self._wait_writable()
            room = self.limit - self._owner.stream_send_backlog(self.stream_id)
            if room <= 0:
                self._writable.clear()
                continue
            chunk, view = view[:room], view[room:]
            self._owner.stream_send(self.stream_id, bytes(chunk), False)

    async def _wait_writable(self) -> None:
        while True:
            if self._error is not None:
                raise self._error
            self._owner.check_open()
            if self._owner.stream_send_backlog(self.stream_id) < self.limit:
                return
            self._writable.clear()
            await self._writable.wait()

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all buffered when ``n < 0``); ``b""`` at the end of the stream."""
        while not self._rx:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            self._readable.clear()
            await self._readable.wait()
        if n < 0 or n >= len(self._rx):
            data = bytes(self._rx)
            self._rx.clear()
        else:
            data = bytes(self._rx[:n])
            del self._rx[:n]
        self._owner.stream_consumed(self.stream_id)
        return data

    async def readexactly(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = await self.read(n - len(out))
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(out), n)
            out += chunk
        return bytes(out)

    async def close(self) -> None:
        """Send FIN (end of our side); reading stays possible until the peer's FIN."""
        if self._write_closed:
            return
        self._write_closed = True
        if self._error is None:
            self._owner.stream_send(self.stream_id, b"", True)

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._rx

    @property
    def finished(self) -> bool:
        """Nothing more will happen on the wire: the peer's FIN (or an error) arrived and our
        side was closed (or failed)."""
        failed = self._error is not None
        return (self._eof or failed) and (self._write_closed or failed)
