"""What a connection's TLS handshake learnt of its peer, for protocols that check the peer's
certificate themselves instead of against a CA (libp2p TLS, DESIGN §9). aioquic exposes neither
the certificate nor the server's request for one publicly: these are the fence's functions."""

from actors.quic_adapter import ask_client_certificate, peer_certificate_chain

__all__ = ["ask_client_certificate", "peer_certificate_chain"]
