"""The flight recorder: every control message and event, msgpack, append-only, size-capped.

File format (version 1): a stream of msgpack maps. The first is the header
``{"magic": "quic-supervisor-journal", "version": 1, "wall": ..., "mono": ..., "pid": ...}``;
each record after it is::

    {"mono": float, "wall": float, "kind": "msg" | "event", "type": str,
     "conn": str | None, "path": str | None, "trace_id": hex | None, "span_id": hex | None,
     "body": dict}

``mono`` is ``time.monotonic()`` (orders records and measures gaps); ``wall`` is ``time.time()``.

Bounds, so that any reader can walk a record without recursion or memory trouble: the writer
converts every body to msgpack natives (str-able keys, no container nested deeper than
:data:`MAX_DEPTH` levels, counting the record map as level 1; deeper values become a marker
string), and a record that still packs to more than :data:`MAX_RECORD_BYTES` is written with its
body replaced by a note saying so. The reader refuses records beyond those bounds.

Whose files: the writer only ever truncates, renames or deletes files that start with the journal
header (and, for ``path`` itself, an empty regular file). A ``path`` holding anything else (a
text file, a directory, a symlink, a device) is refused with :class:`JournalPathError` before
anything is touched.

Rotation: before a record would take the file past ``max_bytes``, ``path`` becomes
``path.1`` (``path.1`` -> ``path.2`` ...; the oldest beyond ``backups`` is deleted) and a new
file with its own header is started, so every file is readable alone. A writer opening a
non-empty file rotates it first: a crashed run's file may end in a partial record, and
appending after it would make the rest unreadable. A ``path.N`` that is not a journal file is
left alone and ends the chain for that rotation: only ``path.1`` .. ``path.N-1`` are shifted and
the oldest of them is deleted (with ``N == 1``, the current file is deleted instead of kept), so
the foreign file is never renamed, overwritten or deleted. A warning is logged once per file.

Flush policy: :meth:`JournalWriter.write` runs on the event loop, so it only packs and appends
to a user-space buffer (no syscall per record). The buffer goes to the OS every
``flush_every`` records, on :meth:`JournalWriter.flush`, on rotation and on close. A process
crash loses at most the records since the last flush (and leaves a truncated tail, which
:func:`read_journal` tolerates); nothing is ``fsync``ed, so an OS crash may lose more.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import reprlib
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import msgpack
from opentelemetry import trace
from opentelemetry.trace import SpanContext

__all__ = [
    "JOURNAL_MAGIC",
    "JOURNAL_VERSION",
    "MAX_DEPTH",
    "MAX_RECORD_BYTES",
    "JournalFormatError",
    "JournalPathError",
    "JournalWriter",
    "journal_files",
    "read_header",
    "read_journal",
]

log = logging.getLogger(__name__)

JOURNAL_MAGIC = "quic-supervisor-journal"
JOURNAL_VERSION = 1
KINDS = ("msg", "event")

#: Deepest container nesting in a record (the record map is level 1, its body level 2).
MAX_DEPTH = 64
#: Largest packed record the writer writes; the reader refuses records over twice this.
MAX_RECORD_BYTES = 8 * 1024 * 1024
_READ_BUFFER = 2 * MAX_RECORD_BYTES
#: The header is a few dozen bytes; only this much of a file is read to recognise it.
_HEADER_PREFIX = 64 * 1024
_TOO_DEEP = f"<nested deeper than {MAX_DEPTH} levels: not recorded>"
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
# Exceptions msgpack's unpacker raises on bad bytes: malformed data (ValueError, including
# StackError for deep nesting), an array used as a map key (TypeError: unhashable), and
# RecursionError from the pure-Python fallback implementation.
_UNPACK_ERRORS = (ValueError, TypeError, RecursionError, msgpack.UnpackException)

StrPath = str | os.PathLike[str]


class JournalFormatError(ValueError):
    """The file is not a quic-supervisor journal, or one this code cannot read."""


class JournalPathError(JournalFormatError):
    """The journal path holds something the writer did not write; it is never touched."""


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
    if isinstance(obj, (bytearray, memoryview)):
        return bytes(obj)
    return str(obj)


def _plain(value: Any, level: int) -> Any:
    """``value`` as msgpack natives the reader accepts: ints in 64 bits, hashable scalar keys,
    containers at most :data:`MAX_DEPTH` deep (``level`` is the level ``value`` would occupy)."""
    for _ in range(8):  # an enum whose value is an enum...: bounded, then str()
        if value is None or isinstance(value, bool | float | str | bytes):
            return value
        if isinstance(value, int):
            return value if _INT_MIN <= value <= _INT_MAX else str(value)
        if isinstance(value, Mapping | list | tuple):
            break
        value = _to_msgpack(value)
    else:
        return str(value)
    if level > MAX_DEPTH:
        return _TOO_DEEP
    if isinstance(value, Mapping):
        return {_plain_key(k): _plain(v, level + 1) for k, v in value.items()}
    return [_plain(v, level + 1) for v in value]


def _plain_key(key: Any) -> Any:
    """A map key the reader can hash: scalars stay, anything else becomes its text."""
    if key is None or isinstance(key, bool | float | str | bytes):
        return key
    if isinstance(key, int) and _INT_MIN <= key <= _INT_MAX:
        return key
    return str(_to_msgpack(key)) if isinstance(key, enum.Enum) else str(key)


def _header_of(prefix: bytes) -> dict[str, Any] | None:
    """The journal header ``prefix`` starts with, or None."""
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=False,
        unicode_errors="surrogatepass",
        max_buffer_size=len(prefix) or 1,
    )
    unpacker.feed(prefix)
    try:
        first = unpacker.unpack()
    except (msgpack.OutOfData, *_UNPACK_ERRORS):
        return None
    if isinstance(first, dict) and first.get("magic") == JOURNAL_MAGIC:
        return first
    return None


def _read_prefix(fd: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < _HEADER_PREFIX:
        chunk = os.read(fd, _HEADER_PREFIX - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _why_not_ours(path: Path, *, allow_empty: bool) -> str | None:
    """Why the writer must leave ``path`` alone; None if it is absent or a journal file (or,
    with ``allow_empty``, an empty regular file). Never follows a symlink, never blocks on a
    FIFO or device."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if os.path.islink(path):
            return "is a symbolic link"
        if os.path.lexists(path) and not os.path.isfile(path):
            return "is not a regular file"
        return f"cannot be checked ({exc.strerror})"
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            return "is a directory"
        if not stat.S_ISREG(st.st_mode):
            return "is not a regular file"
        if st.st_size == 0:
            return None if allow_empty else "is an empty file, not a journal"
        if _header_of(_read_prefix(fd)) is None:
            return "is not a quic-supervisor journal (it does not start with the journal header)"
        return None
    except OSError as exc:
        return f"cannot be checked ({exc.strerror})"
    finally:
        os.close(fd)


class JournalWriter:
    """Appends records to ``path``; see the module docstring for format, rotation and flushing.

    Raises :class:`JournalPathError` at construction, before touching anything, when ``path``
    exists and is not a journal (an empty regular file is accepted: it holds nothing to lose).
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
        why = _why_not_ours(self.path, allow_empty=True)
        if why is not None:
            raise JournalPathError(
                f"journal path {os.fspath(self.path)} {why}: it is left untouched (the journal "
                "only replaces its own files); choose another journal path, or move it away"
            )
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
        self._warned: set[Path] = set()
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

    def _backup(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    def _rotate_files(self) -> None:
        """Shift ``path`` -> ``path.1`` -> ... ; the one past ``backups`` is removed.

        Only journal files move or go: the first ``path.N`` that is anything else caps the
        chain below it (see the module docstring).
        """
        keep = self.backups
        for n in range(1, self.backups + 1):
            backup = self._backup(n)
            why = _why_not_ours(backup, allow_empty=False)
            if why is not None:
                keep = n - 1
                if backup not in self._warned:
                    self._warned.add(backup)
                    log.warning(
                        "journal rotation keeps %d backup(s), not %d: %s %s and is left alone",
                        keep,
                        self.backups,
                        backup,
                        why,
                    )
                break
        if keep == 0:
            self.path.unlink(missing_ok=True)
            return
        self._backup(keep).unlink(missing_ok=True)
        for n in range(keep - 1, 0, -1):
            src = self._backup(n)
            if os.path.lexists(src):
                os.replace(src, self._backup(n + 1))
        os.replace(self.path, self._backup(1))

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

        Values msgpack cannot pack (enums, dataclasses, sets, other objects, ints beyond 64
        bits) are converted, never rejected; nesting beyond :data:`MAX_DEPTH` is cut and a body
        packing to more than :data:`MAX_RECORD_BYTES` is replaced by a note. A record larger
        than ``max_bytes`` is still written, alone in its file.
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
        record = {
            "mono": time.monotonic() if mono is None else mono,
            "wall": time.time() if wall is None else wall,
            "kind": kind,
            "type": type if isinstance(type, str) else str(type),
            "conn": conn if conn is None or isinstance(conn, str) else str(conn),
            "path": path if path is None or isinstance(path, str) else str(path),
            "trace_id": format(ctx.trace_id, "032x") if valid else None,
            "span_id": format(ctx.span_id, "016x") if valid else None,
            "body": _plain(body, 2) if body is not None else {},
        }
        data = self._packer.pack(record)
        if len(data) > MAX_RECORD_BYTES:
            record["body"] = {
                "journal_error": f"body not recorded: {len(data)} bytes packed, over the "
                f"{MAX_RECORD_BYTES}-byte record limit"
            }
            data = self._packer.pack(record)
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


# -- reading --------------------------------------------------------------------------------------


def _open_regular(path: StrPath) -> BinaryIO:
    """Open ``path`` for reading; JournalFormatError for a directory, FIFO or device (which
    would block or fail obscurely). FileNotFoundError and PermissionError pass through."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise JournalFormatError(f"{os.fspath(path)} is a directory, not a journal file")
        if not stat.S_ISREG(mode):
            raise JournalFormatError(f"{os.fspath(path)} is not a regular file, not a journal")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _unpacker(fh: BinaryIO) -> msgpack.Unpacker:
    return msgpack.Unpacker(
        fh,
        raw=False,
        strict_map_key=False,
        unicode_errors="surrogatepass",
        max_buffer_size=_READ_BUFFER,
    )


def _check_header(fh: BinaryIO, path: StrPath) -> dict[str, Any]:
    """The header at the start of ``fh`` (read from a bounded prefix); rewinds ``fh``."""
    obj = _header_of(_read_prefix(fh.fileno()))
    fh.seek(0)
    if obj is None:
        raise JournalFormatError(
            f"{os.fspath(path)} is not a quic-supervisor journal "
            f"(no {JOURNAL_MAGIC!r} header record)"
        )
    if obj.get("version") != JOURNAL_VERSION:
        raise JournalFormatError(
            f"{os.fspath(path)}: journal version {reprlib.repr(obj.get('version'))} is not "
            f"supported (this code reads version {JOURNAL_VERSION})"
        )
    return obj


def read_header(path: StrPath) -> dict[str, Any]:
    """The header record of one journal file; ``JournalFormatError`` if there is none."""
    with _open_regular(path) as fh:
        return _check_header(fh, path)


def _depth_ok(record: dict[Any, Any]) -> bool:
    """Is every container in ``record`` at most MAX_DEPTH levels deep? (Iterative: no
    recursion, whatever the input.) Map keys are never containers: msgpack refuses unhashable
    keys, and with lists for arrays, tuples never occur."""
    stack: list[tuple[Any, int]] = [(v, 2) for v in record.values() if isinstance(v, dict | list)]
    while stack:
        value, level = stack.pop()
        if level > MAX_DEPTH:
            return False
        children = value.values() if isinstance(value, dict) else value
        stack.extend((c, level + 1) for c in children if isinstance(c, dict | list))
    return True


def _record_problem(record: object) -> str | None:
    if not isinstance(record, dict):
        return "is not a map"
    if not _depth_ok(record):
        return f"is nested deeper than {MAX_DEPTH} levels"
    if record.get("kind") not in KINDS:
        return f"has kind {reprlib.repr(record.get('kind'))}, not one of {KINDS}"
    return None


def read_journal(
    path: StrPath, *, on_invalid: Callable[[JournalFormatError], None] | None = None
) -> Iterator[dict[str, Any]]:
    """The records of one journal file (header excluded), oldest first.

    A truncated last record (the writer crashed mid-write) ends the iteration quietly. A file
    without a valid header raises ``JournalFormatError``. So does a record that is not a journal
    record (not a map, no known ``kind``, nested deeper than :data:`MAX_DEPTH`) or bytes that do
    not unpack (corruption, a record over the size limit): unless ``on_invalid`` is given, in
    which case it receives the error and the bad record is skipped (corrupt bytes end the file:
    msgpack cannot find the next record after them). Records are otherwise not checked: field
    values may have any msgpack type, so consumers must not assume the writer's types.
    """
    with _open_regular(path) as fh:
        _check_header(fh, path)
        it = iter(_unpacker(fh))
        index = 0  # records read so far; the header comes first
        header = True
        while True:
            try:
                record = next(it)
            except StopIteration:  # end of file, or a partial tail record
                return
            except _UNPACK_ERRORS as exc:
                err = JournalFormatError(f"{os.fspath(path)}: record {index} is corrupt: {exc}")
                if on_invalid is None:
                    raise err from exc
                on_invalid(err)
                return
            if header:
                header = False
                continue
            problem = _record_problem(record)
            index += 1
            if problem is None:
                yield record
                continue
            err = JournalFormatError(
                f"{os.fspath(path)}: record {index - 1} {problem}: it is not a journal record"
            )
            if on_invalid is None:
                raise err
            on_invalid(err)


def _is_journal_file(path: Path) -> bool:
    return _why_not_ours(path, allow_empty=False) is None and os.path.lexists(path)


def journal_files(path: StrPath) -> list[Path]:
    """``path`` and its rotated backups, oldest first (``path.N`` ... ``path``).

    ``path`` is listed whenever something exists there (so reading it reports what it is); a
    ``path.N`` only if it is a journal file: a foreign file in the chain is no backup.
    """
    base = Path(path)
    rotated: list[tuple[int, Path]] = []
    prefix = base.name + "."
    try:
        names = os.listdir(base.parent)
    except OSError:
        names = []
    for name in names:
        suffix = name[len(prefix) :]
        if name.startswith(prefix) and suffix.isascii() and suffix.isdigit():
            candidate = base.with_name(name)
            if _is_journal_file(candidate):
                rotated.append((int(suffix), candidate))
    files = [p for _, p in sorted(rotated, reverse=True)]
    if os.path.lexists(base):
        files.append(base)
    return files
