"""Faults beyond drop and link state, inside ``qs-`` namespaces: added delay, NAT rebinding.

- `nfq_delay`: every UDP datagram leaving an interface is held for a fixed time by a userspace
  process (`tests/rig/nfq_delay.py`, NetfilterQueue) before the kernel sends it. ``tc netem`` is
  not in this kernel, nor is nftables' ``queue`` statement (CONFIG_NFT_QUEUE is off), but the
  xtables NFQUEUE target is: the rule is added with ``iptables`` (its nft backend runs the xt
  target through nft_compat). Queues are per network namespace.
- `SnatRebinder`: source NAT of one local UDP address in the client namespace (an nft ``nat``
  postrouting chain), changed on demand, followed by ``conntrack -F`` so the next datagram
  gets the new mapping: the server sees the connection arrive from a new address/port, as
  after a NAT rebinding.

Both only ever touch the namespace they are given (which must be a ``qs-`` one), and undo
what they did on exit; the namespace's deletion removes anything left anyway.
"""

from __future__ import annotations

import contextlib
import importlib.util
import secrets
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.rig.netns import NetNS, _require_qs, _stop_process

__all__ = ["SnatRebinder", "delay_unavailable", "nat_unavailable", "nfq_delay"]

DELAYER = Path(__file__).with_name("nfq_delay.py")


def delay_unavailable() -> str | None:
    """Why `nfq_delay` cannot run here, or None."""
    if shutil.which("iptables") is None:
        return "iptables (Debian package iptables) not installed: needed for the NFQUEUE target"
    if importlib.util.find_spec("netfilterqueue") is None:
        return "the NetfilterQueue Python package is not installed (pip install -e '.[dev]')"
    return None


def nat_unavailable() -> str | None:
    """Why `SnatRebinder` cannot run here, or None."""
    if shutil.which("conntrack") is None:
        return "conntrack (Debian package conntrack) not installed: needed to flush NAT state"
    return None


@contextlib.contextmanager
def nfq_delay(
    ns: NetNS, iface: str, delay: float, *, queue: int = 7, ready_timeout: float = 10.0
) -> Iterator[subprocess.Popen[str]]:
    """Delay every UDP datagram leaving ``iface`` in ``ns`` by ``delay`` seconds."""
    _require_qs(ns.name)
    proc = ns.popen(
        [sys.executable, str(DELAYER), "--queue", str(queue), "--delay", str(delay)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    rule = ["OUTPUT", "-o", iface, "-p", "udp", "-j", "NFQUEUE", "--queue-num", str(queue)]
    added = False
    try:
        assert proc.stdout is not None
        readable, _, _ = select.select([proc.stdout], [], [], ready_timeout)
        line = proc.stdout.readline() if readable else ""
        if line.strip() != "ready":
            _stop_process(proc)
            err = proc.stderr.read() if proc.stderr is not None else ""
            raise RuntimeError(f"NFQUEUE delayer did not start: {line!r} {err.strip()}")
        ns.run(["iptables", "-A", *rule])
        added = True
        yield proc
    finally:
        if added:
            ns.run(["iptables", "-D", *rule], check=False)
        _stop_process(proc)  # accepts whatever it still holds, then unbinds the queue


class SnatRebinder:
    """Source NAT for ``addr:port`` (UDP) in namespace ``ns``; `rebind` changes the mapping."""

    def __init__(self, ns: NetNS, addr: str, port: int) -> None:
        _require_qs(ns.name)
        self.ns = ns
        self.addr = addr
        self.port = port
        self.table = f"qs_nat_{secrets.token_hex(4)}"
        self._open = False
        self.mapped_port: int | None = None

    def __enter__(self) -> SnatRebinder:
        self._nft(
            f"table ip {self.table} {{\n"
            "  chain post { type nat hook postrouting priority srcnat; policy accept; }\n"
            "  chain pre { type filter hook prerouting priority raw; policy accept; }\n"
            "}\n"
        )
        self._open = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _nft(self, script: str) -> None:
        self.ns.run(["nft", "-f", "-"], input=script)

    def rebind(self, new_port: int) -> None:
        """From now on ``addr:port`` leaves as ``addr:new_port`` (rule swapped atomically, then
        the conntrack table flushed: an existing flow keeps its old mapping otherwise).

        Datagrams still sent to the socket's own port are dropped before conntrack sees them,
        as a real NAT drops what arrives for a mapping it forgot. Without that, a server
        datagram landing between the flush and the client's next one made the flow the
        server's (inbound, never source-NATed): the rebinding silently never happened (seen
        once in a full suite run)."""
        self._nft(
            f"flush chain ip {self.table} post\n"
            f"add rule ip {self.table} post ip saddr {self.addr} udp sport {self.port} "
            f"counter snat to {self.addr}:{new_port}\n"
            f"flush chain ip {self.table} pre\n"
            f"add rule ip {self.table} pre ip daddr {self.addr} udp dport {self.port} "
            f"counter drop\n"
        )
        self.ns.run(["conntrack", "-F"])
        self.mapped_port = new_port

    def close(self) -> None:
        if self._open:
            self._open = False
            self.ns.run(["nft", "delete", "table", "ip", self.table], check=False)
            self.ns.run(["conntrack", "-F"], check=False)
