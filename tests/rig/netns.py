"""Network-namespace topologies for multi-path tests (iproute2 + nftables via subprocess).

Why namespaces: real multi-path needs distinct source addresses with distinct routes, link failures
and per-path loss, none of which loopback offers. Safety: every namespace is named ``qs-<random>``
and created and deleted here; test addresses (10.77.x, fd77::) exist only inside them, the root
namespace never gets a route to them, and nft tables are only ever created inside a ``qs-``
namespace.

pytest runs in the root namespace. Sockets are created inside a namespace by a short-lived helper
thread that ``setns``-es into it (a socket keeps the namespace it was created in), then handed to
asyncio/aioquic with ``sock=``: one event loop drives client and server in different namespaces.

Calls are synchronous (each `ip` call takes a few ms); asyncio fixtures may call them directly.

`TwoPathTopology`::

    client ns                                       server ns
      c0 10.77.1.2/24 fd77:1::2/64 ---veth--- s0 10.77.1.1/24 fd77:1::1/64
      c1 10.77.2.2/24 fd77:2::2/64 ---veth--- s1 10.77.2.1/24 fd77:2::1/64
                                                lo 10.77.0.1/32 fd77::1/128 (the server address)

The client source-routes per path (``ip rule from 10.77.1.2 table 101`` -> via 10.77.1.1 dev c0;
likewise path 1 with table 102), followed by an ``ip rule from 10.77.1.2 unreachable``: when a
path's link is down its routes are flushed and a send fails at once with ENETUNREACH instead of
leaking onto the other link. The server needs nothing: both client subnets are directly connected,
so replies leave on the link the client address belongs to.

Failure modes offered (pick by what the test means): client-side `link_down` (sendto raises
ENETUNREACH, the "interface went away" case); server-side `link_down` (carrier lost, silent loss);
`blackhole` (silent loss both ways, nft on the receiving side: an nft drop on an *output* hook would
surface as EPERM to the sender); `random_drop` (loss on the receiving side; ``tc netem`` is not in
this kernel).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

__all__ = [
    "Filters",
    "NetNS",
    "NftTable",
    "PathSpec",
    "TwoPathTopology",
    "UdpCounters",
    "blackhole",
    "cleanup_stale",
    "create_socket_in_netns",
    "link_down",
    "link_up",
    "netns_available",
    "random_drop",
    "two_path_topology",
    "veth",
    "wait_oper_up",
]

PREFIX = "qs-"
NETNS_DIR = Path("/run/netns")
#: One file per namespace this rig created, holding the creator's PID (see `cleanup_stale`).
OWNER_DIR = Path("/run/qs-rig")
CLONE_NEWNET = 0x40000000


class CommandError(RuntimeError):
    """A setup command failed; carries its argv and stderr."""


def _run(args: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(
        list(args), input=input, capture_output=True, text=True, timeout=30, check=False
    )
    if check and proc.returncode != 0:
        raise CommandError(f"{' '.join(args)!r} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _ip(*args: str, ns: str | None = None, check: bool = True) -> str:
    return _run(["ip", *(["-n", ns] if ns else []), *args], check=check)


def _require_qs(ns: str) -> None:
    if not ns.startswith(PREFIX):
        raise ValueError(f"refusing to touch namespace {ns!r}: the rig only manages {PREFIX}*")


def _is_v6(addr: str) -> bool:
    return ipaddress.ip_interface(addr).version == 6


# ---- availability and stale cleanup ----------------------------------------------------------

_available: tuple[bool, str] | None = None


def netns_available() -> tuple[bool, str]:
    """(True, "") if namespaces, veth and nft work here (root, iproute2, nft); else why not."""
    global _available
    if _available is None:
        _available = _probe_available()
    return _available


def _probe_available() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return False, f"{tool} (iproute2/nftables) not installed"
    try:
        with NetNS() as a, NetNS() as b:
            veth(a.name, b.name, "10.77.255.1/30", "10.77.255.2/30", "p0", "p1")
            NftTable(a.name).close()
    except (CommandError, OSError) as exc:
        return False, f"network namespaces unusable: {exc}"
    return True, ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(min_age: float = 600.0) -> list[str]:
    """Delete ``qs-*`` namespaces left by crashed runs; returns the names deleted.

    A namespace is stale when the PID recorded at its creation is dead, or, with no record (made by
    other code), when it is older than `min_age` seconds. Namespaces of live runs are kept, so
    parallel runs are safe.
    """
    deleted: list[str] = []
    if not NETNS_DIR.is_dir():
        return deleted
    now = time.time()
    for entry in NETNS_DIR.iterdir():
        name = entry.name
        if not name.startswith(PREFIX):
            continue
        owner_file = OWNER_DIR / name
        try:
            owner = int(owner_file.read_text().strip())
            stale = not _pid_alive(owner)
        except (OSError, ValueError):
            try:
                stale = now - entry.stat().st_mtime > min_age
            except OSError:
                continue
        if stale:
            _kill_netns_pids(name)
            _ip("netns", "del", name, check=False)
            owner_file.unlink(missing_ok=True)
            deleted.append(name)
    if OWNER_DIR.is_dir():
        for owner_file in OWNER_DIR.iterdir():
            if not (NETNS_DIR / owner_file.name).exists():
                owner_file.unlink(missing_ok=True)
    return deleted


def _kill_netns_pids(name: str, timeout: float = 3.0) -> None:
    """Terminate, then kill, every process living in namespace `name` (never this process)."""
    _require_qs(name)
    pids = [int(p) for p in _ip("netns", "pids", name, check=False).split() if p.isdigit()]
    pids = [p for p in pids if p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _pid_alive(p) and not _reap(p)]
            if pids:
                time.sleep(0.02)
        if not pids:
            return


def _reap(pid: int) -> bool:
    """Reap `pid` if it is our exited child; True when it is gone."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == pid


# ---- sockets inside a namespace --------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python >= 3.12
    if setns is not None:
        setns(fd, CLONE_NEWNET)
        return
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def create_socket_in_netns(
    ns_name: str,
    family: socket.AddressFamily = socket.AF_INET,
    bind_addr: str | None = None,
    port: int = 0,
    *,
    type: socket.SocketKind = socket.SOCK_DGRAM,
) -> socket.socket:
    """A socket created (and bound, when `bind_addr` is given) inside namespace `ns_name`.

    A helper thread enters the namespace, so the caller's threads stay in theirs; the socket keeps
    the namespace for its whole life. IPv6 sockets are V6ONLY. The socket is blocking, as
    `socket.socket()` returns it (asyncio makes it non-blocking when it takes it).
    """
    result: list[socket.socket | BaseException] = []

    def work() -> None:
        try:
            with open(NETNS_DIR / ns_name) as nsfile:
                _setns(nsfile.fileno())
            sock = socket.socket(family, type)
            try:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if bind_addr is not None:
                    sock.bind((bind_addr, port))
            except BaseException:
                sock.close()
                raise
            result.append(sock)
        except BaseException as exc:  # handed to the caller's thread
            result.append(exc)

    thread = threading.Thread(target=work, name=f"setns-{ns_name}", daemon=True)
    thread.start()
    thread.join()
    outcome = result[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


# ---- namespaces, links -----------------------------------------------------------------------


class NetNS:
    """A ``qs-<random>`` network namespace with lo up; deleted, with its processes, on close."""

    def __init__(self, tag: str = "") -> None:
        suffix = secrets.token_hex(4)
        self.name = f"{PREFIX}{suffix}{'-' + tag if tag else ''}"
        self._procs: list[subprocess.Popen[Any]] = []
        self._sockets: list[socket.socket] = []
        self._nft: list[NftTable] = []
        self._open = False

    def __enter__(self) -> NetNS:
        OWNER_DIR.mkdir(parents=True, exist_ok=True)
        (OWNER_DIR / self.name).write_text(str(os.getpid()))
        try:
            _ip("netns", "add", self.name)
            self._open = True
            _ip("link", "set", "lo", "up", ns=self.name)
            # Explicit, so a distribution's sysctl defaults cannot change the topology.
            self.sysctl("net.ipv4.conf.all.rp_filter", "0")
            self.sysctl("net.ipv4.conf.default.rp_filter", "0")
            self.sysctl("net.ipv6.conf.all.keep_addr_on_down", "1")
            self.sysctl("net.ipv6.conf.default.keep_addr_on_down", "1")
            # No duplicate address detection: nothing else lives on these links, and a link-local
            # address still tentative (DAD, ~1-2 s after link up) cannot source a neighbour
            # solicitation, so a reply to a client address the server has not yet learned
            # (e.g. a second address on the same link) would be dropped for seconds.
            self.sysctl("net.ipv6.conf.all.accept_dad", "0")
            self.sysctl("net.ipv6.conf.default.accept_dad", "0")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sysctl(self, key: str, value: str) -> None:
        """Set a sysctl inside the namespace (/proc/sys/net is per-namespace)."""
        self.run(["sysctl", "-q", "-w", f"{key}={value}"])

    def run(self, args: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
        """Run a command inside the namespace and return its stdout."""
        return _run(["ip", "netns", "exec", self.name, *args], input=input, check=check)

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process inside the namespace; it is terminated (then killed) on close."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *args], **kwargs)
        self._procs.append(proc)
        return proc

    def socket(
        self, family: socket.AddressFamily = socket.AF_INET, bind_addr: str | None = None,
        port: int = 0,
    ) -> socket.socket:
        """A UDP socket in this namespace (see `create_socket_in_netns`); closed on close."""
        sock = create_socket_in_netns(self.name, family, bind_addr, port)
        self._sockets.append(sock)
        return sock

    def nft_table(self) -> NftTable:
        table = NftTable(self.name)
        self._nft.append(table)
        return table

    def close(self) -> None:
        """Idempotent teardown: processes, sockets, nft tables, the namespace, the owner record."""
        for proc in self._procs:
            _stop_process(proc)
        self._procs.clear()
        for sock in self._sockets:
            if sock.fileno() != -1:
                sock.close()
        self._sockets.clear()
        for table in self._nft:
            table.close()
        self._nft.clear()
        if self._open:
            _kill_netns_pids(self.name)
            _ip("netns", "del", self.name, check=False)
            self._open = False
        (OWNER_DIR / self.name).unlink(missing_ok=True)

    def exists(self) -> bool:
        return (NETNS_DIR / self.name).exists()


def _stop_process(proc: subprocess.Popen[Any], timeout: float = 3.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def veth(
    ns_a: str,
    ns_b: str,
    addr_a: str,
    addr_b: str,
    ifname_a: str,
    ifname_b: str,
    *,
    addr6_a: str | None = None,
    addr6_b: str | None = None,
) -> None:
    """A veth pair straight between two namespaces (never visible in the root namespace), up.

    Addresses are CIDR strings ("10.77.1.2/24"); IPv6 ones get ``nodad`` so they are usable at
    once (no duplicate address detection wait).
    """
    _require_qs(ns_a)
    _require_qs(ns_b)
    _ip("link", "add", "name", ifname_a, "netns", ns_a, "type", "veth",
        "peer", "name", ifname_b, "netns", ns_b)
    ends = ((ns_a, ifname_a, (addr_a, addr6_a)), (ns_b, ifname_b, (addr_b, addr6_b)))
    for ns, ifname, addrs in ends:
        for addr in addrs:
            if addr is None:
                continue
            extra = ["nodad"] if _is_v6(addr) else []
            _ip("addr", "add", addr, "dev", ifname, *extra, ns=ns)
        _ip("link", "set", ifname, "up", ns=ns)


def wait_oper_up(ns: str, ifnames: Sequence[str], timeout: float = 5.0) -> None:
    """Poll until every interface reports operstate UP (carrier); the kernel's link watcher can
    take up to a second after ``link set up``, and IPv6 does not send on a link without carrier."""
    _require_qs(ns)
    pending = set(ifnames)
    deadline = time.monotonic() + timeout
    while True:
        for link in json.loads(_ip("-j", "link", "show", ns=ns) or "[]"):
            if link.get("operstate") == "UP":
                pending.discard(link.get("ifname"))
        if not pending:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"interfaces {sorted(pending)} in {ns} not up after {timeout}s")
        time.sleep(0.02)


def link_down(ns: str, ifname: str) -> None:
    """Administratively down an interface (its routes go; its peer loses carrier)."""
    _require_qs(ns)
    _ip("link", "set", ifname, "down", ns=ns)


def link_up(ns: str, ifname: str) -> None:
    """Bring an interface back up (static routes through it must be re-added: see topology)."""
    _require_qs(ns)
    _ip("link", "set", ifname, "up", ns=ns)


# ---- nftables --------------------------------------------------------------------------------


class NftTable:
    """An ``inet qs_<random>`` table with input and output filter chains in a ``qs-`` namespace.

    Rules are plain nft rule text; the whole table is deleted on close (idempotent, and harmless
    when the namespace is already gone).
    """

    def __init__(self, ns: str) -> None:
        _require_qs(ns)
        self.ns = ns
        self.name = f"qs_{secrets.token_hex(4)}"
        self._open = True
        self._nft(
            f"table inet {self.name} {{\n"
            "  chain input { type filter hook input priority -10; policy accept; }\n"
            "  chain output { type filter hook output priority -10; policy accept; }\n"
            "}\n"
        )

    def _nft(self, script: str) -> None:
        _run(["ip", "netns", "exec", self.ns, "nft", "-f", "-"], input=script)

    def add(self, chain: Literal["input", "output"], rule: str) -> None:
        self._nft(f"add rule inet {self.name} {chain} {rule}\n")

    def counters(self) -> str:
        """The table as nft lists it (rule counters included when rules use ``counter``)."""
        return _run(["ip", "netns", "exec", self.ns, "nft", "list", "table", "inet", self.name])

    def close(self) -> None:
        if self._open:
            self._open = False
            _run(["ip", "netns", "exec", self.ns, "nft", "delete", "table", "inet", self.name],
                 check=False)

    def __enter__(self) -> NftTable:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def blackhole(
    ns: str,
    addr: str,
    *,
    direction: Literal["both", "in", "out"] = "in",
    match: Literal["any", "src", "dst"] = "any",
) -> NftTable:
    """Drop UDP to/from `addr` in namespace `ns`; close the returned table to lift it.

    `direction` picks the hook: "in" (default) drops silently on receipt; "out" drops before
    sending, which the local sender sees as EPERM from sendto. `match` says whether `addr` must be
    the source, the destination, or either.
    """
    family = "ip6" if _is_v6(addr) else "ip"
    table = NftTable(ns)
    try:
        hooks: dict[str, list[Literal["input", "output"]]] = {
            "both": ["input", "output"], "in": ["input"], "out": ["output"]}
        chains = hooks[direction]
        fields = {"any": ["saddr", "daddr"], "src": ["saddr"], "dst": ["daddr"]}[match]
        for chain in chains:
            for f in fields:
                table.add(chain, f"{family} {f} {addr} meta l4proto udp counter drop")
    except BaseException:
        table.close()
        raise
    return table


class Filters:
    """Several nft tables lifted together (e.g. both ends of a blackholed path)."""

    def __init__(self, tables: Sequence[NftTable]) -> None:
        self.tables = list(tables)

    def dropped(self) -> int:
        """Packets dropped so far by the rules' counters."""
        total = 0
        for table in self.tables:
            for line in table.counters().splitlines():
                parts = line.split()
                if "packets" in parts and "drop" in parts:
                    total += int(parts[parts.index("packets") + 1])
        return total

    def close(self) -> None:
        for table in self.tables:
            table.close()

    def __enter__(self) -> Filters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class UdpCounters:
    """Count UDP datagrams per interface and direction in namespace `ns` (nft counters only,
    nothing is dropped): ``read()`` returns ``{"in:<if>": packets, "out:<if>": packets}``.

    Counted at the input and output hooks (a datagram the namespace forwards is not counted).
    Close (or leave the ``with``) to delete the table.
    """

    def __init__(self, ns: str, ifnames: Sequence[str]) -> None:
        self.table = NftTable(ns)
        self.ifnames = tuple(ifnames)
        try:
            hooks: tuple[tuple[Literal["input", "output"], str, str], ...] = (
                ("input", "iifname", "in"), ("output", "oifname", "out"))
            for ifname in self.ifnames:
                for chain, key, tag in hooks:
                    self.table.add(
                        chain,
                        f'{key} "{ifname}" meta l4proto udp counter comment "{tag}:{ifname}"',
                    )
        except BaseException:
            self.table.close()
            raise

    def read(self) -> dict[str, int]:
        """Packets counted so far, by ``"in:<if>"`` / ``"out:<if>"``."""
        out = _run(["ip", "netns", "exec", self.table.ns, "nft", "-j", "list", "table", "inet",
                    self.table.name])
        counts: dict[str, int] = {}
        for item in json.loads(out).get("nftables", []):
            rule = item.get("rule")
            if not rule or "comment" not in rule:
                continue
            packets = next(
                (e["counter"]["packets"] for e in rule.get("expr", []) if "counter" in e), 0
            )
            counts[rule["comment"]] = int(packets)
        return counts

    def link(self, ifname: str, counts: dict[str, int] | None = None) -> int:
        """Both directions of one interface (from `counts`, or read now)."""
        counts = self.read() if counts is None else counts
        return counts.get(f"in:{ifname}", 0) + counts.get(f"out:{ifname}", 0)

    def close(self) -> None:
        self.table.close()

    def __enter__(self) -> UdpCounters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def random_drop(ns: str, iface: str, probability: float) -> NftTable:
    """Drop each UDP datagram received on `iface` in `ns` with `probability` (0..1).

    Loss is applied on the receiving side (input hook): ``tc netem`` is not in this kernel.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    table = NftTable(ns)
    try:
        threshold = round(probability * 10000)
        if threshold >= 10000:
            table.add("input", f'iifname "{iface}" meta l4proto udp counter drop')
        elif threshold > 0:
            rule = f"numgen random mod 10000 < {threshold} counter drop"
            table.add("input", f'iifname "{iface}" meta l4proto udp {rule}')
    except BaseException:
        table.close()
        raise
    return table


# ---- the standard two-path topology ----------------------------------------------------------


@dataclass(frozen=True)
class PathSpec:
    """One client<->server link of `TwoPathTopology`."""

    index: int
    client_if: str
    server_if: str
    client_v4: str
    server_v4: str
    client_v6: str
    server_v6: str
    table: int


class TwoPathTopology:
    """Client and server namespaces joined by two veth links; see the module docstring."""

    SERVER_V4 = "10.77.0.1"
    SERVER_V6 = "fd77::1"
    PATHS = (
        PathSpec(0, "c0", "s0", "10.77.1.2", "10.77.1.1", "fd77:1::2", "fd77:1::1", 101),
        PathSpec(1, "c1", "s1", "10.77.2.2", "10.77.2.1", "fd77:2::2", "fd77:2::1", 102),
    )

    def __init__(self, ipv6: bool = True) -> None:
        self.ipv6 = ipv6
        self.client = NetNS("c")
        self.server = NetNS("s")
        self._stack = contextlib.ExitStack()

    @property
    def paths(self) -> tuple[PathSpec, ...]:
        return self.PATHS

    def __enter__(self) -> TwoPathTopology:
        try:
            self._stack.enter_context(self.client)
            self._stack.enter_context(self.server)
            s = self.server.name
            _ip("addr", "add", f"{self.SERVER_V4}/32", "dev", "lo", ns=s)
            if self.ipv6:
                _ip("addr", "add", f"{self.SERVER_V6}/128", "dev", "lo", "nodad", ns=s)
            for p in self.PATHS:
                veth(
                    self.client.name, s, f"{p.client_v4}/24", f"{p.server_v4}/24",
                    p.client_if, p.server_if,
                    addr6_a=f"{p.client_v6}/64" if self.ipv6 else None,
                    addr6_b=f"{p.server_v6}/64" if self.ipv6 else None,
                )
                # Per-path lookup, then a hard stop: never fall through to another link.
                pref = 1000 + 10 * p.index
                for fam, src in (("-4", p.client_v4), ("-6", p.client_v6 if self.ipv6 else None)):
                    if src is None:
                        continue
                    _ip(fam, "rule", "add", "pref", str(pref), "from", src, "table", str(p.table),
                        ns=self.client.name)
                    _ip(fam, "rule", "add", "pref", str(pref + 1), "from", src, "unreachable",
                        ns=self.client.name)
                self._routes(p)
            wait_oper_up(self.client.name, [p.client_if for p in self.PATHS])
            wait_oper_up(s, [p.server_if for p in self.PATHS])
        except BaseException:
            self.close()
            raise
        return self

    def _routes(self, p: PathSpec, check: bool = True) -> None:
        """(Re)install path `p`'s client routes (a downed link flushes them); idempotent."""
        c = self.client.name
        t = str(p.table)
        _ip("route", "replace", self.SERVER_V4, "via", p.server_v4, "dev", p.client_if,
            "table", t, ns=c, check=check)
        if self.ipv6:
            _ip("-6", "route", "replace", self.SERVER_V6, "via", p.server_v6,
                "dev", p.client_if, "table", t, ns=c, check=check)
        if p.index == 0:
            # Main table: unbound client sockets reach the server over path 0.
            _ip("route", "replace", self.SERVER_V4, "via", p.server_v4, "dev", p.client_if,
                ns=c, check=check)
            if self.ipv6:
                _ip("-6", "route", "replace", self.SERVER_V6, "via", p.server_v6,
                    "dev", p.client_if, ns=c, check=check)

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        # Also covers a failure inside __enter__ before the stack held both namespaces.
        self.server.close()
        self.client.close()

    def names(self) -> list[str]:
        return [self.client.name, self.server.name]

    # ---- sockets ----

    def client_socket(
        self, path: int, family: socket.AddressFamily = socket.AF_INET, port: int = 0
    ) -> socket.socket:
        """A UDP socket in the client namespace bound to path `path`'s client address."""
        p = self.PATHS[path]
        addr = p.client_v6 if family == socket.AF_INET6 else p.client_v4
        return self.client.socket(family, addr, port)

    def server_socket(
        self, family: socket.AddressFamily = socket.AF_INET, port: int = 0
    ) -> socket.socket:
        """A UDP socket in the server namespace bound to the server address (both paths)."""
        addr = self.SERVER_V6 if family == socket.AF_INET6 else self.SERVER_V4
        return self.server.socket(family, addr, port)

    def server_addr(self, family: socket.AddressFamily = socket.AF_INET) -> str:
        return self.SERVER_V6 if family == socket.AF_INET6 else self.SERVER_V4

    # ---- failures ----

    def link_down(self, path: int, side: Literal["client", "server"] = "client") -> None:
        """Down path `path`: client side, sends from its address fail at once (ENETUNREACH);
        server side, the client keeps sending into a link without carrier (silent loss)."""
        p = self.PATHS[path]
        if side == "client":
            link_down(self.client.name, p.client_if)
        else:
            link_down(self.server.name, p.server_if)

    def link_up(self, path: int, side: Literal["client", "server"] = "client") -> None:
        """Bring path `path` back and restore its routes (downing a link flushes them)."""
        p = self.PATHS[path]
        if side == "client":
            link_up(self.client.name, p.client_if)
        else:
            link_up(self.server.name, p.server_if)
        self._routes(p, check=False)  # the other side may still be down
        with contextlib.suppress(TimeoutError):  # it stays down if the other side is down
            wait_oper_up(self.client.name, [p.client_if], timeout=2.0)
            wait_oper_up(self.server.name, [p.server_if], timeout=2.0)

    def blackhole(self, path: int) -> Filters:
        """Silently lose everything on path `path`, both ways and both families (close to lift).

        Drops on the receiving side of each end (input hooks on c<i> and s<i>), so neither
        endpoint gets an error: the path just goes dark, as a dead middlebox would make it.
        """
        p = self.PATHS[path]
        tables = []
        try:
            for ns, ifname in ((self.client, p.client_if), (self.server, p.server_if)):
                table = ns.nft_table()
                tables.append(table)
                table.add("input", f'iifname "{ifname}" meta l4proto udp counter drop')
        except BaseException:
            Filters(tables).close()
            raise
        return Filters(tables)

    def random_drop(
        self, path: int, probability: float, side: Literal["client", "server"] = "server"
    ) -> NftTable:
        """Random loss on path `path`, applied where datagrams are received on `side`."""
        p = self.PATHS[path]
        if side == "client":
            table = random_drop(self.client.name, p.client_if, probability)
            self.client._nft.append(table)
        else:
            table = random_drop(self.server.name, p.server_if, probability)
            self.server._nft.append(table)
        return table


@contextlib.contextmanager
def two_path_topology(ipv6: bool = True) -> Iterator[TwoPathTopology]:
    """`TwoPathTopology` as a plain context manager function."""
    with TwoPathTopology(ipv6=ipv6) as topo:
        yield topo

