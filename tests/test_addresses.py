"""Multiaddr parsing and path sockets. Binds only loopback addresses and never sends."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
from collections.abc import Iterator
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multiaddr import Multiaddr

from actors.errors import AddressInUseError, InvalidAddressError, MigrationError
from supervisor.addresses import (
    adopt_udp_socket,
    bind_udp_socket,
    check_local_address,
    df_bit_set,
    family_name,
    parse_quic_multiaddr,
    sockaddr_to_multiaddr,
    to_multiaddr,
)

AF4, AF6 = socket.AF_INET, socket.AF_INET6
PEER_ID = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(AF6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def no_fd_leak() -> Iterator[None]:
    before = _fds()
    yield
    assert _fds() == before, "file descriptors leaked"


# --- parse_quic_multiaddr ----------------------------------------------------------------------


def test_parse_valid() -> None:
    assert parse_quic_multiaddr("/ip4/127.0.0.1/udp/4433/quic-v1") == ("127.0.0.1", 4433, AF4)
    assert parse_quic_multiaddr(Multiaddr("/ip4/0.0.0.0/udp/0/quic-v1")) == ("0.0.0.0", 0, AF4)
    assert parse_quic_multiaddr("/ip6/::1/udp/1/quic-v1") == ("::1", 1, AF6)
    assert parse_quic_multiaddr("/ip6/2001:DB8:0:0::1/udp/65535/quic-v1") == (
        "2001:db8::1",
        65535,
        AF6,
    )
    _, port, family = parse_quic_multiaddr("/ip4/10.1.2.3/udp/9/quic-v1")
    assert isinstance(port, int) and family == socket.AF_INET


@pytest.mark.parametrize(
    ("value", "fix"),
    [
        ("10.0.0.1:4433", "/ip4/10.0.0.1/udp/4433/quic-v1"),
        ("[::1]:4433", "/ip6/::1/udp/4433/quic-v1"),
        ("localhost", "use a multiaddr"),
        ("", "empty"),
        ("/ip4/10.0.0.1/tcp/4433", "/udp/4433/quic-v1"),
        ("/ip4/10.0.0.1/udp/4433", "append /quic-v1"),
        ("/ip4/10.0.0.1/udp/4433/quic", "draft-29"),
        ("/ip4/10.0.0.1/udp/4433/quic", "use /quic-v1"),
        ("/dns4/example.com/udp/4433/quic-v1", "resolve the name first"),
        ("/dns/example.com/udp/4433/quic-v1", "not supported"),
        (
            f"/ip4/10.0.0.1/udp/4433/quic-v1/p2p/{PEER_ID}",
            "a peer ID belongs in a dial address only",
        ),
        ("/ip4/10.0.0.1/udp/4433/quic-v1/webtransport", "remove /webtransport"),
        ("/ip4/10.0.0.1", "append /udp/PORT/quic-v1"),
        ("/ip4/10.0.0", "not a valid multiaddr"),
        ("/ip4/10.0.0.1/udp/70000/quic-v1", "not a valid multiaddr"),
        ("/nope/1", "unknown protocol"),
        ("/udp/4433/quic-v1", "must start with /ip4/ or /ip6/"),
        ("/ip6/::ffff:10.0.0.1/udp/4433/quic-v1", "/ip4/10.0.0.1/udp/4433/quic-v1"),
        ("/ip6zone/eth0/ip6/fe80::1/udp/4433/quic-v1", "sock="),
    ],
)
def test_parse_errors_name_input_and_fix(value: str, fix: str) -> None:
    with pytest.raises(InvalidAddressError) as info:
        parse_quic_multiaddr(value, what="local_addr")
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, MigrationError)
    assert err.addr == value and err.what == "local_addr"
    assert repr(value) in str(err) and "local_addr" in str(err)
    assert fix in str(err)


def test_parse_error_names_multiaddr_input() -> None:
    ma = Multiaddr("/ip4/10.0.0.1/tcp/1")
    with pytest.raises(InvalidAddressError, match=r"/ip4/10.0.0.1/tcp/1"):
        parse_quic_multiaddr(ma)


@pytest.mark.parametrize("value", [None, 4433, b"/ip4/1.2.3.4/udp/1/quic-v1", ("1.2.3.4", 1)])
def test_parse_wrong_type(value: object) -> None:
    with pytest.raises(TypeError, match=type(value).__name__):
        parse_quic_multiaddr(cast(str, value))


# --- to_multiaddr ------------------------------------------------------------------------------


@given(st.ip_addresses(v=4), st.integers(0, 65535))
def test_round_trip_ipv4(ip: ipaddress.IPv4Address, port: int) -> None:
    ma = to_multiaddr(str(ip), port)
    assert str(ma) == f"/ip4/{ip}/udp/{port}/quic-v1"
    assert parse_quic_multiaddr(ma) == (str(ip), port, AF4)
    assert parse_quic_multiaddr(str(ma)) == (str(ip), port, AF4)


@given(st.ip_addresses(v=6), st.integers(0, 65535))
def test_round_trip_ipv6(ip: ipaddress.IPv6Address, port: int) -> None:
    ma = to_multiaddr(ip.exploded, port)  # any spelling in, canonical out
    if ip.ipv4_mapped is not None:
        assert parse_quic_multiaddr(ma) == (str(ip.ipv4_mapped), port, AF4)
    else:
        assert parse_quic_multiaddr(ma) == (str(ip), port, AF6)


def test_to_multiaddr_special_forms() -> None:
    assert str(to_multiaddr("::ffff:192.0.2.7", 5)) == "/ip4/192.0.2.7/udp/5/quic-v1"
    assert str(to_multiaddr("fe80::1%lo", 5)) == "/ip6/fe80::1/udp/5/quic-v1"
    assert str(sockaddr_to_multiaddr(("::1", 7, 0, 0))) == "/ip6/::1/udp/7/quic-v1"
    assert str(sockaddr_to_multiaddr(("fe80::1", 7, 0, 1))) == "/ip6/fe80::1/udp/7/quic-v1"
    assert str(sockaddr_to_multiaddr(("127.0.0.1", 9))) == "/ip4/127.0.0.1/udp/9/quic-v1"
    with pytest.raises(InvalidAddressError, match=r"'example.com'.*resolve"):
        to_multiaddr("example.com", 1)
    for bad_port in (-1, 65536, True):
        with pytest.raises(InvalidAddressError, match="port"):
            to_multiaddr("127.0.0.1", bad_port)
    with pytest.raises(TypeError):
        sockaddr_to_multiaddr(cast(tuple[str, int], ("127.0.0.1",)))


def test_family_name() -> None:
    assert (family_name(AF4), family_name(AF6)) == ("IPv4", "IPv6")
    assert "family" in family_name(socket.AF_UNIX)


# --- check_local_address -----------------------------------------------------------------------


def test_check_local_address_loopback_ok() -> None:
    with no_fd_leak():
        check_local_address("127.0.0.1", AF4)
        check_local_address("127.0.0.3", AF4)


def test_check_local_address_not_on_host() -> None:
    with no_fd_leak(), pytest.raises(InvalidAddressError) as info:
        check_local_address("192.0.2.1", AF4)  # TEST-NET-1: never assigned; bind sends nothing
    assert "'192.0.2.1'" in str(info.value) and "not an address of this host" in str(info.value)
    assert "network namespace" in str(info.value)


def test_check_local_address_family_mismatch() -> None:
    with no_fd_leak(), pytest.raises(InvalidAddressError, match=r"'127.0.0.1'.*IPv4.*IPv6"):
        check_local_address("127.0.0.1", AF6)
    with pytest.raises(InvalidAddressError, match="'nonsense'"):
        check_local_address("nonsense", AF4)
    with pytest.raises(ValueError, match="family"):
        check_local_address("127.0.0.1", socket.AF_UNIX)


# --- bind_udp_socket ---------------------------------------------------------------------------


def test_bind_gives_real_port_df_nonblocking() -> None:
    with no_fd_leak():
        sock = bind_udp_socket("127.0.0.2", 0, AF4)
        try:
            host, port = sock.getsockname()
            assert host == "127.0.0.2" and port != 0
            assert df_bit_set(sock)
            assert sock.getblocking() is False
            assert sock.type == socket.SOCK_DGRAM
        finally:
            sock.close()


@needs_ipv6
def test_bind_ipv6_v6only_df() -> None:
    with no_fd_leak():
        sock = bind_udp_socket("::1", 0, AF6)
        try:
            assert sock.getsockname()[1] != 0
            assert df_bit_set(sock)
            assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        finally:
            sock.close()


def test_bind_port_in_use() -> None:
    holder = bind_udp_socket("127.0.0.2", 0, AF4)
    try:
        port = holder.getsockname()[1]
        with no_fd_leak(), pytest.raises(AddressInUseError) as info:
            bind_udp_socket("127.0.0.2", port, AF4)
        err = info.value
        assert err.errno == errno.EADDRINUSE
        assert isinstance(err, InvalidAddressError)
        assert f"/ip4/127.0.0.2/udp/{port}/quic-v1" in str(err) and "port 0" in str(err)
    finally:
        holder.close()


def test_bind_not_on_host() -> None:
    with no_fd_leak(), pytest.raises(InvalidAddressError, match=r"'192.0.2.1'.*not an address"):
        bind_udp_socket("192.0.2.1", 0, AF4)


@pytest.mark.parametrize(
    ("device", "match"),
    [
        ("", "1 to 15 bytes"),
        ("x" * 16, "1 to 15 bytes"),
        ("nosuchdev0", "no such network interface"),
    ],
)
def test_bind_bad_device(device: str, match: str) -> None:
    with no_fd_leak(), pytest.raises(InvalidAddressError, match=match) as info:
        bind_udp_socket("127.0.0.2", 0, AF4, device=device)
    assert info.value.what == "device" and repr(device) in str(info.value)


def test_bind_device_lo() -> None:
    with no_fd_leak():
        try:
            sock = bind_udp_socket("127.0.0.2", 0, AF4, device="lo")
        except PermissionError:
            pytest.skip("SO_BINDTODEVICE needs CAP_NET_RAW")
        try:
            bound = sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16)
            assert bound.rstrip(b"\0") == b"lo"
        finally:
            sock.close()


def test_bind_argument_errors_leave_no_fd() -> None:
    with no_fd_leak():
        with pytest.raises(InvalidAddressError, match="port"):
            bind_udp_socket("127.0.0.2", 70000, AF4)
        with pytest.raises(InvalidAddressError, match="IPv6"):
            bind_udp_socket("::1", 0, AF4)
        with pytest.raises(TypeError):
            bind_udp_socket("127.0.0.2", 0, AF4, device=5)  # type: ignore[arg-type]


# --- adopt_udp_socket --------------------------------------------------------------------------


def test_adopt_sets_nonblocking_and_df() -> None:
    with no_fd_leak():
        sock = socket.socket(AF4, socket.SOCK_DGRAM)
        try:
            sock.bind(("127.0.0.3", 0))
            assert adopt_udp_socket(sock) is sock
            assert df_bit_set(sock) and sock.getblocking() is False
        finally:
            sock.close()


def test_adopt_rejects_unbound() -> None:
    with no_fd_leak(), socket.socket(AF4, socket.SOCK_DGRAM) as sock:
        with pytest.raises(InvalidAddressError, match="not bound: bind it first"):
            adopt_udp_socket(sock)
        assert sock.fileno() >= 0  # still the caller's, still open


def test_adopt_rejects_tcp_unix_closed_and_non_sockets() -> None:
    with no_fd_leak():
        with socket.socket(AF4, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.2", 0))
            with pytest.raises(InvalidAddressError, match=r"not a UDP socket.*SOCK_DGRAM") as info:
                adopt_udp_socket(tcp)
            assert info.value.what == "sock"
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unix,
            pytest.raises(InvalidAddressError, match="AF_INET or AF_INET6"),
        ):
            adopt_udp_socket(unix)
        closed = socket.socket(AF4, socket.SOCK_DGRAM)
        closed.close()
        with pytest.raises(InvalidAddressError, match="closed"):
            adopt_udp_socket(closed)
        with pytest.raises(TypeError, match="int"):
            adopt_udp_socket(3)  # type: ignore[arg-type]
