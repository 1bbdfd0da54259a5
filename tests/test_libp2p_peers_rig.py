"""The libp2p test peers work: each starts, announces a dialable /p2p/ address, and speaks libp2p
QUIC (TLS handshake, multistream-select, ping, identify) to the other, an independent stack.

Later libp2p-mode tests trust these peers' event lines; here each side's report is checked
against what the other side did.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest

from tests.rig.libp2p_peers import (
    KEY_TYPES,
    Libp2pPeer,
    PeerKind,
    js_libp2p_available,
    js_libp2p_peer,
    py_libp2p_available,
    py_libp2p_peer,
    run_dial,
)

pytestmark = pytest.mark.interop

_PY = py_libp2p_available()
_JS = js_libp2p_available()
needs_py = pytest.mark.skipif(_PY is not None, reason=_PY or "")
needs_js = pytest.mark.skipif(_JS is not None, reason=_JS or "")

# Peer-id prefixes by key type: identity multihash of the protobuf key for Ed25519 and secp256k1
# (base58btc "12D3KooW" / "16Uiu2H"), sha2-256 for RSA ("Qm").
_PREFIX = {"ed25519": "12D3KooW", "secp256k1": "16Uiu2H", "rsa": "Qm"}
_PING = "/ipfs/ping/1.0.0"
_IDENTIFY = "/ipfs/id/1.0.0"


def _listener(
    kind: PeerKind, key_type: str = "ed25519"
) -> contextlib.AbstractAsyncContextManager[Libp2pPeer]:
    start = py_libp2p_peer if kind == "py-libp2p" else js_libp2p_peer
    return start(key_type)


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def _udp_port(multiaddr: str) -> int:
    match = re.search(r"/(?:udp|tcp)/(\d+)", multiaddr)
    assert match, multiaddr
    return int(match.group(1))


def _check_ready(peer: Libp2pPeer, key_type: str) -> None:
    print(f"{peer.kind} {key_type}: ready line after {peer.start_seconds:.2f}s")
    assert peer.peer_id.startswith(_PREFIX[key_type]), peer.ready
    assert peer.ready["key_type"] == key_type
    assert peer.ready["pid"] == peer.pid
    assert re.fullmatch(
        rf"/ip4/127\.0\.0\.1/udp/[1-9]\d*/quic-v1/p2p/{peer.peer_id}", peer.multiaddr
    ), peer.addrs


@needs_py
@pytest.mark.parametrize("key_type", KEY_TYPES)
async def test_py_peer_starts_and_prints_its_address(key_type: str) -> None:
    async with py_libp2p_peer(key_type) as peer:
        _check_ready(peer, key_type)


@needs_js
@pytest.mark.parametrize("key_type", KEY_TYPES)
async def test_js_peer_starts_and_prints_its_address(key_type: str) -> None:
    async with js_libp2p_peer(key_type) as peer:
        _check_ready(peer, key_type)


@needs_py
@needs_js
async def test_both_peers_read_the_same_libp2p_key_file(tmp_path: Path) -> None:
    """A key file is the libp2p protobuf private key: created by one peer, the other has the same
    identity from it (so tests can hand either peer a key our own Identity wrote)."""
    key_file = tmp_path / "peer.key"
    async with py_libp2p_peer("secp256k1", key_file=key_file) as py:
        assert key_file.stat().st_mode & 0o077 == 0
    async with js_libp2p_peer("ed25519", key_file=key_file) as js:  # the file's type wins
        assert js.peer_id == py.peer_id
        assert js.ready["key_type"] == "secp256k1"


@pytest.mark.parametrize(
    ("listener", "dialer", "key_types"),
    [
        pytest.param(
            "js-libp2p", "py-libp2p", ("ed25519", "secp256k1"), marks=[needs_py, needs_js]
        ),
        pytest.param("py-libp2p", "js-libp2p", ("secp256k1", "rsa"), marks=[needs_py, needs_js]),
    ],
)
async def test_dial_and_ping_across_implementations(
    listener: PeerKind, dialer: PeerKind, key_types: tuple[str, str]
) -> None:
    """One implementation dials the other over QUIC, pings 3 times on one stream, identifies;
    the listener's event lines report the same connection, pings and identify."""
    listen_key, dial_key = key_types
    async with _listener(listener, listen_key) as peer:
        result = await run_dial(dialer, peer.multiaddr, count=3, key_type=dial_key)
        print(f"{dialer} -> {listener}: rtts {result.rtts} ms, dial took {result.seconds:.2f}s")
        assert result.ok, result.describe()
        assert result.remote_peer_id == peer.peer_id
        assert len(result.rtts) == 3 and all(r >= 0 for r in result.rtts)
        dialer_id = result.output["local_peer_id"]
        assert dialer_id.startswith(_PREFIX[dial_key])

        # What the dialer learnt from the listener's identify.
        ident = result.identify
        assert ident["agent_version"].startswith(listener.replace("-libp2p", "-libp2p/"))
        assert {_PING, _IDENTIFY} <= set(ident["protocols"])
        assert peer.multiaddr.removesuffix(f"/p2p/{peer.peer_id}") in ident["listen_addrs"]

        # The listener's own account of the same connection.
        connected = await peer.wait_event(
            lambda e: e["event"] == "connected" and e["remote_peer_id"] == dialer_id,
            what="connected",
        )
        assert connected["direction"] == "inbound"
        await peer.wait_event(
            lambda e: e["event"] == "ping" and e["remote_peer_id"] == dialer_id and e["count"] == 3,
            what="3 pings answered",
        )
        # The observed address the listener sent is the dialer's UDP port (py-libp2p labels it
        # /tcp/ even on QUIC; js-libp2p sends the full /udp/../quic-v1/p2p/.. address).
        assert _udp_port(ident["observed_addr"]) == _udp_port(connected["remote_addr"])
        if listener == "py-libp2p":
            assert "/tcp/" in ident["observed_addr"]
        else:
            assert "/quic-v1" in ident["observed_addr"]
        await peer.wait_event(
            lambda e: e["event"] == "disconnected" and e["remote_peer_id"] == dialer_id,
            what="disconnected after the dialer exits",
        )


@needs_py
@needs_js
async def test_py_dialer_refuses_a_wrong_peer_id() -> None:
    """py-libp2p checks the dialled /p2p/ id against the certificate: a dial result can fail."""
    async with js_libp2p_peer() as peer, js_libp2p_peer() as other:
        wrong = peer.multiaddr.replace(peer.peer_id, other.peer_id)
        result = await run_dial("py-libp2p", wrong, count=1)
        assert not result.ok and result.error, result.describe()
        assert not peer.matching(lambda e: e["event"] == "ping")


@needs_py
@needs_js
async def test_js_dialer_does_not_check_the_dialled_peer_id() -> None:
    """Recorded, not wanted: js-libp2p 2.10 with libp2p-quic 1.1.8 connects to whatever peer id
    the certificate carries and reports that one, so a js dial cannot test our peer-id checks."""
    async with py_libp2p_peer() as peer, py_libp2p_peer() as other:
        wrong = peer.multiaddr.replace(peer.peer_id, other.peer_id)
        result = await run_dial("js-libp2p", wrong, count=1)
        assert result.ok, result.describe()
        assert result.remote_peer_id == peer.peer_id != other.peer_id


@needs_py
@needs_js
async def test_js_identify_fails_on_an_rsa_peers_signed_record() -> None:
    """Recorded: js-libp2p 2.10 cannot open a signed peer record from an RSA peer
    (UnsupportedKeyTypeError), so its identify of an RSA py-libp2p node fails; ping works."""
    async with py_libp2p_peer("rsa") as peer:
        result = await run_dial("js-libp2p", peer.multiaddr, count=2)
        assert result.ok and len(result.rtts) == 2, result.describe()
        assert "UnsupportedKeyType" in result.identify.get("error", ""), result.describe()


@needs_py
@needs_js
async def test_peers_leave_no_process_behind() -> None:
    """Leaving the context (normally or by an exception) ends and reaps the peer process."""
    pids = []
    async with py_libp2p_peer() as py, js_libp2p_peer() as js:
        pids = [py.pid, js.pid]
        assert not any(_gone(pid) for pid in pids)
    assert all(_gone(pid) for pid in pids), pids
    assert py.process.returncode == 0 and js.process.returncode == 0  # clean exits on stdin EOF

    with pytest.raises(RuntimeError, match="boom"):
        async with py_libp2p_peer() as py, js_libp2p_peer() as js:
            pids = [py.pid, js.pid]
            raise RuntimeError("boom")
    assert all(_gone(pid) for pid in pids), pids


@needs_py
async def test_a_peer_that_cannot_start_reports_its_log(tmp_path: Path) -> None:
    bad_key = tmp_path / "bad.key"
    bad_key.write_bytes(b"not a libp2p key")
    with pytest.raises(RuntimeError, match="ready line") as info:
        async with py_libp2p_peer(key_file=bad_key):
            pass
    assert "bad.key" in str(info.value)  # py-libp2p's own error, from the peer's stderr
