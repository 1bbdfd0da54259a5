"""The one module that reaches into aioquic's private members (aioquic 1.7.x).

aioquic 1.7 keys network paths by remote address only and hands datagrams back as ``(data, addr)``
with no local socket. We give every local socket a path id and wrap the peer address in a
:class:`PathAddr` that compares equal only within the same path: aioquic then keeps one network
path per local socket, reserves a peer CID per path, and answers challenges on the path they came
in on. Everything else this project needs from aioquic's internals is behind
:class:`MigratingQuicConnection`, whose methods are sans-I/O (they take ``now`` and return
datagrams) so the protocol logic can be tested without sockets.

``REQUIRED_PRIVATE_MEMBERS`` lists what we touch; ``tests/test_quic_adapter.py`` fails loudly
when an aioquic release removes one of them.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aioquic.buffer import Buffer
from aioquic.quic import events as quic_events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.congestion.base import K_GRANULARITY, create_congestion_control
from aioquic.quic.connection import (
    MAX_STREAM_DATA_FRAME_CAPACITY,
    NetworkAddress,
    QuicConnection,
    QuicConnectionId,
    QuicNetworkPath,
    QuicReceiveContext,
)
from aioquic.quic.logger import QuicLogger, QuicLoggerTrace
from aioquic.quic.packet import (
    QuicFrameType,
    QuicPacketType,
    QuicTransportParameters,
    pull_quic_transport_parameters,
)
from aioquic.quic.packet_builder import QuicPacketBuilder, QuicPacketBuilderStop, QuicSentPacket
from aioquic.quic.recovery import QuicPacketPacer, QuicPacketRecovery
from aioquic.quic.stream import QuicStream, QuicStreamSender
from aioquic.tls import Context as TlsContext
from aioquic.tls import Epoch
from cryptography.hazmat.primitives.serialization import Encoding

# Unanswered challenges remembered per path (late answers still count as proof of life).
MAX_OUTSTANDING_CHALLENGES = 8

# aioquic evicts a path silently beyond this many (MAX_NETWORK_PATHS); we refuse before that.
AIOQUIC_MAX_NETWORK_PATHS = 8

#: Private members of aioquic this module depends on, checked by the adapter test.
REQUIRED_PRIVATE_MEMBERS: dict[type, tuple[str, ...]] = {
    QuicConnection: (
        "_network_paths",
        "_peer_cid",
        "_peer_cid_available",
        "_use_reserved_peer_cid",
        "_retire_peer_cid",
        "_retire_connection_ids",
        "_handshake_confirmed",
        "_remote_preferred_address",
        "_handle_path_response_frame",
        "_write_path_challenge_frame",
        "_write_path_response_frame",
        "_send_probing_frames",
        "_flush_builder",
        "_parse_transport_parameters",
        "_payload_received",
        "_loss",
        "_spaces",
        "_cryptos",
        "_packet_number",
        "_max_datagram_size",
        "_spin_bit",
        "_streams",
        "_close_pending",
        "_write_stream_limits",
        "_on_max_stream_data_delivery",
        "_on_max_stream_data_delivery",
        "_quic_logger",
        "_version",
        "_close_at",
        "_close_pending",
        "_idle_timeout",
        "_remote_max_idle_timeout",
        # receive_needs_send: what a flush would find queued
        "_ping_pending",
        "_probe_pending",
        "_datagrams_pending",
        "_handshake_done_pending",
        "_streams_blocked_pending",
        "_host_cids",
        # libp2p TLS (DESIGN §9): the server asks for the client's certificate when TLS starts
        "_initialize",
    ),
    # libp2p TLS: aioquic keeps the peer's certificates on its TLS context only, and asks a
    # client for one only through a flag "for test purposes".
    TlsContext: ("_peer_certificate", "_peer_certificate_chain", "_request_client_certificate"),
    QuicNetworkPath: (
        "peer_cid",
        "is_validated",
        "local_challenges",
        "local_challenge_sent",
        "remote_challenges",
        "bytes_sent",
    ),
    QuicStreamSender: ("_buffer", "buffer_is_empty", "reset_pending"),
    QuicStream: (
        "max_stream_data_local",
        "max_stream_data_local_sent",
        "receiver",
        "sender",
        "stream_id",
        "is_finished",
    ),
    QuicPacketRecovery: (
        "spaces",
        "_cc",
        "_pacer",
        "_pto_count",
        "_rtt_initial",
        "_rtt_initialized",
        "_rtt_latest",
        "_rtt_min",
        "_rtt_smoothed",
        "_rtt_variance",
        "_rtt_first_sample_time",
        "_on_packets_lost",
        "on_ack_received",
        "get_probe_timeout",
    ),
    QuicLogger: ("_traces",),
    QuicLoggerTrace: ("_events",),
}


class PathAddr(tuple):
    """A peer address that also names the local path it is reached through.

    aioquic compares and hashes addresses to find a network path; including the path id makes
    the same server address reached from two local sockets two distinct aioquic paths.
    """

    path_id: int

    def __new__(cls, addr: NetworkAddress, path_id: int) -> PathAddr:
        obj = super().__new__(cls, tuple(addr))
        obj.path_id = path_id
        return obj

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, PathAddr)
            and other.path_id == self.path_id
            and tuple.__eq__(self, other)
        )

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return hash((tuple(self), self.path_id))

    def __reduce__(self) -> tuple[Any, ...]:
        return (PathAddr, (tuple(self), self.path_id))

    @property
    def sockaddr(self) -> tuple[Any, ...]:
        """The plain tuple to hand to ``sendto``."""
        return tuple(self)


@dataclass(frozen=True, slots=True)
class PathResponse:
    """A PATH_RESPONSE that answered one of our challenges (RFC 9000 §8.2.3: on any path).

    ``asymmetric``: it arrived on another socket than the probed one (msquic answers on its
    active path), so ``rtt`` crossed two paths and nothing proves the return direction of
    the probed path yet: the switch confirmation does that."""

    path_id: int
    rtt: float
    time: float
    asymmetric: bool = False


@dataclass(slots=True)
class _CongestionContext:
    """Loss-recovery state that belongs to one path (RFC 9000 §9.4)."""

    cc: Any
    pacer: QuicPacketPacer
    rtt: dict[str, Any]
    pto_count: int


_RTT_FIELDS = (
    "_rtt_first_sample_time",
    "_rtt_initial",
    "_rtt_initialized",
    "_rtt_latest",
    "_rtt_min",
    "_rtt_smoothed",
    "_rtt_variance",
)


@dataclass(slots=True)
class SwitchToken:
    """What a switch changed, kept until the peer confirms it or we roll it back."""

    from_path: int
    to_path: int
    old_context: _CongestionContext
    first_packet_number: int
    cid_sequence_before: int | None
    cid_sequence_after: int | None
    packets_on_new_path: list[QuicSentPacket] = field(default_factory=list)


class StreamCredit:
    """Receive credit per stream bounded by what the application has not read yet.

    aioquic raises a stream's credit (MAX_STREAM_DATA) as bytes arrive, doubling it, whether
    or not anyone reads them: a slow reader lets the peer fill memory without bound. Here the
    credit of a bounded stream is at most ``consumed + limit`` (consumed: bytes the application
    read), so at most ``limit`` unread bytes can ever be buffered; it is raised once half the
    window was read. Streams nobody called :meth:`set_backlog` for keep aioquic's rule.
    """

    def __init__(self, quic: QuicConnection) -> None:
        self._quic = quic
        self._backlog: dict[int, int] = {}
        self._limit: dict[int, int] = {}

    @classmethod
    def attach(cls, quic: QuicConnection) -> StreamCredit:
        """Bound the streams of a stock aioquic connection (the server side's)."""
        credit = cls(quic)
        original = quic._write_stream_limits

        def write_stream_limits(builder: QuicPacketBuilder, space: Any, stream: Any) -> None:
            if not credit.write_limits(builder, stream):
                original(builder=builder, space=space, stream=stream)

        quic._write_stream_limits = write_stream_limits  # type: ignore[method-assign]
        return credit

    def set_backlog(self, stream_id: int, backlog: int, limit: int, *, due: bool = True) -> bool:
        """Record a stream's unread bytes and bound; True when new credit is due.

        ``due=False`` only records (for bytes just received: they grow the backlog and the
        received offset alike, so no credit can have become due; saves a check per datagram).
        """
        stream = self._quic._streams.get(stream_id)
        if stream is None:  # discarded by aioquic: nothing more will arrive
            self._backlog.pop(stream_id, None)
            self._limit.pop(stream_id, None)
            return False
        self._backlog[stream_id] = backlog
        self._limit[stream_id] = limit
        return due and self._raised(stream) is not None

    def _raised(self, stream: QuicStream) -> int | None:
        """The new credit limit when it is due, else None."""
        sid = stream.stream_id
        assert sid is not None
        limit = self._limit[sid]
        consumed = stream.receiver.starting_offset() - self._backlog.get(sid, 0)
        if stream.max_stream_data_local - consumed > limit // 2:
            return None
        target = consumed + limit
        return target if target > stream.max_stream_data_local else None

    def write_limits(self, builder: QuicPacketBuilder, stream: QuicStream) -> bool:
        """Write MAX_STREAM_DATA when due; False for a stream this does not bound."""
        if stream.stream_id not in self._limit or not stream.max_stream_data_local:
            return False
        raised = self._raised(stream)
        if raised is not None:
            stream.max_stream_data_local = raised
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            quic = self._quic
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=quic._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local
            if quic._quic_logger is not None and builder.quic_logger_frames is not None:
                builder.quic_logger_frames.append(
                    quic._quic_logger.encode_max_stream_data_frame(
                        maximum=stream.max_stream_data_local, stream_id=stream.stream_id
                    )
                )
        return True


class InboundQuicConnection(QuicConnection):
    """A server-side connection that follows a NAT rebinding with a fresh peer CID.

    After a NAT rebinding the client keeps its CID, and aioquic's server then sends to the new
    address with the peer CID it used on the old one: RFC 9000 §9.5 permits that, but it links
    the two addresses for an observer, and the interop runner's ``rebind-*`` cases fail it. So
    whenever the active peer address changed since the last send while the peer kept its CID
    (had it changed CIDs, aioquic switched already), the next CID the peer issued is taken
    before anything is sent to the new address, and a probe is queued: with the congestion
    window full, aioquic would otherwise send an ACK-only packet there first and the
    PATH_CHALLENGE only later; a probe may exceed the window by one datagram (RFC 9002 §7.5),
    so the challenge (written before the probe's PING) leaves in the first packet.

    ``QuicServer`` builds each ``QuicConnection`` itself (no factory hook), so a stock one is
    adopted (`follow_rebindings`) before it receives anything; hence the state is in
    class-level defaults and there is no ``__init__``.
    """

    #: Active peer address, and the CID the peer sends to, at the last send.
    last_sent_peer: NetworkAddress | None = None
    last_sent_host_cid: bytes | None = None
    #: Rebindings followed (peer CID changed, challenge pushed through).
    rebinds_followed: int = 0
    #: Ask the client for its certificate (libp2p's mutual TLS); set before any datagram.
    asks_client_certificate: bool = False

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)  # makes self.tls, on the client's first Initial
        if self.asks_client_certificate:
            self.tls._request_client_certificate = True

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        peer = self.get_peer_address()
        if (
            self._handshake_confirmed
            and self.last_sent_peer is not None
            and peer is not None
            and peer != self.last_sent_peer
            and self.host_cid == self.last_sent_host_cid
        ):
            self.change_connection_id()  # a no-op when the peer issued no spare CID
            self._probe_pending = True
            self.rebinds_followed += 1
        datagrams = super().datagrams_to_send(now)
        if peer is not None:
            self.last_sent_peer = peer
            self.last_sent_host_cid = self.host_cid
        return datagrams


def ask_client_certificate(quic: QuicConnection) -> None:
    """Make a server-side connection (adopted by `follow_rebindings`, nothing received yet)
    request the client's certificate: libp2p's TLS handshake is mutual (DESIGN §9). A client
    that sends none is still let through by aioquic; the caller checks what arrived."""
    if not isinstance(quic, InboundQuicConnection):
        raise TypeError("only an adopted server-side connection can ask for a certificate")
    quic.asks_client_certificate = True


def peer_certificate_chain(quic: QuicConnection) -> tuple[bytes, ...]:
    """The peer's certificates as its handshake sent them (DER, its own first); empty before
    the handshake or when it sent none. libp2p TLS checks them itself, with no CA."""
    tls: TlsContext | None = getattr(quic, "tls", None)
    if tls is None or tls._peer_certificate is None:
        return ()
    chain = [tls._peer_certificate, *tls._peer_certificate_chain]
    return tuple(cert.public_bytes(Encoding.DER) for cert in chain)


def follow_rebindings(quic: QuicConnection) -> None:
    """Make a stock server-side connection that has not yet received anything an
    `InboundQuicConnection` (same object and state, one more rule). Clients and subclasses
    (ours, the rig's) are left alone."""
    if type(quic) is QuicConnection and not quic.configuration.is_client:
        quic.__class__ = InboundQuicConnection


class MigratingQuicConnection(QuicConnection):
    """aioquic's QuicConnection with client-side, per-socket path management.

    Probes (PATH_CHALLENGE) are built here, outside loss recovery: they do not feed the active
    path's congestion controller or RTT estimator, and are retried by the caller with fresh data
    rather than retransmitted.
    """

    # Our own state lives in slots, not in the instance dict: aioquic's 84 attributes fill
    # a dict table exactly, and 11 more doubled it (1.6 -> 3.3 KiB per connection, bench B4).
    __slots__ = (
        "_asymmetric_responses",
        "_challenge_sent_at",
        "_credit",
        "_ka_for",
        "_last_non_probing_rx",
        "_last_rx",
        "_path_responses",
        "_rtt_floor_packet_number",
        "_rx_eliciting",
        "_rx_keeps_alive",
        "_rx_lost",
        "peer_disabled_active_migration",
        "preferred_address",
    )

    def __init__(self, *, configuration: QuicConfiguration, **kwargs: Any) -> None:
        super().__init__(configuration=configuration, **kwargs)
        self.peer_disabled_active_migration = False
        self._challenge_sent_at: dict[bytes, tuple[int, float]] = {}
        self._path_responses: list[PathResponse] = []
        self._asymmetric_responses = 0
        self._ka_for: float | None = None  # the idle deadline a keep-alive PING was sent for
        #: The server's preferred address (RFC 9000 §9.6) in the dialled family, unfollowed.
        self.preferred_address: tuple[str, int] | None = None
        # Last time a non-probing packet arrived on each path: the proof the peer uses a path.
        self._last_non_probing_rx: dict[int, float] = {}
        # Last time any authenticated packet arrived on each path (liveness of the active path).
        self._last_rx: dict[int, float] = {}
        self._rx_keeps_alive = False
        # What the datagram being received asked of us (see receive_needs_send).
        self._rx_eliciting = False
        self._rx_lost = False
        # Packet numbers below this were sent before the last switch: their ACKs must not feed
        # the new path's RTT estimator.
        self._rtt_floor_packet_number = 0
        original_on_ack = self._loss.on_ack_received

        def on_ack_received(**kwargs: Any) -> None:
            largest = kwargs["ack_rangeset"].bounds().stop - 1
            if largest >= self._rtt_floor_packet_number:
                original_on_ack(**kwargs)
                return
            before = {name: getattr(self._loss, name) for name in _RTT_FIELDS}
            original_on_ack(**kwargs)
            for name, value in before.items():
                setattr(self._loss, name, value)

        self._loss.on_ack_received = on_ack_received  # type: ignore[method-assign]
        original_lost = self._loss._on_packets_lost

        def on_packets_lost(**kwargs: Any) -> None:
            if kwargs["packets"]:  # aioquic calls it after every ACK, mostly with none
                self._rx_lost = True  # their frames are queued again: something to send
            original_lost(**kwargs)

        self._loss._on_packets_lost = on_packets_lost  # type: ignore[method-assign]
        self._credit = StreamCredit(self)

    # ----------------------------------------------------------------- aioquic overrides

    def _parse_transport_parameters(self, data: bytes, from_session_ticket: bool = False) -> None:
        super()._parse_transport_parameters(data, from_session_ticket)
        params: QuicTransportParameters = pull_quic_transport_parameters(Buffer(data=data))
        if not from_session_ticket:
            self.peer_disabled_active_migration = bool(params.disable_active_migration)
        # aioquic 1.7 would migrate to the server's preferred address by itself; we never do:
        # the offer is kept (RFC 9000 §9.6) for a policy to follow, or not.
        offer = self._remote_preferred_address
        if offer is not None and self._network_paths:
            v6 = ":" in str(self._network_paths[0].addr[0])
            raw = offer.ipv6_address if v6 else offer.ipv4_address
            self.preferred_address = (str(raw[0]), int(raw[1])) if raw is not None else None
        self._remote_preferred_address = None

    def _handle_path_response_frame(
        self, context: QuicReceiveContext, frame_type: int, buf: Buffer
    ) -> None:
        data = buf.pull_bytes(8)
        if self._quic_logger is not None:
            context.quic_logger_frames.append(  # type: ignore[union-attr]
                self._quic_logger.encode_path_response_frame(data=data)
            )
        sent = self._challenge_sent_at.get(data)
        if sent is None:
            # Unknown or stale response: ignored, its challenge may have been dropped (§19.18).
            return
        path_id, sent_at = sent
        arrived_on = getattr(context.network_path.addr, "path_id", None)
        try:
            probed = self._path(path_id)
        except KeyError:
            return  # the probed path was closed meanwhile
        # RFC 9000 §8.2.2/§9.3.3: the initiator MUST NOT require the response on the probed
        # path; §8.2.3: a matching response on any path validates the path probed.
        asymmetric = arrived_on != path_id
        if asymmetric:
            self._asymmetric_responses += 1
        del self._challenge_sent_at[data]
        probed.is_validated = True
        probed.local_challenges.clear()
        for challenge in [c for c, (pid, _) in self._challenge_sent_at.items() if pid == path_id]:
            del self._challenge_sent_at[challenge]
        # Deliberately no auto-migration here (aioquic migrates to validated reserved paths).
        self._path_responses.append(
            PathResponse(
                path_id=path_id,
                rtt=max(context.time - sent_at, 0.0),
                time=context.time,
                asymmetric=asymmetric,
            )
        )

    def _send_probing_frames(
        self, network_path: QuicNetworkPath, now: float
    ) -> list[tuple[bytes, NetworkAddress]]:
        # Called by datagrams_to_send for non-active paths: only PATH_RESPONSEs leave here;
        # challenges are emitted on request through emit_challenge().
        return self._build_probe(network_path, now, challenge=None)

    def _payload_received(
        self, context: QuicReceiveContext, plain: bytes, crypto_frame_required: bool = False
    ) -> tuple[bool, bool]:
        is_ack_eliciting, is_probing = super()._payload_received(
            context, plain, crypto_frame_required=crypto_frame_required
        )
        if is_ack_eliciting:
            self._rx_eliciting = True
        path_id = getattr(context.network_path.addr, "path_id", None)
        if path_id is not None:
            self._last_rx[path_id] = context.time
            if not is_probing:
                self._last_non_probing_rx[path_id] = context.time
                self._rx_keeps_alive = True
        return is_ack_eliciting, is_probing

    def receive_datagram(self, data: bytes, addr: NetworkAddress, now: float) -> None:
        # aioquic restarts the idle timer on every packet. Answers to standby keep-alives must
        # not hide a dead active path from it: only non-probing packets, or anything on the
        # active path, keep the connection alive.
        close_at = self._close_at
        self._rx_keeps_alive = False
        self._rx_eliciting = self._rx_lost = False
        super().receive_datagram(data, addr, now)
        path_id = getattr(addr, "path_id", None)
        if (
            close_at is not None
            and not self._rx_keeps_alive
            and self._network_paths
            and path_id is not None
            and path_id != self.active_path_id
            and self._close_at is not None
            and self._close_at > close_at
        ):
            self._close_at = close_at

    def receive_needs_send(self) -> bool:
        """Whether the datagram just received can have left anything to send.

        Only a datagram of non-ack-eliciting packets (an ACK of our keep-alive PING: half the
        datagrams of a node at rest) that declared nothing lost, on a confirmed connection
        with nothing queued anywhere, leaves nothing: building packets to find that out was a
        third of a resting node's CPU (bench B4). When unsure, True: a flush finds nothing.
        """
        if self._rx_eliciting or self._rx_lost or not self._handshake_confirmed:
            return True
        if (
            self._close_pending
            or self._ping_pending
            or self._probe_pending
            or self._datagrams_pending
            or self._retire_connection_ids
            or self._handshake_done_pending
            or self._streams_blocked_pending
        ):
            return True
        if any(space.ack_at is not None for space in self._loss.spaces):
            return True
        if any(not cid.was_sent for cid in self._host_cids):
            return True
        if not self._network_paths or not self._network_paths[0].is_validated:
            return True
        if any(path.remote_challenges for path in self._network_paths):
            return True
        return any(
            not stream.sender.buffer_is_empty
            or stream.sender.reset_pending
            or stream.receiver.stop_pending
            or stream.is_finished  # discarded (MAX_STREAMS) by the next packet built
            for stream in self._streams.values()
        )

    def _write_stream_limits(self, builder: QuicPacketBuilder, space: Any, stream: Any) -> None:
        if not self._credit.write_limits(builder, stream):
            super()._write_stream_limits(builder, space, stream)

    # ----------------------------------------------------------------- probe building

    def _build_probe(
        self,
        network_path: QuicNetworkPath,
        now: float,
        challenge: bytes | None,
        *,
        keepalive: bool = False,
    ) -> list[tuple[bytes, NetworkAddress]]:
        """A padded packet with our challenge and/or pending responses, outside recovery;
        ``keepalive``: at least one PADDING frame, so the packet exists even with neither."""
        if network_path.peer_cid is None or self._version is None:
            return []
        builder = QuicPacketBuilder(
            host_cid=self.host_cid,
            is_client=self._is_client,
            max_datagram_size=self._max_datagram_size,
            packet_number=self._packet_number,
            peer_cid=network_path.peer_cid.cid,
            quic_logger=self._quic_logger,
            version=self._version,
        )
        try:
            builder.start_packet(QuicPacketType.ONE_RTT, self._cryptos[Epoch.ONE_RTT])
            if keepalive:
                builder.start_frame(QuicFrameType.PADDING)
            if challenge is not None:
                self._write_challenge(builder, network_path, challenge)
            while network_path.remote_challenges:
                self._write_path_response_frame(
                    builder=builder, challenge=network_path.remote_challenges[0]
                )
                network_path.remote_challenges.popleft()
        except QuicPacketBuilderStop:
            pass
        datagrams, packets = builder.flush()
        if not datagrams:
            return []
        if self._quic_logger is not None:
            # Logged like aioquic logs its own packets, so qvis shows our probes too.
            for packet in packets:
                self._quic_logger.log_event(
                    category="transport",
                    event="packet_sent",
                    data={
                        "frames": packet.quic_logger_frames,
                        "header": {
                            "packet_number": packet.packet_number,
                            "packet_type": self._quic_logger.packet_type(packet.packet_type),
                            "scid": "",
                            "dcid": network_path.peer_cid.cid.hex(),
                        },
                        "raw": {"length": packet.sent_bytes},
                    },
                )
        # The packet number is consumed but the packet is not registered with loss recovery:
        # no congestion window, no RTT sample, no retransmission (the probe loop retries).
        self._packet_number = builder.packet_number
        network_path.bytes_sent += sum(len(d) for d in datagrams)
        return [(d, network_path.addr) for d in datagrams]

    def _write_challenge(
        self, builder: QuicPacketBuilder, network_path: QuicNetworkPath, challenge: bytes
    ) -> None:
        buf = builder.start_frame(QuicFrameType.PATH_CHALLENGE, capacity=9)
        buf.push_bytes(challenge)
        network_path.local_challenges.append(challenge)
        if self._quic_logger is not None and builder.quic_logger_frames is not None:
            builder.quic_logger_frames.append(
                self._quic_logger.encode_path_challenge_frame(data=challenge)
            )

    # ----------------------------------------------------------------- our API

    def send_backlog(self, stream_id: int) -> int:
        """Bytes written to a stream and not yet acknowledged by the peer."""
        return stream_send_backlog(self, stream_id)

    def set_receive_backlog(
        self, stream_id: int, backlog: int, limit: int, *, due: bool = True
    ) -> bool:
        """Record a stream's unread bytes; True when new credit is due (flush soon).

        ``due=False``: just received, only record (see ``StreamCredit.set_backlog``)."""
        return self._credit.set_backlog(stream_id, backlog, limit, due=due)

    def has_stream(self, stream_id: int) -> bool:
        """False once aioquic discarded the stream (both directions finished)."""
        return has_stream(self, stream_id)

    @property
    def close_pending(self) -> bool:
        return bool(self._close_pending)

    @property
    def handshake_confirmed(self) -> bool:
        return bool(self._handshake_confirmed)

    @property
    def path_count(self) -> int:
        return len(self._network_paths)

    @property
    def active_path_id(self) -> int:
        return int(self._network_paths[0].addr.path_id)

    @property
    def spare_peer_cids(self) -> int:
        return len(self._peer_cid_available)

    @property
    def pending_retires(self) -> int:
        return len(self._retire_connection_ids)

    @property
    def congestion_window(self) -> int:
        return int(self._loss.congestion_window)

    @property
    def bytes_in_flight(self) -> int:
        return int(self._loss.bytes_in_flight)

    @property
    def smoothed_rtt(self) -> float | None:
        return float(self._loss._rtt_smoothed) if self._loss._rtt_initialized else None

    @property
    def asymmetric_responses(self) -> int:
        """Responses that validated a path from another path's socket (RFC 9000 §8.2.3)."""
        return self._asymmetric_responses

    def probe_timeout(self) -> float:
        return float(self._loss.get_probe_timeout())

    def idle_deadline(self) -> float | None:
        return self._close_at if self._close_at is not None else None

    def last_rx(self, path_id: int) -> float | None:
        """When an authenticated packet last arrived on a path (probing or not)."""
        return self._last_rx.get(path_id)

    def idle_keepalive_at(self) -> float | None:
        """When an idle connection should send an ack-eliciting packet to stay open: a third
        into its idle period (RFC 9000 §10.1.2), the period being the smaller of both sides'
        idle timeouts (a js-libp2p peer: 10 s). None once one was sent for this period (only a
        receipt starts a new one) or while closing."""
        if self._close_pending or self._close_at is None or self._close_at == self._ka_for:
            return None
        idle = self._idle_timeout()
        return float(self._close_at - idle + idle / 3)

    def send_idle_keepalive(self, now: float, uid: int) -> bool:
        """Send the keep-alive PING if due; True when one was queued."""
        at = self.idle_keepalive_at()
        if at is None or now < at:
            return False
        self._ka_for = self._close_at
        self.send_ping(uid)
        return True

    def outstanding_since(self) -> float | None:
        """Send time of the oldest unacknowledged ack-eliciting packet sent on the active path.

        Packets sent before the last switch belong to another path and are not evidence
        about this one.
        """
        for packet in self._application_space().sent_packets.values():
            if packet.is_ack_eliciting and packet.packet_number >= self._rtt_floor_packet_number:
                return packet.sent_time
        return None

    def last_non_probing_rx(self, path_id: int) -> float | None:
        return self._last_non_probing_rx.get(path_id)

    def _path_peer_cids(self) -> dict[int, QuicConnectionId | None]:
        """The peer CID each path sends with (the active path uses the connection's)."""
        return {
            int(path.addr.path_id): self._peer_cid if index == 0 else path.peer_cid
            for index, path in enumerate(self._network_paths)
        }

    def path_cid_sequences(self) -> dict[int, int | None]:
        return {
            pid: None if cid is None else cid.sequence_number
            for pid, cid in self._path_peer_cids().items()
        }

    def path_cids(self) -> dict[int, bytes | None]:
        return {
            pid: None if cid is None else cid.cid for pid, cid in self._path_peer_cids().items()
        }

    def attach_initial_path(self, path_id: int) -> None:
        """Tag the handshake path (created by ``connect``) with its path id."""
        path = self._network_paths[0]
        if not isinstance(path.addr, PathAddr):
            path.addr = PathAddr(path.addr, path_id)
        path.local_challenge_sent = True  # our challenges are emitted on request only

    def _path(self, path_id: int) -> QuicNetworkPath:
        for path in self._network_paths:
            if getattr(path.addr, "path_id", None) == path_id:
                return path
        raise KeyError(path_id)

    def has_path(self, path_id: int) -> bool:
        return any(getattr(p.addr, "path_id", None) == path_id for p in self._network_paths)

    def add_path(self, path_id: int, remote: NetworkAddress) -> None:
        """Register a local path with aioquic; sends nothing and reserves no CID yet."""
        if len(self._network_paths) >= AIOQUIC_MAX_NETWORK_PATHS:
            raise OverflowError("aioquic would evict a path silently")
        path = QuicNetworkPath(PathAddr(remote, path_id))
        # Our challenges are emitted on request only; keep aioquic's loop from adding its own.
        path.local_challenge_sent = True
        self._network_paths.append(path)

    def reserve_peer_cid(self, path_id: int) -> bool:
        """Give a path its own peer CID (RFC 9000 §9.5); False when no spare CID is left."""
        path = self._path(path_id)
        if path is self._network_paths[0] or path.peer_cid is not None:
            return True
        if not self._peer_cid_available:
            return False
        path.peer_cid = self._peer_cid_available.pop(0)
        return True

    def ack_now(self, now: float) -> bool:
        """Send a pending 1-RTT ACK at the next flush; False when none is pending.

        Used before the first challenge on a fresh CID: an aioquic server registers the CIDs it
        issued only when its next datagram arrives, and the ACK of the packet that carried them
        is that datagram. ACK-only packets stay out of congestion control (a PING would not).
        """
        space = self._spaces[Epoch.ONE_RTT]
        if space.ack_at is None:
            return False
        space.ack_at = now
        return True

    def emit_challenge(self, path_id: int, now: float) -> list[tuple[bytes, NetworkAddress]]:
        """Build one padded PATH_CHALLENGE on a non-active path; empty without a CID."""
        path = self._path(path_id)
        if path is self._network_paths[0]:
            raise ValueError("the active path is not probed with PATH_CHALLENGE")
        challenge = os.urandom(8)
        datagrams = self._build_probe(path, now, challenge=challenge)
        if datagrams:
            self._challenge_sent_at[challenge] = (path_id, now)
            # A path that never answers must not grow this table: keep the newest few.
            mine = [c for c, (pid, _) in self._challenge_sent_at.items() if pid == path_id]
            for stale in mine[:-MAX_OUTSTANDING_CHALLENGES]:
                del self._challenge_sent_at[stale]
        return datagrams

    def emit_nat_keepalive(self, path_id: int, now: float) -> list[tuple[bytes, NetworkAddress]]:
        """A small PADDING-only packet on a non-active path: it refreshes the path's NAT
        binding (NATs refresh on outbound traffic, RFC 4787 REQ-6) and is probing (RFC 9000
        §9.1: the peer does not migrate to the path) and not ack-eliciting: no answer, no
        ACK, no 1200-byte padding (that is for PATH_CHALLENGE and PATH_RESPONSE, §8.2.1).
        About a tenth of a padded challenge round trip (bench B4). Empty without a CID."""
        path = self._path(path_id)
        if path is self._network_paths[0]:
            raise ValueError("the active path's NAT binding is kept by its own traffic")
        return self._build_probe(path, now, challenge=None, keepalive=True)

    def forget_challenges(self, path_id: int) -> None:
        """Drop outstanding challenges of a path (probe cancelled or timed out)."""
        for challenge in [c for c, (pid, _) in self._challenge_sent_at.items() if pid == path_id]:
            del self._challenge_sent_at[challenge]
        with contextlib.suppress(KeyError):
            self._path(path_id).local_challenges.clear()

    def take_path_responses(self) -> list[PathResponse]:
        out, self._path_responses = self._path_responses, []
        return out

    def is_path_validated(self, path_id: int) -> bool:
        return bool(self._path(path_id).is_validated)

    def invalidate_path(self, path_id: int) -> None:
        """Mark a path unvalidated (failed, or stale and due for a re-probe)."""
        path = self._path(path_id)
        if path is not self._network_paths[0]:
            path.is_validated = False

    def close_path(self, path_id: int) -> int | None:
        """Forget a non-active path and retire its CID; returns the retired sequence number."""
        path = self._path(path_id)
        if path is self._network_paths[0]:
            raise ValueError("cannot close the active path")
        self._network_paths.remove(path)
        self.forget_challenges(path_id)
        self._last_non_probing_rx.pop(path_id, None)
        self._last_rx.pop(path_id, None)
        if path.peer_cid is None:
            return None
        seq = path.peer_cid.sequence_number
        self._retire_peer_cid(path.peer_cid)
        path.peer_cid = None
        return seq

    # ----------------------------------------------------------------- switching

    def _save_context(self) -> _CongestionContext:
        loss = self._loss
        return _CongestionContext(
            cc=loss._cc,
            pacer=loss._pacer,
            rtt={name: getattr(loss, name) for name in _RTT_FIELDS},
            pto_count=loss._pto_count,
        )

    def _restore_context(self, ctx: _CongestionContext) -> None:
        loss = self._loss
        loss._cc = ctx.cc
        loss._pacer = ctx.pacer
        for name, value in ctx.rtt.items():
            setattr(loss, name, value)
        loss._pto_count = ctx.pto_count

    def _fresh_context(self, seed_rtt: float | None) -> _CongestionContext:
        initial = self._configuration.initial_rtt
        if seed_rtt is not None:
            # PTO before the first sample is 2 x initial RTT: leave room for the peer's ACK delay.
            initial = max(seed_rtt, K_GRANULARITY) + self._loss.max_ack_delay / 2
        return _CongestionContext(
            cc=create_congestion_control(
                self._configuration.congestion_control_algorithm,
                max_datagram_size=self._max_datagram_size,
            ),
            pacer=QuicPacketPacer(max_datagram_size=self._max_datagram_size),
            rtt={
                "_rtt_first_sample_time": 0.0,
                "_rtt_initial": initial,
                "_rtt_initialized": False,
                "_rtt_latest": 0.0,
                "_rtt_min": float("inf"),
                "_rtt_smoothed": 0.0,
                "_rtt_variance": 0.0,
            },
            pto_count=0,
        )

    def _application_space(self) -> Any:
        return self._spaces[Epoch.ONE_RTT]

    def _detach_in_flight(self, *, since: int = 0) -> list[QuicSentPacket]:
        """Take packets in flight out of the current congestion controller's accounting.

        They stay tracked for acknowledgement and loss detection (their data is still
        retransmitted if lost) but no longer count against, or grow, any window.
        """
        cc = self._loss._cc
        detached = []
        for packet in self._application_space().sent_packets.values():
            if packet.in_flight and packet.packet_number >= since:
                packet.in_flight = False
                cc.bytes_in_flight = max(0, cc.bytes_in_flight - packet.sent_bytes)
                detached.append(packet)
        return detached

    def declare_in_flight_lost(self, now: float) -> int:
        """Failover: the old path is dead, resend everything it had in flight on the new one."""
        space = self._application_space()
        lost = [p for p in space.sent_packets.values() if p.is_ack_eliciting or p.in_flight]
        if lost:
            self._loss._on_packets_lost(packets=lost, space=space, now=now, congestion_event=False)
        return len(lost)

    def switch_path(
        self,
        path_id: int,
        now: float,
        *,
        seed_rtt: float | None,
        ping_uid: int,
        old_path_dead: bool = False,
    ) -> SwitchToken:
        """Make a validated path active with fresh RTT/congestion state (RFC 9000 §9.4).

        The old path keeps its CID (it is the same local address, so reusing it there links
        nothing new) and stays listed; packets in flight on it are neither counted on the new
        path nor declared lost. A PING goes out at once so the peer sees a non-probing packet
        on the new path.
        """
        new = self._path(path_id)
        old = self._network_paths[0]
        if new is old:
            raise ValueError("already active")
        if not new.is_validated:
            raise ValueError("path not validated")
        if new.peer_cid is None and not self.reserve_peer_cid(path_id):
            raise LookupError("no peer connection ID for the path")
        assert new.peer_cid is not None
        token = SwitchToken(
            from_path=int(old.addr.path_id),
            to_path=path_id,
            old_context=self._save_context(),
            first_packet_number=self._packet_number,
            cid_sequence_before=self._peer_cid.sequence_number,
            cid_sequence_after=new.peer_cid.sequence_number,
        )
        if old_path_dead:
            # Failover: what the dead path had in flight is resent on the new one at once.
            self.declare_in_flight_lost(now)
        self._detach_in_flight()
        old.peer_cid, self._peer_cid, new.peer_cid = self._peer_cid, new.peer_cid, None
        self._spin_bit = False  # RFC 9000 §17.4: reset when the CID changes.
        self._network_paths.remove(new)
        self._network_paths.insert(0, new)
        self._restore_context(self._fresh_context(seed_rtt))
        self._rtt_floor_packet_number = self._packet_number
        self.send_ping(ping_uid)
        return token

    def rollback_switch(self, token: SwitchToken, now: float, *, ping_uid: int) -> None:
        """Return to the path a switch left, with its own congestion state."""
        old = self._path(token.from_path)
        new = self._path(token.to_path)
        if self._network_paths[0] is not new:
            raise ValueError("the switch being rolled back is not the current one")
        if old.peer_cid is None and not self.reserve_peer_cid(token.from_path):
            # The peer retired the old path's CID meanwhile (Retire Prior To) and none is spare.
            raise LookupError("no peer connection ID to return to the old path")
        assert old.peer_cid is not None
        self._detach_in_flight(since=token.first_packet_number)
        new.peer_cid, self._peer_cid, old.peer_cid = self._peer_cid, old.peer_cid, None
        self._spin_bit = False
        self._network_paths.remove(old)
        self._network_paths.insert(0, old)
        self._restore_context(token.old_context)
        self._rtt_floor_packet_number = self._packet_number
        self.send_ping(ping_uid)


def stream_send_backlog(quic: QuicConnection, stream_id: int) -> int:
    """Unacknowledged bytes of a stream of any aioquic connection (server side included)."""
    stream = quic._streams.get(stream_id)
    return 0 if stream is None else len(stream.sender._buffer)


def has_stream(quic: QuicConnection, stream_id: int) -> bool:
    """False once aioquic discarded the stream (both directions finished)."""
    return stream_id in quic._streams


class BoundedQuicLoggerTrace(QuicLoggerTrace):
    """A qlog trace that stores its events itself (to bound them), handing each to :meth:`keep`.

    aioquic appends every event to a private unbounded deque read by ``to_dict``; here that
    deque holds only the event being logged, so telemetry/qlog.py decides what is kept without
    reaching into aioquic itself (its ``to_dict`` then lists no events: the subclass adds them).
    """

    def __init__(self, *, is_client: bool, odcid: bytes) -> None:
        super().__init__(is_client=is_client, odcid=odcid)
        self._events = deque(maxlen=1)

    def log_event(self, *, category: str, event: str, data: dict[str, Any]) -> None:
        super().log_event(category=category, event=event, data=data)
        self.keep(self._events.pop())

    def keep(self, event: dict[str, Any]) -> None:
        """Store one event (``name``, ``time`` in ms, ``data``), as aioquic built it."""
        raise NotImplementedError


def connection_trace(quic: QuicConnection) -> QuicLoggerTrace | None:
    """The qlog trace of a connection (aioquic's private ``_quic_logger``), None without qlog."""
    return quic._quic_logger


def peer_connection_id(quic: QuicConnection) -> bytes:
    """The CID a connection now sends to (aioquic's private ``_peer_cid``): a listener's qlog
    names the DCID a client's migration moved it to."""
    return quic._peer_cid.cid


def active_path_validated(quic: QuicConnection) -> bool:
    """Whether the address a connection sends to is validated (RFC 9000 §8.2): a listener's
    qlog marks a client's migration complete when its own PATH_CHALLENGE there is answered."""
    paths = quic._network_paths
    return bool(paths) and paths[0].is_validated


def logger_traces(logger: QuicLogger) -> list[QuicLoggerTrace]:
    """The live list of traces a ``QuicLogger`` holds until ``end_trace`` (private in aioquic).

    Appending or removing registers or forgets a trace, as aioquic's own ``start_trace`` and
    ``end_trace`` do.
    """
    return logger._traces


def is_ping_acknowledged(event: quic_events.QuicEvent, uid: int) -> bool:
    return isinstance(event, quic_events.PingAcknowledged) and event.uid == uid


__all__ = [
    "AIOQUIC_MAX_NETWORK_PATHS",
    "REQUIRED_PRIVATE_MEMBERS",
    "BoundedQuicLoggerTrace",
    "InboundQuicConnection",
    "MigratingQuicConnection",
    "PathAddr",
    "PathResponse",
    "QuicConnectionId",
    "StreamCredit",
    "SwitchToken",
    "active_path_validated",
    "connection_trace",
    "follow_rebindings",
    "logger_traces",
    "peer_connection_id",
]
