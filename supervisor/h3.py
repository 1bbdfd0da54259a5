"""HTTP/3 GET over a migratable connection, with aioquic's own h3 module.

Why it exists: HTTP/3 servers (ngtcp2's gtlsserver, the interop peer) speak nothing else, and a
download is the plainest proof that a migration is transparent to the application: the request
stream carries on over whichever path is active, and nothing here knows about paths at all.

The body is streamed: chunks go to a ``sink`` callback (e.g. a file's ``write``) as they
arrive, through a buffer whose size is reported to the connection, which withholds new stream
credit while it is at its limit. The bound is only as tight as that withholding: aioquic doubles
a stream's window from the highest offset received whenever credit flows again, so a sink much
slower than the network still lets several MB queue (measured: 8.7 MB peak for a 16 MiB body,
1 MiB limit). Without a sink the body is collected in memory, up to ``max_body`` bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aioquic.h3.connection import H3_ALPN, ErrorCode, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.events import QuicEvent, StopSendingReceived, StreamDataReceived, StreamReset

from actors.ports import AppProtocolPort
from supervisor.core.handles import Connection

__all__ = [
    "DEFAULT_BODY_BUFFER",
    "H3Client",
    "H3Error",
    "H3FileServer",
    "H3Response",
    "Sink",
    "http3_get",
]

Headers = list[tuple[bytes, bytes]]
#: Receives each body chunk in order; may be a coroutine function.
Sink = Callable[[bytes], Awaitable[object] | object]

#: Unread body bytes per request before the connection stops granting the server more credit.
DEFAULT_BODY_BUFFER = 1 << 20
#: Without a sink the body is kept in memory; refuse more than this.
DEFAULT_MAX_BODY = 256 << 20


class H3Error(Exception):
    """An HTTP/3 request failed at the HTTP layer (reset, malformed or oversized response)."""


@dataclass(frozen=True, slots=True)
class H3Response:
    """A complete response. ``body`` is empty when a sink consumed it; ``length`` counts the
    body bytes received either way."""

    status: int
    headers: Headers
    body: bytes
    length: int
    trailers: Headers = field(default_factory=list)

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), decoded."""
        key = name.lower().encode()
        for k, v in self.headers:
            if k == key:
                return v.decode(errors="replace")
        return None


class _Request:
    """Receive state of one request stream, filled by the event handler, drained by the caller."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.headers: Headers | None = None
        self.trailers: Headers = []
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.ended = False
        self.error: BaseException | None = None
        self.wake = asyncio.Event()

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.wake.set()


class H3Client:
    """The HTTP/3 session of one connection; created on first use and shared by its requests.

    Attaching it routes every stream event of the connection to HTTP/3: such a connection carries
    no raw streams of its own.
    """

    def __init__(self, buffer_limit: int = DEFAULT_BODY_BUFFER) -> None:
        self.buffer_limit = buffer_limit
        self._port: AppProtocolPort | None = None
        self._h3: H3Connection | None = None
        self._early: list[QuicEvent] = []
        self._requests: dict[int, _Request] = {}
        self._watcher: asyncio.Task[None] | None = None

    @classmethod
    async def attach(cls, conn: Connection, buffer_limit: int = DEFAULT_BODY_BUFFER) -> H3Client:
        client = cls(buffer_limit)
        port = await conn.attach_app_protocol(client._on_quic_event)
        if port.alpn not in H3_ALPN:
            port.detach()
            raise ValueError(
                f"HTTP/3 needs a connection dialled with alpn_protocols=['h3'], "
                f"this one negotiated {port.alpn!r}"
            )
        # No await since attaching: the replayed early events are still the oldest ones.
        client._port = port
        client._h3 = port.build(H3Connection)
        for event in client._early:
            client._on_quic_event(event)
        client._early.clear()
        port.transmit_soon()  # our SETTINGS and QPACK streams
        client._watcher = asyncio.get_running_loop().create_task(
            client._watch(port), name=f"h3-watch-{conn.conn_id}"
        )
        return client

    async def _watch(self, port: AppProtocolPort) -> None:
        """Fail every pending request when the connection ends, however it ends."""
        await port.wait_closed()
        for req in self._requests.values():
            req.fail(port.close_error)

    # ---------------------------------------------------------------- event side (synchronous)

    def _on_quic_event(self, event: QuicEvent) -> bool:
        if not isinstance(event, (StreamDataReceived, StreamReset, StopSendingReceived)):
            return False
        if self._h3 is None:
            self._early.append(event)
            return True
        for h3_event in self._h3.handle_event(event):
            self._on_h3_event(h3_event)
        if isinstance(event, StreamReset) and (req := self._requests.get(event.stream_id)):
            req.fail(H3Error(f"the server reset the request (error code {event.error_code:#x})"))
        return True

    def _on_h3_event(self, event: H3Event) -> None:
        req = self._requests.get(getattr(event, "stream_id", -1))
        if req is None or req.error is not None:
            return
        if isinstance(event, HeadersReceived):
            status = dict(event.headers).get(b":status", b"")
            if req.headers is None:
                if status.startswith(b"1"):
                    return  # interim response: the final one follows
                req.headers = list(event.headers)
            else:
                req.trailers = list(event.headers)
            req.ended |= event.stream_ended
        elif isinstance(event, DataReceived):
            if event.data:
                req.chunks.append(event.data)
                req.buffered += len(event.data)
                self._set_backlog(req)
            req.ended |= event.stream_ended
        req.wake.set()

    def _set_backlog(self, req: _Request) -> None:
        assert self._port is not None
        self._port.set_receive_backlog(req.stream_id, req.buffered, self.buffer_limit)

    # ---------------------------------------------------------------- request side

    async def get(
        self,
        url_path: str,
        *,
        authority: str,
        headers: Iterable[tuple[str | bytes, str | bytes]] = (),
        sink: Sink | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        on_headers: Callable[[Headers], None] | None = None,
    ) -> H3Response:
        """GET ``url_path``; see :func:`http3_get`."""
        if not url_path.startswith("/"):
            raise ValueError(f"url_path must start with '/', got {url_path!r}")
        port, h3 = self._port, self._h3
        assert port is not None and h3 is not None
        port.check_open()
        stream_id = port.next_stream_id()
        req = self._requests[stream_id] = _Request(stream_id)
        request_headers: Headers = [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", url_path.encode()),
            *((_b(k).lower(), _b(v)) for k, v in headers),
        ]
        h3.send_headers(stream_id, request_headers, end_stream=True)
        port.transmit_soon()
        complete = False
        try:
            body, length = await self._receive(req, sink, max_body, on_headers)
            complete = True
        finally:
            del self._requests[stream_id]
            port.set_receive_backlog(stream_id, 0, self.buffer_limit)
            if not complete and not port.closed:
                # Cancelled or failed midway: tell the server to stop sending.
                with contextlib.suppress(Exception):
                    port.stop_stream(stream_id, ErrorCode.H3_REQUEST_CANCELLED)
                port.transmit_soon()
        assert req.headers is not None
        status = dict(req.headers)[b":status"]
        return H3Response(int(status), req.headers, bytes(body), length, req.trailers)

    async def _receive(
        self,
        req: _Request,
        sink: Sink | None,
        max_body: int,
        on_headers: Callable[[Headers], None] | None = None,
    ) -> tuple[bytearray, int]:
        body = bytearray()
        received = 0
        while True:
            if on_headers is not None and req.headers is not None:
                on_headers(req.headers)  # once, before any body byte
                on_headers = None
            while req.chunks:
                chunk = req.chunks.popleft()
                received += len(chunk)
                if sink is not None:
                    result = sink(chunk)
                    if inspect.isawaitable(result):
                        await result
                elif received > max_body:
                    raise H3Error(f"response body exceeds max_body={max_body} bytes")
                else:
                    body += chunk
                req.buffered -= len(chunk)
                self._set_backlog(req)
            if req.error is not None:
                raise req.error
            if req.ended and not req.chunks:
                break
            req.wake.clear()
            await req.wake.wait()
        if req.headers is None:
            raise H3Error("the response ended without headers")
        status = dict(req.headers).get(b":status", b"")
        if not status.isdigit():
            raise H3Error(f"the response has no valid :status ({status!r})")
        return body, received


_clients: weakref.WeakKeyDictionary[Connection, H3Client] = weakref.WeakKeyDictionary()
_attaching: weakref.WeakKeyDictionary[Connection, asyncio.Lock] = weakref.WeakKeyDictionary()


async def h3_client(conn: Connection, buffer_limit: int = DEFAULT_BODY_BUFFER) -> H3Client:
    """The connection's HTTP/3 session, attached on first use."""
    lock = _attaching.setdefault(conn, asyncio.Lock())
    async with lock:
        client = _clients.get(conn)
        if client is None:
            client = _clients[conn] = await H3Client.attach(conn, buffer_limit)
    return client


async def http3_get(
    conn: Connection,
    url_path: str,
    *,
    authority: str,
    headers: Iterable[tuple[str | bytes, str | bytes]] = (),
    sink: Sink | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    on_headers: Callable[[Headers], None] | None = None,
) -> H3Response:
    """GET ``url_path`` over ``conn`` (dialled with ``alpn_protocols=["h3"]``).

    ``sink(chunk)`` (sync or async) receives the body as it arrives; the response then carries
    an empty ``body`` and its ``length``. ``on_headers(headers)`` is called once when the
    response headers arrived, before the body (a progress display reads content-length).
    Migrations of ``conn`` during the transfer need nothing from the caller. Cancelling stops
    the request (STOP_SENDING) and leaves the connection usable.
    Raises :class:`H3Error` for HTTP-level failures and ``ConnectionClosedError`` when the
    connection ends first.
    """
    client = await h3_client(conn)
    return await client.get(
        url_path,
        authority=authority,
        headers=headers,
        sink=sink,
        max_body=max_body,
        on_headers=on_headers,
    )


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


class H3FileServer:
    """Serves the files under ``root`` over HTTP/3 (aioquic's H3Connection) on one inbound
    connection: the listener's ``http3_root`` mode, for clients that speak nothing else
    (ngtcp2's gtlsclient, browsers' HTTP/3 stacks).

    It takes the connection's QUIC events before the stream table (HTTP/3 owns every stream of
    the connection). A body is read from its file as the stream's unacknowledged send buffer
    drains below ``window`` (``pump``, after every event and acknowledgement), so memory stays
    bounded whatever the file sizes. A request is answered when it ended: a body (a POST's, or
    a GET's as gtlsclient ``--data`` sends) is read, hashed and counted, never kept, so a client
    that uploads keeps sending for as long as its upload lasts (the interop rig needs one that
    does: only a client's datagram makes a NAT mapping). A path that leaves ``root`` (``..``, a
    symlink out) is a 404, as is a missing file; a method other than GET, HEAD, POST is a 405.
    """

    def __init__(
        self,
        quic: Any,
        root: Path,
        transmit: Callable[[], None],
        backlog: Callable[[int], int],
        window: int = DEFAULT_BODY_BUFFER,
    ) -> None:
        self._h3 = H3Connection(quic)
        self._root = root.resolve()
        self._transmit = transmit
        self._backlog = backlog
        self._window = window
        self._bodies: dict[int, Any] = {}  # stream id -> open file still being sent
        self._uploads: dict[int, tuple[HeadersReceived, Any]] = {}  # POSTs still arriving
        self._finishing: set[int] = set()  # answered in full, not all acknowledged yet
        #: Requests answered, by status (for tests and the listener's owner).
        self.answered: dict[int, int] = {}
        #: Request bodies received: bytes in all, and the sha256 of each finished one.
        self.uploaded_bytes = 0
        self.upload_digests: list[str] = []

    @property
    def open_requests(self) -> int:
        """Requests still arriving, being answered, or answered with bytes the client has not
        acknowledged yet: what an orderly shutdown waits for (``Supervisor.shutdown``)."""
        self._finishing = {s for s in self._finishing if self._backlog(s) > 0}
        return len(self._bodies) + len(self._uploads) + len(self._finishing)

    def handle_event(self, event: QuicEvent) -> bool:
        """Feed a QUIC event; True when HTTP/3 took it (every stream event does)."""
        if not isinstance(event, StreamDataReceived | StreamReset | StopSendingReceived):
            return False
        if isinstance(event, StreamReset | StopSendingReceived):
            self._drop(event.stream_id)
        for h3_event in self._h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived):
                if not h3_event.stream_ended:  # a body follows (gtlsclient --data: a GET's)
                    self._uploads[h3_event.stream_id] = (h3_event, hashlib.sha256())
                else:
                    self._respond(h3_event)
            elif isinstance(h3_event, DataReceived) and h3_event.stream_id in self._uploads:
                request, digest = self._uploads[h3_event.stream_id]
                digest.update(h3_event.data)
                self.uploaded_bytes += len(h3_event.data)
                if h3_event.stream_ended:
                    del self._uploads[h3_event.stream_id]
                    self.upload_digests.append(digest.hexdigest())
                    self._respond(request)
        self.pump()
        return True

    def pump(self) -> None:
        """Send more of every body whose stream has room again, then transmit."""
        for stream_id, body in list(self._bodies.items()):
            while (room := self._window - self._backlog(stream_id)) > 0:
                chunk = body.read(min(room, 1 << 16))
                if not chunk:
                    self._h3.send_data(stream_id, b"", end_stream=True)
                    self._drop(stream_id)
                    self._finishing.add(stream_id)
                    break
                self._h3.send_data(stream_id, chunk, end_stream=False)
        self._transmit()

    def close(self) -> None:
        for stream_id in list(self._bodies):
            self._drop(stream_id)

    def _drop(self, stream_id: int) -> None:
        self._uploads.pop(stream_id, None)
        self._finishing.discard(stream_id)
        body = self._bodies.pop(stream_id, None)
        if body is not None:
            body.close()

    def _file(self, target: bytes) -> Path | None:
        path = target.split(b"?", 1)[0].decode("utf-8", "replace").lstrip("/")
        candidate = (self._root / path).resolve()
        if not candidate.is_relative_to(self._root) or not candidate.is_file():
            return None
        return candidate

    def _respond(self, event: HeadersReceived) -> None:
        headers = dict(event.headers)
        method = headers.get(b":method", b"")
        found = self._file(headers.get(b":path", b"/"))
        if method not in (b"GET", b"HEAD", b"POST"):
            status, size = 405, 0
        elif found is None:
            status, size = 404, 0
        else:
            status, size = 200, found.stat().st_size
        self.answered[status] = self.answered.get(status, 0) + 1
        body_follows = status == 200 and method != b"HEAD" and size > 0
        self._h3.send_headers(
            event.stream_id,
            [(b":status", str(status).encode()), (b"content-length", str(size).encode())],
            end_stream=not body_follows,
        )
        if body_follows:
            assert found is not None
            self._bodies[event.stream_id] = found.open("rb")
        else:
            self._finishing.add(event.stream_id)
