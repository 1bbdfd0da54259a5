"""libp2p mode (DESIGN §9): peer identity, the libp2p TLS handshake, multistream-select, ping and
identify. Protocol modules beside the contract: sans-I/O where they can be, over our Streams
where they cannot."""

from supervisor.libp2p.identify import IdentifyInfo
from supervisor.libp2p.keys import Identity, KeyType, PublicKey
from supervisor.libp2p.multistream import NoCommonProtocolError, ProtocolNegotiationError
from supervisor.libp2p.peer_calls import identify_peer, ping_peer
from supervisor.libp2p.peer_id import PeerId

__all__ = [
    "IdentifyInfo",
    "Identity",
    "KeyType",
    "NoCommonProtocolError",
    "PeerId",
    "ProtocolNegotiationError",
    "PublicKey",
    "identify_peer",
    "ping_peer",
]
