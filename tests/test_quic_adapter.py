"""The aioquic adapter: private members it needs, its confinement, and its protocol logic.

The sans-I/O tests drive ``MigratingQuicConnection`` against a real aioquic server connection in
memory: two ``QuicConnection`` objects hand each other datagrams in a loop, no sockets. The
server learns which client path a datagram came from by the client address each path stands for.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicNetworkPath
from aioquic.quic.events import ConnectionTerminated
from aioquic.quic.logger import QuicLogger, QuicLoggerTrace
from aioquic.quic.recovery import QuicPacketRecovery
from aioquic.quic.stream import QuicStream, QuicStreamSender
from aioquic.tls import Context as TlsContext

from actors.quic_adapter import (
    REQUIRED_PRIVATE_MEMBERS,
    InboundQuicConnection,
    MigratingQuicConnection,
    PathAddr,
    follow_rebindings,
)
from tests.rig.aioquic_server import _emulate_peer_transport_parameters
from tests.rig.certs import CertPair

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------ private members


def _instances() -> dict[type, Any]:
    """One live instance per class, so attributes created in ``__init__`` are checked too."""
    quic = QuicConnection(configuration=QuicConfiguration(is_client=True))
    stream = QuicStream(stream_id=0, max_stream_data_local=1024, max_stream_data_remote=1024)
    return {
        QuicConnection: quic,
        QuicNetworkPath: QuicNetworkPath(("127.0.0.1", 4433)),
        QuicStreamSender: stream.sender,
        QuicStream: stream,
        QuicPacketRecovery: quic._loss,
        QuicLogger: QuicLogger(),
        QuicLoggerTrace: QuicLoggerTrace(is_client=True, odcid=b""),
        TlsContext: TlsContext(is_client=True),
    }


def missing_members(required: dict[type, tuple[str, ...]]) -> list[str]:
    """``Class.member`` for every required member found neither on the class nor on a fresh
    instance of it."""
    instances = _instances()
    missing = []
    for cls, names in required.items():
        instance = instances[cls]
        for name in names:
            if not hasattr(cls, name) and not hasattr(instance, name):
                missing.append(f"{cls.__module__}.{cls.__qualname__}.{name}")
    return missing


def test_required_private_members_exist_in_aioquic() -> None:
    import aioquic

    missing = missing_members(REQUIRED_PRIVATE_MEMBERS)
    assert not missing, (
        f"aioquic {aioquic.__version__} lacks private members actors/quic_adapter.py relies on: "
        f"{', '.join(missing)}. The adapter must be ported before this aioquic can be used."
    )


def test_missing_member_check_can_fail() -> None:
    assert missing_members({QuicConnection: ("_no_such_member", "_network_paths")}) == [
        "aioquic.quic.connection.QuicConnection._no_such_member"
    ]
    # Instance attributes count (``_network_paths`` is only set in ``__init__``).
    assert not hasattr(QuicConnection, "_network_paths")


PRIVATE_NAMES = re.compile(
    r"_network_paths|_peer_cid_available|_use_reserved_peer_cid|_retire_peer_cid"
    r"|_add_network_path|_handle_path_response_frame|_send_probing_frames|_loss\._cc"
    # aioquic's ``_loss``/``_streams`` on a QUIC object; our own classes may have a
    # ``self._streams`` of their own (only the adapter subclasses QuicConnection).
    r"|(?<!self)\._loss\b|(?<!self)\._streams\b"
)


def offending_lines(root: Path) -> list[str]:
    out = []
    for package in ("supervisor", "actors", "telemetry"):
        for path in sorted((root / package).rglob("*.py")):
            if path == root / "actors" / "quic_adapter.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if PRIVATE_NAMES.search(line):
                    out.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return out


def test_only_the_adapter_touches_aioquic_privates() -> None:
    offending = offending_lines(ROOT)
    assert not offending, "aioquic private members outside actors/quic_adapter.py:\n" + "\n".join(
        offending
    )


def test_private_name_scan_can_fail(tmp_path: Path) -> None:
    (tmp_path / "actors").mkdir()
    (tmp_path / "supervisor").mkdir()
    (tmp_path / "telemetry").mkdir()
    (tmp_path / "actors" / "quic_adapter.py").write_text("quic._network_paths\n")
    (tmp_path / "supervisor" / "x.py").write_text(
        "self._streams = {}\ncwnd = quic._loss.congestion_window\nn = self._quic._streams\n"
    )
    assert offending_lines(tmp_path) == [
        "supervisor/x.py:2: cwnd = quic._loss.congestion_window",
        "supervisor/x.py:3: n = self._quic._streams",
    ]


# ------------------------------------------------------------------ in-memory pair

SERVER = ("10.0.0.1", 4433)
#: The client address each client path stands for (what the server sees).
CLIENT_ADDRS = {0: ("10.0.0.2", 50000), 1: ("10.0.0.3", 50001), 2: ("10.0.0.4", 50002)}
PATH_OF = {addr: path_id for path_id, addr in CLIENT_ADDRS.items()}


class Pair:
    """A migrating client and a stock aioquic server, exchanging datagrams in memory."""

    def __init__(
        self,
        cert: CertPair,
        *,
        server_setup: Callable[[QuicConnection], None] | None = None,
        client_class: type[QuicConnection] = MigratingQuicConnection,
    ) -> None:
        client_config = QuicConfiguration(is_client=True, alpn_protocols=["echo"])
        client_config.verify_mode = ssl.CERT_NONE
        self.client: Any = client_class(configuration=client_config)
        server_config = QuicConfiguration(
            is_client=False, alpn_protocols=["echo"], quic_logger=QuicLogger()
        )
        server_config.load_cert_chain(str(cert.certfile), str(cert.keyfile))
        self.server = QuicConnection(
            configuration=server_config,
            original_destination_connection_id=self.client.original_destination_connection_id,
        )
        if server_setup is not None:
            server_setup(self.server)
        self.now = 0.0
        #: Every datagram the client sent: (path id, destination, data).
        self.client_sent: list[tuple[int | None, tuple[Any, ...], bytes]] = []
        #: Every datagram the server sent: (destination, data).
        self.server_sent: list[tuple[tuple[Any, ...], bytes]] = []
        #: Paths whose datagrams are lost in the server->client direction.
        self.drop_to_client: set[int] = set()

    def connect(self) -> None:
        if isinstance(self.client, MigratingQuicConnection):
            self.client.connect(PathAddr(SERVER, 0), now=self.now)
            self.client.attach_initial_path(0)
        else:
            self.client.connect(SERVER, now=self.now)
        self.pump()
        assert self.client._handshake_confirmed, "handshake did not complete in memory"

    def deliver_client(self, datagrams: list[tuple[bytes, Any]]) -> None:
        for data, addr in datagrams:
            path_id = getattr(addr, "path_id", None)
            self.client_sent.append((path_id, tuple(addr), data))
            if tuple(addr) != SERVER:
                continue  # sent elsewhere (e.g. a preferred address): nobody listens
            self.server.receive_datagram(data, CLIENT_ADDRS[path_id or 0], self.now)

    def pump(self, rounds: int = 50, step: float = 0.001) -> None:
        """Exchange datagrams (and run due timers) until both sides are quiet."""
        for _ in range(rounds):
            self.now += step
            for conn in (self.client, self.server):
                timer = conn.get_timer()
                if timer is not None and timer <= self.now:
                    conn.handle_timer(self.now)
            moved = False
            out = self.client.datagrams_to_send(self.now)
            moved |= bool(out)
            self.deliver_client(out)
            for data, addr in self.server.datagrams_to_send(self.now):
                moved = True
                self.server_sent.append((tuple(addr), data))
                path_id = PATH_OF[tuple(addr)]
                if path_id in self.drop_to_client:
                    continue
                remote: Any = SERVER
                if isinstance(self.client, MigratingQuicConnection):
                    remote = PathAddr(SERVER, path_id)
                self.client.receive_datagram(data, remote, self.now)
            if not moved:
                return

    def server_events(self) -> list[Any]:
        out = []
        while (event := self.server.next_event()) is not None:
            out.append(event)
        return out


def _short_header_dcid(data: bytes, length: int) -> bytes:
    assert not data[0] & 0x80, "expected a 1-RTT (short header) packet"
    return data[1 : 1 + length]


def _probe(pair: Pair, path_id: int) -> None:
    client: MigratingQuicConnection = pair.client
    if not client.has_path(path_id):
        client.add_path(path_id, SERVER)
    assert client.reserve_peer_cid(path_id)
    pair.deliver_client(client.emit_challenge(path_id, pair.now))
    pair.pump()
    responses = client.take_path_responses()
    assert [r.path_id for r in responses] == [path_id]
    assert client.is_path_validated(path_id)


def test_each_path_sends_with_its_own_peer_cid(cert: CertPair) -> None:
    pair = Pair(cert)
    pair.connect()
    client: MigratingQuicConnection = pair.client
    spare_before = client.spare_peer_cids
    assert spare_before >= 2
    _probe(pair, 1)
    _probe(pair, 2)
    cids = client.path_cids()
    assert len(set(cids.values())) == 3 and None not in cids.values(), cids
    assert client.spare_peer_cids == spare_before - 2
    # On the wire: every datagram of a path carries that path's DCID, and only that path's.
    length = len(cids[0] or b"")
    for path_id in (1, 2):
        sent = [d for pid, _, d in pair.client_sent if pid == path_id]
        assert sent
        assert {_short_header_dcid(d, length) for d in sent} == {cids[path_id]}
    # A switch keeps them distinct: the old path keeps its CID, the new one brings its own.
    client.switch_path(1, pair.now, seed_rtt=0.001, ping_uid=1)
    pair.pump()
    after = client.path_cids()
    assert len(set(after.values())) == 3
    assert after[1] == cids[1] and after[0] == cids[0]


def test_probes_stay_out_of_congestion_control_and_rtt(cert: CertPair) -> None:
    pair = Pair(cert)
    pair.connect()
    client: MigratingQuicConnection = pair.client
    client.add_path(1, SERVER)
    assert client.reserve_peer_cid(1)
    rtt_before = client.smoothed_rtt
    cwnd_before = client.congestion_window
    in_flight_before = client.bytes_in_flight
    challenge = client.emit_challenge(1, pair.now)
    assert len(challenge) == 1 and len(challenge[0][0]) >= 1200  # padded (RFC 9000 §8.2.1)
    assert client.bytes_in_flight == in_flight_before
    # The answer comes back late: 400 ms, far above the active path's RTT.
    pair.now += 0.4
    pair.deliver_client(challenge)
    pair.pump()
    [response] = client.take_path_responses()
    assert response.rtt == pytest.approx(0.4, abs=0.01)
    assert client.smoothed_rtt == rtt_before
    assert client.congestion_window == cwnd_before
    assert client.bytes_in_flight == in_flight_before
    # aioquic did not migrate by itself on validation.
    assert client.active_path_id == 0


def test_switch_starts_fresh_rtt_and_congestion_state(cert: CertPair) -> None:
    pair = Pair(cert)
    pair.connect()
    client: MigratingQuicConnection = pair.client
    # Grow the handshake path's congestion window with some data.
    stream_id = client.get_next_available_stream_id()
    client.send_stream_data(stream_id, b"x" * 200_000)
    pair.pump(rounds=400)
    grown_cwnd = client.congestion_window
    old_rtt = client.smoothed_rtt
    assert old_rtt is not None
    fresh = MigratingQuicConnection(configuration=QuicConfiguration(is_client=True))
    assert grown_cwnd > fresh.congestion_window
    _probe(pair, 1)
    client.send_stream_data(stream_id, b"y" * 50_000)
    pair.deliver_client(client.datagrams_to_send(pair.now))  # in flight on the old path
    assert client.bytes_in_flight > 0
    server_peer_before = pair.server._network_paths[0].addr
    token = client.switch_path(1, pair.now, seed_rtt=0.002, ping_uid=7)
    assert client.active_path_id == 1
    assert client.smoothed_rtt is None  # no sample yet on the new path
    assert client.congestion_window == fresh.congestion_window
    assert client.bytes_in_flight == 0  # old path's flight is not charged to the new path
    assert token.from_path == 0 and token.to_path == 1
    pair.pump(rounds=200)
    assert client.smoothed_rtt is not None  # first samples of the new path
    # The server followed us to the new address; nothing was declared lost wholesale.
    assert server_peer_before == CLIENT_ADDRS[0]
    assert pair.server._network_paths[0].addr == CLIENT_ADDRS[1]
    assert client.last_non_probing_rx(1) is not None
    # The server validated our new address: its PATH_CHALLENGE was answered from that socket.
    assert pair.server._network_paths[0].is_validated
    answered = [d for pid, _, d in pair.client_sent[-20:] if pid == 1]
    assert answered


def test_rollback_restores_the_old_path(cert: CertPair) -> None:
    pair = Pair(cert)
    pair.connect()
    client: MigratingQuicConnection = pair.client
    _probe(pair, 1)
    before = (
        client.active_path_id,
        client.smoothed_rtt,
        client.congestion_window,
        client.path_cid_sequences(),
    )
    pair.drop_to_client.add(1)  # the peer never reaches us on the new path
    token = client.switch_path(1, pair.now, seed_rtt=0.002, ping_uid=1)
    pair.pump()
    assert client.last_non_probing_rx(1) is None
    client.rollback_switch(token, pair.now, ping_uid=2)
    assert client.active_path_id == 0
    assert client.smoothed_rtt == before[1]
    assert client.congestion_window == before[2]
    assert client.path_cid_sequences() == before[3]
    pair.drop_to_client.clear()
    pair.pump(rounds=300)
    # The server is back on the old address and the connection still carries data.
    assert pair.server._network_paths[0].addr == CLIENT_ADDRS[0]
    stream_id = client.get_next_available_stream_id()
    client.send_stream_data(stream_id, b"ping", end_stream=True)
    pair.pump()
    assert any(getattr(e, "data", None) == b"ping" for e in pair.server_events())
    assert not any(isinstance(e, ConnectionTerminated) for e in pair.server_events())


def _advertise_preferred_address(server: QuicConnection) -> None:
    _emulate_peer_transport_parameters(
        server, disable_active_migration=False, preferred_address=("10.0.0.9", 4434)
    )


def test_preferred_address_is_ignored(cert: CertPair) -> None:
    # Control: a stock aioquic 1.7 client goes to the advertised preferred address by itself.
    stock = Pair(cert, server_setup=_advertise_preferred_address, client_class=QuicConnection)
    stock.connect()
    stock.pump(rounds=100)
    assert any(dest == ("10.0.0.9", 4434) for _, dest, _ in stock.client_sent)

    pair = Pair(cert, server_setup=_advertise_preferred_address)
    pair.connect()
    pair.pump(rounds=100)
    _probe(pair, 1)
    assert {dest for _, dest, _ in pair.client_sent} == {SERVER}
    assert pair.client._remote_preferred_address is None


def test_disable_active_migration_is_detected(cert: CertPair) -> None:
    plain = Pair(cert)
    plain.connect()
    assert plain.client.peer_disabled_active_migration is False

    def disable(server: QuicConnection) -> None:
        _emulate_peer_transport_parameters(
            server, disable_active_migration=True, preferred_address=None
        )

    pair = Pair(cert, server_setup=disable)
    pair.connect()
    assert pair.client.peer_disabled_active_migration is True


def test_standby_probe_is_a_probing_packet_at_the_server(cert: CertPair) -> None:
    pair = Pair(cert)
    pair.connect()
    trace = pair.server._quic_logger
    start = len(trace._events)
    _probe(pair, 1)
    events = list(trace._events)[start:]
    # The server received, from the probed address, only PATH_CHALLENGE + PADDING: it must not
    # treat the standby address as a migration (its active path is unchanged).
    received = [
        [f["frame_type"] for f in e["data"]["frames"]]
        for e in events
        if e["name"] == "transport:packet_received"
    ]
    assert ["path_challenge", "padding"] in [sorted(set(r), key=r.index) for r in received]
    assert pair.server._network_paths[0].addr == CLIENT_ADDRS[0]


def test_a_response_on_another_socket_validates_the_probed_path(cert: CertPair) -> None:
    """RFC 9000 §8.2.2-8.2.3: the initiator must not require the response on the probed path."""
    pair = Pair(cert)
    pair.connect()
    client: MigratingQuicConnection = pair.client
    client.add_path(1, SERVER)
    client.add_path(2, SERVER)
    assert client.reserve_peer_cid(1)
    [(challenge, _)] = client.emit_challenge(1, pair.now)
    pair.server.receive_datagram(challenge, CLIENT_ADDRS[1], pair.now)
    [(response, dest)] = pair.server.datagrams_to_send(pair.now)
    assert dest == CLIENT_ADDRS[1]
    # It reaches us on path 2's socket instead (msquic answers on its active path).
    client.receive_datagram(response, PathAddr(SERVER, 2), pair.now)
    [answer] = client.take_path_responses()
    assert answer.path_id == 1 and answer.asymmetric
    assert client.asymmetric_responses == 1
    assert client.is_path_validated(1) and not client.is_path_validated(2)
    # One on the probed socket is not flagged.
    pair.deliver_client(client.emit_challenge(1, pair.now))
    pair.pump()
    [answer] = client.take_path_responses()
    assert answer.path_id == 1 and not answer.asymmetric


def test_unanswered_challenges_are_bounded_per_path(cert: CertPair) -> None:
    """A standby path that never answers its keep-alives must not grow memory for ever."""
    from actors.quic_adapter import MAX_OUTSTANDING_CHALLENGES

    pair = Pair(cert)
    pair.connect()
    client: MigratingQuicConnection = pair.client
    client.add_path(1, SERVER)
    assert client.reserve_peer_cid(1)
    for i in range(100):
        assert client.emit_challenge(1, pair.now + i)  # never delivered: never answered
    outstanding = [c for c, (pid, _) in client._challenge_sent_at.items() if pid == 1]
    assert len(outstanding) == MAX_OUTSTANDING_CHALLENGES


# ------------------------------------------------------------------ a flush only when it may send


def test_an_ack_of_an_idle_ping_leaves_nothing_to_send(cert: CertPair) -> None:
    """Half the datagrams of a node at rest are ACKs of its idle keep-alive PINGs: after one,
    nothing is queued, so the connection may skip building packets (bench B4: a third of its
    CPU at rest). Anything that may have queued something says so."""
    pair = Pair(cert)
    pair.connect()
    client = pair.client
    pair.now += 1.0
    client.send_ping(7)
    pair.deliver_client(client.datagrams_to_send(pair.now))
    pair.now += 0.03  # past the server's ACK delay
    pair.server.handle_timer(pair.now)
    answers = pair.server.datagrams_to_send(pair.now)
    assert answers  # the server's ACK of the PING
    for data, _addr in answers:
        client.receive_datagram(data, PathAddr(SERVER, 0), pair.now)
    assert client.receive_needs_send() is False
    assert client.datagrams_to_send(pair.now) == []  # what the skipped flush would have found

    # Data queued meanwhile (a write between two receipts) is something to send.
    stream_id = client.get_next_available_stream_id()
    client.send_stream_data(stream_id, b"x" * 100)
    assert client.receive_needs_send() is True


def test_an_ack_eliciting_receipt_or_a_loss_needs_a_send(cert: CertPair) -> None:
    """A PING from the peer must be acknowledged; a packet declared lost by an ACK has its
    frames queued again: both need the flush."""
    pair = Pair(cert)
    pair.connect()
    client = pair.client
    pair.now += 1.0
    pair.server.send_ping(1)
    for data, _addr in pair.server.datagrams_to_send(pair.now):
        client.receive_datagram(data, PathAddr(SERVER, 0), pair.now)
    assert client.receive_needs_send() is True
    pair.pump()

    # Two stream writes; the first datagram is lost, the ACK of the later ones declares it
    # lost (packet threshold): its data is queued again.
    stream_id = client.get_next_available_stream_id()
    sent = []
    for i in range(5):
        client.send_stream_data(stream_id, bytes([i]) * 1000)
        sent += client.datagrams_to_send(pair.now)
        pair.now += 0.001
    pair.deliver_client(sent[1:])  # sent[0] never arrives
    pair.server.handle_timer(pair.now + 0.03)
    acks = pair.server.datagrams_to_send(pair.now + 0.03)
    assert acks
    for data, _addr in acks:
        client.receive_datagram(data, PathAddr(SERVER, 0), pair.now + 0.03)
    assert client.receive_needs_send() is True
    again = client.datagrams_to_send(pair.now + 0.03)
    assert again  # the lost data, sent again


# ------------------------------------------------------------------ inbound: NAT rebinding

#: Where the client's datagrams come from after its NAT forgot the mapping.
REBOUND = ("10.0.0.9", 61000)


def _sent_packets(trace: Any, start: int) -> list[tuple[str, list[str]]]:
    """(DCID, frame types) of each packet the server's qlog recorded as sent since `start`."""
    return [
        (e["data"]["header"].get("dcid", ""), [f["frame_type"] for f in e["data"]["frames"]])
        for e in list(trace._events)[start:]
        if e["name"] == "transport:packet_sent"
    ]


@pytest.mark.parametrize("follow", [True, False], ids=["inbound", "stock"])
def test_a_rebound_peer_gets_a_fresh_cid_and_a_challenge_first(
    cert: CertPair, follow: bool
) -> None:
    """The client's address changes under the same CID while the server's congestion window is
    full and an ACK is due. `InboundQuicConnection` (what the listener's connections become)
    sends its first packet to the new address with a CID never used before, carrying a
    PATH_CHALLENGE; stock aioquic keeps the old CID and sends an ACK-only packet first."""
    setup = follow_rebindings if follow else None
    pair = Pair(cert, server_setup=setup, client_class=QuicConnection)
    pair.connect()
    server: Any = pair.server
    assert isinstance(server, InboundQuicConnection) is follow
    stream_id = pair.client.get_next_available_stream_id()
    pair.client.send_stream_data(stream_id, b"hello")
    pair.pump()  # the client's spare CIDs have reached the server
    trace = server._quic_logger
    used_before = {dcid for dcid, _ in _sent_packets(trace, 0)}
    # The server fills its congestion window towards the old address; nothing is acked.
    server.send_stream_data(stream_id, b"x" * 2_000_000)
    loss = server._loss
    while loss.congestion_window - loss.bytes_in_flight >= server._max_datagram_size:
        pair.now += 0.001  # past the pacer
        server.datagrams_to_send(pair.now)
    start = len(trace._events)
    # The rebound client sends (ack-eliciting) from its new address; its ACK becomes due.
    pair.client.send_stream_data(stream_id, b"more")
    for data, _ in pair.client.datagrams_to_send(pair.now):
        server.receive_datagram(data, REBOUND, pair.now)
    pair.now += 0.05
    out = server.datagrams_to_send(pair.now)
    assert out and {addr for _, addr in out} == {REBOUND}
    first_dcid, first_frames = _sent_packets(trace, start)[0]
    if follow:
        assert "path_challenge" in first_frames, first_frames
        assert first_dcid not in used_before, (first_dcid, used_before)
        assert server.rebinds_followed == 1
        # The client answers on the new address and the server validates it.
        for data, _ in out:
            pair.client.receive_datagram(data, SERVER, pair.now)
        for data, _ in pair.client.datagrams_to_send(pair.now):
            server.receive_datagram(data, REBOUND, pair.now)
        assert server._network_paths[0].addr == REBOUND
        assert server._network_paths[0].is_validated
    else:
        assert first_frames == ["ack"], first_frames
        assert first_dcid in used_before


def test_follow_rebindings_leaves_clients_and_subclasses_alone() -> None:
    client = QuicConnection(configuration=QuicConfiguration(is_client=True))
    follow_rebindings(client)
    assert type(client) is QuicConnection
    ours = MigratingQuicConnection(configuration=QuicConfiguration(is_client=True))
    follow_rebindings(ours)
    assert type(ours) is MigratingQuicConnection
