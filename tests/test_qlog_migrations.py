"""qlog that keeps migrations: path events with addresses, packet windows around each switch.

A real client against tests/rig's aioquic echo server on loopback (127.0.0.1 -> 127.0.0.2 and
back), and the trace's windowing on events with chosen times (aioquic stamps the wall clock).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from actors.quic_adapter import connection_trace
from supervisor import Supervisor
from telemetry.qlog import (
    DEFAULT_MAX_EVENTS,
    DEFAULT_WINDOW,
    DEFAULT_WINDOW_EVENTS,
    BoundedTrace,
    QlogDirectory,
    is_packet_event,
)
from tests.rig.aioquic_server import RigServer, echo_server
from tests.rig.certs import CertPair, generate_cert
from tests.rig.waiting import poll_until
from tests.support import connection_actor, echo_roundtrip

MIGRATIONS = 10


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> CertPair:
    return generate_cert(tmp_path_factory.mktemp("cert"))


@pytest.fixture
async def server(cert: CertPair) -> AsyncIterator[RigServer]:
    async with echo_server(certfile=cert.certfile, keyfile=cert.keyfile) as srv:
        yield srv


def _packet(ms: float, frames: tuple[str, ...] = ("stream",)) -> dict[str, Any]:
    return {
        "name": "transport:packet_sent",
        "time": ms,
        "data": {"header": {}, "frames": [{"frame_type": f} for f in frames]},
    }


def _migration(ms: float, state: str = "migration_started") -> dict[str, Any]:
    return {
        "name": "connectivity:migration_state_updated",
        "time": ms,
        "data": {"state": state, "old": 0, "new": 1},
    }


def _trace(**kwargs: Any) -> BoundedTrace:
    kwargs.setdefault("max_events", DEFAULT_MAX_EVENTS)
    return BoundedTrace(is_client=True, odcid=b"\x01", **kwargs)


def _packet_times(trace: dict[str, Any]) -> list[float]:
    return [e["time"] for e in trace["events"] if is_packet_event(e)]


# ------------------------------------------------------------------ windows, by chosen times


def test_packet_events_are_kept_in_windows_around_the_start_migrations_and_end() -> None:
    """One packet a millisecond for 10 s, a migration at 5 s: kept are the first 0.5 s, 0.5 s
    either side of the migration and the last 0.5 s; every other packet is counted dropped."""
    trace = _trace(window=0.5, window_events=10_000)
    for ms in range(10_000):
        if ms == 5_000:
            trace.keep(_migration(ms))
        trace.keep(_packet(ms))
    written = trace.to_dict()
    times = _packet_times(written)
    expected = [*range(0, 501), *range(4_500, 5_501), *range(9_499, 10_000)]
    assert times == expected
    assert written["common_fields"]["dropped_events"] == 10_000 - len(expected)
    assert written["common_fields"]["windows"] == 3
    assert f"{10_000 - len(expected)} events dropped" in written["description"]
    assert [e["name"] for e in written["events"]].count("connectivity:migration_state_updated") == 1


def test_each_side_of_a_window_holds_at_most_window_events() -> None:
    trace = _trace(window=0.5, window_events=100)
    for ms in range(3_000):
        if ms == 1_500:
            trace.keep(_migration(ms))
        trace.keep(_packet(ms))
    times = _packet_times(trace.to_dict())
    # start: the first 100; migration: the 100 before and the 100 after; end: the last 100
    expected = [*range(0, 100), *range(1_400, 1_600), *range(2_900, 3_000)]
    assert times == expected
    assert trace.to_dict()["common_fields"]["dropped_events"] == 3_000 - len(expected)


def test_key_packets_and_path_events_are_kept_outside_windows() -> None:
    """A PATH_CHALLENGE far from any migration, and every path event, stay in the file."""
    trace = _trace(window=0.1, window_events=10)
    for ms in range(2_000):
        trace.keep(_packet(ms, ("path_challenge",) if ms == 1_000 else ("stream",)))
        if ms % 250 == 0:
            trace.keep({"name": "connectivity:path_assigned", "time": ms, "data": {"path_id": ms}})
    written = trace.to_dict()
    challenges = [
        e["time"]
        for e in written["events"]
        for f in e["data"].get("frames", [])
        if f["frame_type"] == "path_challenge"
    ]
    assert challenges == [1_000]
    assigned = [e["data"]["path_id"] for e in written["events"] if "path_assigned" in e["name"]]
    assert assigned == list(range(0, 2_000, 250))


def test_memory_stays_bounded_over_many_migrations() -> None:
    """Past ``max_events`` packet events the oldest windows go whole; key events past the cap
    go oldest first. Held events never exceed 2 x max_events + window_events."""
    trace = _trace(max_events=1_000, window=0.05, window_events=100)
    peak = 0
    for ms in range(100_000):
        if ms % 1_000 == 500:
            trace.keep(_migration(ms, "migration_started"))
            trace.keep(_migration(ms, "migration_complete"))
        trace.keep(_packet(ms))
        peak = max(peak, trace.event_count)
    assert trace.packet_events <= 1_000 + 100  # the cap, and the ring of the latest
    assert 2 <= trace.window_count < 100  # the newest windows only
    assert peak <= 2 * 1_000 + 100
    written = trace.to_dict()
    migrations = [e for e in written["events"] if e["data"].get("state") == "migration_complete"]
    assert len(migrations) == 100  # every migration event kept (200 key events < cap)
    assert written["common_fields"]["dropped_events"] == 100_000 + 200 - len(written["events"])


def test_key_events_past_the_cap_drop_the_oldest_and_are_counted() -> None:
    trace = _trace(max_events=10)
    for ms in range(25):
        trace.keep({"name": "connectivity:path_assigned", "time": ms, "data": {"path_id": ms}})
    written = trace.to_dict()
    assert [e["data"]["path_id"] for e in written["events"]] == list(range(15, 25))
    assert written["common_fields"]["dropped_events"] == 15


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"max_events": 0}, "max_events"),
        ({"window": -1.0}, "window"),
        ({"window": float("nan")}, "window"),
        ({"window_events": 0}, "window_events"),
    ],
)
def test_bad_bounds_are_refused_naming_the_bound(
    tmp_path: Path, kwargs: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValueError, match=f"qlog {named} must be >= "):
        QlogDirectory(tmp_path, **kwargs)


# ------------------------------------------------------------------ a real connection


async def test_ten_migrations_are_all_in_the_qlog_with_addresses(
    server: RigServer, tmp_path: Path
) -> None:
    """10 switches between 127.0.0.1 and 127.0.0.2 under enough traffic to overflow the old
    newest-20,000 cap: all 10 are in the file with addresses and DCIDs, with packet events
    either side of each, and the packet events kept are bounded by windows x size."""
    async with Supervisor(enable_experimental_connection_migration=True, qlog_dir=tmp_path) as sup:
        conn = await sup.dial(
            f"/ip4/127.0.0.1/udp/{server.port}/quic-v1", alpn_protocols=["echo"], verify=False
        )
        trace = connection_trace(connection_actor(conn).quic)
        assert isinstance(trace, BoundedTrace)
        mc = conn.as_migratable()
        (first,) = mc.paths()
        second = await mc.add_path("/ip4/127.0.0.2/udp/0/quic-v1")
        await second.probe()
        await echo_roundtrip(conn, size=512 * 1024)
        for i in range(MIGRATIONS):
            await (second if i % 2 == 0 else first).switch()
            await echo_roundtrip(conn, size=512 * 1024)
        held = trace.packet_events
        windows_now = trace.window_count
        await second.close()  # the active one is `first` after an even number of switches
        await conn.close()
        qlog = tmp_path / f"{conn.conn_id}.qlog"
        await poll_until(qlog.exists, 5, what="qlog written")
    # memory: held packet events are bounded by the migrations (and the end's ring)
    bound = (1 + 3 * MIGRATIONS + 1) * DEFAULT_WINDOW_EVENTS
    assert 1 <= windows_now <= 1 + MIGRATIONS
    assert held <= bound
    (written,) = json.loads(qlog.read_text())["traces"]
    events = written["events"]
    common = written["common_fields"]
    # the traffic overflowed the old cap: more events were logged than it kept
    assert len(events) + common["dropped_events"] > DEFAULT_MAX_EVENTS
    assert common["dropped_events"] > 0
    assert common["windows"] <= MIGRATIONS + 2  # the start, each migration, the end
    packet_times = _packet_times(written)
    assert len(packet_times) <= bound

    done = [e for e in events if e["name"] == "connectivity:migration_state_updated"]
    complete = [e for e in done if e["data"]["state"] == "migration_complete"]
    assert len(complete) == MIGRATIONS
    assert [e["data"]["state"] for e in done].count("migration_started") == MIGRATIONS
    for n, event in enumerate(complete):
        data = event["data"]
        src, dst = ("127.0.0.1", "127.0.0.2") if n % 2 == 0 else ("127.0.0.2", "127.0.0.1")
        assert data["old_path_local"]["ip_v4"] == src
        assert data["path_local"]["ip_v4"] == dst
        assert data["path_local"]["port_v4"] > 0
        assert data["path_remote"] == {
            "ip_v4": "127.0.0.1",
            "port_v4": server.port,
            "connection_ids": [data["dcid"]],
        }
        assert data["new"] == data["path_id"] != data["old"]
        t = event["time"]
        window_ms = DEFAULT_WINDOW * 1000
        assert any(t - window_ms <= p < t for p in packet_times), f"nothing before #{n + 1}"
        assert any(t < p <= t + window_ms for p in packet_times), f"nothing after #{n + 1}"
    cid_updates = [e["data"] for e in events if e["name"] == "connectivity:connection_id_updated"]
    assert len(cid_updates) == MIGRATIONS
    assert all(u["owner"] == "remote" and u["old"] != u["new"] for u in cid_updates)
    assert [u["new"] for u in cid_updates] == [e["data"]["dcid"] for e in complete]

    assigned = [e["data"] for e in events if e["name"] == "connectivity:path_assigned"]
    added = [a for a in assigned if not a.get("abandoned")]
    assert [a["path_local"]["ip_v4"] for a in added] == ["127.0.0.1", "127.0.0.2"]
    assert all(a["path_remote"]["port_v4"] == server.port for a in added)
    (closed,) = [a for a in assigned if a.get("abandoned")]
    assert closed["path_local"]["ip_v4"] == "127.0.0.2"
    validated = [e for e in done if e["data"]["state"] == "probing_successful"]
    assert validated and validated[0]["data"]["path_local"]["ip_v4"] == "127.0.0.2"
