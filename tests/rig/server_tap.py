"""Look inside a rig server connection: which frames arrived from which client address, and a
gate that holds the server's datagrams back once its handshake is complete.

The rig emulates a peer, so it may use aioquic internals (``_payload_received``,
``_quic_logger``, ``_handshake_complete``); the library may not (only actors/quic_adapter.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aioquic.quic.connection import QuicConnection
from aioquic.quic.logger import QuicLogger

from .aioquic_server import Addr, RigServer, normalize_addr

__all__ = ["PROBING_FRAMES", "FrameTap", "HandshakeDoneGate", "ReceivedPacket"]

#: Frames that may travel on a standby path (RFC 9000 §9.1 probing frames, minus
#: NEW_CONNECTION_ID, which we never send there).
PROBING_FRAMES = frozenset({"path_challenge", "path_response", "padding"})


@dataclass(frozen=True)
class ReceivedPacket:
    """One packet the server decrypted: where from, its frame types, aioquic's verdict."""

    src: Addr
    frames: tuple[str, ...]
    is_probing: bool


@dataclass
class FrameTap:
    """Records every packet a server connection receives from now on (decoded frames)."""

    quic: QuicConnection
    packets: list[ReceivedPacket] = field(default_factory=list)

    def __post_init__(self) -> None:
        quic: Any = self.quic
        if quic._quic_logger is None:
            quic._quic_logger = QuicLogger().start_trace(
                is_client=False, odcid=quic.original_destination_connection_id
            )
        original = quic._payload_received

        def payload_received(context: Any, plain: bytes, crypto_frame_required: bool = False):
            frames = context.quic_logger_frames
            before = len(frames) if frames is not None else 0
            result = original(context, plain, crypto_frame_required=crypto_frame_required)
            names = tuple(f["frame_type"] for f in (frames or [])[before:])
            self.packets.append(
                ReceivedPacket(normalize_addr(context.network_path.addr), names, bool(result[1]))
            )
            return result

        quic._payload_received = payload_received

    def from_addr(self, addr: Addr) -> list[ReceivedPacket]:
        addr = normalize_addr(addr)
        return [p for p in self.packets if p.src == addr]


class HandshakeDoneGate:
    """Holds back everything a rig server's connections send once their handshake is complete
    (so HANDSHAKE_DONE waits) until ``open()``. Install before the client dials.

    The client then completes its handshake (it has the server's Finished) but is not confirmed:
    the window in which RFC 9000 §9 forbids it to probe or migrate.
    """

    def __init__(self, server: RigServer) -> None:
        self.closed = True
        self.protocols: list[Any] = []
        self.held = 0
        self._server = server
        register: Callable[[Any], Any] = server._register

        def gated_register(protocol: Any) -> Any:
            self._gate(protocol)
            return register(protocol)

        server._register = gated_register  # type: ignore[method-assign]

    def _gate(self, protocol: Any) -> None:
        quic: Any = protocol.quic
        original = quic.datagrams_to_send
        self.protocols.append(protocol)

        def datagrams_to_send(now: float) -> list[tuple[bytes, Any]]:
            if self.closed and quic._handshake_complete:
                self.held += 1
                return []
            return original(now)

        quic.datagrams_to_send = datagrams_to_send

    def open(self) -> None:
        self.closed = False
        for protocol in self.protocols:
            protocol.transmit()
