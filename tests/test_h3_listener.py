"""Our listener's HTTP/3 file mode (``listen(http3_root=...)``) against ngtcp2's gtlsclient
(Debian 0.12.1, HTTP/3 only) while the client's address changes mid-download.

Two ways the address changes, both on loopback:

* gtlsclient moves itself (``--change-local-addr``): 100 ms after the handshake it opens a new
  local port, switches to a fresh server-issued CID and validates the new path.
* A NAT in front of it rebinds (`LoopbackNat` below): once a quarter of the body went through,
  the next client datagram leaves from a new NAT port and the old mapping is forgotten. The
  client keeps its socket and its CID; only the server sees the move. This is the rebinding the
  interop runner's ``rebind-port`` case makes, triggered by the body's progress, not by a timer.

Either way the file must arrive intact and the listener must have recorded both client
addresses (``peer_addresses``).

Not gtlsclient's ``--nat-rebinding``: it moves its socket without sending anything and then
ignores what arrives on the old one ("ignore packet from unknown path"). A downloading client has
only ACK and ACK+PING packets in flight, which ngtcp2 does not make PTO-eliciting, so when the
move falls between two server bursts only its idle timer is left: it never speaks from the new
address and no server can find it. On loopback that stalls about half the downloads against our
listener, a stock aioquic server and ngtcp2's own gtlsserver alike. A real NAT rebinds on a
datagram the client sends, which is what `LoopbackNat` does.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from actors.errors import InvalidArgumentError
from supervisor import Supervisor
from supervisor.h3 import http3_get
from supervisor.server import Listener
from tests.rig.certs import CertPair
from tests.rig.ngtcp2 import make_htdocs

RecordProperty = Callable[[str, object], None]  # pytest's record_property fixture
Addr = tuple[str, int]

#: Large enough that the body is still streaming when gtlsclient moves 100 ms in (our Python
#: server serves loopback at tens of MB/s, so this takes several times that).
MOVING_SIZE = 32 << 20
MOVE_AFTER = "100ms"
#: The NAT case rebinds on progress, so it needs no margin over a timer.
NAT_SIZE = 8 << 20

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(
        shutil.which("gtlsclient") is None,
        reason="ngtcp2's gtlsclient is not installed (Debian package ngtcp2-client)",
    ),
]


class LoopbackNat:
    """A one-client NAT on loopback in front of ``server``: two mappings (upstream sockets)
    open from the start, the first in use; once ``rebind_after`` bytes went to the client, the
    next client datagram leaves from the second and the first is closed (forgotten)."""

    def __init__(self, server: Addr, rebind_after: int) -> None:
        self.server = server
        self.rebind_after = rebind_after
        self.client: Any = None
        self.mapping = 0
        #: Bytes relayed to the client that arrived on each mapping.
        self.to_client = [0, 0]
        #: The address the server sees for each mapping.
        self.mapped: list[Addr] = []
        self._upstreams: list[asyncio.DatagramTransport] = []
        self._listen: asyncio.DatagramTransport | None = None

    async def start(self) -> Addr:
        """Open the client-facing socket and both mappings; the client-facing address."""
        loop = asyncio.get_running_loop()
        for index in range(2):
            transport, _ = await loop.create_datagram_endpoint(
                functools.partial(_Upstream, self, index),
                local_addr=("127.0.0.1", 0),
                remote_addr=self.server,
                family=socket.AF_INET,
            )
            self._upstreams.append(transport)
            host, port = transport.get_extra_info("sockname")[:2]
            self.mapped.append((host, port))
        self._listen, _ = await loop.create_datagram_endpoint(
            lambda: _ClientSide(self), local_addr=("127.0.0.1", 0), family=socket.AF_INET
        )
        host, port = self._listen.get_extra_info("sockname")[:2]
        return host, port

    def from_client(self, data: bytes, addr: Any) -> None:
        self.client = addr
        if self.mapping == 0 and self.to_client[0] >= self.rebind_after:
            self.mapping = 1  # a new mapping for this datagram; the old one is gone
            self._upstreams[0].close()
        self._upstreams[self.mapping].sendto(data)

    def from_server(self, index: int, data: bytes) -> None:
        if index != self.mapping or self._listen is None or self.client is None:
            return  # a forgotten mapping: dropped
        self.to_client[index] += len(data)
        self._listen.sendto(data, self.client)

    def close(self) -> None:
        for transport in (*self._upstreams, self._listen):
            if transport is not None:
                transport.close()


class _ClientSide(asyncio.DatagramProtocol):
    def __init__(self, nat: LoopbackNat) -> None:
        self.nat = nat

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.nat.from_client(data, addr)


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, nat: LoopbackNat, index: int) -> None:
        self.nat, self.index = nat, index

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.nat.from_server(self.index, data)


async def _serve(sup: Supervisor, cert: CertPair, htdocs: Path) -> tuple[Listener, Addr]:
    listener = await sup.listen(
        "/ip4/127.0.0.1/udp/0/quic-v1",
        certfile=cert.certfile,
        keyfile=cert.keyfile,
        http3_root=htdocs,
    )
    return listener, ("127.0.0.1", int(str(listener.multiaddr).split("/")[4]))


async def _gtlsclient(target: Addr, downloads: Path, *options: str) -> tuple[int | None, str]:
    """gtlsclient fetching ``/body`` from ``target`` into ``downloads``; (exit code, stderr)."""
    host, port = target[0], str(target[1])
    client = await asyncio.create_subprocess_exec(
        "gtlsclient",
        "-q",
        "--exit-on-all-streams-close",
        *options,
        "--download",
        str(downloads),
        host,
        port,
        f"https://{host}:{port}/body",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(client.communicate(), 90)
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
    return client.returncode, stderr.decode(errors="replace")


def _check_download(downloads: Path, size: int, sha: str, stderr: str) -> None:
    got = downloads / "body"
    # gtlsclient exits 0 even after an idle timeout: the file is the verdict.
    assert got.exists(), stderr
    assert got.stat().st_size == size, (got.stat().st_size, stderr)
    assert hashlib.sha256(got.read_bytes()).hexdigest() == sha


def _htdocs(tmp_path: Path, size: int) -> tuple[Path, Path, str]:
    htdocs, downloads = tmp_path / "htdocs", tmp_path / "downloads"
    sha = make_htdocs(htdocs, size, name="body")
    downloads.mkdir()
    return htdocs, downloads, sha


async def test_gtlsclient_download_survives_client_address_change(
    cert: CertPair, tmp_path: Path, record_property: RecordProperty
) -> None:
    htdocs, downloads, sha = _htdocs(tmp_path, MOVING_SIZE)
    async with Supervisor() as sup:
        listener, target = await _serve(sup, cert, htdocs)
        t0 = time.monotonic()
        rc, stderr = await _gtlsclient(target, downloads, f"--change-local-addr={MOVE_AFTER}")
        elapsed = time.monotonic() - t0
        # Queued at the handshake: the handle is there even after the connection ended.
        conn = await asyncio.wait_for(listener.accept(), 10)

    _check_download(downloads, MOVING_SIZE, sha, stderr)
    peers = conn.peer_addresses
    # The client's first address and the one it moved to (same host, another port).
    assert len(peers) == 2, peers
    assert {host for host, *_ in peers} == {"127.0.0.1"}, peers
    assert rc == 0, stderr
    record_property("download_s", round(elapsed, 3))
    record_property("throughput_MBps", round(MOVING_SIZE / elapsed / 1e6, 2))


async def test_gtlsclient_download_survives_nat_rebinding(
    cert: CertPair, tmp_path: Path, record_property: RecordProperty
) -> None:
    htdocs, downloads, sha = _htdocs(tmp_path, NAT_SIZE)
    async with Supervisor() as sup:
        listener, server = await _serve(sup, cert, htdocs)
        nat = LoopbackNat(server, rebind_after=NAT_SIZE // 4)
        try:
            front = await nat.start()
            rc, stderr = await _gtlsclient(front, downloads)
        finally:
            nat.close()
        conn = await asyncio.wait_for(listener.accept(), 10)

    _check_download(downloads, NAT_SIZE, sha, stderr)
    assert nat.mapping == 1, "the NAT never rebound"
    # Most of the body came through the new mapping: the server followed the client there.
    assert nat.to_client[1] > NAT_SIZE // 2, nat.to_client
    # Recorded although, after its request, the client sent only ACKs and flow credit.
    assert conn.peer_addresses == set(nat.mapped), conn.peer_addresses
    assert rc == 0, stderr
    record_property("bytes_to_client_per_mapping", list(nat.to_client))


# ------------------------------------------------------------------ the file mode's answers


async def test_file_mode_answers_files_404s_and_uploads(cert: CertPair, tmp_path: Path) -> None:
    """Our own HTTP/3 client: a file, a missing one, one outside the root; gtlsclient's
    upload (a GET with a body) is read, hashed and counted, then answered."""
    htdocs, downloads, sha = _htdocs(tmp_path, 200_000)
    (tmp_path / "secret").write_bytes(b"outside the root")
    (htdocs / "link").symlink_to(tmp_path / "secret")
    async with Supervisor() as sup:
        listener, (host, port) = await _serve(sup, cert, htdocs)
        conn = await sup.dial(
            f"/ip4/{host}/udp/{port}/quic-v1", alpn_protocols=["h3"], cafile=str(cert.certfile)
        )
        ok = await http3_get(conn, "/body", authority=f"{host}:{port}")
        assert ok.status == 200 and hashlib.sha256(ok.body).hexdigest() == sha
        for missing in ("/nothing", "/../secret", "/link"):
            assert (await http3_get(conn, missing, authority=f"{host}:{port}")).status == 404
        await conn.close()
        if shutil.which("gtlsclient") is not None:
            upload = tmp_path / "upload"
            upload.write_bytes(b"x" * 300_000)
            code, err = await _gtlsclient((host, port), downloads, "--data", str(upload))
            assert code == 0, err
            _check_download(downloads, 200_000, sha, err)
            servers = [c._proto.http3 for c in listener.connections.values()]
            uploads = [d for h in servers if h is not None for d in h.upload_digests]
            # The connection may be gone already; when listed, the digest is the body's.
            assert uploads in ([], [hashlib.sha256(upload.read_bytes()).hexdigest()])


async def test_file_mode_arguments_are_checked(cert: CertPair, tmp_path: Path) -> None:
    async with Supervisor() as sup:
        with pytest.raises(InvalidArgumentError, match="not a directory"):
            await sup.listen(
                "/ip4/127.0.0.1/udp/0/quic-v1", certfile=cert.certfile, http3_root=tmp_path / "no"
            )

        async def handler(stream: Any) -> None:
            await stream.close()

        with pytest.raises(InvalidArgumentError, match="not both"):
            await sup.listen(
                "/ip4/127.0.0.1/udp/0/quic-v1",
                certfile=cert.certfile,
                http3_root=tmp_path,
                handler=handler,
            )
        with pytest.raises(InvalidArgumentError, match="libp2p"):
            await sup.listen("/ip4/127.0.0.1/udp/0/quic-v1", libp2p=True, http3_root=tmp_path)


async def test_orderly_shutdown_lets_a_download_in_progress_finish(
    cert: CertPair, tmp_path: Path
) -> None:
    """``shutdown()`` counts HTTP/3 requests being answered as open, so a download that is
    half-way when the stop begins still ends intact, and then its connection is closed."""
    htdocs, _downloads, sha = _htdocs(tmp_path, 8_000_000)
    async with Supervisor() as server, Supervisor() as client:
        _listener, (host, port) = await _serve(server, cert, htdocs)
        conn = await client.dial(
            f"/ip4/{host}/udp/{port}/quic-v1", alpn_protocols=["h3"], cafile=str(cert.certfile)
        )
        digest = hashlib.sha256()
        half_way = asyncio.Event()

        def sink(chunk: bytes) -> None:
            digest.update(chunk)
            if len(chunk) and not half_way.is_set():
                half_way.set()

        download = asyncio.create_task(
            http3_get(conn, "/body", authority=f"{host}:{port}", sink=sink)
        )
        await asyncio.wait_for(half_way.wait(), 10)
        report = await server.shutdown(deadline=30)
        response = await download
        assert response.status == 200 and digest.hexdigest() == sha
        assert (report.connections, report.streams_cut, report.deadline_hit) == (1, 0, False)
