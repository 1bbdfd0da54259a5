"""A py-libp2p 0.8.1 node over QUIC: an independent libp2p peer for the interop tests.

Runs in its own venv (`.peers/py-libp2p/bin/python`, made by `make peers`), never in ours: its
protobuf<7 pin conflicts with ours. Driven by tests/rig/libp2p_peers.py.

    listen --key-type ed25519|secp256k1|rsa [--key-file F]
        Listens on /ip4/127.0.0.1/udp/0/quic-v1 with ping and identify, prints one JSON line
        {"peer_id", "addrs", "pid", "key_type"} when ready, then one JSON line per event, each
        with "event" and "remote_peer_id": connected {remote_addr, direction}; identify and
        identify_push {observed_addr, listen_addrs, protocols, agent_version, ...: what the
        remote reported}; identify_sent {the same fields: what py-libp2p answered}; ping {count,
        quic_path}; disconnected {remote_addr}. Exits 0 on SIGTERM, SIGINT or EOF on stdin.
    dial MULTIADDR [--count N] [--key-type T] [--key-file F]
        Dials, pings N times on one stream, waits for identify; prints {"rtts": [ms...],
        "remote_peer_id", "local_peer_id", "identify": {...} or {"error"}} and exits 0, or
        {"error": "..."} and exits 1.

Logs go to stderr. A key file holds a libp2p protobuf private key; missing, it is created.

What py-libp2p does that the tests rely on (read from its source, 0.8.1, and tried):
- Its transport parameters allow migration (no disable_active_migration; max_idle_timeout
  600 s). Its QUIC listener routes datagrams by connection id and sends to the address aioquic
  chooses, so aioquic's own path validation makes it follow a migrating client. The
  connection's recorded remote address (the multiaddr in its events, the observed address its
  identify sends) stays the one the connection opened with; `ping` events carry `quic_path`,
  the address aioquic now sends to (read from aioquic's private path list).
- Its identify responder labels the observed address /ip4/<ip>/tcp/<port> even on QUIC.
- It calls the extension-signature check but ignores its boolean result, so it accepts a bad
  SignedKey signature (it does check the peer id against the dialled one).
- An inbound QUIC v1 connection's multiaddr is labelled /quic (draft-29), not /quic-v1; a closed
  connection is noticed up to ~2 s late (idle poll); RSA host keys above 4096 bits are refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import libp2p.host.basic_host
import libp2p.identity.identify_push.identify_push
import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import INetConn, INetStream, INotifee
from libp2p.crypto import ed25519, rsa, secp256k1
from libp2p.crypto.keys import KeyPair
from libp2p.host.ping import ID as PING_ID
from libp2p.host.ping import PingService
from libp2p.identity.identify.identify import ID as IDENTIFY_ID
from libp2p.identity.identify.identify import identify_handler_for
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.identity_utils import load_identity, save_identity
from libp2p.io.utils import read_exactly
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.utils.varint import decode_varint_with_size

LISTEN = "/ip4/127.0.0.1/udp/0/quic-v1"
PING_SIZE = 32
IDENTIFY_WAIT = 5.0  # s after the pings for py-libp2p's own identify of the remote
log = logging.getLogger("py_libp2p_peer")

_GENERATORS: dict[str, Callable[[], KeyPair]] = {
    "ed25519": ed25519.create_new_key_pair,
    "secp256k1": secp256k1.create_new_key_pair,
    "rsa": lambda: rsa.create_new_key_pair(2048),
}


def emit(obj: dict[str, Any]) -> None:
    """One JSON object per stdout line, flushed at once: the rig reads lines as they come."""
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def key_pair(key_type: str, key_file: str | None) -> KeyPair:
    if key_file is None:
        return _GENERATORS[key_type]()
    path = Path(key_file)
    if path.exists():
        return load_identity(path)
    pair = _GENERATORS[key_type]()
    save_identity(pair, path)
    return pair


def identify_dict(msg: Identify) -> dict[str, Any]:
    """The fields of an identify message as text (multiaddrs decoded where they parse)."""

    def addr(raw: bytes) -> str:
        try:
            return str(multiaddr.Multiaddr(raw))
        except Exception:
            return "0x" + raw.hex()

    return {
        "protocol_version": msg.protocol_version,
        "agent_version": msg.agent_version,
        "observed_addr": addr(msg.observed_addr) if msg.observed_addr else None,
        "listen_addrs": [addr(a) for a in msg.listen_addrs],
        "protocols": list(msg.protocols),
        "public_key_len": len(msg.public_key),
        "signed_peer_record": bool(msg.signedPeerRecord),
    }


def parse_identify(data: bytes) -> Identify:
    """Identify bytes as written on the stream: varint length prefix, then the protobuf."""
    length, size = decode_varint_with_size(data)
    msg = Identify()
    msg.ParseFromString(data[size : size + length] if size and size + length == len(data) else data)
    return msg


def quic_path(conn: Any) -> str | None:
    """Where aioquic now sends this connection's datagrams (follows a validated migration)."""
    try:
        host, port = conn._quic._network_paths[0].addr[:2]
        return f"{host}:{port}"
    except Exception:
        return None


class TapStream:
    """A stream proxy recording what py-libp2p's own handlers read and write on it."""

    def __init__(self, stream: INetStream, on_write: Callable[[bytes], None] | None = None):
        self._stream = stream
        self._on_write = on_write
        self.read_bytes = bytearray()
        self.written = bytearray()

    async def read(self, n: int | None = None) -> bytes:
        data = await self._stream.read(n)
        self.read_bytes += data
        return data

    async def write(self, data: bytes) -> None:
        await self._stream.write(data)
        self.written += data
        if self._on_write is not None:
            self._on_write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def remote_of(stream: INetStream) -> tuple[str, Any]:
    conn = stream.muxed_conn
    return str(conn.peer_id), conn


class IdentifyLog:
    """What py-libp2p's own identify (and identify push) learnt about each peer.

    py-libp2p identifies every new connection by itself; a second request of ours would exceed
    js-libp2p's limit of one inbound identify stream per connection (it resets it). So the
    peerstore update the host makes from each identify message is wrapped instead.
    """

    def __init__(self, report: bool) -> None:
        self.report = report  # as event lines (listen mode; dial mode prints one result)
        self.received: dict[str, dict[str, Any]] = {}
        self._changed = trio.Event()

    def install(self) -> None:
        for module, event in (
            (libp2p.host.basic_host, "identify"),
            (libp2p.identity.identify_push.identify_push, "identify_push"),
        ):
            module.update_peerstore_from_identify = self._wrap(
                module.update_peerstore_from_identify, event
            )

    def _wrap(self, update: Callable[..., Awaitable[None]], event: str) -> Callable[..., Any]:
        async def recorded(peerstore: Any, peer_id: Any, msg: Identify) -> None:
            info = identify_dict(msg)
            self.received[str(peer_id)] = info
            self._changed.set()
            self._changed = trio.Event()
            if self.report:
                emit({"event": event, "remote_peer_id": str(peer_id), **info})
            await update(peerstore, peer_id, msg)

        return recorded

    async def wait(self, peer_id: str) -> dict[str, Any]:
        while peer_id not in self.received:
            await self._changed.wait()
        return self.received[peer_id]


class _Events(INotifee):
    """Connection events as JSON lines: connected {remote_peer_id, remote_addr, direction} and
    disconnected {remote_peer_id, remote_addr}; py-libp2p reports a closed connection up to ~2 s
    late (its QUIC connection polls every 2 s when idle)."""

    async def connected(self, network: Any, conn: INetConn) -> None:
        emit({"event": "connected", **conn_info(conn), "direction": str(conn.direction)})

    async def disconnected(self, network: Any, conn: INetConn) -> None:
        emit({"event": "disconnected", **conn_info(conn)})

    async def opened_stream(self, network: Any, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: Any, stream: INetStream) -> None:
        pass

    async def listen(self, network: Any, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        pass


def conn_info(conn: INetConn) -> dict[str, Any]:
    """The remote peer and the multiaddr py-libp2p recorded for the connection (fixed at open;
    an inbound QUIC v1 connection is labelled /quic, not /quic-v1)."""
    muxed = conn.muxed_conn
    addrs = muxed.get_transport_addresses() if hasattr(muxed, "get_transport_addresses") else []
    return {"remote_peer_id": str(muxed.peer_id), "remote_addr": str(addrs[0]) if addrs else None}


def tapped_handlers(host: Any) -> dict[str, Callable[[INetStream], Awaitable[None]]]:
    """py-libp2p's own ping and identify responders, with what they answer reported as events:
    ping {remote_peer_id, count, quic_path}; identify_sent {remote_peer_id, ...fields sent}."""
    ping = PingService(host)
    identify = identify_handler_for(host, use_varint_format=True)

    async def on_ping(stream: INetStream) -> None:
        peer, conn = remote_of(stream)
        count = 0

        def answered(data: bytes) -> None:
            nonlocal count
            count += 1
            path = quic_path(conn)
            emit({"event": "ping", "remote_peer_id": peer, "count": count, "quic_path": path})

        await ping.handle_ping(TapStream(stream, answered))

    async def on_identify(stream: INetStream) -> None:
        peer, _ = remote_of(stream)
        tap = TapStream(stream)
        await identify(tap)
        if tap.written:
            sent = identify_dict(parse_identify(bytes(tap.written)))
            emit({"event": "identify_sent", "remote_peer_id": peer, **sent})

    return {PING_ID: on_ping, IDENTIFY_ID: on_identify}


async def wait_for_stop(signals: AsyncIterator[int]) -> None:
    """Return on SIGTERM/SIGINT or EOF on stdin (the rig closing its end or dying)."""
    async with trio.open_nursery() as nursery:

        async def on_signal() -> None:
            async for signum in signals:
                log.info("signal %s: stopping", signum)
                break
            nursery.cancel_scope.cancel()

        async def stdin_eof() -> None:
            stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
            async with stdin:
                while await stdin.receive_some(4096):
                    pass
            log.info("stdin closed: stopping")
            nursery.cancel_scope.cancel()

        nursery.start_soon(on_signal)
        nursery.start_soon(stdin_eof)


async def run_listen(args: argparse.Namespace) -> int:
    pair = key_pair(args.key_type, args.key_file)
    listen = multiaddr.Multiaddr(LISTEN)
    host = new_host(key_pair=pair, listen_addrs=[listen], enable_quic=True)
    IdentifyLog(report=True).install()
    for protocol, handler in tapped_handlers(host).items():
        host.set_stream_handler(protocol, handler)
    # Signals are caught before the ready line: a SIGTERM right after it still exits cleanly.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with host.run(listen_addrs=[listen]):
            host.get_network().register_notifee(_Events())
            emit(
                {
                    "peer_id": str(host.get_id()),
                    "addrs": [str(a) for a in host.get_addrs()],
                    "pid": os.getpid(),
                    "key_type": pair.private_key.get_type().name.lower(),
                }
            )
            await wait_for_stop(signals)
    return 0


async def ping_rtts(host: Any, peer_id: Any, count: int) -> list[float]:
    """`count` pings on one /ipfs/ping/1.0.0 stream, RTTs in ms (float, unlike PingService)."""
    stream = await host.new_stream(peer_id, [PING_ID])
    rtts: list[float] = []
    try:
        for _ in range(count):
            payload = secrets.token_bytes(PING_SIZE)
            start = time.perf_counter()
            await stream.write(payload)
            echoed = await read_exactly(stream, PING_SIZE)
            rtts.append((time.perf_counter() - start) * 1000)
            if echoed != payload:
                raise ValueError("ping payload mismatch")
    finally:
        await stream.close()
    return rtts


async def run_dial(args: argparse.Namespace) -> int:
    pair = key_pair(args.key_type, args.key_file)
    listen = multiaddr.Multiaddr(LISTEN)
    host = new_host(key_pair=pair, listen_addrs=[listen], enable_quic=True)
    identified = IdentifyLog(report=False)
    identified.install()
    try:
        target = info_from_p2p_addr(multiaddr.Multiaddr(args.multiaddr))
    except Exception as exc:
        emit({"error": f"bad multiaddr {args.multiaddr!r}: {exc}"})
        return 2
    result: dict[str, Any]
    try:
        async with host.run(listen_addrs=[listen]):
            with trio.fail_after(args.timeout):
                await host.connect(target)
                rtts = await ping_rtts(host, target.peer_id, args.count)
            identify: dict[str, Any] = {"error": f"no identify result in {IDENTIFY_WAIT} s"}
            with trio.move_on_after(IDENTIFY_WAIT):  # py-libp2p logs why at DEBUG
                identify = await identified.wait(str(target.peer_id))
            result = {
                "rtts": rtts,
                "remote_peer_id": str(target.peer_id),
                "local_peer_id": str(host.get_id()),
                "identify": identify,
            }
            await host.disconnect(target.peer_id)
    except Exception as exc:
        log.exception("dial failed")
        emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    emit(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("listen", "dial"):
        p = sub.add_parser(name)
        p.add_argument("--key-type", choices=sorted(_GENERATORS), default="ed25519")
        p.add_argument("--key-file", help="libp2p protobuf private key; created if missing")
        if name == "dial":
            p.add_argument("multiaddr")
            p.add_argument("--count", type=int, default=3)
            p.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=os.environ.get("PEER_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    return trio.run(run_listen if args.mode == "listen" else run_dial, args)


if __name__ == "__main__":
    sys.exit(main())
