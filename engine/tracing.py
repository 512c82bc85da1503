"""The embedded engine's spans: it continues the trace the gateway's ``traceparent`` names.

Per request, emitted from the engine thread when the sequence finishes (timestamps kept on the
sequence, so the hot loop only stores two floats): ``engine request`` (arrival to finish, with
``gen_ai.usage.*``), and its children ``queue`` (waiting for a batch slot), ``prefill`` (admitted
to first token) and ``decode`` (first token to the last). Requests without a ``traceparent`` are
not traced. Off unless ``OTEL_*`` configures tracing (``shared.tracing``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from shared.tracing import Tracing


class EngineTracing:
    def __init__(self, tracing: Tracing, model_name: str) -> None:
        self.tracing = tracing
        self.model_name = model_name

    def context(self, headers: Mapping[str, str]) -> Any:
        """The caller's trace context, or None when the request carries no ``traceparent``."""
        tp = headers.get("traceparent")
        if not tp:
            return None
        return self.tracing.extract({"traceparent": tp, "tracestate": headers.get(
            "tracestate", "")})

    def on_step(self, scheduler: Any, admitted: list[Any], finished: list[Any]) -> None:
        for s in finished:
            if s.trace is not None:
                self.emit(s)

    def emit(self, s: Any) -> None:
        from opentelemetry import trace

        # Monotonic seconds -> wall-clock ns, the unit OpenTelemetry timestamps use.
        offset_ns = time.time_ns() - time.monotonic_ns()

        def ns(t: float) -> int:
            return int(t * 1e9) + offset_ns

        end = time.monotonic()
        root = self.tracing.start("engine request", {
            "gen_ai.operation.name": "chat", "gen_ai.request.model": self.model_name,
            "tunegate.engine.request_id": s.request_id, "tunegate.engine.adapter": s.adapter or "",
            "gen_ai.usage.input_tokens": len(s.prompt_ids),
            "gen_ai.usage.output_tokens": len(s.output_ids),
            "gen_ai.response.finish_reasons": [s.finish_reason or "abort"],
        }, kind="server", context=s.trace, start_time=ns(s.arrival))
        parent = trace.set_span_in_context(root)
        admitted = s.admitted_at
        first = s.first_token_at
        if admitted is not None:
            self.tracing.start("queue", context=parent, start_time=ns(s.arrival)).end(ns(admitted))
            if first is not None:
                self.tracing.start("prefill", {"tunegate.prompt_tokens": len(s.prompt_ids)},
                                   context=parent, start_time=ns(admitted)).end(ns(first))
                self.tracing.start("decode", {"tunegate.output_tokens": len(s.output_ids)},
                                   context=parent, start_time=ns(first)).end(ns(end))
        else:
            self.tracing.start("queue", context=parent, start_time=ns(s.arrival)).end(ns(end))
        root.end(ns(end))


def chain(*hooks: Any) -> Any:
    """One ``Scheduler.on_step`` calling each hook that is not None, in order."""
    live = [h for h in hooks if h is not None]
    if len(live) == 1:
        return live[0]

    def on_step(scheduler: Any, admitted: list[Any], finished: list[Any]) -> None:
        for h in live:
            h(scheduler, admitted, finished)

    return on_step
