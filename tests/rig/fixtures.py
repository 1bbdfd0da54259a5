"""pytest fixtures over the rig, for tests/conftest.py to import.

Use: ``from tests.rig.fixtures import *``. Fixtures that need root, namespaces or Debian tools
skip with the reason instead of failing.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from .aioquic_server import RigServer, echo_server, h3_file_server
from .certs import CertPair, generate_cert
from .netns import TwoPathTopology, cleanup_stale, netns_available
from .ngtcp2 import Ngtcp2Server, gtlsserver, gtlsserver_available

__all__ = [
    "rig_cert",
    "rig_echo_server",
    "rig_gtlsserver",
    "rig_h3_server",
    "rig_keylog",
    "rig_netns",
    "rig_server_in_topology",
    "rig_topology",
    "rig_topology_v4",
]

#: Namespace-side server addresses, so one certificate verifies by IP there too.
TOPOLOGY_IPS = (TwoPathTopology.SERVER_V4, TwoPathTopology.SERVER_V6)


@pytest.fixture(scope="session")
def rig_cert(tmp_path_factory: pytest.TempPathFactory) -> CertPair:
    """Self-signed "localhost" cert (SAN also 127.0.0.1, ::1 and the topology's server IPs)."""
    return generate_cert(tmp_path_factory.mktemp("rig-cert"), extra_ips=TOPOLOGY_IPS)


@pytest.fixture
def rig_keylog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point SSLKEYLOGFILE at a per-test file (rig servers and clients append their secrets)."""
    path = tmp_path / "keylog.txt"
    monkeypatch.setenv("SSLKEYLOGFILE", str(path))
    return path


@pytest_asyncio.fixture
async def rig_echo_server(rig_cert: CertPair) -> AsyncIterator[RigServer]:
    """aioquic echo server (ALPN "echo") on 127.0.0.1, random port."""
    async with echo_server(certfile=rig_cert.certfile, keyfile=rig_cert.keyfile) as server:
        yield server


@pytest_asyncio.fixture
async def rig_h3_server(rig_cert: CertPair) -> AsyncIterator[RigServer]:
    """aioquic HTTP/3 server on 127.0.0.1 serving a 4 MiB `/file`."""
    async with h3_file_server(certfile=rig_cert.certfile, keyfile=rig_cert.keyfile) as server:
        yield server


@pytest.fixture(scope="session")
def rig_netns() -> Iterator[None]:
    """Skip unless namespaces work; clear stale ``qs-*`` namespaces of dead runs once."""
    ok, reason = netns_available()
    if not ok:
        pytest.skip(reason)
    cleanup_stale()
    yield


@pytest.fixture
def rig_topology(rig_netns: None) -> Iterator[TwoPathTopology]:
    """A fresh `TwoPathTopology` (client/server namespaces, two paths), deleted afterwards."""
    with TwoPathTopology() as topology:
        yield topology


@pytest.fixture
def rig_topology_v4(rig_netns: None) -> Iterator[TwoPathTopology]:
    """A fresh IPv4-only `TwoPathTopology`; namespaces and their rules deleted afterwards."""
    with TwoPathTopology(ipv6=False) as topology:
        yield topology


#: The namespace server's receive buffer. Many connections writing at once (20 full-speed
#: streams; 200 first flights) overflow the kernel default (~208 KiB) of its one socket: a
#: third of 3,000 datagrams were dropped (Udp RcvbufErrors), whole flights lost, and the
#: connections that lost them judged their path dead on real silence (failovers before any
#: fault, "suspect" since the path answered 0.1 s later). The tests are about our faults, not
#: the rig server's, so it gets room (SO_RCVBUFFORCE: root, above rmem_max).
SERVER_RCVBUF = 16 * 1024 * 1024
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


@pytest_asyncio.fixture
async def rig_server_in_topology(
    rig_topology_v4: TwoPathTopology, cert: CertPair
) -> AsyncIterator[RigServer]:
    """aioquic echo server on 10.77.0.1 in the server namespace (reachable over both links),
    its socket's receive buffer ``SERVER_RCVBUF``; ``cert`` is the suite's localhost
    certificate (tests/conftest.py)."""
    sock = rig_topology_v4.server_socket(socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SERVER_RCVBUF)
    async with echo_server(sock=sock, certfile=cert.certfile, keyfile=cert.keyfile) as server:
        yield server


@pytest_asyncio.fixture
async def rig_gtlsserver(rig_cert: CertPair) -> AsyncIterator[Ngtcp2Server]:
    """ngtcp2's gtlsserver on 127.0.0.1 serving `/file` (4 MiB, `server.sha256["file"]`)."""
    ok, reason = gtlsserver_available()
    if not ok:
        pytest.skip(reason)
    async with gtlsserver(
        certfile=rig_cert.certfile, keyfile=rig_cert.keyfile, cadata=rig_cert.cert_pem
    ) as server:
        yield server
