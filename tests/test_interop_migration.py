"""Local interop suite, client-migration half (issue 16, part 2): the QUIC interop runner's
migration cases on one host, against independent peers, with the stall at the switch measured.

The runner's cases need docker; these run over loopback addresses (127.0.0.1 -> 127.0.0.2; the
preferred address on 127.0.0.6) with a tshark capture decrypted with the key log (every client
and server appends to ``$SSLKEYLOGFILE``). Peers: ngtcp2's ``gtlsserver`` (Debian, HTTP/3), the
stock aioquic server (tests/rig/aioquic_server.py) and our own listener (``Supervisor.listen``).

- ``test_client_migration[peer]`` (ours; the runner has no client-initiated case): a transfer
  runs (checksummed echo stream, or an HTTP/3 download from ngtcp2) on A, a path is added on
  B, probed and switched to mid-transfer. The wire shows: the first datagram from B is a padded
  PATH_CHALLENGE; after the switch only probing frames leave A; no DCID is used from both
  addresses; the peer followed to B; every byte arrived intact.
- ``test_connectionmigration[ngtcp2]`` (the runner's name): gtlsserver advertises a preferred
  address; our client follows it (``preferred_address="follow"``) while downloading. The wire
  shows our PATH_CHALLENGE to the preferred address answered from there, the download going on
  from there, nothing non-probing sent to the old server address afterwards; the body intact.
  The stock aioquic server and our listener offer no preferred address: recorded as "not
  applicable", not tested.

Every check is recorded (pass/fail) before it is asserted, per peer x case, in
``bench/results/interop.json`` (tests/rig/interop_results.py), with two measurements, never
asserted: the stall (largest gap between consecutive received chunks from the last one before the
switch call to 1 s after it, or to the end of the transfer if that comes first) and the switch's
own confirmation time (``SwitchResult.confirmation_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from actors.streams import Stream
from bench._client import largest_gap
from supervisor import Supervisor
from supervisor.core.events import EvtConnectionMigrationCompleted, EvtConnectionMigrationFailed
from supervisor.core.handles import Connection
from supervisor.h3 import http3_get
from telemetry.tracing import ATTR_SWITCH_CONFIRMATION_MS, SPAN_PATH_SWITCH
from tests.rig.aioquic_server import Addr, echo_server
from tests.rig.capture import UdpCapture, capture_udp, tshark_available
from tests.rig.certs import CertPair
from tests.rig.interop_results import record
from tests.rig.migration_wire import MigrationSplit, split_migration, wait_captured
from tests.rig.ngtcp2 import Ngtcp2Server, free_udp_port, gtlsserver, gtlsserver_available
from tests.rig.ngtcp2_log import logged_packets
from tests.rig.quic_wire import WirePacket, wire_packets
from tests.support import TimedStream, addr_of, dial_echo, event_log, path_actor

pytest_plugins = ["tests.rig.fixtures"]

_TSHARK, _NO_TSHARK = tshark_available()
_NGTCP2, _NO_NGTCP2 = gtlsserver_available()
needs_ngtcp2 = pytest.mark.skipif(not _NGTCP2, reason=_NO_NGTCP2)

pytestmark = [pytest.mark.interop, pytest.mark.skipif(not _TSHARK, reason=_NO_TSHARK)]

NEW_PATH = "/ip4/127.0.0.2/udp/0/quic-v1"
PREFERRED_HOST = "127.0.0.6"
#: The stall window after the switch call (seconds).
WINDOW = 1.0
#: ngtcp2's download: the switch lands mid-body (the body takes 0.7-1.1 s through our HTTP/3
#: client here; the stall window then ends with it).
DOWNLOAD = 8 * 1024 * 1024
#: Body bytes received before the second path is added (the transfer is under way).
DOWNLOAD_HEAD = 512 * 1024
#: Waits of the test itself: generous guards on conditions, never the thing measured.
GUARD = 30.0

PEERS = [pytest.param("ngtcp2", marks=needs_ngtcp2), "aioquic", "ours"]


# ---- one migration mid-transfer ------------------------------------------------------------------


@dataclass
class Migrated:
    """What the application saw of one mid-transfer migration from A to B."""

    a: Addr
    b: Addr
    #: Client datagrams each path sent (the capture must hold at least these).
    sent: dict[Addr, int]
    #: Delivery times of received data (loop clock) and the switch call's time.
    arrivals: list[float]
    switch_called: float
    confirmation_s: float
    #: Transfer bytes received when the switch was called and when it returned, and in all.
    at_switch: int
    after_switch: int
    total: int
    intact: bool

    def stall_ms(self) -> float:
        end = min(self.switch_called + WINDOW, self.arrivals[-1])
        return largest_gap(self.arrivals, self.switch_called, end) * 1000

    def window_ms(self) -> float:
        return (min(self.switch_called + WINDOW, self.arrivals[-1]) - self.switch_called) * 1000


def _datagrams_sent(conn: Connection, paths: dict[Addr, int]) -> dict[Addr, int]:
    return {addr: path_actor(conn, pid).stats.datagrams_sent for addr, pid in paths.items()}


async def _migrate_echo(conn: Connection) -> Migrated:
    """Checksummed echo on A; add, probe and switch to B while it runs; keep it running for
    the whole window after the switch call; finish and compare both directions' checksums."""
    loop = asyncio.get_running_loop()
    mc = conn.as_migratable()
    [old] = mc.paths()
    stream = TimedStream(conn)
    await stream.start()
    await stream.advance(timeout=GUARD)  # the transfer is under way on A
    new = await mc.add_path(NEW_PATH)
    await new.probe(timeout=10)
    at_switch = stream.received
    switch_called = loop.time()
    result = await new.switch(probe_timeout=10)
    after_switch = stream.received
    async with asyncio.timeout(GUARD):  # data delivered past the end of the window
        while stream.arrivals[-1] < switch_called + WINDOW:
            await stream.advance(1, timeout=GUARD)
    try:
        total = await stream.finish(timeout=GUARD)
        intact = True
    except AssertionError:
        total, intact = stream.received, False
    a, b = addr_of(old.info().local_addr), addr_of(new.info().local_addr)
    return Migrated(
        a=a,
        b=b,
        sent=_datagrams_sent(conn, {a: old.path_id, b: new.path_id}),
        arrivals=stream.arrivals,
        switch_called=switch_called,
        confirmation_s=result.confirmation_s,
        at_switch=at_switch,
        after_switch=after_switch,
        total=total,
        intact=intact,
    )


@dataclass
class Download:
    """An HTTP/3 GET whose body chunks are hashed and timestamped as they arrive."""

    clock: Any  # () -> float
    expected: str  # sha256 hex of the body
    received: int = 0
    arrivals: list[float] = field(default_factory=list)
    #: Body bytes received by each arrival (cumulative).
    progress: list[int] = field(default_factory=list)
    _digest: Any = field(default_factory=hashlib.sha256)
    _head: asyncio.Event = field(default_factory=asyncio.Event)

    def sink(self, chunk: bytes) -> None:
        self.arrivals.append(self.clock())
        self._digest.update(chunk)
        self.received += len(chunk)
        self.progress.append(self.received)
        if self.received >= DOWNLOAD_HEAD:
            self._head.set()

    def start(self, conn: Connection, server: Ngtcp2Server) -> asyncio.Task[Any]:
        return asyncio.create_task(
            http3_get(conn, "/file", authority=f"localhost:{server.port}", sink=self.sink)
        )

    async def head(self, get: asyncio.Task[Any]) -> None:
        """Return once the first DOWNLOAD_HEAD bytes arrived (fail if the GET ended first)."""
        waiter = asyncio.create_task(self._head.wait())
        try:
            await asyncio.wait({waiter, get}, timeout=GUARD, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not self._head.is_set():
            get.result() if get.done() else get.cancel()
            raise AssertionError(f"download stalled before {DOWNLOAD_HEAD} bytes: {self.received}")

    def received_before(self, when: float) -> int:
        return max(
            (n for t, n in zip(self.arrivals, self.progress, strict=True) if t < when), default=0
        )

    def intact(self, status: int) -> bool:
        return (
            status == 200
            and self.received == DOWNLOAD
            and self._digest.hexdigest() == (self.expected)
        )


async def _migrate_download(conn: Connection, server: Ngtcp2Server) -> Migrated:
    """HTTP/3 download of DOWNLOAD bytes on A; once its head arrived, add, probe and switch to B
    while the body is still arriving."""
    loop = asyncio.get_running_loop()
    mc = conn.as_migratable()
    [old] = mc.paths()
    download = Download(loop.time, server.sha256["file"])
    get = download.start(conn, server)
    try:
        await download.head(get)
        new = await mc.add_path(NEW_PATH)
        await new.probe(timeout=10)
        at_switch = download.received
        switch_called = loop.time()
        result = await new.switch(probe_timeout=10)
        after_switch = download.received
        response = await asyncio.wait_for(get, GUARD)
    finally:
        get.cancel()
    a, b = addr_of(old.info().local_addr), addr_of(new.info().local_addr)
    return Migrated(
        a=a,
        b=b,
        sent=_datagrams_sent(conn, {a: old.path_id, b: new.path_id}),
        arrivals=download.arrivals,
        switch_called=switch_called,
        confirmation_s=result.confirmation_s,
        at_switch=at_switch,
        after_switch=after_switch,
        total=download.received,
        intact=download.intact(response.status),
    )


# ---- peers -----------------------------------------------------------------------------------


async def _echo_handler(stream: Stream) -> None:
    while data := await stream.read(65536):
        await stream.write(data)
    await stream.close()


@contextlib.asynccontextmanager
async def _echo_peer(peer: str, cert: CertPair) -> AsyncIterator[Addr]:
    """The stock aioquic echo server, or our listener with an echo handler, on 127.0.0.1."""
    if peer == "aioquic":
        async with echo_server(certfile=cert.certfile, keyfile=cert.keyfile) as server:
            yield server.addr
    else:
        async with Supervisor() as server_sup:
            listener = await server_sup.listen(
                "/ip4/127.0.0.1/udp/0/quic-v1",
                certfile=cert.certfile,
                keyfile=cert.keyfile,
                alpn_protocols=["echo"],
                handler=_echo_handler,
            )
            yield addr_of(listener.multiaddr)


# ---- recording -------------------------------------------------------------------------------


class Recorder:
    """Collects a case's checks and figures; writes them once, pass or fail (even when the
    test dies half-way: the exception becomes the note)."""

    def __init__(self, case: str, peer: str) -> None:
        self.case, self.peer = case, peer
        self.checks: dict[str, bool] = {}
        self.figures: dict[str, Any] = {"stall_ms": None, "confirmation_ms": None}

    def write(self, note: str = "") -> None:
        ok = bool(self.checks) and all(self.checks.values()) and not note
        failed = [name for name, passed in self.checks.items() if not passed]
        record(
            self.case,
            self.peer,
            outcome="pass" if ok else "fail",
            checks=self.checks,
            **self.figures,
            note=note or (f"failed: {', '.join(failed)}" if failed else ""),
        )

    def assert_all(self) -> None:
        failed = {name for name, passed in self.checks.items() if not passed}
        assert self.checks and not failed, f"{self.case}/{self.peer} failed {sorted(failed)}"


@contextlib.contextmanager
def recording(case: str, peer: str) -> Iterator[Recorder]:
    rec = Recorder(case, peer)
    try:
        yield rec
    except BaseException as exc:
        rec.write(note=f"{type(exc).__name__}: {str(exc)[:300]}")
        raise
    rec.write()


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


@pytest.fixture(scope="module", autouse=True)
def _not_applicable() -> None:
    """The runner's connectionmigration case needs a server that offers a preferred address:
    neither the stock aioquic server nor our listener does."""
    for peer in ("aioquic", "ours"):
        record(
            "connectionmigration",
            peer,
            outcome="not applicable",
            checks={},
            stall_ms=None,
            confirmation_ms=None,
            note="the server offers no preferred address",
        )


# ---- test_client_migration -------------------------------------------------------------------


@pytest.mark.parametrize("peer", PEERS)
async def test_client_migration(
    peer: str, rig_keylog: Path, rig_cert: CertPair, tmp_path: Path
) -> None:
    pcap = tmp_path / "migration.pcapng"
    with recording("client_migration", peer) as rec:
        async with contextlib.AsyncExitStack() as stack:
            sup = await stack.enter_async_context(
                Supervisor(enable_experimental_connection_migration=True)
            )
            ngtcp2: Ngtcp2Server | None = None
            if peer == "ngtcp2":
                ngtcp2 = await stack.enter_async_context(
                    gtlsserver(
                        certfile=rig_cert.certfile,
                        keyfile=rig_cert.keyfile,
                        cadata=rig_cert.cert_pem,
                        size_mb=DOWNLOAD / (1024 * 1024),
                        log_path=tmp_path / "gtlsserver.log",
                    )
                )
                server = ngtcp2.addr
            else:
                server = await stack.enter_async_context(_echo_peer(peer, rig_cert))
            cap = await stack.enter_async_context(capture_udp(server[1], pcap_path=pcap))
            if ngtcp2 is not None:
                conn = await sup.dial(
                    f"/ip4/127.0.0.1/udp/{server[1]}/quic-v1",
                    alpn_protocols=["h3"],
                    cafile=str(rig_cert.certfile),
                )
                m = await _migrate_download(conn, ngtcp2)
            else:
                conn = await dial_echo(sup, server)
                m = await _migrate_echo(conn)
            await wait_captured(cap, m.sent, GUARD)
            await conn.close()
        split = split_migration(wire_packets(pcap, rig_keylog, server[1]), m.a, m.b)
        checks = split.checks()
        answered_in = "wire" if checks["path_challenge_answered"] else "nowhere"
        if not checks["path_challenge_answered"] and ngtcp2 is not None:
            # tshark loses ngtcp2's packet numbers on lo (GSO batches): its own log tells.
            checks["path_challenge_answered"] = _ngtcp2_answered(ngtcp2, m.b, split)
            answered_in = "server log" if checks["path_challenge_answered"] else "nowhere"
        rec.checks = {
            **checks,
            "switched_mid_transfer": m.at_switch > 0 and m.after_switch < m.total,
            "data_intact": m.intact,
        }
        rec.figures = {
            "stall_ms": round(m.stall_ms(), 3),
            "confirmation_ms": _ms(m.confirmation_s),
            "window_ms": round(m.window_ms(), 3),
            "transfer_ms": _ms(m.arrivals[-1] - m.arrivals[0]),
            "bytes": m.total,
            "answer_seen_in": answered_in,
            **_wire_figures(split),
        }
        print(f"\n{peer}: {rec.figures} {rec.checks}")
    rec.assert_all()


def _ngtcp2_answered(server: Ngtcp2Server, b: Addr, split: MigrationSplit) -> bool:
    """gtlsserver's log shows a PATH_RESPONSE to B echoing one of our challenges from B."""
    responses = {
        data
        for p in logged_packets(server.log())
        if p.direction == "tx" and p.remote == b
        for data in p.data_of("PATH_RESPONSE")
    }
    return bool(set(split.challenges_from_b) & responses)


def _wire_figures(split: MigrationSplit) -> dict[str, Any]:
    return {
        "client_datagrams_old_path": len(split.from_a),
        "client_datagrams_new_path": len(split.from_b),
        "old_path_after_switch": [list(p.names) for p in split.a_after_switch],
    }


# ---- test_connectionmigration ----------------------------------------------------------------


_SENT_FROM_RE = re.compile(r"^Sent packet: local=\[([^\]]+)\]:(\d+) .*?(\d+) bytes$", re.M)


def _bytes_sent_from(log: str) -> dict[Addr, int]:
    """Bytes gtlsserver sent per local (server) address, from its "Sent packet" lines."""
    sent: dict[Addr, int] = {}
    for m in _SENT_FROM_RE.finditer(log):
        key = (m[1], int(m[2]))
        sent[key] = sent.get(key, 0) + int(m[3])
    return sent


def _switch_span(exporter: InMemorySpanExporter) -> tuple[float, float]:
    """(start, wall clock seconds; confirmation seconds) of the one switch the policy made."""
    (span,) = [s for s in exporter.get_finished_spans() if s.name == SPAN_PATH_SWITCH]
    assert span.start_time is not None
    confirmation_ms = float((span.attributes or {})[ATTR_SWITCH_CONFIRMATION_MS])  # type: ignore[arg-type]
    return span.start_time / 1e9, confirmation_ms / 1000


async def _wait_new_path_captured(cap: UdpCapture, conn: Connection) -> Addr:
    """The active path's local address, once the capture holds all it sent (the old path,
    closed by the policy, sent only before it)."""
    active = conn.as_migratable().active_path()
    b = addr_of(active.local_addr)
    [path] = [p for p in conn.as_migratable().paths() if p.info().active]
    await wait_captured(cap, _datagrams_sent(conn, {b: path.path_id}), GUARD)
    return b


@pytest.mark.parametrize("peer", [pytest.param("ngtcp2", marks=needs_ngtcp2)])
async def test_connectionmigration(
    peer: str, rig_keylog: Path, rig_cert: CertPair, tmp_path: Path
) -> None:
    pcap = tmp_path / "connectionmigration.pcapng"
    preferred = (PREFERRED_HOST, free_udp_port(PREFERRED_HOST))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with recording("connectionmigration", peer) as rec:
        async with (
            gtlsserver(
                certfile=rig_cert.certfile,
                keyfile=rig_cert.keyfile,
                cadata=rig_cert.cert_pem,
                size_mb=DOWNLOAD / (1024 * 1024),
                extra_args=[f"--preferred-ipv4-addr={preferred[0]}:{preferred[1]}"],
                log_path=tmp_path / "gtlsserver.log",
            ) as server,
            capture_udp(server.port, pcap_path=pcap, extra_ports=[preferred[1]]) as cap,
            Supervisor(
                enable_experimental_connection_migration=True,
                preferred_address="follow",
                tracer_provider=provider,
            ) as sup,
            event_log(sup, EvtConnectionMigrationCompleted, EvtConnectionMigrationFailed) as log,
        ):
            conn = await sup.dial(
                f"/ip4/127.0.0.1/udp/{server.port}/quic-v1",
                alpn_protocols=["h3"],
                cafile=str(rig_cert.certfile),
            )
            a = addr_of(conn.local_multiaddr)
            # The download starts at once: the policy follows the offer meanwhile.
            download = Download(time.time, server.sha256["file"])
            response = await asyncio.wait_for(download.start(conn, server), GUARD)
            await log.wait_for(lambda: log.events, GUARD)
            [done] = log.events
            followed = (
                isinstance(done, EvtConnectionMigrationCompleted)
                and done.reason == "preferred_address"
                and addr_of(conn.as_migratable().active_path().remote_addr) == preferred
            )
            b = await _wait_new_path_captured(cap, conn) if followed else a
            await conn.close()
        switch_called, confirmation_s = _switch_span(exporter) if followed else (0.0, 0.0)
        packets = wire_packets(pcap, rig_keylog, server.port, preferred[1])
        split = split_migration(packets, a, b)
        old_server = server.addr
        to_old_after = [
            p
            for p in packets
            if p.dst == old_server and split.switch_at is not None and p.number > split.switch_at
        ]
        from_preferred = _bytes_sent_from(server.log()).get(preferred, 0)
        rec.checks = {
            "followed_preferred_address": followed,
            **split.checks(),
            # tshark loses ngtcp2's packet numbers on lo (GSO batches): the answer is taken from
            # the server's log, its origin from the wire (all it sent to B came from there).
            "path_challenge_answered_from_preferred": _ngtcp2_answered(server, b, split)
            and _only_from(packets, b, preferred),
            "nothing_non_probing_to_old_server_after_switch": split.switch_at is not None
            and all(p.probing_only for p in to_old_after),
            # The body went on from the preferred address: the server sent to B from there
            # (wire), most of the body by its own log (GSO batches defeat tshark's lengths).
            "download_continued_from_preferred": any(
                p.src == preferred for p in split.peer_to_b_after_switch
            )
            and from_preferred >= (DOWNLOAD - download.received_before(switch_called)) // 2,
            "data_intact": download.intact(response.status),
        }
        arrivals = download.arrivals
        end = min(switch_called + WINDOW, arrivals[-1])
        rec.figures = {
            "stall_ms": round(largest_gap(arrivals, switch_called, end) * 1000, 3),
            "confirmation_ms": _ms(confirmation_s),
            "window_ms": round((end - switch_called) * 1000, 3),
            "transfer_ms": _ms(arrivals[-1] - arrivals[0]),
            "bytes": download.received,
            "body_bytes_before_switch": download.received_before(switch_called),
            "server_bytes_from_preferred": from_preferred,
            **_wire_figures(split),
        }
        print(f"\n{peer}: {rec.figures} {rec.checks}")
    rec.assert_all()


def _only_from(packets: list[WirePacket], to: Addr, server: Addr) -> bool:
    """Every datagram the wire shows sent to ``to`` came from ``server`` (and there was one)."""
    sources = {p.src for p in packets if p.dst == to}
    return sources == {server}
