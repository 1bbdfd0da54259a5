"""QUIC multiaddrs and path sockets.

Addresses cross the API as ``/ip4|ip6/ADDR/udp/PORT/quic-v1`` multiaddrs (parsed with the
``multiaddr`` package, never by hand) and become UDP sockets here. Every path socket has the DF
bit set (RFC 9000 section 14: a PATH_CHALLENGE padded to 1200 bytes must not be fragmented, or a
path with a too-small MTU would validate) and is non-blocking. Errors name the input and the fix.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import socket
import time
from typing import Any, Final

from multiaddr import Multiaddr
from multiaddr.exceptions import Error as MultiaddrError

from actors.errors import AddressInUseError, InvalidAddressError
from supervisor.interfaces import interface_addresses

__all__ = [
    "adopt_udp_socket",
    "bind_udp_socket",
    "check_local_address",
    "df_bit_set",
    "family_name",
    "multiaddr_text",
    "parse_quic_multiaddr",
    "sockaddr_to_multiaddr",
    "to_multiaddr",
]

# Linux values from <linux/in.h> and <linux/in6.h>; Python 3.11's socket module lacks them.
IP_MTU_DISCOVER: Final = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DO: Final = getattr(socket, "IP_PMTUDISC_DO", 2)  # always set DF, never fragment
IPV6_MTU_DISCOVER: Final = getattr(socket, "IPV6_MTU_DISCOVER", 23)
IPV6_PMTUDISC_DO: Final = getattr(socket, "IPV6_PMTUDISC_DO", 2)
_IFNAMSIZ: Final = 16  # interface names are at most 15 bytes plus NUL

_EXAMPLE: Final = "/ip4/10.0.0.1/udp/4433/quic-v1"
_DNS: Final = frozenset({"dns", "dns4", "dns6", "dnsaddr"})


def family_name(af: int) -> str:
    """``"IPv4"``/``"IPv6"`` for messages."""
    if af == socket.AF_INET:
        return "IPv4"
    if af == socket.AF_INET6:
        return "IPv6"
    return f"address family {af}"


def _family_of(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    return socket.AF_INET if ip.version == 4 else socket.AF_INET6


def _hint_host_port(value: str) -> str:
    """For a ``host:port`` string, the multiaddr the user probably meant."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not port.isdigit():
        return ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return ""
    if ip.version == 4:
        return f": write it as /ip4/{ip}/udp/{int(port)}/quic-v1"
    return f": write it as /ip6/{ip}/udp/{int(port)}/quic-v1"


def parse_quic_multiaddr(value: str | Multiaddr, *, what: str = "address") -> tuple[str, int, int]:
    """Parse exactly ``/ip4|ip6/ADDR/udp/PORT/quic-v1`` into ``(ip, port, family)``.

    ``what`` names the argument in errors (e.g. ``"local_addr"``). Raises ``TypeError`` for a
    value that is neither a string nor a Multiaddr, ``InvalidAddressError`` for anything else
    that is not that form. The IP comes back in canonical ``ipaddress`` spelling.
    """
    if isinstance(value, Multiaddr):
        ma = value
    elif isinstance(value, str):
        if not value.strip():
            raise InvalidAddressError(
                value, f"it is empty: use a multiaddr like {_EXAMPLE}", what=what
            )
        if not value.startswith("/"):
            hint = _hint_host_port(value) or f": use a multiaddr like {_EXAMPLE}"
            raise InvalidAddressError(value, f"it is not a multiaddr{hint}", what=what)
        try:
            ma = Multiaddr(value)
        except (MultiaddrError, ValueError) as exc:
            detail = getattr(exc, "message", None) or exc
            raise InvalidAddressError(
                value, f"it is not a valid multiaddr ({detail}): use the form {_EXAMPLE}", what=what
            ) from exc
    else:
        raise TypeError(
            f"{what} must be a multiaddr string or a multiaddr.Multiaddr, "
            f"got {type(value).__name__}: {value!r}"
        )

    try:
        parts: list[tuple[str, Any]] = [(p.name, v) for p, v in ma.items()]
    except (MultiaddrError, ValueError) as exc:
        raise InvalidAddressError(value, f"it cannot be decoded ({exc})", what=what) from exc

    def bad(reason: str) -> InvalidAddressError:
        return InvalidAddressError(value, reason, what=what)

    names = [name for name, _ in parts]
    if not parts:
        raise bad(f"it is empty: use a multiaddr like {_EXAMPLE}")
    first, raw_ip = parts[0]
    if first in _DNS:
        raise bad(
            f"DNS names (/{first}/{raw_ip}) are not supported here: resolve the name first and "
            "pass /ip4/... or /ip6/..."
        )
    if first == "ip6zone":
        raise bad(
            "IPv6 zones (/ip6zone) are not supported: use a global IPv6 address, or bind a "
            "socket to the link-local address yourself and pass it with sock="
        )
    if first not in ("ip4", "ip6"):
        raise bad(f"it must start with /ip4/ or /ip6/, not /{first}: use the form {_EXAMPLE}")
    if len(parts) < 2:
        raise bad("the transport is missing: append /udp/PORT/quic-v1")
    transport, raw_port = parts[1]
    if transport == "tcp":
        raise bad(f"QUIC runs over UDP, not TCP: use /udp/{raw_port}/quic-v1 instead of /tcp/...")
    if transport != "udp":
        raise bad(f"expected /udp/PORT after the IP address, got /{transport}")
    if len(parts) < 3:
        raise bad("udp without quic-v1: append /quic-v1")
    if names[2] == "quic":
        raise bad("/quic is QUIC draft-29, which is not supported: use /quic-v1 (RFC 9000)")
    if names[2] != "quic-v1":
        raise bad(f"expected /quic-v1 after /udp/{raw_port}, got /{names[2]}")
    if len(parts) > 3:
        rest = "".join(f"/{n}" if v is None else f"/{n}/{v}" for n, v in parts[3:])
        if "p2p" in names[3:]:
            raise bad(f"a peer ID belongs in a dial address only: remove {rest}")
        raise bad(f"unexpected components after /quic-v1: remove {rest}")

    ip = ipaddress.ip_address(raw_ip)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        raise bad(
            f"IPv4-mapped IPv6 addresses are not used here: write /ip4/{ip.ipv4_mapped}/udp/"
            f"{raw_port}/quic-v1"
        )
    return str(ip), int(raw_port), _family_of(ip)


def split_peer_id(value: str | Multiaddr, *, what: str = "address") -> tuple[str, str | None]:
    """``(/ip4|ip6/ADDR/udp/PORT/quic-v1, peer id text or None)``: a dial address may end in
    ``/p2p/<peer-id>`` (libp2p mode, DESIGN §9); the rest is checked by the caller with
    `parse_quic_multiaddr`, the peer id by ``PeerId.parse``."""
    text = str(value) if isinstance(value, Multiaddr) else value
    if not isinstance(text, str):
        return text, None  # parse_quic_multiaddr names the wrong type
    head, sep, tail = text.rstrip("/").rpartition("/p2p/")
    if not sep:
        return text, None
    if not tail or "/" in tail:
        raise InvalidAddressError(
            value,
            "/p2p/ must be the last component, followed by the peer id: "
            "/ip4/ADDR/udp/PORT/quic-v1/p2p/12D3KooW...",
            what=what,
        )
    return head, tail


def to_multiaddr(host: str, port: int) -> Multiaddr:
    """``/ip4|ip6/HOST/udp/PORT/quic-v1`` for a numeric host (as sockets report it).

    An IPv4-mapped IPv6 host (``::ffff:a.b.c.d``) becomes ``/ip4``. An IPv6 zone (``%eth0``)
    is dropped: ``/ip6zone`` is not supported, and the socket keeps its scope anyway.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidAddressError(port, "a UDP port is an int in 0..65535", what="port")
    if not isinstance(host, str):
        raise TypeError(f"host must be a str, got {type(host).__name__}: {host!r}")
    return _to_multiaddr(host, port)


@functools.lru_cache(maxsize=4096)
def _to_multiaddr(host: str, port: int) -> Multiaddr:
    # Remembered: building a Multiaddr costs ~40 us, and every snapshot, event and span of a
    # switch names its paths' addresses (bench B1: a third of a switch's CPU). Multiaddr values
    # are never mutated, so sharing one is safe.
    bare = host.partition("%")[0]
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        raise InvalidAddressError(
            host, "it is not a numeric IP address: resolve the name first", what="host"
        ) from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    proto = "ip4" if ip.version == 4 else "ip6"
    return Multiaddr(f"/{proto}/{ip}/udp/{port}/quic-v1")


@functools.lru_cache(maxsize=4096)
def multiaddr_text(addr: Multiaddr) -> str:
    """``str(addr)``, remembered (a Multiaddr decodes its bytes again on every ``str()``)."""
    return str(addr)


def sockaddr_to_multiaddr(sockaddr: tuple[Any, ...]) -> Multiaddr:
    """``to_multiaddr`` for a socket address: ``(host, port)`` or IPv6's
    ``(host, port, flowinfo, scope_id)`` as ``getsockname()``/``recvfrom()`` return them."""
    if not isinstance(sockaddr, tuple) or len(sockaddr) not in (2, 4):
        raise TypeError(
            f"sockaddr must be (host, port) or (host, port, flowinfo, scope_id), got {sockaddr!r}"
        )
    return to_multiaddr(sockaddr[0], sockaddr[1])


def _check_family(ip: str, family: int) -> None:
    if family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError(f"family must be socket.AF_INET or socket.AF_INET6, got {family!r}")
    try:
        parsed = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        raise InvalidAddressError(ip, "it is not a numeric IP address") from None
    if _family_of(parsed) != family:
        raise InvalidAddressError(
            ip,
            f"it is an {family_name(_family_of(parsed))} address but the socket is "
            f"{family_name(family)}: the local address must match the peer's address family",
        )


def _not_on_host(ip: str) -> InvalidAddressError:
    return InvalidAddressError(
        ip,
        "it is not an address of this host (or of the network namespace the socket is created "
        "in): use an address shown by `ip addr`, add it to an interface, or create the socket "
        "in the right namespace and pass it with sock=",
    )


def _new_udp_socket(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        if family == socket.AF_INET6:
            # one family per socket: a v6 path never silently becomes a v4-mapped one
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def check_path_ip(ip: str, *, what: str = "local address") -> None:
    """Raise ``InvalidAddressError`` unless ``ip`` can be a path's own address: one unicast
    address, never a wildcard (a path's address is what the peer sees and what snapshots
    show), multicast or broadcast."""
    addr = ipaddress.ip_address(ip)
    if addr.is_unspecified:
        raise InvalidAddressError(
            ip,
            "a wildcard is not a path address: give the address the path sends from (or "
            "device= to use the interface's address)",
            what=what,
        )
    if addr.is_multicast:
        raise InvalidAddressError(ip, "a multicast address cannot be a path address", what=what)
    if isinstance(addr, ipaddress.IPv4Address) and _is_broadcast(addr):
        raise InvalidAddressError(ip, "a broadcast address cannot be a path address", what=what)


def _is_broadcast(addr: ipaddress.IPv4Address) -> bool:
    """The limited broadcast address, or the broadcast address of a network on one of this
    host's interfaces (getifaddrs(3), as drain reads them)."""
    return addr == ipaddress.IPv4Address("255.255.255.255") or addr in _local_broadcasts()


_BROADCASTS_TTL = 2.0  # seconds: interfaces change rarely, add_path may come in thousands
_broadcasts: tuple[float, frozenset[ipaddress.IPv4Address]] = (-_BROADCASTS_TTL, frozenset())


def _local_broadcasts() -> frozenset[ipaddress.IPv4Address]:
    """Broadcast addresses of this host's IPv4 networks, read at most every couple of seconds
    (getifaddrs costs ~0.2 ms: once per add_path, it slowed 1,000 dials by a tenth)."""
    global _broadcasts
    now = time.monotonic()
    if now - _broadcasts[0] < _BROADCASTS_TTL:
        return _broadcasts[1]
    found = frozenset(
        net.network.broadcast_address
        for nets in interface_addresses().values()
        for net in nets
        if isinstance(net, ipaddress.IPv4Interface) and net.network.prefixlen < 31
    )
    _broadcasts = (now, found)
    return found


def path_socket_error(exc: OSError, shown: str, *, what: str) -> BaseException:
    """The typed error for a failed bind of ``shown`` (a listener's or a path's address)."""
    if exc.errno == errno.EADDRINUSE:
        return AddressInUseError(shown, what=what, errno=exc.errno)
    if exc.errno == errno.EADDRNOTAVAIL:
        return _not_on_host(shown)
    if isinstance(exc, socket.gaierror):
        return InvalidAddressError(shown, f"it cannot be used as a local address ({exc})")
    return exc


def check_local_address(ip: str, family: int) -> None:
    """Raise ``InvalidAddressError`` unless a UDP socket can bind ``ip`` here.

    Binds a throwaway socket to ``(ip, 0)`` and closes it; nothing is sent. Catches a typo'd or
    absent address at ``add_path``/``dial`` time instead of at the first probe. On Linux all of
    127.0.0.0/8 binds without setup. Other socket errors (EMFILE ...) propagate unchanged.
    """
    _check_family(ip, family)
    check_path_ip(ip)
    sock = _new_udp_socket(family)
    try:
        sock.bind((ip, 0))
    except socket.gaierror as exc:
        raise InvalidAddressError(ip, f"it cannot be used as a local address ({exc})") from exc
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            raise _not_on_host(ip) from exc
        raise
    finally:
        sock.close()


def _check_device(device: object) -> str:
    if not isinstance(device, str):
        raise TypeError(f"device must be an interface name (str), got {type(device).__name__}")
    if not device or len(device.encode()) >= _IFNAMSIZ or "/" in device or device.isspace():
        raise InvalidAddressError(
            device,
            f"an interface name is 1 to {_IFNAMSIZ - 1} bytes: use a name shown by `ip link`",
            what="device",
        )
    names = {name for _, name in socket.if_nameindex()}
    if device not in names:
        raise InvalidAddressError(
            device,
            "no such network interface in this network namespace: use one of "
            f"{', '.join(sorted(names))}",
            what="device",
        )
    return device


def _set_df(sock: socket.socket) -> None:
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)


def df_bit_set(sock: socket.socket) -> bool:
    """True if the socket sends with the DF bit (PMTU discovery mode "do")."""
    if sock.family == socket.AF_INET6:
        return sock.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER) == IPV6_PMTUDISC_DO
    return sock.getsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER) == IP_PMTUDISC_DO


def bind_udp_socket(ip: str, port: int, family: int, *, device: str | None = None) -> socket.socket:
    """A non-blocking UDP socket with DF set (and IPV6_V6ONLY for IPv6), optionally bound to
    ``device`` (SO_BINDTODEVICE), bound to ``(ip, port)``. The caller owns it.

    Raises ``AddressInUseError`` (EADDRINUSE), ``InvalidAddressError`` (not on this host, family
    mismatch, bad device), ``PermissionError`` (SO_BINDTODEVICE needs CAP_NET_RAW; ports below
    1024 need CAP_NET_BIND_SERVICE). The socket is closed on every error: nothing leaks.
    """
    _check_family(ip, family)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidAddressError(port, "a UDP port is an int in 0..65535", what="port")
    if device is not None:
        device = _check_device(device)
    shown = str(to_multiaddr(ip, port))
    sock = _new_udp_socket(family)
    try:
        sock.setblocking(False)
        _set_df(sock)
        if device is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
            except PermissionError as exc:
                raise PermissionError(
                    exc.errno,
                    f"binding a socket to device {device!r} needs CAP_NET_RAW: run with that "
                    "capability, or create the socket yourself and pass it with sock=",
                ) from exc
        try:
            sock.bind((ip, port))
        except socket.gaierror as exc:
            raise InvalidAddressError(ip, f"it cannot be used as a local address ({exc})") from exc
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUseError(shown, errno=exc.errno) from exc
            if exc.errno == errno.EADDRNOTAVAIL:
                raise _not_on_host(ip) from exc
            if exc.errno == errno.EACCES:
                raise PermissionError(
                    exc.errno,
                    f"binding {shown} is not permitted: ports below 1024 need "
                    "CAP_NET_BIND_SERVICE; use port 0 or a port >= 1024",
                ) from exc
            raise
    except BaseException:
        sock.close()
        raise
    return sock


def adopt_udp_socket(sock: socket.socket) -> socket.socket:
    """Check and prepare a socket handed in with ``sock=`` (e.g. made in another network
    namespace): a bound IPv4/IPv6 UDP socket. Sets non-blocking and DF; returns ``sock``.

    On success the library owns the socket (closes it with its path). On error the socket is
    left as it was, open: it is still the caller's.
    """
    if not isinstance(sock, socket.socket):
        raise TypeError(f"sock must be a socket.socket, got {type(sock).__name__}: {sock!r}")
    if sock.fileno() < 0:
        raise InvalidAddressError(sock, "the socket is closed: pass an open socket", what="sock")
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise InvalidAddressError(
            sock,
            f"it is a {sock.family!r} socket: pass an AF_INET or AF_INET6 UDP socket",
            what="sock",
        )
    if sock.type != socket.SOCK_DGRAM or sock.proto not in (0, socket.IPPROTO_UDP):
        raise InvalidAddressError(
            sock,
            f"it is not a UDP socket ({sock.type!r}, proto {sock.proto}): create it with "
            "socket.socket(family, socket.SOCK_DGRAM)",
            what="sock",
        )
    if sock.getsockname()[1] == 0:
        raise InvalidAddressError(
            sock,
            "it is not bound: bind it first, e.g. sock.bind((local_ip, 0))",
            what="sock",
        )
    sock.setblocking(False)
    _set_df(sock)
    return sock


def bind_path_socket(
    local_addr: str | None,
    device: str | None,
    sock: socket.socket | None,
    family: int,
    remote_ip: str,
    *,
    what: str,
) -> socket.socket:
    """The bound socket of a new path: the one handed in (``sock=``), or one bound to
    ``local_addr``, or (neither) to the address routed towards the peer, so a path's address
    is never a wildcard. Argument errors name the input; nothing is left open."""
    if sock is not None:
        sock = adopt_udp_socket(sock)
        try:
            if sock.family != family:
                raise InvalidAddressError(
                    "sock", f"socket family differs from the peer's ({remote_ip})", what=what
                )
            bound_ip, bound_port = sock.getsockname()[:2]
            check_path_ip(bound_ip, what="sock")
            if local_addr is not None:
                ip, port, _fam = parse_quic_multiaddr(local_addr, what=what)
                if ipaddress.ip_address(ip) != ipaddress.ip_address(bound_ip) or (
                    port not in (0, bound_port)
                ):
                    raise InvalidAddressError(
                        local_addr,
                        f"the socket given with sock= is bound to "
                        f"{to_multiaddr(bound_ip, bound_port)}: give that address, or none",
                        what=what,
                    )
        except BaseException:
            sock.close()
            raise
        return sock
    if local_addr is None:
        ip = "::" if family == socket.AF_INET6 else "0.0.0.0"
        probe = bind_udp_socket(ip, 0, family, device=device)
        try:
            probe.connect((remote_ip, 9))  # no packet: only asks the kernel for the route
            routed = probe.getsockname()[0]
        finally:
            probe.close()
        return bind_udp_socket(routed, 0, family, device=device)
    ip, port, fam = parse_quic_multiaddr(local_addr, what=what)
    if fam != family:
        raise InvalidAddressError(
            local_addr,
            f"its IP family differs from the peer's ({remote_ip}): use an "
            f"{'/ip6' if family == socket.AF_INET6 else '/ip4'} local address",
            what=what,
        )
    check_path_ip(ip, what=what)
    return bind_udp_socket(ip, port, family, device=device)


def preferred_address_refusal(offered: str, dialled: str) -> str | None:
    """Why a server's preferred address (RFC 9000 §9.6) must not be followed, or None.

    RFC 9000 §21.5.3 and §9.6: a server could point clients at a victim. Refused: the
    unspecified, multicast and broadcast addresses, another IP family, and loopback,
    link-local or private addresses unless the dialled address is of the same class (a
    public server cannot send us into our own network)."""
    try:
        to = ipaddress.ip_address(offered)
        came = ipaddress.ip_address(dialled)
    except ValueError:
        return "not an IP address"
    if to.version != came.version:
        return "another IP family than the dialled address"
    if to.is_unspecified or to.is_multicast:
        return "unspecified or multicast"
    if isinstance(to, ipaddress.IPv4Address) and to == ipaddress.IPv4Address("255.255.255.255"):
        return "broadcast"
    kind, dialled_kind = _address_class(to), _address_class(came)
    if kind != "global" and kind != dialled_kind:
        return f"a {kind} address, while the dialled one is {dialled_kind}"
    return None


def _address_class(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link-local"
    if addr.is_private:
        return "private"
    return "global"
