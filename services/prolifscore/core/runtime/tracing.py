"""Distributed tracing with OpenTelemetry: one trace per slide from `prolifscore ingest` through
tiling and filtering to its shards, and one per score request from `ScoreSlide` or
prolif.score.requests through the model server calls to the result.

The trace context travels as W3C trace context (`traceparent`, `tracestate`): in Kafka record
headers (the bus adds the current span's to every record it publishes; a consumer starts its
span from the record's) and in gRPC metadata (every channel `tls.open_channel` opens sends it,
every server `ServiceRuntime` runs starts its span from it).

Off by default (`TracingSettings`): then OpenTelemetry is not even imported, `start` returns a
no-op span and the carriers stay empty, so the cost is one global check per call. Spans go to
their own tracer provider, never the process-global one, so tests can set up and tear down.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prolifscore.core.runtime.settings import TracingSettings

log = logging.getLogger(__name__)

MODES = ("off", "otlp", "file")
HEADERS = ("traceparent", "tracestate")  # W3C trace context, the only fields carried
Carrier = Iterable[tuple[str, Any]]  # Kafka headers (str, bytes) or gRPC metadata (str, str)

_tracer: Any = None  # an opentelemetry Tracer while tracing is on
_provider: Any = None


class _NoSpan:
    """What `start` returns while tracing is off: accepts the calls a span does, does nothing."""

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        pass

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        pass

    def record_exception(self, exception: BaseException) -> None:
        pass

    def end(self) -> None:
        pass


NO_SPAN = _NoSpan()


def resolve_mode(settings: TracingSettings, environ: Mapping[str, str] | None = None) -> str:
    """The mode in force: PROLIF_TRACING if set, else otlp when the standard
    OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT names a collector; OTEL_SDK_DISABLED=true wins."""
    environ = os.environ if environ is None else environ
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return "off"
    mode = settings.mode.strip().lower()
    if not mode:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        return "otlp" if endpoint else "off"
    if mode not in MODES:
        raise ValueError(f"PROLIF_TRACING={settings.mode!r}: expected one of {', '.join(MODES)}")
    if mode == "file" and not settings.file:
        raise ValueError("PROLIF_TRACING=file needs PROLIF_TRACING_FILE")
    return mode


def setup(service: str, settings: TracingSettings, exporter: Any = None) -> bool:
    """Turn tracing on for this process as `service` when `settings` say so (or always with
    `exporter`, a SpanExporter tests pass); whether it is on. A second call replaces the first."""
    mode = "test" if exporter is not None else resolve_mode(settings)
    if mode == "off":
        return False
    from prolifscore.core.runtime import tracing_export  # the SDK: imported only when on

    global _tracer, _provider
    shutdown()
    _provider = tracing_export.provider(service, mode, settings.file, exporter)
    _tracer = _provider.get_tracer("prolifscore")
    log.info("tracing on", extra={"mode": mode, "service": service})
    return True


def shutdown() -> None:
    """Export what is pending and turn tracing off."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def enabled() -> bool:
    return _tracer is not None


def _as_dict(carrier: Carrier | None) -> dict[str, str]:
    """The trace-context entries of Kafka headers or gRPC metadata, as the propagator reads."""
    out: dict[str, str] = {}
    for key, value in carrier or ():
        name = key.lower()
        if name in HEADERS and name not in out and value is not None:
            out[name] = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return out


def _context(parent: Carrier | None) -> Any:
    """The OpenTelemetry context a carrier holds (None: the current one)."""
    if parent is None:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(_as_dict(parent))


def start(
    name: str,
    *,
    kind: str = "internal",
    parent: Carrier | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> Any:
    """A started span, not yet current (see `current`): a child of the trace context in
    `parent` (the Kafka headers or gRPC metadata that came with the work; a carrier without one
    starts a new trace), else of the current span. `kind`: internal, server, client, producer
    or consumer."""
    if _tracer is None:
        return NO_SPAN
    from opentelemetry.trace import SpanKind

    return _tracer.start_span(
        name,
        context=_context(parent),
        kind=SpanKind[kind.upper()],
        attributes={k: v for k, v in (attributes or {}).items() if v is not None and v != ""},
    )


def start_consumer(name: str, record: Any, **attributes: Any) -> Any:
    """A CONSUMER span for the work a Kafka record asks for, continuing the trace its headers
    carry (a record without one starts a trace of its own)."""
    if _tracer is None:
        return NO_SPAN
    where = {
        "messaging.system": "kafka",
        "messaging.destination.name": record.topic,
        "messaging.kafka.destination.partition": record.partition,
        "messaging.kafka.message.offset": record.offset,
    }
    return start(
        name, kind="consumer", parent=record.headers or (), attributes={**where, **attributes}
    )


@contextlib.contextmanager
def current(span: Any) -> Iterator[Any]:
    """Make `span` current inside the block (what is published or called there carries it),
    end it on exit, and record an exception that leaves the block as its error."""
    if span is NO_SPAN:
        yield span
        return
    from opentelemetry import trace

    with trace.use_span(span, end_on_exit=True, record_exception=True):
        yield span


def span(
    name: str, *, kind: str = "internal", parent: Carrier | None = None, **attributes: Any
) -> contextlib.AbstractContextManager[Any]:
    """`current(start(...))`: a span around a block."""
    return current(start(name, kind=kind, parent=parent, attributes=attributes))


def event(name: str, **attributes: Any) -> None:
    """Mark a moment (e.g. a manifest written) on the current span."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().add_event(name, attributes)


def end_all(spans: Iterable[Any]) -> None:
    """End the spans a failure left open (the SDK warns about ending one twice)."""
    for s in spans:
        if getattr(s, "end_time", None) is None:
            s.end()


def _inject(span: Any = None) -> dict[str, str]:
    if _tracer is None:
        return {}
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    context = None if span is None else trace.set_span_in_context(span)
    TraceContextTextMapPropagator().inject(carrier, context)
    return carrier


def kafka_headers() -> list[tuple[str, bytes]]:
    """The current span's context as Kafka record headers ([] without one)."""
    return [(k, v.encode("latin-1")) for k, v in _inject().items()]


def grpc_metadata(span: Any = None) -> list[tuple[str, str]]:
    """`span`'s (default: the current span's) context as gRPC metadata ([] without one)."""
    return list(_inject(span).items())
