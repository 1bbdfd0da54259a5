"""Metrics instruments and the low-cardinality attribute rules."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from telemetry.metrics import Metrics, low_cardinality


class Collected:
    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        self.metrics = Metrics(self.provider)

    def points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """(attributes, value-or-point) for every data point of metric ``name``."""
        data = self.reader.get_metrics_data()
        out: list[tuple[dict[str, Any], Any]] = []
        if data is None:
            return out
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == name:
                        for p in m.data.data_points:
                            out.append((dict(p.attributes or {}), getattr(p, "value", p)))
        return out


@pytest.fixture
def col() -> Iterator[Collected]:
    c = Collected()
    yield c
    c.provider.shutdown()


def test_counters_and_attributes(col: Collected) -> None:
    m = col.metrics
    m.migration("manual", "completed")
    m.migration("manual", "completed")
    m.migration("failover", "rolled_back")
    m.migration("because", "weird")  # clamped, not a new series per free-form value
    m.rollback("failover")
    m.active_path_change("drain")
    m.probe_failure("timeout")
    m.probe_failure("ECONNREFUSED")
    m.path_bytes(1200, state="active", direction="tx")
    m.path_bytes(800, state="standby", direction="received")
    m.path_bytes(0, state="active", direction="tx")  # ignored
    m.datagrams_dropped_offpath()
    m.datagrams_dropped_offpath(2)

    migrations = sorted(col.points("quic.migrations"), key=lambda p: sorted(p[0].items()))
    assert migrations == [
        ({"quic.migration.reason": "failover", "quic.migration.result": "rolled_back"}, 1),
        ({"quic.migration.reason": "manual", "quic.migration.result": "completed"}, 2),
        ({"quic.migration.reason": "other", "quic.migration.result": "other"}, 1),
    ]
    assert col.points("quic.migration.rollbacks") == [({"quic.migration.reason": "failover"}, 1)]
    assert col.points("quic.path.active_changes") == [({"quic.migration.reason": "drain"}, 1)]
    assert sorted(col.points("quic.probe.failures"), key=str) == sorted(
        [({"error.type": "timeout"}, 1), ({"error.type": "other"}, 1)], key=str
    )
    assert sorted(col.points("quic.path.bytes"), key=str) == sorted(
        [
            ({"quic.path.state": "active", "network.io.direction": "transmit"}, 1200),
            ({"quic.path.state": "standby", "network.io.direction": "receive"}, 800),
        ],
        key=str,
    )
    assert col.points("quic.datagrams.dropped_offpath") == [({}, 3)]


def test_probe_rtt_histogram_in_seconds(col: Collected) -> None:
    for rtt in (0.0004, 0.0012, 0.030):
        col.metrics.probe_rtt(rtt)
    ((attrs, point),) = col.points("quic.probe.rtt")
    assert attrs == {}
    assert point.count == 3
    assert point.sum == pytest.approx(0.0316)
    assert 0.001 in point.explicit_bounds  # the advisory RTT buckets, not the ms defaults


def test_cid_spare_gauge_reports_the_lowest(col: Collected) -> None:
    spare = {"a": 5, "b": 2}
    unregister_a = col.metrics.register_cid_spare(lambda: spare["a"])
    unregister_b = col.metrics.register_cid_spare(lambda: spare["b"])
    col.metrics.register_cid_spare(lambda: None)  # not known yet: ignored

    def broken() -> int:
        raise RuntimeError("connection closing")

    col.metrics.register_cid_spare(broken)  # must not break collection
    assert col.points("quic.cid.spare") == [({}, 2)]
    unregister_b()
    assert col.points("quic.cid.spare") == [({}, 5)]
    unregister_a()
    unregister_a()  # idempotent
    assert col.points("quic.cid.spare") == []


def test_noop_without_provider() -> None:
    m = Metrics(None)
    assert not m.enabled
    m.migration("manual", "completed")
    m.probe_rtt(0.001)
    m.path_bytes(1, state="active", direction="tx")
    m.register_cid_spare(lambda: 1)()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("network.peer.port", 4433),
        ("quic.cid.sequence.before", 3),
        ("quic.connection.id", "c1"),
        ("conn_id", "c1"),
        ("network.peer.address", "x"),
        ("local_addr", "x"),
        ("server.host", "x"),
        ("source", "127.0.0.1"),
        ("source", "::1"),
        ("source", "/ip4/127.0.0.1/udp/1/quic-v1"),
        ("source", "[::1]:4433"),
        ("source", "example.org:443"),
        ("dcid", "0123456789abcdef"),
    ],
)
def test_low_cardinality_strips_and_rejects(key: str, value: object) -> None:
    assert low_cardinality({key: value, "quic.migration.reason": "manual"}) == {
        "quic.migration.reason": "manual"
    }
    with pytest.raises(ValueError, match="cardinality"):
        low_cardinality({key: value}, strict=True)


def test_low_cardinality_keeps_safe_attributes() -> None:
    safe = {
        "quic.migration.reason": "failover",
        "quic.path.state": "active",
        "network.io.direction": "receive",
        "network.transport": "quic",
        "network.type": "ipv6",
        "error.type": "timeout",
        "quic.switch.rolled_back": True,
    }
    assert low_cardinality(safe, strict=True) == safe
    assert low_cardinality(None) == {}


def test_node_figures_are_summed_over_supervisors_and_labelled(col: Collected) -> None:
    figures = {
        "loop_lag_s": 0.25,
        "keepalives": {"representative": 4, "nat": 2},
        "groups": {"alive": 2, "suspect": 0, "dead": 1},
        "evidence": {"peer_gone": 1},
        "queued": 3,
        "in_flight": 64,
        "suspect_failovers": 1,
    }
    unregister = col.metrics.register_node(lambda: figures)
    col.metrics.register_node(lambda: {**figures, "queued": 2, "keepalives": {"nat": 1}})

    def broken() -> dict[str, Any]:
        raise RuntimeError("supervisor stopping")

    col.metrics.register_node(broken)  # must not break collection
    assert col.points("quic.migrations.queued") == [({}, 5)]
    assert sorted(col.points("quic.health.keepalives"), key=str) == [
        ({"quic.keepalive.kind": "nat"}, 3),
        ({"quic.keepalive.kind": "representative"}, 4),
    ]
    assert ({"quic.health.state": "dead"}, 2) in col.points("quic.health.groups")
    assert col.points("quic.health.evidence") == [({"quic.health.evidence": "peer_gone"}, 2)]
    assert col.points("quic.migration.suspect_failovers") == [({}, 2)]
    assert col.points("quic.node.loop_lag") == [({}, 0.5)]
    unregister()
    assert col.points("quic.migrations.in_flight") == [({}, 64)]
