"""How to dial: the keywords of every ``dial`` (a local ``Supervisor``, a Ray agent's
``RemoteSupervisor``), declared once, checked once, turned into the one ``sup.Dial`` request.

Why a ``TypedDict``: both front-ends take the same keywords with the same defaults and errors;
written out per front-end they drifted (a remote dial skipped validation and failed later, in
the agent, with a less clear error). ``dial(addr, **options: Unpack[DialOptions])`` keeps one
declaration that type checkers and editors read.
"""

from __future__ import annotations

import socket
from typing import TypedDict

from multiaddr import Multiaddr

from supervisor.core import validate
from supervisor.core.messages import DialRequest

__all__ = ["DialOptions", "dial_options", "dial_request"]


class DialOptions(TypedDict, total=False):
    """Every keyword of ``dial``; absent ones take the default given here.

    - ``alpn_protocols`` (None): the ALPN ids to offer;
    - ``server_name`` ("localhost"): SNI and the name the certificate must carry, None for none;
    - ``cafile`` (None): trust anchors (a path on the dialling node);
    - ``verify`` (True): check the server's certificate;
    - ``local_addr`` / ``device`` / ``sock`` (None): where the first path's socket is bound, or
      the socket itself (local supervisors only: a socket cannot cross processes);
    - ``timeout`` (10 s): for the handshake; ``idle_timeout`` (30 s): ours, in transport params.
    """

    alpn_protocols: list[str] | None
    server_name: str | None
    cafile: str | None
    verify: bool
    local_addr: str | Multiaddr | None
    device: str | None
    sock: socket.socket | None
    timeout: float
    idle_timeout: float


def dial_request(
    addr: str | Multiaddr,
    options: DialOptions,
    *,
    socket_key: int | None = None,
    files_here: bool = True,
) -> DialRequest:
    """``options`` checked (a clear error naming the keyword) and made a request.

    ``sock`` is not part of the request: the caller registers it and passes its key.
    ``files_here`` False: ``cafile`` is a path on another node (a remote dial), checked there.
    """
    unknown = set(options) - set(DialOptions.__annotations__)
    if unknown:
        raise TypeError(
            f"dial() got unknown keyword(s) {', '.join(sorted(unknown))}: it takes "
            f"{', '.join(DialOptions.__annotations__)}"
        )
    if not isinstance(addr, str | Multiaddr):
        raise TypeError(f"addr must be a multiaddr string or Multiaddr, not {type(addr)}")
    local_addr = options.get("local_addr")
    if local_addr is not None and not isinstance(local_addr, str | Multiaddr):
        raise TypeError(f"local_addr must be a multiaddr or None, not {type(local_addr)}")
    cafile = options.get("cafile")
    return DialRequest(
        remote=str(addr),
        alpn_protocols=validate.alpn_list(options.get("alpn_protocols")),
        server_name=validate.server_name(options.get("server_name", "localhost")),
        cafile=validate.ca_file(cafile) if cafile is not None and files_here else cafile,
        verify=validate.flag("verify", options.get("verify", True)),
        local_addr=str(local_addr) if local_addr is not None else None,
        device=options.get("device"),
        socket_key=socket_key,
        timeout=validate.duration("timeout", options.get("timeout", 10.0)),
        idle_timeout=validate.duration("idle_timeout", options.get("idle_timeout", 30.0)),
    )


def dial_options(req: DialRequest) -> DialOptions:
    """The keywords that dial ``req`` again (an agent re-dialling what it recorded)."""
    return DialOptions(
        alpn_protocols=list(req.alpn_protocols) if req.alpn_protocols else None,
        server_name=req.server_name,
        cafile=req.cafile,
        verify=req.verify,
        local_addr=req.local_addr,
        device=req.device,
        timeout=req.timeout,
        idle_timeout=req.idle_timeout,
    )
