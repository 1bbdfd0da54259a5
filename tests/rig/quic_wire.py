"""Decrypted QUIC packets of a saved capture, in wire order, with what migration checks need.

`capture.quic_frames` lists frame types per datagram; the conformance checks of client
migration also need the order and time of each datagram (what left a socket *after* a
switch), and the PATH_CHALLENGE / PATH_RESPONSE payloads (a retry carries fresh data, a
response echoes a challenge). `wire_packets` runs tshark once over the pcap with the key log
and returns one `WirePacket` per captured datagram.

A datagram tshark could not decrypt has ``decrypted`` False and no frame types: checks must
treat it as unknown (fail), never as "carried nothing".
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .aioquic_server import Addr

__all__ = [
    "ACK_TYPES",
    "FRAME_NAMES",
    "PADDING",
    "PROBING_TYPES",
    "WirePacket",
    "frame_names",
    "wire_packets",
]

PADDING = 0x00
PING = 0x01
ACK_TYPES = frozenset({0x02, 0x03})
NEW_CONNECTION_ID = 0x18
PATH_CHALLENGE = 0x1A
PATH_RESPONSE = 0x1B

#: RFC 9000 §9.1: probing frames; a packet carrying only these is a probing packet.
PROBING_TYPES = frozenset({PADDING, NEW_CONNECTION_ID, PATH_CHALLENGE, PATH_RESPONSE})

FRAME_NAMES = {
    0x00: "PADDING",
    0x01: "PING",
    0x02: "ACK",
    0x03: "ACK_ECN",
    0x04: "RESET_STREAM",
    0x05: "STOP_SENDING",
    0x06: "CRYPTO",
    0x07: "NEW_TOKEN",
    0x10: "MAX_DATA",
    0x11: "MAX_STREAM_DATA",
    0x12: "MAX_STREAMS_BIDI",
    0x13: "MAX_STREAMS_UNI",
    0x14: "DATA_BLOCKED",
    0x15: "STREAM_DATA_BLOCKED",
    0x16: "STREAMS_BLOCKED_BIDI",
    0x17: "STREAMS_BLOCKED_UNI",
    0x18: "NEW_CONNECTION_ID",
    0x19: "RETIRE_CONNECTION_ID",
    0x1A: "PATH_CHALLENGE",
    0x1B: "PATH_RESPONSE",
    0x1C: "CONNECTION_CLOSE",
    0x1D: "CONNECTION_CLOSE_APP",
    0x1E: "HANDSHAKE_DONE",
    **{t: "STREAM" for t in range(0x08, 0x10)},
}


def frame_names(types: Iterable[int]) -> tuple[str, ...]:
    """Frame type numbers as RFC 9000 names (deduplicated, in first-seen order)."""
    out: dict[str, None] = {}
    for t in types:
        out.setdefault(FRAME_NAMES.get(t, hex(t)), None)
    return tuple(out)


@dataclass(frozen=True)
class WirePacket:
    """One captured UDP datagram decoded as QUIC (coalesced packets merged)."""

    number: int  # tshark frame number: wire order
    time: float  # capture time, seconds since the epoch
    src: Addr
    dst: Addr
    length: int  # UDP payload length (on lo a GSO batch shows as one large datagram)
    dcids: tuple[str, ...]
    frame_types: tuple[int, ...]
    challenges: tuple[str, ...]  # PATH_CHALLENGE data, hex
    responses: tuple[str, ...]  # PATH_RESPONSE data, hex
    short_header: bool

    @property
    def decrypted(self) -> bool:
        return bool(self.frame_types)

    @property
    def probing_only(self) -> bool:
        """Decrypted and made only of probing frames (RFC 9000 §9.1)."""
        return self.decrypted and set(self.frame_types) <= PROBING_TYPES

    @property
    def names(self) -> tuple[str, ...]:
        return frame_names(self.frame_types)


_FIELDS = [
    "frame.number",
    "frame.time_epoch",
    "ip.src",
    "ipv6.src",
    "udp.srcport",
    "ip.dst",
    "ipv6.dst",
    "udp.dstport",
    "udp.length",
    "quic.dcid",
    "quic.frame_type",
    "quic.path_challenge.data",
    "quic.path_response.data",
    "quic.short",
]


def _int(text: str) -> int:
    return int(text, 16) if text.startswith("0x") else int(text)


def wire_packets(pcap: Path | str, keylog: Path | str, *ports: int) -> list[WirePacket]:
    """Every QUIC datagram to or from `ports` in `pcap`, decrypted with `keylog`, in order.

    As with `capture.quic_frames`, the capture must include the handshake (tshark learns the
    connection's CIDs from it and from NEW_CONNECTION_ID frames).
    """
    decode_as = [a for p in ports for a in ("-d", f"udp.port=={p},quic")]
    port_filter = " || ".join(f"udp.port=={p}" for p in ports)
    out = subprocess.run(
        [
            "tshark",
            "-n",
            "-r",
            str(pcap),
            "-o",
            f"tls.keylog_file:{keylog}",
            *decode_as,
            "-Y",
            f"({port_filter}) && quic",
            "-T",
            "fields",
            "-E",
            "aggregator=,",
            *[a for f in _FIELDS for a in ("-e", f)],
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    packets = []
    for line in out.splitlines():
        cols = line.split("\t")
        if len(cols) != len(_FIELDS):
            continue
        (
            number,
            ts,
            ip_src,
            ip6_src,
            sport,
            ip_dst,
            ip6_dst,
            dport,
            length,
            dcid,
            types,
            chal,
            resp,
            short,
        ) = cols
        packets.append(
            WirePacket(
                number=int(number),
                time=float(ts),
                src=(ip_src or ip6_src, int(sport.split(",")[0])),
                dst=(ip_dst or ip6_dst, int(dport.split(",")[0])),
                length=int(length.split(",")[0] or 0) - 8,
                dcids=tuple(d for d in dcid.split(",") if d),
                frame_types=tuple(_int(t) for t in types.split(",") if t),
                challenges=tuple(c.replace(":", "") for c in chal.split(",") if c),
                responses=tuple(r.replace(":", "") for r in resp.split(",") if r),
                short_header=bool(short),
            )
        )
    return packets
