"""OpenTelemetry tracing, shared by the gateway, the engine and the trainer.

Configured only through the standard ``OTEL_*`` variables. :class:`TracingSettings` reads the
few that decide whether tracing is on and what the service is called; everything else
(``OTEL_TRACES_SAMPLER``, ``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_EXPORTER_OTLP_HEADERS``,
``OTEL_BSP_*``, ``OTEL_RESOURCE_ATTRIBUTES``, ...) is read by the OpenTelemetry SDK itself, as
the specification says it should.

Tracing is **on** when an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) or ``OTEL_TRACES_EXPORTER`` names an exporter
(``otlp``: OTLP over HTTP/protobuf; ``console``: spans printed as JSON), and
``OTEL_SDK_DISABLED`` is not ``true``. Otherwise :func:`setup_tracing` returns None, the SDK is
never imported, and every call site skips its spans behind one ``is None`` test.

No global tracer provider is installed: each process hands its :class:`Tracing` to the code that
makes spans, and W3C ``traceparent`` headers are read and written with the propagator directly.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, MutableMapping
from typing import Any

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger("tunegate.tracing")

#: An unused, reusable context manager: what call sites enter when tracing is off.
NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()


def _env(name: str) -> Any:
    return Field(default=None, validation_alias=AliasChoices(name))


class TracingSettings(BaseSettings):
    """The standard OpenTelemetry variables that switch tracing on and name the service."""

    model_config = SettingsConfigDict(extra="ignore")

    sdk_disabled: str | None = Field(default=None, validation_alias=AliasChoices(
        "OTEL_SDK_DISABLED"), description="`true` turns every span off")
    traces_exporter: str | None = Field(default=None, validation_alias=AliasChoices(
        "OTEL_TRACES_EXPORTER"), description="otlp | console | none (unset: otlp when an "
        "endpoint is set, else none)")
    endpoint: str | None = Field(default=None, validation_alias=AliasChoices(
        "OTEL_EXPORTER_OTLP_ENDPOINT"), description="OTLP/HTTP base URL; traces go to "
        "<endpoint>/v1/traces")
    traces_endpoint: str | None = Field(default=None, validation_alias=AliasChoices(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"), description="full OTLP/HTTP traces URL")
    service_name: str | None = Field(default=None, validation_alias=AliasChoices(
        "OTEL_SERVICE_NAME"), description="service.name; default per process "
        "(tunegate-gateway, tunegate-engine, tunegate-trainer)")

    @property
    def exporter(self) -> str | None:
        """``otlp``, ``console`` or None (off)."""
        if (self.sdk_disabled or "").strip().lower() == "true":
            return None
        names = [n.strip().lower() for n in (self.traces_exporter or "").split(",") if n.strip()]
        if not names:
            return "otlp" if (self.endpoint or self.traces_endpoint) else None
        if "none" in names:
            return None
        return "console" if names == ["console"] else "otlp"

    @property
    def enabled(self) -> bool:
        return self.exporter is not None

    @property
    def traces_url(self) -> str | None:
        """Where OTLP/HTTP traces go (for engines told the endpoint by flag, e.g. vLLM)."""
        if self.traces_endpoint:
            return self.traces_endpoint
        if self.endpoint:
            return self.endpoint.rstrip("/") + "/v1/traces"
        return None


class Tracing:
    """One process's tracer and the W3C propagator; :meth:`shutdown` flushes what is queued."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer = provider.get_tracer("tunegate")
        self._propagator = TraceContextTextMapPropagator()
        from opentelemetry.trace import SpanKind

        self._kinds = {k.name.lower(): k for k in SpanKind}

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.provider.shutdown()

    def flush(self) -> None:
        with contextlib.suppress(Exception):
            self.provider.force_flush()

    # ---- spans ----------------------------------------------------------------------------
    def span(self, name: str, attributes: Mapping[str, Any] | None = None, *,
             kind: str = "internal", context: Any = None, links: Any = None,
             current: bool = True) -> _Block:
        """A span for a ``with`` block (a child of the current span, or of ``context``), made
        current inside it unless ``current`` is False (cheaper, for spans without children); an
        exception leaving the block is recorded on it."""
        return _Block(self, name, attributes, kind, context, links, current)

    def start(self, name: str, attributes: Mapping[str, Any] | None = None, *,
              kind: str = "internal", context: Any = None, links: Any = None,
              start_time: int | None = None) -> Any:
        """A span that is not made current; the caller ends it."""
        return self.tracer.start_span(name, context=context, kind=self._kinds[kind],
                                      attributes=attributes, links=links, start_time=start_time)

    # ---- propagation -------------------------------------------------------------------------
    def extract(self, carrier: Mapping[str, str]) -> Any:
        """The context a ``traceparent`` in ``carrier`` names (an empty context if none)."""
        return self._propagator.extract(carrier)

    def inject(self, carrier: MutableMapping[str, str], span: Any = None) -> None:
        """Write ``traceparent`` for ``span`` (default: the current span) into ``carrier``."""
        from opentelemetry import trace

        ctx = trace.set_span_in_context(span) if span is not None else None
        self._propagator.inject(carrier, context=ctx)

    def link(self, span: Any) -> list[Any]:
        """A link to ``span`` (for work done on behalf of it, in a trace of its own)."""
        from opentelemetry.trace import Link

        ctx = span.get_span_context() if span is not None else None
        return [Link(ctx)] if ctx is not None and ctx.is_valid else []


class _Block:
    """What :meth:`Tracing.span` returns: a plain class rather than a generator-based context
    manager, since it runs several times per request on the gateway's hot path."""

    __slots__ = ("tracing", "name", "attributes", "kind", "context", "links", "current",
                 "span", "token")

    def __init__(self, tracing: Tracing, name: str, attributes: Mapping[str, Any] | None,
                 kind: str, context: Any, links: Any, current: bool) -> None:
        self.tracing, self.name, self.attributes = tracing, name, attributes
        self.kind, self.context, self.links, self.current = kind, context, links, current
        self.token: Any = None

    def __enter__(self) -> Any:
        self.span = self.tracing.start(self.name, self.attributes, kind=self.kind,
                                       context=self.context, links=self.links)
        if self.current:
            from opentelemetry import context, trace

            self.token = context.attach(trace.set_span_in_context(self.span))
        return self.span

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            from opentelemetry.trace import Status, StatusCode

            self.span.record_exception(exc)
            self.span.set_status(Status(StatusCode.ERROR, f"{exc_type.__name__}: {exc}"))
        if self.token is not None:
            from opentelemetry import context

            context.detach(self.token)
        self.span.end()


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span (None without one). Works with the API
    alone: without the SDK there is never a current span."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def setup_tracing(service: str, settings: TracingSettings | None = None) -> Tracing | None:
    """A tracer for this process when tracing is configured, else None (the SDK stays
    unimported). ``service`` is ``service.name`` unless ``OTEL_SERVICE_NAME`` is set."""
    settings = settings or TracingSettings()
    exporter = settings.exporter
    if exporter is None:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

    # Resource.create also reads OTEL_RESOURCE_ATTRIBUTES; the sampler comes from
    # OTEL_TRACES_SAMPLER(_ARG) inside TracerProvider (default: parentbased_always_on).
    provider = TracerProvider(resource=Resource.create(
        {"service.name": settings.service_name or service}))
    span_exporter: SpanExporter
    if exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        span_exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # Endpoint, headers, timeout and compression from OTEL_EXPORTER_OTLP_(TRACES_)*.
        span_exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    log.info("tracing on: %s exporter, service %s", exporter, settings.service_name or service)
    return Tracing(provider)


GEN_AI_OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion"}
