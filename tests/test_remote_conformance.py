"""One remote protocol, two carriers: the same table of requests, replies and errors against the
Unix control socket and the Ray agent.

Each row is a request a remote program sends and what it must get back: the reply's type (and a
fact of it), or the typed exception with its attributes. The table is run once per carrier
(``control``: a ControlServer in this process, ``ray``: an agent in a Ray worker of
``tests/test_ray_backend.py``'s local cluster), each with one connection to an echo server on
loopback; bytes that are not an envelope, and an envelope from a newer release, get an
``EnvelopeError`` reply on both.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest

from actors.envelope import EnvelopeError, decode
from actors.errors import (
    ConnectionClosedError,
    InvalidAddressError,
    PathNotValidatedError,
)
from actors.path_state import PathState
from supervisor import Supervisor
from supervisor.core.events import EvtConnectionMigrationCompleted, EvtConnectionMigrationStarted
from supervisor.core.messages import (
    AddPathRequest,
    ClosePathRequest,
    ConnectionSnapshot,
    MigrationStats,
    PathAddedReply,
    ProbeRequest,
    SnapshotRequest,
    StatsRequest,
    SwitchReply,
    SwitchRequest,
)
from supervisor.orchestration.drain import DrainReport
from supervisor.orchestration.network.monitor import NetworkStatus, NetworkStatusRequest
from supervisor.remote.control import ControlClient, ControlServer, frame, read_frame
from supervisor.remote.protocol import DrainRequest, ErrorReply, Ok, reply_body
from tests.rig.aioquic_server import RigServer

SECOND = "/ip4/127.0.0.2/udp/0/quic-v1"


@dataclass
class Carrier:
    """One way to reach a supervisor: ``ask`` (typed replies and errors), ``raw`` (bytes in,
    the decoded reply body out) and the connection dialled through it."""

    name: str
    ask: Callable[[object], Awaitable[object]]
    raw: Callable[[bytes], Awaitable[object]]
    conn_id: str
    #: Every event the supervisor behind the carrier published so far.
    events: Callable[[], Awaitable[list[object]]]


async def _control_carrier(server: RigServer, tmp: Path) -> AsyncIterator[Carrier]:
    path = str(tmp / "ctl.sock")
    async with (
        Supervisor(enable_experimental_connection_migration=True) as sup,
        ControlServer(sup, path),
        ControlClient(path, timeout=30) as client,
    ):
        conn = await sup.dial(
            f"/ip4/127.0.0.1/udp/{server.port}/quic-v1", alpn_protocols=["echo"], verify=False
        )

        async def raw(data: bytes) -> object:
            reader, writer = await asyncio.open_unix_connection(path)
            try:
                writer.write(frame(data))
                await writer.drain()
                reply = await read_frame(reader, 1 << 24)
                assert reply is not None
                return decode(reply).body
            finally:
                writer.close()

        async def events() -> list[object]:
            sub = sup.events.subscribe(since=0)  # the bus replays what it kept
            try:
                return [sub._queue.popleft() for _ in range(sub.pending)]
            finally:
                sub.close()

        yield Carrier("control", client.request, raw, conn.conn_id, events)


async def _ray_carrier(fleet: Any, server: RigServer) -> AsyncIterator[Carrier]:
    sup = fleet.start_agent(label=f"conf-{uuid.uuid4().hex[:6]}", persist=False)
    try:
        await sup.info()
        conn = await sup.dial(
            f"/ip4/127.0.0.1/udp/{server.port}/quic-v1", alpn_protocols=["echo"], verify=False
        )

        async def raw(data: bytes) -> object:
            return decode(await sup.call(data)).body

        async def events() -> list[object]:
            return list((await sup.events_since(0)).events)

        yield Carrier("ray", sup.ask, raw, conn.conn_id, events)
    finally:
        sup.kill()


@pytest.fixture(params=["control", pytest.param("ray", marks=pytest.mark.ray)])
async def carrier(
    request: pytest.FixtureRequest, server: RigServer, tmp_path: Path
) -> AsyncIterator[Carrier]:
    if request.param == "control":
        gen = _control_carrier(server, tmp_path)
    else:
        pytest.importorskip("ray", reason="the ray extra is not installed")
        gen = _ray_carrier(request.getfixturevalue("fleet"), server)
    yield await gen.__anext__()
    await gen.aclose()


# The Ray carrier's module fixtures (one local cluster for the module), shared with the Ray suite.
try:
    from tests.test_ray_backend import fleet, server  # noqa: F401
except pytest.skip.Exception:  # no ray extra: the control rows still run

    @pytest.fixture
    async def server(tmp_path: Path) -> AsyncIterator[RigServer]:
        from tests.rig.aioquic_server import echo_server
        from tests.rig.certs import generate_cert

        cert = generate_cert(tmp_path)
        async with echo_server(certfile=cert.certfile, keyfile=cert.keyfile) as srv:
            yield srv


# -- the table ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """A request made from the connection's id, and what must come back."""

    name: str
    request: Callable[[str], object]
    reply: type | None = None  # the reply's type (None: the request returns nothing)
    error: type[BaseException] | None = None
    check: Callable[[Any, str], bool] = lambda _reply, _conn_id: True


ROWS = [
    Row(
        "snapshot of one connection",
        lambda c: SnapshotRequest(c),
        ConnectionSnapshot,
        check=lambda r, c: r.conn_id == c and len(r.paths) == 1,
    ),
    Row(
        "snapshot of all",
        lambda c: SnapshotRequest(None),
        tuple,
        check=lambda r, c: [s.conn_id for s in r] == [c],
    ),
    Row("migration stats", lambda c: StatsRequest(), MigrationStats),
    Row("network status", lambda c: NetworkStatusRequest(), NetworkStatus),
    Row(
        "add a path",
        lambda c: AddPathRequest(c, local_addr=SECOND),
        PathAddedReply,
        check=lambda r, c: r.path_id == 1 and r.snapshot.conn_id == c,
    ),
    Row(
        "drain an address nothing uses",
        lambda c: DrainRequest(local_addr="127.0.0.9"),
        DrainReport,
        check=lambda r, c: not r.moved and not r.failed and [o.conn_id for o in r.untouched] == [c],
    ),
    Row(
        "an unknown connection",
        lambda c: SnapshotRequest("feedfacefeed"),
        error=ConnectionClosedError,
    ),
    Row(
        "an address that is not one",
        lambda c: AddPathRequest(c, local_addr="/ip4/not-an-ip/udp/0/quic-v1"),
        error=InvalidAddressError,
    ),
    Row(
        "a socket cannot cross processes",
        lambda c: AddPathRequest(c, socket_key=3),
        error=ValueError,
    ),
    Row(
        "a reply type is no request",
        lambda c: Ok(),
        error=TypeError,
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
async def test_the_table_gets_the_same_answers_on_every_carrier(
    carrier: Carrier, row: Row
) -> None:
    request = row.request(carrier.conn_id)
    if row.error is not None:
        with pytest.raises(row.error) as err:
            await carrier.ask(request)
        assert type(err.value) is row.error  # rebuilt as the class raised, not a parent
        assert str(err.value)  # the text crosses too
        return
    reply = await carrier.ask(request)
    if row.reply is None:
        assert reply is None
    else:
        assert isinstance(reply, row.reply), reply
        assert row.check(reply, carrier.conn_id), reply


async def test_a_path_is_added_probed_switched_and_closed_the_same_way(carrier: Carrier) -> None:
    """The sequence a remote migrate sends; the unvalidated switch fails typed, state included."""
    added = await carrier.ask(AddPathRequest(carrier.conn_id, local_addr=SECOND))
    assert isinstance(added, PathAddedReply)
    with pytest.raises(PathNotValidatedError) as err:
        await carrier.ask(SwitchRequest(carrier.conn_id, added.path_id, "manual"))
    assert err.value.state in (str(PathState.NEW), PathState.NEW)  # attributes cross too
    probed = await carrier.ask(ProbeRequest(carrier.conn_id, added.path_id, 5.0))
    assert probed is not None
    switched = await carrier.ask(SwitchRequest(carrier.conn_id, added.path_id, "manual"))
    assert isinstance(switched, SwitchReply)
    snap = switched.snapshot
    assert [p.path_id for p in snap.paths if p.active] == [added.path_id]
    closed = await carrier.ask(ClosePathRequest(carrier.conn_id, 0))
    assert isinstance(closed, ConnectionSnapshot)
    assert [p.path_id for p in closed.paths] == [added.path_id]


async def test_a_switch_through_a_carrier_is_recorded_as_the_operators(carrier: Carrier) -> None:
    """DESIGN §3: a migration asked from another process (``ctl``, ``fleet``) has initiator
    ``operator`` on its events, whichever carrier brought it."""
    added = await carrier.ask(AddPathRequest(carrier.conn_id, local_addr=SECOND))
    assert isinstance(added, PathAddedReply)
    await carrier.ask(ProbeRequest(carrier.conn_id, added.path_id, 5.0))
    await carrier.ask(SwitchRequest(carrier.conn_id, added.path_id, "manual"))

    def migrations(events: list[object]) -> list[object]:
        kinds = (EvtConnectionMigrationStarted, EvtConnectionMigrationCompleted)
        return [e for e in events if isinstance(e, kinds)]

    async with asyncio.timeout(10):  # the agent logs events a loop turn after its reply
        while len(found := migrations(await carrier.events())) < 2:
            await asyncio.sleep(0.02)
    assert [(type(e).__name__, e.initiator) for e in found] == [  # type: ignore[attr-defined]
        ("EvtConnectionMigrationStarted", "operator"),
        ("EvtConnectionMigrationCompleted", "operator"),
    ]


async def test_bad_bytes_and_newer_envelopes_get_an_envelope_error(carrier: Carrier) -> None:
    garbage = await carrier.raw(b"\xc1 definitely not msgpack")
    assert isinstance(garbage, ErrorReply) and garbage.type == "EnvelopeError"
    newer = msgpack.packb({"v": 99, "type": "sup.Snapshot", "body": {}}, use_bin_type=True)
    reply = await carrier.raw(newer)
    assert isinstance(reply, ErrorReply) and reply.type == "EnvelopeError"
    assert "newer than this receiver" in reply.message
    with pytest.raises(EnvelopeError, match="newer than this receiver"):
        reply_body(reply)
