"""Trace context over gRPC: a server interceptor that runs every call of a service's own API in
a SERVER span continuing the caller's trace, and a client interceptor that sends the current
trace context with every call (unary calls in a CLIENT span of their own, so the time spent in
a server that does not trace, such as `tensorflow/serving`, still shows). Installed only while
tracing is on (`ServiceRuntime`, `tls.open_channel`)."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from prolifscore.core.runtime import tracing

# Probes and tooling: a span per health check would drown the traces that matter.
_UNTRACED = ("/grpc.health.", "/grpc.reflection.")


def _attributes(method: str) -> dict[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _set_code(span: Any, context: grpc.ServicerContext) -> None:
    """The status the handler set (None when it returned normally: OK)."""
    code = context.code() if callable(getattr(context, "code", None)) else None
    span.set_attribute("rpc.grpc.status_code", (code or grpc.StatusCode.OK).value[0])


class ServerTracing(grpc.ServerInterceptor):
    """A SERVER span around each unary and server-streaming call (health and reflection
    excepted), the child of the trace context in the call's metadata."""

    def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        method = details.method  # type: ignore[attr-defined]
        if handler is None or method.startswith(_UNTRACED):
            return handler
        metadata = tuple(details.invocation_metadata or ())  # type: ignore[attr-defined]
        attrs = _attributes(method)
        name = method.lstrip("/")

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            span = tracing.start(name, kind="server", parent=metadata, attributes=attrs)
            with tracing.current(span):
                try:
                    return handler.unary_unary(request, context)
                finally:  # also when the handler aborts: its status is the span's
                    _set_code(span, context)

        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            span = tracing.start(name, kind="server", parent=metadata, attributes=attrs)
            with tracing.current(span):
                try:
                    yield from handler.unary_stream(request, context)
                finally:
                    _set_code(span, context)

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler  # client streaming: no service of the project has one


class _Details(
    collections.namedtuple(
        "_Details",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    """A call's details with other metadata (grpc's own type cannot be built)."""


def _with(details: grpc.ClientCallDetails, entries: list[tuple[str, str]]) -> _Details:
    given = [(k, v) for k, v in (details.metadata or ()) if k.lower() not in tracing.HEADERS]
    return _Details(
        details.method,
        details.timeout,
        [*given, *entries],
        details.credentials,
        getattr(details, "wait_for_ready", None),
        getattr(details, "compression", None),
    )


class ClientTracing(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Sends the trace context: a unary call gets a CLIENT span (ended when the call completes,
    an error status marked); a stream carries the current span's context."""

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        method = details.method
        if method.startswith(_UNTRACED) or not tracing.enabled():
            return continuation(details, request)
        span = tracing.start(method.lstrip("/"), kind="client", attributes=_attributes(method))
        try:
            call = continuation(_with(details, tracing.grpc_metadata(span)), request)
        except BaseException:
            span.end()
            raise

        def done(outcome: Any) -> None:
            code = outcome.code()
            if code is not None:
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code != grpc.StatusCode.OK:
                    from opentelemetry.trace import Status, StatusCode

                    span.set_status(Status(StatusCode.ERROR, code.name))
            span.end()

        call.add_done_callback(done)
        return call

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(_with(details, tracing.grpc_metadata()), request)


def traced_channel(channel: grpc.Channel) -> grpc.Channel:
    """`channel` sending trace context while tracing is on; as it is otherwise."""
    return grpc.intercept_channel(channel, ClientTracing()) if tracing.enabled() else channel


def server_interceptors() -> list[grpc.ServerInterceptor]:
    """[ServerTracing()] while tracing is on, else nothing."""
    return [ServerTracing()] if tracing.enabled() else []
