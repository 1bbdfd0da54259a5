"""An independent QUIC peer (Debian's ngtcp2 ``gtlsserver``) and a tshark UDP capture.

Findings for the Debian bookworm packages (ngtcp2 0.12.1, GnuTLS crypto; ``gtlsserver --help``):

* ``gtlsserver [OPTIONS] ADDR PORT KEY_FILE CERT_FILE``: the key comes *before* the certificate.
  A numeric ADDR binds that address only; a name binds what it resolves to (here "localhost" is
  127.0.0.1 only, plus a getaddrinfo error for IPv6); ``*`` is the wildcard (never used here). For
  IPv6 start a second server on ``::1``. ``-d DIR`` is the document root (default: cwd).
* ALPN: HTTP/3 only ("h3"; the client must offer it). An EC P-256 certificate works as is.
* Migration: the server sends ``disable_active_migration=0`` and validates a migrating client by
  itself (PATH_CHALLENGE to the new address); there is no flag to forbid migration.
  ``--preferred-ipv4-addr=A:P`` / ``--preferred-ipv6-addr=[A]:P`` advertise a preferred address,
  ``-V`` turns on Retry (address validation), ``--timeout`` is the idle timeout (30 s).
* Logging goes to stderr. ``-q`` silences *all* of it, including the lines the rig parses, so the
  rig runs without ``-q``. ``--no-quic-dump`` drops hexdumps of CRYPTO/STREAM data and
  ``--no-http-dump`` of HTTP bodies; what remains is per-packet (~0.45 byte of log per byte
  served), written to a file, never to a pipe nobody drains.
* Where the server sent: one line per sendmsg (GSO may pack several datagrams into one)
  ``Sent packet: local=[127.0.0.1]:4433 remote=[127.0.0.1]:58416 ecn=0x2 1200 bytes``; per
  received datagram ``Received packet: local=[..]:P remote=[..]:Q if=lo ecn=0x2 N bytes``; after
  a migration ``Path validation against path {local:[..]:P, remote:[..]:Q} succeeded`` and frame
  lines such as ``frm tx 7 1RTT PATH_RESPONSE(0x1b) data=0x...``. `Ngtcp2Server.sent_to()` parses
  the first kind: "the server sent to the client's new address" is ``new_addr in sent_to()``.
  An independent check is `capture_udp` (tshark on the wire, re-exported here from `capture`).

``gtlsclient --change-local-addr=DURATION`` (for a later benchmark): DURATION after the handshake
the client opens a new UDP socket on the same local IP with a new ephemeral port, validates the
new path (PATH_CHALLENGE, logging "Changing local address" / "Local address is now [..]:P") and
moves the connection there; ``--nat-rebinding`` switches without validation. Give it a request
that is still running at that time (e.g. ``--delay-stream`` or a large file) and
``--exit-on-all-streams-close``; ``--download DIR`` (DIR must exist) saves the body. Always pass
``--no-quic-dump --no-http-dump`` (or ``-q``): the default hexdump of every byte makes a 4 MiB
download take ~12 s instead of ~0.4 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import re
import shutil
import signal
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events

from .aioquic_server import Addr, make_payload
from .capture import Flow, UdpCapture, capture_udp, tshark_available
from .client import client_configuration, stock_client
from .netns import NetNS, create_socket_in_netns
from .waiting import poll_until

__all__ = [
    "Flow",
    "Ngtcp2Server",
    "UdpCapture",
    "capture_udp",
    "free_udp_port",
    "gtlsserver",
    "gtlsserver_available",
    "make_htdocs",
    "tshark_available",
]

_PACKET_RE = re.compile(
    r"^(?P<kind>Sent|Received) packet: local=\[(?P<lh>[^\]]+)\]:(?P<lp>\d+) "
    r"remote=\[(?P<rh>[^\]]+)\]:(?P<rp>\d+)"
)
_VALIDATED_RE = re.compile(
    r"Path validation against path \{local:\[(?P<lh>[^\]]+)\]:(?P<lp>\d+), "
    r"remote:\[(?P<rh>[^\]]+)\]:(?P<rp>\d+)\} succeeded"
)


def gtlsserver_available() -> tuple[bool, str]:
    """(True, "") when Debian's ngtcp2-server is installed, else a skip reason."""
    if shutil.which("gtlsserver") is None:
        return False, "gtlsserver not installed (Debian package ngtcp2-server)"
    return True, ""


def free_udp_port(host: str = "127.0.0.1", netns: str | None = None) -> int:
    """A UDP port free right now on `host` (in `netns` if given); callers retry if it is taken
    before they bind it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if netns is not None:
        sock = create_socket_in_netns(netns, family, host, 0)
    else:
        sock = socket.socket(family, socket.SOCK_DGRAM)
    with sock:
        if netns is None:
            sock.bind((host, 0))
        return int(sock.getsockname()[1])


def make_htdocs(directory: Path | str, size: int, name: str = "file", seed: int = 0) -> str:
    """Write a `size`-byte deterministic file `name` into `directory`; return its sha256 hex."""
    data = make_payload(size, seed)
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / name).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


@dataclass
class Ngtcp2Server:
    """A running gtlsserver: where it listens, what it serves, and its log."""

    host: str
    port: int
    htdocs: Path
    log_path: Path
    process: asyncio.subprocess.Process
    #: name -> sha256 hex of the generated files.
    sha256: dict[str, str] = field(default_factory=dict)
    netns: str | None = None

    @property
    def addr(self) -> Addr:
        return (self.host, self.port)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _packets(self, kind: str) -> list[tuple[Addr, Addr]]:
        out = []
        for line in self.log().splitlines():
            m = _PACKET_RE.match(line)
            if m and m["kind"] == kind:
                out.append(((m["lh"], int(m["lp"])), (m["rh"], int(m["rp"]))))
        return out

    def sent(self) -> list[tuple[Addr, Addr]]:
        """(local, remote) per sendmsg the server logged, in order."""
        return self._packets("Sent")

    def received(self) -> list[tuple[Addr, Addr]]:
        """(local, remote) per datagram the server logged receiving, in order."""
        return self._packets("Received")

    def sent_to(self) -> set[Addr]:
        """Every address the server sent datagrams to."""
        return {remote for _, remote in self.sent()}

    def validated_paths(self) -> list[tuple[Addr, Addr]]:
        """(local, remote) of each path the server validated (i.e. each client migration)."""
        return [
            ((m["lh"], int(m["lp"])), (m["rh"], int(m["rp"])))
            for m in _VALIDATED_RE.finditer(self.log())
        ]

    async def wait_for(
        self, predicate: Callable[[Ngtcp2Server], object], timeout: float = 10.0, what: str = ""
    ) -> None:
        """Poll `predicate(self)` (typically over the log) until it holds."""
        await poll_until(lambda: predicate(self), timeout, interval=0.05, what=what)


async def _stop(process: asyncio.subprocess.Process, timeout: float = 3.0) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


class _HandshakeOnly(QuicConnectionProtocol):
    """Readiness probe client: ignores the server's streams (H3 control streams) entirely."""

    def quic_event_received(self, event: events.QuicEvent) -> None:
        pass


async def _probe_handshake(
    server: Ngtcp2Server, cadata: bytes | None, sock_factory: Callable[[], socket.socket] | None,
    timeout: float,
) -> None:
    """Retry a full QUIC handshake (ALPN h3) until one succeeds or `timeout` passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: BaseException | None = None
    while loop.time() < deadline:
        if server.process.returncode is not None:
            raise RuntimeError(
                f"gtlsserver exited with {server.process.returncode}: {server.log()[-2000:]}"
            )
        config = client_configuration(alpn=["h3"], cadata=cadata, server_name="localhost")
        if cadata is None:
            config.verify_mode = ssl.CERT_NONE  # readiness only
        attempt_timeout = min(1.0, max(0.1, deadline - loop.time()))
        try:
            sock = sock_factory() if sock_factory else None
            async with stock_client(
                server.host, server.port, configuration=config, sock=sock,
                create_protocol=_HandshakeOnly, handshake_timeout=attempt_timeout,
            ):
                return
        except (TimeoutError, ConnectionError, OSError) as exc:
            last = exc
    raise TimeoutError(f"gtlsserver not ready on {server.addr} after {timeout}s: {last!r}")


@contextlib.asynccontextmanager
async def gtlsserver(
    *,
    certfile: str | Path,
    keyfile: str | Path,
    host: str = "127.0.0.1",
    port: int = 0,
    htdocs: Path | str | None = None,
    size_mb: float = 4,
    netns: NetNS | str | None = None,
    extra_args: Sequence[str] = (),
    cadata: bytes | None = None,
    log_path: Path | str | None = None,
    ready_timeout: float = 10.0,
) -> AsyncIterator[Ngtcp2Server]:
    """Run gtlsserver serving `htdocs` (default: a temp dir with `/file` of `size_mb` MiB).

    `port=0` picks a free port (retried if another process takes it first). With `netns` the
    server runs in that namespace (`host` must be one of its addresses). Ready means a QUIC
    handshake with ALPN h3 succeeded (verified against `cadata` when given). On exit: SIGTERM,
    wait, SIGKILL. The log stays at `log_path` (default: inside the temp dir, removed on exit).
    """
    ns_name = netns.name if isinstance(netns, NetNS) else netns
    if ns_name is None and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"host={host!r}: outside a test namespace gtlsserver binds loopback only")
    async with contextlib.AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qs-ngtcp2-")))
        sha: dict[str, str] = {}
        if htdocs is None:
            htdocs = tmp / "htdocs"
            sha["file"] = make_htdocs(htdocs, int(size_mb * 1024 * 1024))
        log = Path(log_path) if log_path is not None else tmp / "gtlsserver.log"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def probe_socket() -> socket.socket:
            assert ns_name is not None
            return create_socket_in_netns(ns_name, family, None)

        for attempt in range(3):
            chosen = port or free_udp_port(host, ns_name)
            argv = [
                "gtlsserver", "--no-quic-dump", "--no-http-dump", "-d", str(htdocs),
                *extra_args, host, str(chosen), str(keyfile), str(certfile),
            ]
            if ns_name is not None:
                argv = ["ip", "netns", "exec", ns_name, *argv]
            with open(log, "wb") as log_file:
                process = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file
                )
            server = Ngtcp2Server(host, chosen, Path(htdocs), log, process, sha, ns_name)
            try:
                await _probe_handshake(
                    server, cadata, probe_socket if ns_name else None, ready_timeout
                )
            except RuntimeError:  # exited: e.g. the port was taken meanwhile
                await _stop(process)
                if port or attempt == 2:
                    raise
                continue
            except BaseException:
                await _stop(process)
                raise
            break
        try:
            yield server
        finally:
            await _stop(server.process)
