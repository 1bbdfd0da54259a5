"""Independent libp2p peers over QUIC: py-libp2p 0.8.1 and js-libp2p 2.x, as subprocesses.

`make peers` installs them into .peers/ (never a fixture); the programs are tests/peers/
py_libp2p_peer.py and tests/peers/js/peer.mjs, whose docstrings list their event lines and what
each implementation does (py-libp2p's identify reports a /tcp/ observed address on QUIC; js-libp2p
forbids migration; ...). A test skips with `py_libp2p_available()` / `js_libp2p_available()`.

    async with py_libp2p_peer("secp256k1") as peer:
        ...  # dial peer.multiaddr
        await peer.wait_event(lambda e: e["event"] == "ping" and e["count"] == 3)

    result = await run_dial("js-libp2p", peer.multiaddr, count=3)  # the peer dials and pings
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .waiting import Notifier

__all__ = [
    "KEY_TYPES",
    "DialResult",
    "Libp2pPeer",
    "PeerKind",
    "js_libp2p_available",
    "js_libp2p_peer",
    "py_libp2p_available",
    "py_libp2p_peer",
    "run_dial",
]

PeerKind = Literal["py-libp2p", "js-libp2p"]
KEY_TYPES = ("ed25519", "secp256k1", "rsa")

REPO = Path(__file__).resolve().parents[2]
PEERS = REPO / ".peers"
PY_PYTHON = PEERS / "py-libp2p" / "bin" / "python"
PY_SCRIPT = REPO / "tests" / "peers" / "py_libp2p_peer.py"
JS_DIR = PEERS / "js-libp2p"
JS_SCRIPT = JS_DIR / "peer.mjs"  # a symlink to tests/peers/js/peer.mjs (see the Makefile)
MIN_NODE = 20
_STDERR_KEEP = 256 * 1024  # tail of a peer's log kept for failure messages


def py_libp2p_available() -> str | None:
    """None when the py-libp2p peer is installed, else why not (a skip reason)."""
    if not (PEERS / "py-libp2p" / ".installed").exists() or not PY_PYTHON.exists():
        return "py-libp2p peer not installed in .peers/py-libp2p: run `make peers`"
    return None


@functools.cache
def _node_major() -> tuple[int | None, str]:
    node = shutil.which("node")
    if node is None:
        return None, "not found"
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"at {node} does not run ({exc})"
    match = re.match(r"v(\d+)\.", out.strip())
    return (int(match.group(1)) if match else None), out.strip()


def js_libp2p_available() -> str | None:
    """None when node >= 20 and the js-libp2p peer are installed, else why not (a skip reason)."""
    major, version = _node_major()
    if major is None:
        return f"node {version}: the js-libp2p peer needs node >= {MIN_NODE}"
    if major < MIN_NODE:
        return (
            f"node {version} is older than {MIN_NODE}: js-libp2p 2.x and its QUIC need {MIN_NODE}+"
        )
    if not (JS_DIR / ".installed").exists() or not JS_SCRIPT.exists():
        return "js-libp2p peer not installed in .peers/js-libp2p: run `make peers`"
    return None


def _argv(kind: PeerKind, args: Sequence[str]) -> list[str]:
    if kind == "py-libp2p":
        reason = py_libp2p_available()
        if reason:
            raise RuntimeError(reason)
        return [str(PY_PYTHON), str(PY_SCRIPT), *args]
    if kind == "js-libp2p":
        reason = js_libp2p_available()
        if reason:
            raise RuntimeError(reason)
        # The symlinked script must resolve its imports from .peers/js-libp2p/node_modules.
        return [shutil.which("node") or "node", "--preserve-symlinks-main", str(JS_SCRIPT), *args]
    raise ValueError(f"peer kind {kind!r}: use 'py-libp2p' or 'js-libp2p'")


def _env() -> dict[str, str]:
    """Our environment without what would make the peer's Python import our packages."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


def _key_args(key_type: str, key_file: str | Path | None) -> list[str]:
    if key_type not in KEY_TYPES:
        raise ValueError(f"key_type={key_type!r}: use one of {', '.join(KEY_TYPES)}")
    return ["--key-type", key_type, *(["--key-file", str(key_file)] if key_file else [])]


async def _stop(process: asyncio.subprocess.Process, timeout: float = 3.0) -> None:
    """EOF on stdin (each peer exits on it), then SIGTERM, then SIGKILL; always reaped."""
    if process.stdin is not None and not process.stdin.is_closing():
        process.stdin.close()
    for send in (process.terminate, process.kill):
        if process.returncode is not None:
            return
        try:
            await asyncio.wait_for(process.wait(), timeout)
            return
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                send()
    await process.wait()


@dataclass
class Libp2pPeer:
    """A running peer in listen mode: its ready line, its event lines, its log."""

    kind: PeerKind
    process: asyncio.subprocess.Process
    ready: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    start_seconds: float = 0.0  # spawn to ready line
    _stderr: bytearray = field(default_factory=bytearray)
    _notifier: Notifier = field(default_factory=Notifier)
    _stdout_done: bool = False

    @property
    def peer_id(self) -> str:
        return str(self.ready["peer_id"])

    @property
    def addrs(self) -> list[str]:
        return [str(a) for a in self.ready["addrs"]]

    @property
    def multiaddr(self) -> str:
        """The /ip4/127.0.0.1/udp/P/quic-v1/p2p/<peer-id> address to dial."""
        for addr in self.addrs:
            if "/quic-v1/" in addr and addr.endswith(f"/p2p/{self.peer_id}"):
                return addr
        raise LookupError(f"{self.kind} announced no quic-v1 /p2p/ address: {self.addrs}")

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stderr(self) -> str:
        """The tail of the peer's log, for failure messages."""
        return self._stderr.decode(errors="replace")

    def describe(self) -> str:
        return (
            f"{self.kind} (pid {self.pid}, exit {self.process.returncode}); events: "
            f"{json.dumps(self.events)[-2000:]}; stderr tail:\n{self.stderr[-3000:]}"
        )

    def matching(self, predicate: Callable[[dict[str, Any]], object]) -> list[dict[str, Any]]:
        return [event for event in self.events if predicate(event)]

    async def wait_event(
        self, predicate: Callable[[dict[str, Any]], object], timeout: float = 10.0, what: str = ""
    ) -> dict[str, Any]:
        """The first event line (of all so far, in order) for which `predicate` holds.

        TimeoutError (naming the events and the log) after `timeout` s, or at once if the peer
        has exited without one.
        """
        found: list[dict[str, Any]] = []

        def check() -> bool:
            found[:] = self.matching(predicate)[:1]
            return bool(found) or self._stdout_done

        try:
            await self._notifier.wait_for(check, timeout, what)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; {self.describe()}") from None
        if not found:
            raise TimeoutError(
                f"{self.kind} exited before {what or predicate!r}; {self.describe()}"
            )
        return found[0]

    async def _read_stdout(self, ready: asyncio.Future[None]) -> None:
        assert self.process.stdout is not None
        try:
            async for raw in self.process.stdout:
                line = raw.decode(errors="replace").strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    obj = {"event": "unparsed", "line": line}
                if not self.ready and not ready.done() and "peer_id" in obj:
                    self.ready = obj
                    ready.set_result(None)
                else:
                    self.events.append(obj)
                self._notifier.changed()
        finally:
            self._stdout_done = True
            self._notifier.changed()
            if not ready.done():
                ready.set_exception(EOFError("stdout closed before the ready line"))

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        while chunk := await self.process.stderr.read(65536):
            self._stderr += chunk
            if len(self._stderr) > _STDERR_KEEP:
                del self._stderr[: len(self._stderr) - _STDERR_KEEP]


@contextlib.asynccontextmanager
async def _listening_peer(
    kind: PeerKind, key_type: str, key_file: str | Path | None, start_timeout: float
) -> AsyncIterator[Libp2pPeer]:
    argv = _argv(kind, ["listen", *_key_args(key_type, key_file)])
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(),
        cwd=REPO,
    )
    peer = Libp2pPeer(kind, process)
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    readers = [
        asyncio.create_task(peer._read_stdout(ready)),
        asyncio.create_task(peer._read_stderr()),
    ]
    try:
        try:
            await asyncio.wait_for(ready, start_timeout)
        except (TimeoutError, EOFError) as exc:
            await _stop(process)
            await asyncio.gather(*readers, return_exceptions=True)
            raise RuntimeError(
                f"{kind} did not print its ready line within {start_timeout}s ({exc!r}); "
                f"{peer.describe()}"
            ) from None
        peer.start_seconds = time.monotonic() - started
        yield peer
    finally:
        await _stop(process)
        # EOF on both pipes follows the exit; the readers finish on their own.
        _, pending = await asyncio.wait(readers, timeout=5)
        for task in pending:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


def py_libp2p_peer(
    key_type: str = "ed25519", *, key_file: str | Path | None = None, start_timeout: float = 20.0
) -> contextlib.AbstractAsyncContextManager[Libp2pPeer]:
    """A py-libp2p host listening on /ip4/127.0.0.1/udp/0/quic-v1 with ping and identify.

    `key_file` (libp2p protobuf private key) is loaded if it exists, else created with a
    `key_type` key. Exits (stdin EOF, SIGTERM, SIGKILL if need be) and is reaped on leaving.
    """
    return _listening_peer("py-libp2p", key_type, key_file, start_timeout)


def js_libp2p_peer(
    key_type: str = "ed25519", *, key_file: str | Path | None = None, start_timeout: float = 20.0
) -> contextlib.AbstractAsyncContextManager[Libp2pPeer]:
    """A js-libp2p host (@chainsafe/libp2p-quic) on 127.0.0.1 QUIC; as `py_libp2p_peer`."""
    return _listening_peer("js-libp2p", key_type, key_file, start_timeout)


@dataclass(frozen=True)
class DialResult:
    """What a peer in dial mode printed: {"rtts", "remote_peer_id", "identify"} or {"error"}."""

    kind: PeerKind
    returncode: int
    output: dict[str, Any]
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and "error" not in self.output

    @property
    def rtts(self) -> list[float]:
        return [float(r) for r in self.output.get("rtts", [])]

    @property
    def remote_peer_id(self) -> str | None:
        return self.output.get("remote_peer_id")

    @property
    def identify(self) -> dict[str, Any]:
        return dict(self.output.get("identify") or {})

    @property
    def error(self) -> str | None:
        return self.output.get("error")

    def describe(self) -> str:
        tail = self.stderr[-3000:]
        return f"{self.kind} dial exit {self.returncode}: {self.output}; stderr tail:\n{tail}"


async def run_dial(
    peer: PeerKind,
    multiaddr: str,
    count: int = 3,
    *,
    key_type: str = "ed25519",
    key_file: str | Path | None = None,
    timeout: float = 30.0,
) -> DialResult:
    """Run `peer` in dial mode: dial `multiaddr`, ping `count` times on one stream, identify.

    The peer gives up after `timeout` - 5 s itself (and prints {"error"}); it is killed at
    `timeout`. Never leaves the process running.
    """
    if count < 1:
        raise ValueError(f"count={count}: ping at least once")
    inner = max(1.0, timeout - 5.0)
    argv = _argv(
        peer,
        [
            "dial",
            multiaddr,
            "--count",
            str(count),
            "--timeout",
            str(inner),
            *_key_args(key_type, key_file),
        ],
    )
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(),
        cwd=REPO,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        await _stop(process)
        raise TimeoutError(f"{peer} dial of {multiaddr} still running after {timeout}s") from None
    finally:
        if process.returncode is None:
            await _stop(process)
    lines = [line for line in out.decode(errors="replace").splitlines() if line.strip()]
    try:
        output = json.loads(lines[-1]) if lines else {"error": "no output"}
    except json.JSONDecodeError:
        output = {"error": f"unparsed output: {lines[-1]!r}"}
    returncode = process.returncode if process.returncode is not None else -1
    return DialResult(
        peer, returncode, output, err.decode(errors="replace"), time.monotonic() - started
    )
