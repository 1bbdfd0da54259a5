"""HTTP/3 over a migratable connection: against ngtcp2's gtlsserver (independent peer), and the
request-level behaviour (404, concurrency, cancellation) against the rig's aioquic server.

The interop test switches paths while the body is streaming; the switch is triggered by the
body's own progress (bytes received), never by a sleep. That the server followed the client is
checked twice, independently: tshark sees server->client datagrams to the new address, and
gtlsserver's log says it sent there.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time

import pytest

from supervisor import Supervisor
from supervisor.h3 import http3_get
from tests.rig.aioquic_server import h3_file_server
from tests.rig.capture import capture_udp, tshark_available
from tests.rig.certs import CertPair
from tests.rig.ngtcp2 import gtlsserver, gtlsserver_available

pytest_plugins = ["tests.rig.fixtures"]

SIZE = 8 * 1024 * 1024
SECOND_PATH = "/ip4/127.0.0.2/udp/0/quic-v1"


@pytest.mark.interop
async def test_ngtcp2_download_with_migration_mid_body(
    rig_cert: CertPair, record_property: pytest.RecordProperty
) -> None:
    ok, reason = gtlsserver_available()
    if not ok:
        pytest.skip(reason)
    have_tshark, why_not = tshark_available()
    if not have_tshark:
        pytest.skip(why_not)
    async with (
        gtlsserver(
            certfile=rig_cert.certfile,
            keyfile=rig_cert.keyfile,
            cadata=rig_cert.cert_pem,
            size_mb=SIZE / (1024 * 1024),
        ) as server,
        capture_udp(server.port) as cap,
        Supervisor(enable_experimental_connection_migration=True) as sup,
    ):
        conn = await sup.dial(
            f"/ip4/127.0.0.1/udp/{server.port}/quic-v1",
            alpn_protocols=["h3"],
            cafile=str(rig_cert.certfile),
        )
        mc = conn.as_migratable()
        new = await mc.add_path(SECOND_PATH)
        await new.probe()
        probe_rtt = new.info().rtt
        parts = str(new.info().local_addr).split("/")  # /ip4/HOST/udp/PORT/quic-v1
        new_addr = (parts[2], int(parts[4]))

        digest = hashlib.sha256()
        received = 0
        midway = asyncio.Event()

        def sink(chunk: bytes) -> None:
            nonlocal received
            digest.update(chunk)
            received += len(chunk)
            if received >= SIZE // 4:
                midway.set()

        switch_window: dict[str, int | float] = {}

        async def migrate() -> None:
            await midway.wait()
            switch_window["from"] = received
            t0 = time.monotonic()
            await new.switch()
            switch_window["confirmation"] = time.monotonic() - t0
            switch_window["to"] = received

        t0 = time.monotonic()
        migration = asyncio.create_task(migrate())
        response = await asyncio.wait_for(
            http3_get(conn, "/file", authority=f"localhost:{server.port}", sink=sink), 60
        )
        fetch_time = time.monotonic() - t0
        await asyncio.wait_for(migration, 10)

        assert response.status == 200 and response.length == SIZE == received
        assert digest.hexdigest() == server.sha256["file"]
        # The switch was confirmed while the body was still arriving.
        assert 0 < switch_window["from"] <= switch_window["to"] < SIZE, switch_window
        assert mc.active_path().local_addr == new.info().local_addr
        # The server answered on the new path: on the wire, and by its own account.
        await cap.wait_for(
            lambda: new_addr in cap.destinations_from(server.port), 10, "server -> new path"
        )
        await server.wait_for(lambda s: new_addr in s.sent_to(), 10, "gtlsserver log")
        # Byte counts from the server's log: on lo, tshark sees a GSO batch as one datagram
        # and under-reports lengths.
        sent = _bytes_sent_by_remote(server.log())
        assert sent.get(new_addr, 0) > SIZE // 2, sent  # most of the body took the new path
        await conn.close()

    figures = {
        "fetch_s": round(fetch_time, 3),
        "throughput_MBps": round(SIZE / fetch_time / 1e6, 2),
        "probe_rtt_ms": round((probe_rtt or 0) * 1000, 3),
        "switch_confirmation_ms": round(float(switch_window["confirmation"]) * 1000, 3),
        "server_bytes_to_old_path": sum(v for k, v in sent.items() if k != new_addr),
        "server_bytes_to_new_path": sent[new_addr],
    }
    for key, value in figures.items():
        record_property(key, value)
    print(f"\nngtcp2 8 MiB download with migration: {figures}")


_SENT_RE = re.compile(r"^Sent packet: local=\S+ remote=\[([^\]]+)\]:(\d+) .*?(\d+) bytes$", re.M)


def _bytes_sent_by_remote(log: str) -> dict[tuple[str, int], int]:
    """Bytes gtlsserver sent per client address (its "Sent packet: ... N bytes" lines)."""
    sent: dict[tuple[str, int], int] = {}
    for m in _SENT_RE.finditer(log):
        key = (m[1], int(m[2]))
        sent[key] = sent.get(key, 0) + int(m[3])
    return sent


# ------------------------------------------------------------------------------ aioquic h3


async def test_h3_statuses_concurrency_and_cancel(rig_cert: CertPair) -> None:
    """One HTTP/3 session per connection: 404, two concurrent GETs, and a cancelled GET that
    leaves the connection usable."""
    async with (
        h3_file_server(certfile=rig_cert.certfile, keyfile=rig_cert.keyfile, size_mb=4) as server,
        Supervisor(enable_experimental_connection_migration=True) as sup,
    ):
        conn = await sup.dial(
            f"/ip4/127.0.0.1/udp/{server.port}/quic-v1",
            alpn_protocols=["h3"],
            cafile=str(rig_cert.certfile),
        )
        missing = await http3_get(conn, "/nope", authority="localhost")
        assert missing.status == 404 and missing.body == b""

        first, second = await asyncio.gather(
            http3_get(conn, "/file", authority="localhost"),
            http3_get(conn, "/file", authority="localhost"),
        )
        want = server.sha256["/file"]
        assert hashlib.sha256(first.body).hexdigest() == want
        assert hashlib.sha256(second.body).hexdigest() == want
        assert first.header("content-length") == str(len(first.body))

        started = asyncio.Event()
        cancelled = asyncio.create_task(
            http3_get(conn, "/file", authority="localhost", sink=lambda _: started.set())
        )
        await started.wait()
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        again = await http3_get(conn, "/file", authority="localhost")
        assert hashlib.sha256(again.body).hexdigest() == want
        await conn.close()


async def test_h3_needs_h3_alpn(rig_cert: CertPair) -> None:
    async with (
        h3_file_server(
            certfile=rig_cert.certfile, keyfile=rig_cert.keyfile, size_mb=0.1, alpn=["h3", "echo"]
        ) as server,
        Supervisor() as sup,
    ):
        conn = await sup.dial(
            f"/ip4/127.0.0.1/udp/{server.port}/quic-v1",
            alpn_protocols=["echo"],
            cafile=str(rig_cert.certfile),
        )
        with pytest.raises(ValueError, match="alpn_protocols=\\['h3'\\]"):
            await http3_get(conn, "/file", authority="localhost")


async def test_h3_fails_when_the_connection_closes(rig_cert: CertPair) -> None:
    """A pending request ends with ConnectionClosedError, not a hang."""
    from supervisor.core.errors import ConnectionClosedError

    async with (
        h3_file_server(certfile=rig_cert.certfile, keyfile=rig_cert.keyfile, size_mb=16) as server,
        Supervisor() as sup,
    ):
        conn = await sup.dial(
            f"/ip4/127.0.0.1/udp/{server.port}/quic-v1",
            alpn_protocols=["h3"],
            cafile=str(rig_cert.certfile),
        )
        started = asyncio.Event()
        request = asyncio.create_task(
            http3_get(conn, "/file", authority="localhost", sink=lambda _: started.set())
        )
        await started.wait()
        await conn.close()
        with pytest.raises(ConnectionClosedError):
            await asyncio.wait_for(request, 10)
