"""LoRA adapters on the embedded engine over real HTTP: loading and its checks, the bounded LRU
resident set, adapters changing logprobs, and exact base output inside mixed batches."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.protocol_checks import assert_error

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("unload_all")]

PROMPT = "The capital of France is"


def load(url: str, name: str, path: Path | str) -> httpx.Response:
    return httpx.post(f"{url}/v1/load_lora_adapter",
                      json={"lora_name": name, "lora_path": str(path)}, timeout=60)


def unload(url: str, name: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)


def loaded(url: str, base: str) -> list[str]:
    return [c["id"] for c in httpx.get(f"{url}/v1/models").json()["data"] if c["id"] != base]


def first_token(url: str, model: str, max_tokens: int = 1) -> dict:
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
        "logprobs": 5, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_load_list_use_unload(engine_url: str, model_name: str, adapters: dict[str, Path]) -> None:
    r = load(engine_url, "ad1", adapters["a1"])
    assert r.status_code == 200
    assert r.text == "Success: LoRA adapter 'ad1' added successfully."
    card = next(c for c in httpx.get(f"{engine_url}/v1/models").json()["data"]
                if c["id"] == "ad1")
    assert card["parent"] == model_name and card["root"] == str(adapters["a1"])
    assert card["object"] == "model" and card["owned_by"] == "vllm"
    base = first_token(engine_url, model_name)
    tuned = first_token(engine_url, "ad1")
    base_top = base["logprobs"]["top_logprobs"][0]
    tuned_top = tuned["logprobs"]["top_logprobs"][0]
    common = set(base_top) & set(tuned_top)
    assert common, "top-5 sets share no token"
    assert max(abs(base_top[t] - tuned_top[t]) for t in common) > 1e-2
    assert_error(load(engine_url, "ad1", adapters["a1"]), 400, "InvalidUserInput")
    r = unload(engine_url, "ad1")
    assert r.status_code == 200 and "ad1" in r.text
    assert "ad1" not in loaded(engine_url, model_name)
    assert_error(httpx.post(f"{engine_url}/v1/completions",
                            json={"model": "ad1", "prompt": "x"}), 404, "NotFoundError")
    assert_error(unload(engine_url, "ad1"), 404, "NotFoundError")
    assert first_token(engine_url, model_name) == base  # unloading left the base untouched


@pytest.mark.parametrize(("which", "status", "type_", "words"), [
    ("rank16", 400, "BadRequestError", "max_lora_rank"),
    ("wrong_base", 400, "BadRequestError", "base model"),
    ("bad_target", 400, "BadRequestError", "no_such_proj"),
])
def test_unfit_adapters_are_refused(engine_url: str, model_name: str, adapters: dict[str, Path],
                                    which: str, status: int, type_: str, words: str) -> None:
    err = assert_error(load(engine_url, which, adapters[which]), status, type_)
    assert words in str(err["message"])
    assert which not in loaded(engine_url, model_name)


def test_missing_path_and_bad_bodies(engine_url: str, tmp_path: Path) -> None:
    assert_error(load(engine_url, "nope", tmp_path / "missing"), 404, "NotFoundError")
    assert_error(load(engine_url, "empty", tmp_path), 404, "NotFoundError")
    r = httpx.post(f"{engine_url}/v1/load_lora_adapter", json={"lora_name": "x"})
    assert_error(r, 400, "Bad Request")


def test_least_recently_used_is_unloaded(engine_url: str, model_name: str,
                                         adapters: dict[str, Path]) -> None:
    # The test engine keeps at most 2 adapters.
    assert load(engine_url, "first", adapters["a1"]).status_code == 200
    assert load(engine_url, "second", adapters["a2"]).status_code == 200
    first_token(engine_url, "first")  # "second" is now the least recently used
    assert load(engine_url, "third", adapters["a3"]).status_code == 200
    assert sorted(loaded(engine_url, model_name)) == ["first", "third"]
    first_token(engine_url, "third")
    assert load(engine_url, "fourth", adapters["a2"]).status_code == 200
    assert sorted(loaded(engine_url, model_name)) == ["fourth", "third"]


def test_an_adapter_in_use_is_not_evicted(engine_url: str, model_name: str,
                                          adapters: dict[str, Path]) -> None:
    assert load(engine_url, "streaming", adapters["a1"]).status_code == 200
    body = {"model": "streaming", "prompt": PROMPT, "max_tokens": 40, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{engine_url}/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        next(lines)
        assert load(engine_url, "idle", adapters["a2"]).status_code == 200
        first_token(engine_url, "idle")  # "streaming" is now least recently used, but busy
        assert load(engine_url, "newest", adapters["a3"]).status_code == 200
        assert sorted(loaded(engine_url, model_name)) == ["newest", "streaming"]
        events = [ln[len("data: "):] for ln in lines if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


def test_base_output_is_exact_in_a_mixed_batch(engine_url: str, model_name: str,
                                               adapters: dict[str, Path]) -> None:
    assert load(engine_url, "mix1", adapters["a1"]).status_code == 200
    assert load(engine_url, "mix2", adapters["a2"]).status_code == 200
    alone = first_token(engine_url, model_name, max_tokens=12)
    solo = {n: first_token(engine_url, n, max_tokens=12)["text"] for n in ("mix1", "mix2")}
    assert len({alone["text"], *solo.values()}) == 3, "adapters too weak to tell apart"

    # Adapter streams run (long) while the base request goes through the same batches.
    started = threading.Barrier(3)
    texts: dict[str, str] = {}
    ended: dict[str, float] = {}

    def adapter_stream(name: str) -> None:
        body = {"model": name, "prompt": PROMPT, "max_tokens": 40, "temperature": 0,
                "ignore_eos": True, "stream": True}
        events: list[str] = []
        with httpx.stream("POST", f"{engine_url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    if len(events) == 1:
                        started.wait(60)  # both adapter requests are in the batch
        ended[name] = time.monotonic()
        texts[name] = "".join(json.loads(e)["choices"][0]["text"] for e in events
                              if e != "[DONE]")

    threads = [threading.Thread(target=adapter_stream, args=(n,)) for n in ("mix1", "mix2")]
    for t in threads:
        t.start()
    started.wait(60)
    mixed = first_token(engine_url, model_name, max_tokens=12)
    base_done = time.monotonic()
    for t in threads:
        t.join(120)
    assert min(ended.values()) > base_done, "the adapter streams did not overlap the base one"
    assert mixed["text"] == alone["text"]
    assert mixed["logprobs"]["tokens"] == alone["logprobs"]["tokens"]
    for a, b in zip(mixed["logprobs"]["token_logprobs"], alone["logprobs"]["token_logprobs"],
                    strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    # The adapters were really applied in those batches, each its own.
    for name, text in solo.items():
        assert texts[name].startswith(text), name


def test_unload_while_in_use_finishes_the_request(engine_url: str, model_name: str,
                                                  adapters: dict[str, Path]) -> None:
    assert load(engine_url, "busy", adapters["a1"]).status_code == 200
    body = {"model": "busy", "prompt": PROMPT, "max_tokens": 30, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{engine_url}/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        next(lines)
        assert unload(engine_url, "busy").status_code == 200
        events = [ln[len("data: "):] for ln in lines if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"][0]["finish_reason"] == "length"
    assert "busy" not in loaded(engine_url, model_name)
