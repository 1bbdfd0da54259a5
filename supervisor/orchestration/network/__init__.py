"""Network awareness (DESIGN §8): the kernel's rtnetlink events, an inventory of interfaces,
addresses and routes, and the policy that turns them into migrations.

``inventory`` (sans-I/O) and ``budget`` (sans-I/O) hold the facts and rules; ``netlink`` is
the one importer of pyroute2; ``monitor`` is the actor that reads it; ``reactions`` the
policy; ``netns`` makes path sockets in another namespace.
"""

from supervisor.orchestration.network.inventory import NetworkChange, NetworkFacts
from supervisor.orchestration.network.monitor import InterfaceStatus, NetworkStatus, PeerRoute

__all__ = ["InterfaceStatus", "NetworkChange", "NetworkFacts", "NetworkStatus", "PeerRoute"]
