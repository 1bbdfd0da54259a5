"""The error hierarchy: public import path, classes, messages, pickling."""

from __future__ import annotations

import errno
import pickle

import pytest
from multiaddr import Multiaddr

import actors.errors
import supervisor.core.errors as public
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
from actors.path_state import PathState

A = Multiaddr("/ip4/127.0.0.2/udp/40000/quic-v1")
B = Multiaddr("/ip4/127.0.0.3/udp/40001/quic-v1")

SAMPLES: list[tuple[MigrationError, list[str]]] = [
    (MigrationNotEnabledError(), ["enable_experimental_connection_migration=True"]),
    (MigrationNotSupportedError(), ["inbound", "dial"]),
    (MigrationNotSupportedError("disable_active_migration", conn_id="c1"), ["c1", "peer sent"]),
    (PathAlreadyExistsError(A), [str(A), "different local address"]),
    (ActivePathCloseError(A), [str(A), "switch to another path first"]),
    (PathNotValidatedError(A, state=PathState.FAILED), [str(A), "state failed", "probe()"]),
    (PathClosedError(A), [str(A), "add_path()"]),
    (ProbeTimeoutError(A, timeout=5.0), [str(A), "5s", "longer timeout"]),
    (NoConnectionIdError(A), [str(A), "close a path"]),
    (PathLimitError(7, conn_id="c1"), ["c1", "7 paths", "close a path"]),
    (MigrationRolledBackError(A, B, timeout=0.3), [str(A), str(B), "0.3s", "rolled back"]),
    (
        InvalidAddressError("10.0.0.1:1", "use /ip4/...", what="local_addr"),
        ["local_addr", "'10.0.0.1:1'"],
    ),
    (AddressInUseError(str(A)), [str(A), "port 0"]),
    (ConnectionClosedError("c1", reason="idle timeout"), ["c1", "idle timeout", "dial a new"]),
    (DialTimeoutError(A, timeout=2), [str(A), "2s", "UDP"]),
    (HandshakeError(A, "bad certificate", error_code=0x12A), [str(A), "0x12a", "server_name"]),
    (InvalidTransitionError(PathState.CLOSED, PathState.NEW), ["closed -> new", "terminal"]),
]


def test_public_path_reexports_everything() -> None:
    assert sorted(public.__all__) == sorted(actors.errors.__all__)
    for name in actors.errors.__all__:
        assert getattr(public, name) is getattr(actors.errors, name)


def test_hierarchy() -> None:
    for name in actors.errors.__all__:
        assert issubclass(getattr(actors.errors, name), MigrationError)
    assert issubclass(InvalidAddressError, ValueError)
    assert issubclass(AddressInUseError, InvalidAddressError)
    assert issubclass(DialTimeoutError, TimeoutError)
    assert issubclass(ProbeTimeoutError, TimeoutError)


@pytest.mark.parametrize(("err", "parts"), SAMPLES, ids=lambda v: type(v).__name__)
def test_messages_name_input_and_fix(err: MigrationError, parts: list[str]) -> None:
    for part in parts:
        assert part in str(err)


@pytest.mark.parametrize(("err", "parts"), SAMPLES, ids=lambda v: type(v).__name__)
def test_pickle_keeps_type_message_and_context(err: MigrationError, parts: list[str]) -> None:
    out = pickle.loads(pickle.dumps(err))
    assert type(out) is type(err)
    assert str(out) == str(err)
    assert out.__dict__ == err.__dict__


def test_context_attributes() -> None:
    err = ProbeTimeoutError(A, timeout=1.5)
    assert (err.local_addr, err.timeout) == (A, 1.5)
    rb = MigrationRolledBackError(A, B)
    assert (rb.from_local_addr, rb.to_local_addr) == (A, B)
    assert AddressInUseError("x").errno == errno.EADDRINUSE
