"""Test rig: real peers, real sockets, real namespaces, observed on the wire.

- `certs`: self-signed "localhost" certificate (cached per session by the `rig_cert` fixture).
- `aioquic_server`: stock aioquic echo and HTTP/3 file servers that record client addresses;
  can emulate `disable_active_migration` / `preferred_address` peers.
- `client`: small stock aioquic clients (raw streams, HTTP/3 GET), optionally on a given socket.
- `udp_shim`: loopback UDP relay with per-client, per-direction drop rules (rollback tests).
- `netns`: ``qs-*`` namespaces, veth links, the two-path topology, link/nft failure injection.
- `ngtcp2`: Debian's gtlsserver as an independent HTTP/3 peer, with its log parsed.
- `capture`: tshark live UDP capture and key-log QUIC frame decoding.
- `waiting`: deadline-bounded waits on conditions (no fixed sleeps).
- `fixtures`: pytest fixtures over all of the above.
"""
