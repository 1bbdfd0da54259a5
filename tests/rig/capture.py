"""tshark helpers: a live UDP capture (who sent to whom) and offline QUIC frame decoding.

`capture_udp` answers "did the server send to the client's new address?" from the wire, for any
peer (aioquic, ngtcp2). `quic_frames` decrypts a saved capture with a TLS key log (the rig's
servers and clients append to ``$SSLKEYLOGFILE``) and lists each QUIC packet's frame types, e.g. to
find which address a PATH_RESPONSE went to.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .aioquic_server import Addr
from .netns import NetNS, create_socket_in_netns
from .waiting import Notifier

__all__ = [
    "NEW_CONNECTION_ID",
    "PATH_CHALLENGE",
    "PATH_RESPONSE",
    "RETIRE_CONNECTION_ID",
    "Flow",
    "QuicPacketFrames",
    "UdpCapture",
    "capture_udp",
    "quic_frames",
    "tshark_available",
]

NEW_CONNECTION_ID = 0x18
RETIRE_CONNECTION_ID = 0x19
PATH_CHALLENGE = 0x1A
PATH_RESPONSE = 0x1B


def tshark_available() -> tuple[bool, str]:
    """(True, "") when tshark is installed and we may capture (root), else a skip reason."""
    if shutil.which("tshark") is None:
        return False, "tshark not installed"
    if os.geteuid() != 0:
        return False, "packet capture needs root"
    return True, ""


@dataclass(frozen=True)
class Flow:
    """One captured UDP datagram."""

    time: float
    src: Addr
    dst: Addr
    length: int


class UdpCapture:
    """Live list of captured datagrams; see `capture_udp`."""

    def __init__(self, port: int, iface: str, pcap_path: Path, canary_port: int | None) -> None:
        self.port = port
        self.iface = iface
        self.pcap_path = pcap_path
        self.flows: list[Flow] = []
        self.stderr = ""
        self.canary_port = canary_port
        self.canary_seen = False
        self._notifier = Notifier()

    def from_port(self, port: int | None = None) -> list[tuple[Addr, Addr]]:
        """(src, dst) of datagrams sent from `port` (default: the captured port, i.e. the
        server->client direction when the port is the server's)."""
        port = self.port if port is None else port
        return [(f.src, f.dst) for f in self.flows if f.src[1] == port]

    def server_to_client(self) -> list[tuple[Addr, Addr]]:
        return self.from_port(self.port)

    def destinations_from(self, port: int | None = None) -> set[Addr]:
        return {dst for _, dst in self.from_port(port)}

    async def wait_for(
        self, predicate: Callable[[], object], timeout: float = 5.0, what: str = ""
    ) -> None:
        """Re-checked after every captured datagram (tshark shows them ~0.1-0.8 s late)."""
        await self._notifier.wait_for(predicate, timeout, what)

    def _add(self, line: str) -> None:
        cols = line.rstrip("\n").split("\t")
        if len(cols) != 8:
            return
        ts, ip_src, ip6_src, sport, ip_dst, ip6_dst, dport, length = (c.split(",")[0] for c in cols)
        try:
            flow = Flow(
                float(ts),
                (ip_src or ip6_src, int(sport)),
                (ip_dst or ip6_dst, int(dport)),
                int(length or 0),
            )
        except ValueError:
            return
        if self.canary_port is not None and self.canary_port in (flow.src[1], flow.dst[1]):
            self.canary_seen = True
        else:
            self.flows.append(flow)
        self._notifier.changed()


def _canary_socket(ns_name: str | None, host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if ns_name is not None:
        return create_socket_in_netns(ns_name, family, host, 0)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind((host, 0))
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.asynccontextmanager
async def capture_udp(
    port: int,
    iface: str = "lo",
    *,
    netns: NetNS | str | None = None,
    pcap_path: Path | str | None = None,
    canary_to: str | None = None,
    extra_ports: Sequence[int] = (),
    start_timeout: float = 10.0,
) -> AsyncIterator[UdpCapture]:
    """Capture ``udp port PORT`` (and `extra_ports`) on `iface` (in `netns` if given) until the
    block exits.

    "Capturing on" on tshark's stderr comes some 30 ms before packets are really caught, so the
    block is entered only once a canary datagram has been seen in the live output: sent over
    loopback when `iface` is "lo" or "any", else to `canary_to` (an address routed via `iface`;
    without one, only "Capturing on" is waited for). Canaries are not listed in `cap.flows`.
    `cap.flows` fills live; use `await cap.wait_for(...)`, then exit, which stops tshark (SIGINT,
    then SIGKILL). The pcap is kept at `pcap_path` if given (to decrypt with a key log), else
    deleted. On lo, a GSO batch shows as one large datagram.
    """
    ns_name = netns.name if isinstance(netns, NetNS) else netns
    async with contextlib.AsyncExitStack() as stack:
        if pcap_path is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qs-cap-")))
            pcap = tmp / "capture.pcapng"
        else:
            pcap = Path(pcap_path)
        canary: socket.socket | None = None
        canary_dst: Addr | None = None
        if iface in ("lo", "any") or canary_to is not None:
            target = canary_to or "127.0.0.1"
            if ns_name is None and not ipaddress.ip_address(target).is_loopback:
                raise ValueError(f"canary_to={target!r}: outside a namespace only loopback")
            # Without canary_to it sends to itself, so the canary never leaves loopback.
            wildcard = "::" if ":" in target else "0.0.0.0"
            bind = "127.0.0.1" if canary_to is None else wildcard
            canary = stack.enter_context(_canary_socket(ns_name, bind))
            canary.setblocking(False)
            port_c = int(canary.getsockname()[1])
            canary_dst = (target, port_c)
        capture_filter = " or ".join(f"udp port {p}" for p in (port, *extra_ports))
        if canary_dst is not None:
            capture_filter += f" or udp port {canary_dst[1]}"
        fields = [
            "frame.time_epoch", "ip.src", "ipv6.src", "udp.srcport",
            "ip.dst", "ipv6.dst", "udp.dstport", "udp.length",
        ]
        argv = [
            "tshark", "-n", "-l", "-i", iface, "-f", capture_filter, "-w", str(pcap), "-P",
            "--disable-protocol", "quic", "-T", "fields",
            *[arg for f in fields for arg in ("-e", f)],
        ]
        if ns_name is not None:
            argv = ["ip", "netns", "exec", ns_name, *argv]
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        cap = UdpCapture(port, iface, pcap, canary_dst[1] if canary_dst else None)
        started = asyncio.Event()
        assert process.stdout is not None and process.stderr is not None

        async def read_stdout(stream: asyncio.StreamReader) -> None:
            async for raw in stream:
                cap._add(raw.decode(errors="replace"))

        async def read_stderr(stream: asyncio.StreamReader) -> None:
            async for raw in stream:
                cap.stderr += raw.decode(errors="replace")
                if "Capturing on" in cap.stderr:
                    started.set()

        readers = [
            asyncio.create_task(read_stdout(process.stdout)),
            asyncio.create_task(read_stderr(process.stderr)),
        ]
        try:
            await _wait_started(process, started, cap, start_timeout)
            if canary is not None and canary_dst is not None:
                await _wait_canary(cap, canary, canary_dst, start_timeout)
            yield cap
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGINT)
                try:
                    await asyncio.wait_for(process.wait(), 10.0)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    await process.wait()
            try:
                await asyncio.wait_for(asyncio.gather(*readers), 5.0)
            except TimeoutError:
                for task in readers:
                    task.cancel()
                await asyncio.gather(*readers, return_exceptions=True)


async def _wait_started(
    process: asyncio.subprocess.Process, started: asyncio.Event, cap: UdpCapture,
    timeout: float,
) -> None:
    waiter = asyncio.create_task(started.wait())
    exited = asyncio.create_task(process.wait())
    try:
        await asyncio.wait({waiter, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        exited.cancel()
    if not started.is_set():
        raise RuntimeError(f"tshark did not start capturing: {cap.stderr[-2000:]}")


async def _wait_canary(
    cap: UdpCapture, canary: socket.socket, dst: Addr, timeout: float
) -> None:
    """Send a canary every 20 ms until tshark's live output shows one."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cap.canary_seen:
        with contextlib.suppress(OSError):  # ICMP errors from a previous canary
            canary.sendto(b"qs-canary", dst)
        if loop.time() >= deadline:
            raise RuntimeError(f"tshark captured no canary within {timeout}s: {cap.stderr[-2000:]}")
        with contextlib.suppress(TimeoutError):
            await cap._notifier.wait_for(lambda: cap.canary_seen, 0.02)


@dataclass(frozen=True)
class QuicPacketFrames:
    """One decrypted QUIC packet: addresses, destination CID (hex) and its frame types."""

    src: Addr
    dst: Addr
    dcid: str
    frame_types: tuple[int, ...]


def quic_frames(
    pcap: Path | str, keylog: Path | str, port: int, *extra_ports: int
) -> list[QuicPacketFrames]:
    """Decode the QUIC packets to/from `port` (and `extra_ports`) in `pcap`, decrypted with
    `keylog`.

    tshark ties a 1-RTT packet to its connection's keys through connection IDs it saw earlier
    (handshake, NEW_CONNECTION_ID), so the capture must include the handshake: capture the
    server port too when looking at another address. A coalesced datagram yields one entry per
    QUIC packet; packets tshark could not decrypt show no frame types.
    """
    ports = (port, *extra_ports)
    decode_as = [a for p in ports for a in ("-d", f"udp.port=={p},quic")]
    port_filter = " || ".join(f"udp.port=={p}" for p in ports)
    fields = ["ip.src", "ipv6.src", "udp.srcport", "ip.dst", "ipv6.dst", "udp.dstport",
              "quic.dcid", "quic.frame_type"]
    out = subprocess.run(
        ["tshark", "-n", "-r", str(pcap), "-o", f"tls.keylog_file:{keylog}",
         *decode_as, "-Y", f"({port_filter}) && quic",
         "-T", "fields", "-E", "aggregator=,", *[a for f in fields for a in ("-e", f)]],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    packets = []
    for line in out.splitlines():
        cols = line.split("\t")
        if len(cols) != len(fields):
            continue
        ip_src, ip6_src, sport, ip_dst, ip6_dst, dport, dcid, types = cols
        packets.append(
            QuicPacketFrames(
                src=(ip_src or ip6_src, int(sport.split(",")[0])),
                dst=(ip_dst or ip6_dst, int(dport.split(",")[0])),
                dcid=dcid.split(",")[0],
                frame_types=tuple(int(t) for t in types.split(",") if t),
            )
        )
    return packets
