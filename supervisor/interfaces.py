"""The host's interface addresses (``getifaddrs(3)``), for drain by device and for telling a
broadcast address from a path address.

Why ctypes and not a netlink dump: it needs no optional dependency (pyroute2 is the ``netlink``
extra) and answers in ~0.2 ms in whatever network namespace the calling thread is in.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket

__all__ = ["IPInterface", "interface_addresses"]

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class _IfAddrs(ctypes.Structure):
    pass


class _SockAddr(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("data", ctypes.c_ubyte * 14)]


class _SockAddrIn(ctypes.Structure):
    _fields_ = [
        ("family", ctypes.c_ushort),
        ("port", ctypes.c_uint16),
        ("addr", ctypes.c_ubyte * 4),
        ("zero", ctypes.c_ubyte * 8),
    ]


class _SockAddrIn6(ctypes.Structure):
    _fields_ = [
        ("family", ctypes.c_ushort),
        ("port", ctypes.c_uint16),
        ("flowinfo", ctypes.c_uint32),
        ("addr", ctypes.c_ubyte * 16),
        ("scope_id", ctypes.c_uint32),
    ]


_IfAddrs._fields_ = [
    ("next", ctypes.POINTER(_IfAddrs)),
    ("name", ctypes.c_char_p),
    ("flags", ctypes.c_uint),
    ("addr", ctypes.POINTER(_SockAddr)),
    ("netmask", ctypes.POINTER(_SockAddr)),
    ("ifu", ctypes.POINTER(_SockAddr)),
    ("data", ctypes.c_void_p),
]


def _raw_ip(ptr: ctypes._Pointer[_SockAddr]) -> bytes | None:
    if not ptr:
        return None
    family = ptr.contents.family
    if family == socket.AF_INET:
        return bytes(ctypes.cast(ptr, ctypes.POINTER(_SockAddrIn)).contents.addr)
    if family == socket.AF_INET6:
        return bytes(ctypes.cast(ptr, ctypes.POINTER(_SockAddrIn6)).contents.addr)
    return None


def interface_addresses() -> dict[str, list[IPInterface]]:
    """Every IPv4/IPv6 address of every interface in this network namespace, with its prefix."""
    libc = ctypes.CDLL(None, use_errno=True)
    head = ctypes.POINTER(_IfAddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"getifaddrs: {os.strerror(err)}")
    out: dict[str, list[IPInterface]] = {}
    try:
        node = head
        while node:
            ifa = node.contents
            raw, mask = _raw_ip(ifa.addr), _raw_ip(ifa.netmask)
            if raw is not None and ifa.name:
                prefix = len(raw) * 8
                if mask is not None and len(mask) == len(raw):
                    prefix = bin(int.from_bytes(mask, "big")).count("1")
                address = ipaddress.ip_address(raw)
                out.setdefault(ifa.name.decode(), []).append(
                    ipaddress.ip_interface(f"{address}/{prefix}")
                )
            node = ifa.next
    finally:
        libc.freeifaddrs(head)
    return out
