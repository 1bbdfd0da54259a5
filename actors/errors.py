"""The typed errors of quic-supervisor.

They live in the lower layer because the actors raise them; ``supervisor.core.errors``
re-exports them as the public import path. Every message names the input and says how to fix
it (the go-libp2p error table, in prose). Context travels as attributes (``local_addr``,
``timeout`` ...) so callers and telemetry never parse messages.

``add_path`` checks in this order (DESIGN section 3), so the first error raised is the first
that applies: argument errors (``InvalidAddressError``, ``ValueError``, ``TypeError``) ->
``MigrationNotEnabledError`` -> ``MigrationNotSupportedError`` -> ``PathAlreadyExistsError`` ->
``PathLimitError``. Socket errors while binding (``AddressInUseError``) come after those checks,
because binding is the first thing that has an effect.

All errors pickle with their attributes (a Ray call carries them across processes).
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Iterable
from typing import Any

__all__ = [
    "ActivePathCloseError",
    "AddressInUseError",
    "ConnectionClosedError",
    "DialTimeoutError",
    "HandshakeError",
    "IdentityError",
    "InvalidAddressError",
    "InvalidArgumentError",
    "InvalidTransitionError",
    "MigrationError",
    "MigrationNotEnabledError",
    "MigrationNotSupportedError",
    "MigrationRolledBackError",
    "NoConnectionIdError",
    "PathAlreadyExistsError",
    "PathClosedError",
    "PathLimitError",
    "PathNotValidatedError",
    "PeerCertificateError",
    "PeerIdMismatchError",
    "ProbeTimeoutError",
    "SupervisorClosedError",
]


def _restore(cls: type[MigrationError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    """Rebuild a pickled error without calling its (keyword-rich) ``__init__``."""
    err = cls.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


def _path(local_addr: object | None) -> str:
    return "path" if local_addr is None else f"path {local_addr}"


class MigrationError(Exception):
    """Base of every error quic-supervisor raises on purpose.

    Catch this to handle all of them; catch a subclass for one cause.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception pickles as cls(*args); our __init__ signatures differ from args=(message,).
        return (_restore, (type(self), self.args, dict(self.__dict__)))


class MigrationNotEnabledError(MigrationError):
    """Raised by ``add_path`` (first state check) when the Supervisor was created without
    ``enable_experimental_connection_migration=True``."""

    def __init__(self) -> None:
        super().__init__(
            "connection migration is not enabled: create the Supervisor with "
            "enable_experimental_connection_migration=True"
        )


class MigrationNotSupportedError(MigrationError):
    """Raised by ``add_path`` (after the enabled check) when this connection cannot migrate:
    it is inbound (only the client side may migrate, RFC 9000 section 9), or the peer sent the
    ``disable_active_migration`` transport parameter.

    ``reason`` is ``"inbound"``, ``"disable_active_migration"`` or free text.
    """

    def __init__(self, reason: str = "inbound", *, conn_id: str | None = None) -> None:
        self.reason = reason
        self.conn_id = conn_id
        conn = "this connection" if conn_id is None else f"connection {conn_id}"
        if reason == "inbound":
            why = (
                "it is an inbound (server-side) connection; only connections this side dialled "
                "can migrate: dial from this side to get a migratable connection"
            )
        elif reason == "disable_active_migration":
            why = (
                "the peer sent disable_active_migration, which forbids sending from any other "
                "local address: enable migration on the server"
            )
        else:
            why = reason
        super().__init__(f"connection migration is not supported on {conn}: {why}")


class PathAlreadyExistsError(MigrationError):
    """Raised by ``add_path`` when a live path of the connection is already bound to the same
    local address (or the same address with port 0 was given twice)."""

    def __init__(self, local_addr: object) -> None:
        self.local_addr = local_addr
        super().__init__(
            f"a path with local address {local_addr} already exists on this connection: "
            "use a different local address or close the existing path first"
        )


class PathLimitError(MigrationError):
    """Raised by ``add_path`` (last check) when the connection already has ``limit`` paths.

    The limit comes from the peer connection IDs available (each path needs its own) and
    aioquic's table of network paths, which evicts silently when full.
    """

    def __init__(self, limit: int, *, conn_id: str | None = None) -> None:
        self.limit = limit
        self.conn_id = conn_id
        conn = "this connection" if conn_id is None else f"connection {conn_id}"
        super().__init__(
            f"{conn} already has {limit} paths, the maximum: close a path you no longer "
            "need before adding another"
        )


class ActivePathCloseError(MigrationError):
    """Raised by ``Path.close()`` on the active path: the connection would have no path."""

    def __init__(self, local_addr: object | None = None) -> None:
        self.local_addr = local_addr
        super().__init__(
            f"cannot close the active {_path(local_addr)}: switch to another path first "
            "(or close the connection)"
        )


class PathNotValidatedError(MigrationError):
    """Raised by ``Path.switch()`` on a path that was never probed successfully, or whose
    last probe failed (state new or failed)."""

    def __init__(self, local_addr: object | None = None, *, state: object | None = None) -> None:
        self.local_addr = local_addr
        self.state = state
        in_state = "" if state is None else f" (state {getattr(state, 'value', state)})"
        super().__init__(
            f"{_path(local_addr)} is not validated{in_state}: "
            "await path.probe() successfully before switching to it"
        )


class PathClosedError(MigrationError):
    """Raised by any operation but ``close()`` on a closed path (``close()`` is idempotent).

    Names the path by its local address when known, else by its id and connection."""

    def __init__(
        self,
        local_addr: object | None = None,
        *,
        path_id: int | None = None,
        conn_id: str | None = None,
    ) -> None:
        self.local_addr = local_addr
        self.path_id = path_id
        self.conn_id = conn_id
        name = _path(local_addr)
        if local_addr is None and path_id is not None:
            name = f"path {path_id}"
        if conn_id is not None:
            name += f" of connection {conn_id}"
        super().__init__(
            f"{name} is closed: add a new path with add_path() to use that address again"
        )


class ProbeTimeoutError(MigrationError, TimeoutError):
    """Raised by ``Path.probe()`` when no PATH_RESPONSE arrived on the probed socket within
    ``timeout`` seconds. Also a ``TimeoutError``, the Python spelling of Go's deadline error."""

    def __init__(self, local_addr: object | None = None, *, timeout: float) -> None:
        self.local_addr = local_addr
        self.timeout = timeout
        super().__init__(
            f"probe of {_path(local_addr)} got no PATH_RESPONSE within {timeout:g}s: the "
            "network path may be unavailable; check the route from that local address to the "
            "peer, or probe again with a longer timeout"
        )


class NoConnectionIdError(MigrationError):
    """Raised by ``Path.probe()`` when the peer has issued no spare connection ID for this
    path and none arrived within about one RTT (RFC 9000 section 9.5: one CID per path)."""

    def __init__(
        self,
        local_addr: object | None = None,
        *,
        spare: int = 0,
        in_use: int | None = None,
        pending_retires: int | None = None,
    ) -> None:
        self.local_addr = local_addr
        self.spare = spare
        self.in_use = in_use
        self.pending_retires = pending_retires
        figures = f" ({spare} spare"
        if in_use is not None:
            figures += f", {in_use} held by paths"
        if pending_retires:
            figures += f", {pending_retires} retired and not yet replaced"
        figures += ")"
        super().__init__(
            f"no spare connection ID from the peer for {_path(local_addr)}{figures}: close a "
            "path you no longer need (its ID is retired and the peer issues a new one), then "
            "probe again"
        )


class MigrationRolledBackError(MigrationError):
    """Raised by ``Path.switch()`` when the peer neither acknowledged nor sent on the new path
    within 3 x PTO: the connection switched back to ``from_local_addr`` and no stream byte was
    lost. An ``EvtConnectionMigrationFailed`` was emitted."""

    def __init__(
        self,
        from_local_addr: object | None = None,
        to_local_addr: object | None = None,
        *,
        timeout: float | None = None,
        reason: str | None = None,
    ) -> None:
        self.from_local_addr = from_local_addr
        self.to_local_addr = to_local_addr
        self.timeout = timeout
        self.reason = reason
        within = "" if timeout is None else f" within {timeout:g}s"
        why = reason or f"the peer did not acknowledge or send on the new path{within}"
        back = "" if from_local_addr is None else f" to {from_local_addr}"
        super().__init__(
            f"switch to {to_local_addr} was rolled back{back}: {why}; the connection is intact "
            "on its previous path: probe the new path again and retry, or keep the current one"
        )


class InvalidAddressError(MigrationError, ValueError):
    """Raised for an address argument that cannot be used: not a multiaddr, wrong protocol
    (tcp, /quic draft-29, DNS name, extra components), address family mismatch, an address not
    on this host, or a bad ``device``/``sock``. Argument errors come before state errors.

    ``addr`` is the input as given, ``what`` the argument's name, ``reason`` problem plus fix.
    """

    def __init__(self, addr: object, reason: str, *, what: str = "address") -> None:
        self.addr = addr
        self.reason = reason
        self.what = what
        shown = addr if isinstance(addr, str) else str(addr)
        super().__init__(f"invalid {what} {shown!r}: {reason}")


class AddressInUseError(InvalidAddressError):
    """Raised when binding a path or dial socket fails with EADDRINUSE. ``errno`` holds the
    errno (not an ``OSError`` subclass: this is an argument problem the caller fixes)."""

    def __init__(
        self, addr: object, *, what: str = "address", errno: int = _errno.EADDRINUSE
    ) -> None:
        self.errno = errno
        super().__init__(
            addr,
            "it is already in use by another socket: choose another port, use port 0 to let "
            "the OS pick a free one, or close the socket holding it",
            what=what,
        )


class InvalidArgumentError(MigrationError, ValueError):
    """An argument that is not a path address but cannot be used either: a duration that is
    negative, NaN, infinite or absurd, a size out of range, a file that is missing or not what
    it should be, a name too long. ``name`` is the argument, ``value`` what was given,
    ``reason`` the problem and its fix. Also a ``ValueError``."""

    def __init__(self, name: str, value: object, reason: str) -> None:
        self.name = name
        self.value = value
        self.reason = reason
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"invalid {name} {shown}: {reason}")


class ConnectionClosedError(MigrationError):
    """Raised by any operation on a connection (or its paths, streams) after it closed."""

    def __init__(self, conn_id: str | None = None, *, reason: str | None = None) -> None:
        self.conn_id = conn_id
        self.reason = reason
        conn = "the connection" if conn_id is None else f"connection {conn_id}"
        because = "" if not reason else f" ({reason})"
        super().__init__(f"{conn} is closed{because}: dial a new connection")


class SupervisorClosedError(ConnectionClosedError):
    """Raised by every call on a ``Supervisor`` that is not running: never started, closed
    (its ``async with`` block ended), or crashed (``reason`` says which)."""

    def __init__(self, reason: str = "it was closed") -> None:
        MigrationError.__init__(
            self,
            f"the supervisor is not running ({reason}): use it inside "
            "'async with Supervisor(...)', or open a new one",
        )
        self.conn_id = None
        self.reason = reason


class DialTimeoutError(MigrationError, TimeoutError):
    """Raised by ``Supervisor.dial()`` when the peer did not answer the handshake in time."""

    def __init__(self, addr: object, *, timeout: float) -> None:
        self.addr = addr
        self.timeout = timeout
        super().__init__(
            f"no answer from {addr} within {timeout:g}s: check that a QUIC server listens "
            "there and that UDP to it is not filtered, or dial with a longer timeout"
        )


class HandshakeError(MigrationError):
    """Raised by ``Supervisor.dial()`` when the peer answered but the QUIC/TLS handshake
    failed (certificate, ALPN, version); ``error_code`` is the QUIC error code if known."""

    def __init__(self, addr: object, reason: str, *, error_code: int | None = None) -> None:
        self.addr = addr
        self.reason = reason
        self.error_code = error_code
        code = "" if error_code is None else f" (error code 0x{error_code:x})"
        super().__init__(
            f"QUIC handshake with {addr} failed{code}: {reason}; check server_name, cafile/"
            "verify and alpn_protocols against the server's certificate and ALPN"
        )


class InvalidTransitionError(MigrationError):
    """Raised by ``actors.path_state.check_transition`` for an edge not in the transition
    table. It means a bug in the caller, never a network condition."""

    def __init__(self, old: object, new: object, allowed: Iterable[object] = ()) -> None:
        self.old = old
        self.new = new
        old_s = getattr(old, "value", old)
        new_s = getattr(new, "value", new)
        names = sorted(str(getattr(s, "value", s)) for s in allowed)
        options = ", ".join(names) if names else "nothing (terminal state)"
        super().__init__(
            f"invalid path state transition {old_s} -> {new_s}: from {old_s} a path may go to "
            f"{options}; see docs/path-states.md"
        )


class PeerCertificateError(HandshakeError):
    """Raised when a libp2p peer's TLS certificate breaks a rule of the libp2p TLS handshake spec
    (or one go-libp2p adds, such as the RSA key sizes). ``rule`` is a short stable name of the
    rule broken ("one-certificate", "expired", "not-self-signed", ...) for callers and telemetry;
    ``reason`` says what was wrong with this certificate. ``addr`` is the peer's address when
    the caller knows it (the certificate check itself does not)."""

    def __init__(
        self,
        rule: str,
        reason: str,
        *,
        addr: object | None = None,
        error_code: int | None = None,
    ) -> None:
        self.rule = rule
        self.addr = addr
        self.reason = reason
        self.error_code = error_code
        peer = "" if addr is None else f" with {addr}"
        MigrationError.__init__(
            self,
            f"libp2p TLS handshake{peer} failed: the peer's certificate breaks rule {rule!r}: "
            f"{reason}",
        )


class PeerIdMismatchError(HandshakeError):
    """Raised when the peer completed the libp2p TLS handshake with another identity than the
    peer id dialled (the ``/p2p/`` component). ``expected`` and ``actual`` are peer ids as text."""

    def __init__(
        self,
        expected: str,
        actual: str,
        *,
        addr: object | None = None,
        error_code: int | None = None,
    ) -> None:
        self.expected = expected
        self.actual = actual
        self.addr = addr
        self.error_code = error_code
        self.reason = f"peer id mismatch: expected {expected}, got {actual}"
        where = "the peer" if addr is None else f"the peer at {addr}"
        MigrationError.__init__(
            self,
            f"{where} is {actual}, not the dialled {expected}: it is a different node; check the "
            "/p2p/ component of the address you dialled",
        )


class IdentityError(MigrationError, ValueError):
    """A libp2p identity (host key) that cannot be used: a key file that is missing, unreadable,
    readable by group or others, or not a libp2p private key; bytes that are not a libp2p public
    key; an unsupported key type (ECDSA) or RSA size. ``source`` names the file or input (None
    when there is nothing to name), ``reason`` the problem and its fix. Also a ``ValueError``."""

    def __init__(self, reason: str, *, source: str | None = None) -> None:
        self.reason = reason
        self.source = source
        where = "libp2p identity" if source is None else f"libp2p identity {source}"
        super().__init__(f"invalid {where}: {reason}")
