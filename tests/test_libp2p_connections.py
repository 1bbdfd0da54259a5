"""libp2p mode end to end between our own client and our own listener (DESIGN §9).

Real UDP sockets on loopback, the real libp2p TLS handshake (both certificates checked),
multistream-select, ping, identify and identify push, and a migration of a libp2p connection.
The independent peers (py-libp2p, js-libp2p) are in ``test_libp2p_interop.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import select
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from actors.errors import (
    HandshakeError,
    InvalidAddressError,
    InvalidArgumentError,
    PeerIdMismatchError,
)
from actors.streams import Stream
from supervisor import Supervisor
from supervisor.cli.main import main
from supervisor.core.events import EvtConnectionMigrationCompleted
from supervisor.libp2p import identify
from supervisor.libp2p.keys import Identity
from supervisor.libp2p.multistream import NoCommonProtocolError
from supervisor.libp2p.peer_calls import identify_peer, ping_peer
from supervisor.server import Listener
from tests.rig.waiting import poll_until
from tests.support import stop_process

SECOND = "/ip4/127.0.0.2/udp/0/quic-v1"
LISTEN = "/ip4/127.0.0.1/udp/0/quic-v1"
ECHO = "/test/echo/1.0.0"
SCRIPT = Path(sys.executable).with_name("quic-supervisor")


async def _echo(stream: Stream) -> None:
    while data := await stream.read():
        await stream.write(data)
    await stream.close()


@contextlib.asynccontextmanager
async def _pair(
    server_key: str = "ed25519", client_key: str = "ed25519", **client_kwargs: object
) -> AsyncIterator[tuple[Supervisor, Listener, Supervisor]]:
    async with (
        Supervisor(identity=Identity.generate(server_key)) as srv,
        Supervisor(
            enable_experimental_connection_migration=True,
            identity=Identity.generate(client_key),
            **client_kwargs,  # type: ignore[arg-type]
        ) as cli,
    ):
        listener = await srv.listen(LISTEN, libp2p=True, handlers={ECHO: _echo})
        yield srv, listener, cli


@pytest.mark.parametrize(
    ("server_key", "client_key"),
    [("ed25519", "ed25519"), ("secp256k1", "rsa"), ("rsa", "secp256k1")],
)
async def test_dial_proves_both_peer_ids_and_pings(server_key: str, client_key: str) -> None:
    async with _pair(server_key, client_key) as (srv, listener, cli):
        assert str(listener.multiaddr).endswith(f"/p2p/{srv.peer_id}")
        conn = await cli.dial(listener.multiaddr)
        assert conn.remote_peer_id == srv.peer_id
        assert conn.local_peer_id == cli.peer_id
        assert str(conn.remote_multiaddr) == str(listener.multiaddr)
        assert str(conn.local_multiaddr).endswith(f"/p2p/{cli.peer_id}")
        rtts = await ping_peer(conn, count=3)
        assert len(rtts) == 3 and all(r > 0 for r in rtts)
        inbound = await asyncio.wait_for(listener.accept(), 10)
        assert inbound.remote_peer_id == cli.peer_id
        assert inbound.local_peer_id == srv.peer_id
        await conn.close()


async def test_a_peer_id_in_cid_form_dials_too() -> None:
    async with _pair() as (srv, listener, cli):
        conn = await cli.dial(f"{listener.bound}/p2p/{srv.peer_id.to_cid()}")
        assert conn.remote_peer_id == srv.peer_id


async def test_wrong_peer_id_is_refused_naming_both_and_leaves_nothing_open() -> None:
    other = Identity.generate().peer_id
    async with _pair() as (srv, listener, cli):
        with pytest.raises(PeerIdMismatchError) as err:
            await cli.dial(f"{listener.bound}/p2p/{other}")
        assert err.value.expected == str(other) and err.value.actual == str(srv.peer_id)
        assert str(other) in str(err.value) and str(srv.peer_id) in str(err.value)
        assert isinstance(err.value, HandshakeError)
        assert cli.connections() == []
        assert cli._sockets == {}
        # The supervisor stays usable: the right peer id dials.
        conn = await cli.dial(listener.multiaddr)
        assert conn.remote_peer_id == srv.peer_id


@pytest.mark.parametrize(
    ("addr", "named"),
    [
        ("/p2p/notapeerid", "peer id"),
        ("/p2p/", "missing value for protocol: p2p"),
        (
            "/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA/udp/1",
            "/p2p/ must be the last component",
        ),
    ],
)
async def test_a_bad_p2p_component_is_named(addr: str, named: str) -> None:
    async with Supervisor() as sup:
        with pytest.raises(InvalidAddressError, match=re.escape(named)):
            await sup.dial(f"/ip4/127.0.0.1/udp/4001/quic-v1{addr}")
        assert sup.connections() == []


async def test_a_client_without_a_libp2p_certificate_is_refused_by_our_listener() -> None:
    async with _pair() as (_srv, listener, cli):
        conn = await cli.dial(
            listener.bound, alpn_protocols=["libp2p"], verify=False, server_name=None
        )
        await poll_until(lambda: conn.is_closed, timeout=10, what="the listener closes it")
        assert listener.rejected_peers == 1
        assert listener.connections == {}


async def test_streams_negotiate_protocols_both_ways() -> None:
    async with _pair() as (_srv, listener, cli):
        served: asyncio.Queue[str | None] = asyncio.Queue()

        async def on_client(stream: Stream) -> None:
            served.put_nowait(stream.protocol)
            await _echo(stream)

        cli.set_stream_handler("/test/client-side/1.0.0", on_client)
        conn = await cli.dial(listener.multiaddr)
        # The listener's own handler, by protocol id; an unknown one first is skipped.
        stream = await conn.new_stream(["/no/such/1.0.0", ECHO])
        assert stream.protocol == ECHO
        await stream.write(b"hello")
        await stream.close()
        assert await stream.read() == b"hello"
        with pytest.raises(NoCommonProtocolError):
            await conn.new_stream(["/no/such/1.0.0"])
        with pytest.raises(ValueError, match="set_stream_handler"):
            await conn.accept_stream()
        # The server opens a stream to the client: the client's handler answers it.
        inbound = await asyncio.wait_for(listener.accept(), 10)
        back = await inbound.new_stream(["/test/client-side/1.0.0"])
        await back.write(b"ping")
        await back.close()
        assert await back.read() == b"ping"
        assert await asyncio.wait_for(served.get(), 10) == "/test/client-side/1.0.0"
        # Bad protocol lists are named before anything is opened.
        with pytest.raises(InvalidArgumentError, match="1 to 16 protocol ids"):
            await conn.new_stream([])
        with pytest.raises(TypeError, match="list of protocol ids"):
            await conn.new_stream("/ipfs/ping/1.0.0")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="starts with '/'"):
            await conn.new_stream(["ping"])
        # The connection is still fine after a refused negotiation.
        assert len(await ping_peer(conn)) == 1


async def test_bad_handler_registrations_are_named() -> None:
    async with Supervisor() as sup:
        with pytest.raises(InvalidArgumentError, match="answered by the library"):
            sup.set_stream_handler("/ipfs/ping/1.0.0", _echo)
        with pytest.raises(InvalidArgumentError, match="starts with '/'"):
            sup.set_stream_handler("echo", _echo)
        with pytest.raises(TypeError, match="async function"):
            sup.set_stream_handler("/x/1.0.0", "not callable")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="certfile"):
            await sup.listen(LISTEN, libp2p=True, certfile="cert.pem")
        with pytest.raises(InvalidArgumentError, match="libp2p=True"):
            await sup.listen(LISTEN, handlers={ECHO: _echo})
        with pytest.raises(TypeError, match="Identity"):
            Supervisor(identity="key.pem")  # type: ignore[arg-type]


async def test_an_identity_is_made_when_none_is_given() -> None:
    async with Supervisor() as srv, Supervisor() as cli:
        listener = await srv.listen(LISTEN, libp2p=True)
        conn = await cli.dial(listener.multiaddr)
        assert conn.remote_peer_id == srv.peer_id
        assert cli.identity.peer_id == conn.local_peer_id


async def test_migrated_libp2p_connection_keeps_pinging_and_identify_follows() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        async with _pair(tracer_provider=provider) as (srv, listener, cli):
            conn = await cli.dial(listener.multiaddr)
            inbound = await asyncio.wait_for(listener.accept(), 10)
            before = await identify_peer(conn)
            assert str(before.observed_addr) == str(conn.as_migratable().active_path().local_addr)
            assert before.public_key == srv.identity.public_key.to_protobuf()
            assert identify.PROTOCOL in before.protocols and ECHO in before.protocols
            async with cli.events.subscribe(EvtConnectionMigrationCompleted) as events:
                mc = conn.as_migratable()
                path = await mc.add_path(SECOND)
                await path.probe()
                await path.switch()
                evt = await asyncio.wait_for(anext(aiter(events)), 10)
            assert str(evt.remote_addr).endswith(f"/p2p/{srv.peer_id}")
            assert len(await ping_peer(conn, count=3)) == 3
            after = await identify_peer(conn)
            assert str(after.observed_addr) == str(path.info().local_addr)
            assert str(inbound.remote_multiaddr).startswith(str(path.info().local_addr))
            # Our push after the migration reached the listener's service.
            service = srv.libp2p
            await poll_until(lambda: inbound.conn_id in service.pushed, timeout=10)
            assert service.pushed[inbound.conn_id].public_key == (
                cli.identity.public_key.to_protobuf()
            )
        spans = [s for s in exporter.get_finished_spans() if s.name == "quic.migration"]
        assert spans and spans[0].attributes is not None
        assert spans[0].attributes["libp2p.peer.id"] == str(srv.peer_id)
    finally:
        provider.shutdown()


# ------------------------------------------------------------------------------ the CLI


@pytest.fixture
def libp2p_serve(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    """``quic-supervisor serve --libp2p --key FILE``; yields (process, /p2p/ address, key)."""
    if not SCRIPT.exists():
        pytest.skip(f"{SCRIPT} missing: run .venv/bin/pip install -e '.[dev,cli]'")
    key = tmp_path / "server.key"
    err = (tmp_path / "serve.err").open("w")
    proc = subprocess.Popen(
        [str(SCRIPT), "serve", "--libp2p", "--key", str(key), "--listen", LISTEN],
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if ready else ""
        match = re.match(r"listening on (\S+/p2p/\S+) \(libp2p\)", line)
        assert match, f"serve did not start: {line!r} {(tmp_path / 'serve.err').read_text()}"
        yield proc, match.group(1), key
    finally:
        stop_process(proc)
        err.close()


def test_cli_ping_migrates_a_libp2p_connection(
    libp2p_serve: tuple[subprocess.Popen[str], str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proc, addr, key = libp2p_serve
    assert key.stat().st_mode & 0o777 == 0o600
    assert addr.endswith(f"/p2p/{Identity.load(key).peer_id}")
    mine = tmp_path / "client.key"
    argv = ["ping", addr, "-c", "4", "--interval", "0.01", "--path", SECOND]
    rc = main([*argv, "--migrate-after", "2", "--key", str(mine)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "4/4 pings answered" in out
    assert re.search(r"migrated /ip4/127\.0\.0\.1/udp/\d+/quic-v1 -> /ip4/127\.0\.0\.2/", out), out
    observed = re.findall(r"peer observes us at (\S+)", out)
    assert len(observed) == 2 and observed[1].startswith("/ip4/127.0.0.2/"), out
    assert f"we are {Identity.load(mine).peer_id}" in out
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0


def test_cli_ping_refuses_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    addr = f"/ip4/127.0.0.1/udp/9/quic-v1/p2p/{Identity.generate().peer_id}"
    assert main(["ping", addr, "--migrate-after", "1"]) == 2
    assert "--migrate-after needs a --path" in capsys.readouterr().err
    assert main(["ping", addr, "-c", "0"]) == 2
    assert "--count must be at least 1" in capsys.readouterr().err
