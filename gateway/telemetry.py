"""Optional OpenTelemetry traces of the gateway's generation calls (the `otel` extra; off by default).

When `[telemetry] traces = true`, each Generate/GenerateStream call becomes one span (see
gateway.admission) with the tenant, method, model, request id, status and token counts as
attributes — never a prompt, a completion or a token. Spans go to a local OTLP collector.
"""

from __future__ import annotations

from typing import Any

from gateway.config import TelemetryConfig

__all__ = ["TelemetryUnavailableError", "make_tracer"]


class TelemetryUnavailableError(Exception):
    """Traces are enabled but the `otel` extra (or its OTLP exporter) is not installed."""


def make_tracer(cfg: TelemetryConfig, *, exporter: Any = None) -> tuple[Any, Any]:
    """A (tracer, provider) pair when traces are on, else (None, None). `exporter` replaces the
    OTLP exporter (tests pass the SDK's in-memory one). Call `provider.shutdown()` at exit."""
    if not cfg.traces:
        return None, None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        raise TelemetryUnavailableError(
            'telemetry.traces is on but OpenTelemetry is not installed (pip install "airlock[otel]")'
        ) from None
    provider = TracerProvider(resource=Resource.create({"service.name": cfg.service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise TelemetryUnavailableError(
                'telemetry.traces is on but the OTLP exporter is not installed (pip install "airlock[otel]")'
            ) from None
        otlp = OTLPSpanExporter(endpoint=cfg.otlp_endpoint, insecure=True)  # a collector on this host
        provider.add_span_processor(BatchSpanProcessor(otlp))
    # A provider of our own, not the global one: nothing else in the process starts exporting.
    return provider.get_tracer("airlock.gateway"), provider
