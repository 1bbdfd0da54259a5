"""What tracing costs a migration: switch time with spans exported over OTLP/HTTP vs no provider.

    python -m bench.telemetry_overhead [--migrations 200]

One process, one event loop: an echo listener and two client Supervisors dialling it, one with
a tracer provider (``BatchSpanProcessor`` -> ``OTLPSpanExporter`` -> a real OTLP/HTTP receiver
on loopback, ``tests/rig_otlp.py``), one without. Each connection has two validated paths and
switches back and forth; the two supervisors take turns, so machine noise hits both alike.
Prints JSON: median/p90 ``Path.switch()`` time of each, the median difference, the spans the
receiver got, and ``span_cpu_us``: the event-loop CPU time of the spans of one migration
(``quic.migration`` + ``quic.path.switch`` + path events, started and ended) measured alone.

Figures depend on the machine; the JSON records the CPU count and the SDK version.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import tempfile
import time
from importlib.metadata import version
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from supervisor.cli.demo import echo_handler, self_signed_cert
from supervisor.core.handles import Path as QuicPath
from supervisor.orchestration.supervisor import Supervisor
from telemetry.tracing import EVENT_PATH_STATE_CHANGED, SPAN_PATH_SWITCH, Tracing, path_event
from tests.rig_otlp import OTLPReceiver


def _ms(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000, 3)


async def _client(sup: Supervisor, server: str, cafile: str) -> list[QuicPath]:
    conn = await sup.dial(server, alpn_protocols=["echo"], cafile=cafile)
    mc = conn.as_migratable()
    second = await mc.add_path("/ip4/127.0.0.2/udp/0/quic-v1")
    await second.probe()
    return mc.paths()


async def _switch_times(migrations: int, endpoint: str) -> dict[str, Any]:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    with tempfile.TemporaryDirectory(prefix="qs-bench-") as tmp:
        cert, key = self_signed_cert(tmp)
        async with (
            Supervisor() as server_sup,
            Supervisor(enable_experimental_connection_migration=True) as plain,
            Supervisor(
                enable_experimental_connection_migration=True, tracer_provider=provider
            ) as traced,
        ):
            listener = await server_sup.listen(
                "/ip4/127.0.0.1/udp/0/quic-v1",
                certfile=cert,
                keyfile=key,
                alpn_protocols=["echo"],
                handler=echo_handler,
            )
            clients = {
                "none": await _client(plain, str(listener.multiaddr), str(cert)),
                "otlp": await _client(traced, str(listener.multiaddr), str(cert)),
            }
            times: dict[str, list[float]] = {"none": [], "otlp": []}
            for i in range(migrations + 10):  # the first 10 of each warm up
                for mode, paths in clients.items():
                    target = paths[(i + 1) % 2]
                    t0 = time.perf_counter()
                    await target.switch()
                    if i >= 10:
                        times[mode].append(time.perf_counter() - t0)
    provider.force_flush()
    provider.shutdown()
    none, otlp = times["none"], times["otlp"]
    return {
        "migrations": migrations,
        "switch_none": {"p50_ms": _ms(none, 0.5), "p90_ms": _ms(none, 0.9)},
        "switch_otlp": {"p50_ms": _ms(otlp, 0.5), "p90_ms": _ms(otlp, 0.9)},
        "median_diff_ms": round((statistics.median(otlp) - statistics.median(none)) * 1000, 3),
    }


def _span_cpu_us(n: int = 5000) -> float:
    """Event-loop CPU time (µs) of one migration's spans with a BatchSpanProcessor attached."""
    provider = TracerProvider()

    class _Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:  # the export thread is not the loop
            return SpanExportResult.SUCCESS

    provider.add_span_processor(BatchSpanProcessor(_Discard(), max_queue_size=n * 4))
    tracing = Tracing(provider)
    t0 = time.process_time()
    for _ in range(n):
        with tracing.migration_span(
            "0123456789ab", "manual", ("127.0.0.1", 1), ("127.0.0.2", 2), ("127.0.0.1", 3)
        ) as span:
            for old, new in (("standby", "active"), ("active", "standby")):
                path_event(span, EVENT_PATH_STATE_CHANGED, "/ip4/127.0.0.1/udp/1/quic-v1", old, new)
            with tracing.child_span(SPAN_PATH_SWITCH) as switch:
                switch.set_attribute("quic.switch.rolled_back", False)
    elapsed = time.process_time() - t0
    provider.shutdown()
    return round(elapsed / n * 1e6, 2)


def main(migrations: int = 200) -> dict[str, Any]:
    logging.getLogger("opentelemetry").setLevel(logging.ERROR)
    with OTLPReceiver() as rx:
        result = asyncio.run(_switch_times(migrations, f"{rx.endpoint}/v1/traces"))
        result["spans_received"] = len(rx.spans())
    result["span_cpu_us"] = _span_cpu_us()
    result["cpus"] = os.cpu_count()
    result["opentelemetry_sdk"] = version("opentelemetry-sdk")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--migrations", type=int, default=200)
    print(json.dumps(main(parser.parse_args().migrations), indent=2))
