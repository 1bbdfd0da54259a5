"""The server's preferred address (RFC 9000 §9.6): ignore it (the default) or follow it.

aioquic 1.7 would move to an advertised preferred address by itself, unasked; the adapter
keeps the offer instead and the connection reports it once the handshake completed. Following
it is an ordinary migration sent through the policy port as a user would: a path from the
active local address to the preferred address (its own fresh CID), probed (validated before
any non-probing frame goes there, §21.5.3), switched to with reason ``preferred_address``,
then the old path closed. Unsafe addresses are refused (see
``addresses.preferred_address_refusal``) and every offer is counted by what became of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from actors.errors import MigrationError
from supervisor.addresses import preferred_address_refusal
from supervisor.core.messages import (
    AddPathRequest,
    ClosePathRequest,
    PathAddedReply,
    ProbeRequest,
    SwitchRequest,
)
from supervisor.orchestration.policy import PolicyPort

log = logging.getLogger(__name__)

PreferredAddressMode = Literal["ignore", "follow"]

#: How long the preferred address's probe may take before it counts as unreachable.
PROBE_TIMEOUT = 2.0


class PreferredAddressPolicy:
    def __init__(
        self, port: PolicyPort, mode: PreferredAddressMode, count: Callable[[str], None]
    ) -> None:
        self.port = port
        self.mode = mode
        self._count = count

    def on_offer(self, conn_id: str, address: tuple[str, int]) -> None:
        view = self.port.view(conn_id)
        if view is None or view.closed:
            return
        if self.mode == "ignore":
            self._count("ignored")
            return
        why = preferred_address_refusal(address[0], view.remote[0])
        if why is not None:
            log.warning(
                "connection %s: preferred address %s:%d refused (%s)", conn_id, *address, why
            )
            self._count("refused")
            return
        if view.peer_disabled_migration:
            # RFC 9000 §9.6 lets a client use the preferred address even then; we do not
            # send from another local socket to a peer that forbade migration.
            self._count("refused")
            return
        self.port.spawn(self._follow(conn_id), name=f"preferred-address:{conn_id}")

    async def _follow(self, conn_id: str) -> None:
        view = self.port.view(conn_id)
        if view is None or view.active_path_id is None:
            return
        old = view.active_path_id
        path_id: int | None = None
        try:
            added = await self.port.ask(AddPathRequest(conn_id, preferred_address=True))
            assert isinstance(added, PathAddedReply)
            path_id = added.path_id
            await self.port.ask(ProbeRequest(conn_id, path_id, PROBE_TIMEOUT))
            await self.port.ask(
                SwitchRequest(conn_id, path_id, reason="preferred_address")
            )
        except MigrationError as exc:
            log.info("connection %s: preferred address not followed: %s", conn_id, exc)
            if path_id is not None:
                await self._close(conn_id, path_id)
            self._count("unreachable")
            return
        await self._close(conn_id, old)  # the dialled address is not used any more
        self._count("followed")

    async def _close(self, conn_id: str, path_id: int) -> None:
        try:
            await self.port.ask(ClosePathRequest(conn_id, path_id))
        except MigrationError as exc:
            log.info("connection %s: path %d not closed: %s", conn_id, path_id, exc)
