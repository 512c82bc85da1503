"""The embedded engine over real HTTP (one real process, real SmolLM2): the OpenAI surface,
streaming, errors in vLLM's shape, metrics, and client disconnects."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from openai import OpenAI

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


@pytest.fixture
def client(engine_url: str) -> OpenAI:
    return OpenAI(base_url=f"{engine_url}/v1", api_key="unused", max_retries=0, timeout=120)


def sse_events(resp: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]


def metric(engine_url: str, name: str) -> float:
    for line in httpx.get(f"{engine_url}/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_health(engine_url: str) -> None:
    r = httpx.get(f"{engine_url}/health")
    assert r.status_code == 200 and r.content == b""


def test_chat_answers_paris(client: OpenAI, model_name: str) -> None:
    r = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": QUESTION}],
        temperature=0, max_tokens=20)
    assert "Paris" in (r.choices[0].message.content or "")
    assert r.object == "chat.completion" and r.model == model_name
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_with_logprobs(client: OpenAI, model_name: str) -> None:
    r = client.completions.create(model=model_name, prompt="The capital of France is",
                                  temperature=0, max_tokens=4, logprobs=3)
    choice = r.choices[0]
    assert choice.text.strip().startswith("Paris")
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 4
    lp = choice.logprobs
    assert lp is not None and len(lp.tokens) == 4 and len(lp.top_logprobs) == 4
    assert lp.token_logprobs[0] < 0
    top = lp.top_logprobs[0]
    assert len(top) == 3 and max(top.values()) == pytest.approx(lp.token_logprobs[0])


def test_chat_logprobs(client: OpenAI, model_name: str) -> None:
    r = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": QUESTION}],
        temperature=0, max_tokens=3, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and len(content) == 3
    assert len(content[0].top_logprobs) == 2
    assert content[0].top_logprobs[0].logprob == pytest.approx(content[0].logprob)


def test_chat_stream_chunks_usage_and_done(engine_url: str, model_name: str) -> None:
    body = {"model": model_name, "messages": [{"role": "user", "content": QUESTION}],
            "temperature": 0, "max_tokens": 20, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{engine_url}/v1/chat/completions", json=body, timeout=60) as r:
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


def test_completion_stream_with_openai_sdk(client: OpenAI, model_name: str) -> None:
    stream = client.completions.create(model=model_name, prompt="The capital of France is",
                                       temperature=0, max_tokens=6, stream=True)
    chunks = list(stream)
    assert all(c.object == "text_completion" for c in chunks)
    assert "Paris" in "".join(c.choices[0].text for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_string_and_seed(client: OpenAI, model_name: str) -> None:
    r = client.completions.create(model=model_name, prompt="The capital of France is",
                                  temperature=0, max_tokens=10, stop=["."])
    assert r.choices[0].finish_reason == "stop" and "." not in r.choices[0].text
    assert r.choices[0].model_extra["stop_reason"] == "."

    def sampled(seed: int) -> str:
        return client.completions.create(
            model=model_name, prompt="Once upon a time", temperature=1.0, top_p=0.95,
            max_tokens=12, seed=seed).choices[0].text

    assert sampled(7) == sampled(7)
    assert len({sampled(s) for s in (1, 2, 3)}) > 1


def test_models_list(engine_url: str, model_name: str, default_model_dir: object) -> None:
    body = httpx.get(f"{engine_url}/v1/models").json()
    assert body["object"] == "list"
    base = next(c for c in body["data"] if c["id"] == model_name)
    assert base["object"] == "model" and base["owned_by"] == "vllm"
    assert base["parent"] is None and base["root"] == str(default_model_dir)


def assert_error(r: httpx.Response, status: int, type_: str) -> dict[str, object]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == type_ and err["code"] == status and err["message"]
    return err


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_unknown_model_is_404(engine_url: str, path: str) -> None:
    body = {"model": "no-such-model", "prompt": "hi",
            "messages": [{"role": "user", "content": "hi"}]}
    err = assert_error(httpx.post(engine_url + path, json=body), 404, "NotFoundError")
    assert str(err["message"]).startswith("The model `no-such-model` does not exist.")
    assert err["param"] == "model"


@pytest.mark.parametrize("change", [
    {"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"max_tokens": 0}, {"n": 2},
    {"logprobs": 100}, {"prompt": ""}, {"stop": [""]}, {"max_tokens": 100000},
    {"stream_options": {"include_usage": True}}, {"seed": 2**70}, {"logprobs": -1},
    {"prompt": [[]]}, {"prompt": [1, 10**9]}, {"prompt": ["a", "b"]}, {"echo": True},
])
def test_bad_parameters_are_400(engine_url: str, model_name: str, change: dict) -> None:
    body = {"model": model_name, "prompt": "hi", "max_tokens": 2, **change}
    assert_error(httpx.post(f"{engine_url}/v1/completions", json=body), 400, "BadRequestError")


def test_bad_chat_bodies_are_400(engine_url: str, model_name: str) -> None:
    hi = [{"role": "user", "content": "hi"}]
    for body in ({"model": model_name, "messages": []},
                 {"model": model_name, "messages": hi, "top_logprobs": 2},
                 {"model": model_name, "messages": hi, "max_completion_tokens": 0}):
        assert_error(httpx.post(f"{engine_url}/v1/chat/completions", json=body), 400,
                     "BadRequestError")
    # Bodies that do not fit the schema get vLLM's "Bad Request" type and a dotted param.
    err = assert_error(httpx.post(f"{engine_url}/v1/chat/completions",
                                  json={"model": model_name}), 400, "Bad Request")
    assert err["param"] == "body.messages"
    err = assert_error(httpx.post(f"{engine_url}/v1/chat/completions",
                                  json={"messages": hi, "temperature": "hot"}), 400, "Bad Request")
    assert err["param"] == "body.temperature"


def test_bad_json_is_400(engine_url: str) -> None:
    r = httpx.post(f"{engine_url}/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert_error(r, 400, "Bad Request")
    # Python's json reads NaN; a NaN temperature must not reach (and fail) a whole batch.
    r = httpx.post(f"{engine_url}/v1/completions", content=b'{"prompt": "x", "temperature": NaN}',
                   headers={"content-type": "application/json"})
    assert_error(r, 400, "Bad Request")


def test_stream_errors_come_before_the_stream(engine_url: str, model_name: str) -> None:
    body = {"model": model_name, "prompt": "hi", "temperature": -1, "stream": True}
    err = assert_error(httpx.post(f"{engine_url}/v1/completions", json=body), 400,
                       "BadRequestError")
    assert err["param"] == "temperature"


def test_request_id_header_names_the_completion(client: OpenAI, model_name: str) -> None:
    r = client.completions.create(model=model_name, prompt="Hi", max_tokens=1,
                                  extra_headers={"X-Request-Id": "abc123"})
    assert r.id == "cmpl-abc123"


def test_max_tokens_is_clamped_to_the_context(client: OpenAI, model_name: str) -> None:
    prompt = "one two three four five six seven eight nine ten " * 49
    r = client.completions.create(model=model_name, prompt=prompt, max_tokens=100,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens + r.usage.completion_tokens == 512  # the test engine's context
    assert r.choices[0].finish_reason == "length"


def test_prompt_longer_than_context_is_400(client: OpenAI, model_name: str) -> None:
    long_prompt = "hello " * 2000  # > the test engine's 512-token context
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_name, max_tokens=2,
                                       messages=[{"role": "user", "content": long_prompt}])
    assert "maximum context length" in str(info.value)


def test_metrics_use_vllm_names(engine_url: str, client: OpenAI, model_name: str) -> None:
    before = metric(engine_url, "vllm:generation_tokens_total")
    client.completions.create(model=model_name, prompt="Hi", max_tokens=3, temperature=0,
                              extra_body={"ignore_eos": True})
    text = httpx.get(f"{engine_url}/metrics").text
    for name in ("vllm:time_to_first_token_seconds_bucket", "vllm:e2e_request_latency_seconds_sum",
                 "vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:prompt_tokens_total"):
        assert any(line.startswith(name + "{") and f'model_name="{model_name}"' in line
                   for line in text.splitlines()), name
    assert metric(engine_url, "vllm:generation_tokens_total") == before + 3


def wait_idle(engine_url: str, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if metric(engine_url, "vllm:num_requests_running") == 0:
            return True
        time.sleep(0.2)
    return False


def test_stream_disconnect_stops_generation(engine_url: str, model_name: str) -> None:
    body = {"model": model_name, "prompt": "Tell me a long story.", "max_tokens": 400,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{engine_url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few events: it is running
        assert any(g.startswith("data: ") for g in got)
        assert metric(engine_url, "vllm:num_requests_running") >= 1
    # 400 tokens take far longer than this at CPU speed; leaving must abort it instead.
    assert wait_idle(engine_url)
    generated = metric(engine_url, "vllm:generation_tokens_total")
    time.sleep(1.0)
    assert metric(engine_url, "vllm:generation_tokens_total") == generated


def test_non_stream_disconnect_stops_generation(engine_url: str, model_name: str) -> None:
    body = {"model": model_name, "prompt": "Tell me a long story.", "max_tokens": 400,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{engine_url}/v1/completions", json=body, timeout=2.0)
    assert wait_idle(engine_url)
