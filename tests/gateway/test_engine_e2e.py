"""The gateway in front of the real embedded engine (real SmolLM2 on CPU), with the `openai` SDK:
chat, completions, streaming, models, /v1/generate, and an adapter registered in the registry,
loaded on the engine by the gateway and served by its immutable version name."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.gateway.conftest import Records, auth, gateway
from tests.procs import free_port, run_server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("engine-log") / "engine.log"
    args = ["-m", "tunegate", "engine", "serve", "--kind", "embedded", "--model",
            str(default_model_dir), "--port", str(port), "--max-loras", "2",
            "--max-lora-rank", "8", "--max-model-len", "512", "--max-num-seqs", "4"]
    with run_server(args, port=port, log=log, timeout_s=240) as (url, _):
        yield url


@pytest.fixture(scope="module")
def gw(engine: str, data_dir: Path, redis_url: str) -> Iterator[str]:
    with gateway(data_dir, [engine], redis_url) as url:
        yield url


@pytest.fixture(scope="module")
def client(gw: str, records: Records) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw + "/v1", api_key=records.key("user"), max_retries=0)


def test_chat_greedy_answer(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="base", messages=QUESTION, max_tokens=12,
                                          temperature=0)
    assert "Paris" in (resp.choices[0].message.content or "")
    assert resp.model == "base"
    assert resp.usage is not None and 0 < resp.usage.completion_tokens <= 12


def test_streaming(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="base", messages=QUESTION, max_tokens=12,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert all(c.model == "base" for c in chunks)


def test_completions_and_models(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="base", prompt="The capital of France is",
                                     max_tokens=4, temperature=0)
    assert resp.choices[0].text
    assert "base" in {m.id for m in client.models.list()}


def test_errors_from_the_real_engine(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such", messages=QUESTION)
    with pytest.raises(openai.BadRequestError):  # the engine's own validation, passed on
        client.chat.completions.create(model="base", messages=QUESTION, max_tokens=100_000)


def test_generate(gw: str, records: Records) -> None:
    r = httpx.post(gw + "/v1/generate", headers=auth(records.key("user")), timeout=60,
                   json={"prompt": "What is the capital of France?", "max_tokens": 12,
                         "temperature": 0})
    assert r.status_code == 200, r.text
    data = r.json()
    assert "Paris" in data["text"] and data["tokens_generated"] > 0
    assert data["model"] == "base" and data["latency_ms"] > 0


def _make_adapter(base_dir: Path, out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8,
                                                  target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(out)


def test_adapter_loaded_by_the_gateway(gw: str, engine: str, records: Records,
                                       default_model_dir: Path, client: openai.OpenAI) -> None:
    rel = "staging/e2e"
    _make_adapter(default_model_dir, Path(records.registry.store.root) / rel)
    v = records.registry.register_version("e2e", rel, {"base_model": default_model_dir.name})
    records.registry.set_alias("e2e", "stable", v.version)
    resp = client.chat.completions.create(model="e2e", messages=QUESTION, max_tokens=6,
                                          temperature=0)
    assert resp.model == v.ref and resp.choices[0].message.content
    held = httpx.get(engine + "/v1/models").json()["data"]
    assert v.ref in {m["id"] for m in held if m.get("parent")}
    stream = client.chat.completions.create(model="e2e:stable", messages=QUESTION,
                                            max_tokens=4, stream=True)
    assert all(c.model == v.ref for c in stream)
    manifest = json.loads((Path(v.path) / "tunegate-manifest.json").read_text())
    assert manifest["content_hash"] == v.content_hash
