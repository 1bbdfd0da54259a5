"""What an error on a path socket says: the path is suspect, the peer is gone, or nothing.

A UDP socket hears of ICMP errors only with ``IP_RECVERR`` (``IPV6_RECVERR``) set; the kernel
then hands each one to ``recvfrom`` once (asyncio passes it to ``error_received``) and keeps
a full report (``struct sock_extended_err``: origin, ICMP type and code, the offender's
address) in the socket's error queue until it is read with ``MSG_ERRQUEUE``. The queue must
be read: it is charged to the receive buffer, and while it holds anything epoll reports the
socket readable.

The distinction that matters (DESIGN.md §4): a port unreachable sent by the peer's own
address means the peer's process is gone, not the path (a failover would only move the
connection to another path to the same dead port); a net or host unreachable, or a local
send error, says the path may be broken: suspect, confirmed by one probe of our own (ICMP is
unauthenticated). Parsing and judging are sans-I/O; :func:`read_error_queue` is the one read.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import struct
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "Evidence",
    "SocketErrorReport",
    "enable_error_reports",
    "judge",
    "parse_extended_err",
    "read_error_queue",
]

IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
SO_EE_ORIGIN_LOCAL = 1
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3
_EXTENDED_ERR = struct.Struct("=IBBBBII")  # errno, origin, type, code, pad, info, data
_REPORT_CMSGS = ((socket.IPPROTO_IP, IP_RECVERR), (socket.IPPROTO_IPV6, IPV6_RECVERR))
#: Reports read per error at most: a flood of ICMP must not hold the loop.
_MAX_READ = 64
#: errnos that say a path may be broken (DESIGN.md §4).
UNREACHABLE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH})


class Evidence(StrEnum):
    UNREACHABLE = "unreachable"  # an ICMP net/host unreachable: suspect the path
    SEND_FAILED = "send_failed"  # sendto() failed here (no route, link down): suspect the path
    PEER_GONE = "peer_gone"  # port unreachable from the peer itself: not the path's fault


@dataclass(frozen=True, slots=True)
class SocketErrorReport:
    """One entry of a socket's error queue."""

    errno: int
    origin: int
    icmp_type: int
    icmp_code: int
    offender: str | None  # who sent the ICMP (None: a local error)

    @property
    def port_unreachable(self) -> bool:
        if self.origin == SO_EE_ORIGIN_ICMP:
            return (self.icmp_type, self.icmp_code) == (3, 3)
        if self.origin == SO_EE_ORIGIN_ICMP6:
            return (self.icmp_type, self.icmp_code) == (1, 4)
        return False


def parse_extended_err(data: bytes) -> SocketErrorReport | None:
    """Decode a ``sock_extended_err`` control message and the offender address after it."""
    if len(data) < _EXTENDED_ERR.size:
        return None
    err, origin, icmp_type, code, _pad, _info, _data = _EXTENDED_ERR.unpack_from(data)
    return SocketErrorReport(err, origin, icmp_type, code, _offender(data[_EXTENDED_ERR.size :]))


def _offender(raw: bytes) -> str | None:
    if len(raw) < 2:
        return None
    family = int.from_bytes(raw[:2], "little")  # sa_family_t is host order (x86, arm: LE)
    if family == socket.AF_INET and len(raw) >= 8:
        return str(ipaddress.IPv4Address(raw[4:8]))
    if family == socket.AF_INET6 and len(raw) >= 24:
        return str(ipaddress.IPv6Address(raw[8:24]))
    return None


def _same_ip(a: str | None, b: str) -> bool:
    if a is None:
        return False
    try:
        x, y = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return False
    if isinstance(x, ipaddress.IPv6Address) and x.ipv4_mapped is not None:
        x = x.ipv4_mapped
    if isinstance(y, ipaddress.IPv6Address) and y.ipv4_mapped is not None:
        y = y.ipv4_mapped
    return x == y


def judge(error: int | None, reports: list[SocketErrorReport], peer_ip: str) -> Evidence | None:
    """What ``error`` (the errno ``error_received`` got) and the queued reports say.

    A port unreachable from the peer's own address: the peer is gone. A net or host
    unreachable (from anyone), a port unreachable from someone else, or a local send error:
    the path is suspect. Anything else (a too-big message, an interrupted call) says nothing
    about the path's health.
    """
    icmp = [r for r in reports if r.origin in (SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6)]
    if any(r.port_unreachable and _same_ip(r.offender, peer_ip) for r in icmp):
        return Evidence.PEER_GONE
    if any(r.errno in UNREACHABLE or r.port_unreachable for r in icmp):
        return Evidence.UNREACHABLE
    if not icmp:
        if error in UNREACHABLE:
            return Evidence.SEND_FAILED  # sendto() failed here: no route, link down
        if error == errno.ECONNREFUSED:
            return Evidence.PEER_GONE  # only the destination host answers "port unreachable"
    return None


def enable_error_reports(sock: socket.socket) -> bool:
    """Ask the kernel for ICMP errors on this unconnected socket (off by default on Linux)."""
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
            # A dual-stack socket hears IPv4 errors through IP_RECVERR; refused on v6-only.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
    except OSError:
        return False
    return True


def read_error_queue(sock: socket.socket) -> list[SocketErrorReport]:
    """Take every report the kernel queued for ``sock`` (non-blocking; at most 64)."""
    reports: list[SocketErrorReport] = []
    for _ in range(_MAX_READ):
        try:
            _data, ancdata, _flags, _addr = sock.recvmsg(0, 512, socket.MSG_ERRQUEUE)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:  # closed, or no error queue on this kind of socket
            break
        for level, kind, data in ancdata:
            if (level, kind) in _REPORT_CMSGS:
                report = parse_extended_err(data)
                if report is not None:
                    reports.append(report)
    return reports
