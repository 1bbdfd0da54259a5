"""The contract: what a user of quic-supervisor may rely on, apart from what implements it.

Handles (``Connection``, ``MigratableConn``, ``Path``), events, errors, configuration
(policies) and the view types and requests they exchange, as go-libp2p keeps ``core/network``
apart from ``p2p/``. Nothing here imports orchestration, a remote front-end or the CLI (an
import-linter contract keeps it so): a handle talks to whatever implements ``Client``.
"""
