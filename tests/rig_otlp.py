"""A real OTLP/HTTP receiver on loopback for tests: decodes protobuf trace and metric exports.

    with OTLPReceiver() as rx:
        env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint}
        ...
        spans = rx.wait_for_spans(3, timeout=10)

``stall()`` makes the receiver hold every request until ``release()`` (a collector that
accepts connections but does not answer), to test that exporting never blocks span ends.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

_STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return _attrs(v.kvlist_value.values)
    return getattr(v, kind)


def _attrs(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    kv: KeyValue
    for kv in kvs:
        out[kv.key] = _value(kv.value)
    return out


class OTLPReceiver:
    """OTLP/HTTP (protobuf) collector on ``127.0.0.1:<free port>``, served from a thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._spans: list[dict[str, Any]] = []
        self._metric_names: list[str] = []
        self._resources: list[dict[str, Any]] = []
        self.requests = 0
        self._gate = threading.Event()
        self._gate.set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet test output
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                receiver._gate.wait()
                if self.path == "/v1/traces":
                    receiver._add_traces(body)
                    reply = ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    receiver._add_metrics(body)
                    reply = ExportMetricsServiceResponse().SerializeToString()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="otlp-receiver", daemon=True
        )

    @property
    def endpoint(self) -> str:
        """Base URL for ``OTEL_EXPORTER_OTLP_ENDPOINT`` (exporters append ``/v1/traces``)."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def _add_traces(self, body: bytes) -> None:
        req = ExportTraceServiceRequest.FromString(body)
        spans = []
        resources = []
        for rs in req.resource_spans:
            resource = _attrs(rs.resource.attributes)
            resources.append(resource)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(
                        {
                            "name": s.name,
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_span_id": s.parent_span_id.hex() or None,
                            "attributes": _attrs(s.attributes),
                            "status": _STATUS.get(s.status.code, str(s.status.code)),
                            "events": [e.name for e in s.events],
                            "scope": ss.scope.name,
                            "resource": resource,
                        }
                    )
        with self._cond:
            self.requests += 1
            self._spans.extend(spans)
            self._resources.extend(resources)
            self._cond.notify_all()

    def _add_metrics(self, body: bytes) -> None:
        req = ExportMetricsServiceRequest.FromString(body)
        names = [
            m.name for rm in req.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
        ]
        with self._cond:
            self.requests += 1
            self._metric_names.extend(names)
            self._cond.notify_all()

    def spans(self) -> list[dict[str, Any]]:
        """Received spans: name, trace_id, span_id, parent_span_id, attributes, status, ..."""
        with self._cond:
            return list(self._spans)

    def metric_names(self) -> list[str]:
        with self._cond:
            return list(self._metric_names)

    def wait_for_spans(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Block until at least ``n`` spans arrived; ``TimeoutError`` otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._spans) >= n, timeout):
                raise TimeoutError(f"got {len(self._spans)} spans, wanted {n}, in {timeout}s")
            return list(self._spans)

    def wait_for_metric(self, name: str, timeout: float = 10.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: name in self._metric_names, timeout):
                raise TimeoutError(f"metric {name!r} not received in {timeout}s")

    def stall(self) -> None:
        """Hold every request (after reading it) until :meth:`release`."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def __enter__(self) -> OTLPReceiver:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
