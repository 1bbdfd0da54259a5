"""Bad network configuration is refused at once, naming the field: PathPolicy, NetworkPolicy
and the Supervisor's ``network``, ``netns`` and ``netlink`` arguments. A missing namespace is
an error that names it and says how to create it -- and creates nothing; one that cannot be
entered fails ``start()`` before anything is started, every time, and ``close()`` ends the
worker thread that tried.

No sockets, no root: the namespace checks only look at /run/netns, or enter a file that is
not a namespace (setns refuses it before any privilege check matters).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import threading
from pathlib import Path
from typing import Any, cast

import pytest

from actors.errors import InvalidArgumentError, SupervisorClosedError
from actors.factory import MAX_PATHS
from supervisor import NetworkPolicy, PathPolicy, Supervisor

NETNS_DIR = Path("/run/netns")
NAN, INF = float("nan"), float("inf")


Expected = type[Exception] | tuple[type[Exception], ...]


def _refused(cls: type[Any], field: str, expected: Expected, **kwargs: Any) -> BaseException:
    with pytest.raises(expected) as info:
        cls(**kwargs)
    message = str(info.value)
    # The field is named (as "max_paths" or as "PathPolicy.devices"), whole.
    assert re.search(rf"(^|[\s.]){re.escape(field)}\b", message), message
    if isinstance(info.value, InvalidArgumentError):
        assert info.value.name == field
    return info.value


# ---- PathPolicy -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("devices", ["eth1"]),  # a list
        ("devices", "eth1"),  # a string is not a tuple of names
        ("devices", None),
        ("prefixes", ["10.0.0.0/8"]),
        ("prefixes", "10.0.0.0/8"),
        ("families", [4]),
        ("families", 4),
    ],
)
def test_path_policy_collections_must_be_tuples(field: str, value: object) -> None:
    exc = _refused(PathPolicy, f"PathPolicy.{field}", TypeError, **{field: value})
    assert "tuple" in str(exc)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("devices", ("",)),
        ("devices", ("x" * 16,)),  # IFNAMSIZ: 15 characters at most
        ("devices", ("eth/0",)),
        ("prefixes", ("10.0.0.0/33",)),
        ("prefixes", ("fd00::/129",)),
        ("prefixes", ("not-a-cidr",)),
        ("prefixes", ("10.0.0/8/1",)),
        ("prefixes", ("",)),
        ("families", (5,)),
        ("families", (0,)),
        ("families", ("4",)),
        ("families", (4, True)),
    ],
)
def test_path_policy_bad_entries_are_refused_naming_the_field(field: str, value: object) -> None:
    exc = _refused(PathPolicy, f"PathPolicy.{field}", ValueError, **{field: value})
    for shown in cast(tuple[object, ...], value):
        if shown is not None and shown not in (4, 6, "eth0"):
            assert repr(shown) in str(exc)  # and the offending entry


@pytest.mark.parametrize("value", [("eth0", 5), (None,)], ids=["int", "None"])
def test_path_policy_devices_must_be_strings(value: tuple[object, ...]) -> None:
    _refused(PathPolicy, "PathPolicy.devices", TypeError, devices=value)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("max_paths", 0, InvalidArgumentError),
        ("max_paths", MAX_PATHS + 1, InvalidArgumentError),
        ("max_paths", 9, InvalidArgumentError),
        ("max_paths", -1, InvalidArgumentError),
        ("max_paths", "2", TypeError),
        ("max_paths", 2.0, TypeError),
        ("max_paths", True, TypeError),
        ("max_paths", None, TypeError),
        ("probe_concurrency", 0, InvalidArgumentError),
        ("probe_concurrency", 1025, InvalidArgumentError),
        ("probe_concurrency", 1.5, TypeError),
    ],
)
def test_path_policy_counts_are_bounded(
    field: str, value: object, expected: type[Exception]
) -> None:
    _refused(PathPolicy, field, expected, **{field: value})


def test_path_policy_boundaries_are_accepted() -> None:
    PathPolicy(max_paths=1, probe_concurrency=1)
    PathPolicy(max_paths=MAX_PATHS, probe_concurrency=1024)
    PathPolicy(devices=("x" * 15,), prefixes=("10.0.0.1/24", "fd00::/8"), families=(6,))
    PathPolicy(families=())  # matches nothing, like the default


@pytest.mark.parametrize(
    "prefix",
    [10, b"\x0a\x00\x00\x00", None, ("10.0.0.0", 8)],
    ids=["int", "bytes", "none", "tuple"],
)
def test_path_policy_prefixes_must_be_strings(prefix: object) -> None:
    """ipaddress.ip_network would take an int or 4/16 bytes as an address (10 means
    0.0.0.10/32): anything but a str is refused, with the offending entry."""
    exc = _refused(PathPolicy, "PathPolicy.prefixes", TypeError, prefixes=("fd00::/8", prefix))
    assert repr(prefix) in str(exc)


# ---- NetworkPolicy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("paths", "eth1", TypeError),
        ("paths", ("eth1",), TypeError),
        ("paths", NetworkPolicy(), TypeError),
        ("monitor", 1, TypeError),
        ("monitor", "yes", TypeError),
        ("monitor", None, TypeError),
        ("follow_route", 0, TypeError),
        ("max_degrading_moves", -1, InvalidArgumentError),
        ("max_degrading_moves", 10_001, InvalidArgumentError),
        ("max_degrading_moves", 1.5, TypeError),
        ("max_degrading_moves", True, TypeError),
        ("max_write_error_moves", -1, InvalidArgumentError),
        ("max_write_error_moves", "5", TypeError),
        ("max_time_on_non_default", NAN, InvalidArgumentError),
        ("max_time_on_non_default", INF, InvalidArgumentError),
        ("max_time_on_non_default", -1.0, InvalidArgumentError),
        ("max_time_on_non_default", 0, InvalidArgumentError),
        ("max_time_on_non_default", 1e9, InvalidArgumentError),
        ("max_time_on_non_default", "128", TypeError),
        ("max_time_on_non_default", None, TypeError),
        ("probe_timeout", NAN, InvalidArgumentError),
        ("probe_timeout", -0.5, InvalidArgumentError),
        ("probe_timeout", 0.0, InvalidArgumentError),
        ("probe_timeout", -INF, InvalidArgumentError),
        ("probe_timeout", True, TypeError),
    ],
)
def test_network_policy_bad_fields_are_refused_naming_the_field(
    field: str, value: object, expected: type[Exception]
) -> None:
    named = f"NetworkPolicy.{field}" if field in ("paths", "monitor", "follow_route") else field
    _refused(NetworkPolicy, named, expected, **{field: value})


def test_network_policy_boundaries_are_accepted() -> None:
    NetworkPolicy(max_degrading_moves=0, max_write_error_moves=10_000)
    NetworkPolicy(paths=PathPolicy(devices=("eth1",)), monitor=False, follow_route=False)
    NetworkPolicy(max_time_on_non_default=0.001, probe_timeout=86_400)


# ---- Supervisor(network=..., netns=..., netlink=...) ------------------------------------------


@pytest.mark.parametrize("network", ["x", True, 1, PathPolicy(), {"monitor": True}])
def test_supervisor_network_must_be_a_policy_false_or_none(network: object) -> None:
    with pytest.raises(TypeError, match=r"^network must be a NetworkPolicy .* not "):
        Supervisor(network=network)  # type: ignore[arg-type]


def test_supervisor_network_false_and_none_are_accepted() -> None:
    assert Supervisor(network=False).network is None
    assert Supervisor(network=None).network is None


@pytest.mark.parametrize("netlink", ["pyroute2", 5])
def test_supervisor_netlink_must_be_a_factory(netlink: object) -> None:
    with pytest.raises(TypeError, match="netlink must be"):
        Supervisor(network=NetworkPolicy(), netlink=netlink)  # type: ignore[arg-type]


def _netns_entries() -> list[str] | None:
    return sorted(os.listdir(NETNS_DIR)) if NETNS_DIR.is_dir() else None


@pytest.mark.parametrize("network", [None, NetworkPolicy()], ids=["plain", "with-policy"])
def test_a_missing_namespace_is_refused_by_name_and_nothing_is_created(
    network: NetworkPolicy | None,
) -> None:
    name = f"qs-missing-{secrets.token_hex(4)}"
    entries, threads = _netns_entries(), threading.active_count()
    with pytest.raises(InvalidArgumentError) as info:
        Supervisor(netns=name, network=network)
    exc = info.value
    message = str(exc)
    assert exc.name == "netns" and exc.value == name
    assert repr(name) in message  # the namespace
    assert str(NETNS_DIR / name) in message  # where it was looked for
    assert f"ip netns add {name}" in message  # and the fix
    assert "/proc/PID/ns/net" in message  # or the alternative
    assert _netns_entries() == entries  # nothing created
    assert not (NETNS_DIR / name).exists()
    assert threading.active_count() == threads  # no worker thread started either


def test_a_missing_namespace_path_is_refused_naming_the_path() -> None:
    path = f"/nonexistent-{secrets.token_hex(4)}/ns/net"
    entries = _netns_entries()
    with pytest.raises(InvalidArgumentError, match=re.escape(f"{path} does not exist")):
        Supervisor(netns=path)
    assert _netns_entries() == entries
    assert not Path(path).parent.parent.exists()


async def test_a_namespace_that_cannot_be_entered_fails_start_every_time_and_starts_nothing(
    tmp_path: Path,
) -> None:
    """A path that exists but is no namespace: setns fails in the worker thread. start()
    checks the namespace before anything else (no journal file, no runtime), a second
    start() checks again, and close() ends the worker thread."""
    not_a_namespace = tmp_path / "not-a-netns"
    not_a_namespace.write_text("")
    journal = tmp_path / "journal"
    threads = threading.active_count()
    sup = Supervisor(netns=str(not_a_namespace), network=NetworkPolicy(), journal=journal)
    try:
        errors: list[InvalidArgumentError] = []
        for _ in range(2):
            with pytest.raises(InvalidArgumentError) as info:
                await sup.start()
            errors.append(info.value)
            assert info.value.name == "netns" and info.value.value == str(not_a_namespace)
            # The worker's own setns error, not a broken pool's generic text.
            assert "cannot enter it" in str(info.value)
            assert os.strerror(errno.EINVAL) in str(info.value)
            assert "BrokenThreadPool" not in str(info.value)
            assert not journal.exists()  # nothing started
            with pytest.raises(SupervisorClosedError, match="not started yet"):
                await sup.network_status()
        assert str(errors[0]) == str(errors[1])
        # The worker thread that tried is still there (close() ends it).
        assert any(t.name.startswith("netns-") for t in threading.enumerate())
    finally:
        await sup.close()
    assert threading.active_count() == threads  # the worker thread that tried is gone
    assert not any(t.name.startswith("netns-") for t in threading.enumerate())
    with pytest.raises(SupervisorClosedError):
        await sup.start()


@pytest.mark.parametrize("netns", ["", 5, b"qs-x"])
def test_a_namespace_must_be_a_name_or_a_path(netns: object) -> None:
    with pytest.raises(InvalidArgumentError, match="namespace name") as info:
        Supervisor(netns=netns)  # type: ignore[arg-type]
    assert info.value.name == "netns"
