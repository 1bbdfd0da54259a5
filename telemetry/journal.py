"""The flight recorder: every control message and event, msgpack, append-only, size-capped.

File format (version 1): a stream of msgpack maps. The first is the header
``{"magic": "quic-supervisor-journal", "version": 1, "wall": ..., "mono": ..., "pid": ...}``;
each record after it is::

    {"mono": float, "wall": float, "kind": "msg" | "event", "type": str,
     "conn": str | None, "path": str | None, "trace_id": hex | None, "span_id": hex | None,
     "body": dict}

``mono`` is ``time.monotonic()`` (orders records and measures gaps); ``wall`` is ``time.time()``.

Rotation: before a record would take the file past ``max_bytes``, ``path`` becomes
``path.1`` (``path.1`` -> ``path.2`` ...; the oldest beyond ``backups`` is deleted) and a new
file with its own header is started, so every file is readable alone. A writer opening a
non-empty file rotates it first: a crashed run's file may end in a partial record, and
appending after it would make the rest unreadable.

Flush policy: :meth:`JournalWriter.write` runs on the event loop, so it only packs and appends
to a user-space buffer (no syscall per record). The buffer goes to the OS every
``flush_every`` records, on :meth:`JournalWriter.flush`, on rotation and on close. A process
crash loses at most the records since the last flush (and leaves a truncated tail, which
:func:`read_journal` tolerates); nothing is ``fsync``ed, so an OS crash may lose more.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import msgpack
from opentelemetry import trace
from opentelemetry.trace import SpanContext

__all__ = [
    "JOURNAL_MAGIC",
    "JOURNAL_VERSION",
    "JournalFormatError",
    "JournalWriter",
    "journal_files",
    "read_header",
    "read_journal",
]

JOURNAL_MAGIC = "quic-supervisor-journal"
JOURNAL_VERSION = 1
KINDS = ("msg", "event")

StrPath = str | os.PathLike[str]


class JournalFormatError(ValueError):
    """The file is not a quic-supervisor journal, or one this code cannot read."""


def _to_msgpack(obj: Any) -> Any:
    """Fallback for values msgpack cannot pack: a record must never fail on the event loop."""
    if isinstance(obj, enum.Enum):
        return obj.value
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


class JournalWriter:
    """Appends records to ``path``; see the module docstring for format, rotation and flushing.

    Not thread-safe: one writer per event loop (the supervisor's).
    """

    def __init__(
        self,
        path: StrPath,
        max_bytes: int = 16 * 1024 * 1024,
        backups: int = 3,
        *,
        flush_every: int = 64,
        buffer_size: int = 64 * 1024,
    ) -> None:
        if max_bytes < 1024:
            raise ValueError(f"max_bytes must be >= 1024, not {max_bytes}")
        if backups < 0:
            raise ValueError(f"backups must be >= 0, not {backups}")
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, not {flush_every}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.flush_every = flush_every
        self._buffer_size = buffer_size
        # surrogatepass: a str holding lone surrogates (undecodable file names) must not fail.
        self._packer = msgpack.Packer(
            default=_to_msgpack, use_bin_type=True, unicode_errors="surrogatepass"
        )
        self._file: BinaryIO | None = None
        self._size = self._header_len = 0
        self._unflushed = 0
        self.records_written = 0
        self.rotations = 0
        if self.path.exists() and self.path.stat().st_size > 0:
            self._rotate_files()
        self._open()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "wb", buffering=self._buffer_size)  # noqa: SIM115
        header = self._packer.pack(
            {
                "magic": JOURNAL_MAGIC,
                "version": JOURNAL_VERSION,
                "wall": time.time(),
                "mono": time.monotonic(),
                "pid": os.getpid(),
            }
        )
        self._file.write(header)
        self._file.flush()  # a file that exists is always recognisable as a journal
        self._size = self._header_len = len(header)
        self._unflushed = 0

    def _rotate_files(self) -> None:
        """Shift ``path`` -> ``path.1`` -> ... ; the one past ``backups`` is removed."""
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
            return
        oldest = self.path.with_name(f"{self.path.name}.{self.backups}")
        oldest.unlink(missing_ok=True)
        for n in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{n}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        self._rotate_files()
        self.rotations += 1
        self._open()

    @property
    def closed(self) -> bool:
        return self._file is None

    def write(
        self,
        kind: str,
        type: str,  # the record field's name
        body: Mapping[str, Any] | None = None,
        *,
        conn: str | None = None,
        path: str | None = None,
        span_context: SpanContext | None = None,
        mono: float | None = None,
        wall: float | None = None,
    ) -> None:
        """Append one record. ``span_context=None`` takes the current span's, if valid.

        Values msgpack cannot pack (enums, dataclasses, sets, other objects) are converted,
        never rejected. A record larger than ``max_bytes`` is still written, alone in its file.
        """
        if self._file is None:
            raise ValueError(f"journal {self.path} is closed")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        ctx = (
            span_context
            if span_context is not None
            else trace.get_current_span().get_span_context()
        )
        valid = ctx.is_valid
        data = self._packer.pack(
            {
                "mono": time.monotonic() if mono is None else mono,
                "wall": time.time() if wall is None else wall,
                "kind": kind,
                "type": type,
                "conn": conn,
                "path": path,
                "trace_id": format(ctx.trace_id, "032x") if valid else None,
                "span_id": format(ctx.span_id, "016x") if valid else None,
                "body": dict(body) if body is not None else {},
            }
        )
        if self._size + len(data) > self.max_bytes and self._size > self._header_len:
            self._rotate()
        assert self._file is not None
        self._file.write(data)
        self._size += len(data)
        self.records_written += 1
        self._unflushed += 1
        if self._unflushed >= self.flush_every:
            self.flush()

    def msg(self, type: str, body: Mapping[str, Any] | None = None, **kw: Any) -> None:
        """Record a control message (``kind="msg"``)."""
        self.write("msg", type, body, **kw)

    def event(self, type: str, body: Mapping[str, Any] | None = None, **kw: Any) -> None:
        """Record an event (``kind="event"``)."""
        self.write("event", type, body, **kw)

    def flush(self) -> None:
        """Hand buffered records to the OS (survives a process crash, not an OS crash)."""
        if self._file is not None:
            self._file.flush()
            self._unflushed = 0

    def close(self) -> None:
        """Flush and close. Idempotent."""
        if self._file is not None:
            self._file.flush()
            self._file.close()
            self._file = None

    def __enter__(self) -> JournalWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _unpacker(fh: BinaryIO) -> msgpack.Unpacker:
    return msgpack.Unpacker(
        fh,
        raw=False,
        strict_map_key=False,
        unicode_errors="surrogatepass",
        max_buffer_size=256 * 1024 * 1024,
    )


def _check_header(obj: object, path: StrPath) -> dict[str, Any]:
    if not isinstance(obj, dict) or obj.get("magic") != JOURNAL_MAGIC:
        raise JournalFormatError(
            f"{os.fspath(path)} is not a quic-supervisor journal "
            f"(no {JOURNAL_MAGIC!r} header record)"
        )
    if obj.get("version") != JOURNAL_VERSION:
        raise JournalFormatError(
            f"{os.fspath(path)}: journal version {obj.get('version')!r} is not supported "
            f"(this code reads version {JOURNAL_VERSION})"
        )
    return obj


def read_header(path: StrPath) -> dict[str, Any]:
    """The header record of one journal file; ``JournalFormatError`` if there is none."""
    with open(path, "rb") as fh:
        try:
            first = next(iter(_unpacker(fh)), None)
        except (ValueError, msgpack.UnpackException) as exc:
            raise JournalFormatError(
                f"{os.fspath(path)} is not a quic-supervisor journal: {exc}"
            ) from exc
    return _check_header(first, path)


def read_journal(path: StrPath) -> Iterator[dict[str, Any]]:
    """The records of one journal file (header excluded), oldest first.

    A truncated last record (the writer crashed mid-write) ends the iteration quietly. A file
    without a valid header, or with something other than a record inside, raises
    ``JournalFormatError``.
    """
    with open(path, "rb") as fh:
        unpacker = _unpacker(fh)
        it = iter(unpacker)
        try:
            first = next(it, None)
        except (ValueError, msgpack.UnpackException) as exc:
            raise JournalFormatError(
                f"{os.fspath(path)} is not a quic-supervisor journal: {exc}"
            ) from exc
        _check_header(first, path)
        index = 0
        while True:
            try:
                record = next(it)
            except StopIteration:  # end of file, or a partial tail record
                return
            except (ValueError, msgpack.UnpackException) as exc:
                raise JournalFormatError(
                    f"{os.fspath(path)}: corrupt record after record {index}: {exc}"
                ) from exc
            if not isinstance(record, dict) or record.get("kind") not in KINDS:
                raise JournalFormatError(
                    f"{os.fspath(path)}: record {index} is not a journal record: {record!r:.80}"
                )
            index += 1
            yield record


def journal_files(path: StrPath) -> list[Path]:
    """``path`` and its rotated backups that exist, oldest first (``path.N`` ... ``path``)."""
    base = Path(path)
    rotated: list[tuple[int, Path]] = []
    for candidate in base.parent.glob(f"{base.name}.*"):
        suffix = candidate.name[len(base.name) + 1 :]
        if suffix.isdigit():
            rotated.append((int(suffix), candidate))
    files = [p for _, p in sorted(rotated, reverse=True)]
    if base.exists():
        files.append(base)
    return files
