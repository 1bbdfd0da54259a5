"""QUIC packets and frames from gtlsserver's log, each with the client address it went to or
came from.

Why the log and not the capture: gtlsserver sends with GSO, and on lo a GSO batch shows as one
large datagram that tshark cannot split, so it loses track of packet numbers and fails to
decrypt much of what the server sent. The log lists every packet the server built and parsed:

    I00000267 0x3d17... pkt tx pkn=1512 dcid=0xcb7d77abe62dde9a type=1RTT k=0
    I00000267 0x3d17... frm tx 1512 1RTT PATH_CHALLENGE(0x1a) data=0x5105fa05ba6e4003
    I00000267 0x3d17... frm tx 1512 1RTT PADDING(0x00) len=1165
    Sent packet: local=[127.0.0.1]:48265 remote=[127.0.0.2]:53131 ecn=0x0 1200 bytes

The server builds a batch of packets, then logs one ``Sent packet`` line per sendmsg (a
datagram, a coalesced datagram or a GSO batch: one remote each). Packets of one sendmsg share
a path and so a destination CID: a batch splits into runs of consecutive packets with the
same DCID, matched in order with its ``Sent packet`` lines. When the counts disagree, a packet
gets the remote its DCID went to elsewhere in the log (a CID is used on one path only). A
received datagram's ``Received packet`` line comes before its packets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from .aioquic_server import Addr

__all__ = ["LoggedPacket", "logged_packets"]

_PKT_RE = re.compile(r" pkt (?P<dir>tx|rx) pkn=(?P<pkn>\d+) dcid=0x(?P<dcid>[0-9a-f]*) ")
_FRM_RE = re.compile(
    r" frm (?P<dir>tx|rx) (?P<pkn>\d+) \S+ (?P<name>[A-Z_]+)\(0x[0-9a-f]+\)(?P<rest>.*)$"
)
_DATA_RE = re.compile(r"data=0x(?P<data>[0-9a-f]+)")
_DGRAM_RE = re.compile(
    r"^(?P<kind>Sent|Received) packet: local=\[[^\]]+\]:\d+ remote=\[(?P<rh>[^\]]+)\]:(?P<rp>\d+)"
)


@dataclass
class LoggedPacket:
    """One QUIC packet gtlsserver sent (``tx``) or received (``rx``)."""

    direction: Literal["tx", "rx"]
    pkn: int
    dcid: str  # hex, no 0x
    remote: Addr | None = None  # the client address it went to / came from
    #: (frame name, data hex or "") per frame, in order.
    frames: list[tuple[str, str]] = field(default_factory=list)
    #: Position in the log (orders tx against rx).
    line: int = 0

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for name, _ in self.frames))

    def data_of(self, name: str) -> list[str]:
        return [data for frame, data in self.frames if frame == name]


def logged_packets(log: str) -> list[LoggedPacket]:
    """Every packet in a gtlsserver log (run without ``-q``), in log order."""
    out: list[LoggedPacket] = []
    batch: list[LoggedPacket] = []
    sent: list[Addr] = []
    rx_remote: Addr | None = None
    current: dict[str, LoggedPacket] = {}
    for number, line in enumerate(log.splitlines()):
        if m := _DGRAM_RE.match(line):
            remote = (m["rh"], int(m["rp"]))
            if m["kind"] == "Sent":
                sent.append(remote)
            else:
                rx_remote = remote
            continue
        if m := _PKT_RE.search(line):
            direction: Literal["tx", "rx"] = "tx" if m["dir"] == "tx" else "rx"
            packet = LoggedPacket(
                direction,
                int(m["pkn"]),
                m["dcid"],
                remote=rx_remote if direction == "rx" else None,
                line=number,
            )
            out.append(packet)
            current[direction] = packet
            if direction == "tx":
                if sent:
                    _assign(batch, sent)
                    batch, sent = [], []
                batch.append(packet)
            continue
        if m := _FRM_RE.search(line):
            packet_or_none = current.get(m["dir"])
            if packet_or_none is None or packet_or_none.pkn != int(m["pkn"]):
                continue
            data = _DATA_RE.search(m["rest"])
            packet_or_none.frames.append((m["name"], data["data"] if data else ""))
    _assign(batch, sent)
    # Packets of an ambiguous batch: where their DCID went otherwise.
    by_dcid = {p.dcid: p.remote for p in out if p.direction == "tx" and p.remote is not None}
    for packet in out:
        if packet.direction == "tx" and packet.remote is None:
            packet.remote = by_dcid.get(packet.dcid)
    return out


def _assign(batch: list[LoggedPacket], sent: list[Addr]) -> None:
    """Give each packet of a batch the remote of the sendmsg it left in."""
    runs: list[list[LoggedPacket]] = []
    for packet in batch:
        if runs and runs[-1][0].dcid == packet.dcid:
            runs[-1].append(packet)
        else:
            runs.append([packet])
    if len(set(sent)) == 1:
        for packet in batch:
            packet.remote = sent[0]
    elif len(runs) == len(sent):
        for run, remote in zip(runs, sent, strict=True):
            for packet in run:
                packet.remote = remote
