"""A NAT that really rebinds: client, router and server namespaces, source NAT on the router.

The QUIC interop runner's ``rebind-port`` and ``rebind-addr`` cases need docker; this is the same
situation on one host. Topology (IPv4; every address inside 10.88.0.0/16, in ``qs-`` namespaces
this module creates and deletes)::

    client ns                    router ns (forwarding, NAT)                 server ns
      c0 10.88.1.2/24 ---veth--- r0 10.88.1.1/24
         10.88.1.3/24            r1 10.88.2.1/24 + NAT 10.88.2.11, .12 ---veth--- s0 10.88.2.2/24

The client's only route to the server goes through the router; the server has no route to the
client subnet at all (only its own /24), so nothing reaches a client except through a NAT
mapping. On the router, ``postrouting`` source-NATs everything from 10.88.1.0/24 leaving r1 to
one NAT address with ``fully-random`` ports. `RebindingNat.rebind_port` makes it forget every
mapping: the next client datagram gets a new random port. `RebindingNat.rebind_addr` also swaps
the NAT address (one ``nft -f`` script, atomic). To forget, each rebind moves all packets
to a fresh conntrack zone (atomically) and deletes the old zone's entries, so each rebind makes
exactly one new mapping (a bare ``conntrack -F`` races with a busy flow: see `_rebind_script`).
A real NAT forgets the old mapping: a server datagram arriving on r1 for a flow the router does
not know (``ct state new``) is dropped in ``prerouting`` before it can become an inbound flow of
its own, and nothing is forwarded towards the client that is not the reply of a client-opened
flow.
`RebindingNat.stale_drops` counts what the first rule dropped.

`NamespaceLoop`: an event loop in a thread that entered a namespace, for code that binds its
own sockets (`Supervisor.listen` binds its address itself; a socket belongs to the namespace of
the thread that created it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, Literal, TypeVar

from .netns import (
    NETNS_DIR,
    NetNS,
    _run,
    _setns,
    create_socket_in_netns,
    veth,
    wait_oper_up,
)

__all__ = ["NamespaceLoop", "RebindingNat", "rebinding_nat"]

T = TypeVar("T")


class RebindingNat:
    """Client, router and server namespaces with a rebinding source NAT; see the module doc."""

    CLIENT_ADDRS = ("10.88.1.2", "10.88.1.3")
    CLIENT_SUBNET = "10.88.1.0/24"
    ROUTER_CLIENT_SIDE = "10.88.1.1"
    ROUTER_SERVER_SIDE = "10.88.2.1"
    NAT_ADDRS = ("10.88.2.11", "10.88.2.12")
    SERVER = "10.88.2.2"
    TABLE = "qs_rebind"

    def __init__(self) -> None:
        self.client = NetNS("c")
        self.router = NetNS("r")
        self.server = NetNS("s")
        self.nat_addr = self.NAT_ADDRS[0]
        self.rebinds = 0
        #: The conntrack zone of the current mappings (a rebind moves to the next one).
        self.zone = 1
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> RebindingNat:
        try:
            for ns in (self.client, self.router, self.server):
                self._stack.enter_context(ns)
            c, r, s = self.client.name, self.router.name, self.server.name
            veth(c, r, f"{self.CLIENT_ADDRS[0]}/24", f"{self.ROUTER_CLIENT_SIDE}/24", "c0", "r0")
            veth(r, s, f"{self.ROUTER_SERVER_SIDE}/24", f"{self.SERVER}/24", "r1", "s0")
            for extra in self.CLIENT_ADDRS[1:]:
                _run(["ip", "-n", c, "addr", "add", f"{extra}/24", "dev", "c0"])
            for nat in self.NAT_ADDRS:
                _run(["ip", "-n", r, "addr", "add", f"{nat}/32", "dev", "r1"])
            _run(["ip", "-n", c, "route", "add", "default", "via", self.ROUTER_CLIENT_SIDE])
            self.router.sysctl("net.ipv4.ip_forward", "1")
            # The checks count datagrams on the wire: ngtcp2 sends with UDP GSO, which a
            # capture on s0 would show as one datagram of many packets. One segment per skb
            # makes the kernel split them before the capture point.
            _run(["ip", "-n", s, "link", "set", "dev", "s0", "gso_max_segs", "1"])
            self._nft(self._table_script())
            wait_oper_up(c, ["c0"])
            wait_oper_up(r, ["r0", "r1"])
            wait_oper_up(s, ["s0"])
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Delete the three namespaces (and with them links, tables, conntrack state)."""
        self._stack.close()
        for ns in (self.server, self.router, self.client):
            ns.close()

    def names(self) -> list[str]:
        return [self.client.name, self.router.name, self.server.name]

    # ---- nftables on the router ----

    def _snat_rule(self, addr: str) -> str:
        return (
            f'add rule ip {self.TABLE} post ip saddr {self.CLIENT_SUBNET} oifname "r1" '
            f"counter snat to {addr} fully-random\n"
        )

    def _table_script(self) -> str:
        t = self.TABLE
        return (
            f"table ip {t} {{\n"
            "  chain post { type nat hook postrouting priority srcnat; policy accept; }\n"
            # Before conntrack: the zone of every packet (see _rebind_script).
            "  chain zone { type filter hook prerouting priority raw; policy accept; }\n"
            # After conntrack (priority -200): what the server sends to a forgotten mapping.
            "  chain pre { type filter hook prerouting priority 0; policy accept;\n"
            '    iifname "r1" ct state new counter drop comment "stale"\n'
            '    iifname "r1" ct state invalid counter drop comment "invalid"\n'
            "  }\n"
            "  chain forward_filter { type filter hook forward priority 0; policy drop;\n"
            f'    iifname "r0" oifname "r1" ip saddr {self.CLIENT_SUBNET} accept\n'
            '    iifname "r1" oifname "r0" ct state established accept\n'
            "  }\n"
            "}\n" + self._snat_rule(self.nat_addr) + self._zone_rules(self.zone)
        )

    def _nft(self, script: str) -> None:
        self.router.run(["nft", "-f", "-"], input=script)

    def _counter(self, comment: str) -> int:
        out = self.router.run(["nft", "-j", "list", "table", "ip", self.TABLE])
        for item in json.loads(out).get("nftables", []):
            rule = item.get("rule")
            if rule and rule.get("comment") == comment:
                for expr in rule.get("expr", []):
                    if "counter" in expr:
                        return int(expr["counter"]["packets"])
        return 0

    def stale_drops(self) -> int:
        """Server datagrams the router dropped because no mapping (flow) knew them."""
        return self._counter("stale")

    # ---- rebinding ----

    def _zone_rules(self, zone: int) -> str:
        return "".join(
            f'add rule ip {self.TABLE} zone iifname "{i}" ct zone set {zone}\n'
            for i in ("r0", "r1")
        )

    def _rebind_script(self, kind: Literal["port", "addr"]) -> tuple[str, str]:
        """(NAT address afterwards, shell script run in the router for one rebind).

        A plain ``conntrack -F`` walks the table while packets keep coming: a client datagram
        arriving mid-walk makes a new mapping the walk may still delete, so one busy flow came
        out of one flush with two or three mappings in a row (each a "rebind" shorter than a
        round trip). So every packet is put in a conntrack zone, and a rebind moves both sides
        to a fresh zone in one nft transaction (with the address swap, for "addr"): from that
        packet on, the old mappings are invisible (forgotten) and exactly one new one is made;
        then the old zone's entries are deleted (``conntrack -D -w``), which cannot touch the
        new zone's. Nothing is dropped on the client side."""
        new = self.nat_addr
        old_zone, zone = self.zone, self.zone + 1
        nft = f"flush chain ip {self.TABLE} zone\n" + self._zone_rules(zone)
        if kind == "addr":
            new = self.NAT_ADDRS[1] if self.nat_addr == self.NAT_ADDRS[0] else self.NAT_ADDRS[0]
            nft += f"flush chain ip {self.TABLE} post\n" + self._snat_rule(new)
        script = f"nft -f - <<'EOF'\n{nft}EOF\nconntrack -D -w {old_zone} >/dev/null 2>&1 || true\n"
        return new, script

    def _committed(self, nat_addr: str) -> None:
        self.nat_addr = nat_addr
        self.zone += 1
        self.rebinds += 1

    def rebind_port(self) -> None:
        """Forget every mapping: the next client datagram leaves from a new random port."""
        new, script = self._rebind_script("port")
        self.router.run(["sh", "-s"], input=script)
        self._committed(new)

    def rebind_addr(self) -> None:
        """Swap the NAT address and forget every mapping: a new address and port."""
        new, script = self._rebind_script("addr")
        self.router.run(["sh", "-s"], input=script)
        self._committed(new)

    async def rebind(self, kind: Literal["port", "addr"]) -> None:
        """`rebind_port` / `rebind_addr` without blocking the event loop (a subprocess)."""
        new, script = self._rebind_script(kind)
        await self._exec(["sh", "-s"], script)
        self._committed(new)

    async def _exec(self, args: list[str], stdin: str | None = None) -> None:
        proc = await asyncio.create_subprocess_exec(
            "ip",
            "netns",
            "exec",
            self.router.name,
            *args,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate(stdin.encode() if stdin is not None else None)
        if proc.returncode != 0:
            raise RuntimeError(f"{args} in the router failed ({proc.returncode}): {err!r}")

    # ---- sockets ----

    def client_socket(self, index: int = 0) -> Any:
        """A UDP socket in the client namespace bound to client address `index`."""
        return self.client.socket(bind_addr=self.CLIENT_ADDRS[index])

    def raw_client_socket(self, index: int = 0) -> Any:
        """Like `client_socket`, but owned by the caller (not closed with the namespace)."""
        return create_socket_in_netns(self.client.name, bind_addr=self.CLIENT_ADDRS[index])


@contextlib.contextmanager
def rebinding_nat() -> Iterator[RebindingNat]:
    """`RebindingNat` as a plain context manager function."""
    with RebindingNat() as nat:
        yield nat


class NamespaceLoop:
    """An asyncio event loop on a thread that entered network namespace `ns` first.

    ``await nsloop.run(coro)`` runs `coro` there and awaits its result from the caller's loop.
    Closing cancels what still runs there and joins the thread.
    """

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.loop = asyncio.new_event_loop()
        self._ready = concurrent.futures.Future[None]()
        self._thread = threading.Thread(target=self._main, name=f"nsloop-{ns}", daemon=True)

    def _main(self) -> None:
        try:
            with open(NETNS_DIR / self.ns) as nsfile:
                _setns(nsfile.fileno())
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set_result, None)
        self.loop.run_forever()
        # Cancel whatever is left, let it clean up, then close.
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def __enter__(self) -> NamespaceLoop:
        self._thread.start()
        self._ready.result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(self.submit(coro))

    def call(self, fn: Any, *args: Any) -> Any:
        """Run plain `fn(*args)` on the namespace loop and return its result (blocking)."""

        async def inside() -> Any:
            return fn(*args)

        return self.submit(inside()).result(timeout=30)

    def close(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=30)
