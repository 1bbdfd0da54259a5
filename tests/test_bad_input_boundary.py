"""Bad input at the public boundary: refused up front with a typed error naming the argument,
nothing sent, nothing leaked, the connection still usable (issue "Bad input never hurts")."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import socket
from pathlib import Path as FsPath
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.factory import ConnectionOptions
from supervisor import FailoverPolicy, Supervisor
from supervisor.core import validate
from supervisor.core.errors import (
    AddressInUseError,
    InvalidAddressError,
    InvalidArgumentError,
    MigrationError,
    MigrationNotSupportedError,
    PathClosedError,
    SupervisorClosedError,
)
from supervisor.core.events import EvtPathAdded, EvtPathRemoved
from supervisor.core.messages import CloseConnectionRequest
from tests.rig.aioquic_server import RigServer
from tests.rig.certs import CertPair
from tests.rig.netns import NetNS, netns_available
from tests.support import addr_of, dial_echo, echo_roundtrip, event_log, fd_count, other_tasks

BAD_DURATIONS: list[Any] = [-1, 0, -0.5, math.nan, math.inf, -math.inf, 10**400, 1e300]
WRONG_TYPES: list[Any] = ["1", b"1", None, True, [1.0]]


# -- the shared checker, as a property ---------------------------------------------------------


@given(
    st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(min_value=-(10**500), max_value=10**500),
        st.text(max_size=5),
        st.none(),
        st.booleans(),
        st.lists(st.floats(), max_size=2),
    )
)
def test_duration_accepts_exactly_finite_positive_seconds_up_to_a_day(value: Any) -> None:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and abs(value) < 1e308
        and math.isfinite(float(value))
        and 0 < value <= validate.MAX_DURATION
    )
    try:
        got = validate.duration("timeout", value)
    except TypeError as exc:
        assert not ok and "timeout" in str(exc)
        assert isinstance(value, bool) or not isinstance(value, (int, float))
    except InvalidArgumentError as exc:
        assert not ok and exc.name == "timeout" and isinstance(exc, ValueError)
    else:
        assert ok and got == float(value)


@given(st.one_of(st.none(), st.text(max_size=300), st.binary(max_size=4), st.integers()))
def test_server_name_is_none_or_a_bounded_dns_name(value: Any) -> None:
    try:
        got = validate.server_name(value)
    except (TypeError, InvalidArgumentError) as exc:
        assert "server_name" in str(exc)
        assert not (value is None or (isinstance(value, str) and 0 < len(value) <= 253)) or (
            isinstance(value, str) and any(c in value for c in "\x00/ ")
        )
    else:
        assert got == value


@given(
    st.one_of(
        st.none(),
        st.lists(st.one_of(st.text(max_size=300), st.binary(max_size=3), st.integers())),
        st.text(max_size=3),
    )
)
def test_alpn_list_is_strings_only(value: Any) -> None:
    try:
        got = validate.alpn_list(value)
    except (TypeError, InvalidArgumentError) as exc:
        assert "alpn_protocols" in str(exc)
    else:
        assert got is None or all(isinstance(n, str) and n for n in got)


# -- every public duration goes through it ------------------------------------------------------


@pytest.mark.parametrize("value", BAD_DURATIONS + WRONG_TYPES)
async def test_every_duration_of_the_api_is_refused_up_front(
    sup: Supervisor, echo: RigServer, value: Any
) -> None:
    conn = await dial_echo(sup, echo)
    path = await conn.as_migratable().add_path("/ip4/127.0.0.2/udp/0/quic-v1")
    fds, tasks, seen = fd_count(), other_tasks(), echo.peer_addresses()
    remote = f"/ip4/{echo.addr[0]}/udp/{echo.addr[1]}/quic-v1"
    calls: list[tuple[str, Any]] = [
        ("timeout", lambda: sup.dial(remote, verify=False, timeout=value)),
        ("idle_timeout", lambda: sup.dial(remote, verify=False, idle_timeout=value)),
        ("timeout", lambda: path.probe(timeout=value)),
        ("probe_timeout", lambda: path.switch(probe_timeout=value)),
        ("probe_timeout", lambda: sup.drain(local_addr="/ip4/127.0.0.1", probe_timeout=value)),
    ]
    for name, call in calls:
        with pytest.raises((TypeError, ValueError)) as caught:
            await call()
        assert name in str(caught.value), (name, caught.value)
    if value is not None:  # ask_timeout=None means "no limit"
        with pytest.raises((TypeError, ValueError), match="ask_timeout"):
            Supervisor(ask_timeout=value)
    for field in ("keepalive_interval", "min_silence", "probe_timeout", "dead_after_ptos"):
        with pytest.raises((TypeError, ValueError), match=field):
            FailoverPolicy(**{field: value})
    assert fd_count() == fds and other_tasks() - tasks == set()
    assert echo.peer_addresses() == seen  # nothing was sent by any refused call
    await echo_roundtrip(conn)


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"alpn_protocols": [1]}, TypeError, "alpn_protocols"),
        ({"alpn_protocols": [b"echo"]}, TypeError, "alpn_protocols"),
        ({"alpn_protocols": "echo"}, TypeError, "alpn_protocols"),
        ({"server_name": "x" * 100_000}, InvalidArgumentError, "server_name"),
        ({"server_name": 7}, TypeError, "server_name"),
        ({"verify": "no"}, TypeError, "verify"),
        ({"local_addr": 5}, TypeError, "local_addr"),
        # A misspelt keyword is named, with the ones dial takes (one declaration: DialOptions).
        ({"alpn": ["echo"]}, TypeError, "unknown keyword.*alpn.*alpn_protocols"),
    ],
)
async def test_dial_argument_errors_are_typed(
    sup: Supervisor, echo: RigServer, kwargs: dict[str, Any], error: type, needle: str
) -> None:
    seen, fds = echo.peer_addresses(), fd_count()
    with pytest.raises(error, match=needle):
        await dial_echo(sup, echo, **kwargs)
    assert echo.peer_addresses() == seen and fd_count() == fds
    assert sup.connections() == []


def test_supervisor_argument_types() -> None:
    with pytest.raises(TypeError, match="FailoverPolicy"):
        Supervisor(failover="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="enable_experimental_connection_migration"):
        Supervisor(enable_experimental_connection_migration="yes")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="qlog_max_events"):
        Supervisor(qlog_max_events=0)
    with pytest.raises(ValueError, match="stale_after"):
        ConnectionOptions(stale_after=math.nan)


# -- files are checked before any packet --------------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "garbage", "directory"])
async def test_bad_cafile_is_refused_at_once_naming_the_file(
    sup: Supervisor, echo: RigServer, tmp_path: FsPath, kind: str
) -> None:
    cafile = tmp_path / "ca.pem"
    if kind == "garbage":
        cafile.write_text("this is not a certificate\n")
    elif kind == "directory":
        cafile.mkdir()
    seen = echo.peer_addresses()
    with pytest.raises(InvalidArgumentError, match="cafile") as caught:
        await dial_echo(sup, echo, cafile=str(cafile), verify=True)
    assert str(cafile) in str(caught.value)
    assert echo.peer_addresses() == seen  # no Initial was sent
    assert sup.connections() == []


async def test_listen_errors_are_typed_and_hold_nothing(
    sup: Supervisor, cert: CertPair, tmp_path: FsPath
) -> None:
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("127.0.0.1", 0))
    try:
        fds = fd_count()
        port = busy.getsockname()[1]
        with pytest.raises(AddressInUseError):
            await sup.listen(
                f"/ip4/127.0.0.1/udp/{port}/quic-v1", certfile=cert.certfile, keyfile=cert.keyfile
            )
        with pytest.raises(InvalidAddressError, match="not an address of this host"):
            # TEST-NET-1 (RFC 5737): never on this host; binding fails, nothing is sent.
            await sup.listen(
                "/ip4/192.0.2.1/udp/0/quic-v1", certfile=cert.certfile, keyfile=cert.keyfile
            )
        with pytest.raises(InvalidArgumentError, match="certfile"):
            await sup.listen("/ip4/127.0.0.1/udp/0/quic-v1", certfile=tmp_path / "none.pem")
        garbage = tmp_path / "garbage.pem"
        garbage.write_text("nope")
        with pytest.raises(InvalidArgumentError, match="certfile"):
            await sup.listen("/ip4/127.0.0.1/udp/0/quic-v1", certfile=garbage)
        assert fd_count() == fds
    finally:
        busy.close()


# -- a closed supervisor ------------------------------------------------------------------------


async def test_every_call_after_exit_raises_one_typed_error(
    echo: RigServer, cert: CertPair
) -> None:
    async with Supervisor(enable_experimental_connection_migration=True) as sup:
        conn = await dial_echo(sup, echo)
        mc = conn.as_migratable()
        path = await mc.add_path("/ip4/127.0.0.2/udp/0/quic-v1")
    fds = fd_count()
    calls = [
        lambda: dial_echo(sup, echo),
        lambda: sup.listen(
            "/ip4/127.0.0.1/udp/0/quic-v1", certfile=cert.certfile, keyfile=cert.keyfile
        ),
        lambda: sup.drain(local_addr="/ip4/127.0.0.1"),
        lambda: mc.add_path("/ip4/127.0.0.3/udp/0/quic-v1"),
        lambda: path.probe(),
        lambda: path.switch(),
    ]
    for call in calls:
        with pytest.raises(SupervisorClosedError, match="not running") as caught:
            await call()
        assert isinstance(caught.value, MigrationError)
    assert fd_count() == fds  # listen() after exit holds no socket
    with pytest.raises(SupervisorClosedError):
        await sup.start()  # a Supervisor runs once


# -- addresses that are not paths ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "needle"),
    [
        ("/ip4/0.0.0.0/udp/0/quic-v1", "wildcard"),
        ("/ip4/224.0.0.1/udp/0/quic-v1", "multicast"),
        ("/ip4/255.255.255.255/udp/0/quic-v1", "broadcast"),
        ("/ip4/127.255.255.255/udp/0/quic-v1", "broadcast"),  # lo's 127.0.0.0/8
    ],
)
async def test_addresses_that_cannot_be_paths(
    sup: Supervisor, echo: RigServer, addr: str, needle: str
) -> None:
    conn = await dial_echo(sup, echo)
    mc = conn.as_migratable()
    fds, seen = fd_count(), echo.peer_addresses()
    with pytest.raises(InvalidAddressError, match=needle):
        await mc.add_path(addr)
    with pytest.raises(InvalidAddressError, match=needle):
        await dial_echo(sup, echo, local_addr=addr)
    assert fd_count() == fds and echo.peer_addresses() == seen
    assert len(mc.available_paths()) == 1
    await echo_roundtrip(conn)


async def test_local_addr_must_match_the_given_socket(sup: Supervisor, echo: RigServer) -> None:
    conn = await dial_echo(sup, echo)
    mc = conn.as_migratable()
    for sock_ip, asked in (("127.0.0.2", "127.0.0.3"), ("0.0.0.0", "127.0.0.2")):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((sock_ip, 0))
        with pytest.raises(InvalidAddressError) as caught:
            await mc.add_path(f"/ip4/{asked}/udp/0/quic-v1", sock=s)
        assert s.fileno() == -1  # handed over, then closed: nothing leaks
        text = str(caught.value)
        assert (asked in text and sock_ip in text) or "wildcard" in text, text
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.2", 0))
    bound = s.getsockname()
    path = await mc.add_path(f"/ip4/127.0.0.2/udp/{bound[1]}/quic-v1", sock=s)
    assert addr_of(path.info().local_addr) == bound
    await path.probe()
    await echo_roundtrip(conn)


@pytest.mark.netns
@pytest.mark.skipif(not netns_available()[0], reason=netns_available()[1])
async def test_a_namespaced_sockets_own_address_is_accepted(
    sup: Supervisor, echo: RigServer
) -> None:
    """The address exists only in the socket's namespace: no host check can see it (nothing is
    sent: add_path never sends)."""
    conn = await dial_echo(sup, echo)
    with NetNS("addr") as ns:
        ns.run(["ip", "addr", "add", "10.201.0.2/32", "dev", "lo"])
        s = ns.socket(socket.AF_INET, "10.201.0.2")
        path = await conn.as_migratable().add_path("/ip4/10.201.0.2/udp/0/quic-v1", sock=s)
        assert addr_of(path.info().local_addr)[0] == "10.201.0.2"
        await path.close()
    await echo_roundtrip(conn)


# -- errors in the contract's order, and naming what they are about -----------------------------


async def test_inbound_add_path_argument_errors_come_first(echo: RigServer, cert: CertPair) -> None:
    async with Supervisor(enable_experimental_connection_migration=True) as sup:
        listener = await sup.listen(
            "/ip4/127.0.0.1/udp/0/quic-v1",
            certfile=cert.certfile,
            keyfile=cert.keyfile,
            alpn_protocols=["echo"],
        )
        host, port = addr_of(listener.multiaddr)
        await dial_echo(sup, (host, port))
        inbound = await asyncio.wait_for(listener.accept(), 10)
        mc = inbound.as_migratable()
        with pytest.raises(InvalidAddressError):
            await mc.add_path("garbage")
        with pytest.raises(MigrationNotSupportedError):
            await mc.add_path("/ip4/127.0.0.2/udp/0/quic-v1")


async def test_path_closed_error_names_the_path(sup: Supervisor, echo: RigServer) -> None:
    conn = await dial_echo(sup, echo)
    path = await conn.as_migratable().add_path("/ip4/127.0.0.2/udp/0/quic-v1")
    local = str(path.info().local_addr)
    await path.close()
    for call in (path.probe, path.switch):
        with pytest.raises(PathClosedError) as caught:
            await call()
        assert local in str(caught.value)


# -- cancellation is atomic ---------------------------------------------------------------------


async def test_cancelled_dial_leaves_a_connection_or_nothing(echo: RigServer) -> None:
    rng = random.Random(10)
    async with Supervisor() as sup:
        fds, tasks = fd_count(), other_tasks()
        returned = 0
        for _ in range(40):
            dial = asyncio.ensure_future(dial_echo(sup, echo))
            for _ in range(rng.randrange(0, 60)):
                await asyncio.sleep(0)
            dial.cancel()
            try:
                conn = await dial
            except asyncio.CancelledError:
                # Nothing of it remains, or it is listed (and closed on exit): never an orphan.
                listed = sup.connections()
                assert len(listed) <= 1
                for snap in listed:
                    await sup.ask(CloseConnectionRequest(snap.conn_id))
            else:
                returned += 1
                await conn.close()
            assert sup.connections() == []
        print(f"\n40 cancelled dials: {returned} had completed before the cancel")
        assert fd_count() == fds and other_tasks() - tasks == set()


async def test_cancelled_add_path_and_close_keep_events_and_table_in_step(
    sup: Supervisor, echo: RigServer
) -> None:
    rng = random.Random(11)
    conn = await dial_echo(sup, echo)
    mc = conn.as_migratable()
    fds = fd_count()

    async def cancelled(coro: Any, turns: int) -> None:
        task = asyncio.ensure_future(coro)
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async with event_log(sup, EvtPathAdded, EvtPathRemoved) as log:

        def in_step() -> bool:
            # The handshake path was added before the log began.
            added, removed = len(log.of(EvtPathAdded)), len(log.of(EvtPathRemoved))
            return added - removed == len(mc.available_paths()) - 1

        for _ in range(60):
            await cancelled(mc.add_path("/ip4/127.0.0.2/udp/0/quic-v1"), rng.randrange(0, 8))
            await log.wait_for(in_step, timeout=5)
            for handle in mc.paths():
                if not handle.info().active:
                    await cancelled(handle.close(), rng.randrange(0, 4))
                    await log.wait_for(in_step, timeout=5)
                    await handle.close()  # make room for the next add
            await log.wait_for(in_step, timeout=5)
    assert len(mc.available_paths()) == 1
    assert fd_count() == fds
    await echo_roundtrip(conn)
