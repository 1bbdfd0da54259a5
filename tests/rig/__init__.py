"""Test rig: real peers, real sockets, real namespaces, observed on the wire.

- `certs`: self-signed "localhost" certificate (cached per session by the `rig_cert` fixture).
- `aioquic_server`: stock aioquic echo and HTTP/3 file servers that record client addresses;
  can emulate `disable_active_migration` / `preferred_address` peers.
- `client`: small stock aioquic clients (raw streams, HTTP/3 GET), optionally on a given socket.
- `udp_shim`: loopback UDP relay with per-client, per-direction drop rules (rollback tests).
- `netns`: ``qs-*`` namespaces, veth links, the two-path topology, link/nft failure injection.
- `ngtcp2`: Debian's gtlsserver as an independent HTTP/3 peer, with its log parsed.
- `capture`: tshark live UDP capture and key-log QUIC frame decoding.
- `quic_wire`, `migration_wire`: decoded packets of a capture, and the checks of a client
  migration on the wire (first packet on the new address, old path probing-only, CIDs).
- `rebind`: client — router — server namespaces whose router NAT really rebinds (SNAT
  fully-random, conntrack flushed; two SNAT addresses for rebind-addr).
- `interop_results`: the locked JSON writer of the interop cases' outcomes
  (`bench/results/interop.json`, rendered into the README by `python -m bench.report`).
- `waiting`: deadline-bounded waits on conditions (no fixed sleeps).
- `fixtures`: pytest fixtures over all of the above.
"""
