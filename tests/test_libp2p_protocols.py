"""ping and identify over an in-memory stream pair: the round trips a peer relies on, the
byte layout peers read, and what a misbehaving peer gets."""

from __future__ import annotations

import asyncio
import os
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multiaddr import Multiaddr

from supervisor.libp2p import identify, ping
from supervisor.libp2p.identify import (
    MAX_MESSAGE_SIZE,
    MAX_MESSAGES,
    IdentifyError,
    IdentifyInfo,
    decode_response,
    encode_response,
    read_identify,
    send_identify,
)
from supervisor.libp2p.multistream import ProtocolTimeoutError, encode_frame, encode_uvarint
from supervisor.libp2p.ping import PAYLOAD_SIZE, PingError, serve_ping
from tests.test_libp2p_multistream import MemoryStream, read_all, stream_pair

QUIC = Multiaddr("/ip4/127.0.0.1/udp/4001/quic-v1")
PEER = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"


def test_protocol_ids() -> None:
    assert ping.PROTOCOL == "/ipfs/ping/1.0.0"
    assert identify.PROTOCOL == "/ipfs/id/1.0.0"
    assert identify.PUSH_PROTOCOL == "/ipfs/id/push/1.0.0"


# -- ping ---------------------------------------------------------------------------------------


async def test_ping_against_serve_ping_returns_one_rtt_per_round() -> None:
    client, server = stream_pair()
    rtts, served = await asyncio.gather(ping.ping(client, count=3), serve_ping(server))
    assert len(rtts) == 3 and all(rtt > 0 for rtt in rtts)
    assert served == 3
    assert [len(w) for w in client.writes] == [PAYLOAD_SIZE] * 3
    assert len(set(client.writes)) == 3  # fresh random bytes each round
    assert await client.read() == b""  # both sides closed after the last round


async def echo_with(stream: MemoryStream, change: bytes) -> None:
    block = await stream.readexactly(PAYLOAD_SIZE)
    mask = change.ljust(PAYLOAD_SIZE, b"\0")
    await stream.write(bytes(a ^ b for a, b in zip(block, mask, strict=True)))


async def test_a_wrong_echo_raises() -> None:
    client, server = stream_pair()
    with pytest.raises(PingError, match="echoed"):
        await asyncio.gather(ping.ping(client), echo_with(server, b"\x01"))


async def test_an_echo_cut_short_raises() -> None:
    client, server = stream_pair()

    async def half_echo() -> None:
        await server.write((await server.readexactly(PAYLOAD_SIZE))[:10])
        await server.close()

    with pytest.raises(PingError, match="after 10 of the 32"):
        await asyncio.gather(ping.ping(client), half_echo())


async def test_serve_ping_drops_a_partial_block_at_the_end() -> None:
    client, server = stream_pair()
    block = os.urandom(PAYLOAD_SIZE)
    await client.write(block + b"partial")
    await client.close()
    assert await serve_ping(server) == 1
    assert await read_all(client) == block


async def test_serve_ping_stops_after_max_rounds() -> None:
    client, server = stream_pair()
    blocks = [os.urandom(PAYLOAD_SIZE) for _ in range(3)]
    await client.write(b"".join(blocks))
    assert await serve_ping(server, max_rounds=2) == 2
    assert await read_all(client) == blocks[0] + blocks[1]


async def test_serve_ping_times_out_a_silent_peer_and_closes() -> None:
    client, server = stream_pair()
    with pytest.raises(ProtocolTimeoutError, match=re.escape(ping.PROTOCOL)):
        await serve_ping(server, round_timeout=0.05)
    assert await client.read() == b""


async def test_ping_refuses_a_count_below_one() -> None:
    client, _ = stream_pair()
    with pytest.raises(ValueError, match="count"):
        await ping.ping(client, count=0)
    assert client.writes == []


# -- identify: the message ------------------------------------------------------------------------

ADDRS = [
    "/ip4/127.0.0.1/udp/4001/quic-v1",
    "/ip6/::1/udp/4001/quic-v1",
    "/ip4/10.0.0.7/tcp/4001",
    f"/ip4/1.2.3.4/udp/4001/quic-v1/p2p/{PEER}",
    "/dns4/example.com/tcp/443/wss",
]

addresses = st.one_of(
    st.sampled_from(ADDRS),
    st.builds(
        "/ip4/{}/udp/{}/quic-v1".format,
        st.ip_addresses(v=4).map(str),
        st.integers(0, 65535),
    ),
).map(Multiaddr)
infos = st.builds(
    IdentifyInfo,
    protocol_version=st.text(max_size=40),
    agent_version=st.text(max_size=40),
    public_key=st.binary(max_size=80),
    listen_addrs=st.lists(addresses, max_size=6),
    observed_addr=st.none() | addresses,
    protocols=st.lists(st.text(min_size=1, max_size=40), max_size=10),
    signed_peer_record=st.binary(max_size=200),
)


@given(infos)
def test_identify_info_round_trips(info: IdentifyInfo) -> None:
    assert IdentifyInfo.decode(info.encode()) == info
    assert decode_response(encode_response(info)) == info
    assert hash(IdentifyInfo.decode(info.encode())) == hash(info)


@given(st.binary(max_size=600))
def test_identify_garbage_gives_a_message_or_an_identify_error(data: bytes) -> None:
    for decode in (IdentifyInfo.decode, decode_response):
        try:
            info = decode(data)
        except IdentifyError:
            continue
        assert all(isinstance(p, str) for p in info.protocols)
        assert isinstance(info.protocol_version, str) and isinstance(info.agent_version, str)
        assert all(isinstance(a, Multiaddr) for a in info.listen_addrs)


def test_identify_bytes_are_the_spec_message() -> None:
    info = IdentifyInfo(
        protocol_version="ipfs/0.1.0",
        agent_version="qs",
        public_key=b"\x08\x01",
        listen_addrs=[QUIC],
        observed_addr=Multiaddr("/ip4/1.2.3.4/udp/5/quic-v1"),
        protocols=["/ipfs/ping/1.0.0"],
    )
    quic = bytes.fromhex("047f00000191020fa1cd03")
    observed = bytes.fromhex("04010203049102 0005 cd03".replace(" ", ""))
    expected = (
        b"\x0a\x02\x08\x01"  # 1 publicKey
        + b"\x12\x0b" + quic  # 2 listenAddrs
        + b"\x1a\x10/ipfs/ping/1.0.0"  # 3 protocols
        + b"\x22\x0b" + observed  # 4 observedAddr
        + b"\x2a\x0aipfs/0.1.0"  # 5 protocolVersion
        + b"\x32\x02qs"  # 6 agentVersion
    )  # fmt: skip
    assert info.encode() == expected
    assert encode_response(info) == encode_uvarint(len(expected)) + expected


def message(*fields: tuple[int, bytes]) -> bytes:
    """A protobuf message of length-delimited fields, written by hand."""
    return b"".join(bytes([number << 3 | 2]) + encode_frame(value) for number, value in fields)


def test_unparseable_addresses_are_skipped_and_counted() -> None:
    data = message(
        (1, b"key"),
        (2, QUIC.to_bytes()),
        (2, b"\x04\xcc"),  # an ip4 address one byte long
        (2, b"\xff\x01"),  # an unknown protocol code
        (4, b"\x00"),
        (3, b"/ipfs/ping/1.0.0"),
        (3, b"\xff\xfe"),  # not UTF-8: not a protocol id anyone can negotiate
        (8, b"record"),
    )
    info = IdentifyInfo.decode(data)
    assert info.listen_addrs == (QUIC,)
    assert info.observed_addr is None
    assert info.skipped_addrs == 3
    assert info.protocols == ("/ipfs/ping/1.0.0",)
    assert info.signed_peer_record == b"record"


def test_encode_refuses_a_message_peers_would_refuse() -> None:
    info = IdentifyInfo(protocols=[f"/app/{i:05}/1.0.0" for i in range(MAX_MESSAGE_SIZE // 16)])
    with pytest.raises(ValueError, match="fewer listen addresses or protocols"):
        info.encode()


# -- identify: the reply on a stream -------------------------------------------------------------


async def test_send_then_read_identify_round_trip() -> None:
    responder, initiator = stream_pair()
    info = IdentifyInfo(
        protocol_version="ipfs/0.1.0",
        agent_version="quic-supervisor/0.1.0",
        public_key=os.urandom(36),
        listen_addrs=[QUIC, Multiaddr("/ip6/::1/udp/4001/quic-v1")],
        observed_addr=Multiaddr("/ip4/127.0.0.1/udp/53211/quic-v1"),
        protocols=["/ipfs/ping/1.0.0", "/ipfs/id/1.0.0", "/ipfs/id/push/1.0.0"],
    )
    await send_identify(responder, info)
    assert len(responder.writes) == 1  # one write: the length prefix travels with the message
    assert await read_identify(initiator) == info


async def test_read_identify_merges_a_reply_in_parts() -> None:
    """go-libp2p sends a large reply as two messages, the signed peer record alone second."""
    responder, initiator = stream_pair()
    first = IdentifyInfo(public_key=b"key", listen_addrs=[QUIC], protocols=["/a/1"])
    await responder.write(encode_response(first))
    await responder.write(encode_frame(message((8, b"record"))))
    await responder.close()
    got = await read_identify(initiator)
    assert (got.public_key, got.listen_addrs, got.protocols) == (b"key", (QUIC,), ("/a/1",))
    assert got.signed_peer_record == b"record"


async def test_read_identify_accepts_the_legacy_bare_message() -> None:
    responder, initiator = stream_pair()
    info = IdentifyInfo(public_key=os.urandom(36), listen_addrs=[QUIC], protocols=["/a/1"])
    await responder.write(info.encode())
    await responder.close()
    assert await read_identify(initiator) == info


@pytest.mark.parametrize(
    ("wire", "complaint"),
    [
        (b"", "without sending a message"),
        (encode_uvarint(MAX_MESSAGE_SIZE + 1) + b"\x0a", "above the limit"),
        (encode_frame(message((1, b"key")))[:-1], "bytes into a length-prefixed message"),
        (b"".join([encode_frame(b"")] * (MAX_MESSAGES + 1)), f"above the {MAX_MESSAGES}"),
        # Neither framed nor a bare message with the key every legacy sender includes.
        (message((3, b"/a/1")), "nor one bare Identify message with a public key"),
    ],
)
async def test_read_identify_refuses_a_bad_reply(wire: bytes, complaint: str) -> None:
    responder, initiator = stream_pair()
    await responder.write(wire)
    await responder.close()
    with pytest.raises(IdentifyError, match=complaint):
        await read_identify(initiator)


async def test_read_identify_stops_reading_an_endless_reply() -> None:
    responder, initiator = stream_pair()
    await responder.write(b"\x00" * (MAX_MESSAGES * (MAX_MESSAGE_SIZE + 2) + 1))
    with pytest.raises(IdentifyError, match="goes on past"):
        await read_identify(initiator)  # the peer never closed: the bound ends it


async def test_read_identify_times_out_a_silent_peer() -> None:
    _, initiator = stream_pair()
    with pytest.raises(ProtocolTimeoutError, match=re.escape(identify.PROTOCOL)):
        await read_identify(initiator, timeout=0.05)
