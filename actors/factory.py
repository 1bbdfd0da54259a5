"""The one way the layers above make a connection: an actor to spawn, its view, its port.

Code above ``actors/`` never holds a ConnectionActor (the import contract in pyproject.toml
forbids importing ``actors.connection``): it gets from here the :class:`Actor` to spawn, the
:class:`ViewCell` the connection publishes into, and the data-plane :class:`ConnectionPort`.
The tunables of a connection are re-exported here for the same reason.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aioquic.quic.configuration import QuicConfiguration

from actors.connection import MAX_PATHS, ConnectionActor, ConnectionOptions
from actors.health import HealthConfig
from actors.node_health import HealthStatus, NodeHealth
from actors.path import ProbeSchedule
from actors.ports import ConnectionPort
from actors.runtime import Actor
from actors.view import ConnectionView, PathChange, ViewCell

__all__ = [
    "MAX_PATHS",
    "ConnectionOptions",
    "HealthConfig",
    "HealthStatus",
    "NewConnection",
    "NodeHealth",
    "ProbeSchedule",
    "new_connection",
]


@dataclass(frozen=True, slots=True)
class NewConnection:
    actor: Actor  # to spawn (as a child of the caller); then reached only by its ActorRef
    view: ViewCell
    port: ConnectionPort


def new_connection(
    *,
    conn_id: str,
    configuration: QuicConfiguration,
    remote: tuple[Any, ...],
    first_socket: socket.socket,
    sockets: dict[int, socket.socket],
    on_changes: Callable[[ConnectionView, tuple[PathChange, ...]], None],
    notify: Callable[[object], None],
    options: ConnectionOptions | None = None,
    health: NodeHealth | None = None,
) -> NewConnection:
    """A client connection over ``first_socket`` to ``remote`` (not started: spawn it, then
    ask ``Connect``). See :class:`actors.connection.ConnectionActor` for the callbacks;
    ``health`` is the node's (one per supervisor, shared by all its connections)."""
    actor = ConnectionActor(
        conn_id=conn_id,
        configuration=configuration,
        remote=remote,
        first_socket=first_socket,
        sockets=sockets,
        on_changes=on_changes,
        notify=notify,
        options=options,
        health=health,
    )
    return NewConnection(actor, actor.cell, ConnectionPort(actor))
