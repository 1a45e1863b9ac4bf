"""Tracing: one trace from a GraphQL mutation to the projector that shows its effect.

The W3C ``traceparent`` of the span that sends a command is stored in every event's metadata;
the relay continues that trace when it publishes (and puts its own span's ``traceparent`` in the
Kafka headers), and the projector continues it when it applies the event — on either fan-out
path. Only the OpenTelemetry API is required; the SDK and an OTLP exporter are switched on by
settings (:func:`configure_tracing`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACER_NAME = "agentworks"
_propagator = TraceContextTextMapPropagator()


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def current_traceparent() -> str:
    """The ``traceparent`` of the active span ("" when nothing is being traced)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent", "")


def current_trace_ids() -> dict[str, str]:
    """``trace_id``/``span_id`` of the active span, for log lines (empty when not tracing)."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return {}
    return {
        "trace_id": format(span_context.trace_id, "032x"),
        "span_id": format(span_context.span_id, "016x"),
    }


def tracing_enabled() -> bool:
    """Whether spans are recorded anywhere (a tracer provider other than the default no-op
    one is installed); lets a hot loop skip building spans nobody records."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.NoOpTracerProvider | trace.ProxyTracerProvider)


@contextmanager
def continue_trace(
    name: str,
    traceparent: str | None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    start_time: int | None = None,
    end_time: int | None = None,
) -> Iterator[Span]:
    """A span that continues the trace named by ``traceparent`` (or starts one).

    ``start_time``/``end_time`` (ns since the epoch) record work that was timed elsewhere.
    """
    parent = _propagator.extract({"traceparent": traceparent}) if traceparent else None
    token = otel_context.attach(parent) if parent is not None else None
    try:
        span = tracer().start_span(name, kind=kind, attributes=attributes, start_time=start_time)
        try:
            with trace.use_span(span, end_on_exit=False):
                yield span
        except Exception as error:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, str(error)))
            raise
        finally:
            span.end(end_time=end_time)
    finally:
        if token is not None:
            otel_context.detach(token)


def configure_tracing(
    *,
    service_name: str,
    otlp_endpoint: str | None = None,
    exporter: Any | None = None,
) -> Any:
    """Install an SDK tracer provider exporting to OTLP/HTTP (or to ``exporter``, in tests).

    Returns the provider; without the SDK installed and no exporter asked for, does nothing.
    """
    if otlp_endpoint is None and exporter is None:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if otlp_endpoint is not None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    trace.set_tracer_provider(provider)
    return provider
