"""The test rig works: certificates, aioquic servers, the UDP shim, namespaces, ngtcp2, tshark.

Later tests trust the rig to report what happened on the wire; these tests check each helper
against something independent (a plain UDP socket, a stock aioquic client, ngtcp2's own client).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from aioquic.asyncio.client import connect
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.logger import QuicLogger
from cryptography import x509

from tests.rig.aioquic_server import echo_server, normalize_addr
from tests.rig.capture import PATH_CHALLENGE, capture_udp, quic_frames, tshark_available
from tests.rig.certs import CertPair
from tests.rig.client import H3ClientProtocol, client_configuration, echo, stock_client
from tests.rig.netns import (
    NETNS_DIR,
    OWNER_DIR,
    NetNS,
    TwoPathTopology,
    cleanup_stale,
    random_drop,
)
from tests.rig.ngtcp2 import Ngtcp2Server, gtlsserver, gtlsserver_available
from tests.rig.udp_shim import udp_shim
from tests.rig.waiting import poll_until_sync

# The rig's fixtures (rig_cert, rig_topology, ...), whether or not conftest imports them too.
pytest_plugins = ["tests.rig.fixtures"]

needs_tshark = pytest.mark.skipif(not tshark_available()[0], reason=tshark_available()[1])
needs_gtlsclient = pytest.mark.skipif(
    shutil.which("gtlsclient") is None, reason="gtlsclient not installed (ngtcp2-client)"
)


# ---- certificates and aioquic servers ----------------------------------------------------------


def test_cert_loads_into_aioquic_and_names_localhost(rig_cert: CertPair) -> None:
    config = QuicConfiguration(is_client=False)
    config.load_cert_chain(str(rig_cert.certfile), str(rig_cert.keyfile))
    cert = x509.load_pem_x509_certificate(rig_cert.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert {"127.0.0.1", "::1", TwoPathTopology.SERVER_V4, TwoPathTopology.SERVER_V6} <= ips


async def test_echo_server_echoes_and_tracks_client_address(
    rig_echo_server, rig_cert: CertPair
) -> None:
    server = rig_echo_server
    config = client_configuration(cadata=rig_cert.cert_pem)
    async with connect(server.host, server.port, configuration=config) as client:
        payload = os.urandom(200_000)
        assert await echo(client, payload) == payload
        local_port = client._transport.get_extra_info("sockname")[1]
        conn = await server.wait_connection()
        assert conn.current_peer() == ("127.0.0.1", local_port)
        assert conn.peer_addresses == {("127.0.0.1", local_port)}


async def test_server_sends_disable_active_migration_and_preferred_address(
    rig_cert: CertPair,
) -> None:
    async with echo_server(
        certfile=rig_cert.certfile, keyfile=rig_cert.keyfile,
        disable_active_migration=True, preferred_address=("127.0.0.2", 0),
    ) as server:
        logger = QuicLogger()
        config = client_configuration(cadata=rig_cert.cert_pem, quic_logger=logger)
        async with stock_client(*server.addr, configuration=config) as client:
            assert await echo(client, b"ping") == b"ping"
            # A stock aioquic 1.7 client validates the preferred address on its own.
            await server.wait_for(lambda: server.preferred_address_datagrams, 5, "probe")
        remote = [
            e["data"] for e in logger.to_dict()["traces"][0]["events"]
            if e["name"] == "transport:parameters_set" and e["data"]["owner"] == "remote"
        ]
        assert remote and remote[0]["disable_active_migration"] is True


async def test_h3_file_server_serves_file(rig_h3_server, rig_cert: CertPair) -> None:
    config = client_configuration(alpn=["h3"], cadata=rig_cert.cert_pem)
    async with stock_client(
        *rig_h3_server.addr, configuration=config, create_protocol=H3ClientProtocol
    ) as client:
        assert isinstance(client, H3ClientProtocol)
        response = await client.get("/file")
        assert response.status == 200
        assert response.sha256 == rig_h3_server.sha256["/file"]
        assert (await client.get("/missing")).status == 404


# ---- UDP shim ----------------------------------------------------------------------------------


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.sources: list[tuple[str, int]] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sources.append(normalize_addr(addr))
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


class _Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)


async def _udp_endpoint(
    factory: type[asyncio.DatagramProtocol], **kwargs: object
) -> tuple[asyncio.DatagramTransport, asyncio.DatagramProtocol]:
    return await asyncio.get_running_loop().create_datagram_endpoint(factory, **kwargs)


async def test_shim_forwards_per_client_and_drops_as_told() -> None:
    upstream_t, upstream = await _udp_endpoint(_UdpEcho, local_addr=("127.0.0.1", 0))
    assert isinstance(upstream, _UdpEcho)
    a_t, a = await _udp_endpoint(_Collector, local_addr=("127.0.0.1", 0))
    b_t, b = await _udp_endpoint(_Collector, local_addr=("127.0.0.1", 0))
    assert isinstance(a, _Collector) and isinstance(b, _Collector)
    a_addr = normalize_addr(a_t.get_extra_info("sockname"))
    b_addr = normalize_addr(b_t.get_extra_info("sockname"))
    try:
        async with udp_shim(normalize_addr(upstream_t.get_extra_info("sockname"))) as shim:
            for i in range(3):
                a_t.sendto(b"a%d" % i, shim.listen_addr)
                b_t.sendto(b"b%d" % i, shim.listen_addr)
            await shim.wait_for(lambda: len(a.received) == 3 and len(b.received) == 3)
            # One upstream socket per client address: the server sees two distinct sources.
            assert set(upstream.sources) == {shim.upstream_addr(a_addr), shim.upstream_addr(b_addr)}
            assert shim.clients == [a_addr, b_addr]

            # Let one reply to A through (the "PATH_RESPONSE"), drop the rest; B unaffected.
            rule = shim.drop_server_to_client(a_addr, after_n=1)
            for i in range(3):
                a_t.sendto(b"A%d" % i, shim.listen_addr)
                b_t.sendto(b"B%d" % i, shim.listen_addr)
            await shim.wait_for(lambda: shim.stats[a_addr].dropped_s2c == 2)
            await shim.wait_for(lambda: len(b.received) == 6)
            assert a.received == [b"a0", b"a1", b"a2", b"A0"]
            assert shim.stats[a_addr].forwarded_c2s == 6
            assert shim.stats[a_addr].forwarded_s2c == 4
            assert rule.dropped == 2

            shim.remove_rule(rule)
            shim.drop_client_to_server(b_addr)
            a_t.sendto(b"again", shim.listen_addr)
            b_t.sendto(b"lost", shim.listen_addr)
            await shim.wait_for(lambda: a.received[-1:] == [b"again"])
            await shim.wait_for(lambda: shim.stats[b_addr].dropped_c2s == 1)
            assert b"lost" not in b.received and len(upstream.sources) == 13
    finally:
        for t in (upstream_t, a_t, b_t):
            t.close()


async def test_quic_through_shim_is_seen_from_shim_address(rig_echo_server, rig_cert) -> None:
    async with udp_shim(rig_echo_server.addr) as shim:
        config = client_configuration(cadata=rig_cert.cert_pem)
        async with stock_client(*shim.listen_addr, configuration=config) as client:
            assert await echo(client, b"via shim") == b"via shim"
            conn = await rig_echo_server.wait_connection()
            assert conn.current_peer() == shim.upstream_addr(shim.clients[0])


# ---- network namespaces ------------------------------------------------------------------------


def _roundtrip(client: socket.socket, server: socket.socket, dst: tuple[str, int]) -> tuple:
    """Client -> server -> client; returns the source address the server saw."""
    client.settimeout(2.0)
    server.settimeout(2.0)
    client.sendto(b"hello", dst)
    data, source = server.recvfrom(100)
    server.sendto(b"reply:" + data, source)
    assert client.recvfrom(100)[0] == b"reply:hello"
    return normalize_addr(source)


@pytest.mark.netns
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
def test_topology_both_paths_reach_server(rig_topology: TwoPathTopology, family) -> None:
    topo = rig_topology
    server = topo.server_socket(family)
    dst = (topo.server_addr(family), server.getsockname()[1])
    for path in topo.paths:
        client = topo.client_socket(path.index, family)
        source = _roundtrip(client, server, dst)
        expected = path.client_v6 if family == socket.AF_INET6 else path.client_v4
        assert source == (expected, client.getsockname()[1])


@pytest.mark.netns
def test_link_down_fails_one_path_only(rig_topology: TwoPathTopology) -> None:
    topo = rig_topology
    server = topo.server_socket()
    dst = (topo.SERVER_V4, server.getsockname()[1])
    path0, path1 = topo.client_socket(0), topo.client_socket(1)

    topo.link_down(0)  # client side: the interface is gone, sends fail at once
    with pytest.raises(OSError) as failure:
        path0.sendto(b"x", dst)
    assert failure.value.errno == errno.ENETUNREACH
    _roundtrip(path1, server, dst)

    topo.link_up(0)
    _roundtrip(path0, server, dst)

    topo.link_down(0, side="server")  # carrier lost: the client cannot tell, datagrams vanish
    path0.sendto(b"into the void", dst)
    server.settimeout(0.3)
    with pytest.raises(TimeoutError):
        server.recvfrom(100)
    _roundtrip(path1, server, dst)
    topo.link_up(0, side="server")
    _roundtrip(path0, server, dst)


@pytest.mark.netns
def test_blackhole_and_random_drop(rig_topology: TwoPathTopology) -> None:
    topo = rig_topology
    server = topo.server_socket()
    dst = (topo.SERVER_V4, server.getsockname()[1])
    path0, path1 = topo.client_socket(0), topo.client_socket(1)

    with topo.blackhole(1) as hole:
        path1.sendto(b"dropped", dst)  # no error: a blackhole is silent
        poll_until_sync(lambda: hole.dropped() >= 1, 5, what="blackhole counter")
        _roundtrip(path0, server, dst)
    _roundtrip(path1, server, dst)  # lifted

    with random_drop(topo.server.name, "s0", 1.0):
        for _ in range(20):
            path0.sendto(b"lost", dst)
        _roundtrip(path1, server, dst)
        server.settimeout(0.3)
        with pytest.raises(TimeoutError):
            server.recvfrom(100)
    with random_drop(topo.server.name, "s0", 0.5):
        sent = 400
        for _ in range(sent):
            path0.sendto(b"maybe", dst)
        server.settimeout(0.3)
        got = 0
        with pytest.raises(TimeoutError):
            while True:
                server.recvfrom(100)
                got += 1
        assert 0.3 * sent < got < 0.7 * sent


@pytest.mark.netns
async def test_aioquic_echo_across_namespaces(
    rig_topology: TwoPathTopology, rig_cert: CertPair
) -> None:
    """One event loop, server socket in the server namespace, client socket in the client one."""
    topo = rig_topology
    async with echo_server(
        sock=topo.server_socket(), certfile=rig_cert.certfile, keyfile=rig_cert.keyfile
    ) as server:
        for path in (0, 1):
            sock = topo.client_socket(path)
            local = normalize_addr(sock.getsockname())
            config = client_configuration(cadata=rig_cert.cert_pem)
            async with stock_client(*server.addr, configuration=config, sock=sock) as client:
                assert await echo(client, b"over path %d" % path) == b"over path %d" % path
                conn = await server.wait_connection(path)
                assert conn.current_peer() == local


@pytest.mark.netns
def test_namespaces_removed_on_exit_even_on_failure(rig_netns: None) -> None:
    names: list[str] = []
    with pytest.raises(RuntimeError, match="boom"), TwoPathTopology() as topo:
        names = topo.names()
        assert all((NETNS_DIR / n).exists() for n in names)
        topo.client.popen(["sleep", "60"])  # a process in the namespace is killed too
        topo.blackhole(0)
        raise RuntimeError("boom")
    assert names
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in names:
        assert name not in listed
        assert not (OWNER_DIR / name).exists()


@pytest.mark.netns
def test_cleanup_stale_removes_only_dead_owners(rig_netns: None) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    with NetNS("live") as live:
        stale = NetNS("stale")
        stale.__enter__()
        try:
            (OWNER_DIR / stale.name).write_text(str(dead.pid))  # as if its run had crashed
            removed = cleanup_stale()
            assert stale.name in removed and not stale.exists()
            assert live.name not in removed and live.exists()
        finally:
            stale.close()


# ---- ngtcp2 and tshark -------------------------------------------------------------------------


@pytest.mark.interop
async def test_gtlsserver_serves_file_to_aioquic_h3(
    rig_gtlsserver: Ngtcp2Server, rig_cert: CertPair
) -> None:
    server = rig_gtlsserver
    config = client_configuration(alpn=["h3"], cadata=rig_cert.cert_pem)
    async with stock_client(
        *server.addr, configuration=config, create_protocol=H3ClientProtocol
    ) as client:
        assert isinstance(client, H3ClientProtocol)
        response = await client.get("/file")
        port = client._transport.get_extra_info("sockname")[1]
    assert response.status == 200
    assert response.sha256 == server.sha256["file"]
    assert ("127.0.0.1", port) in server.sent_to()


@pytest.mark.interop
@needs_tshark
async def test_capture_sees_server_to_client_flows(
    rig_gtlsserver: Ngtcp2Server, rig_cert: CertPair
) -> None:
    server = rig_gtlsserver
    config = client_configuration(alpn=["h3"], cadata=rig_cert.cert_pem)
    async with capture_udp(server.port) as cap:
        async with stock_client(
            *server.addr, configuration=config, create_protocol=H3ClientProtocol
        ) as client:
            assert isinstance(client, H3ClientProtocol)
            assert (await client.get("/file")).sha256 == server.sha256["file"]
            client_addr = ("127.0.0.1", client._transport.get_extra_info("sockname")[1])
        await cap.wait_for(lambda: client_addr in cap.destinations_from(server.port), 10)
    assert all(src == server.addr for src, _ in cap.server_to_client())


@pytest.mark.interop
@needs_tshark
@needs_gtlsclient
async def test_gtlsserver_answers_migrated_gtlsclient(
    rig_gtlsserver: Ngtcp2Server, tmp_path: Path
) -> None:
    """The log parser and the capture both see the server follow a client to its new port."""
    server = rig_gtlsserver
    async with capture_udp(server.port) as cap:
        proc = await asyncio.create_subprocess_exec(
            "gtlsclient", "--no-quic-dump", "--no-http-dump", "--exit-on-all-streams-close",
            "--change-local-addr=100ms",
            "--delay-stream=300ms", "--download", str(tmp_path), "--timeout=10s",
            "127.0.0.1", str(server.port), f"https://localhost:{server.port}/file",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, stderr = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, stderr.decode(errors="replace")[-2000:]
        assert b"Local address is now" in stderr
        await server.wait_for(lambda s: s.validated_paths(), 5, "path validation in log")
        new_addr = server.validated_paths()[-1][1]
        await cap.wait_for(lambda: new_addr in cap.destinations_from(server.port), 10)
    digest = hashlib.sha256((tmp_path / "file").read_bytes()).hexdigest()
    assert digest == server.sha256["file"]
    assert new_addr in server.sent_to() and len(server.sent_to()) >= 2
    assert len(cap.destinations_from(server.port)) >= 2


@needs_tshark
async def test_quic_frames_decrypts_preferred_address_probe(
    rig_keylog: Path, rig_cert: CertPair, tmp_path: Path
) -> None:
    """Key log + capture: the stock client's PATH_CHALLENGE to the preferred address decodes."""
    async with echo_server(
        certfile=rig_cert.certfile, keyfile=rig_cert.keyfile, preferred_address=("127.0.0.2", 0)
    ) as server:
        assert server.preferred_address is not None
        pcap = tmp_path / "probe.pcapng"
        probe_port = server.preferred_address[1]
        async with capture_udp(server.port, extra_ports=[probe_port], pcap_path=pcap) as cap:
            config = client_configuration(cadata=rig_cert.cert_pem)
            async with stock_client(*server.addr, configuration=config) as client:
                assert await echo(client, b"x") == b"x"
                await cap.wait_for(
                    lambda: any(f.dst[1] == probe_port for f in cap.flows), 10, "probe captured"
                )
    packets = quic_frames(pcap, rig_keylog, server.port, probe_port)
    probes = [p for p in packets if PATH_CHALLENGE in p.frame_types]
    assert probes and probes[0].dst == server.preferred_address



@pytest.mark.netns
@pytest.mark.interop
@needs_tshark
async def test_gtlsserver_in_namespace_serves_both_paths(
    rig_topology: TwoPathTopology, rig_cert: CertPair
) -> None:
    """gtlsserver inside the server namespace; aioquic clients on each path; capture on "any"."""
    ok, reason = gtlsserver_available()
    if not ok:
        pytest.skip(reason)
    topo = rig_topology
    async with (
        gtlsserver(
            certfile=rig_cert.certfile, keyfile=rig_cert.keyfile, cadata=rig_cert.cert_pem,
            host=topo.SERVER_V4, netns=topo.server, size_mb=1,
        ) as server,
        capture_udp(server.port, "any", netns=topo.server) as cap,
    ):
        for path in topo.paths:
            sock = topo.client_socket(path.index)
            local = normalize_addr(sock.getsockname())
            config = client_configuration(alpn=["h3"], cadata=rig_cert.cert_pem)
            async with stock_client(
                *server.addr, configuration=config, sock=sock, create_protocol=H3ClientProtocol
            ) as client:
                assert isinstance(client, H3ClientProtocol)
                assert (await client.get("/file")).sha256 == server.sha256["file"]
            assert local in server.sent_to()
        client_hosts = {p.client_v4 for p in topo.paths}
        await cap.wait_for(
            lambda: {h for h, _ in cap.destinations_from(server.port)} >= client_hosts, 10
        )


@pytest.mark.netns
@needs_tshark
async def test_capture_on_a_path_interface(rig_topology: TwoPathTopology) -> None:
    """Capturing on s1 only sees path 1; the start canary goes out over s1 via `canary_to`."""
    topo = rig_topology
    server = topo.server_socket()
    port = server.getsockname()[1]
    dst = (topo.SERVER_V4, port)
    p0, p1 = topo.client_socket(0), topo.client_socket(1)
    async with capture_udp(port, "s1", netns=topo.server, canary_to=topo.PATHS[1].client_v4) as cap:
        await asyncio.to_thread(_roundtrip, p0, server, dst)
        await asyncio.to_thread(_roundtrip, p1, server, dst)
        p1_addr = normalize_addr(p1.getsockname())
        await cap.wait_for(lambda: cap.destinations_from(port) == {p1_addr}, 10)
    assert {f.src for f in cap.flows if f.dst[1] == port} == {p1_addr}
