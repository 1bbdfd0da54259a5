"""Make a stock aioquic server send Retire Prior To (RFC 9000 §5.1.2) on demand.

aioquic 1.7 always writes ``retire_prior_to = 0`` (a FIXME in its source). For the test of our
client's handling we issue fresh server CIDs by hand and write them with a Retire Prior To that
covers every CID issued before: the client must retire them all, the active one included, and
give each path a fresh one. Test rig only (aioquic private members are fine here: the library's
fence is ``actors/quic_adapter.py``).
"""

from __future__ import annotations

import os
import types
from typing import Any

from aioquic.quic.connection import QuicConnection, QuicConnectionId
from aioquic.quic.packet import QuicFrameType
from aioquic.quic.packet_builder import QuicPacketBuilder

_CAPACITY = 1 + 8 + 8 + 1 + 20 + 16


def raise_retire_prior_to(quic: QuicConnection, fresh: int = 4) -> int:
    """Issue ``fresh`` new CIDs with a Retire Prior To of the first of them; returns it.

    They leave with the server's next packet (send something to the server to trigger one)."""
    first = max(c.sequence_number for c in quic._host_cids) + 1
    for seq in range(first, first + fresh):
        quic._host_cids.append(
            QuicConnectionId(
                cid=os.urandom(quic._configuration.connection_id_length),
                sequence_number=seq,
                stateless_reset_token=os.urandom(16),
            )
        )
    quic._host_cid_seq = first + fresh
    quic.__dict__["_rig_retire_prior_to"] = first
    if not isinstance(quic.__dict__.get("_write_new_connection_id_frame"), types.MethodType):
        quic._write_new_connection_id_frame = types.MethodType(  # type: ignore[method-assign]
            _write_new_connection_id_frame, quic
        )
    return first


def _write_new_connection_id_frame(
    self: Any, builder: QuicPacketBuilder, connection_id: QuicConnectionId
) -> None:
    """aioquic's writer, with the rig's Retire Prior To instead of its constant 0."""
    from aioquic.quic import events

    retire_prior_to = min(
        self.__dict__.get("_rig_retire_prior_to", 0), connection_id.sequence_number
    )
    buf = builder.start_frame(
        QuicFrameType.NEW_CONNECTION_ID,
        capacity=_CAPACITY,
        handler=self._on_new_connection_id_delivery,
        handler_args=(connection_id,),
    )
    buf.push_uint_var(connection_id.sequence_number)
    buf.push_uint_var(retire_prior_to)
    buf.push_uint8(len(connection_id.cid))
    buf.push_bytes(connection_id.cid)
    buf.push_bytes(connection_id.stateless_reset_token)
    connection_id.was_sent = True
    self._events.append(events.ConnectionIdIssued(connection_id=connection_id.cid))
