"""Socket errors as evidence: the kernel's reports on real loopback sockets, and the judgement."""

from __future__ import annotations

import errno
import select
import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.socket_errors import (
    SO_EE_ORIGIN_ICMP,
    SO_EE_ORIGIN_ICMP6,
    SO_EE_ORIGIN_LOCAL,
    Evidence,
    SocketErrorReport,
    enable_error_reports,
    judge,
    parse_extended_err,
    read_error_queue,
)


def _closed_port(family: socket.AddressFamily, host: str) -> int:
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@pytest.fixture(params=[(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")], ids=["v4", "v6"])
def sender(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, str]]:
    family, host = request.param
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        sock.setblocking(False)
        yield sock, host


def test_port_unreachable_from_the_peer_is_peer_gone(sender: tuple[socket.socket, str]) -> None:
    sock, host = sender
    assert enable_error_reports(sock)
    sock.sendto(b"hello", (host, _closed_port(sock.family, host)))
    readable, _, _ = select.select([sock], [], [], 5.0)  # the ICMP error makes it readable
    assert readable
    with pytest.raises(ConnectionRefusedError) as err:
        sock.recvfrom(64)  # what asyncio hands to error_received
    reports = read_error_queue(sock)
    assert len(reports) == 1 and reports[0].port_unreachable
    assert reports[0].offender == host
    assert judge(err.value.errno, reports, host) is Evidence.PEER_GONE
    # The same error from someone else's address is about the path, not the peer.
    other = "127.0.0.9" if sock.family == socket.AF_INET else "::2"
    assert judge(err.value.errno, reports, other) is Evidence.UNREACHABLE
    # Read: the queue is empty and the socket no longer reads as ready (no busy loop).
    assert read_error_queue(sock) == []
    assert select.select([sock], [], [], 0)[0] == []


def test_without_error_reports_the_kernel_says_nothing(sender: tuple[socket.socket, str]) -> None:
    """Why enable_error_reports exists: an unconnected UDP socket hears no ICMP by default."""
    sock, host = sender
    sock.sendto(b"hello", (host, _closed_port(sock.family, host)))
    assert select.select([sock], [], [], 0.2)[0] == []
    assert read_error_queue(sock) == []


def _report(
    origin: int, icmp: tuple[int, int], err: int, offender: str | None
) -> SocketErrorReport:
    return SocketErrorReport(err, origin, icmp[0], icmp[1], offender)


@pytest.mark.parametrize(
    ("error", "reports", "expected"),
    [
        # ICMP net / host unreachable from a router: the path.
        (errno.EHOSTUNREACH, [_report(SO_EE_ORIGIN_ICMP, (3, 1), 113, "10.0.0.1")], "unreachable"),
        (errno.ENETUNREACH, [_report(SO_EE_ORIGIN_ICMP6, (1, 0), 101, "fe80::1")], "unreachable"),
        # A local send error (no route, link down): no report, the errno says it.
        (errno.ENETUNREACH, [], "send_failed"),
        (errno.EHOSTUNREACH, [], "send_failed"),
        # Port unreachable without a report: only the destination host sends those.
        (errno.ECONNREFUSED, [], "peer_gone"),
        # Port unreachable from the peer beside a host unreachable: the peer answered.
        (
            errno.ECONNREFUSED,
            [
                _report(SO_EE_ORIGIN_ICMP, (3, 1), 113, "10.0.0.1"),
                _report(SO_EE_ORIGIN_ICMP, (3, 3), 111, "192.0.2.7"),
            ],
            "peer_gone",
        ),
        # Nothing about the path: a message too big (PMTU), a local report, an interruption.
        (errno.EMSGSIZE, [_report(SO_EE_ORIGIN_LOCAL, (0, 0), 90, None)], None),
        (errno.EINTR, [], None),
    ],
)
def test_judgement(error: int, reports: list[SocketErrorReport], expected: str | None) -> None:
    found = judge(error, reports, "192.0.2.7")
    assert (found.value if found is not None else None) == expected


def test_ipv4_mapped_peer_addresses_compare_as_ipv4() -> None:
    report = _report(SO_EE_ORIGIN_ICMP, (3, 3), 111, "192.0.2.7")
    assert judge(errno.ECONNREFUSED, [report], "::ffff:192.0.2.7") is Evidence.PEER_GONE


def test_parse_extended_err_reads_the_offender() -> None:
    head = struct.pack("=IBBBBII", 111, SO_EE_ORIGIN_ICMP, 3, 3, 0, 0, 0)
    sin = struct.pack("<H", socket.AF_INET) + struct.pack("!H", 0) + socket.inet_aton("192.0.2.7")
    report = parse_extended_err(head + sin + bytes(8))
    assert report == SocketErrorReport(111, SO_EE_ORIGIN_ICMP, 3, 3, "192.0.2.7")
    assert parse_extended_err(head) == SocketErrorReport(111, SO_EE_ORIGIN_ICMP, 3, 3, None)


@given(st.binary(max_size=64))
def test_parse_extended_err_never_raises(data: bytes) -> None:
    report = parse_extended_err(data)
    assert report is None or isinstance(report, SocketErrorReport)
