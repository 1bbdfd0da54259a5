"""Per-connection qlog files (for qvis), named by our connection id, with bounded memory.

aioquic's ``QuicFileLogger`` names each file by the original destination CID and keeps the
whole trace of a connection in memory until the connection *ends*: a long-lived connection
grows without bound (every packet sent and received is an event: ~37k events per second at
10 MB/s). Here each trace is a deque of at most ``max_events`` events: past the cap the
oldest are dropped (counted, and said in the trace's ``description``), so memory stays flat
and the file keeps the most recent history, the part that explains how a connection ended.

Files are written when the trace ends: aioquic ends it only after its closing period, which our
connection actor does not wait for, so the owner also calls :meth:`QlogWriter.close` when it
forgets the connection; both are idempotent. A file is written to a temporary name and renamed,
so a reader never sees half of one. Writing is synchronous (one ``json.dump`` of at most
``max_events`` events, on the caller's thread) and happens once per connection.

The bounded event store and the logger's trace list are aioquic private members: they are
reached only through ``actors.quic_adapter``, the one module allowed to touch them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from aioquic.quic.logger import QLOG_VERSION, QuicLogger, QuicLoggerTrace

from actors.quic_adapter import BoundedQuicLoggerTrace, logger_traces

__all__ = ["DEFAULT_MAX_EVENTS", "BoundedTrace", "QlogDirectory", "QlogWriter"]

#: Events kept per connection. Measured: about 0.9 KB of memory per event and 3,700 events per
#: MB transferred, so the cap is ~18 MB, the last ~5 MB of a bulk transfer or hours of a
#: mostly idle connection.
DEFAULT_MAX_EVENTS = 20_000


class BoundedTrace(BoundedQuicLoggerTrace):
    """A qlog trace that keeps the newest ``max_events`` events and counts the ones dropped."""

    def __init__(
        self, *, is_client: bool, odcid: bytes, max_events: int, title: str | None = None
    ) -> None:
        super().__init__(is_client=is_client, odcid=odcid, max_events=max_events)
        self.dropped = 0
        self.title = title

    def log_event(self, *, category: str, event: str, data: dict[str, Any]) -> None:
        if self.event_count == self.max_events:
            self.dropped += 1
        super().log_event(category=category, event=event, data=data)

    def to_dict(self) -> dict[str, Any]:
        trace = super().to_dict()
        if self.title is not None:
            trace["title"] = self.title
        if self.dropped:
            trace["description"] = (
                f"the {self.dropped} oldest events were dropped "
                f"(at most {self.max_events} are kept per connection)"
            )
        return trace


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
    ) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, not {max_events}")
        super().__init__()
        self.directory = Path(directory)
        self.name = name
        self.prefix = prefix
        self.max_events = max_events
        self.written: list[Path] = []

    def start_trace(self, is_client: bool, odcid: bytes) -> QuicLoggerTrace:
        title = f"quic-supervisor connection {self.name}" if self.name is not None else None
        trace = BoundedTrace(
            is_client=is_client, odcid=odcid, max_events=self.max_events, title=title
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
    """Where a Supervisor's qlog files go, and the cap every trace gets."""

    def __init__(
        self, directory: str | os.PathLike[str], *, max_events: int = DEFAULT_MAX_EVENTS
    ) -> None:
        if max_events < 1:
            raise ValueError(f"qlog max_events must be >= 1, not {max_events}")
        self.path = Path(directory)
        self.max_events = max_events

    def connection_logger(self, conn_id: str) -> QlogWriter:
        """The logger of one outbound connection: ``DIR/{conn_id}.qlog``."""
        self.path.mkdir(parents=True, exist_ok=True)
        return QlogWriter(self.path, name=conn_id, max_events=self.max_events)

    def server_logger(self) -> QlogWriter:
        """The logger of a listener's connections: ``DIR/server-{odcid}.qlog``."""
        self.path.mkdir(parents=True, exist_ok=True)
        return QlogWriter(self.path, prefix="server-", max_events=self.max_events)
