"""libp2p over QUIC against independent peers: py-libp2p 0.8.1 and js-libp2p 2 (DESIGN §9).

py-libp2p (aioquic underneath) accepts migration but does not check our certificate's
signature for real; js-libp2p (quinn + rustls) checks strictly and forbids migration. So
py-libp2p proves dial, ping, identify and migration; js-libp2p proves our certificates and
that a peer's ``disable_active_migration`` is honoured. The peers are installed by ``make``'s
set-up (`make peers`); without them these tests skip with the reason.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key

from actors.errors import MigrationNotSupportedError, PeerCertificateError, PeerIdMismatchError
from supervisor import Supervisor
from supervisor.libp2p.credentials import Credentials
from supervisor.libp2p.keys import Identity, PublicKey
from supervisor.libp2p.peer_calls import identify_peer, ping_peer
from supervisor.libp2p.peer_id import PeerId
from supervisor.libp2p.tls import make_certificate, verify_certificate_chain
from tests.rig.libp2p_peers import (
    KEY_TYPES,
    js_libp2p_available,
    js_libp2p_peer,
    py_libp2p_available,
    py_libp2p_peer,
    run_dial,
)

pytestmark = pytest.mark.interop

SECOND = "/ip4/127.0.0.2/udp/0/quic-v1"
LISTEN = "/ip4/127.0.0.1/udp/0/quic-v1"
SCRIPT = Path(sys.executable).with_name("quic-supervisor")
LIBP2P_EXTENSION = x509.ObjectIdentifier("1.3.6.1.4.1.53594.1.1")

needs_py = pytest.mark.skipif(bool(py_libp2p_available()), reason=str(py_libp2p_available()))
needs_js = pytest.mark.skipif(bool(js_libp2p_available()), reason=str(js_libp2p_available()))


def _client(key_type: str = "ed25519") -> Supervisor:
    return Supervisor(
        enable_experimental_connection_migration=True, identity=Identity.generate(key_type)
    )


def _record(what: str, **figures: object) -> None:
    """One line per measurement, for the notes (-s shows them)."""
    print(f"[libp2p] {json.dumps({'case': what, **figures})}")


# ------------------------------------------------------------------------------ py-libp2p


PEER_KINDS = [
    pytest.param("py-libp2p", marks=needs_py, id="py-libp2p"),
    pytest.param("js-libp2p", marks=needs_js, id="js-libp2p"),
]


@pytest.mark.parametrize("key_type", KEY_TYPES)
@pytest.mark.parametrize("kind", PEER_KINDS)
async def test_dial_verify_and_ping(kind: str, key_type: str) -> None:
    """Both sides with the same key type; js-libp2p also refuses our migration, typed."""
    start = py_libp2p_peer if kind == "py-libp2p" else js_libp2p_peer
    async with start(key_type) as peer, _client(key_type) as sup:
        started = asyncio.get_running_loop().time()
        conn = await sup.dial(peer.multiaddr)
        took = asyncio.get_running_loop().time() - started
        assert conn.remote_peer_id == PeerId.parse(peer.peer_id)
        rtts = await ping_peer(conn, count=3)
        assert len(rtts) == 3
        _record(
            f"{kind} dial+ping",
            key_type=key_type,
            handshake_ms=took * 1000,
            rtts_ms=[r * 1000 for r in rtts],
        )
        mc = conn.as_migratable()
        if kind == "js-libp2p":
            # It forbids migration (disable_active_migration): refused, typed, nothing sent.
            assert not mc.supports_migration()
            with pytest.raises(MigrationNotSupportedError):
                await mc.add_path(SECOND)
            assert len(await ping_peer(conn)) == 1  # still usable
        else:
            assert mc.supports_migration()
        await conn.close()


@needs_py
async def test_py_libp2p_wrong_peer_id_leaves_nothing_open() -> None:
    other = Identity.generate().peer_id
    async with py_libp2p_peer() as peer, _client() as sup:
        addr = peer.multiaddr.rpartition("/p2p/")[0]
        with pytest.raises(PeerIdMismatchError) as err:
            await sup.dial(f"{addr}/p2p/{other}")
        assert err.value.actual == peer.peer_id and err.value.expected == str(other)
        assert sup.connections() == [] and sup._sockets == {}


@needs_py
async def test_py_libp2p_connection_migrates_and_keeps_pinging() -> None:
    async with py_libp2p_peer() as peer, _client() as sup:
        conn = await sup.dial(peer.multiaddr)
        before = await ping_peer(conn, count=3)
        seen_before = await identify_peer(conn)
        mc = conn.as_migratable()
        assert mc.supports_migration()
        path = await mc.add_path(SECOND)
        await path.probe()
        result = await path.switch()
        assert mc.active_path().local_addr == path.info().local_addr
        after = await ping_peer(conn, count=3)
        assert len(after) == 3
        seen_after = await identify_peer(conn)
        # py-libp2p 0.8.1 reports what it observes (recorded, not judged: it says /tcp/).
        _record(
            "py-libp2p migration",
            rtt_before_ms=[r * 1000 for r in before],
            rtt_after_ms=[r * 1000 for r in after],
            confirmation_ms=result.confirmation_s * 1000,
            observed_before=str(seen_before.observed_addr),
            observed_after=str(seen_after.observed_addr),
            our_new_path=str(path.info().local_addr),
        )
        assert PeerId.parse(peer.peer_id).matches(PublicKey.from_protobuf(seen_after.public_key))
        await conn.close()


@needs_py
async def test_py_libp2p_dials_our_libp2p_listener() -> None:
    async with Supervisor(identity=Identity.generate("secp256k1")) as srv:
        listener = await srv.listen(LISTEN, libp2p=True)
        result = await run_dial("py-libp2p", str(listener.multiaddr), count=3)
        assert result.ok, result.describe()
        assert result.remote_peer_id == str(srv.peer_id)
        assert len(result.rtts) == 3
        inbound = await asyncio.wait_for(listener.accept(), 10)
        assert inbound.remote_peer_id is not None
        _record("py-libp2p -> our listener", identify=result.identify, rtts=result.rtts)


# ------------------------------------------------------------------------------ js-libp2p


@needs_js
@pytest.mark.parametrize("key_type", KEY_TYPES)
async def test_js_libp2p_dials_our_listener_and_accepts_our_certificate(key_type: str) -> None:
    async with Supervisor(identity=Identity.generate(key_type)) as srv:
        listener = await srv.listen(LISTEN, libp2p=True)
        result = await run_dial("js-libp2p", str(listener.multiaddr), count=3, key_type=key_type)
        assert result.ok, result.describe()
        assert result.remote_peer_id == str(srv.peer_id)
        assert len(result.rtts) == 3


def _broken_certificate(identity: Identity) -> tuple[x509.Certificate, object]:
    """Our certificate with one bit of the SignedKey signature flipped (re-signed by its key)."""
    cert_pem, key_pem = make_certificate(identity)
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = load_pem_private_key(key_pem, password=None)
    ext = cert.extensions.get_extension_for_oid(LIBP2P_EXTENSION)
    value = bytearray(ext.value.value)  # type: ignore[attr-defined]
    value[-1] ^= 0x01  # the signature is the last field
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(key.public_key())  # type: ignore[union-attr]
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
        .add_extension(
            x509.UnrecognizedExtension(LIBP2P_EXTENSION, bytes(value)), critical=ext.critical
        )
    )
    return builder.sign(key, hashes.SHA256()), key  # type: ignore[arg-type]


@needs_js
async def test_js_libp2p_rejects_a_broken_signature() -> None:
    async with Supervisor() as srv:
        broken, key = _broken_certificate(srv.identity)
        with pytest.raises(PeerCertificateError) as ours:
            verify_certificate_chain(
                [broken.public_bytes(Encoding.DER)],
                now=datetime.datetime.now(datetime.UTC),
            )
        assert ours.value.rule == "bad-signed-key-signature"
        credentials = srv._libp2p_credentials()
        credentials._current = lambda: (broken, key)  # type: ignore[method-assign]
        assert isinstance(credentials, Credentials)
        listener = await srv.listen(LISTEN, libp2p=True)
        result = await run_dial("js-libp2p", str(listener.multiaddr), count=1)
        assert not result.ok, result.describe()
        assert result.rtts == []
        _record("js-libp2p vs a broken signature", error=result.error)


@needs_py
async def test_cli_ping_migrates_a_connection_to_py_libp2p(tmp_path: Path) -> None:
    """The README's `quic-supervisor ping ... --migrate-after`, against py-libp2p."""
    async with py_libp2p_peer() as peer:
        argv = [str(SCRIPT), "ping", peer.multiaddr, "-c", "4", "--interval", "0.05"]
        argv += ["--path", SECOND, "--migrate-after", "2", "--key", str(tmp_path / "me.key")]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        text = out.decode()
        # py-libp2p 0.8.1 now and then ends the first ping stream, opened as our identify
        # stream closes, before echoing anything (3 runs in 10, at this stop's start too; its
        # QUIC log shows the stream finished by the peer within 3 ms). The CLI reports that
        # ping unanswered and exits 1, as it should; every other ping must be answered.
        lost = re.findall(r"ping (\d): no answer \((.*)\)", text)
        assert lost in (
            [],
            [("1", "PingError: ping round 1: the stream ended after 0 of the 32 echoed bytes")],
        ), text
        assert proc.returncode == (1 if lost else 0), text + err.decode()
        assert f"{4 - len(lost)}/4 pings answered" in text
        assert f"connected to {peer.peer_id}" in text
        assert re.search(r"migrated /ip4/127\.0\.0\.1/udp/\d+/quic-v1 -> /ip4/127\.0\.0\.2/", text)
        assert re.search(r"ping 3: [\d.]+ ms via /ip4/127\.0\.0\.2/", text), text
        assert re.search(r"ping 4: [\d.]+ ms via /ip4/127\.0\.0\.2/", text), text
        # py-libp2p answered on our new path: its ping events say where aioquic sends.
        await peer.wait_event(
            lambda e: e.get("event") == "ping" and "127.0.0.2" in str(e.get("quic_path")),
            timeout=10,
            what="a ping answered towards our new path",
        )
        _record("cli ping vs py-libp2p", output=text.splitlines())
