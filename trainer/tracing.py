"""The trainer's spans (``shared.tracing`` holds the setup).

A job's span (``fine-tuning job``) continues the trace of the API request that created it (its
``traceparent`` travels in the job spec, so in the job record too); ``validate``, ``train``,
``evaluate``, ``gate`` and ``register`` are its children. The pipeline runs in a worker thread,
so phases name their parent explicitly instead of relying on the current context.

The monitor's runs (``quality monitor``, ``shadow evaluation``) are root spans; a shadow
evaluation's replays go through the gateway with the run's ``traceparent``, so the gateway's
request spans join the run's trace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from shared.tracing import NO_SPAN, Tracing


class JobTrace:
    """The job span, and child spans for the pipeline's phases (safe from any thread)."""

    def __init__(self, tracing: Tracing, span: Any) -> None:
        self.tracing = tracing
        self.span = span

    @contextlib.contextmanager
    def phase(self, name: str, **attributes: Any) -> Iterator[Any]:
        from opentelemetry import trace

        parent = trace.set_span_in_context(self.span)
        with self.tracing.span(name, {f"tunegate.{k}": v for k, v in attributes.items()},
                               context=parent) as span:
            yield span


def phase(job: JobTrace | None, name: str, **attributes: Any) -> Any:
    """A phase span for a ``with`` block; nothing when tracing is off."""
    return NO_SPAN if job is None else job.phase(name, **attributes)


def note(span: Any, **attributes: Any) -> None:
    """Set ``tunegate.*`` attributes on a phase's span (a no-op without one)."""
    if span is not None:
        for k, v in attributes.items():
            if v is not None:
                span.set_attribute(f"tunegate.{k}", v)


@contextlib.contextmanager
def job_span(tracing: Tracing | None, job_id: str, name: str, base: str,
             traceparent: str | None) -> Iterator[JobTrace | None]:
    if tracing is None:
        yield None
        return
    parent = tracing.extract({"traceparent": traceparent}) if traceparent else None
    with tracing.span("fine-tuning job", {"tunegate.job.id": job_id, "tunegate.adapter.name": name,
                                          "gen_ai.request.model": base,
                                          "gen_ai.operation.name": "fine_tuning"},
                      kind="consumer", context=parent) as span:
        yield JobTrace(tracing, span)
    tracing.flush()  # a job is rare and long: export it now rather than on the next batch


def run_span(tracing: Tracing | None, name: str) -> Any:
    """A monitor run's root span; nothing when tracing is off."""
    if tracing is None:
        return NO_SPAN
    from opentelemetry import context

    return tracing.span(name, {"tunegate.monitor.job": name}, context=context.Context())
