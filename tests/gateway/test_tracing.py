"""Tracing end to end: an `openai` SDK chat request through a gateway process and an embedded
engine process (real SmolLM2), both exporting to a real OTLP/HTTP endpoint in this process
(tests/otlp.py). One connected trace: the gateway's request, auth, model resolution, quota,
replica choice and engine call (GenAI attributes, first-token event), then the engine's request
with queue, prefill and decode. The sampled traffic record carries the same trace id."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis

from tests.gateway.conftest import Records, gateway
from tests.otlp import Collector, Span, collector, connected, otel_env
from tests.procs import free_port, run_server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def otlp() -> Iterator[Collector]:
    with collector() as col:
        yield col


@pytest.fixture(scope="module")
def stream_name() -> str:
    return f"tunegate:test-traffic:{secrets.token_hex(4)}"


@pytest.fixture(scope="module")
def gw(default_model_dir: Path, data_dir: Path, redis_url: str, otlp: Collector,
       stream_name: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    logs = tmp_path_factory.mktemp("traced")
    args = ["-m", "tunegate", "engine", "serve", "--kind", "embedded", "--model",
            str(default_model_dir), "--port", str(port), "--max-model-len", "512",
            "--max-num-seqs", "4"]
    with run_server(args, port=port, log=logs / "engine.log", timeout_s=240,
                    env=otel_env(otlp)) as (engine, _), \
            gateway(data_dir, [engine], redis_url, log=logs / "gateway.log",
                    env={**otel_env(otlp), "TUNEGATE_GATEWAY_SAMPLE_RATE": "1",
                         "TUNEGATE_GATEWAY_SAMPLE_STREAM": stream_name}) as url:
        yield url


def _by_name(spans: list[Span]) -> dict[str, Span]:
    return {s.name: s for s in spans}


def _complete(trace: list[Span]) -> bool:
    names = {s.name for s in trace}
    return {"POST /v1/chat/completions", "chat base", "engine request", "decode"} <= names


def test_sdk_chat_is_one_connected_trace(gw: str, records: Records, otlp: Collector,
                                         redis_url: str, stream_name: str) -> None:
    client = openai.OpenAI(base_url=gw + "/v1", api_key=records.key("user"), max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="base", messages=QUESTION, max_tokens=8, temperature=0, stream=True)
    rid = raw.headers["x-request-id"]
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert "Paris" in text

    def ours(spans: list[Span]) -> list[Span]:
        roots = [s for s in spans if s.attributes.get("tunegate.request_id") == rid
                 and s.name.startswith("POST")]
        return [s for s in spans if roots and s.trace_id == roots[0].trace_id]

    spans = otlp.wait_for(lambda all_: _complete(ours(all_)), timeout_s=30)
    trace = ours(spans)
    assert _complete(trace), sorted(s.name for s in trace)
    assert connected(trace), [(s.name, s.span_id, s.parent_id) for s in trace]
    by = _by_name(trace)
    for name in ("auth", "resolve model", "quota", "choose replica", "queue", "prefill"):
        assert name in by, name
    server, call, engine = by["POST /v1/chat/completions"], by["chat base"], by["engine request"]
    assert server.service == "tunegate-gateway" and engine.service == "tunegate-engine"
    assert server.parent_id == "" and server.attributes["http.response.status_code"] == 200
    # The engine's request span is the child of the gateway's client span: traceparent passed.
    assert engine.parent_id == call.span_id and call.parent_id == server.span_id
    assert by["choose replica"].attributes["tunegate.replica.reason"] == "least_loaded"
    a = call.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "base"
    assert a["gen_ai.request.max_tokens"] == 8 and a["gen_ai.usage.input_tokens"] > 0
    assert 0 < a["gen_ai.usage.output_tokens"] <= 8
    assert a["gen_ai.response.finish_reasons"] == ["length"] or "stop" in str(
        a["gen_ai.response.finish_reasons"])
    assert "gen_ai.first_token" in call.events
    assert engine.attributes["gen_ai.usage.output_tokens"] == a["gen_ai.usage.output_tokens"]
    # queue -> prefill -> decode, in order, inside the engine's request span.
    q, p, d = by["queue"], by["prefill"], by["decode"]
    assert engine.start_ns <= q.start_ns <= q.end_ns <= p.end_ns <= d.end_ns <= engine.end_ns

    # The sampled traffic record carries the trace id.
    r = redis.Redis.from_url(redis_url)
    entries: list[Any] = []
    for _ in range(50):
        entries = r.xrange(stream_name)
        if entries:
            break
        time.sleep(0.1)
    records_ = [json.loads(fields[b"r"]) for _, fields in entries]
    mine = [x for x in records_ if x["request_id"] == rid]
    assert mine and mine[0]["trace_id"] == server.trace_id


def test_client_traceparent_is_continued(gw: str, records: Records, otlp: Collector) -> None:
    trace_id = secrets.token_hex(16)
    parent = secrets.token_hex(8)
    client = openai.OpenAI(base_url=gw + "/v1", api_key=records.key("user"), max_retries=0,
                           default_headers={"traceparent": f"00-{trace_id}-{parent}-01"})
    client.chat.completions.create(model="base", messages=QUESTION, max_tokens=2)
    spans = otlp.wait_for(lambda s: _complete(otlp.trace(trace_id)), timeout_s=30)
    trace = [s for s in spans if s.trace_id == trace_id]
    server = _by_name(trace)["POST /v1/chat/completions"]
    assert server.parent_id == parent  # the caller's span is the gateway's parent


def test_bad_traceparent_starts_a_new_trace(gw: str, records: Records, otlp: Collector) -> None:
    client = openai.OpenAI(base_url=gw + "/v1", api_key=records.key("user"), max_retries=0,
                           default_headers={"traceparent": "00-garbage-" * 20})
    raw = client.chat.completions.with_raw_response.create(
        model="base", messages=QUESTION, max_tokens=2)
    rid = raw.headers["x-request-id"]
    spans = otlp.wait_for(lambda s: any(x.attributes.get("tunegate.request_id") == rid
                                        for x in s), timeout_s=30)
    server = [s for s in spans if s.attributes.get("tunegate.request_id") == rid
              and s.name.startswith("POST")]
    assert server and server[0].parent_id == ""


def test_replica_choice_reasons_for_an_adapter(gw: str, records: Records, otlp: Collector,
                                               default_model_dir: Path) -> None:
    """The first request for a version loads it (``adapter_load``, with its ``adapter load``
    span); the next one goes where it is held (``affinity``)."""
    import uuid

    from tests.protocol_checks import make_adapter

    rel = f"staging/{uuid.uuid4().hex}"
    make_adapter(default_model_dir, Path(records.registry.store.root) / rel, rank=4, seed=5,
                 targets=["q_proj"])
    ref = records.registry.register_version("traced-adapter", rel, {"test": True}).ref
    records.registry.set_alias("traced-adapter", "stable", 1)
    client = openai.OpenAI(base_url=gw + "/v1", api_key=records.key("user"), max_retries=0)
    reasons = []
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(
            model="traced-adapter", messages=QUESTION, max_tokens=2)
        assert raw.parse().model == ref
        rid = raw.headers["x-request-id"]

        def done(spans: list[Span], rid: str = rid) -> bool:
            roots = [s for s in spans if s.attributes.get("tunegate.request_id") == rid
                     and s.name.startswith("POST")]
            return bool(roots) and any(s.name == "engine request"
                                       for s in otlp.trace(roots[0].trace_id))

        spans = otlp.wait_for(done, timeout_s=30)
        root = next(s for s in spans if s.attributes.get("tunegate.request_id") == rid
                    and s.name.startswith("POST"))
        by = _by_name(otlp.trace(root.trace_id))
        reasons.append(by["choose replica"].attributes["tunegate.replica.reason"])
        if reasons[-1] == "adapter_load":
            assert by["adapter load"].attributes["tunegate.adapter"] == ref
        assert by[f"chat {'traced-adapter'}"].attributes["tunegate.model.version"] == 1
    assert reasons == ["adapter_load", "affinity"]
