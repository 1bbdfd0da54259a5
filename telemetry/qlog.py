"""Per-connection qlog files (for qvis), named by our connection id, with bounded memory.

aioquic's ``QuicFileLogger`` names each file by the original destination CID and keeps the
whole trace of a connection in memory until the connection *ends*: a long-lived connection
grows without bound (every packet sent and received is an event: ~37k events per second at
10 MB/s). Keeping only the newest N events lost most migrations of a busy connection (1 of 9
in a 10 s demo), so a :class:`BoundedTrace` sorts events in two kinds:

- **Key events**, always kept (at most ``max_events``, oldest dropped past that): everything
  but periodic packet events, our ``connectivity:*`` path events, and packets carrying a
  path or CID frame (PATH_CHALLENGE/RESPONSE, NEW/RETIRE_CONNECTION_ID, CONNECTION_CLOSE,
  HANDSHAKE_DONE).
- **Packet events** (``transport:packet_sent/received/dropped``, ``datagrams_*``,
  ``recovery:*``, spin bit), kept only in a *window* around each migration: up to
  ``window_events`` of them in the ``window`` seconds before it and up to ``window_events``
  in the ``window`` seconds after it (defaults 0.5 s and 500 events each side: at bulk
  rate the event cap is reached first, ~14 ms at 10 MB/s; on a quiet connection the whole
  0.5 s). The start of the connection and its last ``window`` seconds are windows too.
  A switch's confirmation (``migration_complete`` or ``migration_abandoned``) keeps up to
  ``window_events`` more after it, so a migration keeps at most 3 x ``window_events`` packet
  events (windows closer than ``window`` merge). Past ``max_events`` kept packet events the
  oldest window is dropped whole.

So a trace holds at most ``max_events`` key events plus ``max_events`` packet events plus a
``window_events`` ring of the latest ones (a window's "before"); below the cap, at most
(1 + 3 x migrations) x ``window_events`` packet events. Every event dropped is
counted: the file's ``common_fields`` carry ``dropped_events`` and ``windows``, and its
``description`` says what was kept.

Path events (see ``actors.connection``) follow draft-ietf-quic-qlog-quic-events in the
0.3-era ``category:event`` naming aioquic writes: ``connectivity:path_assigned`` (a path added,
or with ``"abandoned": true`` closed), ``connectivity:migration_state_updated``
(``probing_successful``, ``migration_started``, ``migration_complete``,
``migration_abandoned``, with old and new path ids) and ``connectivity:connection_id_updated``
(the DCID a migration moved to). Each carries ``path_local``/``path_remote`` as
``{ip_v4|ip_v6, port_v4|port_v6}`` and the DCID when known. A listener's connection logs its
client's moves in the same shape (:class:`PeerMoves`). Two departures from the draft (-07,
the one with ``path_assigned``): it puts ``migration_state_updated`` in the ``quic``
category, and its ``old``/``new`` are the previous and new *states* (ours: ``state``, and
path ids in ``old``/``new``). qvis reads neither: it draws any event it does not know as a
label named by the event.

Files are written when the trace ends: aioquic ends it only after its closing period, which our
connection actor does not wait for, so the owner also calls :meth:`QlogWriter.close` when it
forgets the connection; both are idempotent. A file is written to a temporary name and renamed,
so a reader never sees half of one. Writing is synchronous (one ``json.dump``, on the caller's
thread) and happens once per connection.

The event store and the logger's trace list are aioquic private members: they are reached only
through ``actors.quic_adapter``, the one module allowed to touch them.
"""

from __future__ import annotations

import json
import os
from collections import deque
from pathlib import Path
from typing import Any

from aioquic.quic.connection import QuicConnection
from aioquic.quic.logger import QLOG_VERSION, QuicLogger, QuicLoggerTrace

from actors.quic_adapter import (
    BoundedQuicLoggerTrace,
    active_path_validated,
    connection_trace,
    logger_traces,
    peer_connection_id,
)

__all__ = [
    "DEFAULT_MAX_EVENTS",
    "DEFAULT_WINDOW",
    "DEFAULT_WINDOW_EVENTS",
    "BoundedTrace",
    "PeerMoves",
    "QlogDirectory",
    "QlogWriter",
    "is_packet_event",
]

#: Key events, and packet events in windows, kept per connection (each). Measured: about
#: 0.9 KB of memory per event, so at most ~36 MB per connection, reached only by a connection
#: that migrated 20+ times (or logged 20,000 path events).
DEFAULT_MAX_EVENTS = 20_000
#: Seconds of packet events kept before and after each migration.
DEFAULT_WINDOW = 0.5
#: Packet events kept at most before, and at most after, each migration.
DEFAULT_WINDOW_EVENTS = 500

#: Periodic events: kept only inside a migration's window.
PACKET_EVENTS = frozenset(
    {
        "transport:packet_sent",
        "transport:packet_received",
        "transport:packet_dropped",
        "transport:datagrams_sent",
        "transport:datagrams_received",
        "recovery:metrics_updated",
        "recovery:packet_lost",
        "recovery:congestion_state_updated",
        "connectivity:spin_bit_updated",
    }
)
#: A packet carrying one of these frames is a key event (migration and its CIDs, the end).
KEY_FRAMES = frozenset(
    {
        "path_challenge",
        "path_response",
        "new_connection_id",
        "retire_connection_id",
        "connection_close",
        "handshake_done",
    }
)
#: Path events that open (or extend) a window of packet events.
WINDOW_STATES = frozenset({"migration_started", "migration_complete", "migration_abandoned"})

_Kept = tuple[int, dict[str, Any]]  # (arrival order, event)
Addr = tuple[str, int]  # a client's (host, port)


class BoundedTrace(BoundedQuicLoggerTrace):
    """A qlog trace keeping key events and windows of packet events around migrations."""

    def __init__(
        self,
        *,
        is_client: bool,
        odcid: bytes,
        max_events: int,
        title: str | None = None,
        window: float = DEFAULT_WINDOW,
        window_events: int = DEFAULT_WINDOW_EVENTS,
    ) -> None:
        super().__init__(is_client=is_client, odcid=odcid)
        self.max_events = max_events
        self.title = title
        self.window_ms = window * 1000.0
        #: Packet events kept per side of a window (never more than half the cap).
        self.window_events = max(1, min(window_events, max_events // 2))
        self.dropped = 0
        self._seq = 0
        self._key: deque[_Kept] = deque()
        self._windows: deque[list[_Kept]] = deque()
        self._in_windows = 0
        self._ring: deque[_Kept] = deque()  # the latest packet events: a next window's before
        self._open_until = float("-inf")
        self._after_left = 0
        self._started = False

    # ---------------------------------------------------------------- what is held now

    @property
    def window_count(self) -> int:
        """Windows of packet events held (the connection's start and each migration)."""
        return len(self._windows)

    @property
    def packet_events(self) -> int:
        """Packet events held: in windows and in the ring of the latest ones."""
        return self._in_windows + len(self._ring)

    @property
    def event_count(self) -> int:
        """Every event held now."""
        return len(self._key) + self.packet_events

    # ---------------------------------------------------------------- storing

    def keep(self, event: dict[str, Any]) -> None:
        self._seq += 1
        item = (self._seq, event)
        now = float(event["time"])
        if not self._started:  # the handshake: a window from the first event on
            self._started = True
            self._open(now)
        if not is_packet_event(event):
            self._key.append(item)
            if len(self._key) > self.max_events:
                self._key.popleft()
                self.dropped += 1
            if event["name"] == "connectivity:migration_state_updated":
                state = event["data"].get("state")
                if state == "migration_started":
                    self._open(now)
                elif state in WINDOW_STATES:  # the switch settled: what follows it too
                    self._open(now, before=False)
            return
        if now <= self._open_until and self._after_left > 0:
            self._after_left -= 1
            self._windows[-1].append(item)
            self._in_windows += 1
            self._bound_windows()
            return
        self._ring.append(item)
        horizon = now - self.window_ms
        while self._ring and (
            len(self._ring) > self.window_events or float(self._ring[0][1]["time"]) < horizon
        ):
            self._ring.popleft()
            self.dropped += 1

    def _open(self, now: float, *, before: bool = True) -> None:
        """A migration at ``now`` (ms): a window (or the open one, extended) takes the ring's
        last ``window`` seconds (``before``) and the next ``window_events`` packet events."""
        if now > self._open_until:
            self._windows.append([])
        if before:
            horizon = now - self.window_ms
            kept = [item for item in self._ring if float(item[1]["time"]) >= horizon]
            self.dropped += len(self._ring) - len(kept)
            self._ring.clear()
            self._windows[-1].extend(kept)
            self._in_windows += len(kept)
        self._open_until = now + self.window_ms
        self._after_left = self.window_events
        self._bound_windows()

    def _bound_windows(self) -> None:
        while self._in_windows > self.max_events and len(self._windows) > 1:
            oldest = self._windows.popleft()
            self._in_windows -= len(oldest)
            self.dropped += len(oldest)
        if self._in_windows > self.max_events:  # one window, extended by migration after migration
            excess = self._in_windows - self.max_events
            del self._windows[0][:excess]
            self._in_windows -= excess
            self.dropped += excess

    # ---------------------------------------------------------------- the file

    def to_dict(self) -> dict[str, Any]:
        trace = super().to_dict()
        kept = [*self._key, *(item for w in self._windows for item in w), *self._ring]
        kept.sort(key=lambda item: item[0])
        trace["events"] = [event for _, event in kept]
        windows = len(self._windows) + (1 if self._ring else 0)  # the end's
        trace["common_fields"]["dropped_events"] = self.dropped
        trace["common_fields"]["windows"] = windows
        if self.title is not None:
            trace["title"] = self.title
        trace["description"] = (
            f"path, migration and other key events all kept (at most {self.max_events}); "
            f"packet events kept in {windows} windows of {self.window_ms / 1000:g} s or "
            f"{self.window_events} events before and after each migration, the start and the "
            f"end: {self.dropped} events dropped"
        )
        return trace


def is_packet_event(event: dict[str, Any]) -> bool:
    """A periodic packet event (kept only in windows), not a key one."""
    if event["name"] not in PACKET_EVENTS:
        return False
    frames = event["data"].get("frames")
    return not frames or not any(f.get("frame_type") in KEY_FRAMES for f in frames)


class PeerMoves:
    """A listener connection's qlog of its client's moves: the server side of a migration.

    aioquic's server moves to a client's new address on its first non-probing packet there
    (RFC 9000 §9.3) and logs nothing but packets; the listener calls :meth:`moved` when the
    address it sends to changed (a migration or a NAT rebinding: it cannot tell them apart)
    and :meth:`check` per datagram while a move awaits validation. Logged, in the outbound
    side's shape: ``path_assigned`` for each new client address (path ids count addresses
    in order seen, at most ``MAX_PATH_IDS`` remembered), ``migration_state_updated``
    ``migration_started`` (old and new path, ``old_path_remote`` and ``path_remote`` with the
    DCID; it opens a packet window, see :class:`BoundedTrace`), ``migration_complete`` once the
    new address is validated (at once for one validated before), ``migration_abandoned`` if the
    address changed again first, and ``connection_id_updated`` when the DCID moved with it.
    """

    #: Client addresses given a path id; past this a new address gets a fresh id unremembered.
    MAX_PATH_IDS = 64

    def __init__(
        self, quic: QuicConnection, trace: QuicLoggerTrace, local: tuple[Any, ...], first: Addr
    ) -> None:
        self.quic = quic
        self.trace = trace
        self.local = _endpoint(local)
        self._ids: dict[Addr, int] = {}
        self._next_id = 0
        self.peer = first
        self.path_id = self._assign(first)
        self.dcid = peer_connection_id(quic)
        #: The move awaiting validation: (old path id, old address).
        self._pending: tuple[int, Addr] | None = None

    @classmethod
    def attach(
        cls, quic: QuicConnection, local: tuple[Any, ...], first: tuple[Any, ...]
    ) -> PeerMoves | None:
        """The log of a connection's moves from its ``first`` address; None without qlog."""
        trace = connection_trace(quic)
        return None if trace is None else cls(quic, trace, local, _addr(first))

    @property
    def pending(self) -> bool:
        """A move awaits validation (the listener calls :meth:`check` per datagram)."""
        return self._pending is not None

    def moved(self, old: tuple[Any, ...], new: tuple[Any, ...]) -> None:
        """The address the connection sends to went ``old`` -> ``new``."""
        old_addr, new_addr = _addr(old), _addr(new)
        if self._pending is not None:  # moved on before the last move was validated
            self._migration("migration_abandoned", *self._pending)
        old_id = self.path_id
        self.peer, self.path_id = new_addr, self._assign(new_addr)
        self._pending = (old_id, old_addr)
        self._migration("migration_started", old_id, old_addr)
        dcid = peer_connection_id(self.quic)
        if dcid != self.dcid:
            self._log(
                "connection_id_updated",
                {"owner": "remote", "old": self.dcid.hex(), "new": dcid.hex()},
            )
            self.dcid = dcid
        self.check()

    def check(self) -> None:
        """The pending move is complete once the address is validated."""
        if self._pending is not None and active_path_validated(self.quic):
            pending, self._pending = self._pending, None
            self._migration("migration_complete", *pending)

    def _assign(self, addr: Addr) -> int:
        path_id = self._ids.get(addr)
        if path_id is None:
            path_id = self._next_id
            self._next_id += 1
            if len(self._ids) < self.MAX_PATH_IDS:
                self._ids[addr] = path_id
            self._log("path_assigned", {"path_id": path_id, **self._path(addr)})
        return path_id

    def _path(self, remote: Addr) -> dict[str, Any]:
        dcid = peer_connection_id(self.quic).hex()
        return {
            "path_local": self.local,
            "path_remote": {**_endpoint(remote), "connection_ids": [dcid]},
            "dcid": dcid,
        }

    def _migration(self, state: str, old_id: int, old_addr: Addr) -> None:
        data = {"state": state, "path_id": self.path_id, **self._path(self.peer)}
        data |= {"old": old_id, "new": self.path_id}
        data |= {"old_path_local": self.local, "old_path_remote": _endpoint(old_addr)}
        self._log("migration_state_updated", data)

    def _log(self, event: str, data: dict[str, Any]) -> None:
        self.trace.log_event(category="connectivity", event=event, data=data)


def _addr(sockaddr: tuple[Any, ...]) -> Addr:
    """``(host, port)`` of a socket address (IPv4-mapped IPv6 as IPv4)."""
    host = str(sockaddr[0])
    return (host[7:] if host.startswith("::ffff:") else host), int(sockaddr[1])


def _endpoint(sockaddr: tuple[Any, ...]) -> dict[str, Any]:
    """A qlog ``PathEndpointInfo``: ``{ip_v4, port_v4}`` or ``{ip_v6, port_v6}``."""
    host, port = _addr(sockaddr)
    v = "v6" if ":" in host else "v4"
    return {f"ip_{v}": host, f"port_{v}": port}


class QlogWriter(QuicLogger):
    """A ``QuicLogger`` (``QuicConfiguration.quic_logger``) writing each trace to its own file.

    ``name`` given (an outbound connection: one writer per connection): ``DIR/{name}.qlog``.
    ``name=None`` (a listener, shared by its connections): ``DIR/{prefix}{odcid}.qlog``, as
    aioquic's ``QuicFileLogger``, since the server creates connections before we name them.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        name: str | None = None,
        prefix: str = "",
        max_events: int = DEFAULT_MAX_EVENTS,
        window: float = DEFAULT_WINDOW,
        window_events: int = DEFAULT_WINDOW_EVENTS,
    ) -> None:
        _check(max_events, window, window_events)
        super().__init__()
        self.directory = Path(directory)
        self.name = name
        self.prefix = prefix
        self.max_events = max_events
        self.window = window
        self.window_events = window_events
        self.written: list[Path] = []

    def start_trace(self, is_client: bool, odcid: bytes) -> QuicLoggerTrace:
        title = f"quic-supervisor connection {self.name}" if self.name is not None else None
        trace = BoundedTrace(
            is_client=is_client,
            odcid=odcid,
            max_events=self.max_events,
            title=title,
            window=self.window,
            window_events=self.window_events,
        )
        logger_traces(self).append(trace)
        return trace

    def _file_for(self, trace_dict: dict[str, Any]) -> Path:
        stem = self.name or f"{self.prefix}{trace_dict['common_fields']['ODCID']}"
        path = self.directory / f"{stem}.qlog"
        n = 1
        while path in self.written:  # a second trace under one name (not expected)
            n += 1
            path = self.directory / f"{stem}-{n}.qlog"
        return path

    def end_trace(self, trace: QuicLoggerTrace) -> None:
        """Write ``trace`` and forget it (aioquic calls this at the end of the closing period)."""
        traces = logger_traces(self)
        if trace not in traces:
            return  # already written by close()
        traces.remove(trace)
        trace_dict = trace.to_dict()
        path = self._file_for(trace_dict)
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(
                {"qlog_format": "JSON", "qlog_version": QLOG_VERSION, "traces": [trace_dict]}, fh
            )
        os.replace(tmp, path)
        self.written.append(path)

    def close(self) -> None:
        """Write every trace not ended yet (the connection was forgotten before aioquic ended
        it). Idempotent."""
        for trace in list(logger_traces(self)):
            self.end_trace(trace)


class QlogDirectory:
    """Where a Supervisor's qlog files go, and the bounds every trace gets."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_events: int = DEFAULT_MAX_EVENTS,
        window: float = DEFAULT_WINDOW,
        window_events: int = DEFAULT_WINDOW_EVENTS,
    ) -> None:
        _check(max_events, window, window_events)
        self.path = Path(directory)
        self.max_events = max_events
        self.window = window
        self.window_events = window_events

    def _writer(self, **kwargs: Any) -> QlogWriter:
        self.path.mkdir(parents=True, exist_ok=True)
        return QlogWriter(
            self.path,
            max_events=self.max_events,
            window=self.window,
            window_events=self.window_events,
            **kwargs,
        )

    def connection_logger(self, conn_id: str) -> QlogWriter:
        """The logger of one outbound connection: ``DIR/{conn_id}.qlog``."""
        return self._writer(name=conn_id)

    def server_logger(self) -> QlogWriter:
        """The logger of a listener's connections: ``DIR/server-{odcid}.qlog``."""
        return self._writer(prefix="server-")


def _check(max_events: int, window: float, window_events: int) -> None:
    """Bad bounds fail here, naming the bound and the fix."""
    if max_events < 1:
        raise ValueError(f"qlog max_events must be >= 1, not {max_events}")
    if not window >= 0:
        raise ValueError(f"qlog window must be >= 0 seconds, not {window}")
    if window_events < 1:
        raise ValueError(f"qlog window_events must be >= 1, not {window_events}")
