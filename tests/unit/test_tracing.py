"""Tracing: off costs nothing, on links spans across Kafka headers and gRPC metadata (a real gRPC
server and channel here; the Kafka hop between real service processes is tests/e2e), and OTLP
reaches a collector over gRPC and HTTP (real receivers of the OTLP protocol)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from prolifscore.core.runtime import tracing
from prolifscore.core.runtime.settings import TracingSettings
from prolifscore.core.runtime.tls import open_channel
from prolifscore.core.runtime.tracing_grpc import server_interceptors

ECHO = "/test.Echo/Say"
STREAM = "/test.Echo/Count"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.setup("test", TracingSettings(), exporter=exporter)
    yield exporter
    tracing.shutdown()


def by_name(exporter: InMemorySpanExporter) -> dict[str, object]:
    return {s.name: s for s in exporter.get_finished_spans()}


def test_off_by_default_imports_nothing_and_carries_nothing():
    code = (
        "import sys\n"
        "from prolifscore.core.runtime import bus, service, tls, tracing\n"
        "from prolifscore.core.runtime.settings import TracingSettings\n"
        "assert not tracing.setup('x', TracingSettings())\n"
        "with tracing.span('s') as s:\n"
        "    assert s is tracing.NO_SPAN and tracing.kafka_headers() == []\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    env = {"PATH": "/usr/bin:/bin"}  # no PROLIF_TRACING / OTEL_* from the caller
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_mode_follows_prolif_tracing_then_the_standard_otlp_endpoint():
    off, otlp = TracingSettings(), TracingSettings(mode="otlp")
    assert tracing.resolve_mode(off, {}) == "off"
    assert tracing.resolve_mode(off, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}) == "otlp"
    explicit_off = TracingSettings(mode="off")
    assert tracing.resolve_mode(explicit_off, {"OTEL_EXPORTER_OTLP_ENDPOINT": "x"}) == "off"
    assert tracing.resolve_mode(otlp, {"OTEL_SDK_DISABLED": "true"}) == "off"
    with pytest.raises(ValueError, match="PROLIF_TRACING_FILE"):
        tracing.resolve_mode(TracingSettings(mode="file"), {})
    with pytest.raises(ValueError, match="expected one of"):
        tracing.resolve_mode(TracingSettings(mode="jaeger"), {})


def test_spans_a_failure_left_open_are_ended_once(spans, caplog):
    started = [tracing.start(f"s{i}") for i in range(3)]
    with tracing.current(started[0]):
        pass
    tracing.end_all(started)
    assert sorted(s.name for s in spans.get_finished_spans()) == ["s0", "s1", "s2"]
    assert not [r for r in caplog.records if "ended span" in r.getMessage()]


def test_a_consumer_span_continues_the_trace_of_the_record_headers(spans):
    with tracing.span("ingest slide", kind="producer") as producer:
        headers = [("content-type", b"application/x-protobuf"), *tracing.kafka_headers()]
    record = SimpleNamespace(topic="t", partition=1, offset=7, headers=headers)
    with tracing.current(tracing.start_consumer("tile slide", record)):
        pass
    orphan = SimpleNamespace(topic="t", partition=0, offset=0, headers=[])
    with tracing.span("outer"), tracing.current(tracing.start_consumer("alone", orphan)):
        pass
    got = by_name(spans)
    consumer = got["tile slide"]
    assert consumer.context.trace_id == producer.get_span_context().trace_id
    assert consumer.parent.span_id == producer.get_span_context().span_id
    assert consumer.parent.is_remote
    assert consumer.attributes["messaging.kafka.message.offset"] == 7
    # a record without trace context starts its own trace, even inside another span
    assert got["alone"].parent is None
    assert got["alone"].context.trace_id != got["outer"].context.trace_id


class Echo(grpc.GenericRpcHandler):
    """A gRPC service of two methods whose handlers record the span current inside them."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def service(self, details):  # type: ignore[no-untyped-def]
        def say(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.seen.append(format(tracing_current_span_id(), "016x"))
            if request == b"fail":
                context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
            return request

        def count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            yield from (bytes([i]) for i in range(3))

        if details.method == ECHO:
            return grpc.unary_unary_rpc_method_handler(say)
        if details.method == STREAM:
            return grpc.unary_stream_rpc_method_handler(count)
        return None


def tracing_current_span_id() -> int:
    from opentelemetry import trace

    return trace.get_current_span().get_span_context().span_id


@pytest.fixture
def echo_server(spans) -> Iterator[tuple[str, Echo]]:
    echo = Echo()
    server = grpc.server(ThreadPoolExecutor(2), interceptors=server_interceptors())
    server.add_generic_rpc_handlers([echo])
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", echo
    server.stop(0)


def test_grpc_calls_carry_the_trace_to_the_server_span(spans, echo_server):
    address, echo = echo_server
    channel = open_channel(address, None)
    with tracing.span("score slide") as outer:
        assert channel.unary_unary(ECHO)(b"hi", timeout=5) == b"hi"
        assert list(channel.unary_stream(STREAM)(b"", timeout=5)) == [b"\0", b"\1", b"\2"]
        with pytest.raises(grpc.RpcError):
            channel.unary_unary(ECHO)(b"fail", timeout=5)
    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    channel.close()
    finished = spans.get_finished_spans()
    trace_id = outer.get_span_context().trace_id
    assert {s.context.trace_id for s in finished} == {trace_id}  # health checks: no span
    clients = [s for s in finished if s.kind.name == "CLIENT"]
    servers = [s for s in finished if s.kind.name == "SERVER"]
    assert [s.name for s in clients] == ["test.Echo/Say", "test.Echo/Say"]
    assert sorted(s.name for s in servers) == ["test.Echo/Count", "test.Echo/Say", "test.Echo/Say"]
    outer_id = outer.get_span_context().span_id
    assert all(c.parent.span_id == outer_id for c in clients)
    says = [s for s in servers if s.name == "test.Echo/Say"]
    # each unary call: server span the child of its client span, current in the handler
    assert {s.parent.span_id for s in says} == {c.context.span_id for c in clients}
    assert sorted(echo.seen) == sorted(format(s.context.span_id, "016x") for s in says)
    (count,) = (s for s in servers if s.name == "test.Echo/Count")
    assert count.parent.span_id == outer_id  # a stream carries the current span
    codes = sorted(s.attributes["rpc.grpc.status_code"] for s in says)
    assert codes == [grpc.StatusCode.OK.value[0], grpc.StatusCode.NOT_FOUND.value[0]]
    failed = next(c for c in clients if c.status.status_code.name == "ERROR")
    assert failed.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]


def test_file_mode_appends_one_json_line_per_span(tmp_path):
    path = tmp_path / "spans.jsonl"
    assert tracing.setup("filtering", TracingSettings(mode="file", file=str(path)))
    try:
        with (
            tracing.span("filter batch", **{"prolif.slide_id": "s1"}) as parent,
            tracing.span("inner"),
        ):
            tracing.event("slide filtered")
    finally:
        tracing.shutdown()
    inner, outer = (json.loads(line) for line in path.read_text().splitlines())
    assert outer["name"] == "filter batch" and outer["service"] == "prolifscore-filtering"
    assert outer["attributes"] == {"prolif.slide_id": "s1"}
    assert outer["span_id"] == format(parent.get_span_context().span_id, "016x")
    assert inner["parent_id"] == outer["span_id"] and inner["trace_id"] == outer["trace_id"]
    assert inner["events"] == ["slide filtered"]


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC receiver: what a collector is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request, context):  # type: ignore[no-untyped-def]
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def exported(requests: list) -> dict[str, tuple[str, bytes]]:
    """Span name -> (service.name of its resource, trace id) over everything received."""
    out = {}
    for request in requests:
        for rs in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out[s.name] = (attrs["service.name"], s.trace_id)
    return out


def test_otlp_over_grpc_reaches_a_collector(monkeypatch):
    collector = Collector()
    server = grpc.server(ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    try:
        assert tracing.setup("scoring", TracingSettings())  # the endpoint alone turns it on
        with tracing.span("score slide") as s:
            pass
        tracing.shutdown()  # flushes the batch
    finally:
        tracing.shutdown()
        server.stop(0)
    got = exported(collector.requests)
    assert got["score slide"] == ("prolifscore-scoring", s.get_span_context().trace_id.to_bytes(16))


def test_otlp_over_http_reaches_a_collector(monkeypatch):
    requests: list = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/v1/traces":
                requests.append(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()
            self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{httpd.server_port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "my-tiling")
    try:
        assert tracing.setup("tiling", TracingSettings(mode="otlp"))
        with tracing.span("tile slide"):
            pass
        tracing.shutdown()
    finally:
        tracing.shutdown()
        httpd.shutdown()
    assert exported(requests)["tile slide"][0] == "my-tiling"  # OTEL_SERVICE_NAME wins
