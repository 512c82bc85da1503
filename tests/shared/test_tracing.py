"""shared.tracing: when tracing is on (only the standard OTEL_* variables decide), that nothing of
the SDK is imported when it is off, and the W3C traceparent round trip."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shared.tracing import TracingSettings, current_traceparent, setup_tracing


@pytest.mark.parametrize(("env", "exporter"), [
    ({}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "otlp"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, "otlp"),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, "otlp"),
    ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, None),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, None),
    ({"OTEL_SDK_DISABLED": "false", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "otlp"),
])
def test_what_switches_tracing_on(env: dict[str, str], exporter: str | None) -> None:
    assert TracingSettings.model_validate(env).exporter == exporter


def test_traces_url() -> None:
    assert TracingSettings.model_validate(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}).traces_url == "http://c:4318/v1/traces"
    assert TracingSettings.model_validate({
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t/x"}).traces_url == "http://t/x"
    assert TracingSettings.model_validate({}).traces_url is None


def test_off_imports_no_sdk() -> None:
    code = ("import sys; from shared.tracing import setup_tracing; "
            "assert setup_tracing('x') is None; "
            "assert not [m for m in sys.modules if m.startswith('opentelemetry.sdk')]; "
            "import gateway.app, gateway.tracing, trainer.tracing, engine.tracing; "
            "assert not [m for m in sys.modules if m.startswith('opentelemetry.sdk')]")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_spans_and_traceparent(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    tracing = setup_tracing("t", TracingSettings.model_validate({"OTEL_TRACES_EXPORTER":
                                                                 "console"}))
    assert tracing is not None
    memory = InMemorySpanExporter()
    tracing.provider.add_span_processor(SimpleSpanProcessor(memory))
    parent = tracing.extract({"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"})
    assert current_traceparent() is None
    with tracing.span("outer", {"a": 1}, context=parent):
        tp = current_traceparent()
        assert tp is not None and tp.startswith("00-" + "ab" * 16 + "-")
        headers: dict[str, str] = {}
        tracing.inject(headers)
        assert headers["traceparent"] == tp
        with pytest.raises(ValueError), tracing.span("inner", current=False):
            raise ValueError("boom")
    # Garbage is no context: a new trace starts.
    with tracing.span("fresh", context=tracing.extract({"traceparent": "garbage"})):
        assert not (current_traceparent() or "").startswith("00-" + "ab" * 16)
    spans = {s.name: s for s in memory.get_finished_spans()}
    assert spans["outer"].parent is not None and spans["outer"].parent.span_id == 0xcdcdcdcdcdcdcdcd
    assert spans["inner"].parent.span_id == spans["outer"].context.span_id  # type: ignore[union-attr]
    assert spans["inner"].status.status_code.name == "ERROR"
    assert spans["inner"].events[0].name == "exception"
    tracing.shutdown()
