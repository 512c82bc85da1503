"""The embedded engine over real HTTP (one real process, real SmolLM2): what only the embedded
engine does. What it shares with vLLM (the OpenAI surface, streaming, errors in vLLM's shape,
metric names) is in tests/protocol_checks.py, run on both engines by tests/vllm/test_protocol.py.
Here: stricter validation than vLLM, and client disconnects aborting generation."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import pytest

from tests.protocol_checks import assert_error, metric

pytestmark = pytest.mark.slow


# Completions parameters the embedded engine rejects with 400 beyond the shared list
# (protocol_checks.BAD_COMPLETION_PARAMS): vLLM accepts or treats some of them differently.
@pytest.mark.parametrize("change", [
    {"max_tokens": 0}, {"n": 2}, {"logprobs": 100}, {"stop": [""]},
    {"stream_options": {"include_usage": True}}, {"seed": 2**70}, {"logprobs": -1},
    {"prompt": [[]]}, {"prompt": [1, 10**9]}, {"prompt": ["a", "b"]}, {"echo": True},
])
def test_bad_parameters_are_400(engine_url: str, model_name: str, change: dict) -> None:
    body = {"model": model_name, "prompt": "hi", "max_tokens": 2, **change}
    assert_error(httpx.post(f"{engine_url}/v1/completions", json=body), 400, "BadRequestError")


def test_bad_chat_bodies_are_400(engine_url: str, model_name: str) -> None:
    hi = [{"role": "user", "content": "hi"}]
    body = {"model": model_name, "messages": hi, "max_completion_tokens": 0}
    assert_error(httpx.post(f"{engine_url}/v1/chat/completions", json=body), 400,
                 "BadRequestError")
    # Bodies that do not fit the schema get vLLM's "Bad Request" type and a dotted param.
    err = assert_error(httpx.post(f"{engine_url}/v1/chat/completions",
                                  json={"model": model_name}), 400, "Bad Request")
    assert err["param"] == "body.messages"


def test_nan_in_json_is_400(engine_url: str) -> None:
    # Python's json reads NaN; a NaN temperature must not reach (and fail) a whole batch.
    r = httpx.post(f"{engine_url}/v1/completions", content=b'{"prompt": "x", "temperature": NaN}',
                   headers={"content-type": "application/json"})
    assert_error(r, 400, "Bad Request")


def wait_idle(engine_url: str, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if metric(engine_url, "vllm:num_requests_running") == 0:
            return True
        time.sleep(0.2)  # s between polls of /metrics
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


def test_requests_sharing_an_x_request_id_both_complete(engine_url: str, model_name: str) -> None:
    # A client's X-Request-ID is not unique by contract (a gateway's shadow copy carries the live
    # request's id): two at once must both be answered, not leave one waiting forever.
    def ask(prompt: str) -> httpx.Response:
        return httpx.post(engine_url + "/v1/completions", timeout=60,
                          headers={"x-request-id": "same-id"},
                          json={"model": model_name, "prompt": prompt, "max_tokens": 8,
                                "temperature": 0, "ignore_eos": True})

    with cf.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(ask, ["The capital of France is", "One, two, three,"]))
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    assert all(r.json()["usage"]["completion_tokens"] == 8 for r in answers)
