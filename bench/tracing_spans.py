"""CPU of the gateway's spans for one request, in-process (thread CPU time, so it holds on a busy
machine where wall-clock latencies do not): the six spans a chat request makes (server, auth,
resolve model, quota, choose replica, the engine call) with their attributes, through the real
SDK with a batch processor and gateway.tracing's helpers: the part on the request path, the part
after the response is sent (the short steps' spans), and the OTLP protobuf encoding per span in
the export thread.

    .venv/bin/python bench/tracing_spans.py   # prints JSON; bench/results/tracing_spans.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "tracing_spans.json"


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from opentelemetry import context, trace
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    from gateway import tracing as gw
    from gateway.tracing import Marks
    from shared.tracing import Tracing

    class Encoder(SpanExporter):
        spans = 0
        cpu_s = 0.0

        def export(self, spans: Any) -> SpanExportResult:
            t0 = time.thread_time()
            encode_spans(spans).SerializeToString()
            Encoder.cpu_s += time.thread_time() - t0
            Encoder.spans += len(spans)
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Encoder(), max_queue_size=100_000))
    t = Tracing(provider)

    after_s = [0.0]

    def request() -> None:
        # What TraceRequests, the auth dependency and serving.prepare/_send do, through the same
        # helpers (gateway.tracing): live server and client spans, the short steps as marks.
        root = t.start("POST", {"http.request.method": "POST",
                                "url.path": "/v1/chat/completions"}, kind="server")
        state: dict[str, Any] = {"trace_marks": Marks(t, root)}
        token = context.attach(trace.set_span_in_context(root))
        with gw.span(t, state, "auth") as s:
            s.set_attribute("tunegate.key_id", "key_0123456789abcdef")
        with gw.span(t, state, "resolve model", {"gen_ai.request.model": "reviews"}) as s:
            s.set_attribute("tunegate.model.resolved", "reviews@v3")
        with gw.span(t, state, "quota"):
            pass
        gw.choose_replica(t, state, "http://10.0.0.7:8001", 3, "affinity", 1)
        call = t.start("chat reviews", {
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "vllm",
            "gen_ai.request.model": "reviews", "server.address": "http://10.0.0.7:8001",
            "tunegate.lane": "stable", "tunegate.model.version": 3,
            "gen_ai.request.max_tokens": 64, "gen_ai.request.temperature": 0.1}, kind="client")
        headers: dict[str, str] = {}
        t.inject(headers, call)
        call.add_event("gen_ai.first_token", {"tunegate.ttft_ms": 12.5})
        for k, v in (("gen_ai.usage.input_tokens", 31), ("gen_ai.usage.output_tokens", 64),
                     ("gen_ai.response.model", "reviews@v3"),
                     ("gen_ai.response.id", "chatcmpl-0123456789abcdef")):
            call.set_attribute(k, v)
        call.set_attribute("gen_ai.response.finish_reasons", ["length"])
        call.end()
        context.detach(token)
        # The response has been sent from here on.
        a0 = time.thread_time()
        for k, v in (("http.route", "/v1/chat/completions"), ("http.response.status_code", 200),
                     ("tunegate.request_id", "0123456789abcdef0123456789abcdef")):
            root.set_attribute(k, v)
        state["trace_marks"].flush()
        root.end()
        after_s[0] += time.thread_time() - a0

    n = 5000
    for _ in range(500):
        request()
    provider.force_flush()
    Encoder.spans, Encoder.cpu_s, after_s[0] = 0, 0.0, 0.0
    t0 = time.thread_time()
    for _ in range(n):
        request()
    path_s = time.thread_time() - t0 - after_s[0]
    provider.force_flush()
    result = {
        "request_path_us_per_request": round(path_s / n * 1e6, 1),
        "after_response_us_per_request": round(after_s[0] / n * 1e6, 1),
        "export_encode_us_per_span": round(Encoder.cpu_s / max(Encoder.spans, 1) * 1e6, 1),
        "spans_per_request": 6,
        "requests": n,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
