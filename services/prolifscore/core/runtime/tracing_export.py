"""Where spans go once tracing is on (`tracing.setup` imports this module only then): the
OpenTelemetry SDK's provider with an OTLP exporter (batched, in the background) or a JSON-lines
file that several processes append to (each span written when it ends: tests read the file of a
whole stack; no collector needed)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)


def _hex(value: int | None, width: int) -> str | None:
    return None if value is None else format(value, f"0{width}x")


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """One span as a flat JSON object: ids in hex as collectors show them."""
    ctx = span.get_span_context()
    parent = span.parent
    return {
        "name": span.name,
        "service": span.resource.attributes.get("service.name"),
        "kind": span.kind.name.lower(),
        "trace_id": _hex(ctx.trace_id if ctx else None, 32),
        "span_id": _hex(ctx.span_id if ctx else None, 16),
        "parent_id": _hex(parent.span_id if parent else None, 16),
        "remote_parent": bool(parent and parent.is_remote),
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name.lower(),
        "attributes": dict(span.attributes or {}),
        "events": [e.name for e in span.events],
        "pid": os.getpid(),
    }


class JsonLinesExporter(SpanExporter):
    """Appends each span as one JSON line to `path`. One `os.write` per export on an O_APPEND
    descriptor, so lines of processes writing the same file do not interleave."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        data = "".join(json.dumps(span_record(s), default=str) + "\n" for s in spans).encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def otlp_exporter() -> SpanExporter:
    """The OTLP exporter OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL names (grpc by default, or
    http/protobuf); endpoint, headers, certificates and timeout come from the standard
    OTEL_EXPORTER_OTLP_* variables, which the exporter reads itself."""
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HTTPSpanExporter,
        )

        return HTTPSpanExporter()
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: use grpc or http/protobuf")


def provider(service: str, mode: str, file: str, exporter: SpanExporter | None) -> TracerProvider:
    """A provider for `service` (named prolifscore-<service> unless OTEL_SERVICE_NAME says
    otherwise; sampling from OTEL_TRACES_SAMPLER, default: every trace whose parent is sampled)
    exporting to `exporter` (tests), the file, or OTLP."""
    attributes = (
        {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": f"prolifscore-{service}"}
    )
    result = TracerProvider(resource=Resource.create(attributes))
    if exporter is not None:
        result.add_span_processor(SimpleSpanProcessor(exporter))
    elif mode == "file":
        result.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(file)))
    else:
        result.add_span_processor(BatchSpanProcessor(otlp_exporter()))
    return result
