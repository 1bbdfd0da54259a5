"""Public import path of quic-supervisor's errors (defined in ``actors.errors``, where the actors
that raise them live). See that module for when each one is raised."""

from actors.errors import (
    ActivePathCloseError,
    AddressInUseError,
    ConnectionClosedError,
    DialTimeoutError,
    HandshakeError,
    InvalidAddressError,
    InvalidTransitionError,
    MigrationError,
    MigrationNotEnabledError,
    MigrationNotSupportedError,
    MigrationRolledBackError,
    NoConnectionIdError,
    PathAlreadyExistsError,
    PathClosedError,
    PathLimitError,
    PathNotValidatedError,
    ProbeTimeoutError,
)

__all__ = [
    "ActivePathCloseError",
    "AddressInUseError",
    "ConnectionClosedError",
    "DialTimeoutError",
    "HandshakeError",
    "InvalidAddressError",
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
    "ProbeTimeoutError",
]
